-- The ledger is the store's largest append: a billing day writes a row per running
-- channel. Its two foreign keys ran two triggers per row, each a `SELECT … FOR KEY
-- SHARE` of the parent that locks it (and writes WAL for the lock): half the insert's
-- time (BENCHMARKS.md, round 15). They guard nothing a writer can break: accounts and
-- channels are never deleted (a removal is a status; data deletion takes messages,
-- chats and contacts only), and every ledger writer inserts the ids of rows it holds
-- locked in the same transaction (the account's `FOR NO KEY UPDATE`; the channels it
-- read under that lock). UNIQUE (channel_id, day) and (account_id, reference), the
-- rules that charge a day and book a top-up at most once, stay.
-- Dropping a foreign key locks the tables at both ends; taking them first, in the order
-- a charge does (accounts, then the ledger), lets a charge in flight finish instead of
-- deadlocking with the migration. Running daemons wait meanwhile: upgrade a large
-- store in a quiet minute.
LOCK TABLE accounts, channels, ledger IN ACCESS EXCLUSIVE MODE;
ALTER TABLE ledger DROP CONSTRAINT ledger_account_id_fkey;
ALTER TABLE ledger DROP CONSTRAINT ledger_channel_id_fkey;

-- The channels some node claims to run, for the housekeeping that marks those nobody
-- runs `disconnected` (`Cluster::disconnect_unowned`, after every lease renewal): it
-- read all channels each time, 0.5 s at 300,000. It reads only the live ones now, which
-- is all of them in a cluster whose channels all run.
CREATE INDEX channels_live ON channels (id) WHERE status IN ('connected', 'connecting');

