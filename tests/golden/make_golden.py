"""Writes golden/v1.mv2 and golden/v1.json. Run once per format version; never rewrite
an existing golden file: old capsules must keep opening (tests/test_format.py)."""

import base64
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import engine  # noqa: E402

here = Path(__file__).parent
path = here / f"v{engine.WRITE_VERSION}.mv2"
rng = random.Random(0)
with engine.create(path, checkpoint_frames=4, index_dir=tempfile.mkdtemp()) as cap:
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
    expected = {
        str(seq): {e.uri: base64.b64encode(cap.get(e.id).payload).decode() for e in cap.timeline(as_of=seq, limit=1000)}
        for seq in range(cap.seq + 1)
    }
(here / path.with_suffix(".json").name).write_text(json.dumps(expected, indent=1, sort_keys=True))
