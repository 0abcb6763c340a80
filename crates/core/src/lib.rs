//! pf-core: a content-addressed blob store.
//!
//! Blobs are named by [`Digest256`], the SHA-256 of their raw bytes. A [`BlobStore`] holds blobs
//! and names (refs) that point at them; [`MemBlobStore`] keeps them in memory and
//! [`FsBlobStore`] on disk. [`gc`] removes what no name reaches; writers and gc
//! coordinate through the store's lock ([`BlobStore::writer_lock`], [`StoreLock`]). This crate knows nothing about
//! processes, CRIU or tar.
//!
//! [`pack`], [`page_index`] and [`pages`] store files made of 4 KiB pages page by page: each
//! distinct page once per store, in packs of independently decodable zstd frames, each page
//! readable and checkable on its own. [`pages_report`] tells what named snapshots stand for and
//! store, how much of the kept packs is dead, and checks every pack and page list.

mod digest;
mod error;
pub mod forward;
mod fs;
mod gc;
pub mod hint;
mod lock;
mod mapped;
mod mem;
pub mod pack;
pub mod page_index;
pub mod pages;
pub mod pages_report;
mod repack;
mod sha256_many;
mod store;

pub use crate::digest::{Digest256, DigestHasher, ParseDigestError};
pub use crate::digest::{DigestMap, DigestState};
pub use crate::error::{Error, Result};
pub use crate::fs::FsBlobStore;
pub use crate::gc::{
    GcBlob, GcOptions, GcReport, gc, names_reaching, references, remove_unreachable,
};
pub use crate::lock::StoreLock;
pub use crate::mem::MemBlobStore;
pub use crate::repack::{RepackOptions, RepackReport, repack};
pub use crate::store::{
    BARE_PREFIX_MIN_HEX, BlobBatch, BlobStore, PREFIX_MIN_HEX, Put, get_parsed, validate_name,
};
