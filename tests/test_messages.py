"""Tests of idstitch.core.messages: decoding, validation and normalisation of Segment messages."""

import base64
import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from hashlib import blake2b
from typing import Any

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    MAX_MESSAGE_BYTES,
    MAX_MESSAGE_ID_LENGTH,
    MESSAGE_TYPES,
    ExternalId,
    Message,
    SourceOccurrences,
    decode_document,
    decode_json,
    decode_message,
    format_timestamp,
    parse_batch,
    parse_message,
    parse_stored,
    parse_timestamp,
)

RECEIVED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
TS = "2026-03-01T11:00:00.000Z"


def parse(raw: object, **kwargs: Any) -> Message:
    kwargs.setdefault("received_at", RECEIVED)
    return parse_message(raw, **kwargs)


def track(**fields: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "track", "event": "Signed Up", "userId": "u1"}
    message.update(fields)
    return message


def error_of(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(InvalidEvent) as info:
        call()
    return info.value.field, info.value.reason


def parse_error(raw: object, **kwargs: Any) -> tuple[str, str]:
    return error_of(lambda: parse(raw, **kwargs))


def ext(**fields: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"id": "123-456", "type": "phone", "collection": "users", "encoding": "none"}
    item.update(fields)
    return item


def with_external_ids(*items: object) -> dict[str, Any]:
    return track(context={"externalIds": list(items)})


# --- constants ------------------------------------------------------------------------------


def test_constants() -> None:
    assert frozenset({"identify", "track", "page", "screen", "group", "alias"}) == MESSAGE_TYPES
    assert MAX_MESSAGE_BYTES == 32768
    assert MAX_BATCH_BYTES == 512000
    assert MAX_BATCH_MESSAGES == 2500
    assert MAX_MESSAGE_ID_LENGTH == 100


# --- shape and type ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [[], "track", None, 3, True])
def test_message_must_be_object(raw: object) -> None:
    assert parse_error(raw) == ("", "message must be a JSON object")


def test_invalid_event_str_includes_field() -> None:
    with pytest.raises(InvalidEvent, match=r"^event: required for track$"):
        parse({"type": "track", "userId": "u"})


def test_type_missing_without_default() -> None:
    assert parse_error({"userId": "u"}) == ("type", "required")
    assert parse_error({"type": None, "userId": "u"}) == ("type", "required")
    assert parse_error({"type": "", "userId": "u"}) == ("type", "required")


def test_default_type_applies_when_type_missing() -> None:
    message = parse({"event": "E", "userId": "u"}, default_type="track")
    assert message.type == "track"
    assert message.payload["type"] == "track"
    assert parse({"userId": "u"}, default_type="IDENTIFY").type == "identify"


def test_message_type_wins_over_default() -> None:
    assert parse({"type": "identify", "userId": "u"}, default_type="track").type == "identify"


def test_type_is_lower_cased() -> None:
    message = parse({"type": "Track", "event": "E", "userId": "u"})
    assert message.type == "track"
    assert message.payload["type"] == "track"


@pytest.mark.parametrize("value", ["purchase", "action", "batch"])
def test_unknown_type(value: str) -> None:
    expected = ("type", "must be one of alias, group, identify, page, screen, track")
    assert parse_error({"type": value, "userId": "u"}) == expected


def test_unknown_default_type() -> None:
    assert parse_error({"userId": "u"}, default_type="nope")[0] == "type"


def test_action_is_not_an_alias_of_type() -> None:
    assert parse_error({"action": "track", "event": "E", "userId": "u"}) == ("type", "required")


def test_type_not_a_string() -> None:
    assert parse_error({"type": 3, "userId": "u"}) == ("type", "must be a string, got number")
    assert parse_error({"type": ["track"], "userId": "u"}) == ("type", "must be a string, got array")


# --- identifiers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("U1", "U1"),
        (" u1 ", " u1 "),
        (123, "123"),
        (0, "0"),
        (-7, "-7"),
        (1.0, "1"),
        (1.5, "1.5"),
        (1e-7, "0.0000001"),  # decimal notation (SPEC §2), never an exponent
        (-2.5e-5, "-0.000025"),
        (1e22, "10000000000000000000000"),
        (12345678901234567890, "12345678901234567890"),
        (None, None),
        ("", None),
    ],
)
def test_identifier_values(value: object, expected: str | None) -> None:
    message = parse({"type": "identify", "userId": value, "anonymousId": value})
    assert message.user_id == expected
    assert message.anonymous_id == expected


def test_identifier_missing_is_none() -> None:
    message = parse({"type": "identify"})
    assert (message.user_id, message.anonymous_id, message.previous_id, message.group_id) == (None,) * 4


@pytest.mark.parametrize(
    ("value", "kind"), [(True, "boolean"), (False, "boolean"), ([1], "array"), ({"a": 1}, "object")]
)
@pytest.mark.parametrize("key", ["userId", "anonymousId"])
def test_identifier_bad_types(key: str, value: object, kind: str) -> None:
    assert parse_error({"type": "identify", key: value}) == (key, f"must be a string or number, got {kind}")


def test_identifier_number_too_large() -> None:
    assert parse_error({"type": "identify", "userId": 10**5000}) == ("userId", "number too large")


def test_identifier_non_finite_float() -> None:
    assert parse_error({"type": "identify", "userId": float("inf")}) == ("userId", "must be a finite number")


def test_previous_and_group_id_converted_and_validated() -> None:
    alias = parse({"type": "alias", "userId": 1, "previousId": 2.0})
    assert (alias.user_id, alias.previous_id) == ("1", "2")
    group = parse({"type": "group", "userId": "u", "groupId": 42})
    assert group.group_id == "42"
    assert parse_error({"type": "alias", "userId": "u", "previousId": True}) == (
        "previousId",
        "must be a string or number, got boolean",
    )
    assert parse_error({"type": "group", "groupId": ["g"]}) == (
        "groupId",
        "must be a string or number, got array",
    )


def test_previous_and_group_id_only_on_their_types() -> None:
    message = parse(track(previousId="p", groupId="g"))
    assert message.previous_id is None
    assert message.group_id is None


def test_snake_case_fallbacks() -> None:
    message = parse({"type": "identify", "user_id": "u1", "anonymous_id": 5})
    assert (message.user_id, message.anonymous_id) == ("u1", "5")
    alias = parse({"type": "alias", "user_id": "u", "previous_id": "p"})
    assert alias.previous_id == "p"
    group = parse({"type": "group", "anonymous_id": "a", "group_id": "g"})
    assert group.group_id == "g"


def test_camel_case_wins_over_snake_case() -> None:
    message = parse({"type": "identify", "userId": "camel", "user_id": "snake"})
    assert message.user_id == "camel"


@pytest.mark.parametrize("camel", [None, ""])
def test_snake_case_used_when_camel_is_absent(camel: object) -> None:
    assert parse({"type": "identify", "userId": camel, "user_id": "snake"}).user_id == "snake"


def test_snake_case_error_names_the_snake_field() -> None:
    assert parse_error({"type": "identify", "user_id": True}) == (
        "user_id",
        "must be a string or number, got boolean",
    )


# --- per-type requirements ------------------------------------------------------------------------


@pytest.mark.parametrize("event", [None, ""])
def test_track_requires_event(event: object) -> None:
    assert parse_error(track(event=event)) == ("event", "required for track")


def test_track_event_missing() -> None:
    assert parse_error({"type": "track", "userId": "u"}) == ("event", "required for track")


def test_track_event_must_be_string() -> None:
    assert parse_error(track(event=5)) == ("event", "must be a string, got number")


def test_track_event_kept() -> None:
    message = parse(track(event="Order Completed"))
    assert message.event == "Order Completed"
    assert message.name is None


def test_alias_requires_previous_id_and_user_id() -> None:
    assert parse_error({"type": "alias", "userId": "u"}) == ("previousId", "required for alias")
    assert parse_error({"type": "alias", "previousId": "p"}) == ("userId", "required for alias")
    assert parse_error({"type": "alias", "userId": "u", "previousId": ""}) == (
        "previousId",
        "required for alias",
    )
    assert parse_error({"type": "alias", "anonymousId": "a", "previousId": "p"}) == (
        "userId",
        "required for alias",
    )


def test_group_requires_group_id() -> None:
    assert parse_error({"type": "group", "userId": "u"}) == ("groupId", "required for group")
    assert parse_error({"type": "group", "userId": "u", "groupId": None}) == ("groupId", "required for group")


@pytest.mark.parametrize("mtype", ["identify", "page", "screen"])
def test_other_types_need_nothing_and_identifiers_are_not_checked_here(mtype: str) -> None:
    message = parse({"type": mtype})
    assert message.type == mtype
    assert message.user_id is None
    assert message.anonymous_id is None


@pytest.mark.parametrize("mtype", ["page", "screen"])
def test_page_and_screen_name(mtype: str) -> None:
    assert parse({"type": mtype, "anonymousId": "a", "name": "Pricing"}).name == "Pricing"
    assert parse({"type": mtype, "anonymousId": "a", "name": ""}).name is None
    assert parse({"type": mtype, "anonymousId": "a"}).name is None
    assert parse_error({"type": mtype, "name": 3}) == ("name", "must be a string, got number")


def test_name_and_event_ignored_on_other_types() -> None:
    message = parse({"type": "identify", "userId": "u", "name": "n", "event": "e"})
    assert message.name is None
    assert message.event is None


# --- objects ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["traits", "properties", "context", "integrations"])
@pytest.mark.parametrize(
    ("value", "kind"), [([], "array"), ("x", "string"), (1, "number"), (True, "boolean")]
)
def test_objects_must_be_objects(key: str, value: object, kind: str) -> None:
    assert parse_error(track(**{key: value})) == (key, f"must be an object, got {kind}")


@pytest.mark.parametrize("key", ["traits", "properties", "context", "integrations"])
def test_null_objects_are_empty(key: str) -> None:
    message = parse(track(**{key: None}))
    assert getattr(message, key) == {}


def test_absent_objects_are_empty() -> None:
    message = parse(track())
    assert (message.traits, message.properties, message.context, message.integrations) == ({}, {}, {}, {})
    assert message.external_ids == ()


def test_objects_kept() -> None:
    message = parse(
        track(
            traits={"plan": "pro"},
            properties={"revenue": 3},
            context={"ip": "1.2.3.4"},
            integrations={"All": True},
        )
    )
    assert message.traits == {"plan": "pro"}
    assert message.properties == {"revenue": 3}
    assert message.context == {"ip": "1.2.3.4"}
    assert message.integrations == {"All": True}


def test_identify_context_traits_stay_in_context() -> None:
    message = parse({"type": "identify", "userId": "u", "context": {"traits": {"email": "a@b.c"}}})
    assert message.traits == {}
    assert message.context["traits"] == {"email": "a@b.c"}


def test_identify_and_group_top_level_traits() -> None:
    assert parse({"type": "identify", "userId": "u", "traits": {"email": "x@y.z"}}).traits == {
        "email": "x@y.z"
    }
    group = parse({"type": "group", "userId": "u", "groupId": "g", "traits": {"name": "Acme"}})
    assert group.traits == {"name": "Acme"}


def test_context_traits_must_be_object() -> None:
    assert parse_error(track(context={"traits": ["x"]})) == ("context.traits", "must be an object, got array")


def test_context_traits_null_is_absent() -> None:
    message = parse(track(context={"traits": None, "ip": "1.1.1.1"}))
    assert message.context == {"ip": "1.1.1.1"}


# --- externalIds -----------------------------------------------------------------------------------


def test_external_ids_valid() -> None:
    message = parse(
        with_external_ids(
            ext(),
            ext(id="acc-1", type="Salesforce_ID", collection="ACCOUNTS", encoding="NONE"),
        )
    )
    assert message.external_ids == (
        ExternalId(id="123-456", type="phone", collection="users", encoding="none"),
        ExternalId(id="acc-1", type="salesforce_id", collection="accounts", encoding="none"),
    )


def test_external_ids_null_and_empty() -> None:
    assert parse(track(context={"externalIds": None})).external_ids == ()
    assert parse(track(context={"externalIds": []})).external_ids == ()


def test_external_ids_must_be_list() -> None:
    assert parse_error(track(context={"externalIds": {"id": "x"}})) == (
        "context.externalIds",
        "must be a list, got object",
    )


def test_external_id_item_must_be_object() -> None:
    assert parse_error(with_external_ids(ext(), "phone:1")) == (
        "context.externalIds[1]",
        "must be an object, got string",
    )


@pytest.mark.parametrize("key", ["id", "type", "collection", "encoding"])
@pytest.mark.parametrize("missing", ["delete", None, ""])
def test_external_id_keys_required(key: str, missing: object) -> None:
    item = ext()
    if missing == "delete":
        del item[key]
    else:
        item[key] = missing
    assert parse_error(with_external_ids(ext(), item)) == (f"context.externalIds[1].{key}", "required")


def test_external_id_numeric_id() -> None:
    assert parse(with_external_ids(ext(id=5551234))).external_ids[0].id == "5551234"
    assert parse(with_external_ids(ext(id=7.0))).external_ids[0].id == "7"


def test_external_id_bad_id_type() -> None:
    assert parse_error(with_external_ids(ext(id=True))) == (
        "context.externalIds[0].id",
        "must be a string or number, got boolean",
    )
    assert parse_error(with_external_ids(ext(id={"v": 1}))) == (
        "context.externalIds[0].id",
        "must be a string or number, got object",
    )


def test_external_id_type_must_be_string() -> None:
    assert parse_error(with_external_ids(ext(type=3))) == (
        "context.externalIds[0].type",
        "must be a string, got number",
    )


@pytest.mark.parametrize("collection", ["user", "groups", 1, ["users"]])
def test_external_id_collection(collection: object) -> None:
    assert parse_error(with_external_ids(ext(collection=collection))) == (
        "context.externalIds[0].collection",
        "must be one of users, accounts",
    )


@pytest.mark.parametrize("encoding", ["utf8", "hex", 0])
def test_external_id_encoding(encoding: object) -> None:
    assert parse_error(with_external_ids(ext(encoding=encoding))) == (
        "context.externalIds[0].encoding",
        "must be one of none, base64",
    )


# Chosen so that their standard encodings use "+", "/" and "=" padding, where the alphabets differ.
BASE64_TEXTS = ["~~~?>>ü", "?>?>ü~"]


def test_base64_texts_exercise_the_differing_alphabet() -> None:
    standard = "".join(base64.b64encode(text.encode()).decode() for text in BASE64_TEXTS)
    assert "+" in standard
    assert "/" in standard
    assert "=" in standard


@pytest.mark.parametrize("text", BASE64_TEXTS)
@pytest.mark.parametrize(
    "encode",
    [
        lambda raw: base64.b64encode(raw).decode(),
        lambda raw: base64.urlsafe_b64encode(raw).decode(),
        lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("="),
        lambda raw: base64.b64encode(raw).decode().rstrip("="),
    ],
    ids=["standard", "urlsafe", "urlsafe-unpadded", "standard-unpadded"],
)
def test_external_id_base64_decoded(text: str, encode: Callable[[bytes], str]) -> None:
    message = parse(with_external_ids(ext(id=encode(text.encode()), encoding="Base64")))
    assert message.external_ids == (ExternalId(id=text, type="phone", collection="users", encoding="base64"),)


def test_external_id_base64_of_a_nul_decodes_to_the_damaged_character() -> None:
    """A NUL hidden in base64 is what decode_document makes of a \\u0000 in the JSON: U+FFFD. Before, it
    reached the store as is, and PostgreSQL refused the whole batch (500, retry later; SQLite took it)."""
    message = parse(with_external_ids(ext(id=base64.b64encode(b"a\x00b").decode(), encoding="base64")))
    assert message.external_ids == (
        ExternalId(id="a\ufffdb", type="phone", collection="users", encoding="base64"),
    )


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        ("not base64!", "not valid base64"),
        ("abcde", "not valid base64"),
        (base64.b64encode(b"\xff\xfe\xfd").decode(), "base64 of bytes that are not UTF-8 text"),
    ],
)
def test_external_id_invalid_base64(encoded: str, reason: str) -> None:
    assert parse_error(with_external_ids(ext(), ext(id=encoded, encoding="base64"))) == (
        "context.externalIds[1].id",
        reason,
    )


def test_external_id_type_longer_than_64_characters_is_refused() -> None:
    assert parse(with_external_ids(ext(type="t" * 64))).external_ids[0].type == "t" * 64
    assert parse_error(with_external_ids(ext(type="t" * 65))) == (
        "context.externalIds[0].type",
        "longer than 64 characters",
    )


def test_external_id_type_with_a_colon_is_refused() -> None:
    # It would be stored, yet `profile a:b:x` reads type "a": nobody could ever look it up.
    assert parse_error(with_external_ids(ext(type="a:b"))) == (
        "context.externalIds[0].type",
        "must not contain ':'",
    )


def test_external_ids_from_batch_context_are_validated() -> None:
    message = parse(track(), batch_context={"externalIds": [ext(id="b1")]})
    assert message.external_ids[0].id == "b1"


# --- batch-level merge ---------------------------------------------------------------------------------


def test_batch_context_deep_merge() -> None:
    batch_context = {"library": {"name": "analytics-python", "version": "2.3"}, "traits": {"plan": "free"}}
    before = copy.deepcopy(batch_context)
    message = parse(
        track(context={"traits": {"email": "a@b.c"}, "library": {"version": "9"}, "ip": "1.2.3.4"}),
        batch_context=batch_context,
    )
    assert message.context == {
        "library": {"name": "analytics-python", "version": "9"},
        "traits": {"plan": "free", "email": "a@b.c"},
        "ip": "1.2.3.4",
    }
    assert message.payload["context"] == message.context
    assert batch_context == before


def test_batch_merge_message_wins_over_non_dict() -> None:
    message = parse(track(context={"library": "custom"}), batch_context={"library": {"name": "x"}, "ip": "a"})
    assert message.context == {"library": "custom", "ip": "a"}
    message = parse(track(context={"library": {"name": "y"}}), batch_context={"library": "flat"})
    assert message.context == {"library": {"name": "y"}}


def test_batch_integrations_deep_merge() -> None:
    message = parse(
        track(integrations={"Amplitude": {"session_id": 1}, "All": False}),
        batch_integrations={"All": True, "Amplitude": {"groups": ["a"]}, "Mixpanel": False},
    )
    assert message.integrations == {
        "All": False,
        "Amplitude": {"groups": ["a"], "session_id": 1},
        "Mixpanel": False,
    }
    assert message.payload["integrations"] == message.integrations


def test_batch_context_not_copied_when_message_has_none() -> None:
    batch_context = {"library": {"name": "lib"}}
    message = parse(track(), batch_context=batch_context)
    assert message.context is batch_context
    assert message.payload["context"] is batch_context


def test_untouched_nested_dicts_are_shared_not_copied() -> None:
    library = {"name": "lib"}
    message = parse(track(context={"ip": "x"}), batch_context={"library": library})
    assert message.context["library"] is library


# --- messageId ---------------------------------------------------------------------------------------


def test_message_id_kept() -> None:
    message = parse(track(messageId="ajs-123"))
    assert message.message_id == "ajs-123"
    assert message.payload["messageId"] == "ajs-123"


def test_message_id_number() -> None:
    assert parse(track(messageId=12345)).message_id == "12345"


def test_message_id_length_limit() -> None:
    assert parse(track(messageId="m" * 100)).message_id == "m" * 100
    assert parse_error(track(messageId="m" * 101)) == ("messageId", "longer than 100 characters")


def test_message_id_bad_type() -> None:
    assert parse_error(track(messageId=True)) == ("messageId", "must be a string or number, got boolean")


def test_generated_message_id_format_and_hash() -> None:
    raw = track(timestamp=TS)
    message = parse(raw)
    expected = "gen-" + blake2b(msgspec.json.encode(raw, order="sorted"), digest_size=16).hexdigest()
    assert message.message_id == expected
    assert message.payload["messageId"] == expected
    assert len(message.message_id) == 4 + 32


@pytest.mark.parametrize("missing", [None, ""])
def test_generated_message_id_when_empty(missing: object) -> None:
    assert parse(track(messageId=missing)).message_id.startswith("gen-")


def test_generated_message_id_is_deterministic() -> None:
    first = parse(track(timestamp=TS, properties={"a": 1, "b": 2}))
    second = parse(track(properties={"b": 2, "a": 1}, timestamp=TS))  # key order does not matter
    assert first.message_id == second.message_id


def test_generated_message_id_depends_on_content() -> None:
    assert parse(track(timestamp=TS)).message_id != parse(track(timestamp=TS, event="Other")).message_id


def test_generated_message_id_ignores_received_at_when_message_has_time() -> None:
    later = RECEIVED + timedelta(minutes=5)
    for extra in ({"timestamp": TS}, {"sentAt": TS}, {"originalTimestamp": TS}):
        raw = track(**extra)
        assert parse(raw).message_id == parse(raw, received_at=later).message_id


def test_generated_message_id_uses_received_at_when_message_has_no_time() -> None:
    raw = track()
    later = RECEIVED + timedelta(seconds=1)
    assert parse(raw).message_id == parse(raw).message_id
    assert parse(raw).message_id != parse(raw, received_at=later).message_id


def test_generated_message_id_includes_batch_merge_and_ignores_write_key() -> None:
    raw = track(timestamp=TS)
    plain = parse(raw).message_id
    assert parse(dict(raw, writeKey="secret")).message_id == plain
    assert parse(raw, batch_context={"ip": "1"}).message_id != plain
    assert (
        parse(raw, batch_context={"ip": "1"}).message_id
        == parse(track(timestamp=TS, context={"ip": "1"})).message_id
    )


# --- timestamps ------------------------------------------------------------------------------------------


def test_received_at_is_argument_and_timestamp_defaults_to_it() -> None:
    message = parse(track())
    assert message.received_at == RECEIVED
    assert message.timestamp == RECEIVED
    assert message.payload["receivedAt"] == "2026-03-01T12:00:00.000Z"
    assert message.payload["timestamp"] == "2026-03-01T12:00:00.000Z"


def test_naive_received_at_is_utc() -> None:
    message = parse(track(), received_at=datetime(2026, 3, 1, 12, 0, 0))
    assert message.received_at == RECEIVED
    assert message.received_at.tzinfo is UTC


def test_received_at_in_other_zone_converted() -> None:
    plus2 = timezone(timedelta(hours=2))
    message = parse(track(), received_at=datetime(2026, 3, 1, 14, 0, 0, tzinfo=plus2))
    assert message.received_at == RECEIVED
    assert message.received_at.tzinfo is UTC


def test_explicit_timestamp_wins() -> None:
    message = parse(
        track(
            timestamp="2026-02-01T00:00:00+01:00",
            sentAt="2026-03-01T11:00:10Z",
            originalTimestamp="2026-03-01T11:00:00Z",
        )
    )
    assert message.timestamp == datetime(2026, 1, 31, 23, 0, 0, tzinfo=UTC)
    assert message.timestamp.tzinfo is UTC
    assert message.payload["timestamp"] == "2026-01-31T23:00:00.000Z"


def test_clock_skew_correction() -> None:
    # The client clock is 1h05m behind; the call happened 5 s before sending.
    message = parse(track(sentAt="2026-03-01T10:55:05.000Z", originalTimestamp="2026-03-01T10:55:00.000Z"))
    assert message.timestamp == RECEIVED - timedelta(seconds=5)
    assert message.payload["timestamp"] == "2026-03-01T11:59:55.000Z"


def test_clock_skew_correction_with_offsets_and_millis() -> None:
    message = parse(
        track(sentAt="2026-03-01T13:00:01.250+02:00", originalTimestamp="2026-03-01T10:59:59.000Z"),
    )
    assert message.timestamp == RECEIVED - timedelta(seconds=2, milliseconds=250)


@pytest.mark.parametrize("sent_at", ["0001-01-01T00:00:00Z", "2026-03-01T10:54:59.000Z"])
def test_a_sent_at_before_the_call_dates_it_on_arrival_not_in_the_future(sent_at: str) -> None:
    # sentAt in year 1 (a reset device clock), or 1 s before the call: the formula would give year 4051,
    # or 1 s after the server received it
    message = parse(track(sentAt=sent_at, originalTimestamp="2026-03-01T10:55:00.000Z"))
    assert message.timestamp == RECEIVED
    assert message.payload["sentAt"] == sent_at
    assert message.payload["originalTimestamp"] == "2026-03-01T10:55:00.000Z"


def test_a_live_clients_timestamp_is_its_clock_and_is_corrected_by_sent_at() -> None:
    # Segment's libraries send timestamp + sentAt (never originalTimestamp); this browser is a day ahead.
    ahead = track(timestamp="2026-03-02T11:59:58.000Z", sentAt="2026-03-02T12:00:00.000Z")
    message = parse(ahead, delivery="request-1")
    assert message.timestamp == RECEIVED - timedelta(seconds=2)
    assert message.payload["timestamp"] == "2026-03-01T11:59:58.000Z"
    assert message.payload["originalTimestamp"] == "2026-03-02T11:59:58.000Z"  # the client's own time
    # A historical import from a server library: sentAt is now, so the old time is kept (less the skew).
    old = parse(track(timestamp="2020-01-01T00:00:00.000Z", sentAt="2026-03-01T11:59:59.000Z"), delivery="r")
    assert old.timestamp == datetime(2020, 1, 1, 0, 0, 1, tzinfo=UTC)
    # A file is a replay: its receivedAt is the ingest's, so its explicit timestamp is kept as written.
    assert parse(ahead).timestamp == datetime(2026, 3, 2, 11, 59, 58, tzinfo=UTC)
    assert "originalTimestamp" not in parse(ahead).payload


def test_a_live_timestamp_in_the_future_is_dated_on_arrival() -> None:
    for fields in ({"timestamp": "2999-01-01T00:00:00Z"}, {"originalTimestamp": "2999-01-01T00:00:00Z"}):
        message = parse(track(**fields), delivery="request-1")
        assert message.timestamp == RECEIVED
        assert message.payload["timestamp"] == "2026-03-01T12:00:00.000Z"
        assert message.payload["originalTimestamp"] == "2999-01-01T00:00:00Z"
    # A bad sentAt cannot correct the live timestamp, and does not reject the message either.
    kept = parse(track(timestamp="2026-03-01T11:00:00Z", sentAt="garbage"), delivery="request-1")
    assert kept.timestamp == datetime(2026, 3, 1, 11, 0, tzinfo=UTC)


def test_original_timestamp_alone() -> None:
    message = parse(track(originalTimestamp="2026-02-02T02:02:02.002Z"))
    assert message.timestamp == datetime(2026, 2, 2, 2, 2, 2, 2000, tzinfo=UTC)


def test_sent_at_alone_falls_back_to_received_at() -> None:
    assert parse(track(sentAt="2020-01-01T00:00:00Z")).timestamp == RECEIVED


def test_message_received_at_is_kept() -> None:
    message = parse(track(receivedAt="2019-05-05T05:05:05.555Z"))
    archived = datetime(2019, 5, 5, 5, 5, 5, 555000, tzinfo=UTC)
    assert message.received_at == archived
    assert message.timestamp == archived
    assert message.payload["receivedAt"] == "2019-05-05T05:05:05.555Z"


def test_message_received_at_used_in_skew_correction() -> None:
    message = parse(
        track(
            receivedAt="2019-05-05T00:00:00Z",
            sentAt="2019-05-05T00:00:10Z",
            originalTimestamp="2019-05-05T00:00:00Z",
        )
    )
    assert message.timestamp == datetime(2019, 5, 4, 23, 59, 50, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["yesterday", 17, None, ""])
def test_invalid_message_received_at_is_replaced_by_server_time(bad: object) -> None:
    message = parse(track(receivedAt=bad))
    assert message.received_at == RECEIVED
    assert message.payload["receivedAt"] == "2026-03-01T12:00:00.000Z"


# sentAt only corrects originalTimestamp: these carry one, so that a bad sentAt matters.
NEEDS_SENT_AT = {"originalTimestamp": "2026-03-01T11:59:00.000Z"}


@pytest.mark.parametrize("field", ["timestamp", "sentAt", "originalTimestamp"])
def test_invalid_timestamp_strings(field: str) -> None:
    fields = NEEDS_SENT_AT if field == "sentAt" else {}
    for bad in ("last tuesday", "2026-13-01T00:00:00Z"):
        assert parse_error(track(**{**fields, field: bad})) == (field, "not an ISO-8601 timestamp")


def test_a_leap_second_is_the_last_millisecond_of_its_minute() -> None:
    # RFC 3339 allows second 60 (NTP-synced servers log 2016-12-31T23:59:60Z); such a message was rejected.
    message = parse(track(timestamp="2016-12-31T23:59:60Z"))
    assert message.timestamp == datetime(2016, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    assert message.payload["timestamp"] == "2016-12-31T23:59:59.999Z"
    canonical = parse(track(timestamp="2016-12-31T23:59:60.000Z", receivedAt="2016-12-31T23:59:60.123Z"))
    assert canonical.payload["timestamp"] == "2016-12-31T23:59:59.999Z"  # stored as it is read
    assert canonical.payload["receivedAt"] == "2016-12-31T23:59:59.999Z"
    shifted = parse(track(timestamp="2017-01-01T05:29:60.5+05:30"))
    assert shifted.timestamp == datetime(2016, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    corrected = parse(
        track(originalTimestamp="2016-12-31T23:59:60.250Z", sentAt="2017-01-01T00:00:01Z"),
        received_at=datetime(2017, 1, 1, 0, 0, 1, tzinfo=UTC),
    )
    assert corrected.timestamp == datetime(2016, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)
    for bad in ("2016-12-31T23:59:61Z", "2016-12-31T23:60:00Z", "2016-12-31T24:59:60Z"):
        assert parse_error(track(timestamp=bad)) == ("timestamp", "not an ISO-8601 timestamp")


@pytest.mark.parametrize("field", ["timestamp", "sentAt", "originalTimestamp"])
def test_timestamp_not_a_string(field: str) -> None:
    fields = NEEDS_SENT_AT if field == "sentAt" else {}
    assert parse_error(track(**{**fields, field: 1700000000})) == (
        field,
        "must be an ISO-8601 timestamp string, got number",
    )


@pytest.mark.parametrize("own", [{}, {"timestamp": "2020-01-01T00:00:00.000Z"}])
def test_a_bad_sent_at_that_corrects_nothing_is_kept_as_sent(own: dict[str, str]) -> None:
    message = parse(track(sentAt="garbage", **own))
    assert message.timestamp == (datetime(2020, 1, 1, tzinfo=UTC) if own else RECEIVED)
    assert message.payload["sentAt"] == "garbage"


def test_a_bad_batch_sent_at_fails_only_the_messages_it_would_correct() -> None:
    items, _ = parse_batch(
        {
            "sentAt": "garbage",
            "batch": [track(timestamp="2020-01-01T00:00:00Z"), track(**NEEDS_SENT_AT), track()],
        },
        received_at=RECEIVED,
    )
    assert isinstance(items[0], Message) and isinstance(items[2], Message)
    assert isinstance(items[1], InvalidEvent) and items[1].field == "sentAt"


@pytest.mark.parametrize("field", ["timestamp", "sentAt", "originalTimestamp"])
def test_null_and_empty_timestamps_are_absent(field: str) -> None:
    assert parse(track(**{field: None})).timestamp == RECEIVED
    assert parse(track(**{field: ""})).timestamp == RECEIVED


def test_timestamps_truncated_to_milliseconds() -> None:
    message = parse(
        track(timestamp="2026-01-01T00:00:00.123456789Z"), received_at=RECEIVED.replace(microsecond=987654)
    )
    assert message.timestamp == datetime(2026, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)
    assert message.received_at == RECEIVED.replace(microsecond=987000)


def test_canonical_timestamp_strings_kept_and_others_normalised() -> None:
    message = parse(track(timestamp="2026-01-02T03:04:05.678Z", receivedAt="2026-01-02T03:04:06+00:00"))
    assert message.payload["timestamp"] == "2026-01-02T03:04:05.678Z"
    assert message.payload["receivedAt"] == "2026-01-02T03:04:06.000Z"
    message = parse(track(timestamp="2026-01-02T03:04:05.6789Z", receivedAt="2026-01-02T03:04:06.123Z"))
    assert message.payload["timestamp"] == "2026-01-02T03:04:05.678Z"
    assert message.payload["receivedAt"] == "2026-01-02T03:04:06.123Z"
    assert message.received_at == datetime(2026, 1, 2, 3, 4, 6, 123000, tzinfo=UTC)
    # A week date has the canonical length and "Z" but must still be rewritten as a calendar date.
    message = parse(track(timestamp="2026-W01-1T03:04:05.678Z"))
    assert message.payload["timestamp"] == "2025-12-29T03:04:05.678Z"


def test_a_clock_skew_correction_past_the_calendar_still_lands_the_message() -> None:
    # Go's zero time sent by a client whose clock is 2 s ahead: the correction falls 2 s before year 1.
    # The message was rejected, so whether it landed hung on which of two clocks ran ahead.
    zero = track(timestamp="0001-01-01T00:00:00Z", sentAt="2026-03-01T12:00:02Z")
    assert parse(zero, delivery="request-1").timestamp == datetime(1, 1, 1, tzinfo=UTC)
    early = track(sentAt="9999-12-31T23:59:59Z", originalTimestamp="0001-01-01T00:00:00Z")
    assert parse(early).timestamp == datetime(1, 1, 1, tzinfo=UTC)
    # A sentAt before the call, so far that the formula passes year 9999: dated on arrival, as a near one.
    late = track(sentAt="0001-01-01T00:00:00Z", originalTimestamp="9999-12-31T23:59:59Z")
    assert parse(late).timestamp == RECEIVED


def test_date_only_timestamp() -> None:
    assert parse(track(timestamp="2026-01-02")).timestamp == datetime(2026, 1, 2, tzinfo=UTC)


# --- parse_timestamp / format_timestamp ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-01-02T03:04:05.678Z", datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)),
        ("2026-01-02T03:04:05Z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T05:04:05+02:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-01T22:04:05-05:00", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02T03:04:05", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("2026-01-02", datetime(2026, 1, 2, tzinfo=UTC)),
        ("2026-01-02t03:04:05z", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        (" 2026-01-02T03:04:05Z\n", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
    ],
)
def test_parse_timestamp(text: str, expected: datetime) -> None:
    parsed = parse_timestamp(text, "timestamp")
    assert parsed == expected
    assert parsed.tzinfo is UTC


def test_parse_timestamp_accepts_datetimes() -> None:
    plus1 = timezone(timedelta(hours=1))
    assert parse_timestamp(datetime(2026, 1, 1, 1, tzinfo=plus1), "t") == datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_timestamp(datetime(2026, 1, 1), "t").tzinfo is UTC


@pytest.mark.parametrize("text", ["", "not a date", "2026-1-2", "2026-01-02T25:00:00Z", "2026-01-02X"])
def test_parse_timestamp_invalid(text: str) -> None:
    assert error_of(lambda: parse_timestamp(text, "a.b")) == ("a.b", "not an ISO-8601 timestamp")


def test_parse_timestamp_non_string() -> None:
    assert error_of(lambda: parse_timestamp(None, "x")) == (
        "x",
        "must be an ISO-8601 timestamp string, got null",
    )
    assert error_of(lambda: parse_timestamp([], "x")) == (
        "x",
        "must be an ISO-8601 timestamp string, got array",
    )


def test_parse_timestamp_out_of_range() -> None:
    assert error_of(lambda: parse_timestamp("0001-01-01T00:00:00+01:00", "x")) == ("x", "out of range")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), "2026-01-02T03:04:05.678Z"),
        (datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "2026-01-02T03:04:05.000Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=UTC), "2026-01-02T03:04:05.678Z"),
        (datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))), "2026-01-02T03:04:05.000Z"),
        (datetime(2026, 1, 2, 3, 4, 5), "2026-01-02T03:04:05.000Z"),
    ],
)
def test_format_timestamp(value: datetime, expected: str) -> None:
    assert format_timestamp(value) == expected


def test_format_parse_round_trip() -> None:
    value = datetime(2026, 7, 8, 9, 10, 11, 12000, tzinfo=UTC)
    assert parse_timestamp(format_timestamp(value), "t") == value


# --- payload -------------------------------------------------------------------------------------------


def test_payload_contents() -> None:
    raw = {
        "type": "TRACK",
        "event": "Signed Up",
        "userId": 42,
        "writeKey": "secret",
        "sentAt": "2026-03-01T11:00:10Z",
        "originalTimestamp": "2026-03-01T11:00:00Z",
        "properties": {"plan": "pro"},
        "context": {"ip": "1.2.3.4"},
        "version": 2,
        "channel": "server",
    }
    before = copy.deepcopy(raw)
    message = parse(raw, batch_context={"library": {"name": "lib"}}, batch_integrations={"All": True})
    assert message.payload == {
        "type": "track",
        "event": "Signed Up",
        "userId": 42,
        "sentAt": "2026-03-01T11:00:10Z",
        "originalTimestamp": "2026-03-01T11:00:00Z",
        "properties": {"plan": "pro"},
        "context": {"ip": "1.2.3.4", "library": {"name": "lib"}},
        "integrations": {"All": True},
        "version": 2,
        "channel": "server",
        "messageId": message.message_id,
        "timestamp": "2026-03-01T11:59:50.000Z",
        "receivedAt": "2026-03-01T12:00:00.000Z",
    }
    assert raw == before  # the input is never mutated


def test_payload_has_no_context_key_when_none_given() -> None:
    payload = parse(track()).payload
    assert "context" not in payload
    assert "integrations" not in payload


def test_message_is_frozen() -> None:
    message = parse(track())
    with pytest.raises(AttributeError):
        message.user_id = "other"  # type: ignore[misc]


def test_payload_is_json_encodable() -> None:
    message = parse(track(context={"externalIds": [ext()]}))
    assert msgspec.json.decode(msgspec.json.encode(message.payload)) == message.payload


def test_reparsing_stored_payload_gives_the_same_message() -> None:
    message = parse(
        track(sentAt="2026-03-01T11:00:10.5Z", originalTimestamp="2026-03-01T11:00:00Z", context={"ip": "1"}),
        batch_context={"library": {"name": "lib"}},
        received_at=RECEIVED.replace(microsecond=123456),
    )
    later = RECEIVED + timedelta(days=30)
    assert parse(message.payload, received_at=later) == message


# --- decode_json / decode_message ---------------------------------------------------------------------


def test_decode_json() -> None:
    assert decode_json(b'{"a": [1, 2.5, null, true]}') == {"a": [1, 2.5, None, True]}


@pytest.mark.parametrize("data", [b"{", b"", b"{'a': 1}", b"nope"])
def test_decode_json_invalid(data: bytes) -> None:
    field, reason = error_of(lambda: decode_json(data))
    assert field == ""
    assert reason.startswith("invalid JSON: ")


def test_decode_message() -> None:
    message = decode_message(b'{"event": "E", "userId": 7}', received_at=RECEIVED, default_type="track")
    assert (message.type, message.event, message.user_id) == ("track", "E", "7")


def test_decode_message_invalid_json() -> None:
    field, reason = error_of(lambda: decode_message(b'{"type": "track",', received_at=RECEIVED))
    assert field == ""
    assert reason.startswith("invalid JSON: ")


def test_decode_message_not_an_object() -> None:
    assert error_of(lambda: decode_message(b"[1]", received_at=RECEIVED)) == (
        "",
        "message must be a JSON object",
    )


def test_decode_message_40kb_rejected() -> None:
    data = msgspec.json.encode(track(properties={"blob": "x" * 40 * 1024}))
    assert error_of(lambda: decode_message(data, received_at=RECEIVED)) == (
        "",
        f"message is {len(data)} bytes, over the 32 KB per-message limit",
    )


def test_decode_message_size_checked_before_decoding() -> None:
    data = b"{" * (MAX_MESSAGE_BYTES + 1)  # not even JSON
    assert error_of(lambda: decode_message(data, received_at=RECEIVED)) == (
        "",
        "message is 32769 bytes, over the 32 KB per-message limit",
    )


def test_decode_message_at_exact_limit_is_accepted() -> None:
    base = msgspec.json.encode(track(properties={"blob": ""}))
    data = msgspec.json.encode(track(properties={"blob": "x" * (MAX_MESSAGE_BYTES - len(base))}))
    assert len(data) == MAX_MESSAGE_BYTES
    assert decode_message(data, received_at=RECEIVED).type == "track"


# --- parse_batch -----------------------------------------------------------------------------------------


def batch_error(raw: object) -> tuple[str, str]:
    return error_of(lambda: parse_batch(raw, received_at=RECEIVED))


def test_batch_envelope_errors() -> None:
    assert batch_error([]) == ("", "batch request must be a JSON object")
    assert batch_error({}) == ("batch", "required")
    assert batch_error({"batch": None}) == ("batch", "required")
    assert batch_error({"batch": {"type": "track"}}) == ("batch", "must be a list, got object")
    assert batch_error({"batch": [], "context": []}) == ("context", "must be an object, got array")
    assert batch_error({"batch": [], "integrations": "x"}) == (
        "integrations",
        "must be an object, got string",
    )
    # A bad batch sentAt is not an envelope error: it fails only the elements it would correct.


def test_batch_over_message_limit() -> None:
    assert batch_error({"batch": [track()] * 2501}) == (
        "batch",
        "2501 messages, over the 2,500 per-batch limit",
    )


def test_batch_at_message_limit() -> None:
    results, _ = parse_batch({"batch": [track(messageId=str(i)) for i in range(2500)]}, received_at=RECEIVED)
    assert len(results) == 2500
    assert all(isinstance(result, Message) for result in results)


def test_empty_batch() -> None:
    assert parse_batch({"batch": []}, received_at=RECEIVED) == ([], {})


def test_batch_rejects_elements_individually_in_order() -> None:
    results, _ = parse_batch(
        {
            "batch": [
                track(messageId="a"),
                {"type": "track", "userId": "u"},
                "not an object",
                {"type": "identify", "userId": True},
                {"type": "group", "userId": "u", "groupId": "g"},
            ]
        },
        received_at=RECEIVED,
    )
    assert len(results) == 5
    first, second, third, fourth, fifth = results
    assert isinstance(first, Message)
    assert first.message_id == "a"
    assert isinstance(second, InvalidEvent)
    assert (second.field, second.reason) == ("event", "required for track")
    assert isinstance(third, InvalidEvent)
    assert (third.field, third.reason) == ("", "message must be a JSON object")
    assert isinstance(fourth, InvalidEvent)
    assert fourth.field == "userId"
    assert isinstance(fifth, Message)
    assert fifth.group_id == "g"


def test_batch_element_needs_its_own_type() -> None:
    (result,), _ = parse_batch({"batch": [{"event": "E", "userId": "u"}]}, received_at=RECEIVED)
    assert isinstance(result, InvalidEvent)
    assert (result.field, result.reason) == ("type", "required")


def test_batch_oversized_element_rejected() -> None:
    big = track(properties={"blob": "x" * 40 * 1024})
    size = len(msgspec.json.encode(big))
    results, _ = parse_batch({"batch": [big, track()]}, received_at=RECEIVED)
    rejected, accepted = results
    assert isinstance(rejected, InvalidEvent)
    assert (rejected.field, rejected.reason) == (
        "",
        f"message is {size} bytes, over the 32 KB per-message limit",
    )
    assert isinstance(accepted, Message)


def test_batch_element_not_json_encodable() -> None:
    results, _ = parse_batch({"batch": [track(properties={"x": object()}), track()]}, received_at=RECEIVED)
    rejected, accepted = results
    assert isinstance(rejected, InvalidEvent)
    assert rejected.field == ""
    assert rejected.reason.startswith("message is not JSON-encodable")
    assert isinstance(accepted, Message)


def test_batch_context_integrations_and_rest() -> None:
    envelope = {
        "batch": [track(context={"ip": "1"}), track(event="Two")],
        "context": {"library": {"name": "analytics-node"}},
        "integrations": {"All": False},
        "writeKey": "wk",
        "extra": 1,
    }
    results, rest = parse_batch(envelope, received_at=RECEIVED)
    assert rest == {"writeKey": "wk", "extra": 1}
    first, second = results
    assert isinstance(first, Message)
    assert isinstance(second, Message)
    assert first.context == {"library": {"name": "analytics-node"}, "ip": "1"}
    assert second.context == {"library": {"name": "analytics-node"}}
    assert first.integrations == second.integrations == {"All": False}
    assert "writeKey" not in first.payload


def test_batch_sent_at_applies_and_element_sent_at_wins() -> None:
    envelope = {
        "batch": [
            track(originalTimestamp="2026-03-01T10:00:00Z"),
            track(originalTimestamp="2026-03-01T10:00:00Z", sentAt="2026-03-01T10:00:03Z"),
            track(),
        ],
        "sentAt": "2026-03-01T10:00:10Z",
    }
    results, rest = parse_batch(envelope, received_at=RECEIVED)
    assert rest == {}
    first, second, third = results
    assert isinstance(first, Message)
    assert isinstance(second, Message)
    assert isinstance(third, Message)
    assert first.timestamp == RECEIVED - timedelta(seconds=10)
    assert first.payload["sentAt"] == "2026-03-01T10:00:10Z"
    assert second.timestamp == RECEIVED - timedelta(seconds=3)
    assert second.payload["sentAt"] == "2026-03-01T10:00:03Z"
    assert third.timestamp == RECEIVED


def test_batch_element_same_as_single_message() -> None:
    raw = track(timestamp=TS, context={"ip": "1"})
    (from_batch,), _ = parse_batch(
        {"batch": [raw], "context": {"library": {"name": "l"}}}, received_at=RECEIVED
    )
    single = parse(raw, batch_context={"library": {"name": "l"}})
    assert from_batch == single


def test_batch_generated_ids_distinguish_different_elements() -> None:
    results, _ = parse_batch(
        {"batch": [track(event="A"), track(event="B"), track(event="A")]},
        received_at=RECEIVED,
    )
    ids = [result.message_id for result in results if isinstance(result, Message)]
    assert len(ids) == 3
    assert ids[0] != ids[1]
    assert ids[0] == ids[2]  # identical content, same arrival: a duplicate


def test_a_replayable_source_gives_timeless_messages_the_same_ids_on_every_run() -> None:
    raw = {"type": "page", "name": "Home", "anonymousId": "a1"}
    runs = []
    for received in (datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)):
        occurrences = SourceOccurrences("export.ndjson")
        runs.append(
            [parse_message(raw, received_at=received, occurrences=occurrences).message_id for _ in range(3)]
        )
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 3  # identical lines of one source are separate events
    other = SourceOccurrences("other.ndjson")
    assert (
        parse_message(raw, received_at=datetime(2026, 3, 1, tzinfo=UTC), occurrences=other).message_id
        not in runs[0]
    )
    # Without a replayable source the server's clock separates them (two sends of one page view).
    assert (
        parse_message(raw, received_at=datetime(2026, 3, 1, tzinfo=UTC)).message_id
        != parse_message(raw, received_at=datetime(2026, 4, 1, tzinfo=UTC)).message_id
    )
    # A message with a timestamp keeps its content id: a retry of it is a duplicate.
    timed = {**raw, "timestamp": "2026-02-01T00:00:00.000Z"}
    occurrences = SourceOccurrences("export.ndjson")
    assert parse_message(
        timed, received_at=datetime(2026, 3, 1, tzinfo=UTC), occurrences=occurrences
    ).message_id == (parse_message(timed, received_at=datetime(2026, 4, 1, tzinfo=UTC)).message_id)


def test_page_category_must_be_a_string_like_name() -> None:
    assert parse_error({"type": "page", "userId": "u1", "category": 5}) == (
        "category",
        "must be a string, got number",
    )
    assert parse({"type": "page", "userId": "u1", "category": "Docs"}).payload["category"] == "Docs"


def test_a_utf8_bom_before_the_json_is_skipped() -> None:
    assert decode_json(b'\xef\xbb\xbf{"a": 1}') == {"a": 1}


def test_decode_document_repairs_what_javascript_sends_and_rejects_only_unholdable_elements() -> None:
    good = b'{"type": "track", "event": "E", "userId": "u1"}'
    body = (
        b'{"sentAt": "2026-01-01T00:00:00Z", "batch": ['
        + good
        + b', {"k": "cut \\ud83d", "n\\u0000ul": "a\\u0000b"}, {"n": NaN, "messageId": "m-nan"}, ['
        + b"1" * 4400
        + b"]]}"
    )
    document = decode_document(body)
    assert isinstance(document, dict)
    assert document["sentAt"] == "2026-01-01T00:00:00Z"
    first, repaired, *bad = document["batch"]
    assert first == {"type": "track", "event": "E", "userId": "u1"}
    # A string cut mid-emoji keeps the rest, the half character becomes U+FFFD; so does a NUL.
    assert repaired == {"k": "cut \ufffd", "n\ufffdul": "a\ufffdb"}
    assert [(str(item), item.message_id) for item in bad if isinstance(item, InvalidEvent)] == [
        ("invalid JSON: NaN is not a JSON number", "m-nan"),
        ("invalid JSON: an integer of 4400 digits is out of range", None),
    ]
    items, _ = parse_batch(document, received_at=RECEIVED)
    assert isinstance(items[0], Message) and all(isinstance(item, InvalidEvent) for item in items[2:])
    # A NUL in a document msgspec reads is repaired too (no PostgreSQL text column holds one).
    assert decode_document(b'{"userId": "a\\u0000"}') == {"userId": "a\ufffd"}
    # What no parser reads, an unholdable value outside `batch`, or in a lone message: the whole body.
    for broken in (
        b'{"batch": [' + good,
        b'{"context": {"n": NaN}, "batch": [' + good + b"]}",
        b'{"type": "track", "n": NaN}',
    ):
        with pytest.raises(InvalidEvent):
            decode_document(broken)
    assert decode_document(b'{"batch": [' + good + b"]}") == decode_json(b'{"batch": [' + good + b"]}")


def test_a_number_no_float_holds_rejects_its_message_instead_of_becoming_null() -> None:
    # msgspec reads 1e400 as infinity, which JSON can only write as null: the trait would be wiped.
    good = b'{"type": "track", "event": "E", "userId": "u1"}'
    huge = b'{"type": "identify", "userId": "u2", "messageId": "m-inf", "traits": {"x": 1e400}}'
    long = b'{"type": "track", "event": "E", "userId": "u3", "properties": {"r": ' + b"9" * 400 + b".5}}"
    document = decode_document(b'{"batch": [' + good + b", " + huge + b", " + long + b"]}")
    assert isinstance(document, dict)
    first, *bad = document["batch"]
    assert first == {"type": "track", "event": "E", "userId": "u1"}
    reason = "invalid JSON: a number beyond 1.798e+308 is out of range"
    assert [(str(item), item.message_id) for item in bad if isinstance(item, InvalidEvent)] == [
        (reason, "m-inf"),
        (reason, None),
    ]
    for alone in (huge, long, b'{"type": "track", "event": "E", "userId": "u1", "p": -2E+999}'):
        for decode in (decode_document, lambda data: decode_message(data, received_at=RECEIVED)):
            with pytest.raises(InvalidEvent, match="out of range"):
                decode(alone)
    # The lenient reader (a cut emoji elsewhere in the body) refuses it the same way.
    with pytest.raises(InvalidEvent, match="out of range"):
        decode_document(b'{"type": "track", "event": "E\\ud83d", "userId": "u1", "n": 1e400}')
    # Large but finite numbers, and strings that merely look like exponents, are untouched.
    fine = b'{"type": "track", "event": "e100 E999", "userId": "u1", "n": 1.5e308, "m": 1e-400}'
    assert decode_document(fine) == {
        "type": "track",
        "event": "e100 E999",
        "userId": "u1",
        "n": 1.5e308,
        "m": 0.0,
    }


def test_bytes_that_are_not_utf8_become_u_fffd_in_their_element_and_the_batch_lands() -> None:
    body = b'{"batch": [{"type": "track", "event": "E", "userId": "ok"}, {"userId": "caf\xe9", "k": "\xff"}]}'
    document = decode_document(body)
    assert isinstance(document, dict)
    assert document["batch"] == [
        {"type": "track", "event": "E", "userId": "ok"},
        {"userId": "caf\ufffd", "k": "\ufffd"},
    ]


def test_in_a_batch_only_the_element_nested_past_the_decoders_depth_is_refused() -> None:
    good = b'{"type": "track", "event": "E [x], {y}", "userId": "u1"}'  # brackets inside strings
    deep = b'{"type": "track", "event": "E", "userId": "u2", "p": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    body = (
        b'{"sentAt": "2026-01-01T00:00:00Z", "batch": ['
        + good
        + b", "
        + deep
        + b", "
        + good
        + b'], "x": [1]}'
    )
    document = decode_document(body)
    assert isinstance(document, dict)
    assert (document["sentAt"], document["x"]) == ("2026-01-01T00:00:00Z", [1])
    first, refused, last = document["batch"]
    assert first == last == {"type": "track", "event": "E [x], {y}", "userId": "u1"}
    assert isinstance(refused, InvalidEvent) and "nested deeper" in str(refused)
    # No batch to split, or an envelope that is itself too deep: the whole body, as before.
    for whole in (deep, b'{"context": ' + b"[" * 1000 + b"]" * 1000 + b', "batch": [' + good + b"]}"):
        with pytest.raises(InvalidEvent, match="nested deeper"):
            decode_document(whole)


def test_json_nested_past_the_decoders_depth_is_an_invalid_event_not_a_crash() -> None:
    deep = b'{"type": "track", "event": "E", "userId": "u1", "p": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    for decode in (decode_json, decode_document):
        with pytest.raises(InvalidEvent, match="nested deeper"):
            decode(deep)


def test_a_live_delivery_gives_every_message_without_an_id_its_own() -> None:
    twin = {"type": "track", "event": "Click", "userId": "u1", "timestamp": TS}
    items, _ = parse_batch({"batch": [twin, twin]}, received_at=RECEIVED, delivery="req-1")
    again, _ = parse_batch({"batch": [twin, twin]}, received_at=RECEIVED, delivery="req-2")
    ids = [item.message_id for item in (*items, *again) if isinstance(item, Message)]
    assert len(set(ids)) == 4 and all(item.startswith("gen-") for item in ids)
    single = parse(twin, delivery="req-3")
    assert single.message_id not in ids
    # An id the client sent is kept, delivery or not: that is what makes retries duplicates.
    assert parse({**twin, "messageId": "m1"}, delivery="req-4").message_id == "m1"


def test_a_live_delivery_keeps_the_servers_received_at() -> None:
    sent = track(receivedAt="2001-01-01T00:00:00.000Z")
    assert parse(sent).received_at == datetime(2001, 1, 1, tzinfo=UTC)  # an archive's own is kept
    assert parse(sent, delivery="req-1").received_at == RECEIVED
    assert parse(sent, delivery="req-1").payload["receivedAt"] == "2026-03-01T12:00:00.000Z"


_TIMES = st.sampled_from(
    [
        None,
        "",
        "2026-03-01T11:00:00.000Z",
        "2026-03-01T11:00:00Z",
        "2026-03-01T13:00:00.123456+02:00",
        "2026-03-01T11:05:00.5Z",
        "2026-03-02T11:00:00.000Z",  # after receipt: a clock ahead
        "0001-01-01T00:00:00Z",  # Go's zero time
        "not a time",
    ]
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    timestamp=_TIMES,
    original=_TIMES,
    sent=_TIMES,
    batch_sent=_TIMES,
    received=_TIMES,
    message_id=st.sampled_from([None, "m-1", ""]),
    mode=st.sampled_from(["live", "live-batch", "file", "file-batch", "plain"]),
)
def test_a_stored_payload_parses_back_to_the_message_it_was(
    timestamp: str | None,
    original: str | None,
    sent: str | None,
    batch_sent: str | None,
    received: str | None,
    message_id: str | None,
    mode: str,
) -> None:
    """What `idstitch copy` relies on: however a message arrived (a live request, a batch with its context
    and sentAt, an archive file), its stored payload read back is the same Message, so a replay resolves
    every message exactly as it was resolved when it arrived."""
    fields = {"timestamp": timestamp, "originalTimestamp": original, "sentAt": sent, "receivedAt": received}
    raw: dict[str, Any] = {
        "type": "identify",
        "userId": "u1",
        "anonymousId": "a1",
        "traits": {"email": "Ann@Example.com", "plan": "pro"},
        "writeKey": "wk_secret",
        **{key: value for key, value in fields.items() if value is not None},
    }
    if message_id is not None:
        raw["messageId"] = message_id
    envelope: dict[str, Any] = {"batch": [raw], "context": {"ip": "10.0.0.1"}, "integrations": {"All": True}}
    if batch_sent is not None:
        envelope["sentAt"] = batch_sent
    kwargs: dict[str, Any] = {"received_at": RECEIVED}
    if mode.startswith("live"):
        kwargs["delivery"] = "req-1"
    elif mode.startswith("file"):
        kwargs.update(estimated_receipt=True, occurrences=SourceOccurrences("archive.ndjson"))
    try:
        if mode.endswith("batch"):
            item = parse_batch(envelope, **kwargs)[0][0]
            if isinstance(item, InvalidEvent):
                raise item
            message = item
        else:
            message = parse_message(raw, **kwargs)
    except InvalidEvent:
        event("rejected on arrival")
        return  # never stored
    event("stored")
    assert "writeKey" not in message.payload
    stored = msgspec.json.encode(message.payload)
    assert parse_stored(stored, received_at=message.received_at) == message
