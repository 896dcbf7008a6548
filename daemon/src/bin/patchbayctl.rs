//! patchbayctl: the admin's client for patchbayd's control socket.

use std::process::ExitCode;

use clap::Parser;
use patchbay_daemon::config;
use patchbay_daemon::ctl::client::{CallError, Client};
use patchbay_daemon::ctl::commands::{Cli, to_call};
use patchbay_daemon::ctl::render::render;
use patchbay_daemon::ctl::watch;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("patchbayctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patchbayctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: &Cli) -> anyhow::Result<()> {
    let socket = match &cli.socket {
        Some(s) => s.clone(),
        None => config::load(cli.config.as_deref())?.socket,
    };
    let (method, params) = to_call(&cli.command)?;
    let mut client = Client::connect(&socket).await?;
    let mut result = client.call(&method, params).await;
    if let (Ok(_), Some(account)) = (&result, cli.command.watch_deletion()) {
        result = watch::deletion(&mut client, account).await;
    }
    match result {
        Ok(result) => {
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&result)?);
            } else {
                println!("{}", render(&result));
            }
            Ok(())
        }
        Err(CallError::Rpc {
            code,
            message,
            kind,
        }) => {
            let kind = kind.map(|k| format!(", {k}")).unwrap_or_default();
            anyhow::bail!("{method} failed: {message} (code {code}{kind})")
        }
        Err(e) => Err(e.into()),
    }
}
