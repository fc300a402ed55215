-- Identifiers and traits stored before 0002 name neither the message that first attached an identifier
-- nor the source of a trait's value, but the events table holds what they are: each event keeps the
-- identifiers its message carried, its source, and the profile it resolved to. Filled in here only where
-- the events say it for certain; elsewhere NULL stays. Rows written since 0002 have both already.

-- The first message (in ingestion order) that carried the identifier into its profile's family (the root
-- or a profile since merged into it) without dropping it: the one that attached it. One pass over the
-- events in ingestion order, keeping the first for each identifier; what it holds is only the rows to
-- fill in and their drops, so a store written since 0002 costs a scan of its identifiers.
CREATE TEMP TABLE unattributed (
    space       TEXT NOT NULL,
    collection  TEXT NOT NULL,
    identifier  TEXT NOT NULL,
    profile_id  TEXT NOT NULL,
    PRIMARY KEY (space, identifier, collection)
) WITHOUT ROWID;

-- OR IGNORE: the first release took a custom type with a ':' (since refused), so two identifiers may read
-- alike as type:value; one of them is looked for, and only on its own profile (below).
INSERT OR IGNORE INTO temp.unattributed
SELECT space, collection, type || ':' || value, profile_id FROM identifiers WHERE first_message_id IS NULL;

CREATE TEMP TABLE unattributed_drops (
    space       TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    identifier  TEXT NOT NULL,
    PRIMARY KEY (space, message_id, identifier)
) WITHOUT ROWID;

INSERT OR IGNORE INTO temp.unattributed_drops
SELECT d.space, d.message_id, d.identifier FROM dropped d
WHERE EXISTS (SELECT 1 FROM temp.unattributed u WHERE u.space = d.space AND u.identifier = d.identifier);

CREATE TEMP TABLE first_attached (
    space       TEXT NOT NULL,
    collection  TEXT NOT NULL,
    identifier  TEXT NOT NULL,
    profile_id  TEXT NOT NULL,
    sequence    INTEGER NOT NULL,
    PRIMARY KEY (space, identifier, collection)
) WITHOUT ROWID;

INSERT OR IGNORE INTO temp.first_attached
SELECT e.space, u.collection, u.identifier, u.profile_id, e.sequence
FROM events e  -- CROSS JOIN: in this order (SQLite's planner would look identifiers up by space alone)
CROSS JOIN json_each(e.identifiers) j
CROSS JOIN temp.unattributed u ON u.space = e.space AND u.identifier = j.value
CROSS JOIN profiles f ON f.space = e.space
    AND f.segment_id = (CASE u.collection WHEN 'accounts' THEN e.account_id ELSE e.profile_id END)
WHERE EXISTS (SELECT 1 FROM temp.unattributed)
  AND coalesce(f.parent_id, f.segment_id) = u.profile_id
  AND NOT EXISTS (
      SELECT 1 FROM temp.unattributed_drops d
      WHERE d.space = e.space AND d.message_id = e.message_id AND d.identifier = u.identifier)
ORDER BY e.sequence;

UPDATE identifiers SET
    first_message_id = (
        SELECT e.message_id FROM temp.first_attached f JOIN events e ON e.sequence = f.sequence
        WHERE f.space = identifiers.space AND f.identifier = identifiers.type || ':' || identifiers.value
          AND f.collection = identifiers.collection AND f.profile_id = identifiers.profile_id),
    source = coalesce(source, (
        SELECT e.source FROM temp.first_attached f JOIN events e ON e.sequence = f.sequence
        WHERE f.space = identifiers.space AND f.identifier = identifiers.type || ':' || identifiers.value
          AND f.collection = identifiers.collection AND f.profile_id = identifiers.profile_id))
WHERE first_message_id IS NULL;

DROP TABLE temp.first_attached;

DROP TABLE temp.unattributed_drops;

DROP TABLE temp.unattributed;

-- A trait's value was set by a message of its profile's family with the trait's timestamp: when every such
-- message came from one source, that is the value's source.
UPDATE traits SET source = (
    SELECT CASE WHEN count(*) = count(c.source) AND count(DISTINCT c.source) = 1 THEN min(c.source) END
    FROM (
        SELECT e.source FROM events e
        WHERE e.space = traits.space AND e.timestamp = traits.set_at AND e.profile_id IN (
            SELECT traits.profile_id UNION ALL
            SELECT p.segment_id FROM profiles p WHERE p.space = traits.space AND p.parent_id = traits.profile_id)
        UNION ALL
        SELECT e.source FROM events e
        WHERE e.space = traits.space AND e.timestamp = traits.set_at AND e.account_id IN (
            SELECT traits.profile_id UNION ALL
            SELECT p.segment_id FROM profiles p WHERE p.space = traits.space AND p.parent_id = traits.profile_id)
    ) c)
WHERE source IS NULL;
