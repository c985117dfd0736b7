"""The id <-> view-row bookkeeping of a NeuralDB: which fact each view row belongs to, each fact's
rows (its own key's first) and revision, and the swap-remove that keeps the rows dense.

Row i of every view is a key row of fact `ids[i]`. Snapshots share the `ids` list: it is copied
before an in-place rewrite while a snapshot holding it is alive (appends only extend it past every
snapshot's row count, which needs no copy). Not thread-safe by itself: NeuralDB serialises calls.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import torch


def ids_at(ids: list[str], count: int, indices: torch.Tensor | Sequence[int]) -> list[str | None]:
    """Fact ids of rows `indices` of a view of `count` rows whose row -> id list is `ids`; None for -1."""
    values = indices.flatten().tolist() if isinstance(indices, torch.Tensor) else list(indices)
    out: list[str | None] = []
    for index in values:
        if index == -1:
            out.append(None)
        elif isinstance(index, int) and 0 <= index < count:
            out.append(ids[index])
        else:
            raise IndexError(f"row index {index!r} out of range for a view of {count} rows (or -1)")
    return out


class RowMap:
    """Fact id <-> view rows, and each fact's revision (the `rev` of its row in the file)."""

    def __init__(self, row_ids: list[str], revs: dict[str, int]):
        """Adopt the fact id of every row (a fact's rows in key order) and {fact id: rev}."""
        self.ids = row_ids
        self.rev_of = revs
        if len(revs) == len(row_ids):  # one key per fact: one comprehension, a million facts in a blink
            self.rows_of: dict[str, list[int]] = {fact_id: [row] for row, fact_id in enumerate(row_ids)}
        else:
            self.rows_of = {}
            for row, fact_id in enumerate(row_ids):
                self.rows_of.setdefault(fact_id, []).append(row)
        self._readers: weakref.WeakSet[Any] = weakref.WeakSet()  # live snapshots sharing self.ids

    def __len__(self) -> int:
        """The number of facts."""
        return len(self.rows_of)

    @property
    def row_count(self) -> int:
        return len(self.ids)

    def share_ids(self, reader: Any) -> list[str]:
        """The row -> id list, registered as read by `reader` (a snapshot) while it lives."""
        self._readers.add(reader)
        return self.ids

    def rows_to_append(self, ids: list[str], key_counts: list[int]) -> int:
        """The view rows that writing facts with these key counts appends: new facts, and replaced
        facts whose number of keys changes (`split_overwrite` moves those)."""
        return sum(count for fact_id, count in zip(ids, key_counts) if len(self.rows_of.get(fact_id, ())) != count)

    def append(self, ids: list[str], revs: list[int], key_counts: list[int]) -> None:
        """Give new facts rows at the end, fact i `key_counts[i]` of them."""
        for fact_id, rev, count in zip(ids, revs, key_counts):
            start = len(self.ids)
            self.rows_of[fact_id] = list(range(start, start + count))
            self.ids += [fact_id] * count  # rows beyond every snapshot's count: no copy needed
            self.rev_of[fact_id] = rev

    def split_overwrite(self, ids: list[str], key_counts: list[int]) -> tuple[list[int], list[int]]:
        """(positions whose fact keeps its number of keys, hence its rows; the other positions)."""
        same = [i for i, fact_id in enumerate(ids) if len(self.rows_of[fact_id]) == key_counts[i]]
        kept = set(same)
        return same, [i for i in range(len(ids)) if i not in kept]

    def rows(self, ids: list[str]) -> torch.Tensor:
        """int64 view rows of the facts `ids`, each fact's in key order."""
        return torch.tensor([row for fact_id in ids for row in self.rows_of[fact_id]], dtype=torch.int64)

    def remove(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Forget facts by swap-remove: the surviving rows at the end move into the holes of the
        removed rows below the new count. Returns (source rows, target rows, new row count) for the
        views to apply the same moves."""
        if len(self._readers):  # a live snapshot shares the list: rewrite a copy
            self.ids = list(self.ids)
            self._readers = weakref.WeakSet()
        removed = set()
        for fact_id in ids:
            removed.update(self.rows_of.pop(fact_id))
            del self.rev_of[fact_id]
        count = len(self.ids) - len(removed)
        holes = sorted(row for row in removed if row < count)
        movers = [row for row in range(count, len(self.ids)) if row not in removed]
        for hole, mover in zip(holes, movers):
            fact_id = self.ids[mover]
            self.ids[hole] = fact_id
            rows = self.rows_of[fact_id]
            rows[rows.index(mover)] = hole
        del self.ids[count:]
        return torch.tensor(movers, dtype=torch.int64), torch.tensor(holes, dtype=torch.int64), count
