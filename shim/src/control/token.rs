//! The VM's identity token, re-read when its file changes.
//!
//! Kubernetes projected tokens and `vmesh-control token create` outputs are rotated by
//! replacing the file (usually by rename), so the path is stat'ed on every use and re-read when
//! its fingerprint changes, like the name table file. Each new content bumps a generation: the
//! registration session waits for a new generation after a 401/403 instead of retrying a token
//! the control plane already refused.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::names::Fingerprint;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("token file {0} is empty")]
    Empty(String),
}

#[derive(Debug)]
pub struct TokenSource {
    path: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    fingerprint: Option<Fingerprint>,
    token: String,
    generation: u64,
}

/// Never shows the token: it is a credential, and its `jti` finds it in anyone's logs.
impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("fingerprint", &self.fingerprint)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl TokenSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        TokenSource {
            path: path.into(),
            state: Mutex::new(State::default()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-written (plain
        // assignments), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current token and its generation, re-reading the file if it changed.
    pub fn get(&self) -> Result<(String, u64), TokenError> {
        let unreadable = |e: std::io::Error| TokenError::Unreadable {
            path: self.path.display().to_string(),
            reason: e.to_string(),
        };
        let meta = std::fs::metadata(&self.path).map_err(unreadable)?;
        let fingerprint = Fingerprint::of(&meta);
        let mut state = self.state();
        if state.fingerprint != Some(fingerprint) || fingerprint.is_recent() {
            let text = std::fs::read_to_string(&self.path).map_err(unreadable)?;
            let token = text.trim();
            if token.is_empty() {
                return Err(TokenError::Empty(self.path.display().to_string()));
            }
            if token != state.token {
                if state.generation > 0 {
                    tracing::info!(path = %self.path.display(), "token file changed; using the new token");
                }
                state.token = token.to_string();
                state.generation += 1;
            }
            state.fingerprint = Some(fingerprint);
        }
        Ok((state.token.clone(), state.generation))
    }

    /// The generation of the last token read (0 before the first read). Reads the file again
    /// if it changed, so a caller waiting for a new token can poll this.
    pub fn generation(&self) -> u64 {
        let _ = self.get();
        self.state().generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_token_is_picked_up_and_counted() {
        let dir = vmesh_test_support::TempDir::new();
        let path = dir.path().join("istio-token");
        std::fs::write(&path, "aaa.bbb.ccc\n").unwrap();
        let t = TokenSource::new(&path);
        assert_eq!(t.get().unwrap(), ("aaa.bbb.ccc".to_string(), 1));
        assert_eq!(t.get().unwrap().1, 1, "same content, same generation");
        let tmp = dir.path().join("tmp");
        std::fs::write(&tmp, "ddd.eee.fff").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(t.get().unwrap(), ("ddd.eee.fff".to_string(), 2));
        std::fs::write(&path, "  \n").unwrap();
        assert!(matches!(t.get(), Err(TokenError::Empty(_))));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(t.get(), Err(TokenError::Unreadable { .. })));
        assert_eq!(t.generation(), 2);
    }

    #[test]
    fn debug_output_leaves_out_the_token() {
        let dir = vmesh_test_support::TempDir::new();
        let path = dir.path().join("istio-token");
        std::fs::write(&path, "aaa.secret-claims.ccc\n").unwrap();
        let t = TokenSource::new(&path);
        t.get().unwrap();
        let debug = format!("{t:?} {t:#?}");
        assert!(debug.contains("generation: 1"), "{debug}");
        assert!(!debug.contains("secret-claims"), "{debug}");
    }
}
