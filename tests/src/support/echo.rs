//! A VM's application that keeps connections open: a TCP echo server on 127.0.0.1, so a test
//! can tell one long-lived connection through Envoy from a new one. Runs until dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub struct Echo {
    pub port: u16,
    accepted: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Echo {
    pub fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the echo server");
        let port = listener.local_addr().expect("echo addr").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let accepted = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, b, s) = (accepted.clone(), bytes.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        let b = b.clone();
                        std::thread::spawn(move || echo(conn, &b));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Echo {
            port,
            accepted,
            bytes,
            stop,
        }
    }

    /// Connections the app accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Bytes the app received so far, over all connections.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn echo(mut conn: TcpStream, bytes: &AtomicU64) {
    let _ = conn.set_nonblocking(false);
    let mut buf = [0u8; 16 << 10];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::Relaxed);
                if conn.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                    return;
                }
            }
        }
    }
}
