//! One VM of the mesh on this machine: the real `vmesh-shim` started from a VM bundle that
//! `vmesh-control vm-bundle` wrote, and a real Envoy with the built filter talking to it. The
//! VM's mesh address is a 198.18.0.0/15 test address given through `ISTIO_SVC_IP`, as Istio
//! reads it; everything listens on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::envoy::{Envoy, Ports};
use super::shim::{Shim, ShimOptions};
use vmesh_test_support::dig::{dig, Dig};
use vmesh_test_support::eventually::eventually;
use vmesh_test_support::free_port;

#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The VM's address in the mesh (`ISTIO_SVC_IP`).
    pub address: String,
    /// Envoy's worker threads.
    pub concurrency: u32,
    /// The VM's resolver for names outside the mesh.
    pub upstream: String,
    /// resolv.conf for the VM's search domains (default: one naming `corp.example`).
    pub resolv_conf: Option<PathBuf>,
    /// More shim flags.
    pub shim_args: Vec<String>,
    /// The app behind the inbound mTLS listener (default: a port nothing listens on).
    pub app_port: Option<u16>,
}

impl VmOptions {
    pub fn new(address: &str, upstream: &str) -> Self {
        VmOptions {
            address: address.to_string(),
            concurrency: 1,
            upstream: upstream.to_string(),
            resolv_conf: None,
            shim_args: Vec::new(),
            app_port: None,
        }
    }
}

#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: Envoy first, then the shim it reports to.
    pub envoy: Option<Envoy>,
    pub shim: Option<Shim>,
    pub ports: Ports,
    pub shim_port: u16,
    pub bundle: PathBuf,
    pub state_dir: PathBuf,
    pub options: VmOptions,
    dir: PathBuf,
}

impl Vm {
    /// Starts the shim from `bundle`, then Envoy; returns once both run (registration is the
    /// caller's to wait for).
    pub fn start(dir: &Path, bundle: &Path, options: VmOptions) -> Vm {
        let vm = Vm::spawn(dir, bundle, options);
        vm.wait_running();
        vm
    }

    /// Starts both without waiting ([`Vm::wait_running`]): processes die with the thread that
    /// started them, so many VMs starting at once are spawned from the test's own thread.
    pub fn spawn(dir: &Path, bundle: &Path, options: VmOptions) -> Vm {
        let dir = dir.join(format!("vm-{}", options.address));
        std::fs::create_dir_all(&dir).expect("vm dir");
        let mut ports = Ports::free();
        if let Some(app) = options.app_port {
            ports.app = app;
        }
        let mut vm = Vm {
            envoy: None,
            shim: None,
            ports,
            shim_port: free_port(),
            bundle: bundle.to_path_buf(),
            state_dir: dir.join("state"),
            options,
            dir,
        };
        vm.shim = Some(Shim::spawn(&vm.dir, vm.shim_port, &vm.shim_options()));
        vm.envoy = Some(Envoy::spawn(
            &vm.dir,
            vm.shim_port,
            vm.ports,
            vm.options.concurrency,
        ));
        vm
    }

    pub fn wait_running(&self) {
        if let Some(s) = &self.shim {
            s.wait_serving();
        }
        if let Some(e) = &self.envoy {
            e.wait_live();
        }
    }

    fn resolv_conf(&self) -> PathBuf {
        self.options.resolv_conf.clone().unwrap_or_else(|| {
            let p = self.dir.join("resolv.conf");
            if !p.exists() {
                std::fs::write(&p, "search corp.example\nnameserver 198.18.0.53\n")
                    .expect("write resolv.conf");
            }
            p
        })
    }

    pub fn start_shim(&mut self) {
        self.shim = Some(Shim::start(&self.dir, self.shim_port, &self.shim_options()));
    }

    /// Where the shim writes the VM's certificate and Envoy reads it.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    fn shim_options(&self) -> ShimOptions {
        let mut args = vec![
            "--bundle".to_string(),
            self.bundle.display().to_string(),
            "--cert-dir".into(),
            self.cert_dir().display().to_string(),
            "--envoy-admin".into(),
            format!("127.0.0.1:{}", self.ports.admin),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
            "--resolv-conf".into(),
            self.resolv_conf().display().to_string(),
        ];
        args.extend(self.options.shim_args.iter().cloned());
        ShimOptions {
            upstreams: vec![self.options.upstream.clone()],
            self_addr: Some(format!("127.0.0.1:{}", self.ports.dns)),
            args,
            env: vec![("ISTIO_SVC_IP".into(), self.options.address.clone())],
            ..ShimOptions::default()
        }
    }

    pub fn start_envoy(&mut self) {
        self.envoy = Some(Envoy::start_on(
            &self.dir,
            self.shim_port,
            self.ports,
            self.options.concurrency,
        ));
    }

    pub fn envoy(&mut self) -> &mut Envoy {
        self.envoy.as_mut().expect("Envoy is running")
    }

    pub fn shim(&mut self) -> &mut Shim {
        self.shim.as_mut().expect("the shim is running")
    }

    /// `kill -9` Envoy.
    pub fn kill_envoy(&mut self) {
        if let Some(mut e) = self.envoy.take() {
            e.process().kill();
        }
    }

    /// `kill -9` the shim.
    pub fn kill_shim(&mut self) {
        if let Some(mut s) = self.shim.take() {
            s.stop();
        }
    }

    /// SIGTERM to the shim; its exit status once it has exited.
    pub fn terminate_shim(&mut self) -> Option<std::process::ExitStatus> {
        let mut s = self.shim.take()?;
        s.process().signal("TERM");
        s.process().wait_exit(Duration::from_secs(10))
    }

    /// The shim's `/v1/status`.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        self.shim.as_ref().ok_or("no shim")?.status()
    }

    /// The shim's registration state (`registered`, `refused`, ...).
    pub fn registration(&self) -> Result<String, String> {
        let s = self.status()?;
        Ok(s["registration"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// dig against this VM's Envoy.
    pub fn dig(&self, args: &[&str]) -> Result<Dig, String> {
        dig(self.ports.dns, args)
    }

    /// Waits until `name` resolves to `want` (A records, any order) through this VM's Envoy.
    pub fn wait_resolves(&self, name: &str, want: &[&str]) {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort();
        eventually(&format!("{name} resolves to {want:?}"), || {
            let d = self.dig(&[name])?;
            let mut got = d.data("A");
            got.sort();
            if got == want {
                Ok(())
            } else {
                Err(format!("{} {got:?}", d.status))
            }
        });
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}
