-- patchbay's whole schema. Portable SQL (SQLite and PostgreSQL): BIGINT ids and
-- unix-millisecond times, TEXT for JSON, standard ON CONFLICT, partial unique indexes.
-- The UNIQUE constraints are what make job handlers idempotent; do not drop them.
-- Ids are AUTOINCREMENT (BIGSERIAL/identity on PostgreSQL): SQLite would otherwise reuse
-- the ids of deleted rows, and a deleted chat's id held by an operator or a script must
-- never come to name another client's chat.

CREATE TABLE accounts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    currency TEXT NOT NULL,
    balance BIGINT NOT NULL DEFAULT 0,
    -- Bumped by each data deletion run: chats and contacts of older epochs are hidden
    -- and wait for deletion, so new traffic never lands in them.
    data_epoch BIGINT NOT NULL DEFAULT 0,
    reset_responsible_on_close BOOLEAN NOT NULL DEFAULT FALSE,
    mark_read_on_open BOOLEAN NOT NULL DEFAULT TRUE,
    phone_format TEXT NOT NULL DEFAULT 'none',
    balance_notify_days INTEGER NOT NULL DEFAULT 3,
    -- The billing day whose run could not be paid (YYYY-MM-DD); a top-up that resumes
    -- the channels pays that day, or today if later.
    suspended_on TEXT,
    created_at BIGINT NOT NULL
);

CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('administrator', 'operator')),
    created_at BIGINT NOT NULL,
    UNIQUE (account_id, email)
);

CREATE TABLE channels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN
        ('connecting', 'connected', 'disconnected', 'error', 'suspended', 'removed')),
    status_reason TEXT,
    number TEXT,
    display_name TEXT,
    created_at BIGINT NOT NULL,
    removed_at BIGINT
);
CREATE INDEX channels_account ON channels (account_id);

CREATE TABLE contacts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    epoch BIGINT NOT NULL,
    phone TEXT,
    username TEXT,
    name TEXT,
    email TEXT,
    url TEXT,
    notes TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX contacts_phone ON contacts (account_id, epoch, phone);
CREATE INDEX contacts_username ON contacts (account_id, epoch, username);

CREATE TABLE chats (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    epoch BIGINT NOT NULL,
    channel_id BIGINT NOT NULL REFERENCES channels(id),
    contact_id BIGINT NOT NULL REFERENCES contacts(id),
    external_chat_id TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'closed')),
    responsible_user_id BIGINT REFERENCES users(id),
    unread INTEGER NOT NULL DEFAULT 0,
    last_message_at BIGINT,
    created_at BIGINT NOT NULL,
    UNIQUE (channel_id, external_chat_id, epoch)
);
CREATE INDEX chats_account ON chats (account_id, epoch, status);

CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    chat_id BIGINT NOT NULL REFERENCES chats(id),
    channel_id BIGINT NOT NULL REFERENCES channels(id),
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    -- NULL for outbound messages until the messenger gives them an id.
    external_message_id TEXT,
    author_user_id BIGINT REFERENCES users(id),
    text TEXT NOT NULL,
    attachments TEXT NOT NULL DEFAULT '[]',
    status TEXT NOT NULL CHECK (status IN
        ('received', 'read', 'queued', 'sent', 'delivered', 'failed')),
    status_reason TEXT,
    sent_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (channel_id, external_message_id)
);
CREATE INDEX messages_chat ON messages (chat_id, id);

CREATE TABLE field_definitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    name TEXT NOT NULL,
    -- lower-cased name: names are unique per account case-insensitively.
    name_key TEXT NOT NULL,
    type TEXT NOT NULL CHECK (type IN
        ('text', 'number', 'date', 'link', 'email', 'phone', 'checkbox', 'list')),
    options TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (account_id, name_key)
);

CREATE TABLE field_values (
    chat_id BIGINT NOT NULL REFERENCES chats(id),
    field_id BIGINT NOT NULL REFERENCES field_definitions(id),
    value TEXT NOT NULL,
    PRIMARY KEY (chat_id, field_id)
);

CREATE TABLE ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    kind TEXT NOT NULL CHECK (kind IN ('topup', 'charge')),
    -- Signed minor units: credits positive, charges negative.
    amount BIGINT NOT NULL,
    balance_after BIGINT NOT NULL,
    reference TEXT,
    channel_id BIGINT REFERENCES channels(id),
    day TEXT,
    created_at BIGINT NOT NULL,
    UNIQUE (account_id, reference),
    -- No (channel, day) is ever charged twice, whoever runs the charge.
    UNIQUE (channel_id, day)
);
CREATE INDEX ledger_account ON ledger (account_id, id);

-- Balance e-mails as an outbox: a charge records the warning (or the disconnection)
-- that is due, with the figures the e-mail shows, in the transaction that changes the
-- balance; balance_check sends what is recorded and unsent. One row per (account,
-- kind, disconnection date) ever, so each e-mail goes out at most once.
CREATE TABLE notifications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    -- 'warning_<n>_days' / 'warning_1_day' / 'disconnected'
    kind TEXT NOT NULL,
    disconnect_date TEXT NOT NULL,
    -- Days from the charge until the disconnection (0 for 'disconnected').
    days BIGINT NOT NULL,
    balance BIGINT NOT NULL,
    daily_total BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    -- A sender holds the row until then; a crashed sender's claim runs out.
    claimed_until BIGINT,
    sent_at BIGINT,
    UNIQUE (account_id, kind, disconnect_date)
);
CREATE INDEX notifications_unsent ON notifications (account_id) WHERE sent_at IS NULL;

CREATE TABLE deletion_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id BIGINT NOT NULL REFERENCES accounts(id),
    cutoff BIGINT NOT NULL,
    -- Chats and contacts of epochs below this one belong to the run.
    epoch BIGINT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('running', 'done', 'failed')),
    deleted_messages BIGINT NOT NULL DEFAULT 0,
    deleted_chats BIGINT NOT NULL DEFAULT 0,
    deleted_contacts BIGINT NOT NULL DEFAULT 0,
    started_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE UNIQUE INDEX deletion_runs_one_active ON deletion_runs (account_id) WHERE state = 'running';

-- The job journal: the state of every job the daemon has taken, whatever the queue
-- backend. The queue carries the work; this table answers job.get / job.list / job.retry.
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    last_error TEXT,
    idempotency_key TEXT,
    -- Set once the job reached the queue. A pending job without it is one the daemon
    -- died before queueing: the lost-job sweep queues it (see journal_claim_lost).
    pushed BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    run_at BIGINT NOT NULL
);
CREATE INDEX jobs_state ON jobs (state, kind);
-- Partial: most jobs (inbound traffic) have no key and cost this index nothing.
CREATE UNIQUE INDEX jobs_idempotency ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
