//! A VM joins the mesh by itself, and leaves it: the real control plane (`vmesh-control
//! serve`), real Envoys with the built filter, real shims started from the bundle that
//! `vmesh-control vm-bundle` wrote, dnsmasq as the VMs' resolver, an HTTP app for the probe.
//! Nobody touches the control plane after `apply`: every entry below is made, kept, marked
//! and removed by what the VMs do. Everything listens on 127.0.0.1; VM addresses are test
//! addresses from 198.18.0.0/15 given as `ISTIO_SVC_IP`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmesh_test_support::eventually::eventually;
use vmesh_test_support::free_port;
use vmesh_tests::support::app::App;
use vmesh_tests::support::control_plane::{healthy_condition, ControlPlane, CpOptions};
use vmesh_tests::support::dnsmasq::{Dnsmasq, FORWARDED_ADDR, FORWARDED_NAME};
use vmesh_tests::support::vm::{Vm, VmOptions};

const NS: &str = "vm-namespace";
const GROUP: &str = "python-http";
const SERVICE_IP: &str = "10.96.0.10";

struct Mesh {
    // Drop order: the control plane last, after every VM a test holds is gone.
    app: App,
    dnsmasq: Dnsmasq,
    cp: ControlPlane,
    bundle: PathBuf,
    dir: vmesh_test_support::TempDir,
}

/// The seed's config: a WorkloadGroup with a readiness probe on the app, a ServiceEntry that
/// selects its VMs, and a Kubernetes Service with a ClusterIP.
fn config(app_port: u16, probe_period: u32) -> String {
    config_with_probe(&format!(
        "periodSeconds: {probe_period}\n    httpGet: {{port: {app_port}, path: /ready}}"
    ))
}

/// The same config with another probe (YAML under `probe:`, indented by four).
fn config_with_probe(probe: &str) -> String {
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  name: {GROUP}
  namespace: {NS}
spec:
  metadata:
    labels:
      app: {GROUP}
  template:
    serviceAccount: vm-sa
  probe:
    {probe}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: vm-workload-svc
  namespace: {NS}
spec:
  hosts: [vmservice.example.com]
  location: MESH_INTERNAL
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 9090}}
  resolution: STATIC
  workloadSelector:
    labels:
      app: {GROUP}
---
apiVersion: v1
kind: Service
metadata:
  name: details
  namespace: {NS}
spec:
  clusterIP: {SERVICE_IP}
  ports:
  - {{port: 9080, name: http}}
  selector:
    app: details
"#
    )
}

impl Mesh {
    fn start() -> Mesh {
        Mesh::with(CpOptions::default(), 1)
    }

    fn with(options: CpOptions, probe_period: u32) -> Mesh {
        Mesh::configured(options, |app| config(app.port, probe_period))
    }

    fn configured(options: CpOptions, yaml: impl FnOnce(&App) -> String) -> Mesh {
        let dir = vmesh_test_support::TempDir::new();
        let dnsmasq = Dnsmasq::start(dir.path());
        let app = App::start();
        let cp = ControlPlane::start(dir.path(), options);
        cp.apply(dir.path(), &yaml(&app));
        let bundle = dir.path().join("bundle");
        cp.bundle(GROUP, NS, &bundle);
        Mesh {
            app,
            dnsmasq,
            cp,
            bundle,
            dir,
        }
    }

    fn vm(&self, address: &str) -> Vm {
        Vm::start(
            self.dir.path(),
            &self.bundle,
            VmOptions::new(address, &self.dnsmasq.addr()),
        )
    }

    fn entry_name(address: &str) -> String {
        format!("{GROUP}-{address}")
    }

    fn entry(&self, address: &str) -> Result<Option<serde_json::Value>, String> {
        self.cp.entry(NS, &Mesh::entry_name(address))
    }

    fn wait_entry(&self, address: &str) -> serde_json::Value {
        eventually(&format!("the entry of {address} exists"), || {
            self.entry(address)?.ok_or_else(|| "not yet".to_string())
        })
    }

    fn wait_gone(&self, address: &str) {
        eventually(
            &format!("the entry of {address} is deleted"),
            || match self.entry(address)? {
                None => Ok(()),
                Some(e) => Err(format!("still there: {}", e["metadata"]["annotations"])),
            },
        );
    }

    /// Waits for the entry's `Healthy` condition to have `status`; returns its message.
    fn wait_health(&self, address: &str, status: &str) -> String {
        eventually(
            &format!("the entry of {address} is Healthy={status}"),
            || {
                let e = self.entry(address)?.ok_or("no entry")?;
                match healthy_condition(&e) {
                    Some((s, m)) if s == status => Ok(m),
                    other => Err(format!("{other:?}")),
                }
            },
        )
    }
}

fn annotation<'a>(entry: &'a serde_json::Value, key: &str) -> Option<&'a str> {
    entry["metadata"]["annotations"][key].as_str()
}

#[test]
fn a_starting_vm_registers_an_istio_entry_and_another_vm_resolves_its_names() {
    let mesh = Mesh::start();
    let started = Instant::now();
    let vm = mesh.vm("198.18.0.11");
    let entry = mesh.wait_entry("198.18.0.11");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(500),
        "registration took {took:?} from Envoy being live"
    );
    // pilot/pkg/autoregistration: name GROUP-IP, the group's labels, the connection
    // annotations, health checks enabled for a group with a probe, owned by the group.
    assert_eq!(entry["metadata"]["name"], "python-http-198.18.0.11");
    assert_eq!(entry["spec"]["address"], "198.18.0.11");
    assert_eq!(entry["spec"]["serviceAccount"], "vm-sa");
    assert_eq!(entry["spec"]["labels"]["app"], GROUP);
    assert_eq!(
        annotation(&entry, "istio.io/autoRegistrationGroup"),
        Some(GROUP)
    );
    assert!(annotation(&entry, "istio.io/workloadController").is_some());
    assert!(annotation(&entry, "istio.io/connectedAt").is_some());
    assert_eq!(
        annotation(&entry, "proxy.istio.io/health-checks-enabled"),
        Some("true")
    );
    let owner = &entry["metadata"]["ownerReferences"][0];
    assert_eq!(
        (owner["kind"].as_str(), owner["name"].as_str()),
        (Some("WorkloadGroup"), Some(GROUP))
    );
    assert_eq!(vm.registration().unwrap(), "registered");

    // A second VM: the ServiceEntry host (an auto-allocated VIP) and `name.namespace` of a
    // Service resolve through its own Envoy; other names still go to its resolver.
    let other = mesh.vm("198.18.0.12");
    mesh.wait_entry("198.18.0.12");
    eventually("vmservice.example.com has a VIP on both VMs", || {
        let a = other.dig(&["vmservice.example.com"])?.data("A");
        let b = vm.dig(&["vmservice.example.com"])?.data("A");
        match a.as_slice() {
            [vip] if vip.starts_with("240.240.") && a == b => Ok(()),
            _ => Err(format!("{a:?} / {b:?}")),
        }
    });
    other.wait_resolves("details.vm-namespace", &[SERVICE_IP]);
    other.wait_resolves(FORWARDED_NAME, &[FORWARDED_ADDR]);
    // The VM's own search domain (its resolv.conf) replaced the cluster's.
    other.wait_resolves("details.vm-namespace.corp.example", &[SERVICE_IP]);
}

#[test]
fn a_failing_probe_turns_the_entry_unhealthy_within_two_periods_and_back() {
    let mesh = Mesh::with(CpOptions::default(), 2);
    let _vm = mesh.vm("198.18.0.21");
    let message = mesh.wait_health("198.18.0.21", "True");
    assert!(message.contains("HTTP 200"), "{message}");
    mesh.app.set_ready(false);
    let failed = Instant::now();
    let message = mesh.wait_health("198.18.0.21", "False");
    let took = failed.elapsed();
    assert!(message.contains("503"), "{message}");
    assert!(
        took <= Duration::from_secs(4) + Duration::from_millis(500),
        "took {took:?}, more than two probe periods"
    );
    mesh.app.set_ready(true);
    mesh.wait_health("198.18.0.21", "True");
}

#[test]
fn a_killed_envoy_is_unhealthy_at_once_deleted_after_grace_and_registers_again_when_back() {
    let mesh = Mesh::start();
    let mut vm = mesh.vm("198.18.0.31");
    mesh.wait_health("198.18.0.31", "True");
    vm.kill_envoy();
    let killed = Instant::now();
    let message = mesh.wait_health("198.18.0.31", "False");
    assert!(
        killed.elapsed() <= Duration::from_secs(2) + Duration::from_millis(500),
        "unhealthy after {:?}, more than two report periods",
        killed.elapsed()
    );
    assert!(message.contains("data plane down"), "{message}");
    mesh.wait_gone("198.18.0.31");
    assert_eq!(vm.registration().unwrap(), "dataPlaneDown");

    vm.start_envoy();
    mesh.wait_entry("198.18.0.31");
    mesh.wait_health("198.18.0.31", "True");
}

#[test]
fn a_hung_envoy_is_seen_like_a_dead_one() {
    let mesh = Mesh::start();
    let mut vm = mesh.vm("198.18.0.41");
    mesh.wait_health("198.18.0.41", "True");
    vm.envoy().process().signal("STOP");
    let stopped = Instant::now();
    let message = mesh.wait_health("198.18.0.41", "False");
    assert!(
        stopped.elapsed() <= Duration::from_secs(2) + Duration::from_millis(500),
        "unhealthy after {:?}",
        stopped.elapsed()
    );
    assert!(message.contains("no report from Envoy"), "{message}");
    mesh.wait_gone("198.18.0.41");
    // Resumed, the same Envoy reports again and the VM is registered again.
    vm.envoy().process().signal("CONT");
    mesh.wait_entry("198.18.0.41");
    mesh.wait_health("198.18.0.41", "True");
}

#[test]
fn a_terminated_shim_deregisters_at_once_and_a_killed_one_is_removed_after_grace() {
    let mesh = Mesh::start();
    let mut a = mesh.vm("198.18.0.51");
    let mut b = mesh.vm("198.18.0.52");
    mesh.wait_entry("198.18.0.51");
    mesh.wait_entry("198.18.0.52");

    let status = a.terminate_shim().expect("the shim exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    // Deleted by the deregistration, well before any liveness timeout could.
    assert_eq!(mesh.entry("198.18.0.51").unwrap(), None);

    b.kill_shim();
    let killed = Instant::now();
    mesh.wait_gone("198.18.0.52");
    let o = &mesh.cp.options;
    assert!(
        killed.elapsed() >= o.grace_period,
        "deleted after {:?}, before the grace period",
        killed.elapsed()
    );
}

#[test]
fn control_plane_restarts_keep_entries_and_its_absence_keeps_names_answered() {
    let mut mesh = Mesh::start();
    let mut vm = mesh.vm("198.18.0.61");
    let before = mesh.wait_entry("198.18.0.61");
    vm.wait_resolves("details.vm-namespace", &[SERVICE_IP]);

    // Restarted: the same entry (same uid), no duplicate, the VM still heartbeats to it.
    mesh.cp.restart();
    eventually("the VM reconnects to the restarted control plane", || {
        let status = vm.status()?;
        let since = status["registration"]["lastContactSecondsAgo"]
            .as_f64()
            .unwrap_or(f64::MAX);
        if status["registration"]["state"] == "registered" && since < 2.0 {
            Ok(())
        } else {
            Err(status["registration"].to_string())
        }
    });
    // Longer than the liveness timeout: the entry is kept alive by the reconnected VM.
    std::thread::sleep(mesh.cp.options.liveness_timeout + Duration::from_secs(1));
    let entries = mesh.cp.entries(NS).unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["metadata"]["uid"], before["metadata"]["uid"]);

    // Down: names come from the cached table, also after the shim restarts; forwarding works.
    mesh.cp.kill();
    vm.wait_resolves("details.vm-namespace", &[SERVICE_IP]);
    vm.kill_shim();
    vm.start_shim();
    vm.wait_resolves("details.vm-namespace", &[SERVICE_IP]);
    vm.wait_resolves(FORWARDED_NAME, &[FORWARDED_ADDR]);
    let status = vm.status().unwrap();
    assert_eq!(status["nameTable"]["source"], "cache", "{status}");
    assert!(status["registration"]["lastError"].is_string(), "{status}");

    // Back: the VM registers again by itself.
    mesh.cp.restart();
    mesh.wait_entry("198.18.0.61");
    eventually("the table comes from the control plane again", || {
        let s = vm.status()?;
        (s["nameTable"]["source"] == "controlPlane")
            .then_some(())
            .ok_or(s["nameTable"].to_string())
    });
}

/// Replicas: a VM given two control-plane addresses, the first refusing connections (nothing
/// listens there), registers through the second and says which one it uses. When the control
/// plane moves to the first address (restarted there on the same data), the VM follows it by
/// itself and keeps its entry.
#[test]
fn a_vm_with_several_control_plane_addresses_uses_one_that_answers_and_follows_a_move() {
    let mut mesh = Mesh::start();
    let (live, dead) = (mesh.cp.port, free_port());
    let mut options = VmOptions::new("198.18.0.71", &mesh.dnsmasq.addr());
    options.shim_args = vec![
        "--discovery-address".into(),
        format!("127.0.0.1:{dead},127.0.0.1:{live}"),
    ];
    let vm = Vm::start(mesh.dir.path(), &mesh.bundle, options);
    let before = mesh.wait_entry("198.18.0.71");
    let uses = |port: u16| {
        eventually(&format!("the VM uses 127.0.0.1:{port}"), || {
            let s = vm.status()?;
            let r = &s["registration"];
            let recent = r["lastContactSecondsAgo"].as_f64().unwrap_or(f64::MAX) < 2.0;
            let cp = r["controlPlane"].as_str().unwrap_or_default();
            if r["state"] == "registered" && recent && cp.starts_with(&format!("127.0.0.1:{port} "))
            {
                Ok(())
            } else {
                Err(r.to_string())
            }
        })
    };
    uses(live);

    mesh.cp.port = dead;
    mesh.cp.restart();
    uses(dead);
    let entries = mesh.cp.entries(NS).unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["metadata"]["uid"], before["metadata"]["uid"]);
}

#[test]
fn a_refused_token_is_reported_and_a_rotated_one_is_picked_up() {
    let mesh = Mesh::start();
    // The bundle's token, replaced by one for another service account: 403.
    let wrong = mesh.cp.token(NS, "someone-else", "1h");
    let token = mesh.bundle.join("istio-token");
    let good = std::fs::read_to_string(&token).unwrap();
    std::fs::write(&token, &wrong).unwrap();
    let vm = mesh.vm("198.18.0.71");
    let status = eventually("the refusal shows in status", || {
        let s = vm.status()?;
        (s["registration"]["state"] == "refused")
            .then_some(s.clone())
            .ok_or(s["registration"].to_string())
    });
    let error = status["registration"]["lastError"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("403"), "{error}");
    assert!(error.contains("service account"), "{error}");
    assert_eq!(mesh.entry("198.18.0.71").unwrap(), None);

    // Not a token at all: 401, said so.
    std::fs::write(&token, "not-a-token").unwrap();
    eventually("the malformed token is refused", || {
        let s = vm.status()?;
        let e = s["registration"]["lastError"].as_str().unwrap_or_default();
        (e.contains("401") && s["registration"]["state"] == "refused")
            .then_some(())
            .ok_or(e.to_string())
    });

    // Rotated to a good one (by rename, as a token rotator does): registered.
    let tmp = mesh.bundle.join("istio-token.new");
    std::fs::write(&tmp, good).unwrap();
    std::fs::rename(&tmp, &token).unwrap();
    mesh.wait_entry("198.18.0.71");
    assert_eq!(vm.registration().unwrap(), "registered");
}

#[test]
fn a_token_that_expires_is_reported_and_its_replacement_is_used() {
    let mesh = Mesh::start();
    let token = mesh.bundle.join("istio-token");
    let good = std::fs::read_to_string(&token).unwrap();
    // Valid for a second, plus the control plane's 30 s leeway for clock skew.
    std::fs::write(&token, mesh.cp.token(NS, "vm-sa", "1s")).unwrap();
    let vm = mesh.vm("198.18.0.81");
    mesh.wait_entry("198.18.0.81");
    let expired = vmesh_test_support::eventually::eventually_within(
        "the expired token is refused",
        Duration::from_secs(45),
        || {
            let s = vm.status()?;
            let e = s["registration"]["lastError"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (e.contains("401") && e.contains("expired"))
                .then_some(e.clone())
                .ok_or(e)
        },
    );
    assert!(
        expired.contains("heartbeat") || expired.contains("name table"),
        "{expired}"
    );
    let tmp = mesh.bundle.join("istio-token.new");
    std::fs::write(&tmp, good).unwrap();
    std::fs::rename(&tmp, &token).unwrap();
    eventually("registered again with the new token", || {
        let s = vm.status()?;
        (s["registration"]["state"] == "registered")
            .then_some(())
            .ok_or(s["registration"].to_string())
    });
}

#[test]
fn ten_vms_starting_at_once_are_registered_once_each() {
    let mesh = Mesh::start();
    let addresses: Vec<String> = (1..=10).map(|i| format!("198.18.1.{i}")).collect();
    // All ten spawned before any is waited for, so they start together (from this thread:
    // the processes die with the thread that started them).
    let vms: Vec<Vm> = addresses
        .iter()
        .map(|a| {
            Vm::spawn(
                mesh.dir.path(),
                &mesh.bundle,
                VmOptions::new(a, &mesh.dnsmasq.addr()),
            )
        })
        .collect();
    for vm in &vms {
        vm.wait_running();
    }
    eventually("ten entries", || {
        let entries = mesh.cp.entries(NS)?;
        (entries.len() == 10)
            .then_some(())
            .ok_or(format!("{} entries", entries.len()))
    });
    let mut names: Vec<String> = mesh
        .cp
        .entries(NS)
        .unwrap()
        .iter()
        .map(|e| {
            e["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    names.sort();
    let mut want: Vec<String> = addresses.iter().map(|a| Mesh::entry_name(a)).collect();
    want.sort();
    assert_eq!(names, want);
    for vm in &vms {
        assert_eq!(vm.registration().unwrap(), "registered");
    }
}

#[test]
fn an_exec_probe_runs_in_the_shim() {
    let dir = vmesh_test_support::TempDir::new();
    let marker = dir.file("ready", "");
    let path = marker.display().to_string();
    let mesh = Mesh::configured(CpOptions::default(), |_| {
        config_with_probe(&format!(
            "periodSeconds: 1\n    exec: {{command: [test, -f, \"{path}\"]}}"
        ))
    });
    let vm = mesh.vm("198.18.0.91");
    let message = mesh.wait_health("198.18.0.91", "True");
    assert!(message.contains("exit status 0"), "{message}");
    let status = vm.status().unwrap();
    let probe = status["health"]["probe"].as_str().unwrap_or_default();
    assert!(probe.contains("by the shim"), "{probe}");
    std::fs::remove_file(&marker).unwrap();
    let message = mesh.wait_health("198.18.0.91", "False");
    assert!(message.contains("exit status 1"), "{message}");
}

#[test]
fn a_health_change_while_the_control_plane_is_down_arrives_when_it_is_back() {
    let mut mesh = Mesh::start();
    let vm = mesh.vm("198.18.0.95");
    mesh.wait_health("198.18.0.95", "True");
    mesh.cp.kill();
    mesh.app.set_ready(false);
    eventually("the shim decided unhealthy and holds the report", || {
        let h = vm.status()?["health"].clone();
        (h["healthy"] == false && h["acknowledged"] == false)
            .then_some(())
            .ok_or(h.to_string())
    });
    mesh.cp.restart();
    let message = mesh.wait_health("198.18.0.95", "False");
    assert!(message.contains("503"), "{message}");
    eventually("acknowledged", || {
        let h = vm.status()?["health"].clone();
        (h["acknowledged"] == true)
            .then_some(())
            .ok_or(h.to_string())
    });
}
