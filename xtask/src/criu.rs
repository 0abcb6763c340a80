//! Finding a working CRIU for `cargo xtask install-criu`, `ci`, `demo` and `bench`: the very
//! probe pf runs (`pf_world_procs::criu::probe_with`), so that install-criu decides exactly as pf
//! and `pf doctor` do on every machine state.
//!
//! The policy itself (accepted builds, where criu is looked for, `$PF_CRIU`) lives in
//! `pf_world_procs::criu::policy`; this module only turns the probe's answer into what the
//! tasks print.

use std::path::PathBuf;

use pf_world_procs::criu::{ProbeInputs, probe_with};

/// The criu pf uses, when it works; otherwise the one pf found and why pf will not use it.
#[derive(Debug, Default)]
pub(crate) struct Search {
    /// The criu pf uses and its version.
    pub(crate) found: Option<(PathBuf, String)>,
    /// The criu pf found but will not use, with why.
    pub(crate) rejected: Vec<(PathBuf, String)>,
    /// The `GitID:` of the criu found, if it printed one.
    pub(crate) gitid: Option<String>,
}

/// [`find_working_with`] this process's `$PF_CRIU`, `$PATH` and uid.
pub(crate) fn find_working() -> Search {
    find_working_with(&ProbeInputs::from_process())
}

/// What pf's probe says with `inputs`: the criu pf would use, or why there is none.
pub(crate) fn find_working_with(inputs: &ProbeInputs) -> Search {
    let probe = probe_with(inputs);
    let mut search = Search {
        gitid: probe.gitid.clone(),
        ..Search::default()
    };
    match (&probe.result, &probe.path) {
        (Ok(criu), _) => search.found = Some((criu.path.clone(), criu.version.to_string())),
        (Err(why), Some(path)) => search.rejected.push((path.clone(), why.to_string())),
        (Err(why), None) => search
            .rejected
            .push((PathBuf::from("criu"), why.to_string())),
    }
    search
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::fs::PermissionsExt as _;
    use std::path::Path;

    fn fake_criu(dir: &Path, version_output: &str) -> PathBuf {
        let path = dir.join("criu");
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = --version ] && printf '{}'\n\
             [ \"$1\" = check ] && echo 'Looks good.'\nexit 0\n",
            version_output.replace('\n', "\\n")
        );
        std::fs::write(&path, script).expect("write fake criu");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    /// install-criu's decision on each machine state: nothing to do exactly when pf's policy
    /// accepts the criu found. tests/it/doctor.rs `doctor_agrees_with_install_criu_on_every_machine_state`
    /// asserts the same table for `pf doctor`.
    #[test]
    fn install_criu_decides_as_pf_on_every_machine_state() {
        let states = [
            // (criu --version, install-criu leaves it alone)
            (None, false),
            (Some("Version: 3.17.1\nGitID: v3.17.1\n"), false),
            (Some("Version: 4.1.1\n"), false),
            (Some("Version: 4.1.1\nGitID: pf-4.1.1-1\n"), true),
            (Some("Version: 4.2.1\nGitID: pf-4.2.1\n"), true),
            (Some("Version: 4.2.1\n"), true),
        ];
        for (version, works) in states {
            let dir = tempfile::tempdir().expect("tempdir");
            let bin = dir.path().join("bin");
            std::fs::create_dir(&bin).expect("mkdir");
            if let Some(version) = version {
                fake_criu(&bin, version);
            }
            // Found on $PATH (no $PF_CRIU), as on a machine with criu installed; the machine's
            // own sbin directories are left out of the search.
            let inputs = ProbeInputs {
                os: "linux".into(),
                pf_criu: None,
                path_var: Some(OsString::from(&bin)),
                is_root: true,
                search_dirs: Vec::new(),
            };
            let search = find_working_with(&inputs);
            let fake = bin.join("criu");
            assert_eq!(search.found.is_some(), works, "{version:?}: {search:?}");
            if version.is_none() {
                assert!(search.rejected[0].1.contains("not found"), "{search:?}");
                continue;
            }
            let pf = probe_with(&inputs);
            assert_eq!(pf.result.is_ok(), works, "{version:?}");
            if works {
                assert_eq!(search.found.as_ref().map(|f| &f.0), Some(&fake));
            } else {
                let (path, why) = &search.rejected[0];
                assert_eq!(path, &fake);
                assert!(why.contains("install-criu"), "{why}");
            }
        }
    }

    /// `$PF_CRIU` is the only place looked at, as in pf: a broken one is not skipped for a
    /// working criu elsewhere.
    #[test]
    fn pf_criu_is_the_only_candidate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let good = dir.path().join("good");
        std::fs::create_dir(&good).expect("mkdir");
        fake_criu(&good, "Version: 4.2.1\n");
        let inputs = ProbeInputs {
            os: "linux".into(),
            pf_criu: Some(dir.path().join("missing/criu").into_os_string()),
            path_var: Some(good.into_os_string()),
            is_root: true,
            search_dirs: Vec::new(),
        };
        let search = find_working_with(&inputs);
        assert!(search.found.is_none(), "{search:?}");
        assert!(search.rejected[0].1.contains("$PF_CRIU"), "{search:?}");
    }
}
