//! `Chats` on PostgreSQL: the inbox reads and writes, outbound send leases; inbound
//! storage is in `inbound_batch`.
//!
//! Locking: the writes here are single conditional UPDATEs where one row is all they
//! read (a concurrent writer makes PostgreSQL re-check the condition on the row's
//! newest version), and take the chat's row lock first where they also read its
//! messages (`mark_read`, `close_chat`), so an inbound batch storing a message into the
//! chat at the same moment is either wholly before or wholly after them.

use async_trait::async_trait;

use patchbay_jobs::contact::Sender;
use patchbay_jobs::error::DomainError;
use patchbay_jobs::kind::InboundMessage;
use patchbay_jobs::model::{Channel, Chat, Contact, Id, Message, now_ms};
use patchbay_jobs::store::rows::decode;
use patchbay_jobs::store::*;
use patchbay_jobs::{chat_columns, message_columns};

use crate::contacts;
use crate::inbound_batch::{self, pg_text};
use crate::{PgStore, is_unique_violation};

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

#[async_trait]
impl Chats for PgStore {
    async fn create_chat(&self, channel: &Channel, phone: &str) -> StoreResult<Chat> {
        let mut tx = self.pool.begin().await?;
        // The account held as an inbound batch holds it (see `inbound_batch`).
        let epoch: i64 =
            sqlx::query_scalar("SELECT data_epoch FROM accounts WHERE id = $1 FOR KEY SHARE")
                .bind(channel.account)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| DomainError::not_found("account", channel.account))?;
        // After the epoch is held: see `inbound_batch::store_messages`.
        let now = now_ms();
        let phone = pg_text(phone);
        // The chat's external id is the phone, and so is the contact's identity.
        let contact = contacts::find_or_create_contact(
            &mut tx,
            (channel.account, epoch),
            Sender::with_phone(&phone),
            (channel.id, &phone),
            now,
        )
        .await?;
        let chat = find_or_create_chat(
            &mut tx,
            (channel.id, channel.account),
            epoch,
            &phone,
            contact,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(chat)
    }

    async fn chat(&self, id: Id) -> StoreResult<Chat> {
        let row = sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM chats c JOIN accounts a ON a.id = c.account_id \
             WHERE c.id = $1 AND c.epoch = a.data_epoch"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("chat", id))?;
        decode::<Chat, _>(&row)
    }

    async fn contact(&self, id: Id) -> StoreResult<Contact> {
        let row = sqlx::query(
            "SELECT id, phone, username, name, email, url, notes FROM contacts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("contact", id))?;
        decode::<Contact, _>(&row)
    }

    async fn chats(&self, account: Id, filter: &ChatFilter) -> StoreResult<Vec<Chat>> {
        let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM accounts WHERE id = $1")
            .bind(account)
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_none() {
            return Err(DomainError::not_found("account", account));
        }
        let rows = sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM chats c JOIN accounts a ON a.id = c.account_id \
             WHERE c.account_id = $1 AND c.epoch = a.data_epoch \
             AND ($2::BIGINT IS NULL OR c.responsible_user_id IS NULL \
                  OR c.responsible_user_id = $2) \
             AND ($3::TEXT IS NULL OR c.status = $3) \
             ORDER BY COALESCE(c.last_message_at, c.created_at) DESC, c.id DESC LIMIT $4"
        ))
        .bind(account)
        .bind(filter.visible_to_operator)
        .bind(&filter.status)
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::<Chat, _>).collect()
    }

    async fn messages(
        &self,
        chat: Id,
        limit: u32,
        before: Option<Id>,
    ) -> StoreResult<Vec<Message>> {
        self.chat(chat).await?;
        let rows = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE chat_id = $1 AND ($2::BIGINT IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(chat)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(decode::<Message, _>).collect()
    }

    async fn assign_chat(&self, chat: Id, user: Option<Id>) -> StoreResult<Chat> {
        self.chat(chat).await?;
        // One row, one statement: its row lock is all it needs.
        sqlx::query("UPDATE chats SET responsible_user_id = $1 WHERE id = $2")
            .bind(user)
            .bind(chat)
            .execute(&self.pool)
            .await?;
        self.chat(chat).await
    }

    async fn mark_read(&self, chat: Id) -> StoreResult<Chat> {
        self.chat(chat).await?;
        let mut tx = self.pool.begin().await?;
        // The chat's row first: an inbound batch bumping it either committed before
        // (the statement below, reading after the lock, then marks its messages read)
        // or waits for this commit (and counts its messages unread after the zero).
        sqlx::query("UPDATE chats SET unread = 0 WHERE id = $1")
            .bind(chat)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE messages SET status = 'read' WHERE chat_id = $1 AND direction = 'in' \
             AND status = 'received'",
        )
        .bind(chat)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.chat(chat).await
    }

    async fn close_chat(
        &self,
        chat: Id,
        reset_responsible: bool,
        requested_at: Option<i64>,
    ) -> StoreResult<Chat> {
        self.chat(chat).await?;
        let mut tx = self.pool.begin().await?;
        // The chat's row first, so the check of its messages below (a statement of its
        // own, reading what was committed once the lock was granted) sees a message an
        // inbound batch stored while holding the chat: in one statement it would not
        // (a re-check after a lock wait reruns no subquery).
        lock_chat(&mut tx, chat).await?;
        sqlx::query(
            // As if the close had run before the client wrote: the responsible is
            // reset (when the setting says so), the chat stays open.
            "UPDATE chats SET status = CASE WHEN $3::BIGINT IS NOT NULL AND EXISTS (SELECT 1 \
             FROM messages WHERE chat_id = $2 AND direction = 'in' AND created_at > $3) \
             THEN status ELSE 'closed' END, \
             responsible_user_id = CASE WHEN $1 THEN NULL ELSE responsible_user_id END \
             WHERE id = $2",
        )
        .bind(reset_responsible)
        .bind(chat)
        .bind(requested_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.chat(chat).await
    }

    async fn add_outbound(&self, chat: &Chat, author: Id, text: &str) -> StoreResult<Message> {
        // One statement, so the epoch check and the insert see the same state, with
        // the account held FOR KEY SHARE: a data deletion run starting now either
        // commits first (the lock's re-check then reads the new epoch and the chat is
        // `not_found`) or waits for this message, which is older than its cutoff.
        let row = sqlx::query(concat!(
            "INSERT INTO messages (account_id, chat_id, channel_id, direction, author_user_id, \
             text, status, sent_at, created_at) \
             SELECT c.account_id, c.id, c.channel_id, 'out', $2, $3, 'queued', $4, $4 \
             FROM chats c JOIN accounts a ON a.id = c.account_id \
             WHERE c.id = $1 AND c.epoch = a.data_epoch FOR KEY SHARE OF a \
             RETURNING ",
            message_columns!()
        ))
        .bind(chat.id)
        .bind(author)
        .bind(pg_text(text))
        .bind(now_ms())
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("chat", chat.id))?;
        decode::<Message, _>(&row)
    }

    async fn message(&self, id: Id) -> StoreResult<Message> {
        let row = sqlx::query(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| DomainError::not_found("message", id))?;
        decode::<Message, _>(&row)
    }

    async fn set_message_status(
        &self,
        id: Id,
        status: &str,
        reason: Option<&str>,
        external_id: Option<&str>,
    ) -> StoreResult<()> {
        let reason = reason.map(pg_text);
        let external_id = external_id.map(pg_text);
        let update = |external_id: Option<&str>| {
            sqlx::query(
                // Never back from delivered/read: a receipt can overtake the send's own
                // update. One statement: a concurrent update makes PostgreSQL re-check
                // these conditions on the row as that one left it.
                "UPDATE messages SET status = $1, status_reason = $2, \
                 external_message_id = COALESCE(external_message_id, $3) WHERE id = $4 \
                 AND NOT (status IN ('delivered', 'read') AND $1 IN ('queued', 'sent', 'failed')) \
                 AND NOT (status = 'read' AND $1 = 'delivered')",
            )
            .bind(status)
            .bind(reason.as_deref())
            .bind(external_id.map(str::to_owned))
            .bind(id)
        };
        match update(external_id.as_deref()).execute(&self.pool).await {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                // The messenger reused an id the channel already has: the status still
                // counts (a sent message left `queued` would be sent again).
                tracing::warn!(
                    message = id,
                    external_id = external_id.as_deref(),
                    "the connector reported an external message id the channel already has; \
                     the status is recorded without it"
                );
                update(None).execute(&self.pool).await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn claim_send(
        &self,
        id: Id,
        until: i64,
        fence: Option<&Fence>,
    ) -> StoreResult<SendClaim> {
        // One conditional UPDATE: of two attempts at once, the second waits for the
        // first's row lock, re-checks the lease on the row it left, and claims nothing.
        // The fence reads the channel's lease row in the same statement (no lock: a
        // takeover commits a new epoch, and this statement sees either one).
        let claimed = sqlx::query(concat!(
            "UPDATE messages SET send_lease_until = $2 WHERE id = $1 AND direction = 'out' \
             AND status IN ('queued', 'failed') \
             AND (send_lease_until IS NULL OR send_lease_until <= $3) \
             AND ($4::text IS NULL OR EXISTS (SELECT 1 FROM channel_leases l \
             WHERE l.channel_id = messages.channel_id AND l.owner = $4 AND l.epoch = $5 \
             AND l.expires_at > ",
            now_ms_sql!(),
            "))"
        ))
        .bind(id)
        .bind(until)
        .bind(now_ms())
        .bind(fence.map(|f| f.node.as_str()))
        .bind(fence.map(|f| f.epoch))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(match (claimed, fence) {
            (1, _) => SendClaim::Claimed,
            // An epoch never comes back, so a fence seen broken stays broken.
            (_, Some(f)) if !crate::cluster::fence_holds(self, id, f).await? => SendClaim::Fenced,
            _ => SendClaim::Taken,
        })
    }

    async fn release_send(&self, id: Id, until: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE messages SET send_lease_until = NULL \
             WHERE id = $1 AND send_lease_until = $2",
        )
        .bind(id)
        .bind(until)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn fail_unsent(&self, id: Id, reason: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE messages SET status = 'failed', status_reason = $2 \
             WHERE id = $1 AND direction = 'out' AND status = 'queued' \
             AND (send_lease_until IS NULL OR send_lease_until <= $3)",
        )
        .bind(id)
        .bind(pg_text(reason))
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn store_inbound(&self, msg: &InboundMessage, phone: Option<&str>) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await?;
        let (out, _) = inbound_batch::store_messages(&mut tx, &[(msg, phone)]).await?;
        tx.commit().await?;
        match out.first() {
            Some(inbound_batch::Stored::New) => Ok(true),
            Some(inbound_batch::Stored::Duplicate) => Ok(false),
            _ => Err(DomainError::not_found("channel", msg.channel)),
        }
    }

    async fn run_inbound_batch(&self, jobs: &[InboundJob]) -> StoreResult<Vec<BatchedJob>> {
        inbound_batch::run(self, jobs).await
    }

    /// Batches commit side by side (they lock only the rows they write): up to 4 at
    /// once, a quarter of the pool, so the rest of the daemon keeps connections.
    fn inbound_writers(&self) -> usize {
        (self.pool.options().get_max_connections() as usize / 4).clamp(1, 4)
    }
}

/// Takes the chat's row lock until the commit.
async fn lock_chat(tx: &mut Tx<'_>, chat: Id) -> StoreResult<()> {
    sqlx::query("SELECT id FROM chats WHERE id = $1 FOR NO KEY UPDATE")
        .bind(chat)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The chat of (channel, external chat id) in `epoch`, created for `contact` if
/// missing; one another writer created meanwhile is read back (ON CONFLICT waits for
/// its commit, and the SELECT after it reads what was committed by then).
async fn find_or_create_chat(
    tx: &mut Tx<'_>,
    (channel, account): (Id, Id),
    epoch: i64,
    external_chat_id: &str,
    contact: Id,
    now: i64,
) -> StoreResult<Chat> {
    let find = || {
        sqlx::query(concat!(
            "SELECT ",
            chat_columns!(),
            " FROM chats c WHERE c.channel_id = $1 AND c.external_chat_id = $2 AND c.epoch = $3"
        ))
        .bind(channel)
        .bind(external_chat_id)
        .bind(epoch)
    };
    if let Some(row) = find().fetch_optional(&mut **tx).await? {
        return decode::<Chat, _>(&row);
    }
    sqlx::query(
        "INSERT INTO chats (account_id, epoch, channel_id, contact_id, external_chat_id, status, \
         created_at) VALUES ($1, $2, $3, $4, $5, 'open', $6) \
         ON CONFLICT (channel_id, external_chat_id, epoch) DO NOTHING",
    )
    .bind(account)
    .bind(epoch)
    .bind(channel)
    .bind(contact)
    .bind(external_chat_id)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    decode::<Chat, _>(&find().fetch_one(&mut **tx).await?)
}
