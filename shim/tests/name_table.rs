//! `/v1/name-table`: the long-poll over a `--static-names` file that is edited while served.

mod support;

use std::path::Path;
use std::time::Duration;

use hyper::StatusCode;
use support::*;

fn table(version: &str, ip: &str) -> String {
    format!(
        r#"{{"version":"{version}","namespace":"apps","names":{{
          "details.apps.svc.cluster.local":{{"ips":["{ip}"],"registry":"Kubernetes","shortname":"details","namespace":"apps"}}
        }}}}"#
    )
}

fn replace_atomically(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn write_in_place(path: &Path, content: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(content.as_bytes()).unwrap();
}

async fn shim_with_table(
    dir: &TempDir,
    content: &str,
) -> (vmesh_shim::Running, std::path::PathBuf) {
    let file = dir.file("names.json", content);
    let shim = start_shim(&[
        "--upstream",
        "127.0.0.1:1",
        "--static-names",
        file.to_str().unwrap(),
    ])
    .await;
    (shim, file)
}

#[tokio::test]
async fn without_a_source_the_table_is_503() {
    let shim = start_shim(&["--upstream", "127.0.0.1:1"]).await;
    let reply = Http::h1(shim.local_addr()).get("/v1/name-table").await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&reply.body[..], br#"{"error":"no name table source"}"#);
    shim.stop().await;
}

#[tokio::test]
async fn absent_or_stale_version_gets_the_table_at_once() {
    let dir = TempDir::new();
    let content = table("v1", "10.0.0.1");
    let (shim, _) = shim_with_table(&dir, &content).await;
    let http = Http::h1(shim.local_addr());

    for path in ["/v1/name-table", "/v1/name-table?version=v0&wait=60"] {
        let reply = within_patience(path, http.get(path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}");
        assert_eq!(reply.header("content-type"), Some("application/json"));
        assert_eq!(reply.header("x-vmesh-table-version"), Some("v1"));
        assert_eq!(reply.body, content.as_bytes(), "the file's bytes, exactly");
    }
    shim.stop().await;
}

#[tokio::test]
async fn current_version_gets_304_when_the_wait_ends() {
    let dir = TempDir::new();
    let (shim, _) = shim_with_table(&dir, &table("v1", "10.0.0.1")).await;
    let started = std::time::Instant::now();

    let reply = Http::h1(shim.local_addr())
        .get("/v1/name-table?version=v1&wait=1")
        .await;

    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    assert_eq!(reply.header("x-vmesh-table-version"), Some("v1"));
    assert!(reply.body.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "returned after {:?}",
        started.elapsed()
    );
    shim.stop().await;
}

async fn waiting_poll_returns_the_edit(edit: fn(&Path, &str)) {
    let dir = TempDir::new();
    let (shim, file) = shim_with_table(&dir, &table("v1", "10.0.0.1")).await;
    let http = Http::h1(shim.local_addr());
    let mut poll = tokio::spawn(async move { http.get("/v1/name-table?version=v1&wait=60").await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut poll)
            .await
            .is_err(),
        "a poll for the current version must wait"
    );

    let edited = table("v2", "10.0.0.2");
    edit(&file, &edited);

    let reply = within_patience("long-poll to return the edit", poll)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-vmesh-table-version"), Some("v2"));
    assert_eq!(reply.body, edited.as_bytes());
    shim.stop().await;
}

#[tokio::test]
async fn waiting_poll_returns_an_edit_made_by_atomic_rename() {
    waiting_poll_returns_the_edit(replace_atomically).await;
}

#[tokio::test]
async fn waiting_poll_returns_an_edit_made_in_place() {
    waiting_poll_returns_the_edit(write_in_place).await;
}

#[tokio::test]
async fn invalid_edit_keeps_serving_the_previous_table() {
    let dir = TempDir::new();
    let original = table("v1", "10.0.0.1");
    let (shim, file) = shim_with_table(&dir, &original).await;
    let http = Http::h1(shim.local_addr());

    // Parses as JSON and carries a new version, but its address is not an IP: if the shim took
    // it, pollers holding v1 would be sent v2.
    replace_atomically(&file, &table("v2", "not-an-ip"));
    let reply = http.get("/v1/name-table?version=v1&wait=1").await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    assert_eq!(reply.header("x-vmesh-table-version"), Some("v1"));
    write_in_place(&file, "{ truncated");
    let reply = http.get("/v1/name-table?version=v1&wait=1").await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    let reply = http.get("/v1/name-table").await;
    assert_eq!(reply.body, original.as_bytes());

    // And the file is still watched: the next good edit is served.
    let fixed = table("v3", "10.0.0.3");
    replace_atomically(&file, &fixed);
    let reply = within_patience(
        "the fixed table",
        http.get("/v1/name-table?version=v1&wait=60"),
    )
    .await;
    assert_eq!(reply.header("x-vmesh-table-version"), Some("v3"));
    assert_eq!(reply.body, fixed.as_bytes());
    shim.stop().await;
}

#[tokio::test]
async fn file_deleted_and_recreated_is_picked_up() {
    let dir = TempDir::new();
    let (shim, file) = shim_with_table(&dir, &table("v1", "10.0.0.1")).await;
    let http = Http::h1(shim.local_addr());
    std::fs::remove_file(&file).unwrap();
    let reply = http.get("/v1/name-table?version=v0").await;
    assert_eq!(
        reply.header("x-vmesh-table-version"),
        Some("v1"),
        "last good table kept"
    );

    std::fs::write(&file, table("v2", "10.0.0.2")).unwrap();
    assert_eventually_async("the recreated file is served", || {
        let http = http.clone();
        async move {
            http.get("/v1/name-table")
                .await
                .header("x-vmesh-table-version")
                == Some("v2")
        }
    })
    .await;
    shim.stop().await;
}

#[tokio::test]
async fn shutdown_ends_waiting_polls_at_once() {
    let dir = TempDir::new();
    let (shim, _) = shim_with_table(&dir, &table("v1", "10.0.0.1")).await;
    let http = Http::h1(shim.local_addr());
    let mut poll =
        tokio::spawn(async move { http.get("/v1/name-table?version=v1&wait=120").await });
    assert!(tokio::time::timeout(Duration::from_millis(200), &mut poll)
        .await
        .is_err());

    within_patience("graceful shutdown", shim.stop()).await;

    let reply = within_patience("the waiting poll", poll).await.unwrap();
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
}

#[tokio::test]
async fn bad_wait_is_400_and_long_waits_are_capped() {
    let dir = TempDir::new();
    let (shim, _) = shim_with_table(&dir, &table("v1", "10.0.0.1")).await;
    let http = Http::h1(shim.local_addr());
    let reply = http.get("/v1/name-table?version=v1&wait=soon").await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // A huge wait is accepted (capped at 120 s), and a stale version still returns at once.
    let reply = within_patience(
        "stale poll",
        http.get("/v1/name-table?version=v0&wait=99999"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    shim.stop().await;
}

#[tokio::test]
async fn edit_without_a_version_change_is_served_under_a_derived_version() {
    let dir = TempDir::new();
    let (shim, file) = shim_with_table(&dir, &table("v1", "10.0.0.1")).await;
    let http = Http::h1(shim.local_addr());
    let poll = tokio::spawn(async move { http.get("/v1/name-table?version=v1&wait=60").await });
    replace_atomically(&file, &table("v1", "10.0.0.9"));
    let reply = within_patience("long-poll to return the edit", poll)
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    let served = reply.header("x-vmesh-table-version").unwrap().to_string();
    assert!(served.starts_with("v1~") && served.len() > 3, "{served}");
    // The body carries the version the client must poll with next, and the edited address.
    let index = vmesh_core::names::NameIndex::from_json(&reply.body).unwrap();
    assert_eq!(index.version(), served);
    let ip = index
        .lookup("details.apps.svc.cluster.local")
        .unwrap()
        .record()
        .ipv4()
        .next()
        .unwrap();
    assert_eq!(ip.to_string(), "10.0.0.9");
    // Polling with it waits: nothing newer.
    let again = Http::h1(shim.local_addr())
        .get(&format!("/v1/name-table?version={served}&wait=1"))
        .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    shim.stop().await;
}
