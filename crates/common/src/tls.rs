//! TLS for every connection to the hub (rustls with the `ring` provider): the hub's certificate (given,
//! or self-signed once into the data dir), and how clients trust it.
//!
//! Clients trust a hub in one of two ways, like ssh and like a browser:
//! - **a pin**: the SHA-256 fingerprint of the hub's certificate, recorded at `register` on first use
//!   (trust-on-first-use, as ssh's `known_hosts`) or given with `--pin`. A different certificate is
//!   refused, whatever its name or issuer. The handshake signature is still verified against the pinned
//!   certificate's key, so a copy of the certificate alone does not pass.
//! - **a CA** (`--ca FILE`): the usual WebPKI checks against that CA's certificates, hostname included.
//!
//! Plain `http://` URLs need neither.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

/// What can go wrong setting TLS up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "bad certificate fingerprint `{0}`: expected sha256:<64 hex digits> (as `cla-hub serve` logs it)"
    )]
    BadPin(String),
    #[error("cannot use {path} as a CA file: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("cannot use {path} as the hub's certificate: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot use {path} as the hub's private key: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("--cert and --key go together: pass both, or neither for a self-signed certificate")]
    HalfIdentity,
    #[error("cannot make a self-signed certificate: {0}")]
    Generate(String),
    #[error("cannot write {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error(
        "{url} uses TLS but no certificate is trusted for it: register again (the fingerprint is recorded), or pass --pin sha256:... (logged by `cla-hub serve`) or --ca FILE"
    )]
    Untrusted { url: String },
    #[error("TLS setup failed: {0}")]
    Setup(String),
}

/// The SHA-256 of a DER certificate: what a pin compares.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }

    /// Parses `sha256:<hex>`, also with upper case, `:` between bytes (as `openssl x509 -fingerprint
    /// -sha256` prints it) or no prefix.
    pub fn parse(text: &str) -> Result<Fingerprint, TlsError> {
        let t = text.trim();
        let t = t
            .strip_prefix("sha256:")
            .or_else(|| t.strip_prefix("SHA256:"))
            .or_else(|| t.strip_prefix("sha256 Fingerprint="))
            .or_else(|| t.strip_prefix("SHA256 Fingerprint="))
            .unwrap_or(t);
        let hex_digits: String = t.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&hex_digits).map_err(|_| TlsError::BadPin(text.to_owned()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| TlsError::BadPin(text.to_owned()))?;
        Ok(Fingerprint(arr))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = TlsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Fingerprint::parse(s)
    }
}

/// How a client trusts the hub's certificate on `https://`/`wss://` URLs.
#[derive(Clone, Debug, Default)]
pub enum Trust {
    /// Nothing configured: plain `http://` works; `https://` is refused with [`TlsError::Untrusted`].
    #[default]
    Unset,
    /// Exactly this certificate.
    Pin(Fingerprint),
    /// Certificates issued by the CA(s) in this PEM file, for the URL's host name.
    Ca(PathBuf),
    /// Any certificate, recording the one seen (trust-on-first-use; only `register` uses it).
    FirstUse(Seen),
}

/// The certificate a [`Trust::FirstUse`] connection saw.
#[derive(Clone, Debug, Default)]
pub struct Seen(Arc<Mutex<Option<Fingerprint>>>);

impl Seen {
    /// The fingerprint of the last certificate seen, if a TLS handshake got that far.
    pub fn get(&self) -> Option<Fingerprint> {
        *self.0.lock().expect("not poisoned")
    }
}

impl Trust {
    /// From `--pin`/`--ca` style values; a pin wins if both are given.
    pub fn from_options(pin: Option<&str>, ca: Option<&Path>) -> Result<Trust, TlsError> {
        if let Some(pin) = pin.filter(|p| !p.trim().is_empty()) {
            return Ok(Trust::Pin(Fingerprint::parse(pin)?));
        }
        Ok(ca.map(|p| Trust::Ca(p.to_path_buf())).unwrap_or_default())
    }

    /// Trust on first use, and the handle that tells which certificate was seen.
    pub fn first_use() -> (Trust, Seen) {
        let seen = Seen::default();
        (Trust::FirstUse(seen.clone()), seen)
    }

    /// True when nothing is configured.
    pub fn is_unset(&self) -> bool {
        matches!(self, Trust::Unset)
    }

    /// The rustls client config for a TLS connection to `url`.
    pub fn client_config(&self, url: &str) -> Result<Arc<ClientConfig>, TlsError> {
        self.client_config_for(url, None)
    }

    /// The rustls client config for a TLS connection to `url`, presenting `identity` if the hub asks for
    /// a client certificate.
    pub fn client_config_for(
        &self,
        url: &str,
        identity: Option<&ClientIdentity>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let provider = provider();
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
        let with_identity =
            |b: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>| match identity {
                None => Ok(b.with_no_client_auth()),
                Some(id) => b
                    .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                    .map_err(|e| {
                        TlsError::Setup(format!("the client certificate does not fit its key: {e}"))
                    }),
            };
        let config =
            match self {
                Trust::Unset => return Err(TlsError::Untrusted { url: url.to_owned() }),
                Trust::Pin(want) => with_identity(builder.dangerous().with_custom_certificate_verifier(
                    Arc::new(PinVerifier::new(Some(*want), Seen::default())),
                ))?,
                Trust::FirstUse(seen) => with_identity(
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(PinVerifier::new(None, seen.clone()))),
                )?,
                Trust::Ca(path) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for cert in read_certs(path).map_err(|reason| TlsError::Ca {
                        path: path.clone(),
                        reason,
                    })? {
                        roots.add(cert).map_err(|e| TlsError::Ca {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                    }
                    with_identity(builder.with_root_certificates(roots))?
                }
            };
        Ok(Arc::new(config))
    }
}

/// The one crypto provider used everywhere (ring: no C toolchain beyond a C compiler, no cmake).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server name to ask for: the URL's host (an IP address or a DNS name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|e| TlsError::Setup(format!("bad host name `{host}`: {e}")))
}

/// What a failed TLS handshake means, in one line: a refused certificate says why (a pin mismatch names
/// both fingerprints and the fix); anything else gives rustls's own reason.
pub fn handshake_failure(e: &std::io::Error) -> String {
    match find_rustls(e) {
        Some(r) => describe(r),
        None => format!("TLS handshake failed: {e}"),
    }
}

/// The rustls error somewhere inside `e`, through I/O errors wrapping I/O errors (whose `source`
/// skips the error they wrap) and ordinary source chains.
pub fn find_rustls<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        next = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// One line for a rustls error (see [`handshake_failure`]).
pub fn describe(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            format!("TLS: refused the hub's certificate: {}", other.0)
        }
        rustls::Error::InvalidCertificate(reason) => {
            format!("TLS: refused the hub's certificate: {reason:?}; check --ca and the URL's host name")
        }
        r => format!("TLS handshake failed: {r}"),
    }
}

/// A pinned certificate did not match.
#[derive(Debug)]
struct PinMismatch {
    want: Fingerprint,
    got: Fingerprint,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the hub presented certificate {} but {} is pinned; if the hub's certificate was replaced on purpose, update tls.pin (or the registration's pin) in the config, or register again",
            self.got, self.want
        )
    }
}

impl std::error::Error for PinMismatch {}

/// Accepts exactly the pinned certificate (or, with no pin, any, recording it), and checks that the
/// server holds its key (the handshake signature).
#[derive(Debug)]
struct PinVerifier {
    want: Option<Fingerprint>,
    seen: Seen,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinVerifier {
    fn new(want: Option<Fingerprint>, seen: Seen) -> PinVerifier {
        PinVerifier {
            want,
            seen,
            algorithms: provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity.as_ref());
        *self.seen.0.lock().expect("not poisoned") = Some(got);
        match self.want {
            Some(want) if want != got => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch { want, got }))),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The hub's TLS identity.
pub struct ServerIdentity {
    pub config: Arc<ServerConfig>,
    /// The fingerprint of the leaf certificate, which workers pin.
    pub fingerprint: Fingerprint,
    /// Where the certificate was read from.
    pub cert_path: PathBuf,
    /// True when the certificate was made just now.
    pub generated: bool,
}

/// File names of the self-signed identity in `DATA_DIR/tls/`.
pub const SELF_SIGNED_CERT: &str = "hub.crt";
pub const SELF_SIGNED_KEY: &str = "hub.key";

/// Loads `cert`/`key` (PEM), or, with neither, the self-signed identity in `data_dir/tls/`, made on first
/// use for `names` (host names and IP addresses) and kept (the key 0600) so that pins stay valid.
pub fn server_identity(
    cert: Option<&Path>,
    key: Option<&Path>,
    data_dir: &Path,
    names: &[String],
    client_ca: Option<&ClientCa>,
) -> Result<ServerIdentity, TlsError> {
    let (cert_path, key_path, generated) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf(), false),
        (None, None) => {
            let dir = data_dir.join("tls");
            let (c, k) = (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY));
            let generated = !(c.exists() && k.exists());
            if generated {
                self_signed(&c, &k, names)?;
            }
            (c, k, generated)
        }
        _ => return Err(TlsError::HalfIdentity),
    };
    let chain = read_certs(&cert_path).map_err(|reason| TlsError::Cert {
        path: cert_path.clone(),
        reason,
    })?;
    let key_pem = read_pem(&key_path).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        reason: format!("no PEM private key in it ({e})"),
    })?;
    let fingerprint = Fingerprint::of(chain[0].as_ref());
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    // Client certificates are asked for, and checked against the client CA when given, but not required
    // at the TLS level: a worker registering for the first time has none yet. The hub decides per
    // endpoint (`--mtls`).
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Setup(e.to_string()))?,
        ),
    };
    let config = builder.with_single_cert(chain, key).map_err(|e| TlsError::Key {
        path: key_path.clone(),
        reason: format!("it does not fit the certificate ({e})"),
    })?;
    Ok(ServerIdentity {
        config: Arc::new(config),
        fingerprint,
        cert_path,
        generated,
    })
}

/// Makes a self-signed certificate for `names` and writes it and its key (0600) atomically.
fn self_signed(cert_path: &Path, key_path: &Path, names: &[String]) -> Result<(), TlsError> {
    let made =
        rcgen::generate_simple_self_signed(names.to_vec()).map_err(|e| TlsError::Generate(e.to_string()))?;
    let write = |path: &Path, text: &str, private: bool| {
        crate::util::write_atomic(path, text.as_bytes(), private).map_err(|e| TlsError::Write {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    };
    // The key first: a certificate without its key would be kept and fail on every start.
    write(key_path, &made.signing_key.serialize_pem(), true)?;
    write(cert_path, &made.cert.pem(), false)
}

/// Largest certificate or key file read (a chain of a few certificates is a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Reads a PEM file, refusing one over [`MAX_PEM_BYTES`] (a wrong path such as `/dev/zero`).
fn read_pem(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(std::io::Error::other(
            "larger than 1 MiB: not a PEM certificate or key file",
        ));
    }
    Ok(bytes)
}

/// [`read_pem`] as text.
fn read_pem_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_pem(path)?).map_err(|_| std::io::Error::other("not text: not a PEM file"))
}

/// The certificates of a PEM file, in order; at least one.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_pem(path).map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not a PEM certificate file ({e})"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(certs)
}

/// A worker's client certificate (issued by the hub at registration) and its private key, presented when
/// the hub asks for one (mTLS).
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientIdentity({})", Fingerprint::of(self.chain[0].as_ref()))
    }
}

impl Clone for ClientIdentity {
    fn clone(&self) -> Self {
        ClientIdentity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl ClientIdentity {
    /// Reads a PEM certificate and its PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<ClientIdentity, TlsError> {
        let chain = read_certs(cert).map_err(|reason| TlsError::Cert {
            path: cert.to_path_buf(),
            reason,
        })?;
        let pem = read_pem(key).map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: format!("no PEM private key in it ({e})"),
        })?;
        Ok(ClientIdentity { chain, key })
    }

    /// The fingerprint of the certificate, as the hub records it.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.chain[0].as_ref())
    }
}

/// A new key pair and a certificate signing request for worker `id`: `(csr_pem, key_pem)`. The key stays
/// on the worker; only the CSR (its public half) goes to the hub.
pub fn new_csr(id: &str) -> Result<(String, String), TlsError> {
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Generate(e.to_string()))?;
    let mut params =
        rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| TlsError::Generate(e.to_string()))?;
    params.distinguished_name.push(rcgen::DnType::CommonName, id);
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((csr, key.serialize_pem()))
}

/// The hub's CA for worker client certificates, made once in `DATA_DIR/tls/` (the key 0600).
pub struct ClientCa {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    cert: CertificateDer<'static>,
}

/// File names of the client CA in `DATA_DIR/tls/`.
pub const CLIENT_CA_CERT: &str = "client-ca.crt";
pub const CLIENT_CA_KEY: &str = "client-ca.key";

impl ClientCa {
    /// Loads the client CA from `data_dir/tls/`, making it on first use.
    pub fn load_or_create(data_dir: &Path) -> Result<ClientCa, TlsError> {
        let dir = data_dir.join("tls");
        let (cert_path, key_path) = (dir.join(CLIENT_CA_CERT), dir.join(CLIENT_CA_KEY));
        let gen_err = |e: rcgen::Error| TlsError::Generate(e.to_string());
        if !(cert_path.exists() && key_path.exists()) {
            let key = rcgen::KeyPair::generate().map_err(gen_err)?;
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            params.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "cla-hub worker client CA");
            let cert = params.self_signed(&key).map_err(gen_err)?;
            let write = |path: &Path, text: &str, private: bool| {
                crate::util::write_atomic(path, text.as_bytes(), private).map_err(|e| TlsError::Write {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                })
            };
            write(&key_path, &key.serialize_pem(), true)?;
            write(&cert_path, &cert.pem(), false)?;
        }
        let cert_pem = read_pem_text(&cert_path).map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        let key_pem = read_pem_text(&key_path).map_err(|e| TlsError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let key = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Key {
            path: key_path.clone(),
            reason: e.to_string(),
        })?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| TlsError::Cert {
            path: cert_path.clone(),
            reason: e.to_string(),
        })?;
        let cert = read_certs(&cert_path)
            .map_err(|reason| TlsError::Cert {
                path: cert_path.clone(),
                reason,
            })?
            .remove(0);
        Ok(ClientCa { issuer, cert })
    }

    /// Issues a client certificate for worker `id` from its CSR (PEM): the CSR gives only the public
    /// key; the subject is the worker id, whatever the CSR asked. Returns the PEM and its fingerprint.
    pub fn sign(&self, csr_pem: &str, id: &str) -> Result<(String, Fingerprint), String> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("bad certificate signing request: {e}"))?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, id);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        // rcgen's default validity (no expiry to speak of): what makes a certificate count is that the
        // hub's record of the worker names its fingerprint, which unregistering or re-registering ends.
        csr.params = params;
        let cert = csr.signed_by(&self.issuer).map_err(|e| e.to_string())?;
        Ok((cert.pem(), Fingerprint::of(cert.der().as_ref())))
    }

    /// The CA certificate, as the roots client certificates must chain to.
    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert.clone())
            .expect("the client CA is a valid certificate");
        roots
    }
}

/// The names a self-signed hub certificate covers: `localhost`, the loopback addresses, this host's
/// name, and the address it listens on when that is a specific one.
pub fn default_names(listen: Option<std::net::IpAddr>) -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()];
    let host = crate::util::hostname();
    if !host.is_empty() && !names.contains(&host) {
        names.push(host);
    }
    if let Some(ip) = listen.filter(|ip| !ip.is_unspecified() && !ip.is_loopback()) {
        names.push(ip.to_string());
    }
    names
}

#[cfg(test)]
mod tests;
