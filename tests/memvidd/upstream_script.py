"""A script written for upstream memvid's Python SDK, the way its README shows it (create,
put with title/label/text/tags/metadata, put_many, find, timeline, frame, remove, seal,
use). tests/memvidd/test_sdk.py runs it as it is against the real ``memvid-sdk``, then with
only its import line changed against memvidd (a file, then a daemon), and compares what
it prints. Usage: python upstream_script.py CAPSULE_PATH
"""

import json
import sys

import memvid_sdk

path = sys.argv[1]
out = {}

mv = memvid_sdk.create(path)
first = mv.put(
    title="Project Update",
    label="meeting",
    text="Discussed the Q4 roadmap. Alice will handle the frontend refactor.",
    metadata={"date": "2024-01-15", "attendees": ["Alice", "Bob"]},
    tags=["roadmap", "q4"],
)
decision = mv.put(
    title="Technical Decision",
    label="architecture",
    text="Decided to use PostgreSQL for the main store. Redis for caching.",
)
mv.put(
    title="Café notes",
    label="travel",
    text="Le café près de la gare sert une crème brûlée parfaite. 東京 coffee",
    uri="mv2://travel/cafe",
)
frame_ids = mv.put_many([
    {"title": "Doc 1", "label": "notes", "text": "Kubernetes cluster upgrade scheduled for Friday."},
    {"title": "Doc 2", "label": "notes", "text": "Quarterly budget review with finance.", "tags": ["budget"]},
])
out["put_returns"] = type(first).__name__
out["put_many_returns"] = [type(x).__name__ for x in frame_ids]

for query in ["roadmap", "PostgreSQL", "Kubernetes", "budget", "crème", "nothingmatchesthis"]:
    results = mv.find(query, k=5)
    out[query] = [{"title": hit["title"], "has_snippet": bool(hit["snippet"])} for hit in results["hits"]]

entries = mv.timeline(limit=20)
out["timeline"] = sorted(entry["preview"][:12] for entry in entries)

frame = mv.frame("mv2://travel/cafe")
out["frame"] = {"title": frame["title"], "label": frame["labels"][0]}
update = mv.frame(mv.find("roadmap")["hits"][0]["uri"])
out["metadata"] = {k: json.loads(update["extra_metadata"][k]) for k in ("date", "attendees")}

mv.remove(decision)
out["after_remove"] = [hit["title"] for hit in mv.find("PostgreSQL")["hits"]]
out["active_frames"] = mv.stats()["active_frame_count"]
mv.seal()

with memvid_sdk.use("basic", path, mode="open") as again:
    out["reopened"] = [hit["title"] for hit in again.find("roadmap")["hits"]]

print(json.dumps(out, ensure_ascii=False, sort_keys=True))
