//! Which fields each resource shows, in which order, and how each is read: the curated
//! columns of patchbayctl's tables (`kubectl get` style), plus the ones `-o wide` adds.
//! Money stays the integer minor units the daemon keeps (SPEC §5 gives no decimal
//! places per currency), so its headers say so.

/// What a column holds, and so how its cell is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Text,
    /// Free text that may run long (a reason, an error, a message): cut in list tables
    /// unless `-o wide`, whole in single-object views.
    Prose,
    /// Unix milliseconds: relative by default, RFC 3339 with `-o wide`.
    Time,
    /// Integer minor units, right-aligned.
    Money,
    /// A status word, coloured on a terminal.
    Status,
    /// `attempts/max_attempts`: the value over the number at the other key.
    OutOf(&'static str),
    /// An array as `a, b, c`.
    List,
    /// A channel's connector config as `key=value`, secret values masked.
    Config,
    /// Anything else as compact JSON.
    Json,
}

#[derive(Clone, Copy, Debug)]
pub struct Column {
    pub header: &'static str,
    /// A JSON pointer into the row.
    pub path: &'static str,
    pub kind: Kind,
    /// Shown only with `-o wide`.
    pub wide: bool,
}

const fn col(header: &'static str, path: &'static str, kind: Kind) -> Column {
    Column {
        header,
        path,
        kind,
        wide: false,
    }
}

const fn wide(header: &'static str, path: &'static str, kind: Kind) -> Column {
    Column {
        header,
        path,
        kind,
        wide: true,
    }
}

use Kind::*;

const CHANNEL: &[Column] = &[
    col("ID", "/id", Text),
    col("NAME", "/name", Text),
    col("KIND", "/kind", Text),
    col("NUMBER", "/number", Text),
    col("STATUS", "/status", Status),
    col("REASON", "/status_reason", Prose),
    col("PRICE/DAY (MINOR UNITS)", "/daily_price", Money),
    wide("OWNER", "/owner", Text),
    wide("EPOCH", "/lease_epoch", Text),
    wide("DISPLAY NAME", "/display_name", Text),
    wide("ACCOUNT", "/account", Text),
    wide("CREATED", "/created_at", Time),
    wide("REMOVED", "/removed_at", Time),
    wide("CONFIG", "/config", Config),
];

const ACCOUNT: &[Column] = &[
    col("ID", "/id", Text),
    col("NAME", "/name", Text),
    col("CURRENCY", "/currency", Text),
    col("BALANCE (MINOR UNITS)", "/balance", Money),
    col("DAILY TOTAL (MINOR UNITS)", "/daily_total", Money),
    col("DAYS LEFT", "/days_until_disconnection", Text),
    col("CREATED", "/created_at", Time),
    wide("PHONE FORMAT", "/settings/phone_format", Text),
    wide("BALANCE NOTIFY DAYS", "/settings/balance_notify_days", Text),
    wide("MARK READ ON OPEN", "/settings/mark_read_on_open", Text),
    wide(
        "RESET RESPONSIBLE ON CLOSE",
        "/settings/reset_responsible_on_close",
        Text,
    ),
];

const USER: &[Column] = &[
    col("ID", "/id", Text),
    col("NAME", "/name", Text),
    col("EMAIL", "/email", Text),
    col("ROLE", "/role", Text),
    col("ACCOUNT", "/account", Text),
    col("CREATED", "/created_at", Time),
];

const LEDGER: &[Column] = &[
    col("ID", "/id", Text),
    col("WHEN", "/created_at", Time),
    col("KIND", "/kind", Text),
    col("AMOUNT (MINOR UNITS)", "/amount", Money),
    col("BALANCE AFTER", "/balance_after", Money),
    col("CHANNEL", "/channel", Text),
    col("DAY", "/day", Text),
    col("REFERENCE", "/reference", Text),
    wide("ACCOUNT", "/account", Text),
    wide("RESUMED CHANNELS", "/resumed_channels", List),
];

const JOB: &[Column] = &[
    col("ID", "/id", Text),
    col("KIND", "/kind", Text),
    col("STATE", "/state", Status),
    col("ATTEMPTS", "/attempts", OutOf("/max_attempts")),
    col("CREATED", "/created_at", Time),
    col("UPDATED", "/updated_at", Time),
    col("LAST ERROR", "/last_error", Prose),
    wide("RUN AT", "/run_at", Time),
    wide("KEY", "/idempotency_key", Text),
    wide("PAYLOAD", "/payload", Json),
];

const PLUGIN: &[Column] = &[
    col("KIND", "/kind", Text),
    col("VERSION", "/version", Text),
    col("ABI", "/abi_version", Text),
    col("CHANNELS", "/channels", Text),
    col("FILE", "/file", Text),
    wide("SECRET KEYS", "/secret_keys", List),
];

const FIELD: &[Column] = &[
    col("ID", "/id", Text),
    col("NAME", "/name", Text),
    col("TYPE", "/type", Text),
    col("OPTIONS", "/options", List),
    col("CREATED", "/created_at", Time),
    wide("ACCOUNT", "/account", Text),
];

const CHAT: &[Column] = &[
    col("ID", "/id", Text),
    col("CHANNEL", "/channel", Text),
    col("EXTERNAL CHAT ID", "/external_chat_id", Text),
    col("STATUS", "/status", Status),
    col("RESPONSIBLE", "/responsible", Text),
    col("UNREAD", "/unread", Text),
    col("LAST MESSAGE", "/last_message_at", Time),
    wide("CONTACT", "/contact", Text),
    wide("ACCOUNT", "/account", Text),
    wide("CREATED", "/created_at", Time),
];

/// The chat card's contact, shown under the chat.
const CONTACT: &[Column] = &[
    col("CONTACT", "/id", Text),
    col("PHONE", "/phone", Text),
    col("USERNAME", "/username", Text),
    col("NAME", "/name", Text),
    col("EMAIL", "/email", Text),
    col("URL", "/url", Text),
    col("NOTES", "/notes", Text),
];

/// The chat card's additional fields.
const FIELD_VALUE: &[Column] = &[
    col("FIELD", "/field", Text),
    col("NAME", "/name", Text),
    col("TYPE", "/type", Text),
    col("VALUE", "/value", Text),
];

const MESSAGE: &[Column] = &[
    col("ID", "/id", Text),
    col("DIRECTION", "/direction", Text),
    col("STATUS", "/status", Status),
    col("AUTHOR", "/author", Text),
    col("SENT", "/sent_at", Time),
    col("TEXT", "/text", Prose),
    wide("REASON", "/status_reason", Prose),
    wide("CHANNEL", "/channel", Text),
    wide("EXTERNAL ID", "/external_message_id", Text),
    wide("ATTACHMENTS", "/attachments", Json),
    wide("STORED", "/created_at", Time),
];

const SETTINGS: &[Column] = &[
    col("PHONE FORMAT", "/phone_format", Text),
    col("BALANCE NOTIFY DAYS", "/balance_notify_days", Text),
    col("MARK READ ON OPEN", "/mark_read_on_open", Text),
    col(
        "RESET RESPONSIBLE ON CLOSE",
        "/reset_responsible_on_close",
        Text,
    ),
];

const DELETION: &[Column] = &[
    col("RUN", "/run", Text),
    col("STATE", "/state", Status),
    col("CUTOFF", "/cutoff", Time),
    col("MESSAGES DELETED", "/deleted/messages", Text),
    col("CHATS DELETED", "/deleted/chats", Text),
    col("CONTACTS DELETED", "/deleted/contacts", Text),
    col("REMAINING (ESTIMATE)", "/remaining_estimate", Text),
    col("STARTED", "/started_at", Time),
    col("FINISHED", "/finished_at", Time),
    col("JOB", "/job/id", Text),
    col("JOB STATE", "/job/state", Status),
    col("JOB ERROR", "/job/last_error", Prose),
    wide("ACCOUNT", "/account", Text),
    wide("JOB ATTEMPTS", "/job/attempts", Text),
];

const NODE: &[Column] = &[
    col("NAME", "/name", Text),
    col("INSTANCE", "/instance", Text),
    col("CHANNELS", "/channels", Text),
    col("STARTED", "/started_at", Time),
    col("HEARTBEAT", "/heartbeat_at", Time),
    col("THIS", "/this", Text),
    wide("MAX CHANNELS", "/max_channels", Text),
    wide("EXPIRES", "/expires_at", Time),
];

/// The kinds of object results are made of; each has its columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Channel,
    Account,
    User,
    Ledger,
    Job,
    Plugin,
    Field,
    Chat,
    Contact,
    FieldValue,
    Message,
    Settings,
    Deletion,
    Node,
}

impl Resource {
    pub fn columns(self) -> &'static [Column] {
        match self {
            Resource::Channel => CHANNEL,
            Resource::Account => ACCOUNT,
            Resource::User => USER,
            Resource::Ledger => LEDGER,
            Resource::Job => JOB,
            Resource::Plugin => PLUGIN,
            Resource::Field => FIELD,
            Resource::Chat => CHAT,
            Resource::Contact => CONTACT,
            Resource::FieldValue => FIELD_VALUE,
            Resource::Message => MESSAGE,
            Resource::Settings => SETTINGS,
            Resource::Deletion => DELETION,
            Resource::Node => NODE,
        }
    }

    /// The columns shown: the curated ones, and the wide ones with `-o wide`.
    pub fn shown(self, wide: bool) -> impl Iterator<Item = &'static Column> {
        self.columns().iter().filter(move |c| wide || !c.wide)
    }
}
