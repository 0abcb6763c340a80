//! `cargo xtask demo`: the main job, end to end, on this machine.
//!
//! Today it makes sure CRIU works, builds `pf` and asks `pf doctor` whether this machine can
//! checkpoint. Every step is real; steps are added here as the pieces they show exist.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::install_criu;
use crate::process::{self, Out};

#[allow(clippy::print_stderr)]
pub(crate) fn demo(root: &Path) -> anyhow::Result<ExitCode> {
    eprintln!("==> CRIU");
    let criu = install_criu::ensure(
        root,
        &install_criu::Options {
            force: false,
            dest: install_criu::DEFAULT_DEST.into(),
        },
    )?;

    eprintln!("\n==> build pf");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = process::command(cargo, root, Out::Inherit, Out::Inherit);
    build.args(["build", "--quiet", "--package", "pf-cli", "--bin", "pf"]);
    process::run(&mut build)?;
    let pf = root.join("target/debug/pf");
    let store = root.join("target/pf-demo/store");

    eprintln!("\n==> pf doctor --store {}", store.display());
    let mut doctor = process::command(&pf, root, Out::Inherit, Out::Inherit);
    doctor
        .arg("--store")
        .arg(&store)
        .arg("doctor")
        .env("PF_CRIU", &criu);
    process::run(&mut doctor).context("this machine cannot checkpoint yet: see the fixes above")?;
    Ok(ExitCode::SUCCESS)
}
