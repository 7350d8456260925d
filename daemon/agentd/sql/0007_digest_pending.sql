-- The range of events a digest is mailing, recorded before the mail goes out: a send
-- retried after a crash mails the same range again, with the same Message-ID.
ALTER TABLE digest_cursors ADD COLUMN pending_last_id INTEGER;
