//! The module as Envoy loads it: what it imports and exports, how it starts, and which
//! plugin configurations it refuses.

use vmesh_tests::wasm_host::vmesh::{
    self, plugin, AGENT_ROOT_ID, DNS_ROOT_ID, DNS_TCP_ROOT_ID, DNS_UDP_ROOT_ID,
};
use vmesh_tests::wasm_host::{
    module_exported_functions, module_imports, HostCall, Status, VmError, WASI_ALLOWED,
};

#[test]
fn imports_are_proxy_abi_calls_and_allowed_wasi_functions_only() {
    let mut unexpected = Vec::new();
    for (module, name) in module_imports() {
        let allowed = match module.as_str() {
            "env" => name.starts_with("proxy_"),
            "wasi_snapshot_preview1" => WASI_ALLOWED.contains(&name.as_str()),
            _ => false,
        };
        if !allowed {
            unexpected.push(format!("{module}.{name}"));
        }
    }
    assert!(
        unexpected.is_empty(),
        "imports outside env.proxy_* and the WASI allow-list {WASI_ALLOWED:?}: {unexpected:?}"
    );
}

#[test]
fn exports_declare_abi_0_2_1_an_allocator_and_a_reactor_entry_point() {
    let exports = module_exported_functions();
    for name in [
        "proxy_abi_version_0_2_1",
        "proxy_on_memory_allocate",
        "_initialize",
        "proxy_on_context_create",
        "proxy_on_vm_start",
        "proxy_on_configure",
        "proxy_on_tick",
        "proxy_on_request_headers",
        "proxy_on_request_body",
        "proxy_on_new_connection",
        "proxy_on_downstream_data",
        "proxy_on_downstream_connection_close",
        "proxy_on_upstream_data",
        "proxy_on_upstream_connection_close",
        "proxy_on_http_call_response",
        "proxy_on_done",
        "proxy_on_log",
        "proxy_on_delete",
    ] {
        assert!(exports.iter().any(|e| e == name), "{name} not exported");
    }
    // A command module's `_start` would make Envoy run it as a program.
    assert!(!exports.iter().any(|e| e == "_start"));
}

const ROOT_IDS: [&str; 5] = [
    AGENT_ROOT_ID,
    DNS_ROOT_ID,
    DNS_UDP_ROOT_ID,
    DNS_TCP_ROOT_ID,
    vmesh_api::traffic::roots::OUTBOUND,
];

#[test]
fn every_root_starts_and_configures_with_an_empty_configuration() -> Result<(), VmError> {
    for root_id in ROOT_IDS {
        let host = vmesh::host();
        let mut vm = host.vm(plugin(root_id, ""))?;
        assert!(vm.start()?, "{root_id}: on_vm_start");
        assert!(vm.configure()?, "{root_id}: on_configure");
        assert!(vm.tick_period().is_some(), "{root_id} asks for a tick");
    }
    Ok(())
}

#[test]
fn configure_reads_the_root_id_and_plugin_configuration_from_the_host() -> Result<(), VmError> {
    let host = vmesh::host();
    let mut vm = host.vm(plugin(DNS_ROOT_ID, "{}"))?;
    vm.start()?;
    let mark = vm.mark();
    assert!(vm.configure()?);
    let calls = vm.calls_since(mark);
    assert!(calls.iter().any(|r| r.status == Status::Ok
        && matches!(&r.call, HostCall::GetProperty { path } if path == &["plugin_root_id"])));
    assert!(calls.iter().any(|r| r.status == Status::Ok
        && matches!(
            &r.call,
            HostCall::GetBuffer {
                buffer: vmesh_tests::wasm_host::BufferType::PluginConfiguration,
                ..
            }
        )));
    Ok(())
}

#[test]
fn bad_plugin_configurations_make_on_configure_return_false() -> Result<(), VmError> {
    let cases = [
        r#"{"shim_clutser":"x"}"#,
        r#"{"forward_timeout_ms":5}"#,
        r#"{"cluster_domain":"a..b"}"#,
        r#"{"log_level":"loud"}"#,
        r#"{"shim_cluster":""}"#,
        r#"{"admin_cluster":""}"#,
        r#"{"report_period_ms":50}"#,
        "not json",
        "\u{0}\u{1}binary",
    ];
    for root_id in ROOT_IDS {
        for config in cases {
            let host = vmesh::host();
            let mut vm = host.vm(plugin(root_id, config))?;
            assert!(vm.start()?);
            assert!(!vm.configure()?, "{root_id} accepted {config:?}");
            assert!(!vm.is_failed(), "{root_id} trapped on {config:?}");
        }
    }
    Ok(())
}

#[test]
fn unknown_root_id_makes_on_configure_return_false() -> Result<(), VmError> {
    for root_id in ["", "vmesh", "VMESH_DNS", "vmesh_dns "] {
        let host = vmesh::host();
        let mut vm = host.vm(plugin(root_id, "{}"))?;
        assert!(vm.start()?);
        assert!(!vm.configure()?, "root_id {root_id:?} accepted");
        assert_eq!(vm.tick_period(), None, "{root_id:?} should not tick");
    }
    Ok(())
}

#[test]
fn a_stream_on_an_unconfigured_root_passes_through() -> Result<(), VmError> {
    let host = vmesh::host();
    let mut vm = host.vm(plugin("other", "{}"))?;
    vm.start()?;
    assert!(!vm.configure()?);
    let s = vm.create_http_stream()?;
    let action = vm.request_headers(s, &[(":method", "POST"), (":path", "/udp-tunnel")], false)?;
    assert_eq!(action, vmesh_tests::wasm_host::Action::Continue);
    let action = vm.request_body(s, b"\x00\x02\x00x", true)?;
    assert_eq!(action, vmesh_tests::wasm_host::Action::Continue);
    assert_eq!(vm.stream(s).forwarded, b"\x00\x02\x00x");
    assert!(vm.finish_stream(s)?);
    Ok(())
}

#[test]
fn the_dns_roots_share_one_vm_and_each_reads_its_own_root_id() -> Result<(), VmError> {
    // vm-sidecar.yaml gives the three DNS plugins one vm_id: one VM, three root contexts.
    let host = vmesh::host();
    let mut w = vmesh::worker_vm(&host, "{}")?;
    for root in w.roots() {
        assert!(w.vm.tick_period_of(root).is_some(), "root {root} ticks");
    }
    let read_root_ids: Vec<String> = w
        .vm
        .calls()
        .iter()
        .filter(|r| {
            r.status == Status::Ok
                && matches!(&r.call, HostCall::GetProperty { path } if path == &["plugin_root_id"])
        })
        .map(|r| match r.context {
            c if c == w.doh => DNS_ROOT_ID.to_string(),
            c if c == w.udp => DNS_UDP_ROOT_ID.to_string(),
            c if c == w.tcp => DNS_TCP_ROOT_ID.to_string(),
            other => format!("context {other}"),
        })
        .collect();
    assert_eq!(
        read_root_ids,
        [DNS_ROOT_ID, DNS_UDP_ROOT_ID, DNS_TCP_ROOT_ID]
    );
    // A network connection on each network root, an HTTP stream on the DoH root.
    let c = w.vm.create_connection_on(w.udp)?;
    let t = w.vm.create_connection_on(w.tcp)?;
    w.vm.finish_connection(c)?;
    w.vm.finish_connection(t)?;
    let s = w.vm.create_http_stream_on(w.doh)?;
    assert!(w.vm.finish_stream(s)?);
    w.tick()?;
    assert!(!w.vm.is_failed());
    Ok(())
}
