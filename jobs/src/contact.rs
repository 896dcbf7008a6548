//! Who a message's sender is, once for both stores: the keys a contact is found by (a
//! normalised phone, else the messenger's sender id on that channel, else the
//! username — SPEC §5), the immutable identity a new contact is created under, what a
//! later message fills in, and the in-memory book a batch looks its senders up in.
//!
//! The identity is what makes find-or-create safe with several writers: contacts are
//! unique per (account, epoch, identity), so a store creates with `INSERT … ON
//! CONFLICT (account_id, epoch, identity) DO NOTHING` and reads the row back, and two
//! daemons storing the same new client's first messages make one contact.

use std::collections::HashMap;

use crate::kind::InboundMessage;
use crate::model::Id;

/// Who sent a message, as far as the contact is concerned.
#[derive(Clone, Copy, Debug)]
pub struct Sender<'a> {
    /// E.164, as `handlers::inbound_sender_phone` normalised it.
    pub phone: Option<&'a str>,
    /// The messenger's user id, with the channel that reported it.
    pub id: Option<(Id, &'a str)>,
    pub username: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl<'a> Sender<'a> {
    pub fn of(msg: &'a InboundMessage, phone: Option<&'a str>) -> Self {
        Sender {
            phone,
            id: msg.sender.id.as_deref().map(|id| (msg.channel, id)),
            username: msg.sender.username.as_deref(),
            name: msg.sender.name.as_deref(),
        }
    }

    /// A sender known by this phone alone (a chat an operator opens).
    pub fn with_phone(phone: &'a str) -> Self {
        Sender {
            phone: Some(phone),
            id: None,
            username: None,
            name: None,
        }
    }

    /// Whether anything identifies the sender's contact (a name does not).
    pub fn has_key(&self) -> bool {
        self.phone.is_some() || self.id.is_some() || self.username.is_some()
    }

    /// The sender's keys as identities, in lookup order (phone, sender id, username).
    pub fn keys(&self) -> Vec<String> {
        let mut keys = Vec::with_capacity(3);
        keys.extend(self.phone.map(|p| format!("phone:{p}")));
        keys.extend(self.id.map(|(ch, id)| format!("id:{ch}:{id}")));
        keys.extend(self.username.map(|u| format!("user:{u}")));
        keys
    }

    /// The identity a contact created for this sender gets; `chat` is (channel id,
    /// external chat id) of the chat the message is in.
    pub fn identity(&self, chat: (Id, &str)) -> String {
        identity(self.phone, self.id, self.username, chat)
    }
}

/// The key a new contact is created under, never changed afterwards: `phone:<E.164>`,
/// else `id:<channel id>:<sender id>`, else `user:<username>`, else
/// `chat:<channel id>:<external chat id>` — a sender with no key writes as its chat's
/// contact, so the chat names it. The prefixes keep the four kinds apart (and apart
/// from `legacy:<id>`, which SQLite's migration gave rows it could not key).
pub fn identity(
    phone: Option<&str>,
    sender_id: Option<(Id, &str)>,
    username: Option<&str>,
    (channel, external_chat_id): (Id, &str),
) -> String {
    match (phone, sender_id, username) {
        (Some(p), _, _) => format!("phone:{p}"),
        (None, Some((ch, id)), _) => format!("id:{ch}:{id}"),
        (None, None, Some(u)) => format!("user:{u}"),
        (None, None, None) => format!("chat:{channel}:{external_chat_id}"),
    }
}

/// A contact as a batch knows it: enough to find it and to decide whether a message
/// fills a gap.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct KnownContact {
    pub id: Id,
    pub phone: Option<String>,
    pub username: Option<String>,
    pub name: Option<String>,
    pub sender_channel_id: Option<Id>,
    pub sender_id: Option<String>,
}

impl KnownContact {
    /// A contact created for `sender` with this id.
    pub fn new(id: Id, sender: &Sender<'_>) -> Self {
        KnownContact {
            id,
            phone: sender.phone.map(str::to_owned),
            username: sender.username.map(str::to_owned),
            name: sender.name.map(str::to_owned),
            sender_channel_id: sender.id.map(|(ch, _)| ch),
            sender_id: sender.id.map(|(_, id)| id.to_owned()),
        }
    }

    fn sender_key(&self) -> Option<(Id, String)> {
        Some((self.sender_channel_id?, self.sender_id.clone()?))
    }

    /// The contact after a message of `sender` filled in what it lacked, or `None`
    /// when it lacked nothing the message tells. What a contact has is never
    /// overwritten, and it keeps the first messenger id it was given (one per contact).
    pub fn filled_by(&self, sender: &Sender<'_>) -> Option<KnownContact> {
        let fill = |have: &Option<String>, got: Option<&str>| match (have, got) {
            (None, Some(g)) => Some(g.to_owned()),
            _ => None,
        };
        let phone = fill(&self.phone, sender.phone);
        let username = fill(&self.username, sender.username);
        let name = fill(&self.name, sender.name);
        let id = match (&self.sender_id, sender.id) {
            (None, Some((ch, id))) => Some((ch, id.to_owned())),
            _ => None,
        };
        if phone.is_none() && username.is_none() && name.is_none() && id.is_none() {
            return None;
        }
        let mut c = self.clone();
        c.phone = c.phone.or(phone);
        c.username = c.username.or(username);
        c.name = c.name.or(name);
        if let Some((ch, id)) = id {
            c.sender_channel_id = Some(ch);
            c.sender_id = Some(id);
        }
        Some(c)
    }
}

/// The contacts of one (account, epoch) that a batch looked up or created.
#[derive(Default, Debug)]
pub struct ContactBook {
    by_phone: HashMap<String, KnownContact>,
    by_sender: HashMap<(Id, String), KnownContact>,
    by_username: HashMap<String, KnownContact>,
}

impl ContactBook {
    /// By phone, else by (channel, sender id), else by username (SPEC §5).
    pub fn find(&self, s: &Sender<'_>) -> Option<KnownContact> {
        s.phone
            .and_then(|p| self.by_phone.get(p))
            .or_else(|| self.by_id(s))
            .or_else(|| s.username.and_then(|u| self.by_username.get(u)))
            .cloned()
    }

    fn by_id(&self, s: &Sender<'_>) -> Option<&KnownContact> {
        s.id.and_then(|(ch, id)| self.by_sender.get(&(ch, id.to_owned())))
    }

    /// Whether the sender's first key (phone, else sender id, else username) finds a
    /// contact: then nothing another writer creates meanwhile would be found before
    /// it. A sender found only by a later key, or not at all, may be a contact another
    /// writer is creating right now.
    pub fn settles(&self, s: &Sender<'_>) -> bool {
        match (s.phone, s.id, s.username) {
            (Some(p), _, _) => self.by_phone.contains_key(p),
            (None, Some(_), _) => self.by_id(s).is_some(),
            (None, None, Some(u)) => self.by_username.contains_key(u),
            (None, None, None) => false,
        }
    }

    /// Remembers a contact under its phone, sender id and username; the first (lowest
    /// id, when looked up `ORDER BY id`) wins.
    pub fn remember(&mut self, c: &KnownContact) {
        for (key, map) in [
            (&c.phone, &mut self.by_phone),
            (&c.username, &mut self.by_username),
        ] {
            if let Some(key) = key {
                map.entry(key.clone()).or_insert_with(|| c.clone());
            }
        }
        if let Some(key) = c.sender_key() {
            self.by_sender.entry(key).or_insert_with(|| c.clone());
        }
    }

    /// After a fill-in: later messages of the batch must see the contact as it is now.
    pub fn refresh(&mut self, c: &KnownContact) {
        for map in [&mut self.by_phone, &mut self.by_username] {
            for v in map.values_mut().filter(|v| v.id == c.id) {
                *v = c.clone();
            }
        }
        for v in self.by_sender.values_mut().filter(|v| v.id == c.id) {
            *v = c.clone();
        }
        self.remember(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender<'a>(
        phone: Option<&'a str>,
        id: Option<(Id, &'a str)>,
        username: Option<&'a str>,
    ) -> Sender<'a> {
        Sender {
            phone,
            id,
            username,
            name: Some("Ann"),
        }
    }

    #[test]
    fn the_identity_is_the_first_key_else_the_chat() {
        let chat = (3, "c-1");
        let all = sender(Some("+79161234567"), Some((3, "43")), Some("ann"));
        assert_eq!(all.identity(chat), "phone:+79161234567");
        assert_eq!(
            sender(None, Some((3, "43")), Some("ann")).identity(chat),
            "id:3:43"
        );
        assert_eq!(sender(None, None, Some("ann")).identity(chat), "user:ann");
        assert_eq!(sender(None, None, None).identity(chat), "chat:3:c-1");
        assert_eq!(
            all.keys(),
            ["phone:+79161234567", "id:3:43", "user:ann"],
            "lookup order"
        );
        assert!(sender(None, None, None).keys().is_empty());
        // A sender id is the channel's: the same id on two channels is two people.
        assert_ne!(
            sender(None, Some((3, "43")), None).identity(chat),
            sender(None, Some((4, "43")), None).identity(chat)
        );
    }

    #[test]
    fn a_message_fills_only_what_the_contact_lacks() {
        let known = KnownContact {
            id: 7,
            phone: None,
            username: Some("olga".into()),
            name: None,
            sender_channel_id: Some(3),
            sender_id: Some("43".into()),
        };
        let s = Sender {
            phone: Some("+4915112345678"),
            id: Some((3, "99")),
            username: Some("other"),
            name: Some("Olga"),
        };
        let filled = known.filled_by(&s).expect("phone and name are new");
        assert_eq!(filled.phone.as_deref(), Some("+4915112345678"));
        assert_eq!(filled.name.as_deref(), Some("Olga"));
        assert_eq!(
            filled.username.as_deref(),
            Some("olga"),
            "never overwritten"
        );
        assert_eq!(
            (filled.sender_channel_id, filled.sender_id.as_deref()),
            (Some(3), Some("43")),
            "the first messenger id stays"
        );
        assert_eq!(filled.filled_by(&s), None, "nothing left to fill");
    }

    #[test]
    fn the_book_finds_by_phone_then_id_then_username() {
        let by_user = KnownContact::new(1, &sender(None, None, Some("ann")));
        let by_id = KnownContact::new(2, &sender(None, Some((3, "43")), None));
        let by_phone = KnownContact::new(3, &sender(Some("+79161234567"), None, None));
        let mut book = ContactBook::default();
        for c in [&by_user, &by_id, &by_phone] {
            book.remember(c);
        }
        let all = sender(Some("+79161234567"), Some((3, "43")), Some("ann"));
        assert_eq!(book.find(&all).map(|c| c.id), Some(3));
        assert!(book.settles(&all));
        let no_phone = sender(None, Some((3, "43")), Some("ann"));
        assert_eq!(book.find(&no_phone).map(|c| c.id), Some(2));
        let new_phone = sender(Some("+4915112345678"), None, Some("ann"));
        assert_eq!(book.find(&new_phone).map(|c| c.id), Some(1));
        assert!(
            !book.settles(&new_phone),
            "found by a later key: its phone may be another writer's new contact"
        );
        assert_eq!(book.find(&sender(None, Some((4, "43")), None)), None);

        // A fill-in is seen under every key afterwards; the first contact of a key wins.
        let filled = by_user.filled_by(&new_phone).expect("phone");
        book.refresh(&filled);
        assert_eq!(
            book.find(&sender(Some("+4915112345678"), None, None))
                .map(|c| c.id),
            Some(1)
        );
        assert_eq!(
            book.find(&sender(None, None, Some("ann"))),
            Some(filled.clone())
        );
        book.remember(&KnownContact::new(9, &sender(None, None, Some("ann"))));
        assert_eq!(book.find(&sender(None, None, Some("ann"))), Some(filled));
    }
}
