-- The key a contact was created under, never changed afterwards (patchbay_jobs::contact::
-- identity): `phone:<E.164>`, else `id:<channel id>:<sender id>`, else `user:<username>`,
-- else `chat:<channel id>:<external chat id>` (a sender with no key writes as its chat's
-- contact). Unique per (account, epoch), so find-or-create is INSERT ... ON CONFLICT
-- (account_id, epoch, identity) DO NOTHING and a SELECT, on SQLite as on PostgreSQL,
-- where two daemons storing the same new client's first messages make one contact.
--
-- The last column of contacts, as on PostgreSQL. SQLite adds a NOT NULL column only
-- with a default; the trigger below refuses the default, so a write that forgets the
-- identity fails as it does on PostgreSQL (where the column has none).
ALTER TABLE contacts ADD COLUMN identity TEXT NOT NULL DEFAULT '';

-- Existing contacts by the same priority. A keyless one (which wrote as its chat's
-- contact) gets `legacy:<id>`: nothing looks a contact up by its identity but a new
-- contact's creation, and a new keyless contact is only made for a chat not seen before.
UPDATE contacts SET identity = CASE
    WHEN phone IS NOT NULL THEN 'phone:' || phone
    WHEN sender_channel_id IS NOT NULL AND sender_id IS NOT NULL
        THEN 'id:' || sender_channel_id || ':' || sender_id
    WHEN username IS NOT NULL THEN 'user:' || username
    ELSE 'legacy:' || id
END;

-- The old code looked a contact up before creating one and had a single writer, so two
-- contacts with one key should not exist; should they, the later ones (by id) become
-- `legacy:<id>` and the first keeps the key, as the lookups (ORDER BY id) already did.
UPDATE contacts SET identity = 'legacy:' || id WHERE id IN (
    SELECT id FROM (
        SELECT id, ROW_NUMBER() OVER (
            PARTITION BY account_id, epoch, identity ORDER BY id) AS n
        FROM contacts)
    WHERE n > 1);

CREATE UNIQUE INDEX contacts_identity ON contacts (account_id, epoch, identity);

CREATE TRIGGER contacts_identity_required BEFORE INSERT ON contacts
WHEN NEW.identity = ''
BEGIN
    SELECT RAISE(ABORT, 'NOT NULL constraint failed: contacts.identity');
END;
