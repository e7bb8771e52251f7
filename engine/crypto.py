"""Encrypted capsules (``.mv2e``): passphrase -> key slot -> data key -> sealed record bodies.

This module owns the cryptography and nothing else: no capsule I/O, no policy. A
passphrase derives a key-encryption key (KEK, Argon2id); the KEK wraps the capsule's
random 32-byte data key (AES-256-GCM) in a *key slot* stored in the header slot; the data
key seals every record body (AES-256-GCM). Changing the passphrase (``rekey``) rewrites
only the key slot, never the data.

Key slot, 92 bytes, all integers little-endian::

    offset size field
     0      1   layout version (1)
     1      1   AEAD id (1 = AES-256-GCM)
     2      1   KDF algorithm (1 = Argon2id, version 0x13)
     3      1   KDF lanes (parallelism)
     4      4   KDF memory cost, KiB
     8      4   KDF iterations (passes)
    12     16   KDF salt (random per key slot)
    28     12   wrap nonce (random per key slot)
    40     48   wrapped data key: 32 bytes ciphertext, then the 16-byte GCM tag
    88      4   CRC-32 of bytes 0..87

    wrap AAD = b"memvidd-keyslot-v1\\0" || capsule_id (16) || bytes 0..27 of the key slot

Sealed record body (``OVERHEAD`` = 28 bytes more than the plain body)::

    nonce (12, random per seal) || AES-256-GCM ciphertext || tag (16)

    AAD = b"memvidd-record-v1\\0" || capsule_id (16) || offset (u64) || kind (u8) || flags (u8)

Nonces are random, not derived from the offset: after a torn tail is cut, new records
reuse its offsets, and a repeated (key, nonce) pair breaks GCM. Random 96-bit nonces keep
the collision risk below 2^-32 for up to 2^32 seals per data key (NIST SP 800-38D);
``rekey`` keeps the data key, so that budget is per capsule.

Threat model. Protected: the bodies of all records (payloads, frame metadata, vectors,
index files) against anyone holding the file but not the passphrase; and each record's
integrity and place: a changed, truncated, moved (other offset, kind or flags) or foreign
(other capsule or key) body fails to open. Not protected: record headers (kind, flags,
length, CRC) and the plain header fields stay readable, so torn tails are found and cut
without the key; the file size and every record's size leak (and, with compression, how
compressible the content is); rolling the file back (cutting it at a record boundary,
restoring an old copy, or putting back an uncommitted record that once sat at the same
offset) is not detected here; the passphrase's strength bounds it all; and Python cannot
wipe keys from memory.
"""

from __future__ import annotations

import os
import stat
import struct
import unicodedata
import zlib

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from .errors import CorruptionError, FormatVersionError, InvalidArgument, WrongPassphrase

# The one source of randomness (data keys, salts, nonces); tests replace it to pin known answers.
_random = os.urandom

KEY_SIZE = 32
SALT_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
ID_SIZE = 16  # capsule id

KEYSLOT_VERSION = 1
AEAD_AES256GCM = 1
KDF_ARGON2ID = 1

#   version, aead, kdf algorithm, lanes, memory cost KiB, iterations, salt
_KS_HEAD = struct.Struct("<BBBBII16s")
#   wrap nonce, wrapped data key + tag
_KS_WRAP = struct.Struct(f"<{NONCE_SIZE}s{KEY_SIZE + TAG_SIZE}s")
_CRC = struct.Struct("<I")
KEYSLOT_SIZE = _KS_HEAD.size + _KS_WRAP.size + _CRC.size

_WRAP_LABEL = b"memvidd-keyslot-v1\0"
_RECORD_LABEL = b"memvidd-record-v1\0"
#   capsule id, offset, kind, flags
_RECORD_AAD = struct.Struct("<16sQBB")

# Costs read from a file are bounded: a damaged or hostile key slot must not make an open
# allocate terabytes or run for hours before the passphrase can even be checked.
MAX_MEMORY_KIB = 4 << 20  # 4 GiB
MAX_ITERATIONS = 64
MAX_PASSPHRASE_FILE = 64 << 10


class KdfParams(msgspec.Struct, frozen=True, kw_only=True):
    """Argon2id costs and salt.

    The defaults (64 MiB, 3 passes, 1 lane) take 0.15-0.17 s per derivation on the 2-core
    AMD EPYC this was written on (cryptography 50.0.2, OpenSSL 4.0); the derivation
    releases the GIL. ``salt`` is left empty in templates: ``new_keyslot`` and ``rekey``
    always draw a fresh one.
    """

    algorithm: int = KDF_ARGON2ID
    memory_cost: int = 64 * 1024  # KiB
    iterations: int = 3
    lanes: int = 1
    salt: bytes = b""


class KeySlot(msgspec.Struct, frozen=True):
    """A decoded key slot: the data key wrapped under a passphrase."""

    kdf: KdfParams
    nonce: bytes
    wrapped: bytes  # encrypted data key || GCM tag
    version: int = KEYSLOT_VERSION
    aead: int = AEAD_AES256GCM


def _cost_problem(p: KdfParams) -> str | None:
    if not 1 <= p.lanes <= 255:
        return f"KDF lanes {p.lanes} outside 1..255"
    if not 8 * p.lanes <= p.memory_cost <= MAX_MEMORY_KIB:
        return f"KDF memory cost {p.memory_cost} KiB outside {8 * p.lanes}..{MAX_MEMORY_KIB}"
    if not 1 <= p.iterations <= MAX_ITERATIONS:
        return f"KDF iterations {p.iterations} outside 1..{MAX_ITERATIONS}"
    return None


def _check_id(capsule_id: bytes) -> None:
    if len(capsule_id) != ID_SIZE:
        raise InvalidArgument(f"capsule id must be {ID_SIZE} bytes, not {len(capsule_id)}")


def derive_kek(passphrase: str | bytes, params: KdfParams) -> bytes:
    """The 32-byte key-encryption key of ``passphrase`` under ``params`` (Argon2id).

    A ``str`` is NFC-normalised, then UTF-8 encoded, so the same passphrase typed on
    systems that compose accents differently opens the same capsule.
    """
    if isinstance(passphrase, str):
        passphrase = unicodedata.normalize("NFC", passphrase).encode()
    if not passphrase:
        raise InvalidArgument("empty passphrase")
    if params.algorithm != KDF_ARGON2ID:
        raise InvalidArgument(f"unknown KDF algorithm {params.algorithm}")
    if len(params.salt) != SALT_SIZE:
        raise InvalidArgument(f"KDF salt must be {SALT_SIZE} bytes, not {len(params.salt)}")
    if problem := _cost_problem(params):
        raise InvalidArgument(problem)
    kdf = Argon2id(
        salt=params.salt, length=KEY_SIZE, iterations=params.iterations,
        lanes=params.lanes, memory_cost=params.memory_cost,
    )
    return kdf.derive(passphrase)


def _head(version: int, aead: int, p: KdfParams) -> bytes:
    if len(p.salt) != SALT_SIZE:  # struct would silently pad or cut it
        raise InvalidArgument(f"KDF salt must be {SALT_SIZE} bytes, not {len(p.salt)}")
    return _KS_HEAD.pack(version, aead, p.algorithm, p.lanes, p.memory_cost, p.iterations, p.salt)


def _wrap_aad(capsule_id: bytes, head: bytes) -> bytes:
    # Binding the KDF fields means a key slot edited to other costs fails like a wrong
    # passphrase instead of deriving something else quietly.
    return _WRAP_LABEL + capsule_id + head


def encode_keyslot(ks: KeySlot) -> bytes:
    """The ``KEYSLOT_SIZE`` bytes of ``ks`` (layout in the module docstring)."""
    if len(ks.nonce) != NONCE_SIZE or len(ks.wrapped) != KEY_SIZE + TAG_SIZE:
        raise InvalidArgument("key slot nonce or wrapped key has the wrong length")
    raw = _head(ks.version, ks.aead, ks.kdf) + _KS_WRAP.pack(ks.nonce, ks.wrapped)
    return raw + _CRC.pack(zlib.crc32(raw))


def decode_keyslot(raw: bytes | memoryview) -> KeySlot:
    """Decode the key slot at the start of ``raw`` (bytes after ``KEYSLOT_SIZE`` are ignored).

    ``FormatVersionError`` for a layout version, AEAD or KDF this engine does not know;
    ``CorruptionError`` for a truncated, checksum-failing or out-of-range key slot.
    """
    raw = bytes(raw[:KEYSLOT_SIZE])
    if raw and raw[0] != KEYSLOT_VERSION:  # checked first: another version may be another size
        raise FormatVersionError(
            f"key slot layout version {raw[0]}; this engine reads version {KEYSLOT_VERSION}"
        )
    if len(raw) < KEYSLOT_SIZE:
        raise CorruptionError(f"key slot truncated: {len(raw)} of {KEYSLOT_SIZE} bytes")
    (crc,) = _CRC.unpack_from(raw, KEYSLOT_SIZE - _CRC.size)
    if crc != zlib.crc32(raw[: -_CRC.size]):
        raise CorruptionError("key slot checksum mismatch")
    version, aead, alg, lanes, memory, iterations, salt = _KS_HEAD.unpack_from(raw)
    if aead != AEAD_AES256GCM:
        raise FormatVersionError(f"key slot uses unknown AEAD id {aead}")
    if alg != KDF_ARGON2ID:
        raise FormatVersionError(f"key slot uses unknown KDF algorithm {alg}")
    kdf = KdfParams(algorithm=alg, memory_cost=memory, iterations=iterations, lanes=lanes, salt=salt)
    if problem := _cost_problem(kdf):
        raise CorruptionError(f"key slot: {problem}")
    nonce, wrapped = _KS_WRAP.unpack_from(raw, _KS_HEAD.size)
    return KeySlot(kdf, nonce, wrapped, version, aead)


def _wrap(passphrase: str | bytes, capsule_id: bytes, template: KdfParams, data_key: bytes) -> KeySlot:
    kdf = msgspec.structs.replace(template, salt=_random(SALT_SIZE))  # never reuse a salt
    head = _head(KEYSLOT_VERSION, AEAD_AES256GCM, kdf)
    kek = derive_kek(passphrase, kdf)
    nonce = _random(NONCE_SIZE)
    wrapped = AESGCM(kek).encrypt(nonce, data_key, _wrap_aad(capsule_id, head))
    return KeySlot(kdf, nonce, wrapped)


def new_keyslot(
    passphrase: str | bytes, capsule_id: bytes, params: KdfParams | None = None
) -> tuple[KeySlot, bytes]:
    """A fresh random data key and its key slot. ``params`` gives the costs; the salt is new."""
    _check_id(capsule_id)
    data_key = _random(KEY_SIZE)
    return _wrap(passphrase, capsule_id, params or KdfParams(), data_key), data_key


def unlock(keyslot: KeySlot, passphrase: str | bytes, capsule_id: bytes) -> bytes:
    """The data key; ``WrongPassphrase`` if the passphrase (or capsule id) is not the one."""
    _check_id(capsule_id)
    if (keyslot.version, keyslot.aead) != (KEYSLOT_VERSION, AEAD_AES256GCM):
        raise FormatVersionError(f"key slot version {keyslot.version} / AEAD {keyslot.aead} unsupported")
    kek = derive_kek(passphrase, keyslot.kdf)
    aad = _wrap_aad(capsule_id, _head(keyslot.version, keyslot.aead, keyslot.kdf))
    try:
        return AESGCM(kek).decrypt(keyslot.nonce, keyslot.wrapped, aad)
    except InvalidTag:
        raise WrongPassphrase("wrong passphrase for this capsule") from None


def rekey(
    keyslot: KeySlot, old: str | bytes, new: str | bytes, capsule_id: bytes,
    *, params: KdfParams | None = None,
) -> KeySlot:
    """The same data key under passphrase ``new``, with a new salt (and ``params`` costs if given)."""
    data_key = unlock(keyslot, old, capsule_id)
    return _wrap(new, capsule_id, params or keyslot.kdf, data_key)


class Sealer:
    """Seals and opens the record bodies of one encrypted capsule.

    Safe to share between threads: cryptography's AESGCM object is immutable (each call
    works on its own copy of the OpenSSL context) and ``os.urandom`` is thread-safe.
    """

    OVERHEAD = NONCE_SIZE + TAG_SIZE
    encrypted = True
    __slots__ = ("_aead", "_id")

    def __init__(self, data_key: bytes, capsule_id: bytes) -> None:
        if len(data_key) != KEY_SIZE:
            raise InvalidArgument(f"data key must be {KEY_SIZE} bytes, not {len(data_key)}")
        _check_id(capsule_id)
        self._aead = AESGCM(data_key)  # key schedule done once, not per record
        self._id = bytes(capsule_id)

    def _aad(self, offset: int, kind: int, flags: int) -> bytes:
        return _RECORD_LABEL + _RECORD_AAD.pack(self._id, offset, kind, flags)

    def seal(self, offset: int, kind: int, flags: int, body: bytes | memoryview) -> bytes:
        """``nonce || ciphertext || tag`` of ``body``, bound to this capsule, offset, kind and flags."""
        nonce = _random(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, body, self._aad(offset, kind, flags))

    def open(self, offset: int, kind: int, flags: int, sealed: bytes | memoryview) -> bytes:
        """The plain body; ``CorruptionError`` unless ``sealed`` was sealed with exactly these."""
        if len(sealed) < self.OVERHEAD:
            raise CorruptionError(
                f"authentication failed (tampered, moved or from another capsule): sealed body "
                f"of {len(sealed)} bytes is shorter than its {self.OVERHEAD}-byte nonce and tag",
                offset=offset,
            )
        view = memoryview(sealed)
        try:
            return self._aead.decrypt(bytes(view[:NONCE_SIZE]), view[NONCE_SIZE:], self._aad(offset, kind, flags))
        except InvalidTag:
            raise CorruptionError(
                "authentication failed (tampered, moved or from another capsule)", offset=offset
            ) from None


class NullSealer:
    """The ``Sealer`` of a plain capsule: bodies pass through unchanged."""

    OVERHEAD = 0
    encrypted = False
    __slots__ = ()

    def seal(self, offset: int, kind: int, flags: int, body: bytes | memoryview) -> bytes | memoryview:
        return body

    def open(self, offset: int, kind: int, flags: int, sealed: bytes | memoryview) -> bytes | memoryview:
        return sealed


def read_passphrase(
    *, env: str | None = None, file: str | os.PathLike[str] | None = None, credential: str | None = None
) -> str:
    """The passphrase from exactly one source: an environment variable, a file, or a
    systemd credential (``credential`` names a file in ``$CREDENTIALS_DIRECTORY``, set by
    ``LoadCredential=``/``LoadCredentialEncrypted=``). One trailing newline is stripped
    from files. Errors (``InvalidArgument``) name the source, never the passphrase.

    Prefer a credential or a file: a variable is inherited by child processes.
    """
    given = [name for name, v in (("env", env), ("file", file), ("credential", credential)) if v is not None]
    if len(given) != 1:
        raise InvalidArgument(
            f"give exactly one passphrase source (env, file or credential), not {given or 'none'}"
        )
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise InvalidArgument(f"passphrase variable ${env} is not set")
        if not value:
            raise InvalidArgument(f"passphrase variable ${env} is empty")
        return value
    if credential is not None:
        base = os.environ.get("CREDENTIALS_DIRECTORY")
        if not base:
            raise InvalidArgument(
                f"passphrase credential {credential!r}: $CREDENTIALS_DIRECTORY is not set "
                f"(run under systemd with LoadCredential={credential}:PATH)"
            )
        if not credential or "/" in credential or credential in (".", ".."):
            raise InvalidArgument(f"passphrase credential name {credential!r} is not a plain name")
        # No mode check: systemd makes credentials 0400 and grants a service's user read
        # access by an ACL, whose mask shows as group bits (mode 0440). The directory is
        # private to the unit's user and read-only.
        return _read_secret(os.path.join(base, credential), f"passphrase credential {credential!r}", False)
    assert file is not None
    path = os.fspath(file)
    return _read_secret(path, f"passphrase file {path}", True)


def _read_secret(path: str, what: str, check_mode: bool) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidArgument(f"{what} does not exist") from None
    except OSError as e:
        raise InvalidArgument(f"{what} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # of the file we opened, not of whatever the path names now
        if stat.S_ISDIR(st.st_mode):
            raise InvalidArgument(f"{what} is a directory")
        if check_mode and st.st_mode & 0o077:
            raise InvalidArgument(
                f"{what} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):03o}): "
                f"run `chmod 600 {path}`"
            )
        data = b""  # a loop, since a pipe (`--passphrase-file <(...)`) may return short reads
        while len(data) <= MAX_PASSPHRASE_FILE and (chunk := os.read(fd, MAX_PASSPHRASE_FILE + 1 - len(data))):
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_PASSPHRASE_FILE:
        raise InvalidArgument(f"{what} is larger than {MAX_PASSPHRASE_FILE} bytes: is it the right file?")
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8") from None  # the error would quote bytes
    text = text.removesuffix("\n")  # one: a passphrase may end in whitespace
    if not text:
        raise InvalidArgument(f"{what} is empty")
    return text
