-- The messenger's own stable user id of a contact (header revision 1.2 `sender.id`:
-- Telegram `from.id`, WhatsApp `wa_id`), scoped to the channel that reported it: ids
-- of two messengers (or two bots) are unrelated. A contact is found by phone, else by
-- (channel, sender id), else by username.
ALTER TABLE contacts ADD COLUMN sender_channel_id BIGINT;
ALTER TABLE contacts ADD COLUMN sender_id TEXT;
CREATE INDEX contacts_sender ON contacts (account_id, epoch, sender_channel_id, sender_id);
