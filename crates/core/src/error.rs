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
    /// Reading a blob failed for a reason the store could not classify further.
    #[error("reading blob {digest}")]
    Read {
        digest: Digest256,
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
    /// Writing a blob's bytes to the caller's output failed (in [`crate::BlobStore::copy_to`]).
    #[error("writing blob {digest} out")]
    Output {
        digest: Digest256,
        #[source]
        source: std::io::Error,
    },
    /// The input of a put yielded a different number of bytes than the caller announced.
    #[error(
        "the input to store yielded {actual} bytes where {expected} were announced (did the file change while it was read?)"
    )]
    InputLength { expected: u64, actual: u64 },
    /// A string that should be a digest is not one.
    #[error(transparent)]
    InvalidDigest(#[from] ParseDigestError),
    /// A name (ref) is not acceptable.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// No name (ref) of this spelling exists.
    #[error("no name {name:?} in the store")]
    NameNotFound { name: String },
    /// A digest prefix (`sha256:` and fewer than 64 hex digits) too short to look up.
    #[error(
        "digest prefix {prefix:?} is too short: give at least {min} hex digits after `sha256:`"
    )]
    PrefixTooShort { prefix: String, min: usize },
    /// No blob in the store has a digest that starts with the prefix; `bare`: it was typed
    /// without `sha256:`, so no name is spelled so either.
    #[error("{}", prefix_not_found(.prefix, *.bare))]
    PrefixNotFound { prefix: String, bare: bool },
    /// More than one blob has a digest that starts with the prefix.
    #[error(
        "{prefix} is the start of {count} digests in the store: {}; give more of the digest",
        describe_candidates(.candidates, *.count, *.digits)
    )]
    AmbiguousPrefix {
        /// The prefix as it was typed.
        prefix: String,
        /// How many blobs match.
        count: usize,
        /// A few of them with the names that point at each, those with names first.
        candidates: Vec<(Digest256, Vec<String>)>,
        /// Hex digits that tell every match from the others (at least 12).
        digits: usize,
    },
    /// No store is at the root a reader asked for: nothing was ever stored there (or the path
    /// is mistyped). Only [`FsBlobStore::open_existing`](crate::FsBlobStore::open_existing)
    /// says so; [`FsBlobStore::open`](crate::FsBlobStore::open) creates the store instead.
    #[error(
        "there is no store at {}: nothing was ever stored there (freezing a goblin, `pf procs capture` or `pf store put` creates it)",
        .root.display()
    )]
    NoStore { root: PathBuf },
    /// The store's path names a directory that holds other things and no store: most likely a
    /// mistyped `--store`. Nothing is read from it, and nothing is written into it.
    #[error(
        "{} is not a pf store: the directory holds {found} but none of a store's blobs/, refs/, index/ or lock; name the store's own directory (--store DIR, $PF_STORE), or a new or empty one",
        .root.display()
    )]
    NotAStore {
        /// The path given.
        root: PathBuf,
        /// A few of what the directory holds, in words (`notes.txt, src and 4 more`).
        found: String,
    },
    /// The store's path is empty.
    #[error("the store's path is empty: name a directory (--store DIR, $PF_STORE)")]
    EmptyStorePath,
    /// The store (its root, `refs/` or `blobs/`) belongs to another user: its owner decides what
    /// its names point at, so it is not used.
    #[error(
        "{} belongs to {} and you are {}: pf uses only a store of your own, since whoever owns it decides what its names point at; use your own store, or run pf as its owner{}",
        .path.display(),
        describe_user(*.owner),
        describe_user(*.me),
        take_over_hint(*.me, .root)
    )]
    StoreNotOwned {
        root: PathBuf,
        path: PathBuf,
        /// The uid that owns `path`.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Group or others may write the store's root, `refs/` or `blobs/`: they could plant names.
    #[error(
        "{} is writable by {} (mode {mode:04o}): another user could plant names that pf would follow; make it private with `chmod go-w {}` (pf creates its directories 0700), then check that every name in `pf store tags` is yours",
        .path.display(),
        writers(*.mode),
        .path.display()
    )]
    StoreWritableByOthers {
        root: PathBuf,
        path: PathBuf,
        mode: u32,
    },
    /// A directory on the way to the store does not let this user through.
    #[error(
        "you, {}, may not use the store at {}: {} (owner {}, mode {mode:04o}) does not let you in; use a store of your own, or run pf as its owner",
        describe_user(*.me),
        .path.display(),
        .blocked.display(),
        describe_user(*.owner)
    )]
    StoreUnreachable {
        path: PathBuf,
        /// The first directory on the way that this user may not search.
        blocked: PathBuf,
        /// The uid that owns `blocked`.
        owner: u32,
        mode: u32,
        /// This process's effective uid.
        me: u32,
        #[source]
        source: std::io::Error,
    },
    /// A writer (a freeze, a capture, a put, a pull, a tag) was about to use a store it cannot
    /// write: said before any work starts, not after a whole process has been dumped.
    #[error(
        "the store at {} {}: nothing can be stored in it (thawing from it works); {}",
        .root.display(),
        if *.read_only_fs { "is on a read-only file system" } else { "is not writable by you" },
        if *.read_only_fs {
            "remount it read-write, or use a store on a writable file system"
        } else {
            "give yourself write permission on it (`chmod u+w`), or use another store"
        }
    )]
    StoreNotWritable {
        root: PathBuf,
        /// On a read-only mount (else: permissions).
        read_only_fs: bool,
    },
    /// A forward record file is not the record its path says (see [`crate::forward`]).
    #[error(
        "forward record {} is not a pf.pack_forward.v1 record of the packs its path names; remove it only if no snapshot needs the pack it forwards (`pf store verify` tells)",
        .path.display()
    )]
    CorruptForward { path: PathBuf },
    /// A ref file holds something that is not a digest.
    #[error("name {name:?} in {} does not hold a digest", .path.display())]
    CorruptName {
        name: String,
        path: PathBuf,
        #[source]
        source: ParseDigestError,
    },
}

/// Who may write a directory of this mode besides its owner.
fn writers(mode: u32) -> &'static str {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => "group and others",
        (true, false) => "its group",
        _ => "others",
    }
}

/// `name (uid N)`, or `uid N` for a uid without a name.
fn describe_user(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("{} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

/// For root only: how to take over a store root trusts.
fn take_over_hint(me: u32, root: &std::path::Path) -> String {
    if me == 0 {
        format!(
            " (if you trust every name and blob in it: `chown -R root: {}`)",
            root.display()
        )
    } else {
        String::new()
    }
}

fn prefix_not_found(prefix: &str, bare: bool) -> String {
    if bare {
        format!("no name {prefix:?} in the store, and no digest there starts with {prefix}")
    } else {
        format!("no digest in the store starts with {prefix}")
    }
}

/// `sha256:<digits> ("name", "other"), sha256:<digits> and N more`.
fn describe_candidates(
    candidates: &[(Digest256, Vec<String>)],
    count: usize,
    digits: usize,
) -> String {
    let mut out: Vec<String> = candidates
        .iter()
        .map(|(digest, names)| {
            let hex = digest.hex();
            let short = format!("sha256:{}", &hex[..digits.min(hex.len())]);
            if names.is_empty() {
                short
            } else {
                let names: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
                format!("{short} ({})", names.join(", "))
            }
        })
        .collect();
    if count > candidates.len() {
        out.push(format!("and {} more", count - candidates.len()));
    }
    out.join(", ")
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" (file {})", p.display()),
        None => String::new(),
    }
}

impl Error {
    /// The store error inside an `io::Error` returned by a reader from [`crate::BlobStore::open`]
    /// (an integrity or decode failure), if that is what it is.
    pub fn from_read_error(err: &std::io::Error) -> Option<&Self> {
        err.get_ref().and_then(|inner| inner.downcast_ref::<Self>())
    }

    /// Wrap this error in an `io::Error` of kind `InvalidData`, as blob readers return it.
    pub(crate) fn into_read_error(self) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, self)
    }

    /// The error a blob reader's `io::Error` stands for: the store error inside it, or the
    /// `fallback` wrapping it.
    pub(crate) fn from_read(
        err: std::io::Error,
        fallback: impl FnOnce(std::io::Error) -> Self,
    ) -> Self {
        if Self::from_read_error(&err).is_none() {
            return fallback(err);
        }
        let kind = err.kind();
        match err.into_inner().map(|inner| inner.downcast::<Self>()) {
            Some(Ok(inner)) => *inner,
            Some(Err(other)) => fallback(std::io::Error::new(kind, other)),
            None => fallback(std::io::Error::from(kind)),
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
