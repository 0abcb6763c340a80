//! Rust errors → `pf.errors` exceptions: the class follows the error's `kind()` (a missing blob, a
//! corrupt store, no criu, not root, CRIU's failure …), the message is the whole error chain, and
//! CRIU failures carry CRIU's own `Error (…)` lines as `criu_errors` and the kept log as `log`.

use pyo3::prelude::*;
use pyo3::types::PyList;

/// Which `pf.errors` class an error becomes, and what it carries besides its message.
#[derive(Debug, Default)]
struct Class {
    name: &'static str,
    criu_errors: Vec<String>,
    log: Option<std::path::PathBuf>,
}

impl Class {
    fn named(name: &'static str) -> Class {
        Class {
            name,
            ..Class::default()
        }
    }
}

/// The class of a store error.
fn core_class(err: &pf_core::Error) -> Class {
    use pf_core::Error as E;
    Class::named(match err {
        E::NotFound { .. }
        | E::NameNotFound { .. }
        | E::PrefixNotFound { .. }
        | E::NoStore { .. } => "NotFound",
        E::Integrity { .. } | E::Decode { .. } | E::CorruptName { .. } => "StoreCorrupt",
        E::InvalidDigest(_)
        | E::InvalidName { .. }
        | E::PrefixTooShort { .. }
        | E::AmbiguousPrefix { .. }
        | E::NotAStore { .. }
        | E::EmptyStorePath => "InvalidArgument",
        _ => "StoreError",
    })
}

/// The `pf.errors` class of an error's kind (`pf_world_procs::ErrorKind`, which pf-goblins'
/// errors share): the classification is the libraries', not repeated here.
fn kind_class(kind: pf_world_procs::ErrorKind) -> &'static str {
    use pf_world_procs::ErrorKind as K;
    match kind {
        K::CriuUnavailable => "CriuMissing",
        K::NeedsPrivilege => "NeedsRoot",
        K::PidInUse => "PidInUse",
        K::SocketsUnsupported | K::ForeignTerminal | K::CriuFailed => "CriuFailed",
        K::NoSuchProcess => "NoSuchProcess",
        K::NotAGoblin => "NotAGoblin",
        K::InvalidSnapshot => "InvalidSnapshot",
        K::NotFound => "NotFound",
        K::StoreCorrupt => "StoreCorrupt",
        K::InvalidInput => "InvalidArgument",
        K::NoSpace => "NoSpace",
        K::NotWarm => "NotWarm",
        K::Cancelled => "Cancelled",
        K::Traced => "Traced",
        _ => "Error",
    }
}

/// The class of a CRIU or procs error, with CRIU's lines and log when criu ran.
fn procs_class(err: &pf_world_procs::Error) -> Class {
    use pf_world_procs::Error as E;
    match err {
        E::Store { source, .. } => core_class(source),
        E::Criu { errors, log, .. } => Class {
            name: kind_class(err.kind()),
            criu_errors: errors.clone(),
            log: Some(log.clone()),
        },
        E::Timeout { log, .. } => Class {
            name: kind_class(err.kind()),
            criu_errors: Vec::new(),
            log: Some(log.clone()),
        },
        // criu's lines and log, when it ran and failed to seize the traced process.
        E::Traced {
            source: Some(source),
            ..
        } => Class {
            name: kind_class(err.kind()),
            ..procs_class(source)
        },
        _ => Class::named(kind_class(err.kind())),
    }
}

/// The process whose `/proc` entry `path` is, when reading it was refused: this process may not
/// look into that one (ptrace access rules: another user's, or one holding capabilities this
/// process lacks, or a security module's say).
fn proc_denied(path: &std::path::Path, source: &std::io::Error) -> Option<i32> {
    if source.kind() != std::io::ErrorKind::PermissionDenied {
        return None;
    }
    let mut parts = path.strip_prefix("/proc").ok()?.components();
    parts.next()?.as_os_str().to_str()?.parse().ok()
}

/// The class of a goblin error.
fn goblin_class(err: &pf_goblins::Error) -> Class {
    use pf_goblins::Error as E;
    match err {
        E::Spawn { .. } => Class::named("SpawnFailed"),
        E::Io { path, source, .. } if proc_denied(path, source).is_some() => {
            Class::named("AccessDenied")
        }
        E::Hidden { .. } => Class::named("AccessDenied"),
        E::Freeze { source, .. } | E::Thaw { source, .. } | E::Wait { source, .. } => {
            procs_class(source)
        }
        _ => Class::named(kind_class(err.kind())),
    }
}

/// The whole chain, `outer: inner: …`, as the CLI prints it.
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let line = c.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        cause = c.source();
    }
    in_python(&text)
}

/// The command line's spelling of a fix, as this API spells it.
fn in_python(text: &str) -> String {
    text.replace("--new-pidns", "new_pid_namespace=True")
        .replace("`pf goblin spawn`", "pf.goblins.spawn")
        .replace("(--store DIR, $PF_STORE)", "(pf.Store(path), $PF_STORE)")
}

/// Build the exception of `class` with `message`.
fn raise(class: Class, message: String) -> PyErr {
    Python::attach(|py| match build(py, &class, &message) {
        Ok(err) => err,
        Err(err) => err,
    })
}

fn build(py: Python<'_>, class: &Class, message: &str) -> PyResult<PyErr> {
    let module = py.import("pf.errors")?;
    let cls = module.getattr(class.name)?;
    let exc = cls.call1((message,))?;
    exc.setattr("criu_errors", PyList::new(py, &class.criu_errors)?)?;
    exc.setattr("log", class.log.as_ref().map(|p| p.display().to_string()))?;
    Ok(PyErr::from_value(exc))
}

/// A store error as a Python exception.
pub(crate) fn from_core(err: pf_core::Error) -> PyErr {
    raise(core_class(&err), chain(&err))
}

/// What to do about a goblin error, when its chain does not say.
fn goblin_hint(err: &pf_goblins::Error) -> Option<String> {
    const INSPECTABLE: &str = "Freeze a process this one may inspect (one it started, e.g. \
                               with pf.goblins.spawn), or run as that process's owner, or as \
                               root with every capability it holds";
    match err {
        // Says what the kernel refused, and why it may have.
        pf_goblins::Error::Hidden { .. } => Some(format!(". {INSPECTABLE}")),
        pf_goblins::Error::Io { path, source, .. } => proc_denied(path, source).map(|pid| {
            format!(
                "; this process may not look into process {pid}: it belongs to another user \
                 or user namespace, holds privileges (capabilities) this process lacks, or a \
                 security module forbids it. {INSPECTABLE}"
            )
        }),
        _ => None,
    }
}

/// A goblin error as a Python exception.
pub(crate) fn from_goblin(err: pf_goblins::Error) -> PyErr {
    let mut message = chain(&err);
    if let Some(hint) = goblin_hint(&err) {
        message.push_str(&hint);
    }
    raise(goblin_class(&err), message)
}

/// A push's or pull's error as a Python exception.
pub(crate) fn from_registry(err: pf_registry::Error) -> PyErr {
    use pf_registry::ErrorKind as K;
    let class = match &err {
        pf_registry::Error::Store(core) => core_class(core),
        _ => Class::named(match err.kind() {
            K::Usage => "InvalidArgument",
            K::Unreachable => "RegistryUnreachable",
            K::Auth => "RegistryAuth",
            K::NotFound => "NotFound",
            K::Integrity => "RegistryCorrupt",
            _ => "RegistryError",
        }),
    };
    raise(class, chain(&err))
}

/// A bad argument (`pf.errors.InvalidArgument`, also a `ValueError`).
pub(crate) fn invalid(message: String) -> PyErr {
    raise(Class::named("InvalidArgument"), message)
}

/// Something asked for is not there (`pf.errors.NotFound`, also a `LookupError`).
pub(crate) fn not_found(message: String) -> PyErr {
    raise(Class::named("NotFound"), message)
}

/// A wait that ran out of time (`pf.errors.Timeout`, also a `TimeoutError`).
pub(crate) fn timeout(message: String) -> PyErr {
    raise(Class::named("Timeout"), message)
}
