//! A UDP resolver on 127.0.0.1 that answers every query, but only after a fixed delay: an
//! upstream slower than udp_proxy's session idle timeout, which a forwarded answer must
//! outlive, or one that keeps thousands of forwards in flight. [`SlowUpstream::selective`]
//! delays only names that contain a marker and answers the rest at once.

use std::collections::VecDeque;
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
        Self::selective(delay, ip, b"")
    }

    /// Like [`SlowUpstream::start`], but only queries whose bytes contain `marker` (e.g. the
    /// label `b"\x04slow"`) wait; the others are answered at once.
    pub fn selective(delay: Duration, ip: Ipv4Addr, marker: &[u8]) -> SlowUpstream {
        let marker = marker.to_vec();
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind the slow upstream");
        // Thousands of queries can arrive within a second; the default buffer (~200 KB, a few
        // hundred datagrams) would drop some before this thread reads them. The kernel caps
        // the size at net.core.rmem_max.
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(8 << 20);
        let addr = sock.local_addr().expect("its address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // One delay for all: arrival order is due order.
            let mut due: VecDeque<(Instant, SocketAddr, Vec<u8>)> = VecDeque::new();
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                let now = Instant::now();
                while due.front().is_some_and(|(at, ..)| *at <= now) {
                    if let Some((_, peer, answer)) = due.pop_front() {
                        let _ = sock.send_to(&answer, peer);
                    }
                }
                let wait = due
                    .front()
                    .map(|(at, ..)| at.saturating_duration_since(now))
                    .unwrap_or(Duration::from_millis(50))
                    .clamp(Duration::from_millis(1), Duration::from_millis(50));
                sock.set_read_timeout(Some(wait)).expect("read timeout");
                // Everything that arrived, then the next due answer.
                while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let query = &buf[..n];
                    if query.len() >= 12 {
                        let id = u16::from_be_bytes([query[0], query[1]]);
                        let answer = upstream_answer(query, id, ip, 60);
                        let slow =
                            marker.is_empty() || query.windows(marker.len()).any(|w| w == marker);
                        if slow {
                            due.push_back((Instant::now() + delay, peer, answer));
                        } else {
                            let _ = sock.send_to(&answer, peer);
                        }
                    }
                    if due.front().is_some_and(|(at, ..)| *at <= Instant::now()) {
                        break;
                    }
                    sock.set_read_timeout(Some(Duration::from_millis(1)))
                        .expect("read timeout");
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
