"""Per-fact integrity of a database file: the row checksum, and the checks every fact row read
from a file passes before it reaches memory (column types, vector BLOB lengths, checksum, metadata
a JSON object, finite values, key norms). A file is untrusted input: whoever wrote it, a row that
fails is refused by the fact's id.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zlib
from collections.abc import Iterable

import torch

from .facts import key_gammas_problem, vector_problem
from .schema import CorruptDatabaseError


@dataclasses.dataclass(frozen=True)
class IntegrityReport:
    """Result of `NeuralDB.verify`: how many fact rows were checked, and the ids of those that fail
    a check (column types, BLOB lengths, checksum, metadata, non-finite values, key norms), in
    insertion order."""

    checked: int
    corrupt: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.corrupt


def row_checksum(fact_id: str, key: bytes, residual: bytes, metadata: str, key_gammas: bytes | None) -> bytes:
    """CRC-32 (zlib's) of a fact row, as 4 little-endian bytes, over the id, key BLOB, residual
    BLOB, metadata text and key_gammas BLOB (no bytes when NULL), each preceded by its length in
    bytes (8-byte little-endian). It detects damage (bit flips, truncation, torn pages), not
    forgery: no unkeyed checksum can."""
    crc = 0
    for part in (fact_id.encode("utf-8"), key, residual, metadata.encode("utf-8"), key_gammas or b""):
        crc = zlib.crc32(part, zlib.crc32(struct.pack("<Q", len(part)), crc))
    return struct.pack("<I", crc)


def decode_key_gammas(blob: bytes | None) -> torch.Tensor | None:
    """The (k,) float32 thresholds of a key_gammas BLOB whose length fits, or None for NULL."""
    return None if blob is None else torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(torch.float32)


def stored_problem(row: tuple, d1: int, d2: int, itemsize: int) -> str | None:
    """Why a (id, rev, key, residual, metadata, checksum, key_gammas) row read from the file is
    corrupt, judged on its bytes and key thresholds (everything but the vector values, see
    `vector_rows_problem`); None if it is fine."""
    fact_id, rev, key, residual, metadata, checksum, key_gammas = row
    if not isinstance(fact_id, str) or isinstance(rev, bool) or not isinstance(rev, int) or not isinstance(
            metadata, str) or not isinstance(key, bytes) or not isinstance(residual, bytes):
        return (f"fact {fact_id!r} has columns of the wrong types (id, rev, key, residual, metadata: "
                f"{', '.join(type(value).__name__ for value in row[:5])})")
    if not key or len(key) % (d1 * itemsize) or len(residual) != d2 * itemsize:
        return (f"corrupt vector BLOBs of fact {fact_id!r}: {len(key)} and {len(residual)} bytes, expected a "
                f"positive multiple of {d1 * itemsize} and {d2 * itemsize}")
    if key_gammas is not None and (not isinstance(key_gammas, bytes)
                                   or len(key_gammas) * d1 * itemsize != len(key) * 4):
        return (f"fact {fact_id!r} has a corrupt key_gammas BLOB: {_size(key_gammas)}, expected NULL or 4 bytes per "
                f"key ({len(key) // (d1 * itemsize)} keys)")
    if checksum != row_checksum(fact_id, key, residual, metadata, key_gammas):
        return f"fact {fact_id!r} fails its checksum (the row was changed outside NeuralDB, or the file is damaged)"
    if key_gammas is not None:
        problem = key_gammas_problem(memoryview(key_gammas).cast("f").tolist())  # float32, little-endian
        if problem:
            return f"fact {fact_id!r} {problem}"
    try:
        parsed = json.loads(metadata)
    except (ValueError, RecursionError) as error:
        return f"fact {fact_id!r} has metadata that is not valid JSON ({type(error).__name__})"
    if not isinstance(parsed, dict):
        return f"fact {fact_id!r} has metadata that is a JSON {type(parsed).__name__}, not an object"
    return None


def _size(blob: object) -> str:
    return f"{len(blob)} bytes" if isinstance(blob, bytes) else f"a {type(blob).__name__}"


def vector_rows_problem(keys: torch.Tensor, residuals: torch.Tensor, row_ids: list[str]) -> tuple[str, str] | None:
    """(fact id, why) for the first bad row of (r, d1) keys and (r, d2) residuals in the storage
    dtype, row i belonging to fact `row_ids[i]`; None if every row is fine (see `facts.vector_problem`)."""
    for name, rows, is_key in (("key", keys, True), ("residual", residuals, False)):
        problem = vector_problem(rows, keys=is_key)
        if problem:
            return row_ids[problem[0]], f"fact {row_ids[problem[0]]!r} has a {name} that {problem[1]}"
    return None


def decode_vectors(blob: bytes, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(len(blob) / (width values), width) tensor of `dtype` from a BLOB whose length fits."""
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).view(dtype).reshape(-1, width)


def verified_vectors(row: tuple, d1: int, d2: int, dtype: torch.dtype,
                     where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The (k, d1) keys, (1, d2) residual and (k,) float32 key thresholds (None when NULL) of one
    row; CorruptDatabaseError naming `where` and the fact if the row fails any check."""
    problem = stored_problem(row, d1, d2, torch.empty(0, dtype=dtype).element_size())
    if problem is None:
        keys, residual = decode_vectors(row[2], d1, dtype), decode_vectors(row[3], d2, dtype)
        found = vector_rows_problem(keys, residual.expand(keys.shape[0], -1), [row[0]] * keys.shape[0])
        if found is None:
            return keys, residual, decode_key_gammas(row[6])
        problem = found[1]
    raise CorruptDatabaseError(f"{where}: {problem}")


def verify_rows(rows: Iterable[tuple], d1: int, d2: int, dtype: torch.dtype) -> IntegrityReport:
    """Check (id, rev, key, residual, metadata, checksum, key_gammas) rows as `open` does, collecting every
    failing fact's id instead of stopping at the first."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    checked, corrupt = 0, []
    for row in rows:
        checked += 1
        problem = stored_problem(row, d1, d2, itemsize)
        if problem is None:
            keys = decode_vectors(row[2], d1, dtype)
            problem = vector_rows_problem(keys, decode_vectors(row[3], d2, dtype), [row[0]] * keys.shape[0])
        if problem is not None:
            corrupt.append(row[0])
    return IntegrityReport(checked, tuple(corrupt))
