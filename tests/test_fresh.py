"""The README's two commands on a fresh Debian 12, for real.

A Debian 12 minbase as debootstrap leaves it (tests/realsys.py bare-tree:
no python3, no pytest, no sshd) gets this repository as a new user gets it
(git clone), and runs the README's test command in a chroot of an overlay
of it, as root: `bash tests/check.sh` with a small selection (the parser
tests and one end-to-end login through a real sshd and journald).  That
installs every package the tests need, starts journald, lints, and runs
the selection with CI=true, so nothing may skip.  Then the README's other
command, `sudo python3 pamsignal.py`, runs there: --version, check-config,
and scan of an export.

The chroot is an overlay (realsys.TreeOverlay) with the host's /proc,
/dev, /dev/pts and /sys bound in; its apt uses the mirror debootstrap took
from the host's apt sources (realsys.apt_debian_mirror).  The host's
journald cannot be reached from it (a chroot sees neither its socket nor
its files), so check.sh starts the chroot's own.  The cached Debian trees
are seen through an overlay too, so check.sh finds them built and nothing
shared is written.  What cannot work in a chroot at all (systemd-nspawn
refuses to boot a container from inside one) is in docs/CONTRIBUTING.md."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

import realsys
from support import REPO, captured_export, event_summary, pamsignal

pytestmark = pytest.mark.e2e

#: The chroot's sshd (tests/realsys.py ensure_sshd) shares the host's
#: network: a port of its own.
SSH_PORT = int(os.environ.get("PAMSIGNAL_FRESH_SSH_PORT", "2341"))
#: Where the clone lives in the fresh machine.
CLONE = "/root/pamsignal"
#: The selection check.sh runs there.
SELECTION = ["tests/test_parse.py",
             "tests/test_e2e.py::test_failed_password_reported_once"]
#: The environment a root login on the fresh machine has (and CI=true).
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:"
       "/bin", "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
       "CI": "true", "PAMSIGNAL_E2E_SSH_PORT": str(SSH_PORT)}
CACHE = "/var/cache/pamsignal-tests"


class FreshMachine(realsys.TreeOverlay):
    """The bare tree as a writable chroot, /sys bound in as well: the
    chroot's journald stops at once without the cgroup file systems under
    /sys/fs/cgroup ("Failed to acquire cgroup root path").  The cached
    trees are seen through an overlay of their own."""

    def __init__(self, tree, workdir):
        super(FreshMachine, self).__init__(
            tree, os.path.join(workdir, "machine"),
            binds=realsys.TreeOverlay.BINDS + ("/sys",))
        self.cache_work = os.path.join(workdir, "cache")

    def start(self, timeout=20):
        super(FreshMachine, self).start(timeout)
        for directory in ("upper", "work"):
            os.makedirs(os.path.join(self.cache_work, directory))
        cache = self.merged + CACHE
        mounted = self._nsenter(["sh", "-c", "mkdir -p %s && %s" % (
            shlex.quote(cache), realsys.overlay_mount_script(
                CACHE, self.cache_work, cache, ()))])
        if mounted.returncode != 0:
            self.stop()
            raise RuntimeError("overlay of %s: %s" % (CACHE,
                                                      mounted.stderr))
        # dpkg's fsyncs are most of an install's time, and this machine
        # is thrown away (debootstrap does the same).
        with open(self.path("/etc/dpkg/dpkg.cfg.d/pamsignal-tests"),
                  "w") as unsafe:
            unsafe.write("force-unsafe-io\n")
        # The host's own CA certificates: where a TLS-inspecting proxy
        # stands between this machine and PyPI, the fresh one needs them
        # to install pip packages, as the host did (ca-certificates adds
        # them to the system store when check.sh installs it).
        local_cas = "/usr/local/share/ca-certificates"
        if os.path.isdir(local_cas):
            os.makedirs(self.path(local_cas), exist_ok=True)
            for name in os.listdir(local_cas):
                if name.endswith(".crt"):
                    shutil.copy(os.path.join(local_cas, name),
                                self.path(os.path.join(local_cas, name)))
        return self

    def clone(self, source):
        """git clone of `source` (as committed) into CLONE, by the
        host's git: the machine has none yet."""
        return self._nsenter(["git", "clone", "-q", source,
                              self.merged + CLONE], timeout=120)

    def command(self, argv, timeout=60):
        """`argv` as root would type it in CLONE, with ENV."""
        return self.run(["env", "-C", CLONE] + argv, env=ENV,
                        stdin=subprocess.DEVNULL, timeout=timeout)

    def stop(self, timeout=10):
        # What check.sh left running in there (its journald, sshd) holds
        # the mounts: stopped by pid, as nothing else runs in this root.
        if self.holder is not None:
            for pid in realsys._procs_rooted_in(self.path("/")):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        super(FreshMachine, self).stop(timeout)
        for directory in ("upper", "work"):
            realsys._run(["rm", "-rf", "--one-file-system",
                          os.path.join(self.cache_work, directory)])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    realsys.require_root()
    realsys.require_binaries("git", "unshare", "nsenter", "chroot")
    tree = realsys.require_tree(realsys.BARE_TREE, realsys.BARE_NEEDS,
                                realsys.build_bare_tree,
                                "bare Debian 12 tree")
    machine = FreshMachine(tree, str(tmp_path_factory.mktemp("fresh")))
    machine.start()
    try:
        machine.python_before = os.path.lexists(
            machine.path("/usr/bin/python3"))
        cloned = machine.clone(REPO)
        assert cloned.returncode == 0, cloned.stderr
        started = time.monotonic()
        machine.check = machine.run(
            ["env", "-C", CLONE, "bash", "tests/check.sh"] + SELECTION,
            env=ENV, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            timeout=1800)
        machine.seconds = time.monotonic() - started
        yield machine
    finally:
        machine.stop()
        print("fresh Debian 12: tests/check.sh took %.0f s"
              % getattr(machine, "seconds", -1))


def test_the_machine_starts_without_python3(fresh):
    assert not fresh.python_before
    assert not os.path.lexists(os.path.join(realsys.BARE_TREE,
                                            "usr/bin/python3"))


def test_the_readme_test_command_installs_and_runs_the_tests(fresh):
    output = fresh.check.stdout
    assert fresh.check.returncode == 0, output[-6000:]
    for step in ("Debian packages", "Python packages (CI-only tools)",
                 "journald", "vermin (Python 3.6+)", "ruff", "tests"):
        assert "\n==> %s" % step in output, step
    # pytest's summary: every selected test ran and passed.
    (summary,) = re.findall(r"^(\d+) passed(?:, \d+ warnings?)? in ",
                            output, re.M)
    parse_tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only",
         os.path.join(REPO, "tests", "test_parse.py")],
        stdout=subprocess.PIPE, universal_newlines=True, cwd=REPO)
    collected = re.search(r"^(\d+) tests? collected", parse_tests.stdout,
                          re.M)
    assert int(summary) == int(collected.group(1)) + 1
    assert not re.search(r"\b(skipped|failed|error)\b", output.split(
        "\n==> tests", 1)[1])
    assert os.path.lexists(fresh.path("/usr/bin/python3"))


def test_pamsignal_runs_as_the_readme_says(fresh):
    version = fresh.command(["sudo", "python3", "pamsignal.py",
                             "--version"])
    assert (version.returncode, version.stdout) == (
        0, "pamsignal %s\n" % pamsignal.__version__), version.stderr
    checked = fresh.command(["sudo", "python3", "pamsignal.py",
                             "check-config"])
    assert (checked.returncode, checked.stdout) == (
        0, "/etc/pamsignal/pamsignal.conf: no such file; built-in "
        "defaults apply\n"), checked.stderr
    export, actions = captured_export()
    with open(fresh.path("/root/export.json"), "w") as handle:
        handle.write(export)
    scanned = fresh.command(["sudo", "python3", "pamsignal.py", "scan",
                             "--json", "/root/export.json"])
    assert scanned.returncode == 0, scanned.stderr
    host = subprocess.run(
        [sys.executable, os.path.join(REPO, "pamsignal.py"), "scan",
         "--json", "-"], input=export, stdout=subprocess.PIPE,
        universal_newlines=True, check=True)
    assert event_summary(scanned.stdout) == event_summary(host.stdout)
    assert {action for action, _, _ in event_summary(scanned.stdout)} \
        >= actions
