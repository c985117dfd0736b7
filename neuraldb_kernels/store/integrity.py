"""Per-fact integrity of a database: the fact checksum, and the checks every fact read from the
files passes before it reaches memory (column types, slot ranges, key thresholds, metadata a JSON
object, checksum, finite values, key norms). The files are untrusted input: whoever wrote them, a
fact that fails is refused by its id. Format 3 rows (vector BLOBs in SQLite) are checked by the
`version3_*` functions when they are migrated.
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
from .vectors import VectorFile


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
    """The checksum of a format-3 row: CRC-32 (zlib's) of a fact row, as 4 little-endian bytes, over the id, key BLOB, residual
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


def version3_row_problem(row: tuple, d1: int, d2: int, itemsize: int) -> str | None:
    """Why a format-3 (id, rev, key, residual, metadata, checksum, key_gammas) row read from the file is
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


def fact_header(fact_id: str, metadata: str, key_gammas: bytes | None) -> bytes:
    """The SQLite parts of a fact as its checksum covers them: the UTF-8 id, the UTF-8 metadata text
    and the key_gammas BLOB (no bytes when NULL), each preceded by its length in bytes in ASCII
    decimal and a colon (`schema.FACT_HEADER_SQL` builds the same bytes in SQLite)."""
    parts = (fact_id.encode("utf-8"), metadata.encode("utf-8"), key_gammas or b"")
    return b"".join(b"%d:%s" % (len(part), part) for part in parts)


def fact_checksum(fact_id: str, metadata: str, key_gammas: bytes | None, slots: bytes | memoryview) -> bytes:
    """The checksum of a format-4 fact: CRC-32 (zlib's) as 4 little-endian bytes over its
    `fact_header` followed by the bytes of its slots in the vector file. It detects damage (bit
    flips, truncation, a row pointing at other slots), not forgery."""
    return struct.pack("<I", zlib.crc32(slots, zlib.crc32(fact_header(fact_id, metadata, key_gammas))))


def row_problem(row: tuple, vector_slots: int, metadata_is_object: bool = False) -> str | None:
    """Why a format-4 (id, rev, slot, key_count, key_gammas, metadata, checksum) row is corrupt,
    judged on the row alone (column types, slots within the `vector_slots` in use, key thresholds,
    metadata a JSON object, the latter skipped when `metadata_is_object` was established already);
    None if it is fine. The checksum and vector values need the slots (`verified_fact`)."""
    fact_id, rev, slot, key_count, key_gammas, metadata, checksum = row
    if (not isinstance(fact_id, str) or any(isinstance(value, bool) or not isinstance(value, int)
                                            for value in (rev, slot, key_count))
            or not isinstance(metadata, str) or not isinstance(checksum, bytes) or len(checksum) != 4):
        return (f"fact {fact_id!r} has columns of the wrong types (id, rev, slot, key_count, metadata, checksum: "
                f"{', '.join(type(value).__name__ for value in (fact_id, rev, slot, key_count, metadata, checksum))})")
    if slot < 0 or key_count < 1 or slot + key_count > vector_slots:
        return (f"fact {fact_id!r} points at slots {slot} to {slot + key_count - 1} of the vector file, outside the "
                f"{vector_slots} slots in use")
    if key_gammas is not None and (not isinstance(key_gammas, bytes) or len(key_gammas) != 4 * key_count):
        return (f"fact {fact_id!r} has a corrupt key_gammas BLOB: {_size(key_gammas)}, expected NULL or 4 bytes per "
                f"key ({key_count} keys)")
    if key_gammas is not None:
        problem = key_gammas_problem(memoryview(key_gammas).cast("f").tolist())  # float32, little-endian
        if problem:
            return f"fact {fact_id!r} {problem}"
    if metadata_is_object:
        return None
    try:
        parsed = json.loads(metadata, parse_constant=_no_constant)
    except (ValueError, RecursionError) as error:
        return f"fact {fact_id!r} has metadata that is not valid JSON ({type(error).__name__})"
    if not isinstance(parsed, dict):
        return f"fact {fact_id!r} has metadata that is a JSON {type(parsed).__name__}, not an object"
    return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # Python reads NaN and Infinity; JSON (and SQLite) do not


def checksum_problem(fact_id: str) -> str:
    """Why a fact whose checksum does not match is refused."""
    return f"fact {fact_id!r} fails its checksum (the files were changed outside NeuralDB, or are damaged)"


def fact_problem(row: tuple, vectors: VectorFile, vector_slots: int) -> tuple[str | None, torch.Tensor | None]:
    """(why the format-4 `row` and its slots are corrupt or None, its (k, d1 + d2) slots when fine)."""
    problem = row_problem(row, vector_slots)
    if problem:
        return problem, None
    fact_id, _, slot, key_count, key_gammas, metadata, checksum = row
    try:
        data = vectors.read_bytes(slot, key_count)
    except CorruptDatabaseError as error:
        return f"fact {fact_id!r}: {error}", None
    if fact_checksum(fact_id, metadata, key_gammas, data) != checksum:
        return checksum_problem(fact_id), None
    slots = vectors.decode(data)
    found = vector_rows_problem(slots[:, : vectors.d1], slots[:, vectors.d1 :], [fact_id] * key_count)
    return (None, slots) if found is None else (found[1], None)


def verified_fact(row: tuple, vectors: VectorFile, vector_slots: int,
                  where: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The (k, d1) keys, (1, d2) residual and (k,) float32 key thresholds (None when NULL) of one
    format-4 row; CorruptDatabaseError naming `where` and the fact if it fails any check."""
    problem, slots = fact_problem(row, vectors, vector_slots)
    if problem is not None:
        raise CorruptDatabaseError(f"{where}: {problem}")
    return slots[:, : vectors.d1], slots[:1, vectors.d1 :], decode_key_gammas(row[4])


def verify_rows(rows: Iterable[tuple], vectors: VectorFile, vector_slots: int) -> IntegrityReport:
    """Check format-4 rows as `open` does, collecting every failing fact's id instead of stopping
    at the first."""
    checked, corrupt = 0, []
    for row in rows:
        checked += 1
        if fact_problem(row, vectors, vector_slots)[0] is not None:
            corrupt.append(row[0])
    return IntegrityReport(checked, tuple(corrupt))
