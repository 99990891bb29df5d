//! dnsmasq on 127.0.0.1 as the VM's "system resolver": the upstream for forwarded names.
//!
//! Its zone is fixed and small: `forwarded.test` (A), TXT and SRV records for the mesh name
//! `vmservice.example.com` (so forwarding of other types for mesh names is visible), a name
//! with 100 addresses (`big.upstream.test`) for EDNS and truncation, and NXDOMAIN for
//! everything else.

use std::net::UdpSocket;
use std::path::Path;
use std::time::Duration;
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::free_port;
use vmesh_test_support::process::Proc;

pub const FORWARDED_NAME: &str = "forwarded.test";
pub const FORWARDED_ADDR: &str = "198.18.0.53";
pub const BIG_NAME: &str = "big.upstream.test";

#[derive(Debug)]
pub struct Dnsmasq {
    pub port: u16,
    proc: Proc,
}

impl Dnsmasq {
    pub fn start(dir: &Path) -> Dnsmasq {
        let port = free_port();
        let mut args = vec![
            "--keep-in-foreground".to_string(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--log-facility=-".into(),
            format!("--port={port}"),
            "--listen-address=127.0.0.1".into(),
            "--bind-interfaces".into(),
            "--user=root".into(),
            "--pid-file=".into(),
            format!("--address=/{FORWARDED_NAME}/{FORWARDED_ADDR}"),
            "--txt-record=vmservice.example.com,vm txt".into(),
            "--srv-host=vmservice.example.com,target.example.com,9090".into(),
            "--local=/#/".into(),
            // Large enough that a 100-address answer fits one UDP datagram (default 1232).
            "--edns-packet-max=4096".into(),
        ];
        for i in 1..=100 {
            args.push(format!("--host-record={BIG_NAME},198.18.1.{i}"));
        }
        let proc = Proc::spawn_guarded(
            "dnsmasq",
            Path::new("/usr/sbin/dnsmasq"),
            &args,
            &dir.join("dnsmasq.log"),
        );
        let d = Dnsmasq { port, proc };
        eventually("dnsmasq answers", || d.probe());
        d
    }

    fn probe(&self) -> Result<(), String> {
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
        let q = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x09forwarded\x04test\x00\x00\x01\x00\x01";
        sock.send_to(q, ("127.0.0.1", self.port))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        sock.recv(&mut buf).map(|_| ()).map_err(|e| e.to_string())
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        self.proc.kill();
    }
}
