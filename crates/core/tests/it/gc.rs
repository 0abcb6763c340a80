//! gc on the file store: names and JSON children keep blobs, the grace period spares new ones,
//! and temp files of dead writers go.

use std::fs;
use std::time::{Duration, SystemTime};

use pf_core::{BlobStore, GcOptions, gc};

use crate::support::{TestData, store, temp_files};

const NOW: GcOptions = GcOptions {
    dry_run: false,
    grace: Duration::ZERO,
};

#[test]
fn gc_keeps_what_names_reach_and_removes_the_rest() {
    let (_dir, s) = store();
    let dump = s
        .put_reader(&mut TestData::new(20, 8 << 20))
        .unwrap()
        .digest;
    let procs = s
        .put(format!(r#"{{"kind":"procs.criu.v1","criu_dump":"{dump}","pids":[1]}}"#).as_bytes())
        .unwrap();
    let old_dump = s
        .put_reader(&mut TestData::new(21, 1 << 20))
        .unwrap()
        .digest;
    let old_procs = s
        .put(format!(r#"{{"kind":"procs.criu.v1","criu_dump":"{old_dump}"}}"#).as_bytes())
        .unwrap();
    s.set_name("now", &procs).unwrap();
    s.set_name("then", &old_procs).unwrap();

    let report = gc(&s, &NOW).unwrap();
    assert!(report.removed.is_empty(), "{report:?}");
    assert_eq!(s.list().unwrap().len(), 4);

    assert!(s.remove_name("then").unwrap());
    let dry = gc(
        &s,
        &GcOptions {
            dry_run: true,
            grace: Duration::ZERO,
        },
    )
    .unwrap();
    let mut want = vec![old_dump, old_procs];
    want.sort();
    assert_eq!(
        dry.removed.iter().map(|b| b.digest).collect::<Vec<_>>(),
        want
    );
    assert_eq!(s.list().unwrap().len(), 4, "a dry run removes nothing");

    let report = gc(&s, &NOW).unwrap();
    assert_eq!(
        report.removed.iter().map(|b| b.digest).collect::<Vec<_>>(),
        want
    );
    assert!(report.freed_bytes() > 1 << 19);
    let mut kept = vec![dump, procs];
    kept.sort();
    assert_eq!(s.list().unwrap(), kept);
    assert_eq!(
        s.get(&procs).unwrap().len(),
        s.raw_size(&procs).unwrap() as usize
    );
}

#[test]
fn the_grace_period_spares_new_unreachable_blobs() {
    let (_dir, s) = store();
    let fresh = s.put(b"fresh").unwrap();
    let old = s.put(b"old").unwrap();
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
    fs::File::open(s.blob_path(&old))
        .unwrap()
        .set_modified(an_hour_ago)
        .unwrap();
    let report = gc(
        &s,
        &GcOptions {
            dry_run: false,
            grace: Duration::from_secs(600),
        },
    )
    .unwrap();
    assert_eq!(report.recent, vec![fresh]);
    assert_eq!(
        report.removed.iter().map(|b| b.digest).collect::<Vec<_>>(),
        vec![old]
    );
    assert_eq!(s.list().unwrap(), vec![fresh]);

    // Putting an old blob again makes it new: a writer about to name it keeps it.
    fs::File::open(s.blob_path(&fresh))
        .unwrap()
        .set_modified(an_hour_ago)
        .unwrap();
    assert_eq!(s.put(b"fresh").unwrap(), fresh);
    let report = gc(
        &s,
        &GcOptions {
            dry_run: false,
            grace: Duration::from_secs(600),
        },
    )
    .unwrap();
    assert_eq!(report.recent, vec![fresh]);

    // Naming an old blob makes it new too: a gc that listed the names before it keeps it.
    fs::File::open(s.blob_path(&fresh))
        .unwrap()
        .set_modified(an_hour_ago)
        .unwrap();
    s.set_name("late", &fresh).unwrap();
    let modified = s.modified(&fresh).unwrap().unwrap();
    assert!(modified.elapsed().unwrap() < Duration::from_secs(600));
}

#[test]
fn gc_sweeps_temp_files_of_dead_writers() {
    let (_dir, s) = store();
    s.put(b"x").unwrap();
    let leftover = s.root().join("blobs/sha256/.tmp-0-7-deadbeef");
    fs::write(&leftover, b"half a blob").unwrap();
    let ref_leftover = s.root().join("refs/.tmp-0-8-deadbeef");
    fs::create_dir_all(s.root().join("refs")).unwrap();
    fs::write(&ref_leftover, b"sha256:").unwrap();
    let dry = gc(
        &s,
        &GcOptions {
            dry_run: true,
            grace: Duration::ZERO,
        },
    )
    .unwrap();
    let mut want = vec![leftover.clone(), ref_leftover.clone()];
    want.sort();
    assert_eq!(dry.temp_files, want);
    assert!(leftover.exists());
    let report = gc(&s, &NOW).unwrap();
    assert_eq!(report.temp_files, want);
    assert!(temp_files(s.root()).is_empty());
    // The temp file is not a blob and not a name.
    assert!(s.names().unwrap().is_empty());
}

#[test]
fn a_writer_that_gives_up_takes_back_only_what_no_name_reaches() {
    let (_dir, s) = store();
    let shared = s.put(b"a blob another writer also needs").unwrap();
    let child = s.put(b"a child of the other writer's snapshot").unwrap();
    let mine = s.put(b"a blob only the failed writer stored").unwrap();
    // The other writer names a snapshot that reaches `shared` and `child`.
    let root = s
        .put(format!(r#"{{"kind":"x","a":"{shared}","b":"{child}"}}"#).as_bytes())
        .unwrap();
    s.set_name("theirs", &root).unwrap();

    let removed = pf_core::remove_unreachable(&s, &[shared, child, mine]).unwrap();
    assert_eq!(removed, [mine]);
    assert!(s.contains(&shared).unwrap() && s.contains(&child).unwrap());
    assert!(!s.contains(&mine).unwrap());
    // Removing what is already gone is not an error.
    assert!(pf_core::remove_unreachable(&s, &[mine]).unwrap().is_empty());
}
