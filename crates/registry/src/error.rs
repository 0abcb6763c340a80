//! The error type of pushes and pulls.

use pf_core::Digest256;

/// `Result` with pf-registry's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a caller may act on, whatever the details of an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The user wrote something pf cannot use (a reference, an option).
    Usage,
    /// The registry could not be reached or stopped answering.
    Unreachable,
    /// The registry wants other credentials, or refuses them.
    Auth,
    /// What was asked for is not in the registry.
    NotFound,
    /// Bytes did not match their digest, or the snapshot is not whole.
    Integrity,
    /// Anything else.
    Other,
}

/// Everything that can go wrong in a push or a pull.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A reference that is not `REGISTRY/REPOSITORY:TAG`.
    #[error("invalid reference {reference:?}: {reason}")]
    InvalidReference {
        reference: String,
        reason: &'static str,
    },
    /// The first request to the registry failed at the transport level.
    #[error(
        "cannot reach the registry at {url} (check the address, and that the registry is running)"
    )]
    Unreachable {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// The registry's TLS certificate does not chain to a root the system trusts.
    #[error(
        "the TLS certificate of {registry} is not trusted ({reason}): if the registry is yours, add the certificate of the authority that signed it to the system's roots (update-ca-certificates, or SSL_CERT_FILE=CA.pem for one command)"
    )]
    UntrustedCertificate { registry: String, reason: String },
    /// The registry answered https with something that is not TLS: a plain http server.
    #[error(
        "{registry} does not speak https (its answer is not TLS): pf speaks plain http only to loopback registries; for a plain http registry on a network you trust, add --insecure"
    )]
    NotTls { registry: String },
    /// A request after the first one failed at the transport level (the registry went away).
    #[error(
        "{method} {url} failed (run the same command again once the registry answers: a push goes on from where it stopped, a pull starts over)"
    )]
    Transport {
        method: &'static str,
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// Reading a blob's bytes from the registry failed midway.
    #[error(
        "reading blob {digest} from {url} failed (run the same command again once the registry answers: the pull starts over, since a failed pull keeps nothing)"
    )]
    BodyRead {
        digest: Digest256,
        url: String,
        #[source]
        source: std::io::Error,
    },
    /// A blob's connection moved no byte, either way, for the idle timeout.
    #[error(
        "{registry} moved no byte for {} s while {action} blob {digest} (check the network and that the registry is alive, then run the same command again: a push goes on from where it stopped, a pull starts over)",
        .idle.as_secs_f64()
    )]
    Stalled {
        registry: String,
        action: &'static str,
        digest: Digest256,
        idle: std::time::Duration,
        #[source]
        source: std::io::Error,
    },
    /// `GET /v2/` did not answer as a registry does.
    #[error(
        "{url} is not an OCI registry (GET /v2/ answered {status}{}); check the registry address",
        .detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
    )]
    NotARegistry {
        url: String,
        status: u16,
        detail: Option<String>,
    },
    /// The registry asks for credentials and none were found.
    #[error(
        "{registry} needs credentials for {repository}: run `docker login {registry}`, or put `auths.\"{registry}\".auth` (base64 of user:password) into {}",
        .config.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "~/.docker/config.json".into())
    )]
    CredentialsNeeded {
        registry: String,
        repository: String,
        config: Option<std::path::PathBuf>,
    },
    /// The registry refused the credentials pf sent.
    #[error(
        "{registry} refused the credentials for user {user:?} from {}: check the user and password (`docker login {registry}` writes them again)",
        .config.display()
    )]
    CredentialsRefused {
        registry: String,
        user: String,
        config: std::path::PathBuf,
    },
    /// The registry accepted who we are but not what we asked (HTTP 403, or DENIED).
    #[error(
        "{registry} denies {action} on {repository}{}; check that this user may {action} there",
        .detail.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
    )]
    Denied {
        registry: String,
        repository: String,
        action: &'static str,
        detail: Option<String>,
    },
    /// The token endpoint of the bearer flow failed.
    #[error(
        "getting a token from {realm} for {registry} failed (HTTP {status}{}); check the credentials for {registry}",
        .detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
    )]
    Token {
        realm: String,
        registry: String,
        status: u16,
        detail: Option<String>,
    },
    /// A `WWW-Authenticate` challenge pf does not understand.
    #[error("{registry} asks for authentication pf does not speak: {challenge:?}")]
    UnknownChallenge { registry: String, challenge: String },
    /// An https registry sent its token requests to a plain-http realm: credentials would
    /// travel in clear text.
    #[error(
        "{registry} sends token requests to {realm}, over plain http; refused, it would carry \
         your credentials in clear text (ask the registry's operator for an https realm)"
    )]
    InsecureRealm { registry: String, realm: String },
    /// The repository does not exist in the registry.
    #[error(
        "{registry} has no repository {repository}; check the name (pf push creates it on its first push)"
    )]
    RepositoryNotFound {
        registry: String,
        repository: String,
    },
    /// The repository exists but holds no such tag.
    #[error("{registry}/{repository} has no tag {tag:?}{}; check the tag", tags_hint(.tags))]
    TagNotFound {
        registry: String,
        repository: String,
        tag: String,
        tags: Vec<String>,
    },
    /// The manifest is not a pf snapshot.
    #[error(
        "{reference} is not a pf snapshot (its {what} is {found:?}, pf writes {expected:?}); pull it with a tool for that kind of image"
    )]
    NotASnapshot {
        reference: String,
        what: &'static str,
        found: String,
        expected: &'static str,
    },
    /// A manifest pf cannot parse.
    #[error("the manifest of {reference} is not valid: {reason}")]
    BadManifest { reference: String, reason: String },
    /// A pulled blob whose bytes do not hash to its digest.
    #[error(
        "blob {digest} from {reference} is corrupt: its bytes hash to {actual}; nothing of this pull was kept (the registry's copy is damaged: delete that blob from the registry's storage, then push the snapshot again)"
    )]
    Tampered {
        reference: String,
        digest: Digest256,
        actual: Digest256,
    },
    /// A pulled manifest does not carry every blob its root reaches.
    #[error(
        "{reference} is incomplete: blob {missing} (reached from the snapshot) is not among its layers; nothing of this pull was kept"
    )]
    Incomplete {
        reference: String,
        missing: Digest256,
    },
    /// The local snapshot lacks a blob it refers to.
    #[error(
        "snapshot {root} is not whole in the store: blob {missing} is missing (`pf store verify` tells more)"
    )]
    SnapshotNotWhole { root: Digest256, missing: Digest256 },
    /// The root blob is not a JSON object with a `kind`.
    #[error("blob {digest} is not a snapshot: {reason}")]
    NotSnapshotBlob {
        digest: Digest256,
        reason: &'static str,
    },
    /// The registry answered with a status pf did not expect.
    #[error(
        "{method} {url} answered HTTP {status}{}",
        .detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default()
    )]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        detail: Option<String>,
    },
    /// The docker config file exists but cannot be read or parsed.
    #[error("reading credentials from {}: {reason}; fix or move the file", .path.display())]
    DockerConfig {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The credential helper a docker config names could not give a registry's credentials.
    #[error(
        "the credential helper {program} (named in the docker config for {registry}) did not give credentials: {reason} (install it on PATH, log in again with `docker login`, or remove it from the config)"
    )]
    CredentialHelper {
        program: String,
        registry: String,
        reason: String,
    },
    /// Reading a blob out of the local store failed while it was being uploaded.
    #[error("reading blob {digest} from the store")]
    ReadLocal {
        digest: Digest256,
        #[source]
        source: std::io::Error,
    },
    /// The file that keeps an upload in progress (for a rerun to continue it) cannot be written.
    #[error("keeping the upload session in {}", .path.display())]
    UploadSession {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pull was cancelled ([`crate::PullOptions::cancel`]); what it had stored is removed.
    #[error("the pull was cancelled; nothing of it was kept")]
    Cancelled { reference: String },
    /// The push was cancelled ([`crate::PushOptions::cancel`]): no manifest was written; the
    /// blobs the registry took stay there.
    #[error(
        "the push was cancelled: {reference} was not written; the blobs the registry took stay there, and the same push run again skips them"
    )]
    PushCancelled { reference: String },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] pf_core::Error),
}

fn tags_hint(tags: &[String]) -> String {
    if tags.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = tags.iter().take(10).map(String::as_str).collect();
    let more = if tags.len() > 10 { ", …" } else { "" };
    format!(" (it has {}{more})", shown.join(", "))
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidReference { .. } => ErrorKind::Usage,
            Self::Unreachable { .. }
            | Self::UntrustedCertificate { .. }
            | Self::NotTls { .. }
            | Self::Transport { .. }
            | Self::BodyRead { .. }
            | Self::Stalled { .. } => ErrorKind::Unreachable,
            Self::CredentialsNeeded { .. }
            | Self::CredentialHelper { .. }
            | Self::CredentialsRefused { .. }
            | Self::Denied { .. }
            | Self::Token { .. }
            | Self::UnknownChallenge { .. }
            | Self::InsecureRealm { .. } => ErrorKind::Auth,
            Self::RepositoryNotFound { .. } | Self::TagNotFound { .. } => ErrorKind::NotFound,
            Self::Tampered { .. } | Self::Incomplete { .. } | Self::SnapshotNotWhole { .. } => {
                ErrorKind::Integrity
            }
            _ => ErrorKind::Other,
        }
    }
}
