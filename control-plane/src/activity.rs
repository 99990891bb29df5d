//! When a connection is idle: no request in flight and no byte of an answer written for the
//! idle timeout (nginx's `send_timeout` idea: the clock restarts on every write that makes
//! progress). Counting writes matters for long-poll answers: hyper ends the request (the
//! handler returns) as soon as the body is queued, and a table of thousands of endpoints to a
//! busy client can take longer than the idle timeout to drain.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Requests in flight on one connection and when it last did something.
pub struct Activity {
    state: Mutex<(usize, Instant)>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            state: Mutex::new((0, Instant::now())),
        })
    }

    fn lock(&self) -> MutexGuard<'_, (usize, Instant)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request starts; it ends when the guard drops.
    pub fn begin(self: &Arc<Self>) -> Busy {
        self.lock().0 += 1;
        Busy(self.clone())
    }

    fn touch(&self) {
        self.lock().1 = Instant::now();
    }

    /// `io` whose successful writes count as activity.
    pub fn watch_writes<T>(self: &Arc<Self>, io: T) -> Writes<T> {
        Writes {
            io,
            activity: self.clone(),
        }
    }

    /// Resolves once no request has been in flight, and nothing written, for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let (busy, since) = *self.lock();
            let now = Instant::now();
            if busy == 0 && now.duration_since(since) >= idle {
                return;
            }
            let next = if busy == 0 { since + idle } else { now + idle };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// A request in flight (see [`Activity::begin`]).
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.0 -= 1;
        st.1 = Instant::now();
    }
}

/// An I/O stream that tells its [`Activity`] about every write that made progress.
pub struct Writes<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T> Writes<T> {
    fn progressed(&self, r: &Poll<std::io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.touch();
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Writes<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Writes<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progressed(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progressed(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn an_answer_still_draining_keeps_the_connection_out_of_idle() {
        let start = Instant::now();
        let activity = Activity::new();
        // A 16-byte pipe: the writer blocks until the slow reader takes bytes.
        let (server, mut client) = tokio::io::duplex(16);
        let mut server = activity.watch_writes(server);
        let writer = tokio::spawn(async move {
            // The handler has returned (no request in flight); only the body drains.
            server.write_all(&[7u8; 160]).await.map(|_| server)
        });
        let idle = Duration::from_secs(20);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(15)).await;
                client.read_exact(&mut buf).await?;
            }
            std::io::Result::Ok(client)
        });
        // 150 s of draining, each step 15 s apart: never idle for 20 s.
        tokio::select! {
            _ = activity.idle_for(idle) => panic!("idle while the answer was still being written"),
            r = reader => { r.unwrap().unwrap(); }
        }
        writer.await.unwrap().unwrap();
        // Once nothing moves, idleness comes: 20 s after the last write (at 135 s).
        activity.idle_for(idle).await;
        assert_eq!(
            Instant::now().duration_since(start),
            Duration::from_secs(155)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_is_never_idle_and_its_end_restarts_the_clock() {
        let activity = Activity::new();
        let busy = activity.begin();
        tokio::select! {
            _ = activity.idle_for(Duration::from_secs(5)) => panic!("idle with a request in flight"),
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        drop(busy);
        let ended = Instant::now();
        activity.idle_for(Duration::from_secs(5)).await;
        assert_eq!(Instant::now().duration_since(ended), Duration::from_secs(5));
    }
}
