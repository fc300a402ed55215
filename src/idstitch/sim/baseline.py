"""The naive baseline: any two messages that share any identifier are one person (union-find, no rules).

No priorities, limits, blocked values, suspect detection or merge protection: what a hand-rolled
"join on every id" pipeline does. It links on whatever it is given; `idstitch accuracy` gives it every
identifier the engine read out of each message (SPEC §2 extraction with its normalisation, so e.g.
emails are compared case-folded), *including* the values the rules block, such as a junk anonymousId
"null". It therefore differs from idstitch only in the rules, not in what it can see.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

__all__ = ["NaiveBaseline", "naive_clusters"]


class NaiveBaseline:
    """Union-find over identifier strings: `add` every message's identifiers, then ask for clusters."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._parent = array("i")

    def _node(self, identifier: str) -> int:
        node = self._ids.get(identifier)
        if node is None:
            node = self._ids[identifier] = len(self._names)
            self._names.append(identifier)
            self._parent.append(node)
        return node

    def _find(self, node: int) -> int:
        parent = self._parent
        while parent[node] != node:
            parent[node] = parent[parent[node]]  # path halving keeps the trees flat
            node = parent[node]
        return node

    def add(self, identifiers: Iterable[str]) -> None:
        """Join every identifier of one message (and so everything they were joined to before)."""
        first = -1
        for identifier in identifiers:
            node = self._find(self._node(identifier))
            if first < 0:
                first = node
            elif node != first:
                # The smaller id becomes the root, so labels do not depend on union order.
                low, high = min(first, node), max(first, node)
                self._parent[high] = low
                first = low

    def cluster(self, identifiers: Iterable[str]) -> str | None:
        """The cluster of a message added before: its root identifier (None when it carries none)."""
        for identifier in identifiers:
            node = self._ids.get(identifier)
            if node is None:
                raise KeyError(f"{identifier} was never added")
            return self._names[self._find(node)]
        return None

    @property
    def identifiers(self) -> int:
        """How many distinct identifiers were added."""
        return len(self._names)


def naive_clusters(messages: Iterable[tuple[str, Iterable[str]]]) -> dict[str, str | None]:
    """messageId → naive cluster for (messageId, identifiers) pairs (None: no identifier at all)."""
    listed = [(message_id, tuple(identifiers)) for message_id, identifiers in messages]
    baseline = NaiveBaseline()
    for _, identifiers in listed:
        baseline.add(identifiers)
    return {message_id: baseline.cluster(identifiers) for message_id, identifiers in listed}
