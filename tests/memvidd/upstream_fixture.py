"""Writes a small capsule with the real memvid-sdk (upstream memvid) and prints, as JSON,
what was put and what the SDK itself reads back: the ground truth for
tests/memvidd/test_import.py. Usage: python upstream_fixture.py CAPSULE_PATH
"""

import json
import sys

import memvid_sdk

path = sys.argv[1]
long_text = " ".join(f"Paragraph {i}: the lighthouse keeper logged the tide at dawn." for i in range(60))
notes = [
    dict(title="Plan", label="planning", text="First plan: migrate the billing service.", uri="mv2://notes/plan",
         tags=["billing"], metadata={"owner": "Ana", "priority": 2}),
    dict(title="Plan", label="planning", text="Second plan: migrate billing, then invoicing.",
         uri="mv2://notes/plan", tags=["billing", "invoicing"], metadata={"owner": "Ana", "priority": 1}),
    dict(title="Müller's Grüße", label="people", labels=["contacts"],
         text="Grüße an Jürgen Müller aus Köln. 東京でも。", metadata={"city": "Köln"}),
    dict(title="Obsolete", label="tmp", text="This zeppelin note will be deleted."),
    dict(title="Lighthouse log", label="logs", text=long_text, uri="mv2://logs/lighthouse"),
    dict(title="Dated", label="history", text="An old astrolabe entry.", kind="journal", track="ship",
         timestamp=1700000000),
]
notes += [dict(title=f"Note {i}", label="bulk", text=f"Bulk note number {i} about topic{i} and quinoa.",
               tags=[f"t{i}"]) for i in range(8)]
batch = [{"title": f"Batch {i}", "label": "batch", "text": f"Batched record {i}: kiwi harvest {i}.",
          "tags": ["batch"], "metadata": {"n": i}} for i in range(3)]

mv = memvid_sdk.create(path)
put_ids = [mv.put(**note) for note in notes]
mv.put_many(batch)  # its return values are WAL sequences upstream, not frame ids
removed = put_ids[3]
mv.remove(removed)
mv.seal()

with memvid_sdk.use("basic", path, mode="open", read_only=True) as again:
    uris = sorted({n["uri"] for n in notes if "uri" in n})
    out = {
        "notes": notes, "batch": batch, "put_ids": put_ids, "removed": removed,
        "frames": {uri: again.frame(uri) for uri in uris},
        "timeline": again.timeline(limit=100),
        "finds": {q: [h["title"] for h in again.find(q, k=10)["hits"]]
                  for q in ["astrolabe", "zeppelin", "Jürgen", "kiwi", "quinoa", "lighthouse"]},
    }
print(json.dumps(out, ensure_ascii=False))
