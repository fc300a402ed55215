"""The engine: runs messages through the core and the store in transactions; the only place they meet."""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from idstitch.config import Config, SourceConfig
from idstitch.core.errors import ConfigError, IdstitchError, InvalidEvent
from idstitch.core.graph import GraphView
from idstitch.core.identifiers import (
    Dropped,
    Extraction,
    Identifier,
    extract_identifiers,
    parse_identifier,
    require_identifier,
)
from idstitch.core.messages import Message
from idstitch.core.resolve import MessageResolution, resolve_message, view_keys
from idstitch.core.rules import IdentityRules
from idstitch.core.traits import account_trait_updates, user_trait_updates
from idstitch.storage.base import (
    EventRecord,
    LockBusy,
    SourceRecord,
    Store,
    StoreConflict,
    StoreTransaction,
    StoreUnavailable,
    TokenRecord,
)

__all__ = ["Engine", "IngestBatch", "IngestResult", "MessageOutcome", "OutcomeCounts", "event_record"]

_EMPTY_VIEW = GraphView()
_logger = logging.getLogger(__name__)
# A message's identifiers as extracted ahead: space, the rules used, the extraction, the keys to claim.
_Extracted = tuple[str, IdentityRules, Extraction, list[Identifier]]
_READER_RULES_SECONDS = 5.0  # how stale a read-only engine's learned custom types may be
# A transaction that lost to a concurrent writer runs again, after a short random pause (so that two
# losers do not collide again in step), for up to this long before the conflict is reported.
_CONFLICT_RETRY_SECONDS = 120.0
_CONFLICT_PAUSE_SECONDS = (0.001, 0.05)
# While the store's server cannot be reached, an engine that waits it out tries again this often.
_OUTAGE_PAUSE_SECONDS = 1.0


class MessageOutcome(msgspec.Struct, frozen=True, gc=False):
    """What happened to one message of a batch."""

    index: int
    message_id: str | None
    status: str  # resolved | duplicate | unresolved | rejected
    profile_id: str | None = None
    account_id: str | None = None
    created: bool = False  # a person's profile was created
    merged: tuple[str, ...] = ()
    dropped: tuple[Dropped, ...] = ()
    error: str | None = None
    account_created: bool = False  # an account's profile was created


@dataclass(slots=True)
class IngestResult:
    """Outcomes of one batch, in input order; committed durably before it is returned."""

    outcomes: list[MessageOutcome] = field(default_factory=list)

    def count(self, status: str) -> int:
        """How many messages ended with this status."""
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def rejected(self) -> list[MessageOutcome]:
        """The messages that were not accepted, with reasons."""
        return [outcome for outcome in self.outcomes if outcome.status == "rejected"]


@dataclass(slots=True)
class OutcomeCounts:
    """How many messages ended how, over any number of batches (what ingest and workers report)."""

    messages: int = 0
    accepted: int = 0
    duplicates: int = 0
    unresolved: int = 0
    rejected: int = 0
    profiles_created: int = 0
    accounts_created: int = 0
    merges: int = 0

    def count(self, outcome: MessageOutcome) -> None:
        """Add one message's outcome."""
        self.messages += 1
        if outcome.status == "resolved":
            self.accepted += 1
        elif outcome.status == "duplicate":
            self.duplicates += 1
        elif outcome.status == "unresolved":
            self.unresolved += 1
        else:
            self.rejected += 1
        self.profiles_created += outcome.created
        self.accounts_created += outcome.account_created
        self.merges += len(outcome.merged)

    def counts(self) -> dict[str, int]:
        """The counts by name, in a stable order."""
        return {
            "messages": self.messages,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "unresolved": self.unresolved,
            "rejected": self.rejected,
            "profiles_created": self.profiles_created,
            "accounts_created": self.accounts_created,
            "merges": self.merges,
        }


@dataclass(frozen=True, slots=True)
class IngestBatch:
    """One caller's messages for one space, as given to `Engine.ingest_group`."""

    items: list[Message | InvalidEvent]
    space: str
    source: str | None = None


def event_record(
    message: Message,
    *,
    source: str | None,
    profile_id: str | None,
    account_id: str | None,
    identifiers: tuple[str, ...],
) -> EventRecord:
    """The stored form of a message: its name (a track's event), times and payload, and where it went."""
    return EventRecord(
        message_id=message.message_id,
        type=message.type,
        name=message.event if message.type == "track" else message.name,
        timestamp=message.timestamp,
        received_at=message.received_at,
        source=source,
        profile_id=profile_id,
        account_id=account_id,
        identifiers=identifiers,
        payload=msgspec.json.encode(message.payload),
    )


class Engine:
    """Identity resolution over one store, with the spaces and rules of one config."""

    def __init__(
        self, store: Store, config: Config, *, read_only: bool = False, outage_wait: float = 0.0
    ) -> None:
        self.store = store
        self.config = config
        # How long a write waits for an unreachable store's server (a restart) before StoreUnavailable:
        # 0 for a server, whose client retries its 503; a batch job (`idstitch ingest`) rides it out.
        self.outage_wait = outage_wait
        self._rules: dict[str, IdentityRules] = {}
        self.created_write_keys: list[SourceRecord] = []
        self.created_tokens: list[TokenRecord] = []
        self._tokens: dict[str, TokenRecord] = {}
        self._read_only = read_only
        self._rules_read_at: dict[str, float] = {}
        if read_only:
            # A reader (a Profile API worker process) writes nothing: the writing process has made
            # the spaces, sources and tokens; it only needs to know the tokens.
            self._load_tokens()
        else:
            self._bootstrap()

    def _load_tokens(self) -> None:
        for space in self.config.spaces.values():
            for kind, tokens in (("read", space.profile_tokens), ("admin", space.admin_tokens)):
                for token in tokens:
                    self._tokens[token] = TokenRecord(space.name, token, kind)
        if self.config.implicit:
            for stored in self.store.tokens():
                holder = self.config.spaces.get(stored.space)
                if holder is None:
                    continue
                # IDSTITCH_PROFILE_TOKEN / IDSTITCH_ADMIN_TOKEN stand *instead of* the generated token of
                # their kind, as the write key's variable does: setting one to replace a leaked token works.
                if holder.profile_tokens if stored.kind == "read" else holder.admin_tokens:
                    continue
                self._tokens.setdefault(stored.token, stored)

    def _bootstrap(self) -> None:
        self._release_moved_write_keys()
        existing = {(source.space, source.name): source for source in self.store.sources()}
        for space in self.config.spaces.values():
            self.store.ensure_space(space.name)
            for source in space.sources.values():
                self._ensure_source(space.name, source, existing.get((space.name, source.name)))
        self._load_tokens()
        if self.config.implicit:
            self._ensure_generated_tokens()
        self._unmark_undeclared()

    def _unmark_undeclared(self) -> None:
        # A value the config no longer declares non-unique (a rule change) is an ordinary identifier
        # again: its stored mark would keep it from ever merging, and explain would name a rule that is gone.
        for space in self.config.spaces.values():
            stale = []
            for mark in self.store.suspects(space.name):
                if mark.evidence_type != "declared":
                    continue
                identifier = parse_identifier(mark.identifier)
                if not space.rules.non_unique.matches(identifier.value):
                    stale.append(Identifier(identifier.type, identifier.value, mark.collection))
            if stale:
                self.store.unmark_declared(space.name, stale)

    def _release_moved_write_keys(self) -> None:
        # A config may give a stored source's write key to another source: the source was renamed, moved
        # to another space, or two sources swapped keys. A write key belongs to one source in the store,
        # so the old holder lets go of it first (it gets a fresh key no client knows; it can no longer
        # write anyway unless it is configured, and then it gets its configured key below).
        wanted = {
            source.write_key: (space.name, source.name)
            for space in self.config.spaces.values()
            for source in space.sources.values()
            if source.write_key is not None
        }
        for stored in self.store.sources():
            claimant = wanted.get(stored.write_key)
            if claimant is not None and claimant != (stored.space, stored.name):
                released = "wk_released_" + secrets.token_urlsafe(18)
                self.store.upsert_source(SourceRecord(stored.space, stored.name, released))

    def _ensure_generated_tokens(self) -> None:
        # First run without a config: a read and an admin token, made once and kept in the store like
        # the write key, so that the Profile API works with nothing set up and the tokens stay valid.
        stored = list(self._tokens.values())
        for space in self.config.spaces.values():
            for kind, prefix, configured in (
                ("read", "pt_", space.profile_tokens),
                ("admin", "at_", space.admin_tokens),
            ):
                if configured or any(t.space == space.name and t.kind == kind for t in stored):
                    continue
                record = TokenRecord(space.name, prefix + secrets.token_urlsafe(18), kind)
                # Processes starting together on one new store (serve and its workers) keep the first.
                kept = self.store.first_token(record)
                self._tokens[kept.token] = kept
                if kept == record:
                    self.created_tokens.append(record)

    def _ensure_source(self, space: str, source: SourceConfig, existing: SourceRecord | None) -> None:
        if source.write_key is None:
            if existing is not None:
                return
            # First run without a config: make a key once and keep it in the store, so it stays valid.
            # Processes starting together on one new store (workers) keep the first key written.
            record = SourceRecord(space, source.name, "wk_" + secrets.token_urlsafe(18))
            self.store.upsert_source(record, replace=False)
            if record in self.store.sources():
                self.created_write_keys.append(record)
        elif existing is None or existing.write_key != source.write_key:
            self.store.upsert_source(SourceRecord(space, source.name, source.write_key))

    def rules(self, space: str) -> IdentityRules:
        """The rules of a space, with the custom types it has learned."""
        cached = self._rules.get(space)
        # Another process learns new custom types: a reader looks again now and then.
        stale = (
            self._read_only and time.monotonic() - self._rules_read_at.get(space, 0.0) > _READER_RULES_SECONDS
        )
        if stale:
            cached = None
        if cached is None:
            cached = self.config.space(space).rules.with_learned(self.store.learned_types(space))
            self._rules[space] = cached
            self._rules_read_at[space] = time.monotonic()
        return cached

    def source_for_write_key(self, write_key: str) -> SourceRecord | None:
        """The configured source a write key belongs to (None for unknown keys)."""
        # A key the config names opens the source the config gives it, whatever the store says: another
        # process, started with a newer (or older) config, rewrites the store's sources as it starts, and
        # this process would then write that key into the space the other config moved it to.
        for configured_space in self.config.spaces.values():
            for configured in configured_space.sources.values():
                if configured.write_key == write_key:
                    return SourceRecord(configured_space.name, configured.name, write_key)
        for source in self.store.sources():
            if source.write_key == write_key:
                # The store remembers sources of earlier configs; only those configured now may write,
                # and only with the key generated for them (a configured key was matched above).
                space = self.config.spaces.get(source.space)
                configured_source = None if space is None else space.sources.get(source.name)
                if configured_source is None or configured_source.write_key is not None:
                    return None
                return source
        return None

    def token(self, token: str) -> TokenRecord | None:
        """The space and kind (read / admin) of a Profile API token; None for a token nobody configured."""
        return self._tokens.get(token)

    def ingest(
        self,
        items: Iterable[Message | InvalidEvent],
        *,
        space: str,
        source: str | None = None,
    ) -> IngestResult:
        """Resolve messages in order and commit them together; invalid ones are rejected, the rest land."""
        return self.ingest_group([IngestBatch(list(items), space, source)])[0]

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        """Several callers' batches, in order, in one transaction: one durable commit for all of them.

        With concurrent writers (PostgreSQL) a group may commit in several transactions: when a message
        needs a lock another writer holds, the messages before it commit and it starts a new
        transaction. A transaction that loses to a concurrent writer (or its connection) runs again;
        the caller sees only the outcomes.
        """
        for batch in batches:
            # Unknown space or source: a ConfigError before anything is written (a queue worker parks the
            # request). A source the config no longer has in this space (moved or removed while its
            # requests were queued) would otherwise be resolved as an unrestricted one, escaping its policy.
            sources = self.config.space(batch.space).sources
            if batch.source is not None and batch.source not in sources:
                known = ", ".join(sorted(sources)) or "none"
                raise ConfigError(
                    f"unknown source {batch.source!r} in space {batch.space} (configured: {known})"
                )
        work = [
            (number, index, item, batch)
            for number, batch in enumerate(batches)
            for index, item in enumerate(batch.items)
        ]
        results = [IngestResult() for _ in batches]
        position = 0
        deadline: float | None = None
        outage_deadline: float | None = None
        while True:
            done: list[tuple[int, MessageOutcome]] = []
            try:
                with self.store.transaction() as transaction:
                    extractions = self._extractions(work[position:])
                    transaction.claim_many(
                        [
                            (extracted[0], item.message_id, extracted[3])
                            for (_, _, item, _), extracted in zip(work[position:], extractions, strict=True)
                            if extracted is not None and not isinstance(item, InvalidEvent)
                        ]
                    )
                    for (number, index, item, batch), extracted in zip(
                        work[position:], extractions, strict=True
                    ):
                        try:
                            outcome = self._ingest_one(
                                transaction, index, item, batch.space, batch.source, extracted
                            )
                        except LockBusy:
                            if not done:
                                raise
                            break  # commit what is done; this message starts the next transaction
                        done.append((number, outcome))
            except StoreUnavailable:
                # The server is down: a retry right away would fail alike, and a caller waiting out the
                # conflicts' 2 minutes (an HTTP client) would have given up long before.
                self._forget_rules(batches)
                now = time.monotonic()
                outage_deadline = outage_deadline or now + self.outage_wait
                if now >= outage_deadline:
                    raise
                time.sleep(_OUTAGE_PAUSE_SECONDS)
                continue
            except StoreConflict:
                self._forget_rules(batches)
                now = time.monotonic()
                deadline = deadline or now + _CONFLICT_RETRY_SECONDS
                if now > deadline:
                    raise
                time.sleep(random.uniform(*_CONFLICT_PAUSE_SECONDS))
                continue
            except BaseException:
                self._forget_rules(batches)
                raise
            for number, outcome in done:
                results[number].outcomes.append(outcome)
            position += len(done)
            deadline = outage_deadline = None
            if position >= len(work):
                return results

    def _extractions(
        self, work: Sequence[tuple[int, int, Message | InvalidEvent, IngestBatch]]
    ) -> list[_Extracted | None]:
        """Each valid message's identifiers under the rules of now, so that a transaction can claim
        them all at once (a message whose rules change before its turn is extracted again)."""
        extracted: list[_Extracted | None] = []
        for _, _, item, batch in work:
            extraction = None
            if not isinstance(item, InvalidEvent):
                rules = self.rules(batch.space)
                with contextlib.suppress(IdstitchError):  # rejected in its turn, with the reason
                    extraction = extract_identifiers(item, rules, rules.source(batch.source))
            if extraction is None:
                extracted.append(None)
                continue
            user_keys, account_keys = view_keys(extraction)
            extracted.append((batch.space, rules, extraction, [*user_keys, *account_keys]))
        return extracted

    def _rules_read_again(self, space: str, held: IdentityRules) -> IdentityRules:
        # A type new to this process may have been learned by another (a PostgreSQL worker, a second
        # writer on the SQLite file): its place in the store's first-seen order is its priority, so that
        # order is read before deciding. Types learned here but not yet committed keep their place after it.
        self._rules.pop(space, None)
        rules = self.rules(space).with_learned(held.learned_types)
        self._rules[space] = rules
        return rules

    def _forget_rules(self, batches: Sequence[IngestBatch]) -> None:
        # Types learned in a transaction that rolled back are not in the store: learn them again.
        for batch in batches:
            self._rules.pop(batch.space, None)

    def _ingest_one(
        self,
        transaction: StoreTransaction,
        index: int,
        item: Message | InvalidEvent,
        space: str,
        source: str | None,
        extracted: _Extracted | None = None,
    ) -> MessageOutcome:
        if isinstance(item, InvalidEvent):
            return MessageOutcome(index, None, "rejected", error=str(item))
        rules = self.rules(space)
        if extracted is not None and extracted[0] == space and extracted[1] is rules:
            extraction, keys = extracted[2], extracted[3]
        else:
            try:
                extraction = extract_identifiers(item, rules, rules.source(source))
            except IdstitchError as error:
                if transaction.has_message(space, item.message_id):
                    return MessageOutcome(index, item.message_id, "duplicate")  # stored under earlier rules
                return MessageOutcome(index, item.message_id, "rejected", error=str(error))
            user_keys, account_keys = view_keys(extraction)
            keys = [*user_keys, *account_keys]
        # Before the duplicate check: a concurrent writer with the same message finishes first.
        transaction.claim(space, item.message_id, keys)
        if transaction.has_message(space, item.message_id):
            return MessageOutcome(index, item.message_id, "duplicate")
        try:
            with transaction.savepoint():
                return self._resolve(transaction, index, item, space, source, extraction)
        except IdstitchError as error:
            return MessageOutcome(index, item.message_id, "rejected", error=str(error))

    def _resolve(
        self,
        transaction: StoreTransaction,
        index: int,
        message: Message,
        space: str,
        source: str | None,
        extraction: Extraction,
    ) -> MessageOutcome:
        rules = self.rules(space)
        if any(not rules.knows(identifier.type) for identifier in (*extraction.users, *extraction.accounts)):
            rules = self._rules_read_again(space, rules)
        policy = rules.source(source)
        require_identifier(extraction)
        user_keys, account_keys = view_keys(extraction)
        # Without non-unique detection the resolver reads only the evidence between the message's own
        # identifiers (was it stored already): a junk value seen with a million others is not read in full.
        every_pair = rules.detect_non_unique
        users_view = (
            transaction.load_view(space, "users", user_keys, every_pair=every_pair)
            if user_keys
            else _EMPTY_VIEW
        )
        accounts_view = (
            transaction.load_view(space, "accounts", account_keys, every_pair=every_pair)
            if account_keys
            else _EMPTY_VIEW
        )
        try:
            decision = resolve_message(
                message,
                extraction,
                space=space,
                rules=rules,
                users_view=users_view,
                accounts_view=accounts_view,
                source=policy,
            )
        except IdstitchError:
            raise
        except Exception as error:
            # The core is pure, so a bug in it has written nothing yet. Failing the transaction instead
            # would fail every message grouped with this one, again on each retry: a client would resend
            # its batch forever. This message alone is refused, with the reason, and the fault logged.
            _logger.exception("resolving message %r in space %r failed", message.message_id, space)
            raise InvalidEvent(
                "", f"internal error while resolving: {type(error).__name__}: {error}"
            ) from error
        if decision.new_types:
            transaction.learn_types(space, decision.new_types)
            self._rules[space] = rules.with_learned(decision.new_types)
        carried = tuple(
            dict.fromkeys(
                str(item)
                for item in (
                    *extraction.users,
                    *extraction.accounts,
                    *(drop.identifier for drop in extraction.dropped),
                    *(
                        item
                        for resolution in (decision.users, decision.accounts)
                        if resolution is not None
                        for item in (
                            *resolution.added,
                            *resolution.touched,
                            *(drop.identifier for drop in resolution.dropped),
                        )
                    ),
                )
            )
        )
        return self._write(transaction, index, message, space, source, decision, carried)

    def _write(
        self,
        transaction: StoreTransaction,
        index: int,
        message: Message,
        space: str,
        source: str | None,
        decision: MessageResolution,
        carried: tuple[str, ...],
    ) -> MessageOutcome:
        users, accounts = decision.users, decision.accounts
        at = message.timestamp
        for resolution in (users, accounts):
            if resolution is not None:
                transaction.apply_resolution(space, resolution, message.message_id, source)
        if users is not None and accounts is not None:
            transaction.link(space, users.profile_id, accounts.profile_id, at)
        if users is not None:
            updates = user_trait_updates(message)
            if updates:
                transaction.set_traits(space, users.profile_id, updates, at, source, message.message_id)
        if accounts is not None:
            updates = account_trait_updates(message)
            if updates:
                transaction.set_traits(space, accounts.profile_id, updates, at, source, message.message_id)
        owner = users.profile_id if users is not None else None
        owner = owner or (accounts.profile_id if accounts is not None else None)
        if decision.dropped:
            transaction.record_dropped(space, decision.dropped, message.message_id, at, owner)
        transaction.add_event(
            space,
            event_record(
                message,
                source=source,
                profile_id=users.profile_id if users is not None else None,
                account_id=accounts.profile_id if accounts is not None else None,
                identifiers=carried,
            ),
        )
        if decision.unresolved:
            return MessageOutcome(index, message.message_id, "unresolved", dropped=decision.dropped)
        all_dropped = decision.dropped + tuple(
            item for resolution in (users, accounts) if resolution is not None for item in resolution.dropped
        )
        return MessageOutcome(
            index,
            message.message_id,
            "resolved",
            profile_id=users.profile_id if users is not None else None,
            account_id=accounts.profile_id if accounts is not None else None,
            created=bool(users and users.created),
            account_created=bool(accounts and accounts.created),
            merged=tuple(
                step.child_id
                for resolution in (users, accounts)
                if resolution is not None
                for step in resolution.merges
            ),
            dropped=all_dropped,
        )
