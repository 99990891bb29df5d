//! The HTTPS client the CLI (and the tests and benchmark) use to talk to `vmesh-control serve`.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{HeaderMap, Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::api::{ApiError, ApplyRequest, ErrorKind, TokenRequest, TokenResponse};
use crate::config::Document;
use crate::registry::ApplyOutcome;
use crate::tls::{client_config, server_name, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server URL {0:?} must look like https://HOST:PORT")]
    BadUrl(String),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("server said {status}: {}", .error.message)]
    Api { status: u16, error: ApiError },
}

/// A response that was not an error status.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Clone)]
pub struct Client {
    addr: String,
    authority: String,
    name: ServerName<'static>,
    tls: TlsConnector,
    /// The same trust, offering only h2: gRPC needs HTTP/2.
    tls_h2: TlsConnector,
    token: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Splits `https://host:port[/]` into (connect address, authority, TLS name).
fn parse_url(url: &str) -> Result<(String, String, String), ClientError> {
    let bad = || ClientError::BadUrl(url.to_string());
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(bad)?
        .trim_end_matches('/');
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, p) = r.split_once(']').ok_or_else(bad)?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (rest.to_string(), "443"),
        }
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains('/') {
        return Err(bad());
    }
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((addr.clone(), addr, host))
}

/// One kept-alive HTTP/1.1 connection.
#[derive(Debug)]
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    client: Client,
}

impl Client {
    pub fn new(url: &str, root_pem: &[u8], token: &str) -> Result<Self, ClientError> {
        let (addr, authority, host) = parse_url(url)?;
        let cfg = client_config(root_pem)?;
        let mut h2 = cfg.clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Client {
            addr,
            authority,
            name: server_name(&host)?,
            tls: TlsConnector::from(Arc::new(cfg)),
            tls_h2: TlsConnector::from(Arc::new(h2)),
            token: token.to_string(),
        })
    }

    /// The bearer token this client sends.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The same server with another bearer token.
    pub fn with_token(&self, token: &str) -> Client {
        Client {
            token: token.to_string(),
            ..self.clone()
        }
    }

    async fn tls(
        &self,
        connector: &TlsConnector,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ClientError> {
        let tcp = TcpStream::connect(&self.addr)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        connector
            .connect(self.name.clone(), tcp)
            .await
            .map_err(|source| ClientError::Connect {
                addr: self.addr.clone(),
                source,
            })
    }

    /// An HTTP/2 connection for gRPC calls (`CreateCertificate`), as Istio's agent makes
    /// them; many calls may share it at once.
    pub async fn connect_grpc(&self) -> Result<GrpcConnection, ClientError> {
        let tls = self.tls(&self.tls_h2).await?;
        let (sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(GrpcConnection {
            sender,
            authority: self.authority.clone(),
            token: self.token.clone(),
        })
    }

    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let tls = self.tls(&self.tls).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Connection {
            sender,
            client: self.clone(),
        })
    }

    /// `POST /v1/admin/tokens` (admin credential): a VM token for `namespace/service_account`.
    pub async fn mint_token(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: std::time::Duration,
    ) -> Result<TokenResponse, ClientError> {
        let req = TokenRequest {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            ttl_seconds: ttl.as_secs(),
        };
        self.json(
            Method::POST,
            vmesh_api::paths::control::ADMIN_TOKENS,
            Some(&req),
        )
        .await
    }

    /// `POST /v1/admin/apply` (admin credential).
    pub async fn apply(
        &self,
        documents: Vec<Document>,
        namespace: &str,
    ) -> Result<Vec<ApplyOutcome>, ClientError> {
        Ok(self.apply_with_warnings(documents, namespace).await?.0)
    }

    /// As [`Client::apply`], with the validation warnings of the accepted objects.
    pub async fn apply_with_warnings(
        &self,
        documents: Vec<Document>,
        namespace: &str,
    ) -> Result<(Vec<ApplyOutcome>, Vec<String>), ClientError> {
        #[derive(serde::Deserialize)]
        struct Results {
            results: Vec<ApplyOutcome>,
            #[serde(default)]
            warnings: Vec<String>,
        }
        let req = ApplyRequest {
            documents,
            namespace: namespace.to_string(),
        };
        let r: Results = self
            .json(
                Method::POST,
                vmesh_api::paths::control::ADMIN_APPLY,
                Some(&req),
            )
            .await?;
        Ok((r.results, r.warnings))
    }

    /// One request on a fresh connection.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        self.connect().await?.call(method, path, body).await
    }

    pub async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, ClientError> {
        self.connect().await?.json(method, path, body).await
    }
}

impl Connection {
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let c = &self.client;
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, &c.authority)
            .header(AUTHORIZATION, format!("Bearer {}", c.token));
        if body.is_some() {
            b = b.header(CONTENT_TYPE, vmesh_api::paths::content_type::JSON);
        }
        let req = b.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await?.to_bytes();
        if status.is_client_error() || status.is_server_error() {
            let error = ApiError::from_response(status.as_u16(), &body).with_retry_after(
                headers
                    .get(hyper::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()),
            );
            return Err(ClientError::Api {
                status: status.as_u16(),
                error,
            });
        }
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn json<T: serde::de::DeserializeOwned>(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&impl serde::Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let r = self.call(method, path, body).await?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Api {
            status: r.status.as_u16(),
            error: ApiError {
                status: r.status.as_u16(),
                ..ApiError::new(ErrorKind::Unknown, format!("response body: {e}"))
            },
        })
    }
}

/// An HTTP/2 connection to the server for gRPC; cheap to clone (calls share it).
#[derive(Debug, Clone)]
pub struct GrpcConnection {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    authority: String,
    token: String,
}

/// A unary gRPC call's outcome as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcReply {
    pub http_status: u16,
    /// From the trailers (or, for a trailers-only answer, the headers); `None`: absent.
    pub grpc_status: Option<u32>,
    /// `grpc-message`, percent-decoded.
    pub grpc_message: String,
    /// The response body, still framed.
    pub body: Bytes,
}

/// `grpc-message` decoded (`%XX` escapes; anything malformed stays as it is).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (c, hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl GrpcConnection {
    /// The same connection, calling with another bearer token.
    pub fn with_token(&self, token: &str) -> GrpcConnection {
        GrpcConnection {
            token: token.to_string(),
            ..self.clone()
        }
    }

    /// POSTs `body` (already gRPC-framed) to `path` with the headers Istio's agent sends:
    /// `content-type: application/grpc`, `te: trailers`, the bearer token, and `extra`.
    pub async fn unary(
        &mut self,
        path: &str,
        extra: &[(&str, &str)],
        body: Bytes,
    ) -> Result<GrpcReply, ClientError> {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(format!("https://{}{path}", self.authority))
            .header(CONTENT_TYPE, vmesh_api::forward::GRPC_CONTENT_TYPE)
            .header("te", "trailers");
        if !self.token.is_empty() {
            b = b.header(AUTHORIZATION, format!("Bearer {}", self.token));
        }
        for (k, v) in extra {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let http_status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let collected = resp.into_body().collect().await?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let field = |name: &str| {
            trailers
                .get(name)
                .or_else(|| headers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(GrpcReply {
            http_status,
            grpc_status: field(vmesh_api::ca::status::STATUS_HEADER).and_then(|s| s.parse().ok()),
            grpc_message: field(vmesh_api::ca::status::MESSAGE_HEADER)
                .map(|m| percent_decode(&m))
                .unwrap_or_default(),
            body: collected.to_bytes(),
        })
    }

    /// `CreateCertificate` as Istio's agent calls it (`ClusterID` header included): the chain,
    /// or the gRPC status and message it was refused with.
    pub async fn create_certificate(
        &mut self,
        req: &vmesh_api::ca::IstioCertificateRequest,
        cluster_id: &str,
    ) -> Result<Result<Vec<String>, (u32, String)>, ClientError> {
        let mut framed = vec![];
        vmesh_api::forward::frame(&prost::Message::encode_to_vec(req), &mut framed);
        let r = self
            .unary(
                vmesh_api::ca::PATH,
                &[(vmesh_api::ca::CLUSTER_ID_HEADER, cluster_id)],
                Bytes::from(framed),
            )
            .await?;
        match r.grpc_status {
            Some(vmesh_api::ca::status::OK) => {
                let mut frames = vmesh_api::forward::GrpcFrames::default();
                frames.push(&r.body);
                let msg = match frames.next_message() {
                    Ok(Some(m)) => m,
                    _ => {
                        return Ok(Err((
                            vmesh_api::ca::status::INTERNAL,
                            "no response message".into(),
                        )))
                    }
                };
                match <vmesh_api::ca::IstioCertificateResponse as prost::Message>::decode(msg) {
                    Ok(resp) => Ok(Ok(resp.cert_chain)),
                    Err(e) => Ok(Err((
                        vmesh_api::ca::status::INTERNAL,
                        format!("response: {e}"),
                    ))),
                }
            }
            Some(code) => Ok(Err((code, r.grpc_message))),
            None => Ok(Err((
                vmesh_api::ca::status::INTERNAL,
                format!("HTTP {} without grpc-status", r.http_status),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_and_name() {
        assert_eq!(
            parse_url("https://127.0.0.1:15012").unwrap().0,
            "127.0.0.1:15012"
        );
        assert_eq!(
            parse_url("https://[::1]:15012/").unwrap(),
            ("[::1]:15012".into(), "[::1]:15012".into(), "::1".into())
        );
        assert_eq!(
            parse_url("https://istiod.istio-system.svc").unwrap().0,
            "istiod.istio-system.svc:443"
        );
        assert!(parse_url("http://x:1").is_err());
        assert!(parse_url("https://x:notaport").is_err());
    }
}
