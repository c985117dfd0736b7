"""The vector file of a format-4 NeuralDB (FORMAT.md, "Vector file"): `<database>-vectors` beside
the SQLite file, a 64-byte header and then an array of fixed-size slots. A slot holds one key row
(d1 values) followed by its fact's residual (d2 values), in the storage dtype, little-endian; a fact
with k keys owns k consecutive slots. SQLite rows point into the file (`slot`, `key_count`).

Crash safety: a write appends slots at `meta.vector_slots` (the end of the slots committed rows may
use) and syncs them before the SQLite transaction that references them commits; a crash in between
leaves unreferenced slots past `vector_slots`, which the next write overwrites. Slots are never
rewritten while a committed row points at them, so readers in other processes read committed slots
without locks. Deleted and replaced facts leave their slots behind until the database is compacted
into a copy (`NeuralDB.save`).
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
from pathlib import Path
import torch

from .schema import STORAGE_DTYPES, VECTORS_SUFFIX, CorruptDatabaseError, DatabaseUnavailableError

MAGIC = b"NDBVECS\x00"
FILE_VERSION = 1  # of the vector file's own layout
HEADER_BYTES = 64  # a multiple of every storage dtype's size: slot values stay aligned
_HEADER = struct.Struct("<8sIIII16s")  # magic, file version, d1, d2, dtype code, vectors_id (16 bytes); zero padding
DTYPE_CODES = {"float32": 1, "float16": 2, "bfloat16": 3}
COPY_BYTES = 64 << 20  # bytes read at a time when slots are copied into another file


def vectors_path(path: str | os.PathLike) -> Path:
    """The vector file of the database file at `path`."""
    return Path(f"{os.fspath(path)}{VECTORS_SUFFIX}")


def new_vectors_id() -> str:
    """A fresh id binding a vector file to its database (32 lowercase hex digits)."""
    return uuid.uuid4().hex


def fact_slots(keys: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The (k, d1 + d2) slots of a fact with (k, d1) keys and a (d2,) or (1, d2) residual."""
    return torch.cat([keys, residual.reshape(1, -1).expand(keys.shape[0], -1)], dim=1)


class VectorFile:
    """An open vector file: `read` and `write` of slots by index, `mapped` for bulk reads.

    d1, d2: key and residual sizes; dtype: the storage dtype; slot_bytes: bytes per slot.
    Not thread-safe by itself: the owning NeuralDB serialises calls.
    """

    def __init__(self, fd: int, where: str, d1: int, d2: int, dtype_name: str):
        self._fd = fd
        self.where = where
        self.d1, self.d2 = d1, d2
        self.dtype = STORAGE_DTYPES[dtype_name]
        self.slot_bytes = (d1 + d2) * torch.empty(0, dtype=self.dtype).element_size()

    @classmethod
    def create(cls, path: Path | None, *, d1: int, d2: int, dtype_name: str, vectors_id: str) -> "VectorFile":
        """A new, empty vector file at `path` (FileExistsError if one is there), or in memory for
        None; its header written and synced."""
        if path is None:
            fd = os.memfd_create("neuraldb-vectors", os.MFD_CLOEXEC)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        vectors = cls(fd, "memory" if path is None else os.fspath(path), d1, d2, dtype_name)
        try:
            header = _HEADER.pack(MAGIC, FILE_VERSION, d1, d2, DTYPE_CODES[dtype_name], bytes.fromhex(vectors_id))
            vectors._write_at(0, header.ljust(HEADER_BYTES, b"\0"))
            vectors._sync()
        except BaseException:
            vectors.close()
            if path is not None:
                path.unlink(missing_ok=True)
            raise
        return vectors

    @classmethod
    def open(cls, path: Path, *, d1: int, d2: int, dtype_name: str, vectors_id: str, readonly: bool,
             database: str) -> "VectorFile":
        """Open the vector file of the database `database` and check that its header names that
        database's vectors_id and settings; CorruptDatabaseError if it is missing or another file."""
        try:
            fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise CorruptDatabaseError(f"{database}: its vector file {path} is missing (a NeuralDB is the database "
                                       f"file and its '{VECTORS_SUFFIX}' file: copy and move them together, or "
                                       f"copy with NeuralDB.save)") from None
        vectors = cls(fd, os.fspath(path), d1, d2, dtype_name)
        try:
            expected = _HEADER.pack(MAGIC, FILE_VERSION, d1, d2, DTYPE_CODES[dtype_name], bytes.fromhex(vectors_id))
            if os.pread(fd, HEADER_BYTES, 0) != expected.ljust(HEADER_BYTES, b"\0"):
                raise CorruptDatabaseError(f"{database}: {path} is not its vector file (the header does not name "
                                           f"this database: another database's file, or a damaged one)")
        except BaseException:
            vectors.close()
            raise
        return vectors

    def _write_at(self, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
        except OSError as error:
            full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
            raise DatabaseUnavailableError(f"{self.where}: writing vectors failed: {error.strerror}{full}") from error

    def write(self, slot: int, slots: torch.Tensor) -> None:
        """Write the (n, d1 + d2) `slots` (storage dtype, CPU) from slot index `slot` on and sync
        them to disk (fdatasync) before returning."""
        data = slots.contiguous().view(torch.uint8).numpy()
        self._write_at(HEADER_BYTES + slot * self.slot_bytes, data.data)
        self._sync()

    def _sync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as error:
            raise DatabaseUnavailableError(f"{self.where}: syncing vectors to disk failed: {error.strerror}") from error

    def read_bytes(self, slot: int, count: int) -> bytes:
        """The raw bytes of `count` slots from `slot` on; CorruptDatabaseError if the file ends first."""
        size = count * self.slot_bytes
        data = os.pread(self._fd, size, HEADER_BYTES + slot * self.slot_bytes)
        if len(data) != size:
            raise CorruptDatabaseError(f"{self.where} is truncated: slots {slot} to {slot + count - 1} are missing")
        return data

    def read_into(self, slot: int, count: int, buffer: memoryview) -> None:
        """Fill `buffer` (count slots' bytes) with the slots from `slot` on; CorruptDatabaseError
        if the file ends first."""
        if os.preadv(self._fd, [buffer], HEADER_BYTES + slot * self.slot_bytes) != count * self.slot_bytes:
            raise CorruptDatabaseError(f"{self.where} is truncated: slots {slot} to {slot + count - 1} are missing")

    def decode(self, data: bytes) -> torch.Tensor:
        """The (n, d1 + d2) slots held by `data` (raw bytes of whole slots)."""
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(self.dtype).reshape(-1, self.d1 + self.d2)

    def slot_count(self) -> int:
        """The number of whole slots the file holds now (committed or not)."""
        return max(0, os.fstat(self._fd).st_size - HEADER_BYTES) // self.slot_bytes

    def copy_to(self, target: "VectorFile", runs: list[tuple[int, int]]) -> None:
        """Append the slot runs [(first slot, count), ...] of this file, in turn, to the empty file
        `target` from its slot 0 on, and sync it."""
        offset, step = HEADER_BYTES, max(1, COPY_BYTES // self.slot_bytes)
        for first, count in runs:
            for start in range(first, first + count, step):
                data = self.read_bytes(start, min(step, first + count - start))
                target._write_at(offset, data)
                offset += len(data)
        target._sync()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
