"""The writes of a PostgreSQL transaction, held back in order and sent as one statement per table.

Rows wait in the order they were written. Sending them groups each table's rows into one `INSERT … SELECT
FROM jsonb_array_elements(…)` (or `UPDATE … FROM` it), in an order that respects what depends on what
(a profile before its identifiers, an identifier before its refresh). A merge moves rows that earlier
writes may have made, so everything before it is sent first, then its own statements. Where one
statement may not touch a row twice (ON CONFLICT DO UPDATE, UPDATE … FROM), the rows for one key are
first reduced to the one that a run of single statements would have left.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
import psycopg

from idstitch.storage.graph_cache import IdentifierKey, newest_pairs, refreshed_rows
from idstitch.storage.rows import EVENT_INSERT_COLUMNS

__all__ = ["HeldWrites"]

# Kinds of held rows, in the order their statements go out.
_PROFILE, _IDENTIFIER, _TOUCH, _OWN, _RETIRE, _EVIDENCE, _SUSPECT, _TRAIT, _LINK, _DROPPED, _EVENT, _LEARN = (
    range(12)
)
_MERGE: Final = 12  # not a table: everything written before it goes first

# Rows go as one JSON array of arrays (msgspec encodes it in C; psycopg's array dumper is Python,
# ~15x the client CPU and ~4x the time for an events insert of 100 rows).
_ROWS = "jsonb_array_elements(%s::jsonb) AS r"
_PROFILES_SQL = (
    "INSERT INTO profiles (space, segment_id, collection, created_at, created_by) "
    f"SELECT r->>0, r->>1, r->>2, (r->>3)::bigint, r->>4 FROM {_ROWS}"
)
_IDENTIFIERS_SQL = (
    "INSERT INTO identifiers (space, collection, type, value, profile_id, first_seen, last_seen, source, "
    "first_message_id) SELECT r->>0, r->>1, r->>2, r->>3, r->>4, (r->>5)::bigint, (r->>5)::bigint, r->>6, r->>7 "
    f"FROM {_ROWS}"
)
_KEYS = "r->>0 AS space, r->>1 AS collection, r->>2 AS type, r->>3 AS value"
_SAME_KEY = "i.space = u.space AND i.collection = u.collection AND i.type = u.type AND i.value = u.value"
# first/last seen widen (NULL leaves them: least/greatest skip NULLs); the device owner changes only for
# a login at least as new as the stored one.
_REFRESH_SQL = (
    "UPDATE identifiers AS i SET first_seen = least(i.first_seen, u.first_seen), "
    "last_seen = greatest(i.last_seen, u.last_seen), "
    "device_owner = CASE WHEN u.owner_at >= coalesce(i.device_owner_at, u.owner_at) THEN u.owner "
    "ELSE i.device_owner END, "
    "device_owner_at = CASE WHEN u.owner_at >= coalesce(i.device_owner_at, u.owner_at) THEN u.owner_at "
    "ELSE i.device_owner_at END "
    f"FROM (SELECT {_KEYS}, (r->>4)::bigint AS first_seen, (r->>5)::bigint AS last_seen, r->>6 AS owner, "
    f"(r->>7)::bigint AS owner_at FROM {_ROWS}) AS u WHERE {_SAME_KEY}"
)
_RETIRE_SQL = (
    f"UPDATE identifiers AS i SET retired = u.retired FROM (SELECT {_KEYS}, (r->>4)::boolean AS retired "
    f"FROM {_ROWS}) AS u WHERE {_SAME_KEY} AND i.retired <> u.retired"
)
_EVIDENCE_SQL = (
    "INSERT INTO evidence (space, collection, type, value, other_type, other_value, last_seen) "
    f"SELECT r->>0, r->>1, r->>2, r->>3, r->>4, r->>5, (r->>6)::bigint FROM {_ROWS} "
    "ON CONFLICT (space, collection, type, value, other_type, other_value) DO UPDATE "
    "SET last_seen = excluded.last_seen WHERE evidence.last_seen < excluded.last_seen"
)
_SUSPECTS_SQL = (
    "INSERT INTO suspects (space, collection, type, value, evidence_type, evidence_values, message_id, at) "
    f"SELECT r->>0, r->>1, r->>2, r->>3, r->>4, r->>5, r->>6, (r->>7)::bigint FROM {_ROWS} ON CONFLICT DO NOTHING"
)
_TRAITS_SQL = (
    "INSERT INTO traits (space, profile_id, key, value, set_at, source, message_id) "
    f"SELECT r->>0, r->>1, r->>2, r->>3, (r->>4)::bigint, r->>5, r->>6 FROM {_ROWS} "
    "ON CONFLICT (space, profile_id, key) DO UPDATE "
    "SET value = excluded.value, set_at = excluded.set_at, source = excluded.source, "
    "message_id = excluded.message_id WHERE excluded.set_at >= traits.set_at"
)
# In a merge's trait upsert: the child's value (excluded) was set by a message stored after the parent's.
# NULL when either message is unknown, so the parent keeps its value.
_INGESTED_LATER = (
    "(SELECT sequence FROM events WHERE space = excluded.space AND message_id = excluded.message_id) > "
    "(SELECT sequence FROM events WHERE space = traits.space AND message_id = traits.message_id)"
)
_LINKS_SQL = (
    "INSERT INTO links (space, user_id, account_id, at) "
    f"SELECT r->>0, r->>1, r->>2, (r->>3)::bigint FROM {_ROWS} ON CONFLICT DO NOTHING"
)
_DROPPED_SQL = (
    "INSERT INTO dropped (space, profile_id, message_id, identifier, rule, at) "
    f"SELECT r->>0, r->>1, r->>2, r->>3, r->>4, (r->>5)::bigint FROM {_ROWS}"
)
# The payload (bytes) is base64 in JSON.
_EVENTS_SQL = (
    f"INSERT INTO events ({EVENT_INSERT_COLUMNS}) SELECT r->>0, r->>1, r->>2, r->>3, (r->>4)::bigint, "
    f"(r->>5)::bigint, r->>6, r->>7, r->>8, r->>9, decode(r->>10, 'base64') FROM {_ROWS}"
)
_LEARN_SQL = (
    "INSERT INTO learned_types (space, position, type, collection) "
    "SELECT %s, coalesce((SELECT max(position) FROM learned_types WHERE space = %s), 0) + ordinal, "
    "type, collection FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(type, collection, ordinal) "
    "ON CONFLICT DO NOTHING"
)


_encode = msgspec.json.Encoder().encode


def _rows(rows: Sequence[Sequence[Any]]) -> tuple[str]:
    """Rows as the one parameter of `jsonb_array_elements`."""
    return (_encode(rows).decode(),)


class HeldWrites:
    """Rows written by a transaction and not sent yet, in the order they were written."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, tuple[Any, ...]]] = []

    def __len__(self) -> int:
        return len(self._rows)

    def truncate(self, length: int) -> None:
        """Forget the rows from position `length` on (a savepoint rolled back, or they were sent)."""
        del self._rows[length:]

    # -- what can be written ---------------------------------------------------------------------
    def profile(self, space: str, segment_id: str, collection: str, created_at: int, created_by: str) -> None:
        """A new profile."""
        self._rows.append((_PROFILE, (space, segment_id, collection, created_at, created_by)))

    def merge(
        self, space: str, collection: str, target: str, child: str, message_id: str, via: str, at: int
    ) -> None:
        """A merge of `child` (and its former children) into `target`."""
        self._rows.append((_MERGE, (space, collection, target, child, message_id, via, at)))

    def identifier(
        self, key: IdentifierKey, profile_id: str, at: int, source: str | None, message_id: str
    ) -> None:
        """A new identifier of a profile."""
        self._rows.append((_IDENTIFIER, (*key, profile_id, at, source, message_id)))

    def touch(self, key: IdentifierKey, at: int) -> None:
        """An identifier seen again at `at`."""
        self._rows.append((_TOUCH, (key, at)))

    def own(self, key: IdentifierKey, owner: str, at: int) -> None:
        """A device identifier used by `owner` at `at`."""
        self._rows.append((_OWN, (key, owner, at)))

    def set_retired(self, key: IdentifierKey, retired: bool) -> None:
        """An identifier an alias retired, or made current again."""
        self._rows.append((_RETIRE, (key, retired)))

    def evidence(self, key: IdentifierKey, other: tuple[str, str], at: int) -> None:
        """An identifier seen with a more trusted one (type, value) at `at`."""
        self._rows.append((_EVIDENCE, (key, other, at)))

    def suspect(
        self, key: IdentifierKey, evidence_type: str, evidence_values: str, message_id: str, at: int
    ) -> None:
        """An identifier marked non-unique."""
        self._rows.append((_SUSPECT, (*key, evidence_type, evidence_values, message_id, at)))

    def trait(
        self,
        space: str,
        profile_id: str,
        key: str,
        value: str | None,
        set_at: int,
        source: str | None,
        message_id: str | None = None,
    ) -> None:
        """A trait value (JSON; None removes it) and the message that set it."""
        self._rows.append((_TRAIT, (space, profile_id, key, value, set_at, source, message_id)))

    def link(self, space: str, user_id: str, account_id: str, at: int) -> None:
        """A user and an account linked."""
        self._rows.append((_LINK, (space, user_id, account_id, at)))

    def dropped(
        self, space: str, profile_id: str | None, message_id: str, identifier: str, rule: str, at: int
    ) -> None:
        """An identifier dropped by a rule."""
        self._rows.append((_DROPPED, (space, profile_id, message_id, identifier, rule, at)))

    def event(self, row: tuple[Any, ...]) -> None:
        """A stored message (a row in the order of EVENT_INSERT_COLUMNS)."""
        self._rows.append((_EVENT, row))

    def learn(self, space: str, types: Sequence[tuple[str, str]]) -> None:
        """Custom identifier types, in first-seen order."""
        self._rows.append((_LEARN, (space, tuple(types))))

    # -- sending -----------------------------------------------------------------------------
    def send(self, cursor: psycopg.Cursor[Any], start: int, end: int) -> None:
        """Send the rows from `start` to `end` (not forgotten: the caller truncates)."""
        kinds: list[list[Any]] = [[] for _ in range(_MERGE)]
        for kind, row in self._rows[start:end]:
            if kind == _MERGE:
                self._send_kinds(cursor, kinds)
                kinds = [[] for _ in range(_MERGE)]
                self._send_merge(cursor, *row)
            else:
                kinds[kind].append(row)
        self._send_kinds(cursor, kinds)

    @staticmethod
    def _send_kinds(cursor: psycopg.Cursor[Any], kinds: list[list[Any]]) -> None:
        if kinds[_PROFILE]:
            cursor.execute(_PROFILES_SQL, _rows(kinds[_PROFILE]))
        if kinds[_IDENTIFIER]:
            cursor.execute(_IDENTIFIERS_SQL, _rows(kinds[_IDENTIFIER]))
        if kinds[_TOUCH] or kinds[_OWN]:
            refreshed = refreshed_rows(kinds[_TOUCH], kinds[_OWN])
            cursor.execute(_REFRESH_SQL, _rows([(*key, *row) for key, row in refreshed.items()]))
        if kinds[_RETIRE]:
            # One row per identifier, its last word: an alias back and forth in one transaction.
            last = dict(kinds[_RETIRE])
            cursor.execute(_RETIRE_SQL, _rows([(*key, retired) for key, retired in last.items()]))
        if kinds[_EVIDENCE]:
            pairs = newest_pairs(kinds[_EVIDENCE])
            cursor.execute(_EVIDENCE_SQL, _rows([(*key, *other, at) for (key, other), at in pairs.items()]))
        if kinds[_SUSPECT]:
            cursor.execute(_SUSPECTS_SQL, _rows(kinds[_SUSPECT]))
        if kinds[_TRAIT]:
            # Per (profile, key) the newest value; on a tie the later one, as row by row (>=) would.
            newest: dict[tuple[str, str, str], tuple[Any, ...]] = {}
            for row in kinds[_TRAIT]:
                slot = (row[0], row[1], row[2])
                kept = newest.get(slot)
                if kept is None or row[4] >= kept[4]:
                    newest[slot] = row
            cursor.execute(_TRAITS_SQL, _rows(list(newest.values())))
        if kinds[_LINK]:
            cursor.execute(_LINKS_SQL, _rows(kinds[_LINK]))
        if kinds[_DROPPED]:
            cursor.execute(_DROPPED_SQL, _rows(kinds[_DROPPED]))
        if kinds[_EVENT]:
            cursor.execute(_EVENTS_SQL, _rows(kinds[_EVENT]))
        for space, types in kinds[_LEARN]:
            cursor.execute(
                _LEARN_SQL, (space, space, [item[0] for item in types], [item[1] for item in types])
            )

    @staticmethod
    def _send_merge(
        cursor: psycopg.Cursor[Any],
        space: str,
        collection: str,
        target: str,
        child: str,
        message_id: str,
        via: str,
        at: int,
    ) -> None:
        parameters = {"target": target, "child": child, "space": space, "at": at}
        # The child and its former children point at the target, which counts them.
        cursor.execute(
            "WITH moved AS (UPDATE profiles SET parent_id = %(target)s, merged_at = %(at)s "
            "WHERE space = %(space)s AND (segment_id = %(child)s OR parent_id = %(child)s) "
            "RETURNING segment_id, merge_count) "
            "UPDATE profiles SET merge_count = merge_count + "
            "(SELECT merge_count + 1 FROM moved WHERE segment_id = %(child)s) "
            "WHERE space = %(space)s AND segment_id = %(target)s",
            parameters,
        )
        cursor.execute(
            "UPDATE identifiers SET profile_id = %(target)s WHERE space = %(space)s AND profile_id = %(child)s",
            parameters,
        )
        # Per trait key the newest value (with its source) wins; on a tie the value of the message ingested
        # later (as on one profile), the parent's when either message is unknown (rows from before 0002).
        cursor.execute(
            "INSERT INTO traits (space, profile_id, key, value, set_at, source, message_id) "
            "SELECT space, %(target)s, key, value, set_at, source, message_id FROM traits "
            "WHERE space = %(space)s AND profile_id = %(child)s "
            "ON CONFLICT (space, profile_id, key) DO UPDATE SET value = excluded.value, "
            "set_at = excluded.set_at, source = excluded.source, message_id = excluded.message_id "
            f"WHERE excluded.set_at > traits.set_at OR (excluded.set_at = traits.set_at AND {_INGESTED_LATER})",
            parameters,
        )
        cursor.execute("DELETE FROM traits WHERE space = %(space)s AND profile_id = %(child)s", parameters)
        own, other = ("account_id", "user_id") if collection == "accounts" else ("user_id", "account_id")
        cursor.execute(
            f"INSERT INTO links (space, {own}, {other}, at) "
            f"SELECT space, %(target)s, {other}, at FROM links WHERE space = %(space)s AND {own} = %(child)s "
            "ON CONFLICT DO NOTHING",
            parameters,
        )
        cursor.execute(f"DELETE FROM links WHERE space = %(space)s AND {own} = %(child)s", parameters)
        cursor.execute(
            "INSERT INTO merges (space, parent_id, child_id, message_id, via, at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (space, target, child, message_id, via, at),
        )
