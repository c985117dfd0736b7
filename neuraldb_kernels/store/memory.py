"""The in-memory side of a NeuralDB: the id <-> row map (rows.py) and the views (view.py), changed
together and only with changes already committed to the file, plus the version counter that
snapshots carry. Not thread-safe by itself: NeuralDB serialises calls under its lock.
"""

from __future__ import annotations

import torch

from .rows import RowMap
from .sync import Loaded
from .view import ViewBuffers, ViewSet


def row_gammas(fact_keys: list[torch.Tensor], key_gammas: list[torch.Tensor | None]) -> torch.Tensor:
    """The float32 threshold of every key row of these facts, in turn (NaN: the database's gamma)."""
    return torch.cat([torch.full((len(keys),), float("nan")) if gammas is None else gammas.to(torch.float32)
                      for keys, gammas in zip(fact_keys, key_gammas)]) if fact_keys else torch.empty(0)


class LiveFacts:
    """Rows and views of the facts in memory; row i of every view is a key row of fact `rows.ids[i]`.
    `with_key_gammas`: the ids of the facts that have thresholds of their own."""

    def __init__(self, loaded: Loaded, dtype: torch.dtype, gamma: float):
        self.rows = RowMap(loaded.row_ids, loaded.revs)
        defaults = torch.isnan(loaded.key_gammas)
        gammas = torch.where(defaults, torch.tensor(gamma, dtype=torch.float32), loaded.key_gammas)
        self.views = ViewSet(ViewBuffers(loaded.keys, loaded.residuals, gammas, defaults, loaded.count), dtype, gamma)
        self.with_key_gammas = set(loaded.with_key_gammas)
        self.version = 0  # +1 per applied change

    def __contains__(self, fact_id: object) -> bool:
        return fact_id in self.rows.rows_of

    def reserve(self, ids: list[str], fact_keys: list[torch.Tensor]) -> None:
        """Make room in every view for writing these facts, before committing them, so that
        applying the commit cannot fail on memory."""
        self.views.reserve(self.rows.rows_to_append(ids, [len(keys) for keys in fact_keys]))

    def _note_key_gammas(self, ids: list[str], key_gammas: list[torch.Tensor | None]) -> None:
        for fact_id, gammas in zip(ids, key_gammas):
            if gammas is None:
                self.with_key_gammas.discard(fact_id)
            else:
                self.with_key_gammas.add(fact_id)

    def append(self, ids: list[str], revs: list[int], fact_keys: list[torch.Tensor], residuals: torch.Tensor,
               key_gammas: list[torch.Tensor | None]) -> None:
        """Append new facts: fact i's (k_i, d1) keys as k_i rows, each with residuals[i] ((n, d2)),
        and its (k_i,) thresholds `key_gammas[i]` (None: the database's gamma)."""
        if not ids:
            return
        counts = [len(keys) for keys in fact_keys]
        self.rows.append(ids, revs, counts)
        self.views.append(torch.cat(fact_keys), residuals.repeat_interleave(torch.tensor(counts), dim=0),
                          row_gammas(fact_keys, key_gammas))
        self._note_key_gammas(ids, key_gammas)
        self.version += 1

    def write(self, ids: list[str], revs: list[int], fact_keys: list[torch.Tensor], residuals: torch.Tensor,
              key_gammas: list[torch.Tensor | None]) -> None:
        """Apply written facts: new ones are appended, stored ones replaced in place where their
        number of keys is unchanged, else removed and appended anew."""
        new = [i for i, fact_id in enumerate(ids) if fact_id not in self]
        stored = [i for i, fact_id in enumerate(ids) if fact_id in self]
        same, moved = self.rows.split_overwrite([ids[i] for i in stored], [len(fact_keys[i]) for i in stored])
        same, moved = [stored[i] for i in same], [stored[i] for i in moved]
        if same:
            counts = torch.tensor([len(fact_keys[i]) for i in same])
            self.views.overwrite(self.rows.rows([ids[i] for i in same]), torch.cat([fact_keys[i] for i in same]),
                                 residuals[same].repeat_interleave(counts, dim=0),
                                 row_gammas([fact_keys[i] for i in same], [key_gammas[i] for i in same]))
            self.rows.rev_of.update((ids[i], revs[i]) for i in same)
            self._note_key_gammas([ids[i] for i in same], [key_gammas[i] for i in same])
            self.version += 1
        self.remove([ids[i] for i in moved])
        appended = moved + new
        self.append([ids[i] for i in appended], [revs[i] for i in appended], [fact_keys[i] for i in appended],
                    residuals[appended], [key_gammas[i] for i in appended])

    def remove(self, ids: list[str]) -> None:
        """Swap-remove the facts' rows from the row map and every view."""
        if not ids:
            return
        self.views.move_and_truncate(*self.rows.remove(ids))
        self.with_key_gammas.difference_update(ids)
        self.version += 1

    def set_default_gamma(self, gamma: float) -> None:
        """The database's gamma changed: the rows without thresholds of their own take it."""
        if gamma != self.views.gamma:
            self.views.set_default_gamma(gamma)
            self.version += 1

    def export_rows(self) -> tuple[list[str], list[list[int]]]:
        """The fact ids in row-map order and each fact's view rows, its own key's first."""
        ids = list(self.rows.rows_of)
        return ids, [list(self.rows.rows_of[fact_id]) for fact_id in ids]
