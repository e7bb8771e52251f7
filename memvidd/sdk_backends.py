"""Where a ``memvidd.sdk`` handle's frames live: a capsule file opened here (``Direct``,
through the engine's public API) or a capsule a running daemon serves (``Served``,
through ``memvidd.client``), and ``open_backend``, which picks one.

The choice: a capsule that the configured daemon serves is written through that daemon
(it holds the capsule's writer lock, so opening the file here would be refused, and a
read-only open here would not see what the daemon has staged); any other path is opened
directly. "Configured" is the socket given, else ``$MEMVIDD_SOCKET``, else the socket of
the configuration every ``memvidd`` command finds; the daemon is asked which capsules it
serves and the path compared by file identity. No daemon there, or one serving other
capsules: the file is opened here.

Both backends offer the same few calls with the same shapes (the engine's ``Hit`` and
the wire's ``HitOut`` have the same fields; ``FrameInfo`` and ``FrameOut`` too), each
write durable when it returns. This module imports the engine only for ``Direct``: a
script that talks to a daemon starts without numpy and tantivy.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from . import protocol as p
from .client import Client, ForeignPeer, RemoteError, default_socket
from .config import ConfigError

if TYPE_CHECKING:
    import engine

# how long a script waits for the daemon (a find of the first query may load a model)
DAEMON_TIMEOUT = 60.0


class Direct:
    """A capsule file opened here, through the engine: every write committed at once."""

    def __init__(self, cap: engine.Capsule) -> None:
        self.cap = cap
        self.path = cap.path
        self.readonly = cap.readonly
        self.served_by: str | None = None
        self._embedding = False

    def put_many(self, items: list[dict[str, Any]]) -> list[int]:
        ids = self.cap.put_many(items)
        self.cap.commit()
        return ids

    def remove(self, frame_id: int) -> int:
        self.cap.remove(frame_id)
        return self.cap.commit()

    def find(self, query: str, **kw: Any) -> tuple[list[Any], str]:
        if kw.get("mode") in ("vec", "hybrid"):
            self._embedder()
        hits = self.cap.find(query, **kw)
        return list(hits), hits.mode

    def _embedder(self) -> None:
        """Semantic search here needs the capsule's model loaded (a daemon has it already)."""
        import engine

        if self.cap.model is None:
            raise VecIndexDisabledError(f"{self.path} is lexical only (made without an embedding model): "
                                        "use mode='lex'")
        if not self._embedding:
            self.cap.attach_embedder(engine.Embedder(self.cap.model))
            self._embedding = True

    def timeline(self, **kw: Any) -> list[Any]:
        return list(self.cap.timeline(**kw))

    def text(self, frame_id: int) -> str | bytes:
        f = self.get(frame_id)
        return f.text if f.is_text else f.payload

    def latest(self, uri: str) -> Any:
        return self.cap.get(uri=uri)

    def get(self, frame_id: int) -> Any:
        return self.cap.get(frame_id)

    def stats(self) -> Mapping[str, Any]:
        return self.cap.stats()

    def flush(self) -> int:
        return self.cap.commit()

    def close(self) -> None:
        self.cap.close()


class Served:
    """A capsule a running daemon serves, by name: each request is durable when answered."""

    def __init__(self, client: Client, info: p.CapsuleInfo, *, readonly: bool) -> None:
        self.client = client
        self.name = info.name
        self.path = info.path
        self.readonly = readonly
        self.served_by = client.path

    def _check_writable(self) -> None:
        if self.readonly:
            raise MemvidError(f"{self.path} was opened read_only")

    def put_many(self, items: list[dict[str, Any]]) -> list[int]:
        self._check_writable()
        return self.client.put_many(items, capsule=self.name)

    def remove(self, frame_id: int) -> int:
        self._check_writable()
        c = self.client
        return c._call(p.Remove(id=c._id(), capsule=self.name, frame_id=frame_id)).seq

    def find(self, query: str, **kw: Any) -> tuple[list[Any], str]:
        reply = self.client.find_reply(query, capsule=self.name, **kw)
        return list(reply.hits), reply.mode

    def timeline(self, **kw: Any) -> list[Any]:
        return list(self.client.timeline(capsule=self.name, **kw))

    def text(self, frame_id: int) -> str | bytes:
        f = self.get(frame_id)
        return f.text if f.text is not None else (f.data or b"")

    def latest(self, uri: str) -> Any:
        return self.client.get(uri=uri, capsule=self.name)

    def get(self, frame_id: int) -> Any:
        return self.client.get(frame_id, capsule=self.name)

    def stats(self) -> Mapping[str, Any]:
        return msgspec.to_builtins(self.client.stats(capsule=self.name))

    def flush(self) -> int:
        return self.client.flush(capsule=self.name)

    def close(self) -> None:
        self.client.close()


Backend = Direct | Served


def served(path: str, socket: str | None = None) -> tuple[Client, p.CapsuleInfo] | None:
    """The daemon at ``socket`` (default: the configured one) and its capsule at ``path``,
    if it serves that file; else None (no daemon listening, or not that file)."""
    try:
        sock = socket or default_socket()
    except ConfigError:
        return None  # a broken config names no daemon; the file itself is still usable
    if not os.path.exists(sock):
        return None
    try:
        client = Client(sock, timeout=DAEMON_TIMEOUT)
    except (builtins.FileNotFoundError, ConnectionRefusedError, ForeignPeer):
        return None
    try:
        for info in client.capsules():
            if _same_file(info.path, path):
                return client, info
    except BaseException:
        client.close()
        raise
    client.close()
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def open_backend(path: str, *, mode: str, read_only: bool, socket: str | None = None) -> Backend:
    """``path`` opened for ``mode`` ("open": it must exist; "create": it must hold no frame
    yet, as a daemon's new capsule; "auto": either), through its daemon if the configured
    one serves it."""
    if mode not in ("open", "create", "auto"):
        raise ValueError(f"mode must be 'open', 'create' or 'auto', not {mode!r}")
    found = served(path, socket)
    if found is not None:
        client, info = found
        if mode == "create" and info.frames:
            client.close()
            raise _exists(path, f"the daemon at {client.path} serves it (as {info.name!r}) with {info.frames} frames")
        return Served(client, info, readonly=read_only)
    exists = os.path.lexists(path)
    if mode == "open" and not exists:
        raise FileNotFoundError(f"no capsule at {path} (create it with create(path), or use mode='auto')")
    import engine

    with translated():
        if not exists:
            if read_only:
                raise FileNotFoundError(f"no capsule at {path} to open read_only")
            return Direct(engine.create(path))
        try:
            cap = engine.open(path, readonly=read_only)
        except engine.CapsuleLocked as e:
            raise LockedError(f"{e}: another process holds it, and the daemon at "
                              f"{socket or _socket_or_none() or 'the configured socket'} does not serve it "
                              "(pass socket= the daemon that does)") from None
        if mode == "create" and cap.frame_count:
            cap.close()
            raise _exists(path, f"it holds {cap.frame_count} frames")
        return Direct(cap)


def _exists(path: str, why: str) -> CapsuleExistsError:
    return CapsuleExistsError(f"{path} exists and {why}; memvidd never replaces a capsule (upstream's create "
                              "would): open it with mode='open' or 'auto', or remove it first")


def _socket_or_none() -> str | None:
    try:
        return default_socket()
    except ConfigError:
        return None


# -- errors: upstream's classes (memvid_sdk.MemvidError, ...), so that a script's except
# clauses keep working; every engine or daemon error reaches a script as one of these.


class MemvidError(Exception):
    """Every error of this API (upstream's base class too)."""


class LockedError(MemvidError):
    """Another process holds the capsule (upstream MV007)."""


class FrameNotFoundError(MemvidError, KeyError):
    """No such frame (upstream MV010)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FileNotFoundError(MemvidError, builtins.FileNotFoundError):
    """No capsule at the path (upstream MV013)."""


class CapsuleExistsError(MemvidError, FileExistsError):
    """``create`` where a file is (upstream overwrites it; memvidd refuses)."""


class CorruptFileError(MemvidError):
    """The capsule is damaged (upstream MV012); ``memvidd verify`` / ``doctor`` say more."""


class VecIndexDisabledError(MemvidError):
    """Semantic search on a capsule without an embedding model (upstream MV011)."""


_REMOTE = {p.NOT_FOUND: FrameNotFoundError, p.UNAVAILABLE: LockedError, p.CORRUPT: CorruptFileError,
           p.BAD_REQUEST: MemvidError}


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Engine and daemon errors raised inside, as this API's classes (the original chained)."""
    try:
        yield
    except MemvidError:
        raise
    except RemoteError as e:
        raise _REMOTE.get(e.code, MemvidError)(e.message) from e
    except Exception as e:
        engine = sys.modules.get("engine")  # if it is not loaded, it raised nothing
        if engine is None or not isinstance(e, engine.EngineError):
            raise
        kind: type[MemvidError] = MemvidError
        if isinstance(e, engine.CapsuleLocked):
            kind = LockedError
        elif isinstance(e, engine.NotFound):
            kind = FrameNotFoundError
        elif isinstance(e, engine.CapsuleExists):
            kind = CapsuleExistsError
        elif isinstance(e, engine.CorruptionError | engine.NotACapsule | engine.CapsuleBroken):
            kind = CorruptFileError
        raise kind(str(e)) from e


__all__ = ["Backend", "CapsuleExistsError", "CorruptFileError", "Direct", "FileNotFoundError",
           "FrameNotFoundError", "LockedError", "MemvidError", "Served", "VecIndexDisabledError",
           "open_backend", "served", "translated"]
