-- The Profile API: its tokens, and where a profile's identifiers and traits came from.
-- Existing rows keep NULL in the new columns: their message and source were never recorded.

-- Tokens generated on a first run without config are kept here (like generated write keys), so they
-- stay valid across restarts. Keyed by the token: a request carries only the token.
CREATE TABLE tokens (
    token       TEXT PRIMARY KEY,
    space       TEXT NOT NULL,
    kind        TEXT NOT NULL
) WITHOUT ROWID;

-- The message that first attached the identifier (identifiers.source, from 0001, is its source).
-- Neither changes afterwards, not even when a merge repoints the identifier.
ALTER TABLE identifiers ADD COLUMN first_message_id TEXT;

-- The source of the message that set the current value (written together with value and set_at).
ALTER TABLE traits ADD COLUMN source TEXT;

-- No new index on events: the Profile API's event pages read one profile at a time through
-- events_by_profile / events_by_account (space, profile_id, timestamp), which already lead to the
-- page's first row; ties in timestamp are few and sorted on the spot. Every index here would cost
-- each ingested message one more B-tree write.
