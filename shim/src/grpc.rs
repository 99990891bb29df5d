//! The forwarding stream's server end: `POST /vmesh.dns.v1.Forwarder/Forward` (gRPC over h2c,
//! `vmesh_api::forward`) on the shim's HTTP port, next to the DoH endpoint.
//!
//! ```text
//! request body ──GrpcFrames──► ForwardRequest ──► one task per Query ──► Forwarder
//!                                                                          │ (id, answer)
//! response body ◄──frame── ForwardResponse (every answer ready, batched) ◄─┘ channel
//! ```
//!
//! gRPC here is plain HTTP/2: length-prefixed messages in DATA frames and `grpc-status` in the
//! trailers, so hyper (the server the shim already runs) serves it with the contract crate's
//! codec; no second server stack, no code generation. Each query is answered as soon as its
//! upstream answers, in any order, tagged with the filter's id; the response body batches
//! whatever answers are ready when hyper asks for the next frame, so a busy stream costs one
//! DATA frame for many answers.
//!
//! The stream ends (trailers) when the filter ends its side, when the request breaks the
//! encoding (`INVALID_ARGUMENT`, after the answers already under way) or when the shim stops
//! (`UNAVAILABLE`, so the filter reconnects to the next shim); the answers in flight are sent
//! first either way.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use tokio::sync::{mpsc, watch};
use vmesh_api::forward::{self, GrpcFrames, Transport, BATCH_BYTES, GRPC_CONTENT_TYPE};

use crate::forwarder::{Forwarder, Mode};

/// gRPC status codes used here.
const OK: u32 = 0;
const INVALID_ARGUMENT: u32 = 3;
const UNAVAILABLE: u32 = 14;

/// Queries of one stream being relayed at once at most; beyond it the stream stops reading
/// (HTTP/2 flow control then holds the filter back) until answers went out.
pub const MAX_IN_FLIGHT: usize = 1 << 16;

/// Whether a request is a gRPC call (any `application/grpc` subtype, e.g. `+proto`).
pub fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(GRPC_CONTENT_TYPE.as_bytes()))
}

/// The status the stream ends with, set by the reader before it lets go of its sender.
#[derive(Debug, Default)]
struct End(Mutex<Option<(u32, String)>>);

impl End {
    fn set(&self, code: u32, message: String) {
        let mut end = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        end.get_or_insert((code, message));
    }

    fn get(&self) -> (u32, String) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or((OK, String::new()))
    }
}

/// One answer ready to go: the filter's id and the DNS message (empty: no answer).
type Ready = (u32, Vec<u8>);

/// The response body: answers as they come, batched, then the trailers.
#[derive(Debug)]
pub struct AnswerStream {
    answers: mpsc::UnboundedReceiver<Ready>,
    end: Arc<End>,
    /// The empty greeting went out (see [`vmesh_api::forward`]).
    greeted: bool,
    done: bool,
}

impl AnswerStream {
    fn batch(&mut self, first: Ready) -> Bytes {
        // The gRPC prefix is written last, once the length is known.
        let mut out = vec![0u8; 5];
        let push = |(id, message): Ready, out: &mut Vec<u8>| {
            forward::push_answer(
                &forward::Answer {
                    id,
                    message: &message,
                },
                out,
            );
        };
        push(first, &mut out);
        while out.len() < BATCH_BYTES {
            match self.answers.try_recv() {
                Ok(ready) => push(ready, &mut out),
                Err(_) => break,
            }
        }
        let len = u32::try_from(out.len() - 5).unwrap_or(u32::MAX);
        if let Some(prefix) = out.get_mut(1..5) {
            prefix.copy_from_slice(&len.to_be_bytes());
        }
        Bytes::from(out)
    }
}

impl Body for AnswerStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.greeted {
            this.greeted = true;
            // An empty ForwardResponse: the filter learns the stream reached a shim.
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0])))));
        }
        match this.answers.poll_recv(cx) {
            Poll::Ready(Some(first)) => Poll::Ready(Some(Ok(Frame::data(this.batch(first))))),
            Poll::Ready(None) => {
                this.done = true;
                let (code, message) = this.end.get();
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from(code));
                if let Ok(v) = HeaderValue::from_str(&message) {
                    if !message.is_empty() {
                        trailers.insert("grpc-message", v);
                    }
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Serves one `Forward` call: reads queries in the background and answers on the returned
/// response as they are ready.
pub fn forward_stream(
    forwarder: Arc<Forwarder>,
    req: Request<Incoming>,
    stop: watch::Receiver<bool>,
) -> Response<AnswerStream> {
    let (tx, rx) = mpsc::unbounded_channel();
    let end = Arc::new(End::default());
    tokio::spawn(read_queries(
        forwarder,
        req.into_body(),
        tx,
        Arc::clone(&end),
        stop,
    ));
    let mut resp = Response::new(AnswerStream {
        answers: rx,
        end,
        greeted: false,
        done: false,
    });
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(GRPC_CONTENT_TYPE));
    resp
}

fn mode(transport: Transport) -> Mode {
    match transport {
        Transport::Udp => Mode::Udp,
        Transport::Tcp => Mode::Tcp,
        Transport::Https => Mode::Doh,
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await.
    let _ = stop.wait_for(|s| *s).await;
}

async fn read_queries(
    forwarder: Arc<Forwarder>,
    mut body: Incoming,
    answers: mpsc::UnboundedSender<Ready>,
    end: Arc<End>,
    mut stop: watch::Receiver<bool>,
) {
    let mut frames = GrpcFrames::default();
    // Permits bound the relays under way; each relay gives its permit back when it answered.
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            () = stopped(&mut stop) => {
                end.set(UNAVAILABLE, "the shim is shutting down".into());
                return;
            }
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                // Trailers: the filter's side is done.
                Err(_) => continue,
            },
            Some(Err(error)) => {
                tracing::debug!(%error, "forward stream reset");
                return;
            }
            None => return,
        };
        frames.push(&data);
        loop {
            let message = match frames.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "forward stream broke the gRPC framing; ending it");
                    end.set(INVALID_ARGUMENT, e.to_string());
                    return;
                }
            };
            for query in forward::queries(message) {
                let query = match query {
                    Ok(q) => q,
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable forward request; ending the stream");
                        end.set(INVALID_ARGUMENT, e.to_string());
                        return;
                    }
                };
                let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                    return;
                };
                let (id, mode, message) = (query.id, mode(query.transport), query.message.to_vec());
                let budget = Duration::from_millis(u64::from(query.budget_ms.max(1)));
                let forwarder = Arc::clone(&forwarder);
                let answers = answers.clone();
                tokio::spawn(async move {
                    // Not a standard query: an empty answer, which the filter turns into SERVFAIL.
                    let answer = forwarder
                        .forward_within(&message, mode, budget)
                        .await
                        .map(|a| a.message)
                        .unwrap_or_default();
                    let _ = answers.send((id, answer));
                    drop(permit);
                });
            }
        }
    }
}
