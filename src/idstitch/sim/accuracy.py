"""How well a resolution matches the ground truth: pairwise scores, over-merges, splits, per scenario.

Every figure is computed from counts of a contingency table (predicted profile × true person), never
from the O(n²) pairs themselves, so a million messages score in seconds.

Definitions (the `idstitch accuracy` report repeats them):

- **Scored messages**: every distinct messageId of the truth file whose person is not empty. A retry
  repeats a messageId: it is one message, with the scenario of its first row. Messages whose truth
  person is empty (junk-only traffic that belongs to nobody) are left out and counted.
- **Predicted profile** of a message: the root profile it resolved to. A message stored as unresolved
  (all identifiers blocked) or not in the store (rejected by ingest, or never ingested) is a profile of its
  own (a singleton).
- **Pairwise precision / recall / F1**: over unordered pairs of scored messages. A pair is *predicted*
  when both messages are in the same profile, *true* when both belong to the same person.
  precision = correct / predicted pairs, recall = correct / true pairs.
- **Over-merged profile**: holds messages of more than one person. **Split person**: their messages
  are in more than one profile.
- **Linkable pairs** (the recall ceiling): two messages of one person are linkable when a chain of that
  person's *own* messages joins them, each step sharing an identifier the method may link on (for
  idstitch, any identifier not blocked). Pairs that are not linkable cannot be joined from the messages
  alone without also joining someone else, e.g. a visitor who never logs in on their second device. A
  split person is *unlinkable* when every part of the split is such a gap, *avoidable* otherwise.
- **Per scenario** S: precision and recall over the pairs where at least one message is of scenario S
  (so a wrongly placed shared-device message costs precision in `shared_device` for every message it is
  wrongly paired with). An over-merged profile counts under S when a message of scenario S carries a
  *bridging identifier*: one that messages of two or more of the profile's people carry (the
  identifier that joined them; shared ids are the only way people join). A split person counts under S
  when one of their messages outside their main profile (the one holding most of their messages) is of
  scenario S.
"""

from __future__ import annotations

import csv
import gzip
from array import array
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from idstitch.sim.population import SCENARIOS

__all__ = [
    "TRUTH_HEADER",
    "Accuracy",
    "ClusterScores",
    "PairScores",
    "ScenarioScores",
    "Truth",
    "evaluate",
    "read_truth",
    "score_clusters",
]

TRUTH_HEADER: tuple[str, ...] = ("message_id", "person", "account", "scenario")
_NOT_SEEN = -1


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def _ratio(part: int, whole: int) -> float:
    # No pair to get wrong is a perfect score: an empty cell must not read as a failure.
    return part / whole if whole else 1.0


@dataclass(frozen=True, slots=True)
class PairScores:
    """Pair counts and the precision / recall / F1 they give."""

    true_pairs: int
    predicted_pairs: int
    correct_pairs: int

    @property
    def precision(self) -> float:
        """Correct pairs / predicted pairs (1.0 when nothing is predicted together)."""
        return _ratio(self.correct_pairs, self.predicted_pairs)

    @property
    def recall(self) -> float:
        """Correct pairs / true pairs (1.0 when nobody has two messages)."""
        return _ratio(self.correct_pairs, self.true_pairs)

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "true_pairs": self.true_pairs,
            "predicted_pairs": self.predicted_pairs,
            "correct_pairs": self.correct_pairs,
        }


@dataclass(frozen=True, slots=True)
class ClusterScores:
    """Pairwise scores, over-merged clusters and split classes of one clustering."""

    items: int
    clusters: int
    classes: int
    pairs: PairScores
    over_merged: int
    split: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "items": self.items,
            "clusters": self.clusters,
            "classes": self.classes,
            **self.pairs.as_dict(),
            "over_merged": self.over_merged,
            "split": self.split,
        }


def score_clusters(items: Iterable[tuple[Hashable, Hashable]]) -> ClusterScores:
    """Score (predicted cluster, true class) pairs, one per item, from the contingency table."""
    cells: Counter[tuple[Hashable, Hashable]] = Counter(items)
    cluster_sizes: Counter[Hashable] = Counter()
    class_sizes: Counter[Hashable] = Counter()
    classes_per_cluster: Counter[Hashable] = Counter()
    clusters_per_class: Counter[Hashable] = Counter()
    for (cluster, truth), n in cells.items():
        cluster_sizes[cluster] += n
        class_sizes[truth] += n
        classes_per_cluster[cluster] += 1
        clusters_per_class[truth] += 1
    pairs = PairScores(
        true_pairs=sum(_pairs(n) for n in class_sizes.values()),
        predicted_pairs=sum(_pairs(n) for n in cluster_sizes.values()),
        correct_pairs=sum(_pairs(n) for n in cells.values()),
    )
    return ClusterScores(
        items=sum(cells.values()),
        clusters=len(cluster_sizes),
        classes=len(class_sizes),
        pairs=pairs,
        over_merged=sum(1 for k in classes_per_cluster.values() if k > 1),
        split=sum(1 for k in clusters_per_class.values() if k > 1),
    )


class Truth:
    """Ground truth per distinct messageId: person, account and scenario, held in compact arrays."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # messageId → position in the arrays below
        self.people: list[str] = []
        self.accounts: list[str] = []
        self.scenarios: list[str] = list(SCENARIOS)
        self.person = array("i")  # -1: the message belongs to nobody (junk-only traffic)
        self.account = array("i")  # -1: no account
        self.scenario = array("B")
        self.rows = 0
        self.repeated = 0  # rows repeating an earlier messageId (retries)
        self._person_ids: dict[str, int] = {}
        self._account_ids: dict[str, int] = {}
        self._scenario_ids = {name: n for n, name in enumerate(self.scenarios)}

    def __len__(self) -> int:
        return len(self.person)

    def add(self, message_id: str, person: str, account: str, scenario: str) -> None:
        """Record one truth row; a messageId seen before keeps its first row (a retry is one message)."""
        self.rows += 1
        if message_id in self.index:
            self.repeated += 1
            return
        self.index[message_id] = len(self.person)
        self.person.append(self._intern(person, self._person_ids, self.people))
        self.account.append(self._intern(account, self._account_ids, self.accounts))
        scenario_id = self._scenario_ids.get(scenario)
        if scenario_id is None:
            if len(self.scenarios) >= 255:
                raise ValueError("more than 255 scenarios in a truth file")
            scenario_id = self._scenario_ids[scenario] = len(self.scenarios)
            self.scenarios.append(scenario)
        self.scenario.append(scenario_id)

    @staticmethod
    def _intern(name: str, ids: dict[str, int], names: list[str]) -> int:
        if not name:
            return -1
        found = ids.get(name)
        if found is None:
            found = ids[name] = len(names)
            names.append(name)
        return found

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[str]]) -> Truth:
        """Build from (message_id, person, account, scenario) rows."""
        truth = cls()
        for message_id, person, account, scenario in rows:
            truth.add(message_id, person, account, scenario)
        return truth


def read_truth(path: Path | str) -> Truth:
    """Read a truth CSV (`message_id,person,account,scenario`, gzip-compressed or not)."""
    path = Path(path)
    with path.open("rb") as raw:
        # Sniff the gzip magic rather than trust the file name.
        lines: Iterable[bytes] = (
            gzip.GzipFile(fileobj=raw, mode="rb") if raw.peek(2)[:2] == b"\x1f\x8b" else raw
        )
        reader = csv.reader(line.decode("utf-8") for line in lines)
        try:
            header = next(reader, None)
            if header is None or tuple(header) != TRUTH_HEADER:
                raise ValueError(
                    f"{path}: not a truth file (the first line must be {','.join(TRUTH_HEADER)})"
                )
            truth = Truth()
            for line, row in enumerate(reader, start=2):
                if len(row) != 4 or not row[0]:
                    raise ValueError(f"{path}:{line}: expected message_id,person,account,scenario")
                truth.add(row[0], row[1], row[2], row[3])
        except csv.Error as error:
            raise ValueError(f"{path}:{reader.line_num}: {error}") from None
    return truth


class _LinkableRecall:
    """Pair scores with the linkable pairs beside them: the recall ceiling and recall over linkable pairs."""

    __slots__ = ()
    pairs: PairScores
    linkable_pairs: int  # true pairs that the messages can link
    linked_pairs: int  # of those, the pairs predicted together

    @property
    def recall_ceiling(self) -> float:
        """The best recall the messages allow: linkable pairs / true pairs."""
        return _ratio(self.linkable_pairs, self.pairs.true_pairs)

    @property
    def linkable_recall(self) -> float:
        """Recall over the linkable pairs only: what the resolution missed that it could have found."""
        return _ratio(self.linked_pairs, self.linkable_pairs)

    def pair_figures(self) -> dict[str, Any]:
        """The pair scores and the linkable-pair figures, JSON-able."""
        return {
            **self.pairs.as_dict(),
            "linkable_pairs": self.linkable_pairs,
            "linked_pairs": self.linked_pairs,
            "recall_ceiling": self.recall_ceiling,
            "linkable_recall": self.linkable_recall,
        }


@dataclass(frozen=True, slots=True)
class ScenarioScores(_LinkableRecall):
    """The figures of one scenario (see the module docstring for the definitions)."""

    scenario: str
    messages: int
    pairs: PairScores  # pairs with at least one message of the scenario
    linkable_pairs: int  # true pairs with a message of the scenario that the messages can link
    linked_pairs: int  # of those, the pairs predicted together
    over_merged: int  # over-merged profiles with a bridging identifier carried by a message of it
    split: int  # split people with a message of it outside their main profile
    misplaced: int  # its messages outside their person's main profile
    foreign: int  # its messages in a profile whose majority is someone else

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "messages": self.messages,
            **self.pair_figures(),
            "over_merged": self.over_merged,
            "split": self.split,
            "misplaced": self.misplaced,
            "foreign": self.foreign,
        }


@dataclass(frozen=True, slots=True)
class Accuracy(_LinkableRecall):
    """Every figure of one resolution against the truth (see the module docstring)."""

    messages: int  # scored: distinct messageIds whose person is known
    people: int
    profiles: int  # distinct predicted profiles among scored messages (singletons included)
    truth_rows: int
    repeated: int  # truth rows repeating a messageId (retries), counted once
    junk_only: int  # messages whose truth person is empty, left out of every figure
    unresolved: int  # scored messages stored without a profile (singletons)
    missing: int  # scored messages not in the resolution at all (singletons)
    extra: int  # messages of the resolution that the truth does not know (ignored)
    pairs: PairScores
    linkable_pairs: int
    linked_pairs: int
    over_merged: int
    over_merge_causes: tuple[tuple[tuple[str, ...], int], ...]  # scenario sets of bridges → profiles
    over_merged_unexplained: int  # over-merged profiles without a bridging identifier
    over_merged_people: int  # people with a message in an over-merged profile
    foreign: int  # messages in a profile whose majority is another person
    split: int
    split_unlinkable: int  # split people whose parts no identifier chain of their own joins
    misplaced: int  # messages outside their person's main profile
    by_scenario: tuple[ScenarioScores, ...]
    over_merge_examples: tuple[dict[str, Any], ...]
    split_examples: tuple[dict[str, Any], ...]

    def over_merged_caused_by(self, scenarios: Iterable[str]) -> int:
        """Over-merged profiles with a bridging identifier carried by a message of any of these scenarios."""
        wanted = set(scenarios)
        return sum(n for causes, n in self.over_merge_causes if wanted.intersection(causes))

    @property
    def split_avoidable(self) -> int:
        """Split people with two linkable messages in different profiles."""
        return self.split - self.split_unlinkable

    def scenario(self, name: str) -> ScenarioScores:
        """The figures of one scenario (zeros when it has no message)."""
        for item in self.by_scenario:
            if item.scenario == name:
                return item
        return ScenarioScores(name, 0, PairScores(0, 0, 0), 0, 0, 0, 0, 0, 0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "messages": self.messages,
            "people": self.people,
            "profiles": self.profiles,
            "truth_rows": self.truth_rows,
            "repeated_message_ids": self.repeated,
            "junk_only": self.junk_only,
            "unresolved": self.unresolved,
            "missing": self.missing,
            "extra": self.extra,
            **self.pair_figures(),
            "over_merged": self.over_merged,
            "over_merge_causes": [
                {"scenarios": list(causes), "profiles": n} for causes, n in self.over_merge_causes
            ],
            "over_merged_unexplained": self.over_merged_unexplained,
            "over_merged_people": self.over_merged_people,
            "foreign": self.foreign,
            "split": self.split,
            "split_unlinkable": self.split_unlinkable,
            "split_avoidable": self.split_avoidable,
            "misplaced": self.misplaced,
            "by_scenario": {item.scenario: item.as_dict() for item in self.by_scenario},
            "over_merge_examples": list(self.over_merge_examples),
            "split_examples": list(self.split_examples),
        }


def _find(parent: array[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]  # path halving keeps the trees flat
        x = parent[x]
    return x


class _Collected:
    """The rows of one resolution, interned into arrays indexed like the truth."""

    def __init__(self, truth: Truth) -> None:
        n = len(truth)
        self.cluster = array("i", [_NOT_SEEN]) * n
        self.cluster_names: list[str] = []
        self.cluster_ids: dict[str, int] = {}
        self.identifier_names: list[str] = []
        self.identifier_ids: dict[str, int] = {}
        self.flat = array("i")  # identifier ids of every message, back to back
        self.start = array("q", [0]) * n
        self.count = array("H", [0]) * n
        self.unresolved: set[int] = set()
        self.extra = 0

    def add(self, truth: Truth, message_id: str, cluster: str | None, identifiers: Iterable[str]) -> None:
        index = truth.index.get(message_id)
        if index is None:
            self.extra += 1
            return
        if self.cluster[index] != _NOT_SEEN:
            return  # the same message twice in the input: it was stored once
        if cluster is None:
            self.unresolved.add(index)
            label = self._singleton(f"(unresolved {message_id})")
        else:
            label = self.cluster_ids.get(cluster, -1)
            if label < 0:
                label = self.cluster_ids[cluster] = len(self.cluster_names)
                self.cluster_names.append(cluster)
        self.cluster[index] = label
        self.start[index] = len(self.flat)
        ids = self.identifier_ids
        names = self.identifier_names
        before = len(self.flat)
        for identifier in dict.fromkeys(identifiers):
            found = ids.get(identifier)
            if found is None:
                found = ids[identifier] = len(names)
                names.append(identifier)
            self.flat.append(found)
        self.count[index] = min(len(self.flat) - before, 65535)

    def _singleton(self, name: str) -> int:
        label = len(self.cluster_names)
        self.cluster_names.append(name)
        return label

    def fill_missing(self, truth: Truth) -> int:
        """Give every truth message the resolution did not contain a profile of its own."""
        missing = 0
        for index, label in enumerate(self.cluster):
            if label == _NOT_SEEN:
                self.cluster[index] = self._singleton("(missing)")
                missing += truth.person[index] >= 0
        return missing

    def identifiers(self, index: int) -> array[int]:
        start = self.start[index]
        return self.flat[start : start + self.count[index]]


def evaluate(
    rows: Iterable[tuple[str, str | None, Iterable[str]]], truth: Truth, *, examples: int = 5
) -> Accuracy:
    """Score a resolution given as (messageId, profile or None, identifiers it may link on) rows."""
    data = _Collected(truth)
    for message_id, profile, identifiers in rows:
        data.add(truth, message_id, profile, identifiers)
    missing = data.fill_missing(truth)
    person, scenario, cluster = truth.person, truth.scenario, data.cluster
    scored = [index for index in range(len(truth)) if person[index] >= 0]
    n_scenarios = len(truth.scenarios)

    # The contingency table, split by scenario: (profile, person, scenario) → messages.
    cells: Counter[tuple[int, int, int]] = Counter(
        (cluster[index], person[index], scenario[index]) for index in scored
    )
    cell_n: Counter[tuple[int, int]] = Counter()
    cluster_n: Counter[int] = Counter()
    person_n: Counter[int] = Counter()
    cluster_s: Counter[tuple[int, int]] = Counter()
    person_s: Counter[tuple[int, int]] = Counter()
    for (c, p, s), k in cells.items():
        cell_n[c, p] += k
        cluster_n[c] += k
        person_n[p] += k
        cluster_s[c, s] += k
        person_s[p, s] += k

    pairs = PairScores(
        true_pairs=sum(_pairs(n) for n in person_n.values()),
        predicted_pairs=sum(_pairs(n) for n in cluster_n.values()),
        correct_pairs=sum(_pairs(n) for n in cell_n.values()),
    )

    # Majorities: the main person of each profile, the main profile of each person.
    people_in: dict[int, list[tuple[int, int]]] = defaultdict(list)
    profiles_of: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for (c, p), n in cell_n.items():
        people_in[c].append((n, -p))
        profiles_of[p].append((n, -c))
    main_person = {c: -max(counts)[1] for c, counts in people_in.items()}
    main_profile = {p: -max(counts)[1] for p, counts in profiles_of.items()}
    over_merged = {c for c, counts in people_in.items() if len(counts) > 1}
    split = {p for p, counts in profiles_of.items() if len(counts) > 1}

    linkable = _linkable(data, truth, scored, n_scenarios)
    avoidable = linkable.avoidable
    causes, bridges = _bridges(data, truth, scored, over_merged)

    foreign_s: Counter[int] = Counter()
    misplaced_s: Counter[int] = Counter()
    split_causes: dict[int, set[int]] = defaultdict(set)
    for index in scored:
        c, p, s = cluster[index], person[index], scenario[index]
        if main_person[c] != p:
            foreign_s[s] += 1
        if main_profile[p] != c:
            misplaced_s[s] += 1
            split_causes[p].add(s)

    # Pairs touching scenario S, summed per table row in one pass each (not one pass per scenario).
    true_s, predicted_s, correct_s = [0] * n_scenarios, [0] * n_scenarios, [0] * n_scenarios
    for (p, s), k in person_s.items():
        true_s[s] += _touching(person_n[p], k)
    for (c, s), k in cluster_s.items():
        predicted_s[s] += _touching(cluster_n[c], k)
    for (c, p, s), k in cells.items():
        correct_s[s] += _touching(cell_n[c, p], k)
    over_merged_s = Counter(s for found in causes.values() for s in found)
    split_s = Counter(s for found in split_causes.values() for s in found)
    messages_s = Counter(scenario[index] for index in scored)
    by_scenario = tuple(
        ScenarioScores(
            scenario=name,
            messages=messages_s[s],
            pairs=PairScores(true_s[s], predicted_s[s], correct_s[s]),
            linkable_pairs=linkable.pairs_s[s],
            linked_pairs=linkable.linked_s[s],
            over_merged=over_merged_s[s],
            split=split_s[s],
            misplaced=misplaced_s[s],
            foreign=foreign_s[s],
        )
        for s, name in enumerate(truth.scenarios)
        if messages_s[s]
    )

    return Accuracy(
        messages=len(scored),
        people=len(person_n),
        profiles=len(cluster_n),
        truth_rows=truth.rows,
        repeated=truth.repeated,
        junk_only=len(truth) - len(scored),
        unresolved=sum(1 for index in data.unresolved if person[index] >= 0),
        missing=missing,
        extra=data.extra,
        pairs=pairs,
        linkable_pairs=linkable.pairs,
        linked_pairs=linkable.linked,
        over_merged=len(over_merged),
        over_merge_causes=tuple(
            sorted(
                Counter(tuple(sorted(truth.scenarios[s] for s in causes[c])) for c in over_merged).items(),
                key=lambda item: (-item[1], item[0]),
            )
        ),
        over_merged_unexplained=sum(1 for c in over_merged if not causes.get(c)),
        over_merged_people=len({-p for c in over_merged for _, p in people_in[c]}),
        foreign=sum(foreign_s.values()),
        split=len(split),
        split_unlinkable=len(split - avoidable),
        misplaced=sum(misplaced_s.values()),
        by_scenario=by_scenario,
        over_merge_examples=_over_merge_examples(data, truth, people_in, bridges, examples),
        split_examples=_split_examples(data, truth, scored, profiles_of, avoidable, examples),
    )


def _touching(n: int, k: int) -> int:
    """Pairs among `n` items that include at least one of `k` marked ones."""
    return _pairs(n) - _pairs(n - k)


@dataclass(slots=True)
class _Linkable:
    pairs: int  # linkable pairs
    linked: int  # linkable pairs in the same predicted profile
    pairs_s: list[int]  # per scenario: touching it
    linked_s: list[int]
    avoidable: set[int]  # people with a linkable component spread over several profiles


def _linkable(data: _Collected, truth: Truth, scored: list[int], n_scenarios: int) -> _Linkable:
    """Linkable pairs, overall and per scenario, how many are joined, and who is split across a chain.

    Union-find over each person's own messages, joined where two of them share an identifier.
    """
    person, scenario, cluster = truth.person, truth.scenario, data.cluster
    parent = array("i", range(len(truth)))
    first_with: dict[tuple[int, int], int] = {}
    for index in scored:
        p = person[index]
        for identifier in data.identifiers(index):
            key = (p, identifier)
            other = first_with.setdefault(key, index)
            if other != index:
                a, b = _find(parent, index), _find(parent, other)
                if a != b:
                    parent[a] = b
    del first_with
    # A linkable component is one person's; it may still lie in several predicted profiles.
    size: Counter[int] = Counter()
    size_s: Counter[tuple[int, int]] = Counter()
    part: Counter[tuple[int, int]] = Counter()  # (component, profile) → messages
    part_s: Counter[tuple[int, int, int]] = Counter()
    for index in scored:
        root, c, s = _find(parent, index), cluster[index], scenario[index]
        size[root] += 1
        size_s[root, s] += 1
        part[root, c] += 1
        part_s[root, c, s] += 1
    linkable = _Linkable(
        pairs=sum(_pairs(n) for n in size.values()),
        linked=sum(_pairs(n) for n in part.values()),
        pairs_s=[0] * n_scenarios,
        linked_s=[0] * n_scenarios,
        avoidable=set(),
    )
    for (root, s), k in size_s.items():
        linkable.pairs_s[s] += _touching(size[root], k)
    for (root, c, s), k in part_s.items():
        linkable.linked_s[s] += _touching(part[root, c], k)
        if part[root, c] < size[root]:
            linkable.avoidable.add(person[root])
    return linkable


def _bridges(
    data: _Collected, truth: Truth, scored: list[int], over_merged: set[int]
) -> tuple[dict[int, set[int]], dict[int, list[tuple[int, dict[int, int], set[int]]]]]:
    """For each over-merged profile: the scenarios that carried a bridging identifier, and the bridges.

    A bridge is (identifier, messages per person carrying it, scenarios of those messages).
    """
    person, scenario, cluster = truth.person, truth.scenario, data.cluster
    carriers: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index in scored:
        c = cluster[index]
        if c in over_merged:
            for identifier in data.identifiers(index):
                carriers[c, identifier].append(index)
    causes: dict[int, set[int]] = {c: set() for c in over_merged}
    bridges: dict[int, list[tuple[int, dict[int, int], set[int]]]] = defaultdict(list)
    for (c, identifier), indexes in carriers.items():
        by_person = Counter(person[index] for index in indexes)
        if len(by_person) < 2:
            continue
        found = {scenario[index] for index in indexes}
        causes[c] |= found
        bridges[c].append((identifier, dict(by_person), found))
    return causes, bridges


def _over_merge_examples(
    data: _Collected,
    truth: Truth,
    people_in: dict[int, list[tuple[int, int]]],
    bridges: dict[int, list[tuple[int, dict[int, int], set[int]]]],
    limit: int,
) -> tuple[dict[str, Any], ...]:
    worst = sorted(
        (c for c, counts in people_in.items() if len(counts) > 1),
        key=lambda c: (-len(people_in[c]), -sum(n for n, _ in people_in[c]), c),
    )[:limit]
    found = []
    for c in worst:
        counts = sorted(people_in[c], reverse=True)
        found.append(
            {
                "profile": data.cluster_names[c],
                "people": len(counts),
                "messages": sum(n for n, _ in counts),
                "by_person": {truth.people[-p]: n for n, p in counts[:5]},
                "bridging_identifiers": [
                    {
                        "identifier": data.identifier_names[identifier],
                        "people": len(by_person),
                        "scenarios": sorted(truth.scenarios[s] for s in scenarios),
                    }
                    for identifier, by_person, scenarios in sorted(
                        bridges.get(c, []), key=lambda bridge: (-len(bridge[1]), bridge[0])
                    )[:5]
                ],
            }
        )
    return tuple(found)


def _split_examples(
    data: _Collected,
    truth: Truth,
    scored: list[int],
    profiles_of: dict[int, list[tuple[int, int]]],
    avoidable: set[int],
    limit: int,
) -> tuple[dict[str, Any], ...]:
    # The avoidable splits first (the engine's to fix), the most scattered first.
    chosen = sorted(
        (p for p, counts in profiles_of.items() if len(counts) > 1),
        key=lambda p: (p not in avoidable, -len(profiles_of[p]), p),
    )[:limit]
    wanted = set(chosen)
    scenarios: dict[tuple[int, int], Counter[str]] = defaultdict(Counter)
    for index in scored:
        p = truth.person[index]
        if p in wanted:
            scenarios[p, data.cluster[index]][truth.scenarios[truth.scenario[index]]] += 1
    found = []
    for p in chosen:
        counts = sorted(profiles_of[p], reverse=True)
        found.append(
            {
                "person": truth.people[p],
                "avoidable": p in avoidable,
                "profiles": [
                    {
                        "profile": data.cluster_names[-c],
                        "messages": n,
                        "scenarios": dict(sorted(scenarios[p, -c].items())),
                    }
                    for n, c in counts[:5]
                ],
            }
        )
    return tuple(found)
