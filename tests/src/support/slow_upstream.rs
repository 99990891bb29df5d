//! A UDP resolver on 127.0.0.1 that answers every query, but only after a fixed delay: an
//! upstream slower than udp_proxy's session idle timeout, which a forwarded answer must
//! outlive.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::wasm_host::vmesh::upstream_answer;

#[derive(Debug)]
pub struct SlowUpstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SlowUpstream {
    /// Answers each A query with `ip` (TTL 60), `delay` after it arrived.
    pub fn start(delay: Duration, ip: Ipv4Addr) -> SlowUpstream {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the slow upstream");
        let addr = sock.local_addr().expect("its address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut due: Vec<(Instant, SocketAddr, Vec<u8>)> = Vec::new();
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                let now = Instant::now();
                due.retain(|(at, peer, answer)| {
                    if *at > now {
                        return true;
                    }
                    let _ = sock.send_to(answer, peer);
                    false
                });
                let wait = due
                    .iter()
                    .map(|(at, ..)| at.saturating_duration_since(now))
                    .min()
                    .unwrap_or(Duration::from_millis(50))
                    .clamp(Duration::from_millis(1), Duration::from_millis(50));
                sock.set_read_timeout(Some(wait)).expect("read timeout");
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let query = &buf[..n];
                    if query.len() >= 12 {
                        let id = u16::from_be_bytes([query[0], query[1]]);
                        let answer = upstream_answer(query, id, ip, 60);
                        due.push((Instant::now() + delay, peer, answer));
                    }
                }
            }
        });
        SlowUpstream {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT`, as the shim's `--upstream` takes it.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for SlowUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
