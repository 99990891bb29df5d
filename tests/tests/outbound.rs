//! The VM's outbound data path in real Envoys with the built filter: a client sidecar whose
//! table names a service, two server sidecars (inbound mTLS with their own workload
//! certificates) in front of echo apps. All on loopback: the client's outbound listener binds
//! the service's VIP itself (a 127.x address), so a connection's original destination is the
//! VIP, as it would be behind the capture rules.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use vmesh_api::agent::counter;
use vmesh_api::traffic::outbound_stat;
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::TempDir;
use vmesh_tests::support::echo::Echo;
use vmesh_tests::support::envoy::{Envoy, Ports};
use vmesh_tests::support::mesh_pki::MeshCa;
use vmesh_tests::support::stubs::ShimStub;

const HOST: &str = "vmservice.example.com";
const SERVER_ID: &str = "spiffe://cluster.local/ns/vm-services/sa/my-vm";
const CLIENT_ID: &str = "spiffe://cluster.local/ns/client/sa/curl";
const VIP: Ipv4Addr = Ipv4Addr::new(127, 0, 10, 1);

struct Server {
    envoy: Envoy,
    app: Echo,
    _dir: TempDir,
}

fn server(ca: &MeshCa) -> Server {
    let dir = TempDir::new();
    let app = Echo::start();
    ca.install(&dir.path().join("certs"), SERVER_ID);
    let mut ports = Ports::free();
    ports.app = app.port;
    // Nothing listens on its shim port: a server needs no table to terminate mTLS.
    let envoy = Envoy::start_on(dir.path(), vmesh_test_support::free_port(), ports, 1);
    Server {
        envoy,
        app,
        _dir: dir,
    }
}

fn table(version: &str, port: u16, endpoints: &[(u16, u32, &str)]) -> serde_json::Value {
    let endpoints: Vec<serde_json::Value> = endpoints
        .iter()
        .map(|(p, weight, identity)| {
            serde_json::json!({"address": "127.0.0.1", "port": p, "weight": weight, "identity": identity})
        })
        .collect();
    serde_json::json!({
        "version": version,
        "namespace": "client",
        "names": {HOST: {"ips": [VIP.to_string()], "registry": "External"}},
        "services": {HOST: {
            "namespace": "vm-services", "registry": "External", "resolution": "STATIC",
            "vips": [VIP.to_string()],
            "ports": [{"port": port, "name": "http", "protocol": "TCP", "endpoints": endpoints}]
        }}
    })
}

/// The client's outbound stats that moved, for failure messages.
fn outbound_stats(envoy: &Envoy) -> String {
    let (_, body) = envoy
        .admin_get("/stats?filter=outbound|vmesh_mesh_mtls|vmesh_passthrough|vmesh_no_endpoint")
        .unwrap_or_default();
    body.lines()
        .filter(|l| !l.ends_with(": 0") && !l.contains("No recorded values"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One connection through the client's outbound listener: a line out, its echo back.
fn exchange(to: SocketAddr, line: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(to).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; line.len()];
    s.read_exact(&mut buf)
        .map_err(|e| format!("no echo: {e}"))?;
    String::from_utf8(buf).map_err(|e| e.to_string())
}

#[test]
fn vip_connections_reach_both_endpoints_over_mtls_with_the_san_checked_and_are_counted() {
    let ca = MeshCa::new();
    let (a, b) = (server(&ca), server(&ca));

    let dir = TempDir::new();
    ca.install(&dir.path().join("certs"), CLIENT_ID);
    let mut ports = Ports::free();
    ports.outbound_ip = VIP;
    let svc_port = ports.outbound;
    let shim_port = vmesh_test_support::free_port();
    let endpoints = [
        (a.envoy.ports().inbound, 1, SERVER_ID),
        (b.envoy.ports().inbound, 1, SERVER_ID),
    ];
    let stub = ShimStub::start(shim_port, table("1", svc_port, &endpoints));
    let client = Envoy::start_on(dir.path(), shim_port, ports, 2);
    let vip = SocketAddr::from((VIP, svc_port));

    // Not one connection before the agent published the table: until then the filter
    // passes connections through to their destination, here the listener itself.
    eventually("the agent published the table", || {
        let n = client.stat("wasmcustom.vmesh_table_updates");
        (n >= 1).then_some(()).ok_or(format!("updates {n}"))
    });
    eventually("a VIP connection reaches an app", || {
        exchange(vip, "hello\n")
            .and_then(|got| {
                (got == "hello\n")
                    .then_some(())
                    .ok_or(format!("echo {got:?}"))
            })
            .map_err(|e| format!("{e}; client stats:\n{}", outbound_stats(&client)))
    });
    for i in 0..20 {
        let line = format!("line {i}\n");
        assert_eq!(exchange(vip, &line).as_deref(), Ok(line.as_str()));
    }
    // Both endpoints (weights 1:1) took connections, all of them over mTLS.
    assert!(
        a.app.accepted() > 0 && b.app.accepted() > 0,
        "a {} b {}",
        a.app.accepted(),
        b.app.accepted()
    );
    let handshakes = client.stat("cluster.vmesh_mesh_mtls.ssl.handshake");
    assert!(handshakes >= 21, "mTLS handshakes: {handshakes}");
    assert_eq!(
        client.stat("cluster.vmesh_mesh_mtls.ssl.fail_verify_san"),
        0
    );
    let stat = |what| {
        client.stat(&format!(
            "wasmcustom.{}",
            outbound_stat(HOST, svc_port, what)
        ))
    };
    eventually("per-service counters count the connections", || {
        let (total, failed, sent) = (stat("cx_total"), stat("cx_failed"), stat("bytes_sent"));
        (total >= 21 && failed == 0 && sent >= 21 * 6)
            .then_some(())
            .ok_or(format!("total {total} failed {failed} sent {sent}"))
    });

    // The table names another identity: the handshake fails the SAN check, the connection
    // is refused, and it counts as failed (in the service's stats and the agent's report).
    stub.set_table(table(
        "2",
        svc_port,
        &[(
            a.envoy.ports().inbound,
            1,
            "spiffe://cluster.local/ns/other/sa/impostor",
        )],
    ));
    eventually("a wrong identity is refused", || {
        match exchange(vip, "x\n") {
            Ok(got) => Err(format!("still answered {got:?}")),
            Err(_) => (client.stat("cluster.vmesh_mesh_mtls.ssl.fail_verify_san") > 0)
                .then_some(())
                .ok_or("refused, but not by the SAN check".into()),
        }
    });
    eventually("refusals count as failures", || {
        let failed = stat("cx_failed");
        (failed > 0).then_some(()).ok_or(format!("failed {failed}"))
    });
    let report = eventually("the agent reports outbound outcomes", || {
        let r = stub.last().ok_or("no report yet")?;
        let got = |name| r.report.counters.get(name).unwrap_or(0);
        let (total, failed) = (
            got(counter::OUTBOUND_CONNECTIONS),
            got(counter::OUTBOUND_FAILURES),
        );
        (total >= 22 && failed >= 1)
            .then_some(r)
            .ok_or(format!("connections {total} failures {failed}"))
    });
    assert!(report.report.ready);
    // A refused connection never reaches the app (TLS ended at the handshake).
    let before_app = a.app.accepted();
    assert!(exchange(vip, "y\n").is_err());
    assert_eq!(a.app.accepted(), before_app);

    // A DNS service whose endpoint is a host name: Envoy resolves it (dynamic forward proxy
    // behind the dns_forward internal listener) and connects in plain TCP, to the app itself.
    let mut dns = table("3", svc_port, &[]);
    dns["services"][HOST]["resolution"] = "DNS".into();
    dns["services"][HOST]["ports"][0]["endpoints"] =
        serde_json::json!([{"address": "localhost", "port": b.app.port, "weight": 1}]);
    stub.set_table(dns);
    let before_app = b.app.accepted();
    eventually("a DNS service's host name is resolved and reached", || {
        let got = exchange(vip, "by name\n")?;
        (got == "by name\n" && b.app.accepted() > before_app)
            .then_some(())
            .ok_or(format!("echo {got:?}"))
    });
    assert!(client.stat("cluster.vmesh_dns_forward_proxy.upstream_cx_total") >= 1);
    drop(client);
}
