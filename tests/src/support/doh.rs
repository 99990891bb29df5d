//! DNS over HTTPS through curl (a real HTTP client), RFC 8484.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use std::process::Command;
use vmesh_core::dns::inspect::{RData, Response};

#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub content_type: String,
    pub body: Vec<u8>,
}

/// An A query for `name` with ID 0, as RFC 8484 §4.1 recommends.
pub fn query(name: &str) -> Vec<u8> {
    vmesh_core::dns::build_query(0, name, 1, None).expect("valid name")
}

pub fn get(port: u16, query: &[u8]) -> HttpReply {
    let url = format!(
        "http://127.0.0.1:{port}/dns-query?dns={}",
        URL_SAFE_NO_PAD.encode(query)
    );
    curl(&[url.as_str()], None)
}

pub fn post(port: u16, body: &[u8], content_type: &str) -> HttpReply {
    let url = format!("http://127.0.0.1:{port}/dns-query");
    let header = format!("content-type: {content_type}");
    curl(
        &[
            "--http2-prior-knowledge",
            "-H",
            header.as_str(),
            "--data-binary",
            "@-",
            url.as_str(),
        ],
        Some(body),
    )
}

fn curl(args: &[&str], stdin: Option<&[u8]>) -> HttpReply {
    let dir = vmesh_test_support::TempDir::new();
    let body_path = dir.path().join("body");
    let input = dir.path().join("in");
    std::fs::write(&input, stdin.unwrap_or_default()).expect("write body");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "-o"])
        .arg(&body_path)
        .args(["-w", "%{http_code} %{content_type}"])
        .args(args)
        .stdin(std::fs::File::open(&input).expect("open body"))
        .output()
        .expect("run curl");
    let meta = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, ctype) = meta.split_once(' ').unwrap_or((meta.as_str(), ""));
    HttpReply {
        status: code.parse().unwrap_or(0),
        content_type: ctype.to_string(),
        body: std::fs::read(&body_path).unwrap_or_default(),
    }
}

/// The A addresses in a DNS answer.
pub fn addresses(message: &[u8]) -> Vec<String> {
    let resp =
        Response::parse(message).unwrap_or_else(|e| panic!("not a DNS message ({e}): {message:?}"));
    resp.answers
        .iter()
        .filter_map(|rr| match rr.data {
            RData::A(ip) => Some(ip.to_string()),
            _ => None,
        })
        .collect()
}
