-- The contact lookups by phone, by (channel, sender id) and by username each probe with
-- `=`, which implies the column IS NOT NULL: partial indexes serve them and carry no
-- entry for the contacts without that key. Above all, a phone probe can no longer be
-- planned on the sender index (whose first two columns it shares): on a table without
-- statistics yet (a new store's first minute) every estimate clamps to one row, the
-- smaller index won the tie, and each probe read all contacts of the account
-- (BENCHMARKS.md, round 9, "Where the time goes").
-- Runs in one transaction: inbound batches of running nodes wait while the three
-- indexes are rebuilt (2.4 s for a million contacts on the 2-core test host), so
-- upgrade a large store in a quiet minute.
DROP INDEX contacts_phone;
CREATE INDEX contacts_phone ON contacts (account_id, epoch, phone) WHERE phone IS NOT NULL;
DROP INDEX contacts_username;
CREATE INDEX contacts_username ON contacts (account_id, epoch, username)
    WHERE username IS NOT NULL;
DROP INDEX contacts_sender;
CREATE INDEX contacts_sender ON contacts (account_id, epoch, sender_channel_id, sender_id)
    WHERE sender_id IS NOT NULL;
