//! The inbox and outbound sends, on both stores: send leases (one attempt at a time),
//! message statuses (never back from delivered or read), closing (a close asked for
//! before the client wrote again leaves the chat open), reading, and chats an operator
//! opens to a phone number.

use patchbay_jobs::DomainError;
use patchbay_jobs::kind::InboundMessage;
use patchbay_jobs::model::{Channel, Id, Message, now_ms};
use patchbay_jobs::store::{ChatFilter, SendClaim};
use serde_json::json;

use crate::common::{Backend, TestStore, acme};

on_both_stores!(
    one_send_attempt_at_a_time_holds_a_message,
    a_reused_external_id_still_records_the_status,
    a_status_never_goes_back_from_delivered_or_read,
    a_close_asked_for_before_the_client_wrote_again_leaves_the_chat_open,
    reading_a_chat_reads_its_clients_messages,
    an_operator_opens_one_chat_per_phone_and_finds_the_clients,
    chats_are_listed_newest_first_and_filtered,
);

fn inbound(channel: Id, chat: &str, id: &str, phone: &str, minute: u32) -> InboundMessage {
    serde_json::from_value(json!({
        "channel": channel, "external_chat_id": chat, "external_message_id": id,
        "sender": {"phone": phone}, "text": format!("text {id}"),
        "sent_at": format!("2026-11-25T10:{minute:02}:00Z"),
    }))
    .expect("inbound")
}

/// An account with a channel.
async fn channel(s: &TestStore) -> (Channel, Id) {
    let (acc, admin) = s.create_account(&acme()).await.expect("create");
    let ch = s
        .add_channel(acc.id, "loopback", "Demo", &json!({}))
        .await
        .expect("channel");
    (ch, admin.id)
}

/// An outbound message in a fresh chat, after the client's "in-1".
pub(crate) async fn outbound(s: &TestStore) -> Message {
    let (ch, admin) = channel(s).await;
    let m = inbound(ch.id, "c1", "in-1", "+4915112345678", 0);
    assert!(
        s.store_inbound(&m, Some("+4915112345678"))
            .await
            .expect("store")
    );
    let filter = ChatFilter {
        visible_to_operator: None,
        status: None,
        limit: 10,
    };
    let chat = s.chats(ch.account, &filter).await.expect("chats").remove(0);
    s.add_outbound(&chat, admin, "hi").await.expect("send")
}

async fn one_send_attempt_at_a_time_holds_a_message(b: Backend) {
    let s = TestStore::open(b).await;
    let msg = outbound(&s).await;
    assert_eq!(
        (msg.direction.as_str(), msg.status.as_str()),
        ("out", "queued")
    );
    let status = |id: Id| {
        let s = &s;
        async move { s.message(id).await.expect("message").status }
    };
    let until = now_ms() + 60_000;
    assert!((s.claim_send(msg.id, until, None).await.expect("claim") == SendClaim::Claimed));
    assert!(
        !(s.claim_send(msg.id, until + 1, None)
            .await
            .expect("claim again")
            == SendClaim::Claimed),
        "a second attempt must not take a held message"
    );
    // Only the holder's token gives the lease back.
    s.release_send(msg.id, until + 1).await.expect("release");
    assert!(!(s.claim_send(msg.id, until, None).await.expect("still held") == SendClaim::Claimed));
    // A send that gave up fails the message only once nobody holds it.
    s.fail_unsent(msg.id, "gave up").await.expect("fail");
    assert_eq!(
        status(msg.id).await,
        "queued",
        "a held message may yet be sent"
    );
    s.release_send(msg.id, until).await.expect("release");
    assert!(
        (s.claim_send(msg.id, until, None)
            .await
            .expect("after release")
            == SendClaim::Claimed)
    );
    // A lease that ran out (its daemon died mid-send) can be taken again.
    s.exec(&format!(
        "UPDATE messages SET send_lease_until = 1 WHERE id = {}",
        msg.id
    ))
    .await;
    assert!((s.claim_send(msg.id, until, None).await.expect("expired") == SendClaim::Claimed));
    s.set_message_status(msg.id, "sent", None, Some("ext-1"))
        .await
        .expect("sent");
    assert!(
        !(s.claim_send(msg.id, until + 2, None).await.expect("sent") == SendClaim::Claimed),
        "a sent message is never claimed again"
    );
    s.fail_unsent(msg.id, "gave up").await.expect("fail sent");
    assert_eq!(
        status(msg.id).await,
        "sent",
        "a sent message is never failed"
    );
    // An inbound message is never claimed for sending.
    let inbound = s
        .scalar("SELECT id FROM messages WHERE direction = 'in'")
        .await;
    assert!(!(s.claim_send(inbound, until, None).await.expect("inbound") == SendClaim::Claimed));

    // A failed one may be claimed for another attempt; two attempts at once (two
    // daemons), one wins.
    let (ch, admin) = (msg.channel, msg.author.expect("author"));
    let chat = s.chat(msg.chat).await.expect("chat");
    let again = s.add_outbound(&chat, admin, "again").await.expect("send");
    s.fail_unsent(again.id, "gave up").await.expect("fail");
    assert_eq!(status(again.id).await, "failed");
    let other = s.another_daemon().await;
    let (one, two) = tokio::join!(
        s.claim_send(again.id, until, None),
        other.claim_send(again.id, until + 1, None)
    );
    assert!(
        (one.expect("one") == SendClaim::Claimed) ^ (two.expect("two") == SendClaim::Claimed),
        "exactly one attempt holds it"
    );
    assert_eq!(s.message(again.id).await.expect("message").channel, ch);
}

async fn a_reused_external_id_still_records_the_status(b: Backend) {
    let s = TestStore::open(b).await;
    let msg = outbound(&s).await;
    // "in-1" is the inbound message's id on the same channel.
    s.set_message_status(msg.id, "sent", None, Some("in-1"))
        .await
        .expect("status without the id");
    let stored = s.message(msg.id).await.expect("message");
    assert_eq!(stored.status, "sent");
    assert_eq!(stored.external_message_id, None);
    // A later report with a fresh id records it (the first id given stays).
    s.set_message_status(msg.id, "delivered", None, Some("out-1"))
        .await
        .expect("delivered");
    s.set_message_status(msg.id, "delivered", None, Some("out-2"))
        .await
        .expect("again");
    let stored = s.message(msg.id).await.expect("message");
    assert_eq!(stored.external_message_id.as_deref(), Some("out-1"));
}

async fn a_status_never_goes_back_from_delivered_or_read(b: Backend) {
    let s = TestStore::open(b).await;
    let msg = outbound(&s).await;
    let status = |id: Id| {
        let s = &s;
        async move { s.message(id).await.expect("message").status }
    };
    // A receipt overtook the send's own update.
    s.set_message_status(msg.id, "delivered", None, None)
        .await
        .expect("delivered");
    for late in ["queued", "sent", "failed"] {
        s.set_message_status(msg.id, late, Some("late"), None)
            .await
            .expect("late");
        assert_eq!(status(msg.id).await, "delivered", "{late} after delivered");
    }
    s.set_message_status(msg.id, "read", None, None)
        .await
        .expect("read");
    for late in ["queued", "sent", "failed", "delivered"] {
        s.set_message_status(msg.id, late, None, None)
            .await
            .expect("late");
        assert_eq!(status(msg.id).await, "read", "{late} after read");
    }
    // Forward moves and a reason are recorded.
    let chat = s.chat(msg.chat).await.expect("chat");
    let other = s
        .add_outbound(&chat, msg.author.expect("author"), "x")
        .await
        .expect("send");
    s.set_message_status(other.id, "failed", Some("blocked"), None)
        .await
        .expect("failed");
    let got = s.message(other.id).await.expect("message");
    assert_eq!(
        (got.status.as_str(), got.status_reason.as_deref()),
        ("failed", Some("blocked"))
    );
    assert!(matches!(
        s.message(other.id + 100).await,
        Err(DomainError::NotFound(_))
    ));
}

async fn a_close_asked_for_before_the_client_wrote_again_leaves_the_chat_open(b: Backend) {
    let s = TestStore::open(b).await;
    let msg = outbound(&s).await;
    let admin = msg.author.expect("author");
    s.assign_chat(msg.chat, Some(admin)).await.expect("assign");
    // The client's message (stored by `outbound`) came after this close was asked.
    let late = s.close_chat(msg.chat, true, Some(1)).await.expect("late");
    assert_eq!(
        late.status, "open",
        "a late or repeated close leaves it open"
    );
    assert_eq!(
        late.responsible, None,
        "the reset applies as if it ran first"
    );
    s.assign_chat(msg.chat, Some(admin)).await.expect("assign");
    let closed = s
        .close_chat(msg.chat, false, Some(now_ms() + 1))
        .await
        .expect("close");
    assert_eq!(closed.status, "closed");
    assert_eq!(closed.responsible, Some(admin), "not reset unless asked");
    // The client writes again: the chat reopens, its responsible kept.
    let m = inbound(msg.channel, "c1", "in-2", "+4915112345678", 1);
    assert!(
        s.store_inbound(&m, Some("+4915112345678"))
            .await
            .expect("store")
    );
    let reopened = s.chat(msg.chat).await.expect("chat");
    assert_eq!(
        (reopened.status.as_str(), reopened.responsible),
        ("open", Some(admin))
    );
    // A close without a request time (a job queued before the field) always closes.
    let closed = s.close_chat(msg.chat, true, None).await.expect("close");
    assert_eq!(
        (closed.status.as_str(), closed.responsible),
        ("closed", None)
    );
}

async fn reading_a_chat_reads_its_clients_messages(b: Backend) {
    let s = TestStore::open(b).await;
    let msg = outbound(&s).await;
    let m = inbound(msg.channel, "c1", "in-2", "+4915112345678", 1);
    s.store_inbound(&m, Some("+4915112345678"))
        .await
        .expect("store");
    assert_eq!(s.chat(msg.chat).await.expect("chat").unread, 2);
    let read = s.mark_read(msg.chat).await.expect("read");
    assert_eq!(read.unread, 0);
    let statuses = s
        .texts(&format!(
            "SELECT direction || ' ' || status FROM messages WHERE chat_id = {} ORDER BY id",
            msg.chat
        ))
        .await;
    assert_eq!(statuses, ["in read", "out queued", "in read"]);
    // Newest first, paged by id.
    let page = s.messages(msg.chat, 2, None).await.expect("page");
    assert_eq!(
        page.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["text in-2", "hi"]
    );
    let rest = s
        .messages(msg.chat, 10, Some(page[1].id))
        .await
        .expect("rest");
    assert_eq!(
        rest.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(),
        ["text in-1"]
    );
    assert!(matches!(
        s.mark_read(msg.chat + 100).await,
        Err(DomainError::NotFound(_))
    ));
}

async fn an_operator_opens_one_chat_per_phone_and_finds_the_clients(b: Backend) {
    let s = TestStore::open(b).await;
    let (ch, _) = channel(&s).await;
    let chat = s.create_chat(&ch, "+79161234567").await.expect("create");
    assert_eq!(
        (
            chat.external_chat_id.as_str(),
            chat.status.as_str(),
            chat.unread
        ),
        ("+79161234567", "open", 0)
    );
    let again = s.create_chat(&ch, "+79161234567").await.expect("again");
    assert_eq!((again.id, again.contact), (chat.id, chat.contact));
    let contact = s.contact(chat.contact).await.expect("contact");
    assert_eq!(contact.phone.as_deref(), Some("+79161234567"));

    // The client writes from another chat id: the same contact, by phone.
    let m = inbound(ch.id, "tg-1", "1", "+79161234567", 0);
    s.store_inbound(&m, Some("+79161234567"))
        .await
        .expect("store");
    let chats = s
        .chats(
            ch.account,
            &ChatFilter {
                limit: 10,
                ..ChatFilter::default()
            },
        )
        .await
        .expect("chats");
    assert_eq!(chats.len(), 2);
    assert!(chats.iter().all(|c| c.contact == chat.contact), "{chats:?}");
    // And a client who wrote first is found when the operator opens a chat.
    let m = inbound(ch.id, "tg-2", "2", "+4915112345678", 1);
    s.store_inbound(&m, Some("+4915112345678"))
        .await
        .expect("store");
    let known = s
        .scalar("SELECT contact_id FROM chats WHERE external_chat_id = 'tg-2'")
        .await;
    let opened = s.create_chat(&ch, "+4915112345678").await.expect("create");
    assert_eq!(opened.contact, known);
    assert_eq!(s.scalar("SELECT COUNT(*) FROM contacts").await, 2);
    assert!(matches!(
        s.contact(known + 100).await,
        Err(DomainError::NotFound(_))
    ));
}

async fn chats_are_listed_newest_first_and_filtered(b: Backend) {
    let s = TestStore::open(b).await;
    let (ch, admin) = channel(&s).await;
    for (chat, minute) in [("a", 3), ("b", 1), ("c", 2)] {
        let m = inbound(
            ch.id,
            chat,
            chat,
            &format!("+4915112345{minute:03}"),
            minute,
        );
        s.store_inbound(&m, m.sender.phone.as_deref())
            .await
            .expect("store");
    }
    let list = |filter: ChatFilter| {
        let s = &s;
        async move {
            s.chats(ch.account, &filter)
                .await
                .expect("chats")
                .into_iter()
                .map(|c| c.external_chat_id)
                .collect::<Vec<_>>()
        }
    };
    let all = ChatFilter {
        limit: 10,
        ..ChatFilter::default()
    };
    assert_eq!(list(all.clone()).await, ["a", "c", "b"]);
    assert_eq!(
        list(ChatFilter {
            limit: 2,
            ..all.clone()
        })
        .await,
        ["a", "c"]
    );
    let a = s
        .scalar("SELECT id FROM chats WHERE external_chat_id = 'a'")
        .await;
    let c = s
        .scalar("SELECT id FROM chats WHERE external_chat_id = 'c'")
        .await;
    let op = s
        .add_user(
            ch.account,
            &patchbay_jobs::store::NewUser {
                name: "Op".into(),
                email: "op@acme.test".into(),
            },
            patchbay_jobs::model::Role::Operator,
        )
        .await
        .expect("operator");
    s.assign_chat(a, Some(admin)).await.expect("assign");
    s.assign_chat(c, Some(op.id)).await.expect("assign");
    s.close_chat(c, false, None).await.expect("close");
    // An operator sees unassigned chats and their own.
    assert_eq!(
        list(ChatFilter {
            visible_to_operator: Some(op.id),
            ..all.clone()
        })
        .await,
        ["c", "b"]
    );
    assert_eq!(
        list(ChatFilter {
            status: Some("open".into()),
            ..all.clone()
        })
        .await,
        ["a", "b"]
    );
    assert!(matches!(
        s.chats(ch.account + 100, &all).await,
        Err(DomainError::NotFound(_))
    ));
}
