-- An outbound message is claimed by one send attempt at a time: a redelivered or
-- duplicated send_message job finds the lease and does not hand the message to the
-- connector a second time. NULL when no attempt holds it; ms since the epoch.
ALTER TABLE messages ADD COLUMN send_lease_until BIGINT;
