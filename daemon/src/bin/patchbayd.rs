//! patchbayd: `--config FILE` to run, `--check-config` to validate and exit.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use patchbay_daemon::config::{self, EXIT_CONFIG};
use patchbay_daemon::{daemon, logging};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "patchbayd",
    version,
    about = "patchbay's messenger-integration daemon"
)]
struct Args {
    /// TOML configuration file; without it the embedded default runs (SQLite, files under ./var).
    #[arg(long, short, env = "PATCHBAY_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print the effective settings and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match config::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("patchbayd: {e}");
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    if args.check_config {
        println!(
            "configuration OK: socket {}, store {}, queue {}",
            settings.socket.display(),
            settings.store_path.display(),
            settings.raw.queue.backend
        );
        return ExitCode::SUCCESS;
    }
    logging::init(&settings);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("patchbayd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(settings, args.config.clone())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("patchbayd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
