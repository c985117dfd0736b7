"""Which shard owns a fact: a stable function of the fact id alone.

owner(id) = (the first 8 bytes of BLAKE2b(UTF-8 id), read as a little-endian unsigned integer)
mod num_shards. It depends on nothing but the id and the number of shards (not on Python's
per-process salted `hash()`, the insertion order or the machine), so every rank, every run and
the split tool agree on it, and add, upsert and delete of one id always reach the same shard.
"""

from __future__ import annotations

import hashlib

OWNER_FUNCTION = "blake2b-64le-mod"  # recorded in the manifest; a future function gets a new name


def shard_of(fact_id: str, num_shards: int) -> int:
    """The shard (0 <= shard < num_shards) that owns the fact with this id."""
    if not isinstance(fact_id, str) or not fact_id:
        raise TypeError(f"a fact id must be a non-empty str, got {fact_id!r}")
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive int, got {num_shards!r}")
    digest = hashlib.blake2b(fact_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_shards
