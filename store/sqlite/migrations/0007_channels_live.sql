-- The channels a daemon claims to run, for the update that marks those nobody runs
-- `disconnected` (`Cluster::disconnect_unowned`: at every start, and every round of a
-- worker-only daemon), which otherwise reads every channel. As on PostgreSQL (0004).
CREATE INDEX channels_live ON channels (id) WHERE status IN ('connected', 'connecting');
