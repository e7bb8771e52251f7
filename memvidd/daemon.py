"""``memvidd run``: the daemon's life cycle, from start-up to a clean exit.

Task tree (one root nursery; every service started with ``nursery.start`` so READY is
sent only when all of them are up)::

    main
    ├── committer, one per capsule          (group commit: service.py)
    ├── maintenance, one per capsule        (codec upgrades, compaction when idle: service.py)
    ├── indexer, one per watching capsule   (scan, watch, chunk, write: ingest.py)
    ├── memory trim                         (malloc_trim while writes go on: memory.py)
    ├── agent server                        (server.py)
    ├── event server                        (events.py)
    ├── watchdog pings, status updates      (systemd.py)
    └── signal loop: SIGTERM/SIGINT stop, SIGHUP reloads the configuration

A reload (SIGHUP, or a ``reload`` request) re-reads the configuration and applies what
changed without a restart: capsules opened and closed, watch lists and globs, limits,
watcher and durability settings (``reload.py`` says which settings wait for a restart).

Shutdown: STOPPING=1, stop accepting and cancel the connections, then, shielded and
bounded by ``shutdown-grace-s``, commit what is staged and close every capsule. Anything
acknowledged was durable already; a put staged but not yet acknowledged is committed too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shlex
import shutil
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

import engine

from . import __version__, systemd
from . import protocol as p
from .config import CapsuleConfig, Config, ConfigError, expand, load, private_dirs, private_socket_dir
from .documents import Limits
from .events import EventServer
from .ingest import IngestPipeline
from .memory import fix_mmap_threshold, serve_trim
from .reload import changes, plan
from .server import AgentServer
from .service import CapsuleService
from .tree import Tree

log = logging.getLogger("memvidd.daemon")


def typed_command() -> str:
    """This very memvidd as a shell runs it, for the hints it prints: ``memvidd`` when that
    is what $PATH finds, else the path of the script that was run (a virtualenv's
    ``bin/memvidd``), else ``python -m memvidd`` with this interpreter."""
    argv0 = sys.argv[0]
    if not argv0 or argv0.endswith("__main__.py") or argv0 == "-c":
        return f"{shlex.quote(sys.executable)} -m memvidd"
    script = os.path.abspath(argv0)
    on_path = shutil.which("memvidd")
    with contextlib.suppress(OSError):
        if on_path is not None and os.path.samefile(on_path, script):
            return "memvidd"
    return shlex.quote(script)


def setup_logging(level: str) -> None:
    """One line per event on stderr; no timestamps under systemd (the journal adds them)."""
    fmt = "%(levelname)s %(name)s %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    set_log_level(level)


def set_log_level(level: str) -> None:
    """``level`` for the daemon's loggers; ``watchfiles``, which logs a line at INFO for
    every batch of changes (every save), speaks below WARNING only at DEBUG."""
    logging.getLogger().setLevel(level.upper())
    logging.getLogger("watchfiles").setLevel(logging.NOTSET if level.upper() == "DEBUG" else logging.WARNING)


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def unix_listener(path: str) -> trio.SocketListener:
    """Bind ``path`` (directory 0700, socket 0600), replacing a stale socket, never a file."""
    p = Path(path)
    private_socket_dir(path)
    try:
        if stat.S_ISSOCK(os.lstat(p).st_mode):
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(str(p))
            except OSError:
                p.unlink()  # nobody listens: a leftover of a crashed daemon
            else:
                raise ConfigError(f"{path}: another daemon is listening there")
            finally:
                probe.close()
        else:
            raise ConfigError(f"{path} exists and is not a socket: refusing to replace it")
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket is born 0600: no window where others could connect
    try:
        sock.bind(str(p))
    finally:
        os.umask(old)
    sock.listen(512)
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


def read_passphrase(c: CapsuleConfig) -> str | None:
    """The capsule's passphrase from its configured source (None: a plain capsule); a
    missing or unreadable source is a ``ConfigError`` naming the capsule and the key."""
    sources = c.passphrase_sources()
    if not sources:
        return None
    try:
        return engine.read_passphrase(**sources)
    except engine.InvalidArgument as e:  # names the source, never the passphrase
        key = "passphrase-" + next(iter(sources))
        raise ConfigError(f"capsule {c.name!r}: {key}: {e}") from None


def open_capsule(c: CapsuleConfig, cfg: Config, embedder: engine.Embedder | None,
                 passphrase: str | None = None) -> engine.Capsule:
    """Open (or create) the capsule ``c``; an encrypted one with ``passphrase``. A wrong
    or missing passphrase is a ``ConfigError`` naming the capsule: the daemon does not
    start (or, on reload, does not add it)."""
    try:
        return _open_capsule(c, cfg, embedder, passphrase)
    except engine.WrongPassphrase:
        raise ConfigError(f"capsule {c.name!r} ({expand(c.path)}): wrong passphrase "
                          f"(from its {_source_key(c)})") from None
    except engine.InvalidArgument as e:  # encrypted without a passphrase, or the reverse
        if "passphrase" not in str(e):
            raise
        raise ConfigError(f"capsule {c.name!r}: {e} (configure passphrase-file, passphrase-env "
                          "or passphrase-credential for an encrypted capsule)" if passphrase is None else
                          f"capsule {c.name!r}: {e} (remove its {_source_key(c)})") from None


def _source_key(c: CapsuleConfig) -> str:
    return "passphrase-" + next(iter(c.passphrase_sources()), "source")


def _open_capsule(c: CapsuleConfig, cfg: Config, embedder: engine.Embedder | None,
                  passphrase: str | None) -> engine.Capsule:
    path = expand(c.path)
    options: dict[str, Any] = dict(
        level=c.engine.level, checkpoint_bytes=c.engine.checkpoint_bytes,
        checkpoint_frames=c.engine.checkpoint_frames, result_cache_bytes=cfg.cache.result_bytes,
        block_cache_bytes=cfg.cache.block_bytes,
    )
    if not os.path.exists(path):
        private_dirs(Path(path).parent)
        model = None if cfg.embedding.model == "none" else cfg.embedding.model
        log.info("creating capsule name=%s path=%s model=%s", c.name, path, model)
        cap = engine.create(path, model=model, embedder=embedder, passphrase=passphrase, **options)
    else:
        # Opened once and nothing written before the first put: a daemon starts (and
        # serves reads) on a full disk.
        cap = engine.open(path, passphrase=passphrase, **options)
        try:
            if embedder is not None and cap.model == embedder.model:
                cap.attach_embedder(embedder)
            elif embedder is not None:
                log.warning("capsule name=%s is bound to model=%s, not %s: semantic search off for it",
                            c.name, cap.model, embedder.model)
        except BaseException:
            cap.close()
            raise
    cap.find("", k=0)  # attach the search indexes now, so the first query is fast
    return cap


class Daemon:
    def __init__(self, cfg: Config, reread: Callable[[], Config] | None = None) -> None:
        """``reread``: how a reload reads the configuration again (default: ``cfg.source``
        read again, or ``cfg`` itself if it is the embedded default)."""
        self.cfg = cfg
        self.reread = reread or (lambda: cfg if cfg.source.startswith("<") else load(cfg.source))
        self._reloading = trio.Lock()
        self.services: dict[str, CapsuleService] = {}
        self.tasks: dict[str, trio.Nursery] = {}  # each capsule's tasks: cancelled when it is removed
        self.embedder: engine.Embedder | None = None
        self.queries: AgentServer | None = None
        self.created_sockets: list[str] = []
        self.started = time.monotonic()

    async def run(self) -> int:
        cfg = self.cfg
        raise_fd_limit()
        if cfg.embedding.model != "none":
            log.info("loading embedding model=%s", cfg.embedding.model)
            self.embedder = await trio.to_thread.run_sync(
                lambda: engine.Embedder(cfg.embedding.model, threads=cfg.embedding.threads or None,
                                        batch_size=cfg.embedding.batch_size))
        inherited = systemd.listen_fds()
        query_listeners = self._listeners(inherited.get("query"), cfg.daemon.socket)
        event_listeners = self._listeners(inherited.get("events"), cfg.daemon.events_socket)
        # Signals are caught from before READY: a SIGHUP or SIGTERM sent the moment the
        # daemon says it is ready must not meet the default action (death).
        try:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
                await self._serve(query_listeners, event_listeners, received)
        finally:
            await self._close_all()
            for path in self.created_sockets:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        log.info("stopped")
        return 0

    async def _serve(self, query_listeners: list[trio.SocketListener],
                     event_listeners: list[trio.SocketListener], received: Any) -> None:
        cfg = self.cfg
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for c in cfg.capsule:
                await self._add_capsule(c)
            self.queries = AgentServer(
                self.services, cfg.default_capsule.name, max_frame=cfg.limits.max_frame_bytes,
                max_put=cfg.limits.max_put_bytes, max_connections=cfg.limits.max_connections,
                tail_buffer=cfg.limits.tail_buffer, version=f"memvidd {__version__}",
                max_buffer=cfg.limits.max_buffer_bytes, reload=self.reload,
            )
            queries = self.queries

            async def serve_all(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                async with trio.open_nursery() as inner:
                    await inner.start(queries.serve, query_listeners)
                    await inner.start(EventServer(queries).serve, event_listeners)
                    interval = systemd.watchdog_interval()
                    if interval:
                        await inner.start(systemd.serve_watchdog, interval)
                    inner.start_soon(self._report_status)
                    await inner.start(serve_trim, lambda: sum(svc.commits for svc in self.services.values()))
                    task_status.started()

            await nursery.start(serve_all)
            socket_path = expand(cfg.daemon.socket)
            log.info("ready socket=%s events=%s capsules=%s", socket_path, expand(cfg.daemon.events_socket),
                     ",".join(self.services))
            me, sock = typed_command(), shlex.quote(socket_path)
            print(f"memvidd ready: socket {socket_path}\n"
                  f"  try: {me} put --socket {sock} 'hello memory'\n"
                  f"       {me} find --socket {sock} 'hello'", file=sys.stderr, flush=True)
            systemd.notify("READY=1", f"STATUS={self._status()}")  # after the hints: READY means they are out
            await self._signals(received)
            systemd.notify("STOPPING=1", "STATUS=stopping")
            log.info("stopping")
            nursery.cancel_scope.cancel()  # stop accepting, end connections and committers

    def _listeners(self, inherited: list[socket.socket] | None, path: str) -> list[trio.SocketListener]:
        if inherited:
            log.info("using socket from systemd path=%s", inherited[0].getsockname())
            return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in inherited]
        listener = unix_listener(expand(path))
        self.created_sockets.append(expand(path))
        return [listener]

    async def _add_capsule(self, c: CapsuleConfig) -> None:
        passphrase = read_passphrase(c)
        cap = await trio.to_thread.run_sync(open_capsule, c, self.cfg, self.embedder, passphrase)
        svc = CapsuleService(c.name, cap, interval_ms=self._interval_ms(), passphrase=passphrase)
        self.services[c.name] = svc
        trees = self._trees(c)
        svc.indexer = self._indexer(svc, trees) if trees else None

        async def capsule_tasks(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with trio.open_nursery() as tasks:
                self.tasks[c.name] = tasks
                await tasks.start(svc.serve_committer)
                if c.engine.upgrade_codecs or c.engine.compact_dead_ratio > 0:
                    await tasks.start(partial(svc.serve_maintenance, idle_s=c.engine.upgrade_idle_ms / 1000,
                                              cold_commits=c.engine.upgrade_cold_commits,
                                              upgrade=c.engine.upgrade_codecs,
                                              compact_ratio=c.engine.compact_dead_ratio))
                if svc.indexer is not None:
                    await tasks.start(svc.indexer.run)  # watching before READY; the scan goes on
                task_status.started()

        await self.nursery.start(capsule_tasks)
        log.info("capsule open name=%s path=%s frames=%s watching=%s", c.name, cap.path, cap.frame_count,
                 ",".join(c.watch) or "-")

    def _interval_ms(self) -> int:
        d = self.cfg.durability
        return d.interval_ms if d.policy == "interval" else 0

    def _trees(self, c: CapsuleConfig) -> list[Tree]:
        w = self.cfg.watcher
        documents = Limits(w.max_document_bytes, w.document_budget_s, w.document_memory_bytes)
        return [Tree(expand(root), include=c.include, exclude=c.exclude, max_bytes=w.max_file_bytes,
                     skip_generated=c.skip_generated, documents=documents) for root in c.watch]

    def _indexer(self, svc: CapsuleService, trees: list[Tree]) -> IngestPipeline:
        w = self.cfg.watcher
        return IngestPipeline(svc, trees, chunk_size=w.chunk_size, overlap=w.chunk_overlap, debounce_ms=w.debounce_ms)

    async def _remove_capsule(self, name: str) -> None:
        svc = self.services.pop(name)
        self.tasks.pop(name).cancel_scope.cancel()  # its committer, maintenance and watcher
        with trio.CancelScope(shield=True):
            await svc.close()
        log.info("capsule closed name=%s", name)

    async def _signals(self, received: Any) -> None:
        async for sig in received:
            if sig == signal.SIGHUP:
                with contextlib.suppress(ConfigError):  # logged; the running configuration goes on
                    await self.reload()
            else:
                log.info("signal=%s", signal.Signals(sig).name)
                return

    async def reload(self) -> p.ReloadReply:
        """Re-read the configuration and apply what changed (SIGHUP, or a ``reload``
        request); what changed is logged and returned. ``ConfigError`` if it cannot be
        read: the running configuration goes on unchanged."""
        async with self._reloading:  # one at a time: a SIGHUP during a requested one waits
            # Shielded: never half applied because the client that asked hung up.
            with trio.CancelScope(shield=True):
                systemd.notify("RELOADING=1")
                try:
                    reply = await self._reload()
                finally:
                    systemd.notify("READY=1", f"STATUS={self._status()}")
        return reply

    async def _reload(self) -> p.ReloadReply:
        try:
            new = await trio.to_thread.run_sync(self.reread)
        except ConfigError as e:
            log.error("reload failed, keeping the running configuration: %s", e)
            raise ConfigError(f"{e} (the running configuration is kept)") from None
        before = self.cfg
        self.cfg, pending = plan(before, new)
        self._apply_settings()
        errors = []
        served = {c.name: c for c in before.capsule}
        for c in self.cfg.capsule:  # added ones first: the default capsule is never missing
            if c.name not in served:
                try:
                    await self._add_capsule(c)
                except (engine.EngineError, OSError, ConfigError) as e:
                    errors.append(f"capsule {c.name} not added: {e}")
        for name in served.keys() - {c.name for c in self.cfg.capsule}:
            await self._remove_capsule(name)
        # What runs is what opened: a capsule that failed is tried again by the next reload.
        self.cfg = msgspec.structs.replace(self.cfg, capsule=[c for c in self.cfg.capsule if c.name in self.services])
        for c in self.cfg.capsule:
            old = served.get(c.name)
            watched = ("watch", "include", "exclude", "skip_generated")
            if old is not None and ([getattr(old, k) for k in watched] != [getattr(c, k) for k in watched]
                                    or before.watcher != self.cfg.watcher):
                await self._rewatch(c)
        if self.queries is not None and self.cfg.capsule:
            self.queries.default = self.cfg.default_capsule.name
        applied = changes(before, self.cfg)
        for line in applied:
            log.info("reload: %s", line)
        for line in pending:
            log.warning("reload: %s", line)
        for line in errors:
            log.error("reload: %s", line)
        log.info("reloaded source=%s changes=%s capsules=%s", new.source, len(applied), ",".join(self.services))
        return p.ReloadReply(source=new.source, applied=applied, pending=pending, errors=errors)

    def _apply_settings(self) -> None:
        """The settings read where they are used (limits, durability, log level)."""
        cfg = self.cfg
        set_log_level(cfg.daemon.log_level)
        for svc in self.services.values():
            svc.interval = self._interval_ms() / 1000
        q = self.queries
        if q is not None:
            q.max_frame, q.max_put, q.tail_buffer = cfg.limits.max_frame_bytes, cfg.limits.max_put_bytes, \
                cfg.limits.tail_buffer
            q.door.limit = q.events.limit = cfg.limits.max_connections
            q.budget.limit = cfg.limits.max_buffer_bytes

    async def _rewatch(self, c: CapsuleConfig) -> None:
        """Capsule ``c`` watches its new roots, with its new globs and watcher settings."""
        svc, trees, w = self.services[c.name], self._trees(c), self.cfg.watcher
        if svc.indexer is not None:
            svc.indexer.retarget(trees, chunk_size=w.chunk_size, overlap=w.chunk_overlap, debounce_ms=w.debounce_ms)
        elif trees:
            svc.indexer = self._indexer(svc, trees)
            await self.tasks[c.name].start(svc.indexer.run)

    def _status(self) -> str:
        # On the event loop: lock-free counts only (stats() waits for a writer's fsync).
        parts = [f"{name}: {svc.cap.frame_count} frames" for name, svc in self.services.items()]
        return "serving " + "; ".join(parts)

    async def _report_status(self) -> None:
        while True:
            await trio.sleep(10)
            systemd.notify(f"STATUS={self._status()}")

    async def _close_all(self) -> None:
        with trio.move_on_after(self.cfg.daemon.shutdown_grace_s, shield=True) as scope:
            for name in list(self.services):
                svc = self.services.pop(name)
                await svc.close()  # commits what is staged, then closes the file
        if scope.cancelled_caught:
            log.error("shutdown grace of %ss exceeded; exiting anyway", self.cfg.daemon.shutdown_grace_s)


def _sole(e: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, as raised through nurseries."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def run(cfg: Config, reread: Callable[[], Config] | None = None) -> int:
    setup_logging(cfg.daemon.log_level)
    fix_mmap_threshold()  # before the heaps fill: see memory.py
    try:
        return trio.run(Daemon(cfg, reread).run)
    except BaseException as raised:  # noqa: BLE001 - re-raised unless it is a start-up refusal
        e = _sole(raised)
        if isinstance(e, (ConfigError, engine.UnsafeDirectory)):
            log.error("%s", e)
            return 2
        if isinstance(e, engine.CapsuleLocked):
            log.error("%s", e)
            return 1
        raise
