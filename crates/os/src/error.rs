//! The error of pf-os: a system call or file operation that failed, with what and where.

use std::path::PathBuf;

/// What failed, on which path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("cannot {op} {}", path.display())]
    Io {
        /// What was being done (`create a scratch directory in`, `lock`, …).
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The underlying I/O error.
    pub fn io_error(&self) -> &std::io::Error {
        match self {
            Self::Io { source, .. } => source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
