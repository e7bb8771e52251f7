"""memvidd's storage engine: single-file, append-only, versioned memory capsules.

Synchronous and self-contained: it never imports trio or memvidd. The public API is what
this module exports; everything else is internal. The file format is specified in
``docs/format.md`` and ``engine/format.py``.
"""

from .capsule import Capsule, Frame, FrameInfo, create, open
from .crypto import KdfParams, read_passphrase
from .embed import DEFAULT_MODEL, MODELS, Embedder, ModelError
from .errors import (
    Cancelled,
    CapsuleBroken,
    CapsuleClosed,
    CapsuleExists,
    CapsuleLocked,
    CorruptionError,
    EngineError,
    FormatVersionError,
    InvalidArgument,
    NotACapsule,
    NotFound,
    ReadOnlyError,
    StorageError,
    UnsafeDirectory,
    WrongPassphrase,
)
from .fileio import private_dir
from .format import READ_VERSION, WRITE_VERSION
from .keymap import KeyMap, halves
from .query import Hit, Hits
from .verify import Report, doctor, verify

__all__ = [
    "DEFAULT_MODEL", "MODELS", "Embedder", "Hit", "Hits", "ModelError",
    "READ_VERSION", "WRITE_VERSION", "Capsule", "CapsuleBroken", "CapsuleClosed",
    "CapsuleExists", "CapsuleLocked", "CorruptionError", "EngineError", "FormatVersionError",
    "Frame", "FrameInfo", "InvalidArgument", "NotACapsule", "NotFound", "ReadOnlyError",
    "Report", "StorageError", "create", "doctor", "open", "verify", "KdfParams", "WrongPassphrase",
    "read_passphrase", "Cancelled", "KeyMap", "halves", "UnsafeDirectory", "private_dir",
]
