//! The registry rows of `cargo xtask bench`: `pf push` and `pf pull` of a goblin's snapshot
//! through a local registry (Debian's `docker-registry`, the CNCF distribution server, started
//! by `pf_registry::test_support` on loopback with its storage on the store's disk), beside
//! `curl` moving the same bytes to and from the same registry as one monolithic blob; and what
//! pushing each snapshot of a `procs.criu.v2` series sends, with where the bytes of the last
//! one go.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail};
use pf_core::{BlobStore as _, Digest256, FsBlobStore};
use pf_registry::test_support::{Registry, registry_binary};
use serde_json::Value;

use crate::bench_proc::ScratchDir;
use crate::process::{self, Out};

/// A registry for the bench, with its storage; both go when dropped.
pub(crate) struct Local {
    registry: Registry,
    _storage: ScratchDir,
}

impl Local {
    /// Start one with its storage under `parent`; `None` (and a note) when the server is not
    /// installed.
    pub(crate) fn start(parent: &Path) -> anyhow::Result<Option<Local>> {
        if !registry_binary().exists() {
            crate::bench::progress(&format!(
                "{} is missing (apt-get install -y docker-registry): no registry rows",
                registry_binary().display()
            ));
            return Ok(None);
        }
        let storage = ScratchDir::new(parent, "registry")?;
        let registry = Registry::start(storage.path(), None);
        Ok(Some(Local {
            registry,
            _storage: storage,
        }))
    }

    /// `127.0.0.1:PORT/<repo>:<tag>`.
    pub(crate) fn reference(&self, repo: &str, tag: &str) -> String {
        format!("{}/{repo}:{tag}", self.registry.addr())
    }

    fn base(&self) -> String {
        format!("http://{}", self.registry.addr())
    }
}

/// One snapshot through the registry: pf and curl, each way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transfer {
    /// Raw bytes of every blob of the snapshot (what pf sends to an empty registry).
    pub(crate) bytes: u64,
    pub(crate) blobs: u64,
    pub(crate) push_s: f64,
    pub(crate) pull_s: f64,
    /// `curl -T` of the same bytes as one blob (a monolithic PUT).
    pub(crate) curl_put_s: f64,
    /// `curl` GET of that blob.
    pub(crate) curl_get_s: f64,
    pub(crate) push_rss_kib: u64,
    pub(crate) pull_rss_kib: u64,
}

/// A pf command's result: seconds, its `--json` line, peak RSS.
pub(crate) type PfRun<'a> = &'a dyn Fn(&Path, &[&str]) -> anyhow::Result<(f64, String, u64)>;

/// Push the snapshot `digest` of `store` to an empty repository, pull it into an empty store;
/// then upload and fetch the same bytes with curl.
pub(crate) fn transfer(
    local: &Local,
    pf: PfRun<'_>,
    store: &Path,
    digest: &str,
    scratch: &Path,
    label: &str,
) -> anyhow::Result<Transfer> {
    let reference = local.reference(&format!("bench/{label}"), "pf");
    // Each timed step starts with nothing left to write back, as in the other benches.
    let settle = || crate::bench_store::sync(store);
    settle()?;
    let (push_s, stdout, push_rss_kib) = pf(store, &["push", digest, &reference, "--json"])?;
    let pushed: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("pf push --json printed {stdout:?}"))?;
    let bytes = pushed["bytes_uploaded"]
        .as_u64()
        .context("bytes_uploaded")?;
    if pushed["bytes_total"].as_u64() != Some(bytes) {
        bail!("the registry was not empty: {pushed}");
    }
    let pulled_store = ScratchDir::new(scratch, "pulled")?;
    settle()?;
    let (pull_s, stdout, pull_rss_kib) = pf(pulled_store.path(), &["pull", &reference, "--json"])?;
    let pulled: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("pf pull --json printed {stdout:?}"))?;
    if pulled["bytes_fetched"].as_u64() != Some(bytes) {
        bail!("pf pull fetched other bytes than pf push sent: {pulled} / {pushed}");
    }
    drop(pulled_store);

    // The same bytes, one file: every blob of the snapshot, raw, one after another.
    let file_dir = ScratchDir::new(scratch, "curl")?;
    let file = file_dir.path().join("blob");
    let blob_digest = concatenate(store, digest, &file)?;
    let repo = format!("bench/{label}-curl");
    let start = curl(&[
        "-sS",
        "-i",
        "-X",
        "POST",
        &format!("{}/v2/{repo}/blobs/uploads/", local.base()),
    ])?;
    let location = start
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("location")
                .then(|| value.trim().to_owned())
        })
        .with_context(|| format!("the registry gave curl no upload location: {start}"))?;
    let location = if location.starts_with('/') {
        format!("{}{location}", local.base())
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    let put_url = format!("{location}{sep}digest={blob_digest}");
    settle()?;
    let started = Instant::now();
    let code = curl(&[
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Content-Type: application/octet-stream",
        "-T",
        &file.display().to_string(),
        &put_url,
    ])?;
    let curl_put_s = started.elapsed().as_secs_f64();
    if code.trim() != "201" {
        bail!("curl's PUT of the blob answered {code}");
    }
    settle()?;
    let started = Instant::now();
    let code = curl(&[
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{}/v2/{repo}/blobs/{blob_digest}", local.base()),
    ])?;
    let curl_get_s = started.elapsed().as_secs_f64();
    if code.trim() != "200" {
        bail!("curl's GET of the blob answered {code}");
    }
    Ok(Transfer {
        bytes,
        blobs: pushed["blobs"].as_u64().unwrap_or(0),
        push_s,
        pull_s,
        curl_put_s,
        curl_get_s,
        push_rss_kib,
        pull_rss_kib,
    })
}

fn curl(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = process::command("curl", Path::new("/"), Out::Pipe, Out::Pipe);
    cmd.args(args);
    let out = process::output(&mut cmd).context("curl is needed: apt-get install -y curl")?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            process::display(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Every blob `root` reaches (as pf push walks them), root first.
fn closure(store: &FsBlobStore, root: &Digest256) -> anyhow::Result<Vec<Digest256>> {
    let mut seen = BTreeSet::from([*root]);
    let mut order = vec![*root];
    let mut i = 0;
    while i < order.len() {
        for child in pf_core::references(store, &order[i])? {
            if seen.insert(child) {
                order.push(child);
            }
        }
        i += 1;
    }
    Ok(order)
}

/// Write the raw bytes of every blob of snapshot `root` into `file`; their SHA-256.
fn concatenate(store: &Path, root: &str, file: &Path) -> anyhow::Result<String> {
    let store = FsBlobStore::open(store)?;
    let root: Digest256 = root.parse().context("a snapshot digest")?;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(file).with_context(|| format!("cannot create {}", file.display()))?,
    );
    let mut hasher = pf_core::DigestHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for digest in closure(&store, &root)? {
        let mut reader = store.open(&digest)?;
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
    }
    out.flush()?;
    Ok(hasher.finish().to_string())
}

/// Where the bytes of one pushed snapshot went: raw bytes per role of the blobs it sent (the
/// blobs it reaches that the previous snapshot does not), and the stored size of its new packs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sent {
    /// `pf push --json`'s `bytes_uploaded`.
    pub(crate) bytes: u64,
    /// Raw bytes of new blobs by role: `record`, `criu_dump` (images tar), `pages manifest`,
    /// `page list`, `packs`, or the JSON key that names the blob.
    pub(crate) by_role: BTreeMap<String, u64>,
    /// Stored (on-disk) bytes of the snapshot's new packs: its new pages as the store keeps them.
    pub(crate) new_packs_stored: u64,
    /// Pages in the snapshot (what its page lists describe).
    pub(crate) pages: u64,
}

/// Push `digest` from `store` under `tag`, and say where the bytes went compared with the
/// snapshot `previous` (already pushed).
pub(crate) fn push_next(
    local: &Local,
    pf: PfRun<'_>,
    store: &Path,
    digest: &str,
    previous: Option<&str>,
    repo: &str,
    tag: &str,
) -> anyhow::Result<Sent> {
    let reference = local.reference(repo, tag);
    let (_, stdout, _) = pf(store, &["push", digest, &reference, "--json"])?;
    let pushed: Value = serde_json::from_str(stdout.trim())
        .with_context(|| format!("pf push --json printed {stdout:?}"))?;
    let bytes = pushed["bytes_uploaded"]
        .as_u64()
        .context("bytes_uploaded")?;
    let fs = FsBlobStore::open(store)?;
    let root: Digest256 = digest.parse().context("a snapshot digest")?;
    let before: BTreeSet<Digest256> = match previous {
        Some(p) => closure(&fs, &p.parse().context("a snapshot digest")?)?
            .into_iter()
            .collect(),
        None => BTreeSet::new(),
    };
    let roles = roles(&fs, &root)?;
    let mut sent = Sent {
        bytes,
        ..Sent::default()
    };
    for digest in closure(&fs, &root)? {
        let role = roles
            .get(&digest)
            .cloned()
            .unwrap_or_else(|| "record".to_owned());
        if role == "pages manifest" {
            let manifest: Value = serde_json::from_slice(&fs.get(&digest)?)?;
            sent.pages += manifest["pages"].as_u64().unwrap_or(0);
        }
        if before.contains(&digest) {
            continue;
        }
        *sent.by_role.entry(role.clone()).or_default() += fs.raw_size(&digest)?;
        if role == "packs" {
            sent.new_packs_stored += fs.stored_size(&digest)?;
        }
    }
    Ok(sent)
}

/// Each blob `root` reaches, by the JSON key that names it (`list` is shown as `page list`,
/// a blob named under `memory` as `pages manifest`).
fn roles(store: &FsBlobStore, root: &Digest256) -> anyhow::Result<BTreeMap<Digest256, String>> {
    let mut roles = BTreeMap::new();
    for digest in closure(store, root)? {
        if pf_core::references(store, &digest)?.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_slice(&store.get(&digest)?)?;
        name_digests(&value, "record", &mut roles);
    }
    Ok(roles)
}

fn name_digests(value: &Value, key: &str, out: &mut BTreeMap<Digest256, String>) {
    match value {
        Value::String(s) => {
            if let Ok(d) = s.parse::<Digest256>() {
                let role = match key {
                    "list" => "page list",
                    "manifest" => "pages manifest",
                    other => other,
                };
                out.entry(d).or_insert_with(|| role.to_owned());
            }
        }
        Value::Array(items) => items.iter().for_each(|v| name_digests(v, key, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| name_digests(v, k, out)),
        _ => {}
    }
}
