//! A VM's application for probes: an HTTP server on 127.0.0.1 whose `/ready` answers 200 or
//! 503 as the test sets it. Runs on its own thread until dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct App {
    pub port: u16,
    ready: Arc<AtomicBool>,
    requests: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl App {
    pub fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the app");
        let port = listener.local_addr().expect("app addr").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let ready = Arc::new(AtomicBool::new(true));
        let requests = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, n, s) = (ready.clone(), requests.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        let ok = r.load(Ordering::Relaxed);
                        std::thread::spawn(move || answer(conn, ok));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        App {
            port,
            ready,
            requests,
            stop,
        }
    }

    /// What `/ready` answers from now on.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Connections accepted so far (each probe is one).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn answer(mut conn: TcpStream, ready: bool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = if ready {
        ("200 OK", "ready\n")
    } else {
        ("503 Service Unavailable", "not ready\n")
    };
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}
