//! Input bounds and per-identity quotas against the release binary (`scripts/build.sh` builds
//! it; `VMESH_CONTROL_BIN` picks another): name, label, annotation, body, date, address and
//! token-subject bombs are refused with the field they are about; registrations over an
//! identity's cap or rate get 429 with `Retry-After` while other identities go on.
//!
//! Its own test binary, not part of `hostile.rs`: cargo runs test binaries one after another,
//! so this suite's TLS handshakes do not compete for CPU with the open-file-limit test's lowered
//! timeouts.

mod common;

use std::time::Duration;

use common::release::{
    cluster_claims, cluster_kid, group_doc, metric, status, Control, CLUSTER_ISSUER,
};
use common::{fixture, rs256};
use hyper::Method;
use serde_json::{json, Value};
use vmesh_control::client::{Client, ClientError};
use vmesh_control::config::Document;
use vmesh_test_support::eventually::assert_eventually_async;

/// The refusal's status, error kind, field and Retry-After.
fn refusal(
    r: Result<impl std::fmt::Debug, ClientError>,
) -> (u16, String, Option<String>, Option<u64>) {
    let (status, e) = common::status_of(r);
    (status, e.error.as_str().to_string(), e.field, e.retry_after)
}

async fn register(vm: &Client, body: Value) -> Result<Value, ClientError> {
    vm.json::<Value>(Method::POST, "/v1/register", Some(&body))
        .await
}

async fn post_raw(vm: &Client, path: &str, body: &[u8]) -> Result<Value, ClientError> {
    let r = vm.call(Method::POST, path, Some(body.to_vec())).await?;
    Ok(serde_json::from_slice(&r.body).unwrap_or(Value::Null))
}

async fn entries_in(admin: &Client, ns: &str) -> Vec<String> {
    let r: Value = admin
        .json(
            Method::GET,
            &format!("/v1/admin/objects/workloadentry?namespace={ns}"),
            None::<&()>,
        )
        .await
        .unwrap();
    r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// Input bounds as Kubernetes sets them, against the release binary: a network or address
/// that cannot make a DNS-1123 entry name, addresses no workload can have (the metadata
/// service among them), label and annotation bombs, bodies that are not one JSON object,
/// impossible dates and a token subject with control characters are each refused with 400
/// (401 for the token) naming the field, and nothing of them reaches the store; a
/// legitimate registration still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_label_annotation_body_date_and_address_bombs_are_refused() {
    let data = vmesh_test_support::TempDir::new();
    let logs = vmesh_test_support::TempDir::new();
    let jwks = format!(
        "{CLUSTER_ISSUER}={}",
        fixture("cluster-jwks.json").display()
    );
    let p = Control::spawn(data.path(), logs.path(), None, &["--jwks", &jwks], &[]);
    let admin = common::wait_for_server(data.path(), &p.url).await;
    admin
        .apply(vec![group_doc("vm-ns", "vms", "vm-sa")], "")
        .await
        .unwrap();
    let token = admin
        .mint_token("vm-ns", "vm-sa", Duration::from_secs(600))
        .await
        .unwrap()
        .token;
    let vm = admin.with_token(&token);
    let reg = |extra: Value| {
        let mut b = json!({"group": "vms", "address": "10.0.0.1"});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let bad = |field: &str| {
        (
            400,
            "bad_request".to_string(),
            Some(field.to_string()),
            None,
        )
    };

    // Names: a network that cannot be part of an object name.
    for network in [
        "a/b".to_string(),
        "..".into(),
        "Net".into(),
        "n\u{200b}x".into(),
        "r\u{202e}l".into(),
        "n".repeat(254),
    ] {
        let r = register(&vm, reg(json!({ "network": network }))).await;
        assert_eq!(refusal(r), bad("network"), "{network:?}");
    }
    // Addresses: not an IP, or one no workload can have.
    for address in [
        "vm.example",
        "10.0.0.1/8",
        "169.254.169.254",
        "169.254.1.1",
        "0.0.0.0",
        "::",
        "224.0.0.251",
        "ff02::1",
        "fe80::1",
        "::ffff:169.254.169.254",
        "255.255.255.255",
    ] {
        let r = register(&vm, reg(json!({ "address": address }))).await;
        assert_eq!(refusal(r), bad("address"), "{address:?}");
    }
    // Labels: too many, a value over 63, a key whose prefix is over 253, a control character.
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let long_prefix = format!("{}/k", vec!["p".repeat(63); 4].join("."));
    for labels in [
        Value::Object(many),
        json!({"app": "v".repeat(64)}),
        json!({ long_prefix.clone(): "v" }),
        json!({"app": "a\u{1b}[31mb"}),
        json!({"a\nb": "v"}),
    ] {
        let r = register(&vm, reg(json!({ "labels": labels }))).await;
        let (status, kind, field, _) = refusal(r);
        assert_eq!((status, kind.as_str()), (400, "bad_request"), "{labels}");
        assert!(field.unwrap().starts_with("labels"), "{labels}");
    }
    // Bodies: trailing data, not an object.
    let one = br#"{"group": "vms", "address": "10.0.0.1"}"#;
    for body in [
        [&one[..], b"{}"].concat(),
        [&one[..], b" trailing"].concat(),
        br#"["vms", "", "10.0.0.1"]"#.to_vec(),
        br#""vms""#.to_vec(),
        b"null".to_vec(),
    ] {
        let r = post_raw(&vm, "/v1/register", &body).await;
        assert_eq!(refusal(r), bad(""), "{:?}", String::from_utf8_lossy(&body));
    }
    // Dates: no Feb 30, no +25:00, no leap second.
    for t in [
        "2026-02-30T00:00:00Z",
        "2026-04-31T00:00:00Z",
        "2026-01-01T00:00:00+25:00",
        "2026-01-01T00:00:60Z",
    ] {
        let body =
            json!({"namespace": "vm-ns", "name": "vms-10.0.0.1", "healthy": true, "probeTime": t});
        let r = vm
            .json::<Value>(Method::POST, "/v1/health", Some(&body))
            .await;
        assert_eq!(refusal(r), bad("probeTime"), "{t}");
    }
    // Annotations: over Kubernetes' 256 KiB in all; a key that is no qualified name.
    let mut bomb = group_doc("vm-ns", "bomb", "vm-sa");
    bomb.object["metadata"]["annotations"] =
        json!({"a": "x".repeat(200 << 10), "b": "x".repeat(60 << 10)});
    let (code, kind, field, _) = refusal(admin.apply(vec![bomb], "").await);
    assert_eq!(
        (code, kind.as_str(), field.as_deref()),
        (400, "invalid", Some("metadata.annotations"))
    );
    let mut bad_key = group_doc("vm-ns", "bomb", "vm-sa");
    bad_key.object["spec"]["metadata"] = json!({"annotations": {"x/y/z": "v"}});
    let (code, _, field, _) = refusal(admin.apply(vec![bad_key], "").await);
    assert_eq!(
        (code, field.as_deref()),
        (400, Some("spec.metadata.annotations[x/y/z]"))
    );
    // A token subject with control characters, signed by a trusted issuer: 401.
    let forged = rs256(
        &json!({"alg": "RS256", "kid": cluster_kid()}),
        &cluster_claims("vm-ns\n2030 INFO forged", "vm-sa"),
    );
    let r = register(&admin.with_token(&forged), reg(json!({}))).await;
    assert_eq!(status(r), 401);
    assert_eq!(
        metric(&admin, "vmesh_token_refusals_total{reason=\"bad_subject\"}").await,
        Some(1.0)
    );

    // Nothing of the above was stored; a legitimate VM registers as before.
    assert_eq!(entries_in(&admin, "vm-ns").await, Vec::<String>::new());
    let ok = register(
        &vm,
        reg(json!({"network": "net-1", "labels": {"app.kubernetes.io/name": "web", "tier": ""}})),
    )
    .await
    .unwrap();
    assert_eq!(ok["workloadEntry"]["name"], "vms-10.0.0.1-net-1");
    // An admin's WorkloadEntry may name the metadata service (Istio accepts it), with a warning.
    let manual = Document {
        source: "hostile".into(),
        index: 0,
        object: json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "metadata-svc", "namespace": "vm-ns"},
            "spec": {"address": "169.254.169.254"}}),
    };
    let (_, warnings) = admin.apply_with_warnings(vec![manual], "").await.unwrap();
    assert!(
        warnings.iter().any(|w| w.contains("link-local")),
        "{warnings:?}"
    );
}

/// Quotas per identity, lowered through flags and the environment: past the cap on entries a
/// registration is 429 with `Retry-After` (the grace period), a reconnect of an entry it holds
/// is not counted against the cap, past the rate it is 429 with `Retry-After` in seconds;
/// another identity registers meanwhile; a deregistered entry frees its slot; the refusals
/// are counted in /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_with_429_and_retry_after_while_another_identity_registers() {
    let data = vmesh_test_support::TempDir::new();
    let logs = vmesh_test_support::TempDir::new();
    let p = Control::spawn(
        data.path(),
        logs.path(),
        None,
        &[
            "--max-entries-per-identity",
            "3",
            "--registration-rate",
            "1",
            "--grace-period",
            "7s",
        ],
        &[("VMESH_CONTROL_REGISTRATION_BURST", "6")],
    );
    let admin = common::wait_for_server(data.path(), &p.url).await;
    admin
        .apply(
            vec![
                group_doc("vm-ns", "noisy", "noisy-sa"),
                group_doc("vm-ns", "quiet", "quiet-sa"),
            ],
            "",
        )
        .await
        .unwrap();
    let token = |sa: &'static str| {
        let admin = admin.clone();
        async move {
            admin
                .mint_token("vm-ns", sa, Duration::from_secs(600))
                .await
                .unwrap()
                .token
        }
    };
    let noisy = admin.with_token(&token("noisy-sa").await);
    let quiet = admin.with_token(&token("quiet-sa").await);
    let vm = |group: &str, i: u32| json!({"group": group, "address": format!("10.0.0.{i}")});

    for i in 1..=3 {
        register(&noisy, vm("noisy", i)).await.unwrap();
    }
    // The cap: 429, the grace period as Retry-After, and nothing written.
    let (status, kind, _, retry) = refusal(register(&noisy, vm("noisy", 4)).await);
    assert_eq!(
        (status, kind.as_str(), retry),
        (429, "too_many_requests", Some(7))
    );
    assert_eq!(entries_in(&admin, "vm-ns").await.len(), 3);
    // A reconnect of an entry it holds is no new entry.
    register(&noisy, vm("noisy", 1)).await.unwrap();
    // Another identity is not held back by the noisy one.
    let q = register(&quiet, vm("quiet", 1)).await.unwrap();
    quiet
        .call(
            Method::POST,
            "/v1/heartbeat",
            Some(q["workloadEntry"].to_string().into_bytes()),
        )
        .await
        .unwrap();

    // The rate: burst 6, then 1 a second. Reconnects count (each is a store write).
    let mut rate_refusal = None;
    for _ in 0..20 {
        match register(&noisy, vm("noisy", 2)).await {
            Ok(_) => {}
            Err(e) => {
                rate_refusal = Some(refusal(Err::<(), _>(e)));
                break;
            }
        }
    }
    let (status, kind, _, retry) = rate_refusal.expect("the rate never applied");
    assert_eq!(
        (status, kind.as_str(), retry),
        (429, "too_many_requests", Some(1))
    );
    // Still the quiet identity's own budget.
    register(&quiet, vm("quiet", 2)).await.unwrap();

    // Deregistering frees a slot; the rate lets the noisy identity back in after a second.
    let gone = json!({"namespace": "vm-ns", "name": "noisy-10.0.0.3"});
    noisy
        .json::<Value>(Method::POST, "/v1/deregister", Some(&gone))
        .await
        .unwrap();
    assert_eventually_async(
        "a freed slot takes a new entry once the rate allows",
        async || register(&noisy, vm("noisy", 4)).await.is_ok(),
    )
    .await;

    for (name, at_least) in [
        ("vmesh_quota_refusals_total{reason=\"entries\"}", 1.0),
        ("vmesh_quota_refusals_total{reason=\"rate\"}", 1.0),
        (
            "vmesh_registrations_total{result=\"too_many_requests\"}",
            2.0,
        ),
    ] {
        let n = metric(&admin, name).await.unwrap_or(0.0);
        assert!(n >= at_least, "{name} = {n}");
    }
}
