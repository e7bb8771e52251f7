"""How a capsule begins: its header, its genesis checkpoint, and unlocking its key slot.

``new_header`` makes a new capsule's (or a rewrite's) header and first record; the
genesis checkpoint binds the embedding model and a branch's origin for good [F-02];
``unlock`` gives an encrypted capsule's file its sealer [F-19].
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from . import crypto
from . import format as fmt
from .embed import MODELS
from .errors import InvalidArgument
from .fileio import CapsuleFile


def new_header(
    capsule_id: bytes, extra: dict[str, Any], passphrase: str | bytes | None, kdf: crypto.KdfParams | None,
) -> tuple[fmt.Header, crypto.Sealer | None, bytes]:
    """A new capsule's header, its sealer (encrypted capsules), and its genesis record."""
    keyslot, sealer = b"", None
    if passphrase is not None:
        slot, data_key = crypto.new_keyslot(passphrase, capsule_id, kdf)
        keyslot, sealer = crypto.encode_keyslot(slot), crypto.Sealer(data_key, capsule_id)
    first = genesis(capsule_id, extra, sealer)
    header = fmt.Header(1, capsule_id, time.time(), fmt.LOG_START, len(first),
                        flags=fmt.HEADER_ENCRYPTED if sealer else 0, keyslot=keyslot)
    return header, sealer, first


def unlock(f: CapsuleFile, header: fmt.Header, passphrase: str | bytes | None) -> None:
    """Give ``f`` the sealer of an encrypted capsule [F-19] (``WrongPassphrase`` if the
    passphrase does not open its key slot)."""
    if header.flags & fmt.HEADER_ENCRYPTED:
        if passphrase is None:
            raise InvalidArgument(f"{f.path} is encrypted: open it with its passphrase")
        data_key = crypto.unlock(crypto.decode_keyslot(header.keyslot), passphrase, header.capsule_id)
        f.sealer = crypto.Sealer(data_key, header.capsule_id)
    elif passphrase is not None:
        raise InvalidArgument(f"{f.path} is not encrypted: open it without a passphrase")


def vec_binding(model: str) -> dict[str, Any]:
    return {"model": model, "dim": MODELS[model].dim}


def genesis_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """What a genesis checkpoint holds of a later checkpoint's ``extra``: the model
    binding and a branch's origin; the rest is rebuilt from the records (compaction,
    branches, doctor)."""
    out: dict[str, Any] = {}
    if "vec" in extra:
        out["vec"] = {"model": extra["vec"]["model"], "dim": extra["vec"]["dim"]}
    if "origin" in extra:
        out["origin"] = extra["origin"]
    return out


def genesis(capsule_id: bytes, extra: dict[str, Any], sealer: fmt.Sealing | None = None) -> bytes:
    """The first record of every capsule: the empty checkpoint at LOG_START [F-02].

    It binds the embedding model (``extra["vec"]``) for good, and a branch's origin;
    every later checkpoint carries them forward.
    """
    return fmt.meta_record(fmt.CHECKPOINT, fmt.CheckpointRecord(capsule_id, 0, 0, 0, [], {}, extra),
                           sealer=sealer, offset=fmt.LOG_START)
