//! Transport security: one certificate, key and CA per node (`--tls-cert`,
//! `--tls-key`, `--tls-ca`), used
//!
//! * by the gRPC server (client API, cluster admin and the peer transport on
//!   one port): server TLS; a client certificate is asked for and, if one is
//!   presented, must chain to the CA;
//! * by the peer transport as a client, with the node's own certificate
//!   (mutual TLS): a node takes Raft traffic only from a peer whose
//!   certificate chains to the CA **and names the member it claims to be**:
//!   a DNS SAN `node-<id>`. (A host name would not do: on one machine every
//!   certificate names 127.0.0.1, a client's too.) Issue each node's
//!   certificate with that SAN beside its host names;
//! * by the node's own gRPC clients (peer status, forwarding HTTP requests).
//!
//! `tandem certs dev` writes a development CA and certificates, so a secure
//! local cluster is two commands away.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// A node's certificate, key and CA, as PEM.
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

impl Tls {
    /// Reads the three files; every one is needed.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Arc<Tls>, TlsError> {
        let read = |flag: &str, path: &Path| {
            std::fs::read_to_string(path)
                .map_err(|e| TlsError(format!("{flag} {}: {e}", path.display())))
        };
        let tls = Tls {
            cert_pem: read("--tls-cert", cert)?,
            key_pem: read("--tls-key", key)?,
            ca_pem: read("--tls-ca", ca)?,
        };
        for (flag, pem, marker) in [
            ("--tls-cert", &tls.cert_pem, "CERTIFICATE"),
            ("--tls-key", &tls.key_pem, "PRIVATE KEY"),
            ("--tls-ca", &tls.ca_pem, "CERTIFICATE"),
        ] {
            if !pem.contains(marker) {
                return Err(TlsError(format!("{flag}: not a PEM file with a {marker}")));
            }
        }
        Ok(Arc::new(tls))
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// The gRPC port's TLS (rustls): this node's certificate; a client
    /// certificate is asked for and, when one is presented, must chain to
    /// the CA (the peer transport then requires one and checks its name).
    /// The peer wire is agreed on by its own protocol name.
    pub fn rustls_grpc_server(&self) -> Result<rustls::ServerConfig, TlsError> {
        self.rustls_server_config(true, &[b"h2", crate::raft::wire::ALPN])
    }

    /// A client of other nodes (rustls) offering `alpn`: the server's
    /// certificate checked against the CA, this node's certificate
    /// presented.
    pub fn rustls_peer_client(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, TlsError> {
        let (certs, key) = self.rustls_identity()?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_root_certificates(self.rustls_roots()?)
            .with_client_auth_cert(certs, key)
            .map_err(|e| TlsError(format!("--tls-cert/--tls-key: {e}")))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// The HTTP API's TLS (rustls): this node's certificate; clients are
    /// not asked for one.
    pub fn rustls_server(&self) -> Result<rustls::ServerConfig, TlsError> {
        self.rustls_server_config(false, &[b"h2", b"http/1.1"])
    }

    fn rustls_server_config(
        &self,
        ask_client_certificate: bool,
        alpn: &[&[u8]],
    ) -> Result<rustls::ServerConfig, TlsError> {
        let pem = |flag: &str, e: &dyn std::fmt::Display| TlsError(format!("{flag}: {e}"));
        let (certs, key) = self.rustls_identity()?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?;
        let builder = if ask_client_certificate {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(self.rustls_roots()?),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| pem("--tls-ca", &e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| pem("--tls-cert/--tls-key", &e))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(config)
    }

    /// This node's certificate chain and key, for rustls.
    fn rustls_identity(
        &self,
    ) -> Result<
        (
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError(format!("--tls-cert: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| TlsError(format!("--tls-key: {e}")))?;
        Ok((certs, key))
    }

    /// The CA's certificates, as the roots a peer's certificate must chain to.
    fn rustls_roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| TlsError(format!("--tls-ca: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| TlsError(format!("--tls-ca: {e}")))?;
        }
        Ok(roots)
    }

    /// A client of another node at `address` (HOST:PORT): TLS checked
    /// against the CA, with this node's certificate.
    pub fn client(&self, address: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(self.identity())
            .domain_name(host_of(address))
    }
}

/// TLS handshakes the gRPC port runs at once.
pub const HANDSHAKES_AT_ONCE: usize = 256;
/// A handshake longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One connection's TLS handshake on the gRPC port: the secured stream, or
/// `None` (logged) when it fails or takes too long.
pub async fn accept<E>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: Result<crate::limits::Limited<tokio::net::TcpStream>, E>,
) -> Option<Result<tokio_rustls::server::TlsStream<crate::limits::Limited<tokio::net::TcpStream>>, E>>
{
    let io = match io {
        Ok(io) => io,
        Err(e) => return Some(Err(e)),
    };
    let peer = io.get_ref().peer_addr().ok();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(stream)) => Some(Ok(stream)),
        Ok(Err(e)) => {
            tracing::warn!(?peer, error = %e, "refused a TLS connection");
            None
        }
        Err(_) => {
            tracing::info!(
                ?peer,
                "closed a connection that did not finish its TLS handshake"
            );
            None
        }
    }
}

/// An endpoint for a node at `address`: `https://` with `tls`, else `http://`.
pub fn endpoint(address: &str, tls: Option<&Tls>) -> Result<Endpoint, String> {
    match tls {
        None => Endpoint::from_shared(format!("http://{address}")).map_err(|e| e.to_string()),
        Some(tls) => Endpoint::from_shared(format!("https://{address}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls.client(address))
            .map_err(|e| format!("TLS to {address}: {e}")),
    }
}

/// The host part of HOST:PORT (IPv6 brackets removed).
pub fn host_of(address: &str) -> String {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// The DNS and IP names a certificate (DER) holds in its SANs.
pub fn names_in(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => Some(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string()),
                16 => Some(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Whether a peer certificate's names claim member `id`: `node-<id>`.
pub fn names_member(names: &[String], id: u64) -> bool {
    let own = format!("node-{id}");
    names.contains(&own)
}

/// The file names `tandem certs dev` writes (tooling depends on them).
pub fn dev_file_names(nodes: u64) -> Vec<String> {
    let mut names = vec!["ca.pem".to_string()];
    for i in 1..=nodes {
        names.push(format!("node-{i}.pem"));
        names.push(format!("node-{i}.key"));
    }
    names.push("client.pem".into());
    names.push("client.key".into());
    names
}

/// Writes a development CA (`ca.pem`; its key is not kept), a certificate
/// and key per node (`node-<i>.pem`, `node-<i>.key`: SANs `node-<i>`,
/// `localhost`, `127.0.0.1`) and a client's (`client.pem`, `client.key`).
/// For development and tests only: whoever has `ca.pem`'s key — nobody,
/// once this returns — could mint members.
pub fn write_dev_certs(out: &Path, nodes: u64) -> Result<Vec<PathBuf>, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let fail = |what: &str, e: rcgen::Error| TlsError(format!("{what}: {e}"));
    if nodes == 0 || nodes > 100 {
        return Err(TlsError("--nodes must be 1 to 100".into()));
    }
    std::fs::create_dir_all(out).map_err(|e| TlsError(format!("{}: {e}", out.display())))?;
    let ca_key = KeyPair::generate().map_err(|e| fail("CA key", e))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA", e))?;
    ca.distinguished_name
        .push(DnType::CommonName, "Tandem development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| fail("CA", e))?;
    let issuer = Issuer::new(ca, ca_key);
    let mut written = Vec::new();
    let mut write = |name: String, text: String, secret: bool| -> Result<(), TlsError> {
        let path = out.join(&name);
        std::fs::write(&path, text).map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| TlsError(format!("{}: {e}", path.display())))?;
        }
        written.push(path);
        Ok(())
    };
    write("ca.pem".into(), ca_cert.pem(), false)?;
    let leaf = |name: &str, sans: Vec<String>| -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(|e| fail(name, e))?;
        let mut params = CertificateParams::new(sans).map_err(|e| fail(name, e))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).map_err(|e| fail(name, e))?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    for i in 1..=nodes {
        let name = format!("node-{i}");
        let (cert, key) = leaf(
            &name,
            vec![name.clone(), "localhost".into(), "127.0.0.1".into()],
        )?;
        write(format!("{name}.pem"), cert, false)?;
        write(format!("{name}.key"), key, true)?;
    }
    let (cert, key) = leaf("client", vec!["localhost".into(), "127.0.0.1".into()])?;
    write("client.pem".into(), cert, false)?;
    write("client.key".into(), key, true)?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certificates_name_their_node_and_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_dev_certs(dir.path(), 3).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, dev_file_names(3));
        let pem = std::fs::read_to_string(dir.path().join("node-2.pem")).unwrap();
        let der = pem_body(&pem);
        let sans = names_in(&der);
        assert!(sans.contains(&"node-2".to_string()), "{sans:?}");
        assert!(sans.contains(&"127.0.0.1".to_string()), "{sans:?}");
        assert!(names_member(&sans, 2));
        assert!(!names_member(&sans, 3), "another member");
        let client = std::fs::read_to_string(dir.path().join("client.pem")).unwrap();
        let client = names_in(&pem_body(&client));
        assert!(
            !names_member(&client, 1),
            "a client is no member: {client:?}"
        );
        let key = dir.path().join("node-2.key");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            Tls::load(
                &dir.path().join("node-1.pem"),
                &dir.path().join("node-1.key"),
                &dir.path().join("ca.pem")
            )
            .is_ok()
        );
        let e = Tls::load(
            &dir.path().join("node-1.key"),
            &dir.path().join("node-1.pem"),
            &dir.path().join("ca.pem"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("--tls-cert: not a PEM file"), "{e}");
    }

    fn pem_body(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("127.0.0.1:7070"), "127.0.0.1");
        assert_eq!(host_of("[::1]:7070"), "::1");
        assert_eq!(host_of("db.example:7070"), "db.example");
    }
}
