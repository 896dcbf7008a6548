-- Deleting a contact makes SQLite look for chats that still reference it (foreign
-- key check): without this index that is a scan of every chat, per contact deleted.
CREATE INDEX chats_contact ON chats (contact_id);
