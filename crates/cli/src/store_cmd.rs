//! `pf store`: Manage the store.

use std::process::ExitCode;

use crate::common::Global;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum Command {}

pub(crate) fn run(_global: &Global, command: Command) -> anyhow::Result<ExitCode> {
    match command {}
}
