//! Handshakes on the inbound mTLS listener, read from Envoy's own statistics.
//!
//! A handshake Envoy refuses (no client certificate, one from another root) never reaches a
//! network filter, so the vmesh filter cannot count it; Envoy's listener TLS statistics do.
//! The shim reads them from Envoy's admin endpoint once a second (the agent's report period)
//! and shows them beside the filter's counters (`vmesh-shim status`, `/metrics`). Reading
//! them here rather than in the filter keeps the filter's `.wasm` within its size budget.
//!
//! The listener names its statistics `listener.inbound_mtls.*` (`stat_prefix` in
//! `envoy-configs/vm-sidecar.yaml`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::sync::watch;

use crate::status::Board;

/// The inbound listener's `stat_prefix`.
pub const LISTENER: &str = "inbound_mtls";
/// Counter names as the shim shows them.
pub const ACCEPTED: &str = "inboundTlsAccepted";
pub const REFUSED: &str = "inboundTlsRefused";
pub const PERIOD: Duration = Duration::from_secs(1);

/// Envoy's listener TLS counters that mean a refused handshake: no client certificate, one
/// that does not chain to ROOTCA (or fails a SAN / hash check), or any other TLS failure.
const REFUSALS: [&str; 5] = [
    "ssl.fail_verify_no_cert",
    "ssl.fail_verify_error",
    "ssl.fail_verify_san",
    "ssl.fail_verify_cert_hash",
    "ssl.connection_error",
];

/// Accepted and refused handshakes from the text of `GET /stats` (`name: value` lines).
pub fn inbound_counters(stats: &str) -> BTreeMap<String, u64> {
    let prefix = format!("listener.{LISTENER}.");
    let (mut accepted, mut refused) = (0u64, 0u64);
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let Some(stat) = name.strip_prefix(&prefix) else {
            continue;
        };
        let Ok(v) = value.trim().parse::<u64>() else {
            continue;
        };
        if stat == "ssl.handshake" {
            accepted = accepted.saturating_add(v);
        } else if REFUSALS.contains(&stat) {
            refused = refused.saturating_add(v);
        }
    }
    BTreeMap::from([
        (ACCEPTED.to_string(), accepted),
        (REFUSED.to_string(), refused),
    ])
}

async fn fetch(admin: SocketAddr) -> Result<String, String> {
    let tcp = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("/stats?filter=^listener\\.{LISTENER}\\.ssl\\."))
        .header(hyper::header::HOST, "envoy-admin")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Reads the counters every [`PERIOD`] until `stop` flips. An Envoy that does not answer
/// leaves the last counters shown (its liveness is the agent's reports' business).
pub async fn follow(admin: SocketAddr, board: Arc<Board>, mut stop: watch::Receiver<bool>) {
    let mut warned = false;
    loop {
        match tokio::time::timeout(PERIOD, fetch(admin)).await {
            Ok(Ok(text)) => {
                warned = false;
                board.envoy_counters(inbound_counters(&text));
            }
            Ok(Err(error)) if !warned => {
                warned = true;
                tracing::debug!(%admin, %error, "cannot read Envoy's statistics");
            }
            _ => {}
        }
        tokio::select! {
            () = tokio::time::sleep(PERIOD) => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_counted_accepted_or_refused() {
        let text = "listener.inbound_mtls.ssl.handshake: 3\n\
                    listener.inbound_mtls.ssl.fail_verify_no_cert: 1\n\
                    listener.inbound_mtls.ssl.fail_verify_error: 2\n\
                    listener.inbound_mtls.ssl.connection_error: 1\n\
                    listener.inbound_mtls.ssl.ciphers.TLS_AES_256_GCM_SHA384: 3\n\
                    listener.other.ssl.handshake: 50\n\
                    listener.inbound_mtls.ssl.handshake_histogram: No recorded values\n";
        let c = inbound_counters(text);
        assert_eq!(c.get(ACCEPTED), Some(&3));
        assert_eq!(c.get(REFUSED), Some(&4));
    }

    #[test]
    fn no_statistics_mean_zero_counters() {
        let c = inbound_counters("");
        assert_eq!(c.get(ACCEPTED), Some(&0));
        assert_eq!(c.get(REFUSED), Some(&0));
    }
}
