"""Writes golden/vN.mv2 and golden/vN.json (N = the engine's write version; from version 4
also the encrypted vNe.mv2e and vNe.json). Run once per format version; never rewrite an
existing golden file: old capsules must keep opening (tests/engine/test_format.py)."""

import base64
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import engine  # noqa: E402

here = Path(__file__).parent
GOLDEN_PASSPHRASE = "golden capsule"  # the encrypted golden capsule (version 4 on)


def build(path: Path, **create: object) -> None:
    rng = random.Random(0)
    with engine.create(path, checkpoint_frames=4, index_dir=tempfile.mkdtemp(), **create) as cap:
        for i in range(10):
            vector = [rng.gauss(0, 1) for _ in range(384)] if engine.WRITE_VERSION >= 3 else None
            cap.put(f"note {i}: ünïcode ✓ " * (i + 1), uri=f"note://{i % 4}", title=f"t{i}",
                    tags={"n": str(i)}, kind="note", timestamp=1_700_000_000 + i,
                    **({"vector": vector} if vector else {}))
            if i == 1 and engine.WRITE_VERSION >= 3:
                cap.find("note", mode="lex")  # attach the indexes: checkpoints store lex files
            if i % 3 == 2:
                cap.remove(f"note://{(i + 1) % 4}") if cap.stats()["live_uris"] > 3 else None
            cap.commit()
        cap.put(bytes(range(256)), uri="blob://bytes", timestamp=1_700_000_100)
        cap.commit()
        if engine.WRITE_VERSION >= 4:
            # Version 4: codec upgrades (RELOCATE, DICT), retention rules and expiry, rewind.
            for i in range(300):
                cap.put(f"event {i} level=info service=api status=200 user=u{i % 7}", uri=f"ev://{i % 50}",
                        timestamp=1_700_000_200 + i, expires=4_102_444_800.0 if i % 2 else None)
            cap.commit()
            cap.upgrade_codecs()
            cap.set_rules({"default": {"max_versions": 3}, "tags": {"kind=chat": {"max_age_s": 3600}}})
            cap.rewind(cap.seq - 2)
            cap.put("after the rewind", uri="note://0")
            cap.commit()
        expected = {
            str(seq): {e.uri: base64.b64encode(cap.get(e.id).payload).decode()
                       for e in cap.timeline(as_of=seq, limit=10_000)}
            for seq in range(cap.seq + 1)
        }
    (here / f"{path.name.split('.')[0]}.json").write_text(json.dumps(expected, indent=1, sort_keys=True))


build(here / f"v{engine.WRITE_VERSION}.mv2")
if engine.WRITE_VERSION >= 4:
    build(here / f"v{engine.WRITE_VERSION}e.mv2e", passphrase=GOLDEN_PASSPHRASE,
          kdf=engine.KdfParams(memory_cost=8192, iterations=1))
