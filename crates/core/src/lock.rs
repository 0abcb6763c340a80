//! The store's lock: writers share it from their first blob to the name that keeps it, readers
//! that must not lose their blobs midway (thaws) share it when they can without waiting, and
//! `gc` holds it alone while it decides what to remove and removes it.
//!
//! Without it, a gc that read the names before a writer named its new blob removes that blob
//! (whatever the grace period: at `--grace 0` nothing is spared). With it, a blob a name points
//! at when gc finishes exists: either the writer named it before gc took the lock (gc sees the
//! name), or it writes its blobs after gc let go.

use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// A held store lock, shared ([`crate::BlobStore::writer_lock`]) or exclusive
/// ([`crate::BlobStore::gc_lock`]); dropping it lets go.
#[derive(Debug)]
#[must_use = "the lock is let go when this is dropped"]
pub struct StoreLock {
    _held: Held,
}

#[derive(Debug)]
enum Held {
    /// An `flock` on the store's lock file (`FsBlobStore`): let go when the file is closed.
    File { _file: File },
    /// A share of a [`SharedExclusive`] (`MemBlobStore`).
    Mem { _guard: MemGuard },
}

impl StoreLock {
    pub(crate) fn file(file: File) -> Self {
        Self {
            _held: Held::File { _file: file },
        }
    }

    fn mem(guard: MemGuard) -> Self {
        Self {
            _held: Held::Mem { _guard: guard },
        }
    }
}

/// An in-process lock with `flock`'s semantics: any number of shared holders or one exclusive,
/// and a shared request is granted while only shared holders hold it (even when an exclusive one
/// waits), so a writer that takes it again while holding it cannot deadlock.
#[derive(Debug, Default, Clone)]
pub(crate) struct SharedExclusive {
    inner: Arc<(Mutex<LockState>, Condvar)>,
}

#[derive(Debug, Default)]
struct LockState {
    shared: usize,
    exclusive: bool,
}

impl SharedExclusive {
    pub(crate) fn shared(&self) -> StoreLock {
        let (state, cond) = &*self.inner;
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        while s.exclusive {
            s = cond.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.shared += 1;
        StoreLock::mem(MemGuard {
            lock: self.clone(),
            exclusive: false,
        })
    }

    /// A share when no exclusive holder has it, at once; `None` otherwise.
    pub(crate) fn try_shared(&self) -> Option<StoreLock> {
        let (state, _) = &*self.inner;
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        if s.exclusive {
            return None;
        }
        s.shared += 1;
        Some(StoreLock::mem(MemGuard {
            lock: self.clone(),
            exclusive: false,
        }))
    }

    pub(crate) fn exclusive(&self) -> StoreLock {
        let (state, cond) = &*self.inner;
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        while s.exclusive || s.shared > 0 {
            s = cond.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.exclusive = true;
        StoreLock::mem(MemGuard {
            lock: self.clone(),
            exclusive: true,
        })
    }
}

#[derive(Debug)]
struct MemGuard {
    lock: SharedExclusive,
    exclusive: bool,
}

impl Drop for MemGuard {
    fn drop(&mut self) {
        let (state, cond) = &*self.lock.inner;
        let mut s = state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.exclusive {
            s.exclusive = false;
        } else {
            s.shared -= 1;
        }
        cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;

    #[test]
    fn exclusive_waits_for_every_shared_holder_and_shared_nests() {
        let lock = SharedExclusive::default();
        let a = lock.shared();
        // A second share while an exclusive request waits must not deadlock.
        let (tx, rx) = mpsc::channel();
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let held = lock.exclusive();
                tx.send(()).unwrap();
                drop(held);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let b = lock.shared();
        assert!(rx.try_recv().is_err(), "exclusive granted beside a share");
        drop(a);
        std::thread::sleep(Duration::from_millis(50));
        assert!(rx.try_recv().is_err(), "exclusive granted beside a share");
        drop(b);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
        drop(lock.exclusive());
    }
}
