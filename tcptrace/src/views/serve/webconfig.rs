//! `tcptrace serve --web-config FILE`: the web configuration file of the Prometheus exporter
//! toolkit (the format node_exporter and others take), so that the same file and the same
//! Prometheus `scrape_configs` work for tcptrace: TLS (`tls_server_config`, optionally with
//! client certificates) and HTTP basic authentication (`basic_auth_users`, bcrypt hashes).
//!
//! As in the toolkit, unknown fields are errors, and relative file names are relative to the
//! directory of the web config file. Secrets (passwords, keys) are never logged.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use rustls::{
    RootCertStore, ServerConfig, SupportedProtocolVersion,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{WebPkiClientVerifier, danger::ClientCertVerifier},
};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;

/// The client authentication policies of the toolkit (Go's `tls.ClientAuthType` names).
const CLIENT_AUTH_TYPES: &str = "NoClientCert, RequestClientCert, RequireAnyClientCert, \
                                 VerifyClientCertIfGiven, RequireAndVerifyClientCert";

/// The web config file is bad: which file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("web config {}: {problem}", path.display())]
pub struct WebConfigError {
    /// The file given to --web-config.
    pub path: PathBuf,
    /// What is wrong.
    pub problem: Problem,
}

/// What can be wrong with a web config file.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The file cannot be read.
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    /// Not YAML, or not the toolkit's fields.
    #[error("{0}")]
    Yaml(#[from] serde_norway::Error),
    /// A file it names cannot be read.
    #[error("{field} {}: cannot read it: {source}", file.display())]
    File {
        /// The field that names it.
        field: &'static str,
        /// The file, as resolved.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file it names holds no usable PEM item.
    #[error("{field} {}: {what}", file.display())]
    Pem {
        /// The field that names it.
        field: &'static str,
        /// The file, as resolved.
        file: PathBuf,
        /// What is wrong with its content.
        what: String,
    },
    /// A value out of the allowed set, or fields that do not go together.
    #[error("{0}")]
    Invalid(String),
    /// rustls refused the certificate and key (e.g. a key that is not the certificate's).
    #[error("tls_server_config: cert_file and key_file: {0}")]
    Tls(#[from] rustls::Error),
}

/// A loaded web config: TLS when it has `tls_server_config`, basic auth when it has users;
/// the default is plain HTTP without authentication.
#[derive(Default)]
pub struct WebConfig {
    /// The TLS server configuration; None: plain HTTP.
    pub tls: Option<Arc<ServerConfig>>,
    /// The users who may scrape; empty: no authentication.
    pub users: Users,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the hashes or the key.
        f.debug_struct("WebConfig")
            .field("tls", &self.tls.is_some())
            .field("users", &self.users.hashes.len())
            .finish()
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileFields {
    tls_server_config: Option<TlsFields>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFields {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_ca_file: Option<PathBuf>,
    client_auth_type: Option<String>,
    min_version: Option<String>,
    max_version: Option<String>,
}

impl WebConfig {
    /// Reads and checks `path`, and loads the files it names.
    pub fn load(path: &Path) -> Result<WebConfig, WebConfigError> {
        let fail = |problem| WebConfigError {
            path: path.to_path_buf(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(Problem::Read(e)))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        WebConfig::parse(&text, dir).map_err(fail)
    }

    /// Checks the text of a web config; the files it names are relative to `dir`.
    pub fn parse(text: &str, dir: &Path) -> Result<WebConfig, Problem> {
        // An empty file (or one of comments only) is allowed, as in the toolkit: plain HTTP.
        let fields: FileFields =
            serde_norway::from_str::<Option<FileFields>>(text)?.unwrap_or_default();
        let users = Users::new(fields.basic_auth_users)?;
        let tls = match fields.tls_server_config {
            Some(t) => Some(Arc::new(t.server_config(dir)?)),
            None => None,
        };
        Ok(WebConfig { tls, users })
    }
}

impl TlsFields {
    fn server_config(self, dir: &Path) -> Result<ServerConfig, Problem> {
        let (Some(cert_file), Some(key_file)) = (&self.cert_file, &self.key_file) else {
            return Err(Problem::Invalid(
                "tls_server_config needs both cert_file and key_file".into(),
            ));
        };
        let certs = read_certs("cert_file", &dir.join(cert_file))?;
        let key = read_key(&dir.join(key_file))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions = self.versions()?;
        let verifier = self.client_verifier(dir, &provider)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)?;
        // Only HTTP/1.1 is served: a client that offers h2 settles on it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }

    /// The TLS versions from min_version to max_version (TLS 1.2 and 1.3 by default).
    fn versions(&self) -> Result<Vec<&'static SupportedProtocolVersion>, Problem> {
        let rank = |field: &str, v: &Option<String>, default: u8| match v.as_deref() {
            None => Ok(default),
            Some("TLS12") => Ok(2),
            Some("TLS13") => Ok(3),
            Some(other) => Err(Problem::Invalid(format!(
                "tls_server_config: {field} {other:?} is not supported: TLS12 or TLS13 \
                 (TLS10 and TLS11 are obsolete and rustls does not speak them)"
            ))),
        };
        let min = rank("min_version", &self.min_version, 2)?;
        let max = rank("max_version", &self.max_version, 3)?;
        if min > max {
            return Err(Problem::Invalid(
                "tls_server_config: min_version is above max_version".into(),
            ));
        }
        let all = [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)];
        Ok(all
            .into_iter()
            .filter(|(r, _)| (min..=max).contains(r))
            .map(|(_, v)| v)
            .collect())
    }

    /// Who may connect: everyone, or clients with a certificate signed by client_ca_file.
    fn client_verifier(
        &self,
        dir: &Path,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Arc<dyn ClientCertVerifier>, Problem> {
        let ca = self.client_ca_file.as_ref().map(|f| dir.join(f));
        // As in the toolkit: a CA without a policy means verifying every client.
        let policy = match (&self.client_auth_type, &ca) {
            (Some(p), _) => p.as_str(),
            (None, Some(_)) => "RequireAndVerifyClientCert",
            (None, None) => "NoClientCert",
        };
        let verify_if_given = match policy {
            "NoClientCert" if ca.is_none() => return Ok(WebPkiClientVerifier::no_client_auth()),
            "NoClientCert" => {
                return Err(Problem::Invalid(
                    "tls_server_config: client_ca_file is set but client_auth_type is \
                     NoClientCert, which would ignore it: use RequireAndVerifyClientCert or \
                     VerifyClientCertIfGiven, or remove client_ca_file"
                        .into(),
                ));
            }
            "VerifyClientCertIfGiven" => true,
            "RequireAndVerifyClientCert" => false,
            "RequestClientCert" | "RequireAnyClientCert" => {
                return Err(Problem::Invalid(format!(
                    "tls_server_config: client_auth_type {policy} (certificates accepted \
                     unverified) is not supported by tcptrace: use RequireAndVerifyClientCert \
                     or VerifyClientCertIfGiven with client_ca_file"
                )));
            }
            other => {
                return Err(Problem::Invalid(format!(
                    "tls_server_config: client_auth_type {other:?} is unknown: one of \
                     {CLIENT_AUTH_TYPES}"
                )));
            }
        };
        let Some(ca) = ca else {
            return Err(Problem::Invalid(format!(
                "tls_server_config: client_auth_type {policy} needs client_ca_file (the CA \
                 that signs the clients' certificates)"
            )));
        };
        let mut roots = RootCertStore::empty();
        for cert in read_certs("client_ca_file", &ca)? {
            roots.add(cert).map_err(|e| Problem::Pem {
                field: "client_ca_file",
                file: ca.clone(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let builder = WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone());
        let builder = if verify_if_given {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        builder.build().map_err(|e| Problem::Pem {
            field: "client_ca_file",
            file: ca,
            what: e.to_string(),
        })
    }
}

fn read_file(field: &'static str, file: &Path) -> Result<Vec<u8>, Problem> {
    std::fs::read(file).map_err(|source| Problem::File {
        field,
        file: file.to_path_buf(),
        source,
    })
}

/// The PEM certificates in `file` (at least one).
fn read_certs(field: &'static str, file: &Path) -> Result<Vec<CertificateDer<'static>>, Problem> {
    let pem = read_file(field, file)?;
    let bad = |what: String| Problem::Pem {
        field,
        file: file.to_path_buf(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate (BEGIN CERTIFICATE) in it".into()));
    }
    Ok(certs)
}

/// The PEM private key in `file` (PKCS#8, PKCS#1 or SEC1).
fn read_key(file: &Path) -> Result<PrivateKeyDer<'static>, Problem> {
    let pem = read_file("key_file", file)?;
    // The error names the kind of problem only: never the key's bytes.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Problem::Pem {
        field: "key_file",
        file: file.to_path_buf(),
        what: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no PEM private key (BEGIN PRIVATE KEY, RSA or EC PRIVATE KEY) in it".into()
            }
            other => format!("not a readable PEM private key: {other}"),
        },
    })
}

/// The users of `basic_auth_users`, with their bcrypt hashes; a password that was checked
/// once is remembered (as a SHA-256 digest) so that each scrape does not pay for bcrypt.
#[derive(Default)]
pub struct Users {
    hashes: BTreeMap<String, String>,
    verified: Mutex<HashMap<String, [u8; DIGEST_BYTES]>>,
}

const DIGEST_BYTES: usize = 32;

/// The result of checking a request's credentials.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allowed,
    /// 401.
    Denied,
    /// Decided by bcrypt, which takes tens of milliseconds: [`Users::verify`] away from the
    /// thread that serves connections.
    NeedsBcrypt,
}

impl Users {
    fn new(hashes: BTreeMap<String, String>) -> Result<Users, Problem> {
        for (user, hash) in &hashes {
            if user.contains(':') {
                return Err(Problem::Invalid(format!(
                    "basic_auth_users: user {user:?} contains ':', which basic auth cannot carry"
                )));
            }
            hash.parse::<bcrypt::HashParts>().map_err(|e| {
                Problem::Invalid(format!(
                    "basic_auth_users: the hash of {user:?} is not a bcrypt hash ($2y$...): {e} \
                     (make one with `htpasswd -nBC 10 \"\" | tr -d ':\\n'`)"
                ))
            })?;
        }
        Ok(Users {
            hashes,
            verified: Mutex::default(),
        })
    }

    /// True when no authentication is asked for.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// What to do with a request's Authorization header, without bcrypt.
    pub fn check(&self, authorization: Option<&[u8]>) -> Verdict {
        if self.is_empty() {
            return Verdict::Allowed;
        }
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return Verdict::Denied;
        };
        let remembered = self
            .verified
            .lock()
            .ok()
            .and_then(|m| m.get(&user).copied());
        match remembered {
            Some(d) if bool::from(d.ct_eq(&digest(&user, &password))) => Verdict::Allowed,
            _ => Verdict::NeedsBcrypt,
        }
    }

    /// Checks the credentials of an Authorization header with bcrypt (slow, by design).
    pub fn verify(&self, authorization: &[u8]) -> bool {
        let Some((user, password)) = basic_credentials(authorization) else {
            return false;
        };
        let Some(hash) = self.hashes.get(&user) else {
            // Unknown users cost as much as known ones (a known user's hash, the result
            // thrown away): no telling which exist.
            if let Some(any) = self.hashes.values().next() {
                let _ = bcrypt::verify(&password, any);
            }
            return false;
        };
        let ok = bcrypt::verify(&password, hash).unwrap_or(false);
        if ok && let Ok(mut m) = self.verified.lock() {
            m.insert(user.clone(), digest(&user, &password));
        }
        ok
    }
}

fn digest(user: &str, password: &str) -> [u8; DIGEST_BYTES] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(user.as_bytes());
    ctx.update(b"\0");
    ctx.update(password.as_bytes());
    let mut out = [0; DIGEST_BYTES];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The user and password of a `Basic` Authorization header.
fn basic_credentials(header: &[u8]) -> Option<(String, String)> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(text: &str) -> String {
        WebConfig::parse(text, Path::new("/nonexistent"))
            .unwrap_err()
            .to_string()
    }

    fn header(user: &str, password: &str) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {b64}").into_bytes()
    }

    #[test]
    fn empty_files_mean_plain_http_without_auth() {
        for text in ["", "# nothing\n", "{}"] {
            let c = WebConfig::parse(text, Path::new(".")).unwrap();
            assert!(c.tls.is_none() && c.users.is_empty(), "{text:?}");
        }
    }

    #[test]
    fn bad_files_name_the_problem() {
        assert!(problem("tls_server_config: [").contains("line 1"));
        let unknown = problem("tls_server_config:\n  cert_file: a\n  key_file: b\n  certfile: c\n");
        assert!(unknown.contains("unknown field `certfile`"), "{unknown}");
        assert!(problem("basic_auth: {}\n").contains("unknown field `basic_auth`"));
        let missing = problem("tls_server_config:\n  cert_file: server.crt\n  key_file: k\n");
        assert!(
            missing.contains("cert_file /nonexistent/server.crt: cannot read it"),
            "{missing}"
        );
        assert!(problem("tls_server_config:\n  cert_file: a\n").contains("key_file"));
        let hash = problem("basic_auth_users:\n  alice: secret\n");
        assert!(hash.contains("\"alice\" is not a bcrypt hash"), "{hash}");
        assert!(
            !hash.contains("secret"),
            "the value is not repeated: {hash}"
        );
    }

    #[test]
    fn client_auth_types_are_checked() {
        let tls = |extra: &str| {
            TlsFields {
                cert_file: None,
                key_file: None,
                client_ca_file: None,
                client_auth_type: Some(extra.into()),
                min_version: None,
                max_version: None,
            }
            .client_verifier(
                Path::new("/nonexistent"),
                &Arc::new(rustls::crypto::ring::default_provider()),
            )
            .err()
            .map(|e| e.to_string())
        };
        assert_eq!(tls("NoClientCert"), None);
        assert!(
            tls("Sometimes")
                .unwrap()
                .contains("unknown: one of NoClientCert")
        );
        assert!(
            tls("RequireAnyClientCert")
                .unwrap()
                .contains("not supported")
        );
        assert!(
            tls("RequireAndVerifyClientCert")
                .unwrap()
                .contains("needs client_ca_file")
        );
    }

    #[test]
    fn versions_are_checked() {
        let v = |min: Option<&str>, max: Option<&str>| TlsFields {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            client_auth_type: None,
            min_version: min.map(Into::into),
            max_version: max.map(Into::into),
        };
        assert_eq!(v(None, None).versions().unwrap().len(), 2);
        assert_eq!(v(Some("TLS13"), None).versions().unwrap().len(), 1);
        assert!(
            v(Some("TLS11"), None)
                .versions()
                .unwrap_err()
                .to_string()
                .contains("min_version \"TLS11\" is not supported")
        );
        assert!(v(Some("TLS13"), Some("TLS12")).versions().is_err());
    }

    #[test]
    fn basic_auth_asks_bcrypt_once_per_password() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let users = Users::new(BTreeMap::from([("prom".to_string(), hash)])).unwrap();
        assert_eq!(users.check(None), Verdict::Denied);
        assert_eq!(users.check(Some(b"Bearer x")), Verdict::Denied);
        let good = header("prom", "s3cret");
        assert_eq!(users.check(Some(&good)), Verdict::NeedsBcrypt);
        assert!(!users.verify(&header("prom", "wrong")));
        assert!(!users.verify(&header("nobody", "s3cret")));
        assert!(users.verify(&good));
        assert_eq!(users.check(Some(&good)), Verdict::Allowed);
        let wrong = header("prom", "s3creT");
        assert_eq!(users.check(Some(&wrong)), Verdict::NeedsBcrypt);
        assert!(!users.verify(&wrong));
        assert_eq!(Users::default().check(None), Verdict::Allowed);
    }
}
