//! Storing inbound messages, the store's hot path: `Store::run_inbound_batch` (many
//! `inbound_message` jobs) and `Store::store_inbound` (one) share `store_messages`.
//!
//! One `BEGIN IMMEDIATE` transaction takes a batch of jobs: it stores every message
//! that is not stored yet (the rules of `patchbay_jobs::contact`: contact by phone,
//! else by the messenger's sender id on that channel, else by username — a sender with
//! none of them writes as its chat's contact —, created under its identity; chat per
//! channel + external id in the account's current data epoch, reopen, unread, last
//! message time) and marks the jobs done in the same commit. Lookups and writes run
//! once per batch (or per channel / account), not once per message: each statement
//! costs a round trip to sqlx's connection thread, which is what bounded the per-job
//! path. The batch statements pass their rows as one JSON array read with SQLite's
//! `json_each` (PostgreSQL's store passes arrays to `UNNEST`). The single writer makes
//! every lookup-then-insert safe; the contacts' and chats' UNIQUE rules back it.

use std::collections::{HashMap, HashSet};

use serde_json::{Value, json};

use super::SqliteStore;
use super::batch_journal::{self, Ran};
use patchbay_jobs::contact::{ContactBook, KnownContact, Sender};
use patchbay_jobs::kind::{InboundMessage, JobKind};
use patchbay_jobs::model::{Id, now_ms};
use patchbay_jobs::store::{BatchedJob, InboundJob, StoreResult};

type Tx = sqlx::Transaction<'static, sqlx::Sqlite>;

/// Contacts of ($1 account, $2 epoch) whose phone / username is in the JSON array $3
/// (or whose [channel, sender id] pair is, for `BY_SENDER`), oldest first: the first
/// match wins, as it always has.
const BY_PHONE: &str = "SELECT id, phone, username, name, sender_channel_id, sender_id \
     FROM contacts WHERE account_id = $1 AND epoch = $2 \
     AND phone IN (SELECT value FROM json_each($3)) ORDER BY id";
const BY_USERNAME: &str = "SELECT id, phone, username, name, sender_channel_id, sender_id \
     FROM contacts WHERE account_id = $1 AND epoch = $2 \
     AND username IN (SELECT value FROM json_each($3)) ORDER BY id";
const BY_SENDER: &str = "SELECT DISTINCT c.id, c.phone, c.username, c.name, \
     c.sender_channel_id, c.sender_id FROM json_each($3) j JOIN contacts c \
     ON c.account_id = $1 AND c.epoch = $2 AND c.sender_channel_id = j.value ->> 0 \
     AND c.sender_id = j.value ->> 1 ORDER BY c.id";

pub(super) async fn run(store: &SqliteStore, jobs: &[InboundJob]) -> StoreResult<Vec<BatchedJob>> {
    let mut out = vec![BatchedJob::Done; jobs.len()];
    if jobs.is_empty() {
        return Ok(out);
    }
    let mut tx = store.begin_write().await?;
    let now = now_ms();
    // Storing a message is idempotent, so the journal is read only after, by the one
    // statement that finishes the jobs (`settle`): a job done before stores nothing new.
    // Most jobs (queued from connector events) have no journal row before that one.
    let msgs: Vec<(&InboundMessage, Option<&str>)> =
        jobs.iter().map(|j| (&j.msg, j.phone.as_deref())).collect();
    let stored = store_messages(&mut tx, &msgs, now).await?;
    for (i, s) in stored.into_iter().enumerate() {
        if s == Stored::UnknownChannel {
            let channel = jobs[i].msg.channel;
            out[i] = BatchedJob::Dead(format!("channel {channel} does not exist"));
        }
    }
    let ran: Vec<Ran> = jobs
        .iter()
        .map(|j| Ran {
            job: &j.job,
            // Which message it was, not its text or sender (`SCRUBBED_INBOUND`).
            payload: json!({
                "channel": j.msg.channel,
                "external_message_id": j.msg.external_message_id,
            }),
            max_attempts: j.max_attempts,
            key: None,
        })
        .collect();
    batch_journal::settle(&mut tx, JobKind::InboundMessage, &ran, &mut out, now).await?;
    tx.commit().await?;
    Ok(out)
}

/// What `store_messages` did with one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Stored {
    New,
    /// Stored before, or earlier in the same call: nothing changed.
    Duplicate,
    UnknownChannel,
}

/// Stores inbound messages (each with its sender's normalised phone) inside `tx`:
/// contacts and chats found or created in the account's current data epoch, each
/// message once per (channel, external id), chats reopened with unread and last
/// message time bumped. `now` must be taken after `tx` took the write lock, so a data
/// deletion run committed before has its cutoff at or before it and its epoch is seen.
pub(super) async fn store_messages(
    tx: &mut Tx,
    msgs: &[(&InboundMessage, Option<&str>)],
    now: i64,
) -> StoreResult<Vec<Stored>> {
    let mut out = vec![Stored::New; msgs.len()];
    // Channels: their account and the account's current data epoch.
    let channel_ids: Vec<Id> = distinct(msgs.iter().map(|(m, _)| m.channel));
    let channels: HashMap<Id, (Id, i64)> = sqlx::query_as::<_, (Id, Id, i64)>(
        "SELECT c.id, c.account_id, a.data_epoch FROM channels c \
         JOIN accounts a ON a.id = c.account_id \
         WHERE c.id IN (SELECT value FROM json_each($1))",
    )
    .bind(Value::from(channel_ids).to_string())
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|(id, account, epoch)| (id, (account, epoch)))
    .collect();
    let mut live: Vec<usize> = (0..msgs.len()).collect();
    live.retain(|&i| {
        let known = channels.contains_key(&msgs[i].0.channel);
        if !known {
            out[i] = Stored::UnknownChannel;
        }
        known
    });

    // Messages stored before, and repeats within this call, touch no contact or chat.
    let keys = Value::from(
        live.iter()
            .map(|&i| json!([msgs[i].0.channel, msgs[i].0.external_message_id]))
            .collect::<Vec<_>>(),
    );
    let mut stored: HashSet<(Id, String)> = sqlx::query_as::<_, (Id, String)>(
        "SELECT m.channel_id, m.external_message_id FROM json_each($1) j \
         JOIN messages m ON m.channel_id = j.value ->> 0 \
         AND m.external_message_id = j.value ->> 1",
    )
    .bind(keys.to_string())
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    live.retain(|&i| {
        let m = msgs[i].0;
        let new = stored.insert((m.channel, m.external_message_id.clone()));
        if !new {
            out[i] = Stored::Duplicate;
        }
        new
    });

    // Contacts and chats already there, looked up in bulk per account and channel.
    let mut contacts = lookup_contacts(tx, msgs, &live, &channels).await?;
    let mut chats = lookup_chats(tx, msgs, &live, &channels).await?;

    let mut rows = Vec::with_capacity(live.len());
    // chat id -> (new messages, latest sent_at)
    let mut bumps: HashMap<Id, (i64, i64)> = HashMap::new();
    for &i in &live {
        let (msg, phone) = msgs[i];
        let (account, epoch) = channels[&msg.channel];
        let book = contacts.entry((account, epoch)).or_default();
        let sender = Sender::of(msg, phone);
        let chat_key = (msg.channel, msg.external_chat_id.clone());
        let chat = match chats.get(&chat_key).copied() {
            Some(id) => {
                // Fills in what the contact lacked. A sender with nothing to find a
                // contact by simply writes as its chat's contact.
                if sender.has_key() {
                    let chat = (msg.channel, msg.external_chat_id.as_str());
                    contact_for(tx, book, (account, epoch), sender, chat, now).await?;
                }
                id
            }
            None => {
                // In a chat not seen before, a sender without a key is a new contact.
                // Its identity names the chat (`chat:<channel>:<external chat id>`).
                let chat = (msg.channel, msg.external_chat_id.as_str());
                let contact = contact_for(tx, book, (account, epoch), sender, chat, now).await?;
                let id: Id = sqlx::query_scalar(
                    "INSERT INTO chats (account_id, epoch, channel_id, contact_id, \
                     external_chat_id, status, created_at) \
                     VALUES ($1, $2, $3, $4, $5, 'open', $6) RETURNING id",
                )
                .bind(account)
                .bind(epoch)
                .bind(msg.channel)
                .bind(contact)
                .bind(&msg.external_chat_id)
                .bind(now)
                .fetch_one(&mut **tx)
                .await?;
                chats.insert(chat_key, id);
                id
            }
        };
        let sent_at = msg.sent_at.timestamp_millis();
        rows.push(json!([
            account,
            chat,
            msg.channel,
            msg.external_message_id,
            msg.text,
            Value::from(msg.attachments.clone()).to_string(),
            sent_at,
        ]));
        let bump = bumps.entry(chat).or_insert((0, sent_at));
        bump.0 += 1;
        bump.1 = bump.1.max(sent_at);
    }
    if rows.is_empty() {
        return Ok(out);
    }
    sqlx::query(
        "INSERT INTO messages (account_id, chat_id, channel_id, direction, \
         external_message_id, text, attachments, status, sent_at, created_at) \
         SELECT value ->> 0, value ->> 1, value ->> 2, 'in', value ->> 3, value ->> 4, \
         value ->> 5, 'received', value ->> 6, $2 FROM json_each($1)",
    )
    .bind(Value::from(rows).to_string())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    // Reopening leaves the responsible user as it is: none if closing reset it.
    let bumps: Vec<Value> = bumps
        .into_iter()
        .map(|(chat, (n, t))| json!([chat, n, t]))
        .collect();
    sqlx::query(
        "UPDATE chats SET unread = unread + j.n, status = 'open', \
         last_message_at = max(coalesce(last_message_at, j.t), j.t) \
         FROM (SELECT value ->> 0 AS id, value ->> 1 AS n, value ->> 2 AS t \
               FROM json_each($1)) AS j \
         WHERE chats.id = j.id",
    )
    .bind(Value::from(bumps).to_string())
    .execute(&mut **tx)
    .await?;
    Ok(out)
}

fn distinct<T: Eq + std::hash::Hash + Copy>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut seen = HashSet::new();
    items.filter(|x| seen.insert(*x)).collect()
}

/// The existing contacts the batch's senders may match, per (account, epoch): by phone,
/// and by username for senders whose phone (if any) matched nobody.
async fn lookup_contacts(
    tx: &mut Tx,
    msgs: &[(&InboundMessage, Option<&str>)],
    live: &[usize],
    channels: &HashMap<Id, (Id, i64)>,
) -> StoreResult<HashMap<(Id, i64), ContactBook>> {
    // (account, epoch) -> (phones, [channel, sender id] pairs, usernames) to look up
    type Keys = (Vec<Value>, Vec<Value>, Vec<Value>);
    let mut wanted: HashMap<(Id, i64), Keys> = HashMap::new();
    for &i in live {
        let (msg, phone) = msgs[i];
        let entry = wanted.entry(channels[&msg.channel]).or_default();
        if let Some(p) = phone {
            entry.0.push(p.into());
        }
        if let Some(id) = msg.sender.id.as_deref() {
            entry.1.push(json!([msg.channel, id]));
        }
        if let Some(u) = msg.sender.username.as_deref() {
            entry.2.push(u.into());
        }
    }
    let mut books = HashMap::new();
    for ((account, epoch), (phones, senders, usernames)) in wanted {
        let mut book = ContactBook::default();
        for (sql, values) in [
            (BY_PHONE, phones),
            (BY_SENDER, senders),
            (BY_USERNAME, usernames),
        ] {
            if values.is_empty() {
                continue;
            }
            let found: Vec<KnownContact> = sqlx::query_as(sql)
                .bind(account)
                .bind(epoch)
                .bind(Value::from(values).to_string())
                .fetch_all(&mut **tx)
                .await?;
            for c in &found {
                book.remember(c);
            }
        }
        books.insert((account, epoch), book);
    }
    Ok(books)
}

/// The existing chats of the batch, by (channel, external chat id), in each channel's
/// current epoch.
async fn lookup_chats(
    tx: &mut Tx,
    msgs: &[(&InboundMessage, Option<&str>)],
    live: &[usize],
    channels: &HashMap<Id, (Id, i64)>,
) -> StoreResult<HashMap<(Id, String), Id>> {
    let keys = Value::from(
        live.iter()
            .map(|&i| {
                let m = msgs[i].0;
                json!([m.channel, channels[&m.channel].1, m.external_chat_id])
            })
            .collect::<Vec<_>>(),
    );
    let rows: Vec<(Id, Id, String)> = sqlx::query_as(
        "SELECT DISTINCT c.id, c.channel_id, c.external_chat_id FROM json_each($1) j \
         JOIN chats c ON c.channel_id = j.value ->> 0 AND c.external_chat_id = j.value ->> 2 \
         AND c.epoch = j.value ->> 1",
    )
    .bind(keys.to_string())
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, channel, external)| ((channel, external), id))
        .collect())
}

/// The one contact of `(account, epoch)` that `sender` is, found or created (for a
/// chat an operator opens to a phone number, whose external chat id is `chat.1`).
pub(super) async fn find_or_create_contact(
    tx: &mut Tx,
    (account, epoch): (Id, i64),
    sender: Sender<'_>,
    chat: (Id, &str),
    now: i64,
) -> StoreResult<Id> {
    let mut book = ContactBook::default();
    let keys = [
        (BY_PHONE, sender.phone.map(Value::from)),
        (BY_SENDER, sender.id.map(|(ch, id)| json!([ch, id]))),
        (BY_USERNAME, sender.username.map(Value::from)),
    ];
    for (sql, key) in keys {
        if let Some(key) = key {
            let found: Vec<KnownContact> = sqlx::query_as(sql)
                .bind(account)
                .bind(epoch)
                .bind(json!([key]).to_string())
                .fetch_all(&mut **tx)
                .await?;
            found.iter().for_each(|c| book.remember(c));
        }
    }
    contact_for(tx, &mut book, (account, epoch), sender, chat, now).await
}

/// The contact a message's sender is: found by phone, else sender id, else username,
/// or created under its identity (`patchbay_jobs::contact::identity`; `chat` is the
/// message's (channel, external chat id)), then filled in where it lacked what the
/// message tells.
async fn contact_for(
    tx: &mut Tx,
    book: &mut ContactBook,
    (account, epoch): (Id, i64),
    sender: Sender<'_>,
    chat: (Id, &str),
    now: i64,
) -> StoreResult<Id> {
    let found = match book.find(&sender) {
        Some(c) => c,
        None => {
            let new = KnownContact::new(0, &sender);
            // The single writer looked it up first, so the conflict is only there for
            // a contact keyed so but not found (the shape PostgreSQL's writers need):
            // the row that holds the identity is the contact, filled in below.
            let created: Option<Id> = sqlx::query_scalar(
                "INSERT INTO contacts (account_id, epoch, phone, username, name, \
                 sender_channel_id, sender_id, created_at, identity) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                 ON CONFLICT (account_id, epoch, identity) DO NOTHING RETURNING id",
            )
            .bind(account)
            .bind(epoch)
            .bind(&new.phone)
            .bind(&new.username)
            .bind(&new.name)
            .bind(new.sender_channel_id)
            .bind(&new.sender_id)
            .bind(now)
            .bind(sender.identity(chat))
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(id) = created {
                let c = KnownContact { id, ..new };
                book.remember(&c);
                return Ok(id);
            }
            let c: KnownContact = sqlx::query_as(
                "SELECT id, phone, username, name, sender_channel_id, sender_id \
                 FROM contacts WHERE account_id = $1 AND epoch = $2 AND identity = $3",
            )
            .bind(account)
            .bind(epoch)
            .bind(sender.identity(chat))
            .fetch_one(&mut **tx)
            .await?;
            book.remember(&c);
            c
        }
    };
    if let Some(c) = found.filled_by(&sender) {
        sqlx::query(
            "UPDATE contacts SET name = COALESCE(name, $1), \
             username = COALESCE(username, $2), phone = COALESCE(phone, $3), \
             sender_channel_id = CASE WHEN sender_id IS NULL THEN $5 \
             ELSE sender_channel_id END, \
             sender_id = COALESCE(sender_id, $6) WHERE id = $4",
        )
        .bind(sender.name)
        .bind(sender.username)
        .bind(sender.phone)
        .bind(c.id)
        .bind(sender.id.map(|(ch, _)| ch))
        .bind(sender.id.map(|(_, id)| id))
        .execute(&mut **tx)
        .await?;
        book.refresh(&c);
    }
    Ok(found.id)
}
