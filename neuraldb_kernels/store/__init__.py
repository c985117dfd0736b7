"""The neural KV database: facts (id, key, residual, metadata) stored durably in SQLite and its
vector file, with live (K, R) views for `gated_retrieve`. See `database.py` for the semantics and
FORMAT.md for the file format."""

from .database import NeuralDB, SearchHit, Snapshot
from .facts import StoredFact
from .fingerprint import FingerprintMismatchWarning, ModelFingerprint
from .integrity import IntegrityReport
from .schema import FORMAT_VERSION, CorruptDatabaseError, DatabaseUnavailableError
from .view import KeyRowsListener

__all__ = ["NeuralDB", "StoredFact", "SearchHit", "Snapshot", "ModelFingerprint", "FingerprintMismatchWarning",
           "IntegrityReport", "CorruptDatabaseError", "DatabaseUnavailableError", "FORMAT_VERSION", "KeyRowsListener"]
