-- Several daemons (ARCHITECTURE.md, "Several daemons"): the live nodes and one lease per
-- runnable channel, as on PostgreSQL (one schema for both stores). A SQLite file serves
-- one daemon (a second is refused at start), which runs every channel without leases;
-- the tables are here so the two schemas stay one.
CREATE TABLE nodes (
    -- `<node.name>/<ULID of the start>`: unique per process, never reused.
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    max_channels INTEGER,
    -- Where the process runs (the kernel's boot id and PID namespace) and its pid: a
    -- daemon starting where a dead one ran takes the dead one's leases at once.
    host TEXT,
    pid INTEGER
);

-- At most one holder per channel: the primary key. A new holder increments `epoch`
-- (never reset: a released lease keeps its row and epoch), and every send checks
-- (owner, epoch) in the statement that claims it.
CREATE TABLE channel_leases (
    channel_id INTEGER PRIMARY KEY REFERENCES channels(id),
    owner TEXT,
    epoch INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX channel_leases_owner ON channel_leases (owner, expires_at);
