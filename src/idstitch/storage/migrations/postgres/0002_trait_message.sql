-- The message that set a trait's current value (written together with value, set_at and source), so
-- that a merge finding one key set at the same time on both sides keeps the later-ingested message's
-- value, as one profile would have. Existing rows keep NULL: on such a tie the parent's value stays.
ALTER TABLE traits ADD COLUMN message_id text COLLATE "C";
