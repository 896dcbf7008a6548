//! patchbayd: `--config FILE` to run, `--check-config` to validate and exit, `store copy`
//! to move a SQLite store to PostgreSQL.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use patchbay_daemon::config::{self, EXIT_CONFIG};
use patchbay_daemon::{daemon, logging, store_copy};

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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Work on a store while no daemon uses it.
    Store {
        #[command(subcommand)]
        action: StoreAction,
    },
}

#[derive(Subcommand)]
enum StoreAction {
    /// Copy a SQLite store into a PostgreSQL database (stop the daemon first), then
    /// verify row counts and balances. Point store.url at the target afterwards.
    #[command(
        after_help = "Example:\n  patchbayd store copy --from sqlite:///var/lib/patchbay/patchbay.db \\\n      --to postgres://patchbay@db.internal/patchbay"
    )]
    Copy {
        /// The store to move: sqlite://PATH.
        #[arg(long, value_name = "URL")]
        from: String,
        /// The PostgreSQL database to fill: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
        #[arg(long, value_name = "URL", env = "PATCHBAY_COPY_TO")]
        to: String,
        /// Continue an interrupted copy into a target that holds part of the data (only
        /// while no daemon has used the SQLite store since: changed rows are not copied
        /// again; otherwise use --replace).
        #[arg(long, conflicts_with = "replace")]
        resume: bool,
        /// Empty the target first and copy from scratch.
        #[arg(long)]
        replace: bool,
        /// Rows per batch (one PostgreSQL transaction each).
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
        /// No progress bar (it is drawn only on a terminal anyway).
        #[arg(long)]
        quiet: bool,
    },
}

/// Runs `patchbayd store copy`; the summary goes to stdout, errors to stderr.
fn store_copy(action: StoreAction) -> ExitCode {
    let StoreAction::Copy {
        from,
        to,
        resume,
        replace,
        batch,
        quiet,
    } = action;
    let existing = match (resume, replace) {
        (true, _) => store_copy::Existing::Resume,
        (_, true) => store_copy::Existing::Replace,
        _ => store_copy::Existing::Refuse,
    };
    let opts = store_copy::CopyOptions {
        existing,
        batch,
        progress: !quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
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
    match runtime.block_on(store_copy::run(&from, &to, &opts)) {
        Ok(report) => {
            for (table, rows) in &report.tables {
                println!("{table:18} {rows:>12} rows");
            }
            println!(
                "copied {} rows in {:.1} s ({:.0} rows/s); row counts and balances verified",
                report.rows,
                report.seconds,
                report.rows as f64 / report.seconds.max(1e-9)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("patchbayd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Store { action }) = args.command {
        return store_copy(action);
    }
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
            settings.store,
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
