//! Memory and compile time with a mesh-sized name table, under wasmtime. Run with
//! `--nocapture` to see the numbers (they go into the docs); only the memory bound is asserted.
//!
//! The worker VM is measured as Envoy runs it: vm-sidecar.yaml's three DNS plugins (DoH, UDP,
//! TCP) share a `vm_id`, so one VM per worker holds all three root contexts.

use std::time::Instant;

use vmesh_core::framing::Framing;
use vmesh_core::names::NameIndex;
use vmesh_tests::wasm_host::vmesh::{
    self, capsule_chunk, framed, kubernetes_scale_table, query, responses, tunnel_response, A,
    IMAGE_KEY, UDP_TUNNEL_HEAD, VERSION_KEY, VM_ID,
};
use vmesh_tests::wasm_host::{module_compile_time, Action, HttpResponse, VmError};

const NAMES: usize = 100_000;
const LIMIT: usize = 32 << 20;

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Asks the worker for names of the table over a UDP tunnel and over TCP; all must be
/// answered from the table.
fn answer_queries(worker: &mut vmesh::WorkerVm, names: &[&str]) -> Result<(), VmError> {
    let queries: Vec<Vec<u8>> = names
        .iter()
        .enumerate()
        .map(|(i, n)| query(i as u16 + 1, n, A))
        .collect();
    let refs: Vec<&[u8]> = queries.iter().map(Vec::as_slice).collect();
    let vm = &mut worker.vm;

    let c = vm.create_connection_on(worker.udp)?;
    let mut input = UDP_TUNNEL_HEAD.to_vec();
    input.extend(capsule_chunk(&refs));
    let action = vm.downstream_data(c, &input, false)?;
    assert_eq!(action, Action::Continue, "all mesh names: no forward");
    let udp = tunnel_response(&vm.connection(c).written)
        .expect("a tunnel response")
        .responses;
    vm.finish_connection(c)?;

    let t = vm.create_connection_on(worker.tcp)?;
    let action = vm.downstream_data(t, &framed(Framing::Tcp, &refs), false)?;
    assert_eq!(action, Action::Continue, "all mesh names: no forward");
    let tcp = responses(Framing::Tcp, &vm.connection(t).written);
    vm.finish_connection(t)?;

    for out in [udp, tcp] {
        assert_eq!(out.len(), names.len());
        for (r, name) in out.iter().zip(names) {
            assert_eq!(r.rcode(), 0, "{name}");
            assert!(!r.answers.is_empty(), "{name}");
        }
    }
    Ok(())
}

#[test]
fn a_100k_name_table_fits_in_32_mib_per_vm() -> Result<(), VmError> {
    let host = vmesh::host();
    let table = kubernetes_scale_table(NAMES, "scale-1");
    assert_eq!(table.names.len(), NAMES);
    let json = table.to_json();
    // Full names (a wildcard's by a name under it), `service.namespace`, and a bare service
    // name of the client's namespace.
    let mut probe: Vec<String> = [0, NAMES / 2, NAMES - 2]
        .iter()
        .filter_map(|&i| table.names.keys().nth(i))
        .map(|n| match n.strip_prefix("*.") {
            Some(rest) => format!("host-1.{rest}"),
            None => n.clone(),
        })
        .collect();
    let (k8s, ours) = {
        let mut k8s = table.names.values().filter(|i| !i.shortname.is_empty());
        let other = k8s.nth(NAMES / 3).expect("a Kubernetes name");
        let ours = table
            .names
            .values()
            .find(|i| i.namespace == table.namespace)
            .expect("a service in the client's namespace");
        (other, ours)
    };
    probe.push(format!("{}.{}", k8s.shortname, k8s.namespace));
    probe.push(ours.shortname.clone());
    let probe: Vec<&str> = probe.iter().map(String::as_str).collect();

    let mut worker = vmesh::worker_vm(&host, "{}")?;
    let worker_empty = worker.vm.memory_bytes();
    let mut agent = vmesh::agent(&host, "{}")?;
    let agent_empty = agent.memory_bytes();

    agent.tick()?;
    let token = vmesh::table_poll(&agent);
    let started = Instant::now();
    agent.http_call_response(token, HttpResponse::status(200).body(json.clone()))?;
    let publish_time = started.elapsed();
    assert_eq!(
        host.shared_data(VM_ID, VERSION_KEY).map(|(v, _)| v),
        Some(b"scale-1".to_vec()),
        "agent did not publish: {:?}",
        agent.logs()
    );
    let agent_published = agent.memory_bytes();
    let (image, _) = host.shared_data(VM_ID, IMAGE_KEY).expect("image published");
    let image_len = image.len();
    let index = NameIndex::from_image(image).expect("a valid image");
    assert_eq!(index.len(), NAMES);

    let started = Instant::now();
    worker.tick()?;
    let load_time = started.elapsed();
    answer_queries(&mut worker, &probe)?;
    let worker_loaded = worker.vm.memory_bytes();

    // A new version while the old one is still in use: the peak a table update costs.
    let mut next = kubernetes_scale_table(NAMES, "scale-2");
    if let Some(info) = next.names.values_mut().next() {
        info.ips.reverse();
    }
    vmesh::publish(&host, &mut agent, &next)?;
    let agent_updated = agent.memory_bytes();
    worker.tick()?;
    answer_queries(&mut worker, &probe)?;
    let worker_updated = worker.vm.memory_bytes();

    println!(
        "vmesh filter under wasmtime, {NAMES} names (table JSON {:.1} MiB, compiled image {:.1} MiB)",
        mib(json.len()),
        mib(image_len)
    );
    println!(
        "  agent VM linear memory:  {:.1} MiB after publishing (empty: {:.1} MiB; after a second version: {:.1} MiB)",
        mib(agent_published),
        mib(agent_empty),
        mib(agent_updated)
    );
    println!(
        "  worker VM (DoH, UDP and TCP roots) linear memory: {:.1} MiB after loading and answering (empty: {:.1} MiB; after a second version: {:.1} MiB)",
        mib(worker_loaded),
        mib(worker_empty),
        mib(worker_updated)
    );
    println!(
        "  agent: copy in + parse + compile + publish took {:.0} ms; worker load (three roots) took {:.0} ms; module compile {:.0} ms",
        publish_time.as_secs_f64() * 1e3,
        load_time.as_secs_f64() * 1e3,
        module_compile_time().as_secs_f64() * 1e3
    );

    assert!(
        agent_published <= LIMIT,
        "agent VM uses {:.1} MiB",
        mib(agent_published)
    );
    assert!(
        worker_loaded <= LIMIT,
        "worker VM uses {:.1} MiB",
        mib(worker_loaded)
    );
    // Three roots, one copy: a copy per root would put the worker near 3 images.
    assert!(
        worker_loaded < worker_empty + 2 * image_len,
        "worker VM uses {:.1} MiB for a {:.1} MiB image: the DNS roots do not share it",
        mib(worker_loaded),
        mib(image_len)
    );
    Ok(())
}
