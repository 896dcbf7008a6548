-- Several daemons (ARCHITECTURE.md, "Several daemons"): the live nodes and one lease per
-- runnable channel. Times are unix ms on the database's clock (clock_timestamp()), so
-- hosts whose clocks disagree still agree on when a lease ends.
CREATE TABLE nodes (
    -- `<node.name>/<ULID of the start>`: unique per process, never reused (two
    -- processes sharing a host name are still two nodes).
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    max_channels BIGINT,
    -- Where the process runs (the kernel's boot id and PID namespace) and its pid: a
    -- daemon starting where a dead one ran takes the dead one's leases at once.
    host TEXT,
    pid BIGINT
);

-- At most one holder per channel: the primary key; takeovers are one
-- INSERT ... ON CONFLICT DO UPDATE ... WHERE expired, which locks the row, so of two
-- nodes taking a channel at once one wins. A new holder increments `epoch` (never
-- reset: a released lease keeps its row and epoch), and every send checks
-- (owner, epoch) in the statement that claims it.
CREATE TABLE channel_leases (
    channel_id BIGINT PRIMARY KEY REFERENCES channels(id),
    owner TEXT,
    epoch BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX channel_leases_owner ON channel_leases (owner, expires_at);
