"""Shared fixtures.  The end-to-end ones (journald, sshd, users, agent) wrap
tests/realsys.py and are only set up by tests that ask for them."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import realsys  # noqa: E402

AGENT_SCRIPT = os.path.normpath(
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "pamsignal.py"
    )
)
READY_TEXT = "following the journal"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "e2e: end to end against real journald, sshd, sudo, su "
        "(root; see docs/CONTRIBUTING.md)",
    )


# ---------------------------------------------------------------- real system


@pytest.fixture(scope="session")
def journald():
    realsys.ensure_journald()
    return True


@pytest.fixture(scope="session")
def tree(journald):
    """The cached Debian 13 tree (OpenSSH 10, Python 3.13), built here
    when missing, except under CI, where .ci/run must have built it."""
    realsys.require_root()
    if realsys.trixie_tree_complete():
        return realsys.TRIXIE_TREE
    if realsys.in_ci():
        pytest.fail(
            "the Debian 13 tree %s is missing or incomplete; .ci/run must "
            "build it before the tests (python3 tests/realsys.py "
            "trixie-tree)" % realsys.TRIXIE_TREE,
            pytrace=False,
        )
    try:
        path, _ = realsys.build_trixie_tree()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        realsys.unavailable("cannot build the Debian 13 tree: %s" % error)
    return path


@pytest.fixture(scope="session")
def sshd(journald):
    port = realsys.ensure_sshd()
    yield port
    realsys.stop_sshd()


@pytest.fixture(scope="session")
def debian_package(tmp_path_factory):
    """`make deb` of this source tree, once per session: the .deb's path."""
    realsys.require_binaries("make", "dpkg-buildpackage", "dh")
    dist = tmp_path_factory.mktemp("dist")
    realsys.build_deb(os.path.dirname(AGENT_SCRIPT), str(dist))
    (deb,) = dist.glob("pamsignal_*_all.deb")
    return str(deb)


class Users(object):
    """The session's throw-away users: `plain` (with an ed25519 key),
    `sudoer` (in group sudo) and `target` (an account to su to)."""


@pytest.fixture(scope="session")
def users(journald):
    realsys.require_root()
    u = Users()
    u.plain, u.plain_pw = realsys.create_user("psep")
    u.sudoer, u.sudoer_pw = realsys.create_user("pses", groups=("sudo",))
    u.target, u.target_pw = realsys.create_user("pset")
    keydir = tempfile.mkdtemp(prefix="pamsignal-e2e-key-")
    u.key_path, u.key_fp = realsys.make_keypair(keydir)
    realsys.authorize_key(u.plain, u.key_path)
    yield u
    realsys.delete_all_users()
    shutil.rmtree(keydir, ignore_errors=True)


@pytest.fixture
def make_user(journald):
    """Factory for a fresh user private to one test: make_user(groups=())."""
    made = []

    def make(groups=()):
        name, pw = realsys.create_user("psef", groups=groups)
        made.append(name)
        return name, pw

    yield make
    for name in made:
        realsys.delete_user(name)


# ---------------------------------------------------------------- the agent


def field(obj, dotted, default=None):
    """ev["a"]["b"]["c"] for "a.b.c", or default."""
    cur = obj
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


class Agent(object):
    """`python3 pamsignal.py --config CFG run --json` as users run it.

    stdout is read line by line in a thread (one ECS object per line),
    stderr likewise; start() returns once stderr says READY_TEXT."""

    def __init__(self, workdir, python=None):
        self.workdir = workdir
        self.state_dir = os.path.join(workdir, "state")
        self.config = os.path.join(workdir, "pamsignal.conf")
        with open(self.config, "w") as f:
            f.write(
                "[pamsignal]\nstate_dir = %s\nlog_dir = %s\n"
                "first_start = now\n"
                % (self.state_dir, os.path.join(workdir, "log"))
            )
        os.chmod(self.config, 0o600)
        self.python = (
            python or os.environ.get("PAMSIGNAL_PYTHON") or sys.executable
        )
        self.proc = None
        self.returncodes = []
        self.leftovers = []  # (pid, cmdline) left in its group at stop
        self._events = []  # decoded objects, all runs, in order read
        self._run_starts = []  # index into _events where each run began
        self.bad_lines = []  # stdout lines that were not a JSON object
        self.stderr_lines = []
        self._cond = threading.Condition()
        self._threads = []
        self._ready = threading.Event()

    @property
    def cmd(self):
        return [
            self.python,
            AGENT_SCRIPT,
            "--config",
            self.config,
            "run",
            "--json",
        ]

    def _read_stdout(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                obj = None
            with self._cond:
                if isinstance(obj, dict):
                    self._events.append(obj)
                else:
                    self.bad_lines.append(line)
                self._cond.notify_all()
        stream.close()

    def _read_stderr(self, stream):
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.stderr_lines.append(line)
                self._cond.notify_all()
            if READY_TEXT in line:
                self._ready.set()
        stream.close()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=30):
        assert not self.running(), "agent already running"
        self._ready.clear()
        with self._cond:
            self._run_starts.append(len(self._events))
            self.stderr_lines.append("---- start %s" % " ".join(self.cmd))
        # Own process group: stop() can clean up what the agent leaves
        # behind, as systemd does with the service's cgroup.
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=self.workdir,
            start_new_session=True,
        )
        self._threads = [
            threading.Thread(
                target=self._read_stdout, args=(self.proc.stdout,), daemon=True
            ),
            threading.Thread(
                target=self._read_stderr, args=(self.proc.stderr,), daemon=True
            ),
        ]
        for t in self._threads:
            t.start()
        deadline = time.time() + timeout
        while not self._ready.wait(0.1):
            if self.proc.poll() is not None:
                self._join(5)
                pytest.fail(
                    "agent exited with %s before it was ready:\n%s"
                    % (self.proc.returncode, self.stderr_text()),
                    pytrace=False,
                )
            if time.time() > deadline:
                pytest.fail(
                    "agent not ready (no %r on stderr) within %ss:\n%s"
                    % (READY_TEXT, timeout, self.stderr_text()),
                    pytrace=False,
                )
        return self

    def _join(self, timeout):
        for t in self._threads:
            t.join(timeout)

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Send `sig`, wait for the exit, drain the output; return the
        exit code."""
        if self.proc is None:
            return None
        proc = self.proc
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
            self.stderr_lines.append(
                "---- agent ignored signal %s for %ss; killed" % (sig, timeout)
            )
        # Whatever it left behind in its process group (e.g. journalctl after
        # SIGKILL) goes too, or our pipes never reach EOF.
        self.leftovers = self._group_members(proc.pid)
        if self.leftovers:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self._join(10)
        self.returncodes.append(rc)
        self.proc = None
        return rc

    @staticmethod
    def _group_members(pgid):
        found = []
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % d) as f:
                    stat = f.read()
                fields = stat.rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    with open("/proc/%s/cmdline" % d, "rb") as f:
                        found.append(
                            (
                                int(d),
                                f.read()
                                .replace(b"\0", b" ")
                                .decode(errors="replace"),
                            )
                        )
            except (OSError, IndexError, ValueError):
                continue
        return found

    def restart(self, sig=signal.SIGTERM):
        if self.running():
            self.stop(sig)
        return self.start()

    # -- reading what it printed

    def events(self, since=0):
        with self._cond:
            return list(self._events[since:])

    def mark(self):
        """Index to pass as `since` to read only what comes after now."""
        with self._cond:
            return len(self._events)

    def run_events(self, run=-1):
        """Events printed by one run (default: the latest)."""
        with self._cond:
            starts = self._run_starts + [len(self._events)]
            idx = run if run >= 0 else len(self._run_starts) + run
            return list(self._events[starts[idx] : starts[idx + 1]])

    def wait_event(self, predicate, timeout=20, since=0):
        """First decoded object (index >= since) for which predicate holds."""
        deadline = time.time() + timeout
        with self._cond:
            i = since
            while True:
                while i < len(self._events):
                    ev = self._events[i]
                    i += 1
                    if predicate(ev):
                        return ev
                left = deadline - time.time()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        pytest.fail(
            "no matching event within %ss. Events since #%d:\n%s\nstderr:\n%s"
            % (timeout, since, self.dump(since), self.stderr_text()),
            pytrace=False,
        )

    def dump(self, since=0, limit=40):
        evs = self.events(since)[-limit:]
        return (
            "\n".join("  " + json.dumps(e, sort_keys=True) for e in evs)
            or "  (none)"
        )

    def stderr_text(self, limit=60):
        with self._cond:
            return "\n".join("  " + s for s in self.stderr_lines[-limit:])


def configured_agent(workdir, extra_config):
    """An Agent (not started) in its own `workdir`, its configuration
    followed by `extra_config` (channels, [alerts], ...)."""
    os.makedirs(workdir, exist_ok=True)
    configured = Agent(workdir)
    with open(configured.config, "a") as config:
        config.write(extra_config)
    return configured


@pytest.fixture
def agent(journald, sshd, tmp_path):
    """A fresh agent per test (first_start = now, so it reports only what
    happens after it started), stopped at the end of the test.  Needs sshd
    for the tests' barrier logins."""
    if not os.path.exists(AGENT_SCRIPT):
        realsys.unavailable("%s does not exist yet" % AGENT_SCRIPT)
    a = Agent(str(tmp_path))
    a.start()
    yield a
    if a.running():
        a.stop(signal.SIGTERM)
    if a.bad_lines:
        pytest.fail(
            "agent printed non-JSON lines on stdout (run --json):\n%s"
            % "\n".join("  " + s for s in a.bad_lines[:20]),
            pytrace=False,
        )


def random_name(prefix="psez"):
    return prefix + secrets.token_hex(4)
