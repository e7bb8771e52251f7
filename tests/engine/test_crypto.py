"""engine.crypto: known answers, key slots, sealed records, passphrase sources (real crypto)."""

from __future__ import annotations

import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from engine import crypto
from engine.crypto import (
    KEYSLOT_SIZE,
    KdfParams,
    NullSealer,
    Sealer,
    WrongPassphrase,
    decode_keyslot,
    derive_kek,
    encode_keyslot,
    new_keyslot,
    read_passphrase,
    rekey,
    unlock,
)
from engine.errors import CorruptionError, FormatVersionError, InvalidArgument

FAST = KdfParams(memory_cost=64, iterations=1, lanes=1)  # real Argon2id, ~no time
CID = bytes.fromhex("00112233445566778899aabbccddeeff")
OTHER_CID = bytes.fromhex("ffeeddccbbaa99887766554433221100")
PASS = "correct horse battery staple"

# Fixed "random" bytes for the known-answer tests: data key, salt and nonce differ in size.
KEY = bytes(range(32))
SALT = bytes(range(0x10, 0x20))
NONCE = bytes(range(0xA0, 0xAC))


@pytest.fixture
def fixed_random(monkeypatch):
    monkeypatch.setattr(crypto, "_random", lambda n: {32: KEY, 16: SALT, 12: NONCE}[n])


# -- known answers ----------------------------------------------------------------------


def test_argon2id_rfc9106_vector():
    """RFC 9106 section 5.3: cryptography's Argon2id takes the secret (K) and associated data (X)."""
    kdf = Argon2id(
        salt=b"\x02" * 16, length=32, iterations=3, lanes=4, memory_cost=32,
        ad=b"\x04" * 12, secret=b"\x03" * 8,
    )
    tag = kdf.derive(b"\x01" * 32)
    assert tag.hex() == "0d640df58d78766c08c037a34a8b53c9d01ef0452d75b65eb52520e96b01e659"


KEYSLOT_KAT = (
    "01010101"  # version, AEAD, KDF, lanes
    "40000000"  # memory cost 64 KiB
    "02000000"  # iterations 2
    "101112131415161718191a1b1c1d1e1f"  # salt
    "a0a1a2a3a4a5a6a7a8a9aaab"  # wrap nonce
    "f79e23d606d494d3715df994e279f0f08af400bc9633bfdb5e39cc57838548f1"  # wrapped data key
    "36eacd8a7df429819cacdc6701d16eed"  # tag
    "fb9c02dd"  # CRC-32
)


def test_keyslot_known_answer(fixed_random):
    ks, data_key = new_keyslot(PASS, CID, KdfParams(memory_cost=64, iterations=2, lanes=1))
    raw = encode_keyslot(ks)
    assert len(raw) == KEYSLOT_SIZE == 92
    assert raw.hex() == KEYSLOT_KAT
    assert data_key == KEY
    back = decode_keyslot(bytes.fromhex(KEYSLOT_KAT))
    assert back == ks
    assert (back.kdf.memory_cost, back.kdf.iterations, back.kdf.lanes, back.kdf.salt) == (64, 2, 1, SALT)
    assert (back.nonce, back.version, back.aead) == (NONCE, 1, 1)
    assert unlock(back, PASS, CID) == KEY


def test_keyslot_layout_is_the_documented_one():
    """Rebuild the KAT from the primitives and the module docstring's table alone."""
    head = struct.pack("<BBBBII16s", 1, 1, 1, 1, 64, 2, SALT)
    kek = Argon2id(salt=SALT, length=32, iterations=2, lanes=1, memory_cost=64).derive(PASS.encode())
    wrapped = AESGCM(kek).encrypt(NONCE, KEY, b"memvidd-keyslot-v1\0" + CID + head)
    raw = head + NONCE + wrapped
    assert (raw + struct.pack("<I", zlib.crc32(raw))).hex() == KEYSLOT_KAT


SEALED_KAT = "a0a1a2a3a4a5a6a7a8a9aaab8e7d10412aeb61de1216f2bf622a5ab0119f226d385b16f2273638e6c9"


def test_sealer_known_answer(fixed_random):
    sealed = Sealer(KEY, CID).seal(8192, 1, 1, b"hello capsule")
    assert sealed.hex() == SEALED_KAT
    assert len(sealed) == len(b"hello capsule") + Sealer.OVERHEAD
    aad = b"memvidd-record-v1\0" + CID + struct.pack("<QBB", 8192, 1, 1)  # as documented
    assert NONCE + AESGCM(KEY).encrypt(NONCE, b"hello capsule", aad) == sealed
    assert Sealer(KEY, CID).open(8192, 1, 1, bytes.fromhex(SEALED_KAT)) == b"hello capsule"


# -- key slots --------------------------------------------------------------------------


def test_keyslot_roundtrip_and_wrong_passphrase():
    ks, data_key = new_keyslot(PASS, CID, FAST)
    assert len(data_key) == 32 and len(ks.kdf.salt) == 16
    assert unlock(decode_keyslot(encode_keyslot(ks)), PASS, CID) == data_key
    with pytest.raises(WrongPassphrase, match="wrong passphrase") as e:
        unlock(ks, "Correct horse battery staple", CID)
    assert not isinstance(e.value, CorruptionError)
    assert PASS not in str(e.value)


def test_keyslot_is_bound_to_its_capsule():
    ks, _ = new_keyslot(PASS, CID, FAST)
    with pytest.raises(WrongPassphrase):
        unlock(ks, PASS, OTHER_CID)


def test_each_keyslot_draws_fresh_key_salt_and_nonce():
    (a, ka), (b, kb) = new_keyslot(PASS, CID, FAST), new_keyslot(PASS, CID, FAST)
    assert ka != kb and a.kdf.salt != b.kdf.salt and a.nonce != b.nonce
    assert FAST.salt == b""  # the template is never salted in place


def test_str_and_bytes_passphrases_agree_and_unicode_is_normalised():
    ks, data_key = new_keyslot("caf\u00e9", CID, FAST)  # composed é
    assert unlock(ks, "cafe\u0301", CID) == data_key  # decomposed é
    assert unlock(ks, "caf\u00e9".encode(), CID) == data_key


def test_rekey_keeps_data_key_and_retires_old_passphrase():
    ks, data_key = new_keyslot(PASS, CID, FAST)
    ks2 = rekey(ks, PASS, "new passphrase", CID)
    assert ks2.kdf.salt != ks.kdf.salt
    assert (ks2.kdf.memory_cost, ks2.kdf.iterations) == (FAST.memory_cost, FAST.iterations)
    assert unlock(ks2, "new passphrase", CID) == data_key
    with pytest.raises(WrongPassphrase):
        unlock(ks2, PASS, CID)
    with pytest.raises(WrongPassphrase):
        rekey(ks, "not it", "x", CID)
    ks3 = rekey(ks2, "new passphrase", "third", CID, params=KdfParams(memory_cost=128, iterations=1))
    assert ks3.kdf.memory_cost == 128 and unlock(ks3, "third", CID) == data_key


def test_default_params_roundtrip():
    p = KdfParams()
    assert (p.algorithm, p.memory_cost, p.iterations, p.lanes) == (1, 65536, 3, 1)
    ks, data_key = new_keyslot(PASS, CID)  # two derivations of ~0.16 s each
    assert unlock(ks, PASS, CID) == data_key


def test_empty_passphrase_and_bad_arguments_refused():
    with pytest.raises(InvalidArgument, match="empty passphrase"):
        new_keyslot("", CID, FAST)
    with pytest.raises(InvalidArgument, match="capsule id"):
        new_keyslot(PASS, b"short", FAST)
    with pytest.raises(InvalidArgument, match="salt"):
        derive_kek(PASS, FAST)  # a template has no salt
    with pytest.raises(InvalidArgument, match="memory cost"):
        new_keyslot(PASS, CID, KdfParams(memory_cost=4))


def _resealed(raw: bytes, **fields: int) -> bytes:
    """``raw`` with key slot header fields changed and the CRC fixed, as an attacker would."""
    names = ["version", "aead", "algorithm", "lanes", "memory", "iterations", "salt"]
    values = dict(zip(names, struct.unpack_from("<BBBBII16s", raw)))
    values.update(fields)
    body = struct.pack("<BBBBII16s", *(values[n] for n in names)) + raw[28:88]
    return body + struct.pack("<I", zlib.crc32(body))


def test_decode_keyslot_errors():
    raw = encode_keyslot(new_keyslot(PASS, CID, FAST)[0])
    assert decode_keyslot(raw + bytes(4000)) == decode_keyslot(raw)  # the rest of a header slot
    for n in range(1, KEYSLOT_SIZE):
        with pytest.raises(CorruptionError, match=f"truncated: {n} of 92"):
            decode_keyslot(raw[:n])
    with pytest.raises(CorruptionError, match="truncated: 0 of 92"):
        decode_keyslot(b"")
    with pytest.raises(FormatVersionError, match="layout version 2"):
        decode_keyslot(b"\x02" + raw[1:])
    with pytest.raises(CorruptionError, match="checksum"):
        decode_keyslot(raw[:50] + bytes([raw[50] ^ 1]) + raw[51:])
    with pytest.raises(FormatVersionError, match="AEAD id 2"):
        decode_keyslot(_resealed(raw, aead=2))
    with pytest.raises(FormatVersionError, match="KDF algorithm 7"):
        decode_keyslot(_resealed(raw, algorithm=7))
    with pytest.raises(CorruptionError, match="memory cost"):
        decode_keyslot(_resealed(raw, memory=0xFFFFFFFF))  # would allocate 4 TiB
    with pytest.raises(CorruptionError, match="iterations"):
        decode_keyslot(_resealed(raw, iterations=0))


def test_edited_kdf_fields_fail_like_a_wrong_passphrase():
    ks, _ = new_keyslot(PASS, CID, FAST)
    raw = encode_keyslot(ks)
    for edit in ({"iterations": 2}, {"memory": 128}, {"salt": bytes(16)}):
        with pytest.raises(WrongPassphrase):
            unlock(decode_keyslot(_resealed(raw, **edit)), PASS, CID)


# -- sealed records ---------------------------------------------------------------------


@pytest.fixture
def sealer():
    return Sealer(os.urandom(32), CID)


def test_seal_roundtrip(sealer):
    for body in (b"", b"x", os.urandom(100_000)):
        sealed = sealer.seal(8192, 2, 1, body)
        assert len(sealed) == len(body) + 28
        assert sealer.open(8192, 2, 1, sealed) == body
        assert sealer.open(8192, 2, 1, memoryview(sealed)) == body
    assert sealer.encrypted and Sealer.OVERHEAD == 28


def test_every_bit_flip_fails(sealer):
    sealed = sealer.seal(8192, 1, 0, b"a body worth protecting")
    for i in range(len(sealed) * 8):
        bad = bytearray(sealed)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CorruptionError, match=r"authentication failed \(tampered, moved or from another"):
            sealer.open(8192, 1, 0, bytes(bad))


def test_truncation_fails(sealer):
    sealed = sealer.seal(8192, 1, 0, b"a body worth protecting")
    for n in range(len(sealed)):
        with pytest.raises(CorruptionError, match="authentication failed") as e:
            sealer.open(8192, 1, 0, sealed[:n])
        assert e.value.offset == 8192


def test_moved_or_relabelled_record_fails(sealer):
    sealed = sealer.seal(8192, 1, 0, b"body")
    for offset, kind, flags in ((8193, 1, 0), (16384, 1, 0), (8192, 2, 0), (8192, 1, 1)):
        with pytest.raises(CorruptionError, match="authentication failed") as e:
            sealer.open(offset, kind, flags, sealed)
        assert e.value.offset == offset


def test_record_from_another_capsule_or_key_fails(sealer):
    key = os.urandom(32)
    sealed = Sealer(key, CID).seal(8192, 1, 0, b"body")
    with pytest.raises(CorruptionError, match="authentication failed"):
        Sealer(key, OTHER_CID).open(8192, 1, 0, sealed)
    with pytest.raises(CorruptionError, match="authentication failed"):
        sealer.open(8192, 1, 0, sealed)  # same capsule id, other data key


def test_nonces_are_unique(sealer):
    assert len({sealer.seal(8192, 1, 0, b"same body")[:12] for _ in range(10_000)}) == 10_000


def test_sealer_is_safe_to_share_between_threads(sealer):
    def work(i: int) -> bool:
        body = i.to_bytes(4, "little") * 256
        return all(sealer.open(i, 1, 0, sealer.seal(i, 1, 0, body)) == body for _ in range(200))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))


def test_sealer_refuses_bad_keys():
    with pytest.raises(InvalidArgument, match="data key"):
        Sealer(b"short", CID)
    with pytest.raises(InvalidArgument, match="capsule id"):
        Sealer(os.urandom(32), CID[:8])


def test_null_sealer_passes_bodies_through():
    ns, body = NullSealer(), b"plain body"
    assert ns.seal(8192, 1, 0, body) is body and ns.open(8192, 1, 0, body) is body
    assert not ns.encrypted and ns.OVERHEAD == 0


# -- passphrase sources -----------------------------------------------------------------


def _secret_file(path, text: bytes | str, mode: int = 0o600):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    path.chmod(mode)
    return path


def test_passphrase_from_env(monkeypatch):
    monkeypatch.setenv("MV_PASS", "s3cret\n")
    assert read_passphrase(env="MV_PASS") == "s3cret\n"  # variables are taken verbatim
    monkeypatch.delenv("MV_PASS")
    with pytest.raises(InvalidArgument, match=r"\$MV_PASS is not set"):
        read_passphrase(env="MV_PASS")
    monkeypatch.setenv("MV_PASS", "")
    with pytest.raises(InvalidArgument, match=r"\$MV_PASS is empty"):
        read_passphrase(env="MV_PASS")


def test_passphrase_from_file(tmp_path):
    assert read_passphrase(file=_secret_file(tmp_path / "a", "s3cret\n")) == "s3cret"
    assert read_passphrase(file=str(_secret_file(tmp_path / "b", "s3cret\n\n"))) == "s3cret\n"  # one only
    assert read_passphrase(file=_secret_file(tmp_path / "c", "p\u00e4ss", 0o400)) == "p\u00e4ss"


def test_passphrase_file_errors(tmp_path):
    with pytest.raises(InvalidArgument, match="passphrase file .*missing does not exist"):
        read_passphrase(file=tmp_path / "missing")
    for mode in (0o644, 0o640, 0o604, 0o620):
        path = _secret_file(tmp_path / f"open{mode:o}", "s3cret", mode)
        with pytest.raises(InvalidArgument, match=f"group or others \\(mode {mode:03o}\\).*chmod 600") as e:
            read_passphrase(file=path)
        assert "s3cret" not in str(e.value)
    with pytest.raises(InvalidArgument, match="is empty"):
        read_passphrase(file=_secret_file(tmp_path / "empty", "\n"))
    with pytest.raises(InvalidArgument, match="not valid UTF-8"):
        read_passphrase(file=_secret_file(tmp_path / "latin1", b"caf\xe9"))
    with pytest.raises(InvalidArgument, match="is a directory"):
        read_passphrase(file=tmp_path)
    with pytest.raises(InvalidArgument, match="larger than"):
        read_passphrase(file=_secret_file(tmp_path / "big", b"x" * 70_000))


def test_passphrase_from_credential(tmp_path, monkeypatch):
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    # 0440: how stat shows systemd's 0400 file plus its ACL for the service user.
    _secret_file(tmp_path / "memvidd-pass", "s3cret\n", 0o440)
    assert read_passphrase(credential="memvidd-pass") == "s3cret"
    with pytest.raises(InvalidArgument, match="credential 'nope' does not exist"):
        read_passphrase(credential="nope")
    with pytest.raises(InvalidArgument, match="not a plain name"):
        read_passphrase(credential="../memvidd-pass")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(InvalidArgument, match=r"\$CREDENTIALS_DIRECTORY is not set.*LoadCredential="):
        read_passphrase(credential="memvidd-pass")


def test_exactly_one_passphrase_source(tmp_path, monkeypatch):
    monkeypatch.setenv("MV_PASS", "s3cret")
    with pytest.raises(InvalidArgument, match="exactly one passphrase source"):
        read_passphrase()
    with pytest.raises(InvalidArgument, match="exactly one passphrase source"):
        read_passphrase(env="MV_PASS", file=tmp_path / "x")


def test_passphrase_from_a_pipe():
    """`--passphrase-file <(pass show memvidd)` hands over a pipe, which may read short."""
    r, w = os.pipe()
    try:
        os.write(w, b"s3cret\n")
        os.close(w)
        assert read_passphrase(file=f"/dev/fd/{r}") == "s3cret"
    finally:
        os.close(r)
