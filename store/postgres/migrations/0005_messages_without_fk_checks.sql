-- The message insert is the inbound path's largest statement: each row ran three
-- foreign-key lookups (accounts, channels, chats; the author is NULL on inbound rows),
-- each a `SELECT … FOR KEY SHARE` of the parent that locks it and writes WAL for the
-- lock (BENCHMARKS.md, round 18). Two of them guard nothing a writer can break, as for
-- the ledger (0004): accounts and channels are never deleted (a removal is a status),
-- and both message writers take the ids from rows they read in the same transaction
-- under the account's FOR KEY SHARE (the inbound batch's channel read; `add_outbound`'s
-- chat read). The chat's key stays: chats are deleted (by data deletion, once their
-- messages are gone), and it keeps a message from outliving its chat; so does the
-- author's.
-- Dropping a foreign key locks the tables at both ends. They are taken first, in the
-- order charges and inbound batches take them (accounts, channels, then messages), so
-- those in flight finish instead of deadlocking with the migration. A writer that
-- takes them in another order (`message.send`, `channel.add`, a deletion batch)
-- arriving meanwhile may be the victim of a deadlock: a job is retried, a call fails
-- and can be repeated; should PostgreSQL pick the migration instead, the daemon exits
-- with the error and applies it when it is started again.
-- Running daemons wait meanwhile: upgrade a large store in a quiet minute.
LOCK TABLE accounts, channels, messages IN ACCESS EXCLUSIVE MODE;
ALTER TABLE messages DROP CONSTRAINT messages_account_id_fkey;
ALTER TABLE messages DROP CONSTRAINT messages_channel_id_fkey;
