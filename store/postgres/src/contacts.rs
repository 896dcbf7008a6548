//! Contacts on PostgreSQL: which contact a sender is, found by any of its keys or
//! created at most once per (account, epoch, identity). `Contacts` is the contact book
//! of one transaction — an inbound batch's (`inbound_batch::store_messages`) or the
//! single sender of a chat an operator opens (`find_or_create_contact`).
//!
//! The rules are the domain's (`patchbay_jobs::contact`). Locking: a sender the first
//! lookup did not settle may be one another writer is creating right now, from a
//! message carrying other keys of the same client: its keys are locked
//! (`locks::hold_contact_keys`) and looked up again before any contact is created.
//! New contacts are inserted by identity (`ON CONFLICT DO NOTHING`, the winner read
//! back), then filled in by id, in that order in every writer.

use std::collections::{BTreeMap, HashMap, HashSet};

use patchbay_jobs::contact::{ContactBook, KnownContact, Sender};
use patchbay_jobs::error::DomainError;
use patchbay_jobs::model::Id;
use patchbay_jobs::store::StoreResult;

use crate::locks;

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

/// The columns of a `FoundContact`, of a `contacts` row named `c`.
const CONTACT: &str = "c.account_id, c.epoch, c.id, c.phone, c.username, c.name, \
     c.sender_channel_id, c.sender_id";

/// A contact as looked up, with the (account, epoch) it belongs to.
#[derive(sqlx::FromRow)]
struct FoundContact {
    account_id: Id,
    epoch: i64,
    #[sqlx(flatten)]
    contact: KnownContact,
}

/// A contact the batch creates.
struct NewContact {
    account: Id,
    epoch: i64,
    identity: String,
    /// As the batch leaves it; its id is the placeholder `-(index + 1)`.
    contact: KnownContact,
}

/// The contacts of a batch: what the lookups found, per (account, epoch), what the
/// batch's messages create (under placeholder ids, negative, until `write`) and fill in.
#[derive(Default)]
pub(crate) struct Contacts {
    books: HashMap<(Id, i64), ContactBook>,
    new: Vec<NewContact>,
    /// Existing contacts that the batch fills in, as it leaves them, by id.
    fills: BTreeMap<Id, KnownContact>,
}

impl Contacts {
    /// Looks up every contact the senders may be, by any of their keys, in one
    /// statement; the books remember them oldest first (the first match wins).
    pub(crate) async fn look_up(
        &mut self,
        tx: &mut Tx<'_>,
        senders: &[((Id, i64), Sender<'_>)],
    ) -> StoreResult<()> {
        let mut phones: HashSet<(Id, i64, &str)> = HashSet::new();
        let mut ids: HashSet<(Id, i64, Id, &str)> = HashSet::new();
        let mut usernames: HashSet<(Id, i64, &str)> = HashSet::new();
        for ((account, epoch), s) in senders {
            if let Some(p) = s.phone {
                phones.insert((*account, *epoch, p));
            }
            if let Some((ch, id)) = s.id {
                ids.insert((*account, *epoch, ch, id));
            }
            if let Some(u) = s.username {
                usernames.insert((*account, *epoch, u));
            }
        }
        if phones.is_empty() && ids.is_empty() && usernames.is_empty() {
            return Ok(());
        }
        let unzip3 = |set: HashSet<(Id, i64, &str)>| {
            let mut out = (Vec::new(), Vec::new(), Vec::<String>::new());
            for (a, e, k) in set {
                out.0.push(a);
                out.1.push(e);
                out.2.push(k.to_owned());
            }
            out
        };
        let (p_acc, p_ep, p_key) = unzip3(phones);
        let (u_acc, u_ep, u_key) = unzip3(usernames);
        let (mut i_acc, mut i_ep, mut i_ch, mut i_id) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::<String>::new());
        for (a, e, ch, id) in ids {
            i_acc.push(a);
            i_ep.push(e);
            i_ch.push(ch);
            i_id.push(id.to_owned());
        }
        // One lateral probe of an index per key: OFFSET 0 keeps the planner from
        // flattening it into a hash join over the whole table, which it picks while the
        // table's statistics are young (a scan of every contact per batch).
        let found: Vec<FoundContact> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {CONTACT} FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[]) \
             AS k(account, epoch, phone) CROSS JOIN LATERAL (SELECT * FROM contacts \
                 WHERE account_id = k.account AND epoch = k.epoch AND phone = k.phone \
                 OFFSET 0) AS c \
             UNION \
             SELECT {CONTACT} FROM UNNEST($4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::TEXT[]) \
             AS k(account, epoch, channel, sender) CROSS JOIN LATERAL (SELECT * FROM contacts \
                 WHERE account_id = k.account AND epoch = k.epoch \
                 AND sender_channel_id = k.channel AND sender_id = k.sender \
                 OFFSET 0) AS c \
             UNION \
             SELECT {CONTACT} FROM UNNEST($8::BIGINT[], $9::BIGINT[], $10::TEXT[]) \
             AS k(account, epoch, username) CROSS JOIN LATERAL (SELECT * FROM contacts \
                 WHERE account_id = k.account AND epoch = k.epoch AND username = k.username \
                 OFFSET 0) AS c \
             ORDER BY id"
        )))
        .bind(&p_acc)
        .bind(&p_ep)
        .bind(&p_key)
        .bind(&i_acc)
        .bind(&i_ep)
        .bind(&i_ch)
        .bind(&i_id)
        .bind(&u_acc)
        .bind(&u_ep)
        .bind(&u_key)
        .fetch_all(&mut **tx)
        .await?;
        for f in found {
            self.books
                .entry((f.account_id, f.epoch))
                .or_default()
                .remember(&f.contact);
        }
        Ok(())
    }

    /// Senders with a key whose first key found no contact may be a client another
    /// writer is creating a contact for right now (perhaps from a message with other
    /// keys of it): holds their keys until the commit, then looks them up again, so a
    /// contact committed meanwhile is found rather than made twice.
    pub(crate) async fn hold_unsettled(
        &mut self,
        tx: &mut Tx<'_>,
        senders: &[((Id, i64), Sender<'_>)],
    ) -> StoreResult<()> {
        let unsettled: Vec<((Id, i64), Sender<'_>)> = senders
            .iter()
            .filter(|(at, s)| s.has_key() && !self.books.get(at).is_some_and(|b| b.settles(s)))
            .copied()
            .collect();
        if unsettled.is_empty() {
            return Ok(());
        }
        let mut keys: BTreeMap<(Id, i64), Vec<String>> = BTreeMap::new();
        for (at, s) in &unsettled {
            keys.entry(*at).or_default().extend(s.keys());
        }
        let keys: Vec<((Id, i64), Vec<String>)> = keys.into_iter().collect();
        locks::hold_contact_keys(tx, &keys).await?;
        self.look_up(tx, &unsettled).await
    }

    /// The contact `sender` is in `(account, epoch)`: found (and filled in where it
    /// lacked what the message tells) or to be created under its identity; `chat` is
    /// the message's (channel, external chat id). The id is a placeholder (negative)
    /// for a contact to create.
    pub(crate) fn contact_for(
        &mut self,
        at: (Id, i64),
        sender: &Sender<'_>,
        chat: (Id, &str),
    ) -> Id {
        let book = self.books.entry(at).or_default();
        let Some(found) = book.find(sender) else {
            let id = -(self.new.len() as Id) - 1;
            let contact = KnownContact::new(id, sender);
            book.remember(&contact);
            self.new.push(NewContact {
                account: at.0,
                epoch: at.1,
                identity: sender.identity(chat),
                contact,
            });
            return id;
        };
        if let Some(c) = found.filled_by(sender) {
            book.refresh(&c);
            if c.id < 0 {
                let k = (-c.id - 1) as usize;
                self.new[k].contact = c;
            } else {
                self.fills.insert(c.id, c);
            }
        }
        found.id
    }

    /// Writes the batch's contacts: the new ones (inserted in (account, epoch,
    /// identity) order; one another writer created meanwhile is read back and filled
    /// in instead), then the fill-ins, in id order under row locks taken in that
    /// order. Returns the real id of each placeholder.
    pub(crate) async fn write(mut self, tx: &mut Tx<'_>, now: i64) -> StoreResult<HashMap<Id, Id>> {
        let mut real: HashMap<Id, Id> = HashMap::with_capacity(self.new.len());
        if !self.new.is_empty() {
            self.new.sort_by(|a, b| {
                (a.account, a.epoch, &a.identity).cmp(&(b.account, b.epoch, &b.identity))
            });
            let c = &self.new;
            let accounts: Vec<Id> = c.iter().map(|n| n.account).collect();
            let epochs: Vec<i64> = c.iter().map(|n| n.epoch).collect();
            let identities: Vec<&str> = c.iter().map(|n| n.identity.as_str()).collect();
            let phones: Vec<Option<&str>> = c.iter().map(|n| n.contact.phone.as_deref()).collect();
            let usernames: Vec<Option<&str>> =
                c.iter().map(|n| n.contact.username.as_deref()).collect();
            let names: Vec<Option<&str>> = c.iter().map(|n| n.contact.name.as_deref()).collect();
            let sender_channels: Vec<Option<Id>> =
                c.iter().map(|n| n.contact.sender_channel_id).collect();
            let sender_ids: Vec<Option<&str>> =
                c.iter().map(|n| n.contact.sender_id.as_deref()).collect();
            let mut created: HashMap<(Id, i64, String), Id> =
                sqlx::query_as::<_, (Id, Id, i64, String)>(
                    "INSERT INTO contacts (account_id, epoch, identity, phone, username, name, \
                     sender_channel_id, sender_id, created_at) \
                     SELECT k.account, k.epoch, k.identity, k.phone, k.username, k.name, \
                     k.sender_channel, k.sender_id, $9 \
                     FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[], $4::TEXT[], \
                                 $5::TEXT[], $6::TEXT[], $7::BIGINT[], $8::TEXT[]) \
                     AS k(account, epoch, identity, phone, username, name, sender_channel, \
                          sender_id) \
                     ON CONFLICT (account_id, epoch, identity) DO NOTHING \
                     RETURNING id, account_id, epoch, identity",
                )
                .bind(&accounts)
                .bind(&epochs)
                .bind(&identities)
                .bind(&phones)
                .bind(&usernames)
                .bind(&names)
                .bind(&sender_channels)
                .bind(&sender_ids)
                .bind(now)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(|(id, a, e, identity)| ((a, e, identity), id))
                .collect();
            if created.len() < self.new.len() {
                // Another writer's contact holds the identity (ON CONFLICT waited for
                // its commit): that row is the contact, and gets what this batch knows.
                let existing: Vec<(String, FoundContact)> = sqlx::query_as::<_, ExistingContact>(
                    "SELECT c.identity, c.account_id, c.epoch, c.id, c.phone, c.username, \
                     c.name, c.sender_channel_id, c.sender_id \
                     FROM UNNEST($1::BIGINT[], $2::BIGINT[], $3::TEXT[]) AS k(account, epoch, identity) \
                     JOIN contacts c ON c.account_id = k.account AND c.epoch = k.epoch \
                     AND c.identity = k.identity",
                )
                .bind(&accounts)
                .bind(&epochs)
                .bind(&identities)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(|e| (e.identity, e.found))
                .collect();
                for (identity, f) in existing {
                    let key = (f.account_id, f.epoch, identity);
                    if created.contains_key(&key) {
                        continue;
                    }
                    let mine = self
                        .new
                        .iter()
                        .find(|n| (n.account, n.epoch, &n.identity) == (key.0, key.1, &key.2));
                    if let Some(filled) =
                        mine.and_then(|n| f.contact.filled_by(&sender_of(&n.contact)))
                    {
                        self.fills.insert(filled.id, filled);
                    }
                    created.insert(key, f.contact.id);
                }
            }
            for n in &self.new {
                let id = created
                    .get(&(n.account, n.epoch, n.identity.clone()))
                    .copied()
                    .ok_or_else(|| {
                        DomainError::Unavailable("a new contact was not created".into())
                    })?;
                real.insert(n.contact.id, id);
            }
        }
        if self.fills.is_empty() {
            return Ok(real);
        }
        let f: Vec<&KnownContact> = self.fills.values().collect();
        let ids: Vec<Id> = f.iter().map(|c| c.id).collect();
        let phones: Vec<Option<&str>> = f.iter().map(|c| c.phone.as_deref()).collect();
        let usernames: Vec<Option<&str>> = f.iter().map(|c| c.username.as_deref()).collect();
        let names: Vec<Option<&str>> = f.iter().map(|c| c.name.as_deref()).collect();
        let sender_channels: Vec<Option<Id>> = f.iter().map(|c| c.sender_channel_id).collect();
        let sender_ids: Vec<Option<&str>> = f.iter().map(|c| c.sender_id.as_deref()).collect();
        // Only gaps are filled (COALESCE), so a row another writer filled meanwhile
        // keeps what it got first. Locked in id order first, as the chats' bump.
        sqlx::query(
            "WITH held AS MATERIALIZED (SELECT id FROM contacts WHERE id = ANY($1::BIGINT[]) \
                                        ORDER BY id FOR NO KEY UPDATE) \
             UPDATE contacts SET phone = COALESCE(contacts.phone, k.phone), \
             username = COALESCE(contacts.username, k.username), \
             name = COALESCE(contacts.name, k.name), \
             sender_channel_id = CASE WHEN contacts.sender_id IS NULL THEN k.sender_channel \
                                 ELSE contacts.sender_channel_id END, \
             sender_id = COALESCE(contacts.sender_id, k.sender_id) \
             FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[], \
                         $6::TEXT[]) AS k(id, phone, username, name, sender_channel, sender_id) \
             WHERE contacts.id = k.id AND contacts.id IN (SELECT id FROM held)",
        )
        .bind(&ids)
        .bind(&phones)
        .bind(&usernames)
        .bind(&names)
        .bind(&sender_channels)
        .bind(&sender_ids)
        .execute(&mut **tx)
        .await?;
        Ok(real)
    }
}

/// A contact read back by its identity.
#[derive(sqlx::FromRow)]
struct ExistingContact {
    identity: String,
    #[sqlx(flatten)]
    found: FoundContact,
}

/// What a contact the batch meant to create tells about its sender.
fn sender_of(c: &KnownContact) -> Sender<'_> {
    Sender {
        phone: c.phone.as_deref(),
        id: c.sender_channel_id.zip(c.sender_id.as_deref()),
        username: c.username.as_deref(),
        name: c.name.as_deref(),
    }
}

/// The one contact of `(account, epoch)` that `sender` is, found or created, for a chat
/// an operator opens (`chat`: its channel and external id). The caller holds the epoch.
pub(crate) async fn find_or_create_contact(
    tx: &mut Tx<'_>,
    at: (Id, i64),
    sender: Sender<'_>,
    chat: (Id, &str),
    now: i64,
) -> StoreResult<Id> {
    let senders = [(at, sender)];
    let mut contacts = Contacts::default();
    contacts.look_up(tx, &senders).await?;
    contacts.hold_unsettled(tx, &senders).await?;
    let id = contacts.contact_for(at, &sender, chat);
    let real = contacts.write(tx, now).await?;
    Ok(if id < 0 {
        real.get(&id)
            .copied()
            .ok_or_else(|| DomainError::Unavailable("a new contact was not created".into()))?
    } else {
        id
    })
}
