"""`explain`: the story of a profile, including identifiers an alias retired (SPEC §4, E11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import at, open_space
from idstitch.cli import _render_explain
from idstitch.profiles import explain_document


def test_explain_lists_the_user_id_an_alias_retired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_space(tmp_path) as space:
        profile = space.send("identify", userId="old_id", anonymousId="a1", at=at(minutes=1)).profile_id
        space.send("alias", previousId="old_id", userId="new_id", at=at(minutes=2))
        space.send("track", userId="old_id", at=at(minutes=3))
        assert profile is not None
        document = explain_document(space.store, space.name, profile)
    assert document is not None
    assert document["retired"] == [
        {
            "identifier": "user_id:old_id",
            "first_seen": "2026-01-05T09:01:00.000Z",
            "last_seen": "2026-01-05T09:03:00.000Z",
        }
    ]
    assert document["merges"] == [] and document["dropped"] == []
    _render_explain(document)
    text = capsys.readouterr().out
    assert "retired identifiers: 1 (by an alias: still resolve here, count toward no limit)" in text
    assert "  user_id:old_id  first seen 2026-01-05T09:01:00.000Z, last seen 2026-01-05T09:03:00.000Z" in text


def test_a_profile_without_an_alias_has_no_retired_identifiers(tmp_path: Path) -> None:
    with open_space(tmp_path) as space:
        profile = space.send("identify", userId="u1", anonymousId="a1", at=at(minutes=1)).profile_id
        assert profile is not None
        document = explain_document(space.store, space.name, profile)
    assert document is not None and document["retired"] == []


def test_explain_says_a_pre_declared_suspect_was_declared_not_seen_with_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    toml = '[spaces.default.non_unique]\nexact = ["kiosk"]\n'
    with open_space(tmp_path, toml) as space:
        profile = space.send("identify", userId="u1", anonymousId="kiosk", at=at(minutes=1)).profile_id
        assert profile is not None
        document = explain_document(space.store, space.name, profile)
    assert document is not None
    assert [(s["identifier"], s["evidence_type"], s["evidence_values"]) for s in document["suspects"]] == [
        ("anonymous_id:kiosk", "declared", [])
    ]
    _render_explain(document)
    text = capsys.readouterr().out
    assert (
        "  anonymous_id:kiosk (on this profile): declared non-unique by the space's rules; "
        "marked at 2026-01-05T09:01:00.000Z by message m1"
    ) in text
    assert "seen with 0" not in text
