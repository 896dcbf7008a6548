//! Storing inbound messages on PostgreSQL, the store's hot path: `run_inbound_batch`
//! (many `inbound_message` jobs) and `store_inbound` (one) share `store_messages`. The
//! senders' contacts are found or created by `contacts`.
//!
//! The rules are the SQLite store's (`patchbay_jobs::contact`: contact by phone, else
//! by the messenger's sender id on that channel, else by username — a sender with none
//! of them writes as its chat's contact —, chat per channel + external id in the
//! account's current data epoch, reopen, unread, last message time, each message once
//! per (channel, external id)), with the batch's jobs journalled `done` in the same
//! commit. The shape is PostgreSQL's: a handful of statements per batch whatever its
//! size, each passing its rows as arrays (`UNNEST`), and no global writer — batches of
//! several connections and several daemons run at once under READ COMMITTED, so:
//!
//! * the accounts' rows are held `FOR KEY SHARE` as their data epochs are read, so a
//!   data deletion run's start (`FOR UPDATE`) is wholly before or after the batch;
//! * every "at most once" is a constraint met with `ON CONFLICT DO NOTHING` and a read
//!   of the row that won: a contact per (account, epoch, identity), a chat per
//!   (channel, external chat id, epoch), a message per (channel, external id) — the
//!   unread count grows by the messages this batch inserted, never by one another
//!   writer stored meanwhile;
//! * a sender whose contact the lookup did not settle may be one another writer is
//!   creating right now: its keys are locked and looked up again before any contact is
//!   created (`contacts`). In the steady state (every sender known) this costs nothing;
//! * rows are written in one order by every writer — contacts (inserted by identity,
//!   then filled in by id), chats by (channel, external id), messages by (channel,
//!   external id), chats' counters by id, journal rows by id — so two batches wait for
//!   each other but never deadlock.
//!
//! PostgreSQL's TEXT cannot hold NUL, which SQLite's can and a connector may pass on
//! (JSON `\u0000`): such characters are stored as U+FFFD, so the message is stored
//! rather than refused for good.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::{Value, json};

use patchbay_jobs::contact::Sender;
use patchbay_jobs::error::DomainError;
use patchbay_jobs::kind::{InboundMessage, JobKind};
use patchbay_jobs::model::{Id, now_ms};
use patchbay_jobs::store::{BatchedJob, InboundJob, StoreResult};

use crate::PgStore;
use crate::batch_journal::{self, Ran};
use crate::contacts::Contacts;

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

pub(crate) async fn run(store: &PgStore, jobs: &[InboundJob]) -> StoreResult<Vec<BatchedJob>> {
    let mut out = vec![BatchedJob::Done; jobs.len()];
    if jobs.is_empty() {
        return Ok(out);
    }
    let mut tx = store.pool.begin().await?;
    // Storing a message is idempotent, so the journal is read only after, by the one
    // statement that finishes the jobs (`settle`): a job done before stores nothing new.
    // Most jobs (queued from connector events) have no journal row before that one.
    let msgs: Vec<(&InboundMessage, Option<&str>)> =
        jobs.iter().map(|j| (&j.msg, j.phone.as_deref())).collect();
    let (stored, now) = store_messages(&mut tx, &msgs).await?;
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
pub(crate) enum Stored {
    New,
    /// Stored before, earlier in the same call, or by another writer meanwhile:
    /// nothing changed.
    Duplicate,
    UnknownChannel,
}

/// Text as PostgreSQL can hold it: NUL becomes U+FFFD (see the module doc).
pub(crate) fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

/// One message to store, with its channel's account and epoch, as PostgreSQL takes it.
struct Incoming<'a> {
    account: Id,
    epoch: i64,
    channel: Id,
    chat: Cow<'a, str>,
    external_id: Cow<'a, str>,
    phone: Option<Cow<'a, str>>,
    sender_id: Option<Cow<'a, str>>,
    username: Option<Cow<'a, str>>,
    name: Option<Cow<'a, str>>,
}

impl<'a> Incoming<'a> {
    fn new(msg: &'a InboundMessage, phone: Option<&'a str>, (account, epoch): (Id, i64)) -> Self {
        let s = &msg.sender;
        Incoming {
            account,
            epoch,
            channel: msg.channel,
            chat: pg_text(&msg.external_chat_id),
            external_id: pg_text(&msg.external_message_id),
            phone: phone.map(pg_text),
            sender_id: s.id.as_deref().map(pg_text),
            username: s.username.as_deref().map(pg_text),
            name: s.name.as_deref().map(pg_text),
        }
    }

    fn sender(&self) -> Sender<'_> {
        Sender {
            phone: self.phone.as_deref(),
            id: self.sender_id.as_deref().map(|id| (self.channel, id)),
            username: self.username.as_deref(),
            name: self.name.as_deref(),
        }
    }

    fn book(&self) -> (Id, i64) {
        (self.account, self.epoch)
    }
}

/// A chat of the batch: found, or to be created (an index into the new chats).
#[derive(Clone, Copy)]
enum ChatRef {
    Found(Id),
    New(usize),
}

struct NewChat {
    account: Id,
    epoch: i64,
    channel: Id,
    external_id: String,
    /// Found, or new (negative: see `Contacts`).
    contact: Id,
}

/// Stores inbound messages (each with its sender's normalised phone) inside `tx`:
/// contacts and chats found or created in the account's current data epoch, each
/// message once per (channel, external id), chats reopened with unread and last
/// message time bumped. Returns what became of each message and the time the rows
/// were written at, taken once the epochs were held (after a data deletion run's
/// start that committed before, so its cutoff is at or before it).
pub(crate) async fn store_messages(
    tx: &mut Tx<'_>,
    msgs: &[(&InboundMessage, Option<&str>)],
) -> StoreResult<(Vec<Stored>, i64)> {
    let mut out = vec![Stored::New; msgs.len()];
    // Channels: their account and the account's current data epoch, the accounts held
    // FOR KEY SHARE (in id order) until the commit: a data deletion run's start locks
    // the account FOR UPDATE before it bumps the epoch, so it waits for this batch, or
    // this read waits for its commit and sees the new epoch. Never a message taken
    // after a run's cutoff into an epoch it deletes. KEY SHARE does not hold up top-ups
    // or charges (`FOR NO KEY UPDATE`). Accounts come first in FROM: PostgreSQL takes
    // the tables' locks in that order, as charges and migrations do (0005).
    let mut channel_ids: Vec<Id> = msgs.iter().map(|(m, _)| m.channel).collect();
    channel_ids.sort_unstable();
    channel_ids.dedup();
    let channels: HashMap<Id, (Id, i64)> = sqlx::query_as::<_, (Id, Id, i64)>(
        "SELECT c.id, c.account_id, a.data_epoch FROM accounts a \
         JOIN channels c ON c.account_id = a.id WHERE c.id = ANY($1::BIGINT[]) \
         ORDER BY a.id FOR KEY SHARE OF a",
    )
    .bind(&channel_ids)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|(id, account, epoch)| (id, (account, epoch)))
    .collect();
    let now = now_ms();
    let mut live: Vec<(usize, Incoming<'_>)> = Vec::with_capacity(msgs.len());
    for (i, (msg, phone)) in msgs.iter().enumerate() {
        match channels.get(&msg.channel) {
            Some(&at) => live.push((i, Incoming::new(msg, *phone, at))),
            None => out[i] = Stored::UnknownChannel,
        }
    }

    // Messages stored before, and repeats within this call, touch no contact or chat.
    let (chs, exts): (Vec<Id>, Vec<&str>) = live
        .iter()
        .map(|(_, m)| (m.channel, m.external_id.as_ref()))
        .unzip();
    let mut stored: HashSet<(Id, String)> = sqlx::query_as::<_, (Id, String)>(
        "SELECT k.channel, k.ext FROM UNNEST($1::BIGINT[], $2::TEXT[]) AS k(channel, ext) \
         CROSS JOIN LATERAL (SELECT 1 FROM messages m WHERE m.channel_id = k.channel \
                             AND m.external_message_id = k.ext LIMIT 1) AS m",
    )
    .bind(&chs)
    .bind(&exts)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    live.retain(|(i, m)| {
        let new = stored.insert((m.channel, m.external_id.to_string()));
        if !new {
            out[*i] = Stored::Duplicate;
        }
        new
    });
    if live.is_empty() {
        return Ok((out, now));
    }

    // Contacts and chats already there, in bulk; then the senders the lookup did not
    // settle are held and looked up again.
    let senders: Vec<((Id, i64), Sender<'_>)> =
        live.iter().map(|(_, m)| (m.book(), m.sender())).collect();
    let mut contacts = Contacts::default();
    contacts.look_up(tx, &senders).await?;
    contacts.hold_unsettled(tx, &senders).await?;
    let mut chats: HashMap<(Id, String), ChatRef> = lookup_chats(tx, &live)
        .await?
        .into_iter()
        .map(|(k, id)| (k, ChatRef::Found(id)))
        .collect();

    // Who each message is from and which chat it goes to, in message order, as the
    // SQLite store decides it message by message; new rows get written below.
    let mut new_chats: Vec<NewChat> = Vec::new();
    let mut placed: Vec<(usize, ChatRef)> = Vec::with_capacity(live.len());
    for (n, (_, m)) in live.iter().enumerate() {
        let sender = m.sender();
        let chat = (m.channel, m.chat.as_ref());
        let key = (m.channel, m.chat.to_string());
        let at = match chats.get(&key) {
            Some(&at) => {
                // Fills in what the contact lacked. A sender with nothing to find a
                // contact by simply writes as its chat's contact.
                if sender.has_key() {
                    contacts.contact_for(m.book(), &sender, chat);
                }
                at
            }
            None => {
                // In a chat not seen before, a sender without a key is a new contact,
                // named by the chat (`chat:<channel>:<external chat id>`).
                let contact = contacts.contact_for(m.book(), &sender, chat);
                new_chats.push(NewChat {
                    account: m.account,
                    epoch: m.epoch,
                    channel: m.channel,
                    external_id: key.1.clone(),
                    contact,
                });
                let at = ChatRef::New(new_chats.len() - 1);
                chats.insert(key, at);
                at
            }
        };
        placed.push((n, at));
    }

    let contact_ids = contacts.write(tx, now).await?;
    let new_chat_ids = create_chats(tx, &new_chats, &contact_ids, now).await?;
    let chat_id = |at: ChatRef| match at {
        ChatRef::Found(id) => id,
        ChatRef::New(k) => new_chat_ids[k],
    };

    // Messages in arrival order, so ids (which order a chat's messages) follow it as on
    // SQLite. The ones another writer stored since the check above come back as
    // conflicts and count nowhere. Two batches inserting the same redelivered messages
    // in opposite orders can deadlock; PostgreSQL aborts one, and its jobs are run one
    // by one (`run_inbound_batch`'s `Err`), which stores each once.
    placed.sort_by_key(|p| p.0);
    let mut rows = MessageRows::default();
    for &(n, at) in &placed {
        let (i, m) = &live[n];
        let msg = msgs[*i].0;
        rows.account.push(m.account);
        rows.chat.push(chat_id(at));
        rows.channel.push(m.channel);
        rows.external_id.push(m.external_id.as_ref());
        rows.text.push(pg_text(&msg.text));
        rows.attachments
            .push(pg_text(&Value::from(msg.attachments.clone()).to_string()).into_owned());
        rows.sent_at.push(msg.sent_at.timestamp_millis());
    }
    let inserted: Vec<(Id, String, Id, i64)> = sqlx::query_as(
        "INSERT INTO messages (account_id, chat_id, channel_id, direction, \
         external_message_id, text, attachments, status, sent_at, created_at) \
         SELECT k.account, k.chat, k.channel, 'in', k.ext, k.text, k.attachments, \
         'received', k.sent_at, $8 \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], \
                     $6::TEXT[], $7::BIGINT[]) \
         AS k(account, chat, channel, ext, text, attachments, sent_at) \
         ON CONFLICT (channel_id, external_message_id) DO NOTHING \
         RETURNING channel_id, external_message_id, chat_id, sent_at",
    )
    .bind(&rows.account)
    .bind(&rows.chat)
    .bind(&rows.channel)
    .bind(&rows.external_id)
    .bind(&rows.text)
    .bind(&rows.attachments)
    .bind(&rows.sent_at)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;

    // chat id -> (new messages, latest sent_at), in id order.
    let mut bumps: BTreeMap<Id, (i64, i64)> = BTreeMap::new();
    let mut new_here: HashSet<(Id, String)> = HashSet::with_capacity(inserted.len());
    for (channel, external_id, chat, sent_at) in inserted {
        let bump = bumps.entry(chat).or_insert((0, sent_at));
        bump.0 += 1;
        bump.1 = bump.1.max(sent_at);
        new_here.insert((channel, external_id));
    }
    for (i, m) in &live {
        if !new_here.contains(&(m.channel, m.external_id.to_string())) {
            out[*i] = Stored::Duplicate;
        }
    }
    if bumps.is_empty() {
        return Ok((out, now));
    }
    let (ids, (counts, times)): (Vec<Id>, (Vec<i64>, Vec<i64>)) = bumps.into_iter().unzip();
    // Locks the chats in id order first (the CTE is materialised, and each row is
    // locked as it leaves the sort), then bumps them: two batches bumping the same
    // chats take turns instead of deadlocking. Reopening leaves the responsible user
    // as it is: none if closing reset it.
    sqlx::query(
        "WITH held AS MATERIALIZED (SELECT id FROM chats WHERE id = ANY($1::BIGINT[]) \
                                    ORDER BY id FOR NO KEY UPDATE) \
         UPDATE chats SET unread = chats.unread + k.n, status = 'open', \
         last_message_at = GREATEST(COALESCE(chats.last_message_at, k.t), k.t) \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[]) AS k(id, n, t) \
         WHERE chats.id = k.id AND chats.id IN (SELECT id FROM held)",
    )
    .bind(&ids)
    .bind(&counts)
    .bind(&times)
    .execute(&mut **tx)
    .await?;
    Ok((out, now))
}

/// The `messages` rows of a batch, column by column for `UNNEST`.
#[derive(Default)]
struct MessageRows<'a> {
    account: Vec<Id>,
    chat: Vec<Id>,
    channel: Vec<Id>,
    external_id: Vec<&'a str>,
    text: Vec<Cow<'a, str>>,
    attachments: Vec<String>,
    sent_at: Vec<i64>,
}

/// The existing chats of the batch, by (channel, external chat id), in each channel's
/// current epoch.
async fn lookup_chats(
    tx: &mut Tx<'_>,
    live: &[(usize, Incoming<'_>)],
) -> StoreResult<HashMap<(Id, String), Id>> {
    let keys: HashSet<(Id, i64, &str)> = live
        .iter()
        .map(|(_, m)| (m.channel, m.epoch, m.chat.as_ref()))
        .collect();
    let mut channels = Vec::with_capacity(keys.len());
    let mut epochs = Vec::with_capacity(keys.len());
    let mut externals = Vec::with_capacity(keys.len());
    for (c, e, x) in keys {
        channels.push(c);
        epochs.push(e);
        externals.push(x);
    }
    let rows: Vec<(Id, Id, String)> = sqlx::query_as(
        "SELECT c.id, k.channel, k.ext \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[]) AS k(channel, epoch, ext) \
         CROSS JOIN LATERAL (SELECT id FROM chats WHERE channel_id = k.channel \
                             AND external_chat_id = k.ext AND epoch = k.epoch LIMIT 1) AS c",
    )
    .bind(&channels)
    .bind(&epochs)
    .bind(&externals)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, channel, external)| ((channel, external), id))
        .collect())
}

/// Creates the batch's new chats in (channel, external id) order; a chat another
/// writer created meanwhile is read back (its contact stays the one it was made with).
/// Their ids, in `new`'s order.
async fn create_chats(
    tx: &mut Tx<'_>,
    new: &[NewChat],
    contact_ids: &HashMap<Id, Id>,
    now: i64,
) -> StoreResult<Vec<Id>> {
    if new.is_empty() {
        return Ok(Vec::new());
    }
    let mut order: Vec<usize> = (0..new.len()).collect();
    order.sort_by(|&a, &b| {
        (new[a].channel, &new[a].external_id).cmp(&(new[b].channel, &new[b].external_id))
    });
    let mut contact = Vec::with_capacity(new.len());
    for &k in &order {
        let c = new[k].contact;
        contact.push(if c < 0 {
            *contact_ids.get(&c).ok_or_else(|| {
                DomainError::Unavailable("a new chat's contact was not created".into())
            })?
        } else {
            c
        });
    }
    let col = |f: fn(&NewChat) -> Id| order.iter().map(|&k| f(&new[k])).collect::<Vec<Id>>();
    let (accounts, epochs, channels) = (col(|c| c.account), col(|c| c.epoch), col(|c| c.channel));
    let externals: Vec<&str> = order.iter().map(|&k| new[k].external_id.as_str()).collect();
    let mut ids: HashMap<(Id, String), Id> = sqlx::query_as::<_, (Id, Id, String)>(
        "INSERT INTO chats (account_id, epoch, channel_id, contact_id, external_chat_id, \
         status, created_at) \
         SELECT k.account, k.epoch, k.channel, k.contact, k.ext, 'open', $6 \
         FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::BIGINT[], $4::BIGINT[], $5::TEXT[]) \
         AS k(account, epoch, channel, contact, ext) \
         ON CONFLICT (channel_id, external_chat_id, epoch) DO NOTHING \
         RETURNING id, channel_id, external_chat_id",
    )
    .bind(&accounts)
    .bind(&epochs)
    .bind(&channels)
    .bind(&contact)
    .bind(&externals)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .map(|(id, ch, ext)| ((ch, ext), id))
    .collect();
    if ids.len() < new.len() {
        // Lost to another writer: its row is committed (ON CONFLICT waited for it).
        let rows: Vec<(Id, Id, String)> = sqlx::query_as(
            "SELECT c.id, c.channel_id, c.external_chat_id \
             FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[]) AS k(channel, epoch, ext) \
             JOIN chats c ON c.channel_id = k.channel AND c.external_chat_id = k.ext \
             AND c.epoch = k.epoch",
        )
        .bind(&channels)
        .bind(&epochs)
        .bind(&externals)
        .fetch_all(&mut **tx)
        .await?;
        for (id, ch, ext) in rows {
            ids.entry((ch, ext)).or_insert(id);
        }
    }
    new.iter()
        .map(|c| {
            ids.get(&(c.channel, c.external_id.clone()))
                .copied()
                .ok_or_else(|| DomainError::Unavailable("a new chat was not created".into()))
        })
        .collect()
}
