//! A TLS client for the VM's inbound mTLS listener (rustls): connects with or without a
//! client certificate and records the certificate Envoy presented. It does not judge the
//! server's certificate (its only SAN is a SPIFFE URI, which no hostname check accepts);
//! tests compare what it recorded with what the shim wrote.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

#[derive(Debug)]
struct Record {
    seen: Arc<Mutex<Option<Vec<u8>>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Record {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(end_entity.to_vec());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client certificate: the chain (leaf first) and the key, PEM.
#[derive(Debug, Clone)]
pub struct Identity {
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// One connection through the listener.
#[derive(Debug)]
pub struct Conn {
    stream: StreamOwned<ClientConnection, TcpStream>,
    /// DER of the certificate the server presented.
    pub server_cert: Vec<u8>,
}

impl Conn {
    /// Sends `line` and reads the app's echo; an error when the server ended the
    /// connection instead (a refused client certificate shows here under TLS 1.3).
    pub fn echo(&mut self, line: &str) -> Result<String, String> {
        self.stream
            .write_all(line.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while got.len() < line.len() {
            match self.stream.read(&mut buf) {
                Ok(0) => return Err("the server closed the connection".into()),
                Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    }
}

/// Connects to 127.0.0.1:`port` and completes the TLS handshake.
pub fn connect(port: u16, client: Option<&Identity>) -> Result<Conn, String> {
    connect_sni(port, "vm.mesh.test", client)
}

/// [`connect`] with the SNI `server_name` (an east-west gateway routes by it).
pub fn connect_sni(
    port: u16,
    server_name: &str,
    client: Option<&Identity>,
) -> Result<Conn, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let seen = Arc::new(Mutex::new(None));
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Record {
            seen: Arc::clone(&seen),
            provider,
        }));
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(id) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&id.chain_pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("client chain: {e:?}"))?;
            let key = PrivateKeyDer::from_pem_slice(&id.key_pem)
                .map_err(|e| format!("client key: {e:?}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
    };
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    let mut stream = StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    let server_cert = seen
        .lock()
        .map_err(|_| "poisoned".to_string())?
        .clone()
        .ok_or("no server certificate")?;
    Ok(Conn {
        stream,
        server_cert,
    })
}
