"""What a reload changes: the running configuration against the one just read.

``plan`` splits the difference (``changes``) in two. What the daemon applies while it runs: capsules
added and removed, each capsule's watch list, include/exclude globs and skip-generated, the ``[limits]``,
``[watcher]`` and ``[durability]`` settings, the log level and the shutdown grace. What
only a restart applies: the sockets (bound once), the embedding model and the caches
(loaded or sized once), and a served capsule's path, passphrase source and engine options
(set when it was opened). The configuration the daemon runs after a reload is the new
one with those restart-only settings as they are now, so that the next reload still
reports them as waiting for a restart.

Each change is one line a person reads, in the TOML's own names::

    capsule default.watch +/home/u/notes -/home/u/old
    limits.max-put-bytes: 8388608 -> 1048576
"""

from __future__ import annotations

from typing import Any

import msgspec

from .config import CapsuleConfig, Config

# A served capsule's settings that take effect only when it is opened.
OPENED_WITH = ("path", "passphrase_env", "passphrase_file", "passphrase_credential", "engine")


def plan(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration to run once the live changes of ``new`` are applied, and the
    changes that wait for a restart (``changes(running, <that configuration>)`` are the
    live ones)."""
    served = {c.name: c for c in running.capsule}

    def kept(c: CapsuleConfig) -> CapsuleConfig:
        old = served.get(c.name)
        if old is None:
            return c  # added: opened with its new settings
        return msgspec.structs.replace(c, **{key: getattr(old, key) for key in OPENED_WITH})

    daemon = msgspec.structs.replace(new.daemon, socket=running.daemon.socket,
                                     events_socket=running.daemon.events_socket)
    live = msgspec.structs.replace(new, daemon=daemon, embedding=running.embedding, cache=running.cache,
                                   capsule=[kept(c) for c in new.capsule])
    return live, [f"{line} (needs a restart)" for line in changes(live, new)]


def changes(old: Config, new: Config) -> list[str]:
    """Every difference between ``old`` and ``new``, one line each."""
    out = []
    before, after = _flat(old), _flat(new)
    old_caps, new_caps = [c.name for c in old.capsule], [c.name for c in new.capsule]
    out += [f"capsule {n} added ({new.capsule[new_caps.index(n)].path})" for n in new_caps if n not in old_caps]
    out += [f"capsule {n} removed (its file stays as it is)" for n in old_caps if n not in new_caps]
    if old_caps and new_caps and old_caps[0] != new_caps[0]:
        out.append(f"default capsule: {old_caps[0]} -> {new_caps[0]}")
    for key, b in after.items():
        a = before.get(key, b)  # a key of a capsule added or removed: said above
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            delta = [f"+{x}" for x in b if x not in a] + [f"-{x}" for x in a if x not in b]
            out.append(f"{key} {' '.join(delta) or '(reordered)'}")
        else:
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out


def _flat(cfg: Config) -> dict[str, Any]:
    """``cfg`` as ``{"limits.max-put-bytes": ..., "capsule NAME.watch": [...], ...}``."""
    raw = msgspec.to_builtins(cfg)
    raw.pop("source")
    out: dict[str, Any] = {}

    def walk(prefix: str, table: dict[str, Any]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            else:
                out[prefix + key] = value

    for capsule in raw.pop("capsule"):
        walk(f"capsule {capsule.pop('name')}.", capsule)
    walk("", raw)
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as the TOML has it
    return "unset" if value is None else str(value)
