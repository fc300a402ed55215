"""Accuracy metrics on hand-built cases with known answers, the naive baseline, and the accuracy bar
of a simulated population (2,000 people) resolved by the engine with the default rules."""

from __future__ import annotations

import gzip
from datetime import UTC, datetime
from pathlib import Path

import pytest

from idstitch.config import Config
from idstitch.engine import Engine
from idstitch.ingest.files import read_batches
from idstitch.sim.accuracy import Accuracy, Truth, evaluate, read_truth, score_clusters
from idstitch.sim.baseline import NaiveBaseline, naive_clusters
from idstitch.sim.compare import PROTECTED_SCENARIOS, Comparison, TruthMismatch, compare_store
from idstitch.sim.population import WorkloadConfig, write_ndjson
from idstitch.storage.urls import open_store

Row = tuple[str, str | None, list[str]]


def truth_of(*rows: tuple[str, str, str]) -> Truth:
    """(message_id, person, scenario) rows, no accounts."""
    return Truth.from_rows((mid, person, "", scenario) for mid, person, scenario in rows)


# -- hand-built cases --------------------------------------------------------------------------------


def test_perfect_resolution() -> None:
    truth = truth_of(("m1", "alice", "login"), ("m2", "alice", "login"), ("m3", "bob", "login"))
    rows: list[Row] = [("m1", "P1", ["user_id:a"]), ("m2", "P1", ["user_id:a"]), ("m3", "P2", ["user_id:b"])]
    result = evaluate(rows, truth)
    assert (result.pairs.true_pairs, result.pairs.predicted_pairs, result.pairs.correct_pairs) == (1, 1, 1)
    assert result.pairs.precision == result.pairs.recall == result.pairs.f1 == 1.0
    assert (result.over_merged, result.split, result.foreign, result.misplaced) == (0, 0, 0, 0)
    assert (result.messages, result.people, result.profiles) == (3, 2, 2)
    assert result.recall_ceiling == result.linkable_recall == 1.0


def test_pure_over_merge() -> None:
    # Alice (2 messages) and Bob (1) in one profile through a shared device: 3 pairs predicted, 1 true.
    truth = truth_of(
        ("m1", "alice", "login"), ("m2", "alice", "shared_device"), ("m3", "bob", "shared_device")
    )
    rows: list[Row] = [
        ("m1", "P1", ["user_id:a", "anonymous_id:own"]),
        ("m2", "P1", ["user_id:a", "anonymous_id:lib"]),
        ("m3", "P1", ["user_id:b", "anonymous_id:lib"]),
    ]
    result = evaluate(rows, truth)
    assert (result.pairs.true_pairs, result.pairs.predicted_pairs, result.pairs.correct_pairs) == (1, 3, 1)
    assert result.pairs.precision == pytest.approx(1 / 3)
    assert result.pairs.recall == 1.0
    assert result.pairs.f1 == pytest.approx(0.5)
    assert (result.over_merged, result.over_merged_people, result.foreign, result.split) == (1, 2, 1, 0)
    # The identifier both people carried is the bridge, and only shared-device messages carried it.
    assert result.over_merged_caused_by(["shared_device"]) == 1
    assert result.over_merged_caused_by(["login", "junk_id"]) == 0
    assert result.over_merge_causes == ((("shared_device",), 1),)
    (example,) = result.over_merge_examples
    assert example["profile"] == "P1" and example["by_person"] == {"alice": 2, "bob": 1}
    assert [bridge["identifier"] for bridge in example["bridging_identifiers"]] == ["anonymous_id:lib"]
    shared = result.scenario("shared_device")
    # Pairs touching a shared-device message: (m1,m2) right, (m1,m3) and (m2,m3) wrong.
    assert (shared.pairs.predicted_pairs, shared.pairs.correct_pairs) == (3, 1)
    assert shared.over_merged == 1 and result.scenario("login").over_merged == 0


def test_pure_split() -> None:
    truth = truth_of(("m1", "alice", "login"), ("m2", "alice", "login"), ("m3", "alice", "crm"))
    rows: list[Row] = [
        ("m1", "P1", ["user_id:a", "email:a@x.io"]),
        ("m2", "P1", ["user_id:a"]),
        ("m3", "P2", ["email:a@x.io"]),  # linkable through m1's email, yet a profile of its own
    ]
    result = evaluate(rows, truth)
    assert (result.pairs.true_pairs, result.pairs.predicted_pairs, result.pairs.correct_pairs) == (3, 1, 1)
    assert result.pairs.precision == 1.0
    assert result.pairs.recall == pytest.approx(1 / 3)
    assert (result.over_merged, result.split, result.misplaced) == (0, 1, 1)
    assert (result.split_unlinkable, result.split_avoidable) == (0, 1)
    assert result.recall_ceiling == 1.0 and result.linkable_recall == pytest.approx(1 / 3)
    assert result.scenario("crm").split == 1 and result.scenario("login").split == 0
    (example,) = result.split_examples
    assert example["avoidable"] and [part["profile"] for part in example["profiles"]] == ["P1", "P2"]


def test_unlinkable_split_sets_the_recall_ceiling() -> None:
    # Alice's second device never logs in: nothing in the messages ties it to her.
    truth = truth_of(("m1", "alice", "login"), ("m2", "alice", "login"), ("m3", "alice", "anonymous"))
    rows: list[Row] = [
        ("m1", "P1", ["user_id:a", "anonymous_id:phone"]),
        ("m2", "P1", ["anonymous_id:phone"]),
        ("m3", "P2", ["anonymous_id:laptop"]),
    ]
    result = evaluate(rows, truth)
    assert result.pairs.recall == pytest.approx(1 / 3)
    assert (result.linkable_pairs, result.linked_pairs) == (1, 1)
    assert result.recall_ceiling == pytest.approx(1 / 3)
    assert result.linkable_recall == 1.0
    assert (result.split, result.split_unlinkable, result.split_avoidable) == (1, 1, 0)
    anonymous = result.scenario("anonymous")
    assert (anonymous.pairs.true_pairs, anonymous.linkable_pairs) == (2, 0)
    assert anonymous.recall_ceiling == 0.0


def test_linkable_chains_only_run_through_the_persons_own_messages() -> None:
    # m1 and m3 are Alice's; they share nothing directly, only through Bob's m2: not linkable.
    truth = truth_of(("m1", "alice", "login"), ("m2", "bob", "login"), ("m3", "alice", "login"))
    rows: list[Row] = [("m1", "P1", ["x:1"]), ("m2", "P1", ["x:1", "x:2"]), ("m3", "P1", ["x:2"])]
    result = evaluate(rows, truth)
    assert result.linkable_pairs == 0 and result.pairs.correct_pairs == 1
    assert result.over_merged == 1


def test_per_scenario_pairs_touching_a_scenario() -> None:
    # Alice: two logins and a shared-device message wrongly placed with Bob's.
    truth = truth_of(
        ("m1", "alice", "login"),
        ("m2", "alice", "login"),
        ("m3", "alice", "shared_device"),
        ("m4", "bob", "shared_device"),
    )
    rows: list[Row] = [
        ("m1", "P1", ["user_id:a"]),
        ("m2", "P1", ["user_id:a"]),
        ("m3", "P2", ["anonymous_id:lib"]),
        ("m4", "P2", ["user_id:b", "anonymous_id:lib"]),
    ]
    result = evaluate(rows, truth)
    assert (result.pairs.true_pairs, result.pairs.predicted_pairs, result.pairs.correct_pairs) == (3, 2, 1)
    shared, login = result.scenario("shared_device"), result.scenario("login")
    assert (shared.pairs.true_pairs, shared.pairs.predicted_pairs, shared.pairs.correct_pairs) == (2, 1, 0)
    assert (login.pairs.true_pairs, login.pairs.predicted_pairs, login.pairs.correct_pairs) == (3, 1, 1)
    assert (shared.messages, login.messages) == (2, 2)
    assert (shared.over_merged, shared.split, shared.misplaced) == (1, 1, 1)
    assert (login.over_merged, login.split, login.misplaced) == (0, 0, 0)
    assert result.foreign == 1
    assert result.scenario("crm").messages == 0


def test_retries_junk_only_unresolved_missing_and_extra_are_counted_not_scored() -> None:
    truth = Truth.from_rows(
        [
            ("m1", "alice", "", "login"),
            ("m2", "alice", "", "login"),
            ("m1", "alice", "", "retry"),  # the same message again: counted once, as `login`
            ("j1", "", "", "junk_id"),  # belongs to nobody
            ("m3", "alice", "", "junk_id"),
            ("m4", "alice", "", "login"),  # rejected: never stored
        ]
    )
    assert (len(truth), truth.rows, truth.repeated) == (5, 6, 1)
    rows: list[Row] = [
        ("m1", "P1", ["user_id:a"]),
        ("m2", "P1", ["user_id:a"]),
        ("m1", "P1", ["user_id:a"]),  # a duplicate row changes nothing
        ("j1", None, ["anonymous_id:null"]),
        ("m3", None, ["anonymous_id:null"]),  # unresolved: a profile of its own
        ("zz", "P9", ["user_id:z"]),  # not in the truth
    ]
    result = evaluate(rows, truth)
    assert (result.messages, result.junk_only, result.unresolved, result.missing, result.extra) == (
        4,
        1,
        1,
        1,
        1,
    )
    assert (result.truth_rows, result.repeated) == (6, 1)
    assert result.scenario("login").messages == 3 and result.scenario("retry").messages == 0
    assert (result.pairs.true_pairs, result.pairs.correct_pairs, result.profiles) == (6, 1, 3)
    assert result.over_merged == 0 and result.split == 1


def test_score_clusters_known_answers() -> None:
    perfect = score_clusters([("P1", "a"), ("P1", "a"), ("P2", "b")])
    assert perfect.pairs.precision == perfect.pairs.recall == 1.0
    assert (perfect.over_merged, perfect.split, perfect.clusters, perfect.classes) == (0, 0, 2, 2)
    merged = score_clusters([("P1", "a"), ("P1", "a"), ("P1", "b")])
    assert merged.pairs.precision == pytest.approx(1 / 3) and merged.pairs.recall == 1.0
    assert (merged.over_merged, merged.split) == (1, 0)
    split = score_clusters([("P1", "a"), ("P1", "a"), ("P2", "a")])
    assert split.pairs.precision == 1.0 and split.pairs.recall == pytest.approx(1 / 3)
    assert (split.over_merged, split.split) == (0, 1)
    empty = score_clusters([])
    assert empty.pairs.precision == empty.pairs.recall == 1.0 and empty.items == 0


def test_read_truth_plain_and_gzip(tmp_path: Path) -> None:
    text = "message_id,person,account,scenario\nm1,p_1,a_1,login\nm2,,,junk_id\nm1,p_1,a_1,retry\n"
    plain = tmp_path / "t.csv"
    plain.write_text(text)
    packed = tmp_path / "t.csv.gz"
    packed.write_bytes(gzip.compress(text.encode()))
    for path in (plain, packed):
        truth = read_truth(path)
        assert (len(truth), truth.rows, truth.repeated) == (2, 3, 1)
        index = truth.index["m1"]
        assert truth.people[truth.person[index]] == "p_1"
        assert truth.accounts[truth.account[index]] == "a_1"
        assert truth.scenarios[truth.scenario[index]] == "login"
        assert truth.person[truth.index["m2"]] == -1
    bad = tmp_path / "bad.csv"
    bad.write_text("id,who\nm1,p\n")
    with pytest.raises(ValueError, match="not a truth file"):
        read_truth(bad)
    short = tmp_path / "short.csv"
    short.write_text("message_id,person,account,scenario\nm1,p_1\n")
    with pytest.raises(ValueError, match=r"short\.csv:2"):
        read_truth(short)


# -- the naive baseline ------------------------------------------------------------------------------


def test_naive_baseline_joins_on_any_shared_identifier() -> None:
    clusters = naive_clusters(
        [
            ("m1", ["user_id:a", "anonymous_id:lib"]),
            ("m2", ["user_id:b", "anonymous_id:lib"]),  # a shared device: joins a and b
            ("m3", ["user_id:c", "anonymous_id:null"]),
            ("m4", ["user_id:d", "anonymous_id:null"]),  # a junk id: joins c and d
            ("m5", ["user_id:e"]),
            ("m6", []),
            ("m7", ["user_id:d", "user_id:a"]),  # and now everything above but e
        ]
    )
    assert clusters["m6"] is None
    assert len({clusters[m] for m in ("m1", "m2", "m3", "m4", "m7")}) == 1
    assert clusters["m5"] == "user_id:e" and clusters["m5"] != clusters["m1"]


def test_naive_baseline_labels_do_not_depend_on_message_order() -> None:
    messages = [("m1", ["x:1", "x:2"]), ("m2", ["x:3"]), ("m3", ["x:3", "x:2"])]
    forward = naive_clusters(messages)
    backward = naive_clusters(reversed(messages))
    assert len(set(forward.values())) == len(set(backward.values())) == 1
    baseline = NaiveBaseline()
    baseline.add(["x:1"])
    with pytest.raises(KeyError):
        baseline.cluster(["x:9"])
    assert baseline.identifiers == 1


# -- a simulated population through the engine ------------------------------------------------------

PEOPLE = 2_000


def resolve_population(folder: Path, people: int, config: Config) -> Comparison:
    """Simulate `people` people, ingest them with `config` and score the store against the truth."""
    events, truth_path = folder / "events.ndjson.gz", folder / "truth.csv.gz"
    write_ndjson(events, WorkloadConfig(messages=8 * people, people=people, seed=1), truth_path=truth_path)
    store = open_store(f"sqlite:///{folder}/s.db")
    try:
        engine = Engine(store, config)
        for batch in read_batches([str(events)], batch_size=1000, received_at=datetime.now(UTC)):
            result = engine.ingest([item for _, item in batch.items], space="default")
            assert not result.rejected
        return compare_store(store, "default", engine.rules("default"), read_truth(truth_path))
    finally:
        store.close()


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Comparison:
    """2,000 people (16,000 messages), ingested with the default rules, scored against the truth."""
    return resolve_population(tmp_path_factory.mktemp("population"), PEOPLE, Config.default())


def test_simulated_population_meets_the_accuracy_bar(simulated: Comparison) -> None:
    ours = simulated.idstitch
    assert ours.messages > 15_000 and ours.people == PEOPLE
    assert ours.missing == 0 and ours.extra == 0 and ours.junk_only > 0
    assert ours.pairs.precision >= 0.999
    assert ours.over_merged_caused_by(PROTECTED_SCENARIOS) == 0
    # The recall bar is held on the pairs the messages can link. Raw recall cannot reach 0.98 on this
    # population: ~11% of same-person pairs share no identifier chain (visitors who never log in on
    # a second device, devices a person never logs in on); `idstitch accuracy` reports that ceiling.
    assert ours.linkable_recall >= 0.98
    assert ours.pairs.recall <= ours.recall_ceiling + 1e-12
    assert ours.split_avoidable <= ours.split // 50
    assert simulated.accounts.pairs.precision == 1.0 and simulated.accounts.items > 0
    targets = {target.name: target for target in simulated.targets}
    assert targets["precision"].met and targets["recall over linkable pairs"].met
    assert targets["over-merged profiles through shared devices or junk ids"].met


def test_the_naive_baseline_over_merges_on_shared_devices_and_junk_ids(simulated: Comparison) -> None:
    naive: Accuracy = simulated.baseline
    assert naive.over_merged_caused_by(["shared_device"]) >= 5
    assert naive.over_merged_caused_by(["junk_id"]) >= 1
    assert naive.scenario("shared_device").over_merged >= 5
    assert naive.scenario("junk_id").over_merged >= 1
    # The junk ids alone put dozens of people in one cluster.
    assert max(example["people"] for example in naive.over_merge_examples) >= 20
    assert naive.pairs.precision < 0.5 < simulated.idstitch.pairs.precision
    assert naive.over_merged_unexplained == 0
    # Both see the same messages: the baseline cannot link more of a person than the messages allow.
    assert naive.recall_ceiling == pytest.approx(simulated.idstitch.recall_ceiling)


def test_weakened_rules_over_merge_and_the_report_says_through_what(tmp_path: Path) -> None:
    # With room for ten user_ids per profile, a shared device's logins fuse its users: the score must
    # see those over-merges (it is not 1.0 by construction) and blame the shared devices.
    weak = Config.from_mapping(
        {"spaces": {"default": {"identifiers": {"user_id": {"priority": 1, "limit": 10, "window": "ever"}}}}}
    )
    ours = resolve_population(tmp_path, 600, weak).idstitch
    assert ours.over_merged > 0 and ours.pairs.precision < 0.999
    assert ours.over_merged_caused_by(["shared_device"]) == ours.over_merged
    assert ours.over_merged_unexplained == 0
    example = ours.over_merge_examples[0]
    assert example["profile"].startswith("use_")
    assert any(
        bridge["identifier"].startswith("anonymous_id:") and bridge["scenarios"] == ["shared_device"]
        for bridge in example["bridging_identifiers"]
    )


def test_a_truth_mostly_absent_from_the_store_is_refused_not_scored(tmp_path: Path) -> None:
    # Scoring it would count every absent message as a singleton: a precision of 1.0 over nothing.
    events = tmp_path / "e.ndjson"
    events.write_text(
        '{"type": "page", "messageId": "m0", "anonymousId": "a0", "timestamp": "2026-01-01T00:00:00Z"}\n'
        '{"type": "page", "messageId": "m1", "anonymousId": "a1", "timestamp": "2026-01-01T00:00:01Z"}\n'
    )
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    try:
        engine = Engine(store, Config.default())
        for batch in read_batches([str(events)], batch_size=10, received_at=datetime.now(UTC)):
            assert not engine.ingest([item for _, item in batch.items], space="default").rejected
        rules = engine.rules("default")
        half = truth_of(*((f"m{n}", f"p{n % 2}", "login") for n in range(4)))
        assert compare_store(store, "default", rules, half).idstitch.missing == 2  # 2 of 4 stored: scored
        most_absent = truth_of(*((f"m{n}", f"p{n % 2}", "login") for n in range(5)))
        with pytest.raises(TruthMismatch, match=r"only 2 of its 5 messages \(40%\) are in space default"):
            compare_store(store, "default", rules, most_absent)
    finally:
        store.close()
