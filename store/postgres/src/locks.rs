//! The advisory locks of the PostgreSQL store: what SQLite's single writer serialised
//! that no row lock can (rows that do not exist yet), each held to the end of its
//! transaction (`pg_advisory_xact_*`) and taken before the transaction writes any row,
//! in ascending key order, so lock waits never close a cycle. Keys are PostgreSQL's two-int4 form, whose space is
//! apart from the single-bigint one (sqlx's migrator locks there); the first int names
//! the lock's class.
//!
//! **Contact creation** (see `inbound_batch`): the keys (`phone:…`, `id:…`,
//! `user:…`) of senders about to get a new contact, so two writers never create two
//! contacts for one client, even from messages that carry different keys of it.
//!
//! (An account's data epoch needs none: its readers hold the account row `FOR KEY
//! SHARE`, which a data deletion run's start, locking the row `FOR UPDATE` before it
//! bumps the epoch, waits for.)

use patchbay_jobs::model::Id;
use patchbay_jobs::store::StoreResult;

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

// Lock classes: "pb" and a number.

/// One account's contact creation as a whole: shared by a writer that locks single
/// keys, exclusive by one with too many keys to lock one by one.
const CONTACTS: i32 = 0x7062_0002;
/// One contact key (see `contact_key`).
const CONTACT_KEY: i32 = 0x7062_0003;

/// A writer with more new senders' keys than this in one account holds the account's
/// contact creation exclusively instead (bounding the locks one transaction holds:
/// PostgreSQL's lock table has room for `max_locks_per_transaction` per connection).
pub(crate) const MAX_KEY_LOCKS: usize = 64;

/// The int4 half of a lock's key for an id: ids are positive, and two ids sharing a key
/// (past 2^31) only wait for each other.
fn id_key(id: Id) -> i32 {
    (id.rem_euclid(1 << 31)) as i32
}

/// The int4 half of a contact key's lock: FNV-1a of (account, epoch, key), the same on
/// every host (std's hasher is seeded per process). Two keys sharing it only wait.
fn contact_key(account: Id, epoch: i64, key: &str) -> i32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let account = account.to_le_bytes();
    let epoch = epoch.to_le_bytes();
    for b in account.iter().chain(&epoch).chain(key.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) as u32 as i32
}

/// Holds the creation of contacts for these keys (per (account, epoch)) until the
/// commit: each account's contact creation shared and its keys exclusively, or the
/// account's creation exclusively past `MAX_KEY_LOCKS` keys. One statement.
pub(crate) async fn hold_contact_keys(
    tx: &mut Tx<'_>,
    keys: &[((Id, i64), Vec<String>)],
) -> StoreResult<()> {
    // (class, key, exclusive), sorted: the order every writer takes them in.
    let mut locks: Vec<(i32, i32, bool)> = Vec::new();
    let mut accounts: Vec<(i32, bool)> = Vec::new();
    for ((account, epoch), ks) in keys {
        let mut own: Vec<i32> = ks
            .iter()
            .map(|k| contact_key(*account, *epoch, k))
            .collect();
        own.sort_unstable();
        own.dedup();
        let whole = own.len() > MAX_KEY_LOCKS;
        accounts.push((id_key(*account), whole));
        if !whole {
            locks.extend(own.into_iter().map(|k| (CONTACT_KEY, k, true)));
        }
    }
    // An account in two epochs (a deletion run between two reads) once, exclusive if
    // either wants it so.
    accounts.sort_unstable_by_key(|(a, whole)| (*a, !*whole));
    accounts.dedup_by_key(|(a, _)| *a);
    locks.extend(accounts.into_iter().map(|(a, whole)| (CONTACTS, a, whole)));
    locks.sort_unstable();
    locks.dedup();
    if locks.is_empty() {
        return Ok(());
    }
    let (classes, rest): (Vec<i32>, Vec<(i32, bool)>) =
        locks.into_iter().map(|(c, k, x)| (c, (k, x))).unzip();
    let (ids, exclusive): (Vec<i32>, Vec<bool>) = rest.into_iter().unzip();
    // UNNEST yields its rows in array order and each row's lock is taken as it is
    // produced, so the sorted order holds.
    sqlx::query(
        "SELECT CASE WHEN t.x THEN pg_advisory_xact_lock(t.c, t.k) \
         ELSE pg_advisory_xact_lock_shared(t.c, t.k) END \
         FROM UNNEST($1::INT4[], $2::INT4[], $3::BOOL[]) AS t(c, k, x)",
    )
    .bind(&classes)
    .bind(&ids)
    .bind(&exclusive)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_stable_and_scoped() {
        // Fixed across processes and hosts: every daemon must lock the same key.
        assert_eq!(
            contact_key(1, 0, "phone:+79161234567"),
            contact_key(1, 0, "phone:+79161234567")
        );
        assert_ne!(contact_key(1, 0, "user:ann"), contact_key(2, 0, "user:ann"));
        assert_ne!(contact_key(1, 0, "user:ann"), contact_key(1, 1, "user:ann"));
        assert_eq!(id_key(5), 5);
        assert_eq!(id_key((1 << 31) + 5), 5);
    }
}
