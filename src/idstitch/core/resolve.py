"""Flat matching (SPEC §4): which profile a message belongs to, what merges, what is added or dropped."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec

from idstitch.core.graph import GraphView, ProfileState, StoredIdentifier
from idstitch.core.identifiers import Dropped, Extraction, Identifier
from idstitch.core.messages import Message
from idstitch.core.rules import IdentityRules, SourcePolicy
from idstitch.core.segment_ids import new_segment_id

__all__ = [
    "MergeStep",
    "MessageResolution",
    "Resolution",
    "SuspectMark",
    "resolve_collection",
    "resolve_message",
    "view_keys",
]


class MergeStep(msgspec.Struct, frozen=True, gc=False):
    """One child profile fused into the target, and the message identifier that linked it."""

    child_id: str
    via: Identifier


class SuspectMark(msgspec.Struct, frozen=True, gc=False):
    """An identifier found non-unique, with the evidence: a more trusted type and the values seen with it."""

    identifier: Identifier
    evidence_type: str
    values: tuple[str, ...]


class Resolution(msgspec.Struct, frozen=True, gc=False):
    """The decision for one collection of one message; the store applies it atomically."""

    collection: str
    profile_id: str
    timestamp: datetime
    created: bool
    created_at: datetime
    merges: tuple[MergeStep, ...]
    added: tuple[Identifier, ...]
    touched: tuple[Identifier, ...]
    dropped: tuple[Dropped, ...]
    retired: tuple[Identifier, ...]
    suspects: tuple[SuspectMark, ...]
    evidence: tuple[tuple[Identifier, Identifier], ...]
    device_owned: tuple[Identifier, ...]
    revived: tuple[Identifier, ...] = ()  # retired identifiers an alias made current again


class MessageResolution(msgspec.Struct, frozen=True, gc=False):
    """The decision for a whole message: its person, its account (if any), and whether they link."""

    users: Resolution | None
    accounts: Resolution | None
    dropped: tuple[Dropped, ...]
    new_types: tuple[tuple[str, str], ...]

    @property
    def unresolved(self) -> bool:
        """True when every identifier was blocked: the message creates no profile."""
        return self.users is None and self.accounts is None


def view_keys(extraction: Extraction) -> tuple[list[Identifier], list[Identifier]]:
    """The identifiers whose graph neighbourhood must be loaded for a message (users, accounts)."""
    return [*extraction.users, *extraction.alias_previous], list(extraction.accounts)


def resolve_message(
    message: Message,
    extraction: Extraction,
    *,
    space: str,
    rules: IdentityRules,
    users_view: GraphView,
    accounts_view: GraphView,
    source: SourcePolicy,
) -> MessageResolution:
    """Resolve both collections of one message against views the store loaded for `view_keys`."""
    users = list(extraction.users)
    retire: list[Identifier] = []
    revive: list[Identifier] = []
    dropped = extraction.dropped
    if extraction.alias_previous:
        # E11: previousId is whichever identifier it already is (user_id first), else an anonymous_id.
        known = [
            item
            for item in extraction.alias_previous
            if item.type == "user_id" and item in users_view.identifiers
        ]
        unknown = [item for item in extraction.alias_previous if item.type == "anonymous_id"]
        previous = known[0] if known else unknown[0] if unknown else None
        if previous is not None and not source.allows(previous.type):
            # What it is, this source may not contribute: it is dropped, never taken as the other type.
            dropped += (Dropped(previous, f"source {source.name} may not contribute {previous.type}"),)
        elif previous is not None:
            current = [item for item in users if item.type == "user_id"]
            if previous.type == "user_id" and current:
                retire.append(previous)
                # Aliasing back to an id an earlier alias retired: that id is the current one again.
                stored = users_view.identifiers.get(current[0])
                if stored is not None and stored.retired:
                    revive.append(current[0])
            if previous not in users:
                users.append(previous)
    accounts = list(extraction.accounts)
    # One pass over the message's identifiers for types the space does not know yet (most have none).
    unknown = [item for item in (*users, *accounts) if not rules.knows(item.type)]
    if unknown:
        new_names = list(dict.fromkeys(item.type for item in unknown))
        room = rules.learned_room
        if len(new_names) > room:
            # Past the space's cap a new type is no identifier: every client with a public write key could
            # otherwise add rules for good (learning one reads and rebuilds them all).
            refused = set(new_names[room:])
            reason = f"cap {rules.max_learned_types} learned identifier types per space"
            dropped += tuple(Dropped(item, reason) for item in (*users, *accounts) if item.type in refused)
            users = [item for item in users if item.type not in refused]
            accounts = [item for item in accounts if item.type not in refused]
            unknown = [item for item in unknown if item.type not in refused]
    new_types = tuple(dict.fromkeys((identifier.type, identifier.collection) for identifier in unknown))
    if new_types:
        rules = rules.with_learned(new_types)
    user_resolution = (
        resolve_collection(
            users,
            collection="users",
            space=space,
            message_id=message.message_id,
            timestamp=message.timestamp,
            rules=rules,
            view=users_view,
            source=source,
            retire=retire,
            revive=revive,
        )
        if users
        else None
    )
    account_resolution = (
        resolve_collection(
            accounts,
            collection="accounts",
            space=space,
            message_id=message.message_id,
            timestamp=message.timestamp,
            rules=rules,
            view=accounts_view,
            source=source,
        )
        if accounts
        else None
    )
    return MessageResolution(user_resolution, account_resolution, dropped, new_types)


@dataclass(slots=True)
class _Attempt:
    target: str | None
    children: list[MergeStep]
    added: list[Identifier]
    touched: list[Identifier]
    violation: str | None


def resolve_collection(
    identifiers: Sequence[Identifier],
    *,
    collection: str,
    space: str,
    message_id: str,
    timestamp: datetime,
    rules: IdentityRules,
    view: GraphView,
    source: SourcePolicy,
    retire: Iterable[Identifier] = (),
    revive: Iterable[Identifier] = (),
) -> Resolution:
    """Flat matching of one collection's identifiers; drops the least trusted and retries on a violation."""
    if not identifiers:
        raise ValueError("resolve_collection needs at least one identifier")
    retired = tuple(retire)
    revived = tuple(revive)
    suspect = {
        identifier
        for identifier in identifiers
        if identifier in view.suspects or rules.non_unique.matches(identifier.value)
    }
    active = list(identifiers)
    dropped: list[Dropped] = []
    while True:
        attempt = _attempt(active, suspect, rules, view, source, timestamp, retired, revived)
        if attempt.violation is None or len(active) == 1:
            break
        # Least trusted first; among equals, the later type in the rules' order, then the later one sent.
        victim = max(enumerate(active), key=lambda pair: (rules.rank(pair[1].type), pair[0]))[1]
        active.remove(victim)
        dropped.append(Dropped(victim, attempt.violation))

    touched = attempt.touched
    if attempt.violation is not None:
        # One identifier left and still over a limit: it is already on the profile (a lone identifier
        # cannot merge or be new and break one), so the message lands there, but refreshing its last-seen
        # would put one window over the limit (a late message), so that refresh is left out; so is
        # making a retired one current again (another alias made a different id current meanwhile).
        touched = []
        revived = ()
    created = attempt.target is None
    profile_id = attempt.target or new_segment_id(space, message_id, collection)
    created_at = timestamp if created else view.profiles[profile_id].created_at

    added = attempt.added
    current_total = 0 if created else len(view.profiles[profile_id].identifiers)
    current_total += sum(len(view.profiles[step.child_id].identifiers) for step in attempt.children)
    excess = current_total + len(added) - rules.max_identifiers
    if excess > 0:
        # Past the identifier cap the message still resolves, but nothing new is attached. The least
        # trusted go first and, among equals, the later one sent, as step 5 drops them.
        by_trust = [
            item
            for _, item in sorted(
                enumerate(added), key=lambda pair: (rules.rank(pair[1].type), pair[0]), reverse=True
            )
        ]
        refused = set(by_trust[:excess])
        dropped += [
            Dropped(item, f"cap {rules.max_identifiers} identifiers per profile")
            for item in by_trust[:excess]
        ]
        added = [item for item in added if item not in refused]

    kept = set(active)
    for item in dropped:
        kept.discard(item.identifier)
    # E11: an alias retires the old id only on the profile that takes the new one. When the two stay
    # apart (a refused merge, the new id dropped), retiring it would leave that profile with no current
    # id, open to the next person on its device; so would making a retired id current on another profile.
    on_target = (set(added) | set(attempt.touched)) & kept
    current = {item.type for item in on_target if item not in retired}
    retired = tuple(item for item in retired if item in on_target and item.type in current)
    revived = tuple(item for item in revived if item in on_target)
    evidence, suspects = _evidence(identifiers, suspect, rules, view, timestamp)
    final_trusted = min((rules.rank(item.type) for item in kept), default=None)
    stored_or_added = set(added) | set(view.identifiers)
    device_owned = tuple(
        item
        for item in identifiers
        if final_trusted is not None and rules.rank(item.type) > final_trusted and item in stored_or_added
    )
    # A stored identifier too, not only a new one: a value declared after it was stored (a rule change)
    # acts as a suspect from now on, so it is listed as one (explain, the admin API, stats).
    suspects += [
        SuspectMark(item, "declared", ())
        for item in identifiers
        if item in suspect and item not in view.suspects and item in stored_or_added
    ]
    return Resolution(
        collection=collection,
        profile_id=profile_id,
        timestamp=timestamp,
        created=created,
        created_at=created_at,
        merges=tuple(attempt.children),
        added=tuple(added),
        touched=tuple(touched),
        dropped=tuple(dropped),
        retired=retired,
        revived=revived,
        suspects=tuple(suspects),
        evidence=tuple(evidence),
        device_owned=device_owned,
    )


def _attempt(
    active: Sequence[Identifier],
    suspect: set[Identifier],
    rules: IdentityRules,
    view: GraphView,
    source: SourcePolicy,
    timestamp: datetime,
    retired: Sequence[Identifier],
    revived: Sequence[Identifier],
) -> _Attempt:
    owned = [
        (identifier, view.identifiers[identifier]) for identifier in active if identifier in view.identifiers
    ]
    matching = [(identifier, stored) for identifier, stored in owned if identifier not in suspect]
    target: str | None
    children: list[MergeStep] = []
    if all(identifier in suspect for identifier in active):
        # Only suspect identifiers: the device belongs to whoever last logged in on it (SPEC §5).
        target = _device_owner_target(owned, rules, view) if owned else None
    else:
        mergeable: dict[str, Identifier] = {}
        for identifier, stored in sorted(matching, key=lambda pair: rules.rank(pair[0].type)):
            if source.merge and rules.rule(identifier.type).merge:
                mergeable.setdefault(stored.profile_id, identifier)
        found = {stored.profile_id for _, stored in matching}
        if len(found) > 1 and not found <= mergeable.keys():
            # A refused merge (merge: false type or source policy): the message goes to the profile of
            # its most trusted match (ties: oldest), as SPEC §3 says. The refusal is per profile: those
            # that mergeable identifiers found still fuse when that match is one of them (a push token
            # seen elsewhere must not stop a user_id and an email joining); the others stay apart.
            best = min(
                matching,
                key=lambda pair: (rules.rank(pair[0].type), view.profiles[pair[1].profile_id].age_key),
            )
            target = best[1].profile_id
            if target in mergeable:
                target = min(mergeable, key=lambda profile_id: view.profiles[profile_id].age_key)
                children = [
                    MergeStep(profile_id, via)
                    for profile_id, via in mergeable.items()
                    if profile_id != target
                ]
        elif found:
            target = min(found, key=lambda profile_id: view.profiles[profile_id].age_key)
            children = [
                MergeStep(profile_id, via) for profile_id, via in mergeable.items() if profile_id != target
            ]
        else:
            target = None

    family = {target, *(step.child_id for step in children)}
    added = [identifier for identifier in active if identifier not in view.identifiers]
    touched = [
        identifier for identifier, stored in owned if stored.profile_id in family and target is not None
    ]
    violation = _violation(target, children, added, touched, rules, view, timestamp, retired, revived)
    return _Attempt(target, children, added, touched, violation)


def _device_owner_target(
    owned: Sequence[tuple[Identifier, StoredIdentifier]], rules: IdentityRules, view: GraphView
) -> str:
    by_trust = sorted(owned, key=lambda pair: rules.rank(pair[0].type))
    for _, stored in by_trust:
        if stored.device_owner is not None and stored.device_owner in view.profiles:
            return stored.device_owner
    best_rank = rules.rank(by_trust[0][0].type)
    return min(
        (stored.profile_id for identifier, stored in by_trust if rules.rank(identifier.type) == best_rank),
        key=lambda profile_id: view.profiles[profile_id].age_key,
    )


def _violation(
    target: str | None,
    children: Sequence[MergeStep],
    added: Sequence[Identifier],
    touched: Sequence[Identifier],
    rules: IdentityRules,
    view: GraphView,
    timestamp: datetime,
    retired: Sequence[Identifier],
    revived: Sequence[Identifier],
) -> str | None:
    target_state: ProfileState | None = view.profiles.get(target) if target is not None else None
    if children:
        merge_total = (target_state.merge_count if target_state else 0) + sum(
            view.profiles[step.child_id].merge_count + 1 for step in children
        )
        if merge_total > rules.max_merges:
            return f"cap {rules.max_merges} merges per profile"
        total = (len(target_state.identifiers) if target_state else 0) + sum(
            len(view.profiles[step.child_id].identifiers) for step in children
        )
        if total > rules.max_identifiers:
            return f"cap {rules.max_identifiers} identifiers per profile"

    retired_set = set(retired)
    before: dict[str, dict[str, datetime]] = {}
    if target_state is not None:
        for stored in target_state.identifiers:
            if not stored.retired:
                before.setdefault(stored.identifier.type, {})[stored.identifier.value] = stored.last_seen
    after = {type_: dict(values) for type_, values in before.items()}
    for step in children:
        for stored in view.profiles[step.child_id].identifiers:
            if stored.retired:
                continue
            values = after.setdefault(stored.identifier.type, {})
            previous = values.get(stored.identifier.value)
            if previous is None or stored.last_seen > previous:
                values[stored.identifier.value] = stored.last_seen
    for identifier in (*touched, *added):
        stored_identifier = view.identifiers.get(identifier)
        if stored_identifier is not None and stored_identifier.retired and identifier not in revived:
            continue  # E11: a retired identifier still resolves but no longer counts
        values = after.setdefault(identifier.type, {})
        previous = values.get(identifier.value)
        if previous is None or timestamp > previous:
            values[identifier.value] = timestamp
    for identifier in retired_set:
        after.get(identifier.type, {}).pop(identifier.value, None)

    for identifier_type in sorted(after, key=rules.rank):
        values_after = after[identifier_type]
        values_before = before.get(identifier_type, {})
        if values_after == values_before:
            continue
        rule = rules.rule(identifier_type)
        if _breaks_limit(values_before, values_after, rule.limit, rule.window_length):
            return rule.describe()
    return None


_LATEST = datetime.max.replace(tzinfo=UTC)


def _window_start(end: datetime, window: timedelta) -> datetime | None:
    """When a window ending at `end` starts (exclusive); None when it reaches back before year 1."""
    try:
        return end - window
    except OverflowError:  # Go's zero time (0001-01-01) is a timestamp real clients send
        return None


def _window_end(start: datetime, window: timedelta) -> datetime:
    """When a window starting at `start` ends; the latest time for one reaching past year 9999."""
    try:
        return start + window
    except OverflowError:
        return _LATEST


def _breaks_limit(
    before: Mapping[str, datetime], after: Mapping[str, datetime], limit: int, window: timedelta | None
) -> bool:
    """True when some window holds more values than the limit after the message, and more than before.

    Every window ending at a last-seen time is checked, not only the one ending at the message, so that a
    backfilled message cannot push a later week over its limit. A profile already over its limit (a rule
    change) is not this message's fault: only a window whose count the message raises can break it.
    """
    if window is None:
        return len(after) > limit and len(after) > len(before)
    if len(after) <= limit:
        return False
    after_times = sorted(after.values())
    before_times = sorted(before.values())
    for end in after_times:
        start = _window_start(end, window)
        count_after = _count_within(after_times, start, end)
        if count_after <= limit:
            continue
        if count_after > _count_within(before_times, start, end):
            return True
    return False


def _count_within(sorted_times: Sequence[datetime], start: datetime | None, end: datetime) -> int:
    """How many times fall in (start, end]; a start of None is before them all."""
    return bisect_right(sorted_times, end) - (0 if start is None else bisect_right(sorted_times, start))


def _evidence(
    identifiers: Sequence[Identifier],
    suspect: set[Identifier],
    rules: IdentityRules,
    view: GraphView,
    timestamp: datetime,
) -> tuple[list[tuple[Identifier, Identifier]], list[SuspectMark]]:
    """Pairs seen together (dropped ones count), and identifiers this message proves non-unique."""
    pairs: list[tuple[Identifier, Identifier]] = []
    marks: list[SuspectMark] = []
    for lower in identifiers:
        lower_rank = rules.rank(lower.type)
        partners = [
            higher
            for higher in identifiers
            if higher.type != lower.type and rules.rank(higher.type) < lower_rank
        ]
        if not partners:
            continue
        if lower in suspect:
            continue  # already non-unique: more evidence changes nothing, and would grow without bound
        known = view.evidence.get(lower, {})
        # A pair already stored only needs its time refreshed when a window reads that time.
        pairs += [
            (lower, higher)
            for higher in partners
            if higher not in known or rules.rule(higher.type).window_length is not None
        ]
        if not rules.detect_non_unique:
            continue
        seen: dict[str, dict[str, datetime]] = {}
        for higher, last in view.evidence.get(lower, {}).items():
            seen.setdefault(higher.type, {})[higher.value] = last
        for higher in partners:
            seen.setdefault(higher.type, {})[higher.value] = timestamp
        for higher_type in sorted(seen, key=rules.rank):
            rule = rules.rule(higher_type)
            values = _crowded_window(seen[higher_type], timestamp, rule.limit, rule.window_length)
            if values is not None:
                marks.append(SuspectMark(lower, higher_type, values))
                break
    return pairs, marks


def _crowded_window(
    last_seen: Mapping[str, datetime], timestamp: datetime, limit: int, window: timedelta | None
) -> tuple[str, ...] | None:
    """The values of one window holding the message's time and more than `limit` values (else None).

    Every window that holds the message's time is looked at, not only the one ending there, so that the
    verdict does not depend on the order messages arrive in: evidence stamped later than a late message
    counts as well.
    """
    if len(last_seen) <= limit:
        return None
    if window is None:
        return tuple(sorted(last_seen))
    latest_end = _window_end(timestamp, window)
    for end in sorted(last_seen.values()):
        if not timestamp <= end < latest_end:
            continue
        start = _window_start(end, window)
        inside = [
            value for value, last in last_seen.items() if (start is None or start < last) and last <= end
        ]
        if len(inside) > limit:
            return tuple(sorted(inside))
    return None
