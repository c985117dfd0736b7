"""The in-memory side of a NeuralDB: the id <-> row map (rows.py) and the views (view.py), changed
together and only with changes already committed to the file, plus the version counter that
snapshots carry. Not thread-safe by itself: NeuralDB serialises calls under its lock.
"""

from __future__ import annotations

import torch

from .rows import RowMap
from .sync import Loaded
from .view import ViewBuffers, ViewSet


class LiveFacts:
    """Rows and views of the facts in memory; row i of every view is a key row of fact `rows.ids[i]`."""

    def __init__(self, loaded: Loaded, dtype: torch.dtype):
        self.rows = RowMap(loaded.row_ids, loaded.revs)
        self.views = ViewSet(ViewBuffers(loaded.keys, loaded.residuals, loaded.count), dtype)
        self.version = 0  # +1 per applied change

    def __contains__(self, fact_id: object) -> bool:
        return fact_id in self.rows.rows_of

    def reserve(self, ids: list[str], fact_keys: list[torch.Tensor]) -> None:
        """Make room in every view for writing these facts, before committing them, so that
        applying the commit cannot fail on memory."""
        self.views.reserve(self.rows.rows_to_append(ids, [len(keys) for keys in fact_keys]))

    def append(self, ids: list[str], revs: list[int], fact_keys: list[torch.Tensor], residuals: torch.Tensor) -> None:
        """Append new facts: fact i's (k_i, d1) keys as k_i rows, each with residuals[i] ((n, d2))."""
        if not ids:
            return
        counts = [len(keys) for keys in fact_keys]
        self.rows.append(ids, revs, counts)
        self.views.append(torch.cat(fact_keys), residuals.repeat_interleave(torch.tensor(counts), dim=0))
        self.version += 1

    def write(self, ids: list[str], revs: list[int], fact_keys: list[torch.Tensor], residuals: torch.Tensor) -> None:
        """Apply written facts: new ones are appended, stored ones replaced in place where their
        number of keys is unchanged, else removed and appended anew."""
        new = [i for i, fact_id in enumerate(ids) if fact_id not in self]
        stored = [i for i, fact_id in enumerate(ids) if fact_id in self]
        same, moved = self.rows.split_overwrite([ids[i] for i in stored], [len(fact_keys[i]) for i in stored])
        same, moved = [stored[i] for i in same], [stored[i] for i in moved]
        if same:
            counts = torch.tensor([len(fact_keys[i]) for i in same])
            self.views.overwrite(self.rows.rows([ids[i] for i in same]), torch.cat([fact_keys[i] for i in same]),
                                 residuals[same].repeat_interleave(counts, dim=0))
            self.rows.rev_of.update((ids[i], revs[i]) for i in same)
            self.version += 1
        self.remove([ids[i] for i in moved])
        appended = moved + new
        self.append([ids[i] for i in appended], [revs[i] for i in appended], [fact_keys[i] for i in appended],
                    residuals[appended])

    def remove(self, ids: list[str]) -> None:
        """Swap-remove the facts' rows from the row map and every view."""
        if not ids:
            return
        self.views.move_and_truncate(*self.rows.remove(ids))
        self.version += 1

    def export_rows(self) -> tuple[list[str], list[list[int]]]:
        """The fact ids in row-map order and each fact's view rows, its own key's first."""
        ids = list(self.rows.rows_of)
        return ids, [list(self.rows.rows_of[fact_id]) for fact_id in ids]
