//! The store's error type.

use std::path::PathBuf;

use crate::digest::{Digest256, ParseDigestError};

/// `Result` with the store's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a blob store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No blob with this digest is in the store.
    #[error("blob {digest} is not in the store")]
    NotFound { digest: Digest256 },
    /// The bytes read back do not hash to the digest they are stored under.
    #[error("blob {digest} is corrupt: its bytes hash to {actual}{}", path_suffix(.path))]
    Integrity {
        digest: Digest256,
        actual: Digest256,
        path: Option<PathBuf>,
    },
    /// The stored file cannot be decoded (bad zstd frame, truncated file).
    #[error("blob {digest} is corrupt: cannot decode {}", .path.display())]
    Decode {
        digest: Digest256,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file-system operation failed.
    #[error("{op} {}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Reading the caller's input failed (in a streaming put).
    #[error("reading the input to store")]
    Input {
        #[source]
        source: std::io::Error,
    },
    /// A string that should be a digest is not one.
    #[error(transparent)]
    InvalidDigest(#[from] ParseDigestError),
    /// A name (ref) is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// No name (ref) of this spelling exists.
    #[error("no name {name:?} in the store")]
    NameNotFound { name: String },
    /// A ref file holds something that is not a digest.
    #[error("name {name:?} in {} does not hold a digest", .path.display())]
    CorruptName {
        name: String,
        path: PathBuf,
        #[source]
        source: ParseDigestError,
    },
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" (file {})", p.display()),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
