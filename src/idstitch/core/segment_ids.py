"""Deterministic segment ids: the same space and creating message always give the same id."""

from __future__ import annotations

import hashlib
from typing import Final

__all__ = ["ACCOUNT_PREFIX", "USER_PREFIX", "collection_of_segment_id", "new_segment_id"]

USER_PREFIX: Final = "use_"
ACCOUNT_PREFIX: Final = "acc_"
_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ALPHABET_SET: Final = frozenset(_ALPHABET)
_LENGTH: Final = 27  # the length of Segment's ids after the prefix (use_4paotyretuj4Ta2bEYQ0vKOq1e7)


def new_segment_id(space: str, message_id: str, collection: str) -> str:
    """The id of a profile created by `message_id` in `space`; no randomness, so replay gives the same id."""
    digest = hashlib.blake2b(f"{space}\x00{collection}\x00{message_id}".encode(), digest_size=20).digest()
    number = int.from_bytes(digest, "big")
    characters = []
    for _ in range(_LENGTH):
        number, remainder = divmod(number, 62)
        characters.append(_ALPHABET[remainder])
    prefix = ACCOUNT_PREFIX if collection == "accounts" else USER_PREFIX
    return prefix + "".join(characters)


def collection_of_segment_id(text: str) -> str | None:
    """`users` / `accounts` when the text looks like a segment id, else None."""
    if len(text) != len(USER_PREFIX) + _LENGTH:
        return None
    # Only letters and digits follow the prefix: `use_ref:` and 23 characters is the identifier it reads as.
    if not _ALPHABET_SET.issuperset(text[len(USER_PREFIX) :]):
        return None
    if text.startswith(USER_PREFIX):
        return "users"
    if text.startswith(ACCOUNT_PREFIX):
        return "accounts"
    return None
