"""The daemon's configuration: strict msgspec structs decoded from TOML, and where it is.

``config.toml`` at the repository root documents every key; the same file ships inside
the package (``memvidd/default_config.toml``, kept identical by a test). Every command
finds the same file (``locate``): ``--config``, else ``$MEMVIDD_CONFIG``, else the user's
``$XDG_CONFIG_HOME/memvidd/config.toml`` (``~/.config/...``) if it exists, else the
embedded default. ``memvidd init`` writes the default there (``user_path``). An unknown
key or a bad value is an error naming the key and the file, never a silent fallback to
the default, and the daemon does not start.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import msgspec

Positive = Annotated[int, msgspec.Meta(gt=0)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class Base(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, rename="kebab"):
    pass


class Daemon(Base, frozen=True):
    socket: str = "$XDG_RUNTIME_DIR/memvidd/memvidd.sock"
    events_socket: str = "$XDG_RUNTIME_DIR/memvidd/events.sock"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    shutdown_grace_s: Annotated[float, msgspec.Meta(gt=0, le=600)] = 10.0


class Durability(Base, frozen=True):
    policy: Literal["commit", "interval"] = "commit"
    interval_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 5


class Limits(Base, frozen=True):
    max_frame_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = 16 << 20
    max_put_bytes: Annotated[int, msgspec.Meta(ge=1, le=256 << 20)] = 8 << 20
    max_connections: Positive = 1024  # on each socket
    max_buffer_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 34)] = 256 << 20  # all clients' bytes held
    tail_buffer: Positive = 1024  # events queued for one tail subscriber before it is dropped


class Embedding(Base, frozen=True):
    model: str = "all-MiniLM-L6-v2"  # "none": lexical search only
    threads: NonNegative = 0  # 0: all cores
    batch_size: Positive = 8


class Watcher(Base, frozen=True):
    debounce_ms: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 20
    max_file_bytes: Positive = 2 << 20
    chunk_size: Annotated[int, msgspec.Meta(ge=200, le=100_000)] = 1500
    chunk_overlap: NonNegative = 150
    max_document_bytes: Positive = 64 << 20
    document_budget_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0
    document_memory_bytes: Annotated[int, msgspec.Meta(ge=256 << 20)] = 1 << 30


class Cache(Base, frozen=True):
    result_bytes: NonNegative = 16 << 20
    block_bytes: NonNegative = 32 << 20


class EngineOptions(Base, frozen=True):
    level: Annotated[int, msgspec.Meta(ge=1, le=22)] = 3
    checkpoint_bytes: Positive = 8 << 20
    checkpoint_frames: Positive = 4096
    upgrade_codecs: bool = True
    upgrade_idle_ms: Annotated[int, msgspec.Meta(ge=10, le=3_600_000)] = 5000
    upgrade_cold_commits: NonNegative = 100
    compact_dead_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.5  # 0: never compact by itself


class CapsuleConfig(Base, frozen=True):
    name: str
    path: str
    watch: list[str] = []
    include: list[str] = []
    exclude: list[str] = []
    skip_generated: bool = True  # pass over generated and vendored data (tree.GENERATED)
    # An encrypted capsule's passphrase source (at most one; read at open, never logged).
    passphrase_env: str | None = None  # an environment variable of the daemon
    passphrase_file: str | None = None  # a file (not readable by others)
    passphrase_credential: str | None = None  # a systemd credential ($CREDENTIALS_DIRECTORY)
    engine: EngineOptions = EngineOptions()

    def passphrase_sources(self) -> dict[str, str]:
        """The configured passphrase source(s), as ``engine.read_passphrase`` keywords."""
        given = {"env": self.passphrase_env, "file": self.passphrase_file, "credential": self.passphrase_credential}
        return {k: (expand(v) if k == "file" else v) for k, v in given.items() if v is not None}


class Config(Base, frozen=True):
    daemon: Daemon = Daemon()
    durability: Durability = Durability()
    limits: Limits = Limits()
    embedding: Embedding = Embedding()
    cache: Cache = Cache()
    watcher: Watcher = Watcher()
    capsule: list[CapsuleConfig] = []
    source: str = ""  # where it was read from (set by ``load``, not a TOML key)

    @property
    def default_capsule(self) -> CapsuleConfig:
        return self.capsule[0]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


TMP = "/tmp"


def runtime_dir() -> str:
    """``$XDG_RUNTIME_DIR``, else memvidd's fallback ``/tmp/memvidd-$UID``."""
    return os.environ.get("XDG_RUNTIME_DIR") or os.path.join(TMP, f"memvidd-{os.getuid()}")


def private_socket_dir(path: str) -> None:
    """Make the directory of socket ``path`` one only this user can use (missing parts
    made 0700), else ``ConfigError``: another user able to write there could replace the
    socket. Under the runtime directory, that directory and each one down to the
    socket's are checked (the fallback in /tmp is where a neighbour could make it first)."""
    parent, runtime = os.path.dirname(os.path.abspath(path)), os.path.abspath(runtime_dir())
    top = runtime if os.path.commonpath([parent, runtime]) == runtime else parent
    from engine import private_dir  # here: a client reading the config has no use for the engine

    try:
        private_dir(parent, top=top)
    except OSError as e:  # UnsafeDirectory (a StorageError), or a failed mkdir
        raise ConfigError(f"socket {path}: {e}") from None


def private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents 0700: what they will hold (capsules,
    their names) is nobody else's business. Existing directories are left as they are."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
        os.chmod(d, 0o700)  # the umask may have narrowed what mkdir gave


def expand(value: str) -> str:
    """``~`` and ``$VARS`` expanded, with the XDG base directories' documented fallbacks."""
    home = os.path.expanduser("~")
    env = {
        "XDG_RUNTIME_DIR": runtime_dir(),
        "XDG_DATA_HOME": os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share"),
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"),
        "XDG_CONFIG_HOME": os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"),
    }
    for var, default in env.items():
        value = value.replace("${" + var + "}", default).replace("$" + var, default)
    return os.path.expandvars(os.path.expanduser(value))


def default_text() -> str:
    return resources.files("memvidd").joinpath("default_config.toml").read_text()


def parse(text: str, source: str, *, client: bool = False) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        # msgspec names the key as a path, e.g. "$.capsule[0].engine.level"
        raise ConfigError(f"{source}: {e}") from None
    if not cfg.capsule:
        raise ConfigError(f"{source}: at least one [[capsule]] is required")
    for i, c in enumerate(cfg.capsule):
        given = [key for key, value in (("passphrase-env", c.passphrase_env), ("passphrase-file", c.passphrase_file),
                                        ("passphrase-credential", c.passphrase_credential)) if value is not None]
        if len(given) > 1:
            raise ConfigError(f"{source}: capsule {c.name!r}: {' and '.join(given)} both given, but a capsule "
                              f"has at most one passphrase source - at `$.capsule[{i}].{given[1]}`")
        for key in given:
            if not getattr(c, key.replace("-", "_")):
                raise ConfigError(f"{source}: capsule {c.name!r}: {key} must not be empty - at `$.capsule[{i}].{key}`")
    names = [c.name for c in cfg.capsule]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: capsule names must be unique, got {names}")
    if cfg.embedding.model != "none" and not client:
        from engine import MODELS  # here: a client reading the config has no use for the engine

        if cfg.embedding.model not in MODELS:
            known = sorted(MODELS)
            raise ConfigError(f"{source}: embedding.model {cfg.embedding.model!r} is not one of {known} or 'none'")
    return msgspec.structs.replace(cfg, source=source)


ENV = "MEMVIDD_CONFIG"


def user_path() -> Path:
    """The user's configuration file, ``$XDG_CONFIG_HOME/memvidd/config.toml`` (its
    documented fallback: ``~/.config/memvidd/config.toml``), whether it exists or not."""
    return Path(expand("$XDG_CONFIG_HOME/memvidd/config.toml"))


def locate(explicit: str | os.PathLike[str] | None = None) -> str | None:
    """The configuration file every command uses: ``explicit`` (``--config``), else
    ``$MEMVIDD_CONFIG``, else the user's file if it exists; None: the embedded default.
    A file named by the first two must exist (``load`` says so); the user's file is
    looked for, as is the default in its place."""
    if explicit is not None:
        return os.fspath(explicit)
    if os.environ.get(ENV):
        return os.environ[ENV]
    path = user_path()
    return str(path) if os.path.lexists(path) else None  # a dangling link: an error, not the default


def default_socket(explicit: str | os.PathLike[str] | None = None) -> str:
    """The agent socket of the configuration ``locate`` finds (what a client connects to
    when told nothing): the whole file is checked, except what would load the engine."""
    return expand(load(locate(explicit), client=True).daemon.socket)


def load(path: str | os.PathLike[str] | None = None, *, client: bool = False) -> Config:
    """The configuration in ``path``, or the embedded default. ``client``: a command that
    talks to a daemon or reads a capsule, which skips the one check that loads the engine
    (the embedding model's name: the daemon checks it when it starts)."""
    if path is None:
        return parse(default_text(), "<default config.toml>", client=client)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, str(path), client=client)
