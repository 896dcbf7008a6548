//! patchbayctl's command line: one subcommand per control method, named like it
//! (`patchbayctl job list --state dead` calls `job.list`), plus `call` for any method,
//! `top`, and the generated `completions` and `man`; and how each result is shown.

use clap::{Args, Parser, Subcommand};
use serde_json::{Map, Value, json};
use std::path::PathBuf;

use crate::ctl::columns::Resource;
use crate::ctl::output::Format;
use crate::ctl::render::View;

#[derive(Parser)]
#[command(
    name = "patchbayctl",
    version,
    about = "Admin client for patchbayd's control socket"
)]
pub struct Cli {
    /// Control socket; default: control.socket of the configuration.
    #[arg(long, global = true, env = "PATCHBAY_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Configuration file to read the socket path from.
    #[arg(long, short, global = true, env = "PATCHBAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Output: table (default), wide (more columns, absolute times), json (the RPC
    /// result unchanged, for scripts) or yaml.
    #[arg(long, short, global = true, value_enum)]
    pub output: Option<Format>,
    /// The same as `-o json`.
    #[arg(long, global = true, conflicts_with = "output")]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn format(&self) -> Format {
        match (self.json, self.output) {
            (true, _) => Format::Json,
            (false, Some(f)) => f,
            (false, None) => Format::Table,
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Version, uptime, backends, health, channels and the queue by job kind.
    Status,
    /// Accounts: create, balance, top-ups, ledger.
    #[command(subcommand)]
    Account(AccountCmd),
    /// Users of an account.
    #[command(subcommand)]
    User(UserCmd),
    /// Background jobs: list, inspect, retry dead ones, enqueue.
    #[command(subcommand)]
    Job(JobCmd),
    /// The daemons sharing this one's store (nodes of the cluster).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Loaded connector plugins.
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// Messenger channels of an account.
    #[command(subcommand)]
    Channel(ChannelCmd),
    /// An account's general settings.
    #[command(subcommand)]
    Settings(SettingsCmd),
    /// Additional fields of the chat card.
    #[command(subcommand)]
    Field(FieldCmd),
    /// The shared inbox: chats, messages, assignment, fields.
    #[command(subcommand)]
    Chat(ChatCmd),
    /// Send a message to a client.
    #[command(subcommand)]
    Message(MessageCmd),
    /// Deletion of an account's old data.
    #[command(subcommand)]
    Data(DataCmd),
    /// Daily billing runs.
    #[command(subcommand)]
    Billing(BillingCmd),
    /// Call any method with JSON params: `patchbayctl call account.get '{"account": 1}'`.
    Call {
        method: String,
        params: Option<String>,
    },
    /// A live view of throughput, queue depth and channels; q, Esc or Ctrl-C quits.
    ///
    /// Not on a terminal (`patchbayctl top | cat`) it prints one frame, from two samples
    /// an interval apart, and exits.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=60))]
        interval: u64,
    },
    /// Print a shell completion script (bash, zsh, fish, …).
    ///
    /// `patchbayctl completions bash > ~/.local/share/bash-completion/completions/patchbayctl`;
    /// the .deb installs the bash, zsh and fish ones.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff): `patchbayctl man | man -l -`.
    #[command(hide = true)]
    Man,
}

#[derive(Subcommand)]
pub enum AccountCmd {
    /// Create an account and its first administrator.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        currency: Option<String>,
        #[arg(long)]
        admin_name: String,
        #[arg(long)]
        admin_email: String,
    },
    /// Balance, daily total, days until disconnection, settings.
    Get(AccountArg),
    /// Credit the balance (integer minor units) once per reference.
    Topup {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        amount: i64,
        #[arg(long)]
        reference: String,
    },
    /// Charges and top-ups, newest first.
    Ledger {
        #[arg(long)]
        account: i64,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Args)]
pub struct AccountArg {
    #[arg(long)]
    pub account: i64,
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Add a user: --role administrator or operator.
    Add {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        name: String,
        #[arg(long)]
        email: String,
        #[arg(long, default_value = "operator")]
        role: String,
    },
}

#[derive(Subcommand)]
pub enum JobCmd {
    /// Queue a job of any kind with a JSON payload.
    Enqueue {
        #[arg(long)]
        kind: String,
        #[arg(long)]
        payload: String,
    },
    /// State, attempts and last error of one job.
    Get { id: String },
    /// Jobs, newest first: --state pending|running|done|failed|dead, --kind KIND.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Queue a dead job again.
    Retry { id: String },
}

#[derive(Subcommand)]
pub enum NodeCmd {
    /// Live nodes: name, instance, channels held, started, last heartbeat.
    List,
}

#[derive(Subcommand)]
pub enum PluginCmd {
    /// Loaded connector plugins: kind, version, ABI version, file, running channels.
    List,
}

#[derive(Subcommand)]
pub enum ChannelCmd {
    /// Connect a messenger account (administrators); charged from today.
    Add {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        actor: i64,
        /// Connector kind, see `patchbayctl plugin list`.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        name: String,
        /// Connector configuration as a JSON object.
        #[arg(long, default_value = "{}")]
        connector_config: String,
    },
    /// Disconnect a channel (administrators); its history is kept.
    Remove {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        actor: i64,
        #[arg(long)]
        channel: i64,
    },
    /// Channels with number, status and daily price.
    List(AccountArg),
}

#[derive(Subcommand)]
pub enum SettingsCmd {
    /// The account's four general settings.
    Get(AccountArg),
    /// Change one setting (administrators): VALUE is JSON, e.g. true, 5, "+7 (###) ###-##-##".
    Set {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        actor: i64,
        key: String,
        value: String,
    },
}

#[derive(Subcommand)]
pub enum FieldCmd {
    /// Define an additional field (administrators).
    Add {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        actor: i64,
        #[arg(long)]
        name: String,
        /// text, number, date, link, email, phone, checkbox or list
        #[arg(long = "type")]
        field_type: String,
        /// Options of a list field, repeatable: --option new --option vip
        #[arg(long = "option")]
        options: Vec<String>,
    },
    List(AccountArg),
    /// Remove a field and all its values (administrators).
    Remove {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        actor: i64,
        #[arg(long)]
        field: i64,
    },
}

#[derive(Subcommand)]
pub enum ChatCmd {
    /// Start a chat with a phone number, checked against the account's mask; the
    /// channel's existing chat with it comes back as it is (a closed one stays closed).
    Create {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        actor: i64,
        #[arg(long)]
        channel: i64,
        #[arg(long)]
        phone: String,
    },
    /// Chats, as a user sees them with --as-user.
    List {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        as_user: Option<i64>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// The chat card.
    Get { chat: i64 },
    /// Messages, newest first.
    Messages {
        chat: i64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        before: Option<i64>,
    },
    /// Make a user responsible (omit --user to clear).
    Assign {
        chat: i64,
        #[arg(long)]
        actor: i64,
        #[arg(long)]
        user: Option<i64>,
    },
    Open {
        chat: i64,
        #[arg(long)]
        actor: i64,
    },
    Close {
        chat: i64,
        #[arg(long)]
        actor: i64,
    },
    /// Set an additional field's value as you would type it; the daemon reads it by the
    /// field's type: `42`, `2026-11-25`, `true`, `+7 916 123-45-67`, `vip`, any text.
    SetField {
        chat: i64,
        #[arg(long)]
        actor: i64,
        #[arg(long)]
        field: i64,
        #[arg(required_unless_present = "clear")]
        value: Option<String>,
        /// Remove the value instead.
        #[arg(long, conflicts_with = "value")]
        clear: bool,
    },
}

#[derive(Subcommand)]
pub enum BillingCmd {
    /// Queue the billing run of a day (default: today; at most billing.catch_up_days
    /// back, never after today); a day is only ever run once.
    Run {
        /// YYYY-MM-DD
        #[arg(long)]
        date: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum DataCmd {
    /// Delete all messages, chats and contacts from before now, in the background
    /// (administrators). Channels keep working; new traffic is kept.
    Delete {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        actor: i64,
        /// Follow the run with a progress bar until it finishes.
        #[arg(long)]
        watch: bool,
    },
    /// The latest deletion run: counts, remaining estimate, state.
    Status {
        #[arg(long)]
        account: i64,
        #[arg(long)]
        watch: bool,
    },
}

impl Command {
    /// The account whose deletion run to follow, for `--watch`.
    pub fn watch_deletion(&self) -> Option<i64> {
        match self {
            Command::Data(DataCmd::Delete {
                account,
                watch: true,
                ..
            })
            | Command::Data(DataCmd::Status {
                account,
                watch: true,
            }) => Some(*account),
            _ => None,
        }
    }
}

#[derive(Subcommand)]
pub enum MessageCmd {
    /// Send a message to the chat's client.
    Send {
        chat: i64,
        #[arg(long)]
        actor: i64,
        text: String,
    },
}

fn json_arg(what: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{what} is not valid JSON: {e}"))
}

fn object(pairs: Vec<(&str, Value)>) -> Value {
    let map: Map<String, Value> = pairs
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    Value::Object(map)
}

impl Command {
    /// How the command's result is shown in a table format.
    pub fn view(&self) -> View {
        use Resource as R;
        match self {
            Command::Status => View::Status,
            Command::Account(AccountCmd::Create { .. }) => View::AccountCreated,
            Command::Account(AccountCmd::Get(_)) => View::Of(R::Account),
            Command::Account(AccountCmd::Topup { .. } | AccountCmd::Ledger { .. }) => {
                View::Of(R::Ledger)
            }
            Command::User(_) => View::Of(R::User),
            Command::Job(JobCmd::Enqueue { .. }) => View::Generic,
            Command::Job(_) => View::Of(R::Job),
            Command::Node(_) => View::Of(R::Node),
            Command::Plugin(_) => View::Of(R::Plugin),
            Command::Channel(_) => View::Of(R::Channel),
            Command::Settings(_) => View::Of(R::Settings),
            Command::Field(FieldCmd::Remove { .. }) => View::Generic,
            Command::Field(_) => View::Of(R::Field),
            Command::Chat(ChatCmd::Get { .. }) => View::ChatCard,
            Command::Chat(ChatCmd::Messages { .. }) => View::Of(R::Message),
            Command::Chat(ChatCmd::Close { .. } | ChatCmd::SetField { .. }) => View::Generic,
            Command::Chat(_) => View::Of(R::Chat),
            Command::Data(_) => View::Of(R::Deletion),
            Command::Message(_)
            | Command::Billing(_)
            | Command::Call { .. }
            | Command::Top { .. }
            | Command::Completions { .. }
            | Command::Man => View::Generic,
        }
    }
}

/// The method and params a command stands for; `None` for the commands that call no
/// single method (`top`, `completions`, `man`).
pub fn to_call(cmd: &Command) -> anyhow::Result<Option<(String, Value)>> {
    Ok(Some(match cmd {
        Command::Top { .. } | Command::Completions { .. } | Command::Man => return Ok(None),
        Command::Status => ("status".into(), json!({})),
        Command::Call { method, params } => {
            let params = match params {
                Some(p) => json_arg("params", p)?,
                None => json!({}),
            };
            (method.clone(), params)
        }
        Command::Account(a) => match a {
            AccountCmd::Create {
                name,
                currency,
                admin_name,
                admin_email,
            } => (
                "account.create".into(),
                object(vec![
                    ("name", json!(name)),
                    ("currency", json!(currency)),
                    ("admin", json!({ "name": admin_name, "email": admin_email })),
                ]),
            ),
            AccountCmd::Get(AccountArg { account }) => {
                ("account.get".into(), json!({ "account": account }))
            }
            AccountCmd::Topup {
                account,
                amount,
                reference,
            } => (
                "account.topup".into(),
                json!({ "account": account, "amount": amount, "reference": reference }),
            ),
            AccountCmd::Ledger { account, limit } => (
                "account.ledger".into(),
                json!({ "account": account, "limit": limit }),
            ),
        },
        Command::User(UserCmd::Add {
            account,
            name,
            email,
            role,
        }) => (
            "user.add".into(),
            json!({ "account": account, "name": name, "email": email, "role": role }),
        ),
        Command::Job(j) => match j {
            JobCmd::Enqueue { kind, payload } => (
                "job.enqueue".into(),
                json!({ "kind": kind, "payload": json_arg("--payload", payload)? }),
            ),
            JobCmd::Get { id } => ("job.get".into(), json!({ "id": id })),
            JobCmd::List { state, kind, limit } => (
                "job.list".into(),
                object(vec![
                    ("state", json!(state)),
                    ("kind", json!(kind)),
                    ("limit", json!(limit)),
                ]),
            ),
            JobCmd::Retry { id } => ("job.retry".into(), json!({ "id": id })),
        },
        Command::Node(NodeCmd::List) => ("node.list".into(), json!({})),
        Command::Plugin(PluginCmd::List) => ("plugin.list".into(), json!({})),
        Command::Channel(c) => match c {
            ChannelCmd::Add {
                account,
                actor,
                kind,
                name,
                connector_config,
            } => (
                "channel.add".into(),
                json!({
                    "account": account, "actor": actor, "kind": kind, "name": name,
                    "config": json_arg("--connector-config", connector_config)?,
                }),
            ),
            ChannelCmd::Remove {
                account,
                actor,
                channel,
            } => (
                "channel.remove".into(),
                json!({ "account": account, "actor": actor, "channel": channel }),
            ),
            ChannelCmd::List(AccountArg { account }) => {
                ("channel.list".into(), json!({ "account": account }))
            }
        },
        Command::Settings(SettingsCmd::Get(AccountArg { account })) => {
            ("settings.get".into(), json!({ "account": account }))
        }
        Command::Settings(SettingsCmd::Set {
            account,
            actor,
            key,
            value,
        }) => {
            // A bare word that is not JSON is taken as a string: `phone_format none`.
            let value = serde_json::from_str(value).unwrap_or_else(|_| json!(value));
            (
                "settings.set".into(),
                json!({ "account": account, "actor": actor, "key": key, "value": value }),
            )
        }
        Command::Field(f) => match f {
            FieldCmd::Add {
                account,
                actor,
                name,
                field_type,
                options,
            } => (
                "field.add".into(),
                object(vec![
                    ("account", json!(account)),
                    ("actor", json!(actor)),
                    ("name", json!(name)),
                    ("type", json!(field_type)),
                    (
                        "options",
                        if options.is_empty() {
                            Value::Null
                        } else {
                            json!(options)
                        },
                    ),
                ]),
            ),
            FieldCmd::List(AccountArg { account }) => {
                ("field.list".into(), json!({ "account": account }))
            }
            FieldCmd::Remove {
                account,
                actor,
                field,
            } => (
                "field.remove".into(),
                json!({ "account": account, "actor": actor, "field": field }),
            ),
        },
        Command::Chat(c) => match c {
            ChatCmd::Create {
                account,
                actor,
                channel,
                phone,
            } => (
                "chat.create".into(),
                json!({ "account": account, "actor": actor, "channel": channel, "phone": phone }),
            ),
            ChatCmd::List {
                account,
                as_user,
                status,
                limit,
            } => (
                "chat.list".into(),
                object(vec![
                    ("account", json!(account)),
                    ("as_user", json!(as_user)),
                    ("status", json!(status)),
                    ("limit", json!(limit)),
                ]),
            ),
            ChatCmd::Get { chat } => ("chat.get".into(), json!({ "chat": chat })),
            ChatCmd::Messages {
                chat,
                limit,
                before,
            } => (
                "chat.messages".into(),
                object(vec![
                    ("chat", json!(chat)),
                    ("limit", json!(limit)),
                    ("before", json!(before)),
                ]),
            ),
            ChatCmd::Assign { chat, actor, user } => (
                "chat.assign".into(),
                json!({ "chat": chat, "actor": actor, "user": user }),
            ),
            ChatCmd::Open { chat, actor } => {
                ("chat.open".into(), json!({ "chat": chat, "actor": actor }))
            }
            ChatCmd::Close { chat, actor } => {
                ("chat.close".into(), json!({ "chat": chat, "actor": actor }))
            }
            ChatCmd::SetField {
                chat,
                actor,
                field,
                value,
                clear,
            } => {
                // Sent as the text typed, never guessed into JSON: `42` or `89161234567`
                // must reach a text or phone field as a string. The daemon reads it by
                // the field's type, the one place that knows it.
                let value = if *clear { Value::Null } else { json!(value) };
                (
                    "chat.set_field".into(),
                    json!({ "chat": chat, "actor": actor, "field": field, "value": value }),
                )
            }
        },
        Command::Billing(BillingCmd::Run { date }) => {
            ("billing.run".into(), object(vec![("date", json!(date))]))
        }
        Command::Data(DataCmd::Delete { account, actor, .. }) => (
            "data.delete".into(),
            json!({ "account": account, "actor": actor }),
        ),
        Command::Data(DataCmd::Status { account, .. }) => {
            ("data.deletion_status".into(), json!({ "account": account }))
        }
        Command::Message(MessageCmd::Send { chat, actor, text }) => (
            "message.send".into(),
            json!({ "chat": chat, "actor": actor, "text": text }),
        ),
    }))
}
