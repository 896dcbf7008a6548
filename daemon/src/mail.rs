//! Outgoing e-mail (balance warnings, "disconnected" notices): the `[mail]` transport
//! (an .eml spool folder or an SMTP relay via lettre), the templates and their rendering,
//! and the retryable/permanent split of send failures.
//!
//! Credentials travel inside `mail.smtp_url`; every Debug/Display here shows that URL
//! with the password replaced by `***`, and errors never quote it.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::NaiveDate;
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use patchbay_jobs::JobError;
use thiserror::Error;

/// A hung relay should fail the attempt and let the job retry with backoff.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// How a send failed. `is_retryable` decides between backoff and `dead`.
#[derive(Debug, Error)]
pub enum MailError {
    /// A `[mail]` setting is unusable; `value` is already redacted.
    #[error("{key} = {value}: {reason}")]
    Config {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("invalid e-mail address {address:?}: {reason}")]
    Address { address: String, reason: String },
    /// The message itself cannot be built (no recipients, bad message id, template).
    #[error("{0}")]
    Message(String),
    /// Connection refused, timeout, 4xx, spool folder not writable: try again later.
    #[error("sending mail via {via} failed, will retry: {reason}")]
    Retryable { via: String, reason: String },
    /// 5xx or a client-side protocol error: the same message will fail the same way.
    #[error("sending mail via {via} was refused: {reason}")]
    Permanent { via: String, reason: String },
}

impl MailError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, MailError::Retryable { .. })
    }
}

impl From<MailError> for JobError {
    fn from(e: MailError) -> Self {
        if e.is_retryable() {
            JobError::Retryable(e.to_string())
        } else {
            JobError::Permanent(e.to_string())
        }
    }
}

/// Where mail goes (`mail.transport`).
#[derive(Clone, PartialEq, Eq)]
pub enum Transport {
    /// One `<message id>.eml` per message in this folder.
    File { spool_dir: PathBuf },
    /// `smtp://host:port`, `smtp://host:587?tls=required`, `smtps://host:465`, with
    /// optional `user:password@` (percent-encoded).
    Smtp { url: String },
}

impl Transport {
    /// From the `[mail]` values; `smtp_url` is only looked at for `"smtp"`.
    pub fn from_config(
        transport: &str,
        spool_dir: &Path,
        smtp_url: &str,
    ) -> Result<Transport, MailError> {
        match transport {
            "file" => Ok(Transport::File {
                spool_dir: spool_dir.to_owned(),
            }),
            "smtp" => Ok(Transport::Smtp {
                url: smtp_url.to_owned(),
            }),
            other => Err(MailError::Config {
                key: "mail.transport",
                value: format!("{other:?}"),
                reason: "use \"file\" or \"smtp\"".to_owned(),
            }),
        }
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::File { spool_dir } => f
                .debug_struct("File")
                .field("spool_dir", spool_dir)
                .finish(),
            Transport::Smtp { url } => f
                .debug_struct("Smtp")
                .field("url", &redact_url(url))
                .finish(),
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::File { spool_dir } => write!(f, "file:{}", spool_dir.display()),
            Transport::Smtp { url } => f.write_str(&redact_url(url)),
        }
    }
}

/// `url` with the password of its `user:password@` part replaced by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let (userinfo, host) = authority.split_at(at);
    let user = match userinfo.split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        // Without "scheme://" we cannot tell a user from a secret; hide it all.
        None if scheme.is_empty() => "***".to_owned(),
        None => userinfo.to_owned(),
    };
    format!("{scheme}{user}{host}{tail}")
}

/// One e-mail, ready to send: validated recipients, plain-text and HTML bodies.
#[derive(Clone, Debug, PartialEq)]
pub struct Mail {
    /// Stable `left@right` id (no angle brackets): a rerun sends the same id, and the
    /// file spool overwrites instead of duplicating.
    pub message_id: String,
    pub to: Vec<Mailbox>,
    pub subject: String,
    pub text: String,
    pub html: String,
}

/// Sends `Mail` through the configured transport.
pub struct Mailer {
    from: Mailbox,
    sink: Sink,
}

enum Sink {
    /// The spool folder, and a lock that writes one file at a time: creating files in
    /// one folder serializes on the folder's lock in the kernel, where parallel writers
    /// only spin (3–9 % of the daemon's CPU while a billing run spooled 10,000 mails).
    File(PathBuf, tokio::sync::Mutex<()>),
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        /// For messages: the URL with its password redacted.
        shown: String,
    },
}

impl fmt::Debug for Mailer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let via = match &self.sink {
            Sink::File(dir, _) => format!("file:{}", dir.display()),
            Sink::Smtp { shown, .. } => shown.clone(),
        };
        f.debug_struct("Mailer")
            .field("from", &self.from.to_string())
            .field("via", &via)
            .finish()
    }
}

impl Mailer {
    /// Checks `from` (`mail.from`) and the SMTP URL (`mail.smtp_url`); connects lazily.
    pub fn new(transport: Transport, from: &str) -> Result<Mailer, MailError> {
        let from = from.parse::<Mailbox>().map_err(|e| MailError::Config {
            key: "mail.from",
            value: format!("{from:?}"),
            reason: format!(
                "not an e-mail address ({e}); use e.g. \"patchbay <billing@example.com>\""
            ),
        })?;
        let sink = match transport {
            Transport::File { spool_dir } => {
                if spool_dir.as_os_str().is_empty() {
                    return Err(MailError::Config {
                        key: "mail.spool_dir",
                        value: "\"\"".to_owned(),
                        reason: "a folder is required when mail.transport = \"file\"".to_owned(),
                    });
                }
                Sink::File(spool_dir, tokio::sync::Mutex::new(()))
            }
            Transport::Smtp { url } => {
                let shown = redact_url(&url);
                let bad = |reason: String| MailError::Config {
                    key: "mail.smtp_url",
                    value: format!("{shown:?}"),
                    reason: format!(
                        "{reason}; use smtp://HOST:PORT, smtp://HOST:587?tls=required or smtps://HOST:465"
                    ),
                };
                if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
                    return Err(bad("not an SMTP URL".to_owned()));
                }
                // lettre's URL errors describe the problem without quoting the URL.
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
                    .map_err(|e| bad(e.to_string()))?
                    .timeout(Some(SMTP_TIMEOUT))
                    .build();
                Sink::Smtp { transport, shown }
            }
        };
        Ok(Mailer { from, sink })
    }

    /// Sends one message. Safe to repeat: the spool overwrites by message id, and an SMTP
    /// receiver sees the same Message-ID (a duplicate is possible only if the relay
    /// accepted and the reply was lost — the job then retries, which is the lesser evil).
    pub async fn send(&self, mail: &Mail) -> Result<(), MailError> {
        let sent = self.send_once(mail).await;
        crate::metrics::mail_sent(sent.is_ok());
        sent
    }

    async fn send_once(&self, mail: &Mail) -> Result<(), MailError> {
        let message = self.message(mail)?;
        match &self.sink {
            Sink::File(dir, one_at_a_time) => {
                let _writing = one_at_a_time.lock().await;
                let (dir, id, bytes) = (dir.clone(), mail.message_id.clone(), message.formatted());
                let via = format!("file:{}", dir.display());
                tokio::task::spawn_blocking(move || spool(&dir, &id, &bytes))
                    .await
                    .map_err(|e| MailError::Retryable {
                        via,
                        reason: format!("the spool writer stopped: {e}"),
                    })?
            }
            Sink::Smtp { transport, shown } => match transport.send(message).await {
                Ok(_) => Ok(()),
                // 5xx or a local protocol problem: the same message fails the same way.
                Err(e) if e.is_permanent() || e.is_client() => Err(MailError::Permanent {
                    via: shown.clone(),
                    reason: e.to_string(),
                }),
                // Refused/reset connections, timeouts, 4xx, TLS hiccups.
                Err(e) => Err(MailError::Retryable {
                    via: shown.clone(),
                    reason: e.to_string(),
                }),
            },
        }
    }

    fn message(&self, mail: &Mail) -> Result<Message, MailError> {
        check_message_id(&mail.message_id)?;
        if mail.to.is_empty() {
            return Err(MailError::Message(format!(
                "mail {} has no recipients",
                mail.message_id
            )));
        }
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(mail.subject.as_str())
            .message_id(Some(format!("<{}>", mail.message_id)));
        for to in &mail.to {
            builder = builder.to(to.clone());
        }
        builder
            .multipart(MultiPart::alternative_plain_html(
                mail.text.clone(),
                mail.html.clone(),
            ))
            .map_err(|e| MailError::Message(format!("cannot build mail {}: {e}", mail.message_id)))
    }
}

/// Writes `<id>.eml` atomically (temp file + rename), so readers never see half a
/// message and a rerun replaces the file. Blocking: one call does the whole file.
fn spool(dir: &Path, message_id: &str, bytes: &[u8]) -> Result<(), MailError> {
    let failed = |e: std::io::Error| MailError::Retryable {
        via: format!("file:{}", dir.display()),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(failed)?;
    let path = dir.join(format!("{message_id}.eml"));
    // A unique temp name: two daemons spooling the same id must not share one.
    let tmp = dir.join(format!(".{message_id}.{}.tmp", ulid::Ulid::new()));
    if let Err(e) = std::fs::write(&tmp, bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(failed(e));
    }
    std::fs::rename(&tmp, &path).map_err(failed)
}

/// `left@right` with conservative characters: it becomes a file name and a header.
fn check_message_id(id: &str) -> Result<(), MailError> {
    let ok = |s: &str, extra: &[char]| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-') || extra.contains(&c))
    };
    match id.split_once('@') {
        Some((left, right)) if id.len() <= 200 && ok(left, &['_', '+']) && ok(right, &[]) => Ok(()),
        _ => Err(MailError::Message(format!(
            "message id {id:?} is not allowed: use letters, digits, . - _ + and one @"
        ))),
    }
}

/// The figures every billing e-mail shows.
#[derive(Clone, Copy, Debug)]
pub struct AccountFigures<'a> {
    pub name: &'a str,
    /// ISO 4217 code shown after amounts, e.g. "USD".
    pub currency: &'a str,
    /// Minor units.
    pub balance: i64,
    /// Minor units.
    pub daily_total: i64,
}

/// The four body templates, `{{placeholder}}` style.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Templates {
    pub balance_warning_text: Cow<'static, str>,
    pub balance_warning_html: Cow<'static, str>,
    pub disconnected_text: Cow<'static, str>,
    pub disconnected_html: Cow<'static, str>,
}

/// Names `{{…}}` may use.
pub const PLACEHOLDERS: [&str; 7] = [
    "account_name",
    "balance",
    "daily_total",
    "days_left",
    "days_left_text",
    "disconnect_date",
    "currency",
];

/// File names in a templates folder, in `Templates` field order.
const TEMPLATE_FILES: [&str; 4] = [
    "balance_warning.txt",
    "balance_warning.html",
    "disconnected.txt",
    "disconnected.html",
];

impl Default for Templates {
    /// The shipped templates (config/templates), compiled in so any working folder works.
    fn default() -> Self {
        Templates {
            balance_warning_text: Cow::Borrowed(include_str!(
                "../../config/templates/balance_warning.txt"
            )),
            balance_warning_html: Cow::Borrowed(include_str!(
                "../../config/templates/balance_warning.html"
            )),
            disconnected_text: Cow::Borrowed(include_str!(
                "../../config/templates/disconnected.txt"
            )),
            disconnected_html: Cow::Borrowed(include_str!(
                "../../config/templates/disconnected.html"
            )),
        }
    }
}

impl Templates {
    /// Templates from `dir`; a file that is not there keeps the built-in default. An
    /// unknown `{{name}}` is refused here rather than mailed out verbatim.
    pub fn load(dir: &Path) -> Result<Templates, MailError> {
        let mut templates = Templates::default();
        let slots = [
            &mut templates.balance_warning_text,
            &mut templates.balance_warning_html,
            &mut templates.disconnected_text,
            &mut templates.disconnected_html,
        ];
        for (file, slot) in TEMPLATE_FILES.into_iter().zip(slots) {
            let path = dir.join(file);
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(MailError::Message(format!(
                        "cannot read template {}: {e}",
                        path.display()
                    )));
                }
            };
            if let Some(unknown) = placeholders(&text).find(|p| !PLACEHOLDERS.contains(p)) {
                return Err(MailError::Message(format!(
                    "template {} uses unknown placeholder {{{{{unknown}}}}}; known: {}",
                    path.display(),
                    PLACEHOLDERS.join(", ")
                )));
            }
            *slot = Cow::Owned(text);
        }
        Ok(templates)
    }

    /// "Channels will be disconnected in N days" to the account's administrators.
    pub fn balance_warning(
        &self,
        to: &[String],
        account: &AccountFigures<'_>,
        days_left: i64,
        disconnect_date: NaiveDate,
        message_id: &str,
    ) -> Result<Mail, MailError> {
        let vars = vars(account, days_left, disconnect_date);
        Ok(Mail {
            message_id: message_id.to_owned(),
            to: mailboxes(to)?,
            subject: format!(
                "{}: channels will be disconnected in {} (on {disconnect_date})",
                header_safe(account.name),
                days_text(days_left)
            ),
            text: render(&self.balance_warning_text, &vars, false),
            html: render(&self.balance_warning_html, &vars, true),
        })
    }

    /// "Channels disconnected, balance too low", after a run suspended them.
    pub fn disconnected(
        &self,
        to: &[String],
        account: &AccountFigures<'_>,
        disconnected_on: NaiveDate,
        message_id: &str,
    ) -> Result<Mail, MailError> {
        let vars = vars(account, 0, disconnected_on);
        Ok(Mail {
            message_id: message_id.to_owned(),
            to: mailboxes(to)?,
            subject: format!(
                "{}: channels disconnected, balance too low",
                header_safe(account.name)
            ),
            text: render(&self.disconnected_text, &vars, false),
            html: render(&self.disconnected_html, &vars, true),
        })
    }
}

/// `Templates::balance_warning` with the built-in templates.
pub fn balance_warning(
    to: &[String],
    account: &AccountFigures<'_>,
    days_left: i64,
    disconnect_date: NaiveDate,
    message_id: &str,
) -> Result<Mail, MailError> {
    Templates::default().balance_warning(to, account, days_left, disconnect_date, message_id)
}

/// `Templates::disconnected` with the built-in templates.
pub fn disconnected(
    to: &[String],
    account: &AccountFigures<'_>,
    disconnected_on: NaiveDate,
    message_id: &str,
) -> Result<Mail, MailError> {
    Templates::default().disconnected(to, account, disconnected_on, message_id)
}

/// Minor units as "12.34 USD" (two decimals; integer arithmetic only).
pub fn format_money(minor: i64, currency: &str) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    let abs = minor.unsigned_abs();
    format!("{sign}{}.{:02} {currency}", abs / 100, abs % 100)
}

fn days_text(days: i64) -> String {
    if days == 1 {
        "1 day".to_owned()
    } else {
        format!("{days} days")
    }
}

fn vars(
    account: &AccountFigures<'_>,
    days_left: i64,
    date: NaiveDate,
) -> [(&'static str, String); 7] {
    [
        ("account_name", account.name.to_owned()),
        ("balance", format_money(account.balance, account.currency)),
        (
            "daily_total",
            format_money(account.daily_total, account.currency),
        ),
        ("days_left", days_left.to_string()),
        ("days_left_text", days_text(days_left)),
        ("disconnect_date", date.to_string()),
        ("currency", account.currency.to_owned()),
    ]
}

fn mailboxes(to: &[String]) -> Result<Vec<Mailbox>, MailError> {
    if to.is_empty() {
        return Err(MailError::Message("no recipients".to_owned()));
    }
    to.iter()
        .map(|address| {
            address.parse::<Mailbox>().map_err(|e| MailError::Address {
                address: address.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// An account name in a header: no line breaks or other control characters.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The `{{name}}` placeholders of a template, in order.
fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    let mut rest = template;
    std::iter::from_fn(move || {
        let start = rest.find("{{")?;
        let after = &rest[start + 2..];
        let end = after.find("}}")?;
        rest = &after[end + 2..];
        Some(after[..end].trim())
    })
}

/// One pass of `{{name}}` substitution; values are never rescanned, so an account named
/// "{{balance}}" stays literal. Unknown names are left as written.
fn render(template: &str, vars: &[(&str, String)], html: bool) -> String {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else { break };
        out.push_str(&rest[..start]);
        let name = after[..end].trim();
        match vars.iter().find(|(k, _)| *k == name) {
            Some((_, value)) if html => out.push_str(&escape_html(value)),
            Some((_, value)) => out.push_str(value),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use super::*;

    const FROM: &str = "patchbay <billing@patchbay.test>";

    fn acme() -> AccountFigures<'static> {
        AccountFigures {
            name: "Acme",
            currency: "USD",
            balance: 250,
            daily_total: 100,
        }
    }

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn admins() -> Vec<String> {
        vec!["ann@acme.test".to_owned(), "Bob <bob@acme.test>".to_owned()]
    }

    fn warning(id: &str) -> Mail {
        balance_warning(&admins(), &acme(), 3, date("2026-11-28"), id).unwrap()
    }

    fn eml_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn money_is_integer_formatted() {
        assert_eq!(format_money(1234, "USD"), "12.34 USD");
        assert_eq!(format_money(5, "EUR"), "0.05 EUR");
        assert_eq!(format_money(0, "USD"), "0.00 USD");
        assert_eq!(format_money(-50, "USD"), "-0.50 USD");
        assert_eq!(format_money(i64::MIN, "X"), "-92233720368547758.08 X");
    }

    #[test]
    fn render_substitutes_once_and_escapes_html() {
        let vars = [
            ("account_name", "<A&B> {{balance}}".to_owned()),
            ("balance", "1".to_owned()),
        ];
        assert_eq!(
            render("{{account_name}}/{{ balance }}/{{nope}}/{{", &vars, false),
            "<A&B> {{balance}}/1/{{nope}}/{{"
        );
        assert_eq!(
            render("<b>{{account_name}}</b>", &vars, true),
            "<b>&lt;A&amp;B&gt; {{balance}}</b>"
        );
    }

    #[test]
    fn shipped_templates_use_known_placeholders() {
        let t = Templates::default();
        for body in [
            &t.balance_warning_text,
            &t.balance_warning_html,
            &t.disconnected_text,
            &t.disconnected_html,
        ] {
            assert!(
                placeholders(body).all(|p| PLACEHOLDERS.contains(&p)),
                "{body}"
            );
        }
    }

    #[test]
    fn templates_load_from_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("disconnected.txt"),
            "{{account_name}} is off",
        )
        .unwrap();
        let t = Templates::load(dir.path()).unwrap();
        assert_eq!(t.disconnected_text, "{{account_name}} is off");
        assert_eq!(
            t.balance_warning_text,
            Templates::default().balance_warning_text
        );
        std::fs::write(dir.path().join("balance_warning.html"), "{{acount_name}}").unwrap();
        let err = Templates::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("acount_name"), "{err}");
    }

    #[test]
    fn builders_fill_subject_and_bodies() {
        let m = warning("warning_3_days-7-2026-11-28@patchbay");
        assert_eq!(
            m.subject,
            "Acme: channels will be disconnected in 3 days (on 2026-11-28)"
        );
        assert_eq!(m.to.len(), 2);
        for body in [&m.text, &m.html] {
            assert!(body.contains("2.50 USD"), "{body}");
            assert!(body.contains("1.00 USD"), "{body}");
            assert!(body.contains("3 days"), "{body}");
            assert!(body.contains("2026-11-28"), "{body}");
            assert!(!body.contains("{{"), "{body}");
        }
        let one = balance_warning(&admins(), &acme(), 1, date("2026-11-28"), "a@b").unwrap();
        assert!(one.subject.contains("in 1 day (on"), "{}", one.subject);

        let evil = AccountFigures {
            name: "<script>\r\nBcc: x@y",
            ..acme()
        };
        let m = disconnected(&admins(), &evil, date("2026-11-28"), "d-1@patchbay").unwrap();
        assert_eq!(
            m.subject,
            "<script>  Bcc: x@y: channels disconnected, balance too low"
        );
        assert!(m.html.contains("&lt;script&gt;"));
        assert!(!m.html.contains("<script>"));
        assert!(m.text.contains("<script>"));
    }

    #[test]
    fn bad_recipients_are_permanent() {
        let err = balance_warning(
            &["not an address".to_owned()],
            &acme(),
            3,
            date("2026-11-28"),
            "a@b",
        )
        .unwrap_err();
        assert!(matches!(err, MailError::Address { .. }), "{err}");
        assert!(!err.is_retryable());
        let err = balance_warning(&[], &acme(), 3, date("2026-11-28"), "a@b").unwrap_err();
        assert!(!err.is_retryable());
        assert!(matches!(JobError::from(err), JobError::Permanent(_)));
    }

    #[tokio::test]
    async fn file_transport_writes_one_eml() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool/mail");
        let mailer = Mailer::new(
            Transport::File {
                spool_dir: spool.clone(),
            },
            FROM,
        )
        .unwrap();
        let id = "warning_3_days-7-2026-11-28@patchbay";
        mailer.send(&warning(id)).await.unwrap();
        mailer.send(&warning(id)).await.unwrap();
        let files = eml_files(&spool);
        assert_eq!(files, vec![spool.join(format!("{id}.eml"))]);

        let eml = std::fs::read_to_string(&files[0]).unwrap();
        // Headers end at the first blank line; everything here is ASCII, so 7bit bodies.
        let (headers, body) = eml.split_once("\r\n\r\n").unwrap();
        assert!(
            headers.contains("From: patchbay <billing@patchbay.test>"),
            "{headers}"
        );
        assert!(
            headers.contains("To: ann@acme.test, Bob <bob@acme.test>"),
            "{headers}"
        );
        assert!(
            headers
                .contains("Subject: Acme: channels will be disconnected in 3 days (on 2026-11-28)"),
            "{headers}"
        );
        assert!(
            headers.contains(&format!("Message-ID: <{id}>")),
            "{headers}"
        );
        assert!(headers.contains("multipart/alternative"), "{headers}");
        assert!(
            body.contains("Content-Type: text/plain; charset=utf-8"),
            "{body}"
        );
        assert!(
            body.contains("Content-Type: text/html; charset=utf-8"),
            "{body}"
        );
        assert_eq!(body.matches("2.50 USD").count(), 2, "{body}");
        assert_eq!(body.matches("1.00 USD").count(), 2, "{body}");

        mailer
            .send(&warning("warning_1_day-7-2026-11-28@patchbay"))
            .await
            .unwrap();
        assert_eq!(eml_files(&spool).len(), 2);
    }

    #[tokio::test]
    async fn unwritable_spool_is_retryable() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-folder");
        std::fs::write(&file, "x").unwrap();
        let mailer = Mailer::new(Transport::File { spool_dir: file }, FROM).unwrap();
        let err = mailer.send(&warning("a@b")).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }

    #[tokio::test]
    async fn bad_message_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mailer = Mailer::new(
            Transport::File {
                spool_dir: dir.path().to_owned(),
            },
            FROM,
        )
        .unwrap();
        for id in ["", "no-at", "../x@y", "a@b/c", "a b@c", "a@b@c"] {
            let err = mailer.send(&warning(id)).await.unwrap_err();
            assert!(matches!(err, MailError::Message(_)), "{id}: {err}");
        }
        assert!(eml_files(dir.path()).is_empty());
    }

    #[test]
    fn bad_config_is_refused_naming_the_key() {
        let file = || Transport::File {
            spool_dir: "/tmp/x".into(),
        };
        let err = Mailer::new(file(), "not an address").unwrap_err();
        assert!(err.to_string().starts_with("mail.from = "), "{err}");
        let err = Mailer::new(file(), "").unwrap_err();
        assert!(err.to_string().starts_with("mail.from = "), "{err}");
        let err = Mailer::new(
            Transport::File {
                spool_dir: "".into(),
            },
            FROM,
        )
        .unwrap_err();
        assert!(err.to_string().starts_with("mail.spool_dir = "), "{err}");
        for url in [
            "",
            "http://mail.example.com",
            "smtp://",
            "smtp://host:99999",
            "smtp://host?tls=maybe",
            "smtp://user:hunter2@host:25?tls=bogus",
        ] {
            let err = Mailer::new(
                Transport::Smtp {
                    url: url.to_owned(),
                },
                FROM,
            )
            .unwrap_err();
            let text = err.to_string();
            assert!(text.starts_with("mail.smtp_url = "), "{url}: {text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
        let err = Transport::from_config("pigeon", Path::new("x"), "").unwrap_err();
        assert!(
            err.to_string().starts_with("mail.transport = \"pigeon\""),
            "{err}"
        );
        assert_eq!(
            Transport::from_config("smtp", Path::new("x"), "smtp://h").unwrap(),
            Transport::Smtp {
                url: "smtp://h".to_owned()
            }
        );
    }

    #[test]
    fn good_smtp_urls_are_accepted() {
        for url in [
            "smtp://127.0.0.1:2525",
            "smtp://relay.example.com:587?tls=required",
            "smtps://user:p%40ss@smtp.example.com:465",
        ] {
            Mailer::new(
                Transport::Smtp {
                    url: url.to_owned(),
                },
                FROM,
            )
            .unwrap();
        }
    }

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            redact_url("smtps://user:s3cret@smtp.example.com:465/ehlo?x=1"),
            "smtps://user:***@smtp.example.com:465/ehlo?x=1"
        );
        assert_eq!(redact_url("smtp://u:p@ss:w@rd@host"), "smtp://u:***@host");
        assert_eq!(redact_url("smtp://host:25"), "smtp://host:25");
        assert_eq!(redact_url("smtp://user@host"), "smtp://user@host");
        assert_eq!(redact_url("s3cret@host"), "***@host");

        let url = "smtp://mailer:s3cret@127.0.0.1:2525?tls=required";
        let transport = Transport::Smtp {
            url: url.to_owned(),
        };
        for shown in [format!("{transport:?}"), transport.to_string()] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(shown.contains("mailer:***@127.0.0.1"), "{shown}");
        }
        let mailer = Mailer::new(transport, FROM).unwrap();
        let shown = format!("{mailer:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("127.0.0.1"), "{shown}");
    }

    // ---- against a real SMTP server: Debian's python3-aiosmtpd writing a Maildir ----

    /// Debian's interpreter, where python3-aiosmtpd installs (pyenv's may not see it).
    fn python() -> String {
        std::env::var("PATCHBAY_TEST_PYTHON").unwrap_or_else(|_| "/usr/bin/python3".to_owned())
    }

    struct Smtpd(Child);

    impl Drop for Smtpd {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().port()
    }

    /// Starts aiosmtpd on `port`, delivering into the Maildir `dir`; waits until it listens.
    fn start_smtpd(port: u16, dir: &Path) -> Smtpd {
        let child = Command::new(python())
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} -m aiosmtpd: {e}", python()));
        let mut smtpd = Smtpd(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Some(status) = smtpd.0.try_wait().unwrap() {
                panic!(
                    "aiosmtpd exited ({status}); install it: apt-get install -y python3-aiosmtpd"
                );
            }
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        smtpd
    }

    /// Every message in the Maildir, parsed by Python's e-mail package as
    /// [subject, x-rcptto, to, [content types], plain body].
    fn maildir(dir: &Path) -> Vec<serde_json::Value> {
        let script = r#"
import email, email.policy, json, os, sys
new = os.path.join(sys.argv[1], "new")
out = []
for name in sorted(os.listdir(new)):
    with open(os.path.join(new, name), "rb") as f:
        m = email.message_from_binary_file(f, policy=email.policy.default)
    out.append([str(m["subject"]), str(m["x-rcptto"]), str(m["to"]),
                [p.get_content_type() for p in m.walk()],
                m.get_body(("plain",)).get_content()])
print(json.dumps(out))
"#;
        let output = Command::new(python())
            .args(["-c", script])
            .arg(dir)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }

    fn smtp_mailer(port: u16) -> Mailer {
        Mailer::new(
            Transport::Smtp {
                url: format!("smtp://127.0.0.1:{port}"),
            },
            FROM,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn real_smtp_delivers_the_warning() {
        let dir = tempfile::tempdir().unwrap();
        let maildir_path = dir.path().join("Maildir");
        let port = free_port();
        let _smtpd = start_smtpd(port, &maildir_path);

        smtp_mailer(port)
            .send(&warning("warning_3_days-7-2026-11-28@patchbay"))
            .await
            .unwrap();

        let got = maildir(&maildir_path);
        assert_eq!(got.len(), 1, "{got:?}");
        let m = &got[0];
        assert_eq!(
            m[0],
            "Acme: channels will be disconnected in 3 days (on 2026-11-28)"
        );
        assert_eq!(m[1], "ann@acme.test, bob@acme.test");
        assert_eq!(m[2], "ann@acme.test, Bob <bob@acme.test>");
        assert_eq!(
            m[3],
            serde_json::json!(["multipart/alternative", "text/plain", "text/html"])
        );
        let plain = m[4].as_str().unwrap();
        for figure in ["Acme", "2.50 USD", "1.00 USD", "3 days", "2026-11-28"] {
            assert!(plain.contains(figure), "{figure} missing in {plain}");
        }
    }

    #[tokio::test]
    async fn smtp_down_then_up() {
        let dir = tempfile::tempdir().unwrap();
        let maildir_path = dir.path().join("Maildir");
        let port = free_port();
        let mailer = smtp_mailer(port);
        let mail = disconnected(
            &admins(),
            &acme(),
            date("2026-11-28"),
            "disconnected-7-2026-11-28@patchbay",
        )
        .unwrap();

        let err = mailer.send(&mail).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        assert!(matches!(JobError::from(err), JobError::Retryable(_)));

        let _smtpd = start_smtpd(port, &maildir_path);
        mailer.send(&mail).await.unwrap();
        let got = maildir(&maildir_path);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0][0], "Acme: channels disconnected, balance too low");
    }
}
