-- Times are integer microseconds since the Unix epoch (UTC): compact, exact and ordered.
-- Every table is keyed by space first, so one space never touches another's rows.

CREATE TABLE spaces (
    name        TEXT PRIMARY KEY,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE sources (
    space       TEXT NOT NULL,
    name        TEXT NOT NULL,
    write_key   TEXT NOT NULL UNIQUE,
    PRIMARY KEY (space, name)
) WITHOUT ROWID;

-- Custom identifier types in first-seen order (their priority follows the configured ones).
CREATE TABLE learned_types (
    space       TEXT NOT NULL,
    position    INTEGER NOT NULL,
    type        TEXT NOT NULL,
    collection  TEXT NOT NULL,
    PRIMARY KEY (space, type)
) WITHOUT ROWID;

-- parent_id is set on merged children and always names the root (chains are kept flat).
CREATE TABLE profiles (
    space       TEXT NOT NULL,
    segment_id  TEXT NOT NULL,
    collection  TEXT NOT NULL,
    parent_id   TEXT,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    merged_at   INTEGER,
    merge_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (space, segment_id)
) WITHOUT ROWID;
CREATE INDEX profiles_by_parent ON profiles (space, parent_id) WHERE parent_id IS NOT NULL;

-- profile_id always names the root profile: merges repoint the child's identifiers.
CREATE TABLE identifiers (
    space           TEXT NOT NULL,
    collection      TEXT NOT NULL,
    type            TEXT NOT NULL,
    value           TEXT NOT NULL,
    profile_id      TEXT NOT NULL,
    first_seen      INTEGER NOT NULL,
    last_seen       INTEGER NOT NULL,
    retired         INTEGER NOT NULL DEFAULT 0,
    device_owner    TEXT,
    device_owner_at INTEGER,
    source          TEXT,
    PRIMARY KEY (space, collection, type, value)
) WITHOUT ROWID;
CREATE INDEX identifiers_by_profile ON identifiers (space, profile_id);

-- Which more-trusted identifiers each identifier was seen with: the evidence for non-unique detection.
CREATE TABLE evidence (
    space       TEXT NOT NULL,
    collection  TEXT NOT NULL,
    type        TEXT NOT NULL,
    value       TEXT NOT NULL,
    other_type  TEXT NOT NULL,
    other_value TEXT NOT NULL,
    last_seen   INTEGER NOT NULL,
    PRIMARY KEY (space, collection, type, value, other_type, other_value)
) WITHOUT ROWID;

CREATE TABLE suspects (
    space           TEXT NOT NULL,
    collection      TEXT NOT NULL,
    type            TEXT NOT NULL,
    value           TEXT NOT NULL,
    evidence_type   TEXT NOT NULL,
    evidence_values TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    at              INTEGER NOT NULL,
    PRIMARY KEY (space, collection, type, value)
) WITHOUT ROWID;

-- profile_id / account_id: the root each resolved to when the message arrived (reads expand families).
CREATE TABLE events (
    sequence    INTEGER PRIMARY KEY AUTOINCREMENT,
    space       TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    type        TEXT NOT NULL,
    name        TEXT,
    timestamp   INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    source      TEXT,
    profile_id  TEXT,
    account_id  TEXT,
    identifiers TEXT NOT NULL,
    payload     BLOB NOT NULL,
    UNIQUE (space, message_id)
);
CREATE INDEX events_by_profile ON events (space, profile_id, timestamp) WHERE profile_id IS NOT NULL;
CREATE INDEX events_by_account ON events (space, account_id, timestamp) WHERE account_id IS NOT NULL;
CREATE INDEX events_unresolved ON events (space, sequence) WHERE profile_id IS NULL AND account_id IS NULL;

-- value NULL is a removal, kept so that an older message cannot bring the trait back.
CREATE TABLE traits (
    space       TEXT NOT NULL,
    profile_id  TEXT NOT NULL,
    key         TEXT NOT NULL,
    value       TEXT,
    set_at      INTEGER NOT NULL,
    PRIMARY KEY (space, profile_id, key)
) WITHOUT ROWID;

CREATE TABLE links (
    space       TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    account_id  TEXT NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (space, user_id, account_id)
) WITHOUT ROWID;
CREATE INDEX links_by_account ON links (space, account_id);

CREATE TABLE merges (
    sequence    INTEGER PRIMARY KEY AUTOINCREMENT,
    space       TEXT NOT NULL,
    parent_id   TEXT NOT NULL,
    child_id    TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    via         TEXT NOT NULL,
    at          INTEGER NOT NULL
);
CREATE INDEX merges_by_parent ON merges (space, parent_id);

CREATE TABLE dropped (
    sequence    INTEGER PRIMARY KEY AUTOINCREMENT,
    space       TEXT NOT NULL,
    profile_id  TEXT,
    message_id  TEXT NOT NULL,
    identifier  TEXT NOT NULL,
    rule        TEXT NOT NULL,
    at          INTEGER NOT NULL
);
CREATE INDEX dropped_by_profile ON dropped (space, profile_id);
