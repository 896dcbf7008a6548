//! What is generated from the command-line definition itself, so it never drifts from
//! it: shell completions (clap_complete) and the man page (clap_mangen, roff).
//! `daemon/patchbayctl-assets.sh` writes both where the .deb picks them up.

use clap::CommandFactory;
use clap_complete::Shell;

use crate::ctl::commands::Cli;

pub fn completions(shell: Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "patchbayctl", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

pub fn man_page() -> std::io::Result<String> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
