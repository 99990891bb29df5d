//! Child processes that cannot outlive the test.
//!
//! The kernel's parent-death signal (`setpriv --pdeathsig`) kills a child when the test thread
//! that started it dies, even when the test process itself is killed. A program that changes
//! its credentials (dnsmasq drops capabilities) loses that setting, so such programs run under
//! a small shell guard that keeps it and passes a TERM on to them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running child; killed on drop. Its output goes to a log file kept for failure reports.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    guarded: bool,
}

/// Runs "$@" and forwards TERM/INT/HUP to it; its own parent-death signal is TERM.
const GUARD: &str =
    r#"trap 'kill -TERM "$c" 2>/dev/null; wait "$c"; exit 0' TERM INT HUP; "$@" & c=$!; wait "$c""#;

impl Proc {
    /// Starts `program args` with stdout and stderr in `log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Proc {
        Self::start(name, program, args, &[], log, false)
    }

    /// Like [`Proc::spawn`], with extra environment variables.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Proc {
        Self::start(name, program, args, env, log, false)
    }

    /// Like [`Proc::spawn`], for programs that change their credentials (see the module doc).
    pub fn spawn_guarded(name: &str, program: &Path, args: &[String], log: &Path) -> Proc {
        Self::start(name, program, args, &[], log, true)
    }

    fn start(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
        guarded: bool,
    ) -> Proc {
        // Appended to, so a restarted program's log follows the first run's.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("create log file");
        let err = out.try_clone().expect("clone log file");
        let mut cmd = Command::new("setpriv");
        if guarded {
            cmd.args(["--pdeathsig", "TERM", "--", "sh", "-c", GUARD, "sh"]);
        } else {
            cmd.args(["--pdeathsig", "KILL", "--"]);
        }
        let child = cmd
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", program.display()));
        Proc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
            guarded,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited (and reaps it).
    pub fn exited(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|c| c.try_wait()),
            Some(Ok(Some(_))) | None
        )
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, `KILL`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// Waits up to `patience` for the process to exit; its status, or `None` if it is still
    /// running.
    pub fn wait_exit(&mut self, patience: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.guarded {
                // The guard must pass the signal on; SIGKILL would orphan the program.
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(c.id().to_string())
                    .status();
            } else {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "---- last lines of {} log ({}) ----",
                self.name,
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        self.kill();
    }
}
