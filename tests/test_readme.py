"""The README runs as typed: its shell and Python blocks, top to bottom, as a new user
would type them in one terminal, in a fresh home directory, against the daemon its own
``memvidd run`` starts; the systemd units it installs pass ``systemd-analyze verify``; and
the commands the daemon prints to try work as typed however it was started.

Annotations (an HTML comment on the line before a block):

- ``<!-- not run: why -->``: the block is shown, not run (``NOT_RUN`` below lists them);
- ``<!-- run in the background: what -->``: started, left running (the daemon), and
  waited for with systemd's readiness protocol (READY=1 on ``$NOTIFY_SOCKET``).

Every other ``sh`` block runs with ``bash -e -o pipefail`` and must exit 0; the variables
it exports reach the blocks after it, as in one terminal. ``python`` blocks run with the
interpreter memvidd is installed in (the one beside the ``memvidd`` found on ``$PATH``).
The install block really installs: a virtual environment and ``pip install .`` of a copy
of this checkout, its dependencies resolved by pip as configured on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(900)

# The blocks not run, and why (the README says why too): a block newly marked so must be
# added here, so that none goes unnoticed.
NOT_RUN = {
    "pipx install .": "alternatives to the block above; neither pipx nor uv is needed",
    "python3 -m venv .venv": "the whole test suite, this test included",
    "systemctl --user daemon-reload": "needs a systemd user manager",
}
ANNOTATION = re.compile(r"<!--\s*(not run|run in the background):\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)
UNITS = ("memvidd.service", "memvidd.socket", "memvidd-events.socket")


@dataclass
class Block:
    lang: str
    code: str
    line: int  # where it starts in README.md
    mode: str = "run"  # "run", "not run", "run in the background"
    why: str = ""


def blocks(text: str) -> list[Block]:
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        b = Block(m.group(1), m.group(2), line)
        if (a := ANNOTATION.search(before)) is not None:
            b.mode, b.why = a.group(1), a.group(2)
        out.append(b)
    return out


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert any(b.code.strip() == ci_command for b in blocks((ROOT / "README.md").read_text()))


def test_every_block_is_shell_or_python_and_those_not_run_are_listed_with_a_reason():
    found = blocks((ROOT / "README.md").read_text())
    assert {b.lang for b in found} <= {"sh", "python", "json"}, "a block the test would not know how to run"
    not_run = [b for b in found if b.mode == "not run"]
    listed = {start: [b for b in not_run if b.code.startswith(start)] for start in NOT_RUN}
    assert all(len(matched) == 1 for matched in listed.values()), listed
    assert len(not_run) == len(NOT_RUN), [b.code.splitlines()[0] for b in not_run]
    for start, (b,) in listed.items():
        assert b.why.startswith(NOT_RUN[start]), (start, b.why)
    assert [b.code.strip() for b in found if b.mode == "run in the background"] == ["memvidd run"]


def test_json_blocks_are_mcp_client_configs_that_start_memvidd_mcp():
    """A JSON block is what a user pastes into an MCP client's configuration: it must parse,
    and its server must be the ``memvidd`` command with ``mcp`` (tests/memvidd/test_mcp.py
    drives that server with the MCP SDK's own client)."""
    found = [b for b in blocks((ROOT / "README.md").read_text()) if b.lang == "json"]
    assert found, "the README shows how to register memvidd with an MCP client"
    for b in found:
        servers = json.loads(b.code)["mcpServers"]
        assert [(Path(s["command"]).name, s["args"]) for s in servers.values()] == [("memvidd", ["mcp"])]


# -- running the README ----------------------------------------------------------------------


@dataclass
class Session:
    """One terminal: a home directory, the environment its blocks exported so far."""

    base: Path
    home: Path
    env: dict[str, str]
    checkout: Path
    ran: list[Block] = field(default_factory=list)
    ran_shell: list[Block] = field(default_factory=list)  # the blocks of ``outputs``
    outputs: list[str] = field(default_factory=list)
    daemon: subprocess.Popen[bytes] | None = None
    daemon_log: Path | None = None
    notify: socket.socket | None = None

    @property
    def env_file(self) -> Path:
        return self.base / "exported.sh"

    def shell(self, block: Block) -> subprocess.CompletedProcess[str]:
        script = self.base / f"block-{block.line}.sh"
        # Each block in a shell of its own, with what the blocks before it exported; what
        # it exports is kept for the next (PWD and the like are the shell's own).
        script.write_text(f"source {self.env_file}\n{block.code}\n"
                          f"export -p | grep -v -E '^declare -x (PWD|OLDPWD|SHLVL|_)=' > {self.env_file}.new\n")
        r = subprocess.run(["bash", "-e", "-o", "pipefail", str(script)], cwd=self.checkout, env=self.env,
                           capture_output=True, text=True, timeout=600)
        if r.returncode == 0:
            os.replace(f"{self.env_file}.new", self.env_file)
        return r

    def python(self, block: Block) -> subprocess.CompletedProcess[str]:
        script = self.base / f"block-{block.line}.py"
        script.write_text(block.code)
        work = self.home / "python-examples"
        work.mkdir(exist_ok=True)
        # The interpreter beside the memvidd the terminal finds (a symlink into its venv).
        run = f'source {self.env_file}\nexec "$(dirname "$(readlink -f "$(command -v memvidd)")")/python" {script}\n'
        return subprocess.run(["bash", "-e", "-c", run], cwd=work, env=self.env, capture_output=True, text=True,
                              timeout=300)

    def background(self, block: Block) -> None:
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = str(self.base / "notify.sock")
        self.notify.bind(path)
        self.daemon_log = self.base / "daemon.log"
        with open(self.daemon_log, "wb") as log:
            self.daemon = subprocess.Popen(["bash", "-c", f"source {self.env_file}\n{block.code}"],
                                           cwd=self.checkout, env={**self.env, "NOTIFY_SOCKET": path},
                                           stdout=log, stderr=log)
        self.notify.settimeout(1.0)
        deadline = time.monotonic() + 120
        while True:
            assert self.daemon.poll() is None, f"the daemon exited:\n{self.daemon_log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no READY=1 in 120 s:\n{self.daemon_log.read_text()[-3000:]}"
            try:
                if "READY=1" in self.notify.recv(65536).decode().split("\n"):
                    return
            except TimeoutError:
                continue

    def stop(self) -> int | None:
        code = None
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                code = self.daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait(timeout=30)
        elif self.daemon is not None:
            code = self.daemon.returncode
        if self.notify is not None:
            self.notify.close()
        return code


def fresh_env(base: Path, home: Path) -> dict[str, str]:
    """A new user's environment: their own home, a private runtime directory, none of
    memvidd's variables, the XDG base directories at their defaults, and a $PATH on
    which no memvidd is found (the README's install has to put one there)."""
    runtime = base / "run"
    runtime.mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MEMVIDD_", "XDG_", "PYTEST", "VIRTUAL_ENV", "NOTIFY_SOCKET", "PYTHON"))}
    dirs = [d for d in env.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "memvidd").exists()]
    env |= {"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime), "PATH": os.pathsep.join(dirs)}
    return env


def copy_checkout(dest: Path) -> Path:
    """This checkout's files as a user would have them (the blocks run in it: `pip install .`
    and `cp systemd/...`), without what builds and runs leave behind."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", "*.egg-info", "build", ".pytest_cache", ".mypy_cache", ".ruff_cache"))
    return dest


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    base = tmp_path_factory.mktemp("readme")
    home = base / "home"
    home.mkdir()
    s = Session(base, home, fresh_env(base, home), copy_checkout(base / "memvidd"))
    s.env_file.write_text("")
    try:
        yield s
    finally:
        s.stop()
        shutil.rmtree(home / ".local" / "lib", ignore_errors=True)  # the installed venv: ~400 MB


@pytest.fixture(scope="module")
def readme_ran(session):
    """Every block of the README, in order; the first failure is reported with its output."""
    for b in blocks((ROOT / "README.md").read_text()):
        if b.mode == "not run":
            continue
        if b.mode == "run in the background":
            session.background(b)
        else:
            r = session.shell(b) if b.lang == "sh" else session.python(b)
            assert r.returncode == 0, (f"README.md line {b.line}, exit {r.returncode}:\n{b.code}\n"
                                       f"--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}")
            session.ran_shell.append(b)
            session.outputs.append(r.stdout)
        session.ran.append(b)
    return session


def test_every_runnable_block_runs_as_typed_and_exits_0(readme_ran):
    ran = {b.line for b in readme_ran.ran}
    every = [b for b in blocks((ROOT / "README.md").read_text()) if b.mode != "not run"]
    assert [b.line for b in every] == sorted(ran)
    print("README blocks not run:")
    for b in blocks((ROOT / "README.md").read_text()):
        if b.mode == "not run":
            print(f"  line {b.line}: {b.code.splitlines()[0]!r}: {b.why}")


def test_the_readme_examples_do_what_they_say(readme_ran):
    """Exit codes are not all: time travel finds the old version, the installed command is
    the one on the PATH, the watched directory is indexed, the daemon is still serving."""
    s = readme_ran
    # The block of "Using it": its only output of the first version is the find --as-of.
    using = next(out for b, out in zip(s.ran_shell, s.outputs, strict=True) if "--as-of" in b.code)
    assert "dark" in using, using
    memvidd = shutil.which("memvidd", path=exported_path(s))
    assert memvidd == str(s.home / ".local" / "bin" / "memvidd")
    assert s.daemon is not None and s.daemon.poll() is None, "the daemon serves until the end"
    deadline = time.monotonic() + 60
    while True:  # the directory the Configuration block watches is indexed
        r = subprocess.run([memvidd, "find", "wombats", "--mode", "lex", "--json"], env=s.env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        if "ideas.md" in r.stdout:
            break
        assert time.monotonic() < deadline, r.stdout
        time.sleep(0.1)
    r = subprocess.run([memvidd, "find", "mode", "--mode", "lex", "--as-of", "@1", "--json"], env=s.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and '"hits":[]' in r.stdout.replace(" ", ""), "before anything: nothing"


def exported_path(s: Session) -> str:
    r = subprocess.run(["bash", "-c", f"source {s.env_file}; printf %s \"$PATH\""], env=s.env, capture_output=True,
                       text=True, timeout=30)
    return r.stdout


def test_the_daemons_hints_run_as_typed(readme_ran):
    s = readme_ran
    assert s.daemon_log is not None
    hints = try_lines(s.daemon_log.read_text())
    assert hints and all(h.startswith("memvidd ") for h in hints), hints  # on the PATH: the bare name
    for hint in hints:
        r = subprocess.run(["bash", "-e", "-c", f"source {s.env_file}\n{hint}"], env=s.env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, (hint, r.stdout, r.stderr)


def test_the_installed_units_pass_systemd_analyze_verify(readme_ran):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not on PATH (apt-get install systemd)")
    s = readme_ran
    units = s.home / ".config" / "systemd" / "user"
    assert sorted(p.name for p in units.iterdir()) == sorted(UNITS), "the README's cp put them there"
    exec_start = s.home / ".local" / "bin" / "memvidd"
    assert os.access(exec_start, os.X_OK), "ExecStart=%h/.local/bin/memvidd is the installed command"
    r = subprocess.run(["systemd-analyze", "verify", "--user", *UNITS], cwd=units, env=s.env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


# -- the daemon's hints, however it was started ----------------------------------------------


def try_lines(log: str) -> list[str]:
    """The commands after "try:" in the daemon's start-up message."""
    lines = log.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("try:"))
    out = [lines[start].split("try:", 1)[1].strip()]
    for line in lines[start + 1:]:
        if not line.startswith("       "):
            break
        out.append(line.strip())
    return out


@pytest.mark.parametrize("how", ["python -m", "a script not on PATH"])
def test_hints_of_a_daemon_started_otherwise_run_as_typed(tmp_path, how):
    """Started as ``python -m memvidd`` or as a virtualenv's ``bin/memvidd`` that is not
    on $PATH, the daemon's hints name it so: a bare ``memvidd`` would not be found."""
    from daemon_util import DaemonProc

    d = DaemonProc(tmp_path)
    d.env = {k: v for k, v in d.env.items() if not k.startswith("MEMVIDD_")} | {"PATH": "/usr/bin:/bin"}
    if how == "python -m":
        command, expected = None, f"{sys.executable} -m memvidd"
    else:
        script = tmp_path / "venv-bin" / "memvidd"
        script.parent.mkdir()
        script.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                          "from memvidd.cli import main\nsys.exit(main())\n")
        script.chmod(0o755)
        command, expected = [str(script)], str(script)
    try:
        d.start(command=command)
        hints = try_lines(d.log.read_text())
        assert len(hints) == 2 and all(h.startswith(expected + " ") for h in hints), hints
        for hint in hints:
            r = subprocess.run(["bash", "-e", "-c", hint], env=d.env, cwd=ROOT, capture_output=True, text=True,
                               timeout=60)
            assert r.returncode == 0, (hint, r.stdout, r.stderr)
    finally:
        d.close()
