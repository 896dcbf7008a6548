//! patchbayctl: the admin's client for patchbayd's control socket.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use patchbay_daemon::config;
use patchbay_daemon::ctl::client::{CallError, Client};
use patchbay_daemon::ctl::columns::Resource;
use patchbay_daemon::ctl::commands::{Cli, Command, to_call};
use patchbay_daemon::ctl::output::{self, Format, emit};
use patchbay_daemon::ctl::render::{Ctx, View, render};
use patchbay_daemon::ctl::{generated, top, watch};
use serde_json::{Value, json};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // These need no daemon, nor a configuration to find it.
    let local = match &cli.command {
        Command::Completions { shell } => Some(Ok(generated::completions(*shell))),
        Command::Man => Some(generated::man_page()),
        _ => None,
    };
    if let Some(text) = local {
        return exit(text.and_then(|t| emit(&t)).map_err(Into::into));
    }
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
    exit(runtime.block_on(run(&cli)))
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
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
    let format = cli.format();
    let mut client = Client::connect(&socket).await?;
    let no_secrets = BTreeMap::new();
    let Some((method, params)) = to_call(&cli.command)? else {
        let Command::Top { interval } = cli.command else {
            anyhow::bail!("this command calls no control method");
        };
        let ctx = ctx(format, &no_secrets);
        return top::run(&mut client, Duration::from_secs(interval), &ctx).await;
    };
    let mut result = client.call(&method, params).await;
    if let (Ok(_), Some(account)) = (&result, cli.command.watch_deletion()) {
        result = watch::deletion(&mut client, account).await;
    }
    let result = match result {
        Ok(result) => result,
        Err(CallError::Rpc {
            code,
            message,
            kind,
        }) => {
            let kind = kind.map(|k| format!(", {k}")).unwrap_or_default();
            anyhow::bail!("{method} failed: {message} (code {code}{kind})")
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(text) = output::machine(format, &result) {
        return Ok(emit(&text?)?);
    }
    let view = cli.command.view();
    // Only `-o wide` shows channel configs; their connectors say which keys are secret.
    let secrets = if format == Format::Wide && view == View::Of(Resource::Channel) {
        secret_keys(&mut client).await
    } else {
        no_secrets
    };
    Ok(emit(&render(view, &result, &ctx(format, &secrets)))?)
}

fn ctx(format: Format, secrets: &BTreeMap<String, Vec<String>>) -> Ctx<'_> {
    Ctx {
        wide: format == Format::Wide,
        colour: output::colour_wanted(),
        now_ms: chrono::Utc::now().timestamp_millis(),
        secrets,
    }
}

/// Connector kind → its secret config keys; empty (so every value masked) when
/// `plugin.list` does not answer.
async fn secret_keys(client: &mut Client) -> BTreeMap<String, Vec<String>> {
    let plugins = client
        .call("plugin.list", json!({}))
        .await
        .unwrap_or(Value::Null);
    plugins
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let keys = p["secret_keys"].as_array()?.iter();
            let keys = keys.filter_map(|k| k.as_str().map(str::to_owned)).collect();
            Some((p["kind"].as_str()?.to_owned(), keys))
        })
        .collect()
}
