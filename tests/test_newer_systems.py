"""Newer software for real: Debian 13 (trixie), OpenSSH 10 and Python 3.13.

The fixtures in messages.json give OpenSSH 9.8+/10 wording from the source
code; here the real thing writes it.  A debootstrapped Debian 13 tree
(cached in /var/cache/pamsignal-tests/trixie, built by .ci/run with
`python3 tests/realsys.py trixie-tree`) supplies:

- its OpenSSH 10 sshd, run chrooted on 127.0.0.1 port 2223 (realsys.
  ChrootSshd), logging into the host's journald.  Three connections (a
  wrong password, an unknown user, the right password running `sleep 1`)
  are read back from the journal and fed, exactly as journald stored them,
  to `pamsignal.py scan --json -`;
- its Python 3.13, which must print byte for byte what the host's Python
  prints for the same export.

What OpenSSH 10.0p2 (Debian 13) wrote, as recorded by these tests (see
also the notes at the end of realsys.py):

- every line of a connection has SYSLOG_IDENTIFIER=sshd-session,
  _COMM=sshd-session, _UID=0, _TRANSPORT=syslog, pre-auth ones included;
  none came as sshd-auth: sshd-auth hands its messages ("... [preauth]")
  to sshd-session over the monitor, and sshd-session writes them.  Only the
  listener logs as sshd.  The post-login child logs as sshd-session with
  the user's _UID, and mostly no _EXE (journald finds none once the child
  has exited; sometimes it is quicker and records one);
- _EXE is the *host* path of the binary in the tree
  (/var/cache/pamsignal-tests/trixie/usr/lib/openssh/sshd-session);
- the wording: "Failed password for U from 127.0.0.1 port N ssh2",
  "Invalid user X from 127.0.0.1 port N", "Failed password for invalid
  user X from 127.0.0.1 port N ssh2", "Accepted password for U from
  127.0.0.1 port N ssh2", "pam_unix(sshd:session): session opened for user
  U(uid=N) by U(uid=0)" (Linux-PAM 1.7), "pam_unix(sshd:session): session
  closed for user U".

By hand, without root or when the tree cannot be built (no debootstrap, no
network), these tests skip with the reason.  Under CI=true a missing tree
fails them: .ci/run must have built it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

import realsys
from conftest import field, random_name
from support import PAMSIGNAL, REPO, make_entry, pamsignal

pytestmark = pytest.mark.e2e

SSHD_PROGRAMS = ("sshd", "sshd-session", "sshd-auth")
#: _EXE of each OpenSSH 10 program on a real Debian 13 host.
TRIXIE_EXE = {
    "sshd": "/usr/sbin/sshd",
    "sshd-session": "/usr/lib/openssh/sshd-session",
    "sshd-auth": "/usr/lib/openssh/sshd-auth",
}
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures",
                        "messages.json")


# ---------------------------------------------------------------- the tree


def _text(value):
    if isinstance(value, list):
        return bytes(value).decode("utf-8", "replace")
    return value or ""


def scan(entries, python=None):
    """`python3 pamsignal.py scan --json -` with the entries on stdin."""
    data = "".join(json.dumps(e) + "\n" for e in entries)
    p = subprocess.run(
        [python or sys.executable, PAMSIGNAL, "scan", "--json", "-"],
        input=data, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


# ---------------------------------------------------------------- OpenSSH 10


class Run(object):
    """What the three connections made the tree's sshd write."""


@pytest.fixture(scope="module")
def openssh10(tree):
    realsys.require_binaries("ssh", "sshpass", "unshare", "chroot")
    run = Run()
    run.tree = os.path.realpath(tree)
    run.user, password = realsys.create_tree_user(tree, "psn")
    run.invalid = random_name("psnx")
    sshd = realsys.ChrootSshd(tree)
    try:
        sshd.start()
        run.port = sshd.port
        cursor = realsys.journal_cursor()

        r = realsys.ssh_password(run.user, "wrong-" + password,
                                 port=sshd.port)
        assert r.returncode == 255, r
        realsys.wait_for_journal(
            r"^Connection closed by authenticating user %s 127\.0\.0\.1 "
            r"port \d+ \[preauth\]$" % run.user, cursor)

        r = realsys.ssh_password(run.invalid, password, port=sshd.port)
        assert r.returncode == 255, r
        realsys.wait_for_journal(
            r"^Connection closed by invalid user %s 127\.0\.0\.1 "
            r"port \d+ \[preauth\]$" % run.invalid, cursor)

        r = realsys.ssh_password(run.user, password, cmd="sleep 1",
                                 port=sshd.port)
        assert r.returncode == 0, r
        realsys.wait_for_journal(
            r"^pam_unix\(sshd:session\): session closed for user %s$"
            % run.user, cursor)
        realsys.wait_for_journal(
            r"^Disconnected from user %s 127\.0\.0\.1 port \d+$" % run.user,
            cursor)

        # The entries the tree's programs wrote: _EXE inside the tree, or
        # the post-login child when it has no _EXE (the host's own OpenSSH
        # 9.2 never logs as sshd-session or sshd-auth).
        run.entries = [
            e for e in realsys.journal_entries(cursor)
            if _text(e.get("_EXE")).startswith(run.tree + "/")
            or ("_EXE" not in e
                and e.get("SYSLOG_IDENTIFIER") in ("sshd-session",
                                                   "sshd-auth"))]
    finally:
        sshd.stop()
        realsys.delete_tree_user(tree, run.user)
    return run


def on_trixie_host(entry, tree):
    """The entry as a real Debian 13 host's journald stores it: _EXE is
    the binary's path on that host; nothing else differs."""
    entry = dict(entry)
    exe = _text(entry.get("_EXE"))
    if exe.startswith(tree + "/"):
        entry["_EXE"] = exe[len(tree):]
    return entry


def the_line(run, pattern):
    """The one entry whose MESSAGE matches `pattern`; its match."""
    rx = re.compile(pattern)
    found = [(e, rx.match(_text(e.get("MESSAGE")))) for e in run.entries]
    found = [(e, m) for e, m in found if m]
    assert len(found) == 1, "%d entries match /%s/ in:\n%s" % (
        len(found), pattern, dump_entries(run.entries))
    return found[0]


def dump_entries(entries):
    return "\n".join(
        "  %s _EXE=%s _UID=%s: %s" % (
            e.get("SYSLOG_IDENTIFIER"), e.get("_EXE"), e.get("_UID"),
            _text(e.get("MESSAGE"))) for e in entries)


def test_openssh10_writes_its_lines_as_sshd_session(openssh10):
    """The real lines, their writer and their wording (recorded above)."""
    run = openssh10
    u, x = re.escape(run.user), re.escape(run.invalid)
    lines = [
        r"^Failed password for %s from 127\.0\.0\.1 port \d+ ssh2$" % u,
        r"^Invalid user %s from 127\.0\.0\.1 port \d+$" % x,
        r"^Failed password for invalid user %s from 127\.0\.0\.1 "
        r"port \d+ ssh2$" % x,
        r"^Accepted password for %s from 127\.0\.0\.1 port \d+ ssh2$" % u,
        r"^pam_unix\(sshd:session\): session opened for user %s\(uid=\d+\)"
        r" by \S*\(uid=0\)$" % u,
        r"^pam_unix\(sshd:session\): session closed for user %s$" % u,
    ]
    for pattern in lines:
        entry, _ = the_line(run, pattern)
        ident = entry["SYSLOG_IDENTIFIER"]
        assert ident in ("sshd-session", "sshd-auth"), dump_entries([entry])
        assert entry["_EXE"] == run.tree + TRIXIE_EXE[ident]
        assert entry["_COMM"] == ident
        assert entry["_UID"] == "0"
        assert entry["_TRANSPORT"] == "syslog"
    # The post-login child: the user's UID; _EXE only when journald looked
    # it up before the child exited (it races, both are seen).
    entry, _ = the_line(
        run, r"^Disconnected from user %s 127\.0\.0\.1 port \d+$" % u)
    assert entry["SYSLOG_IDENTIFIER"] == "sshd-session"
    assert entry["_UID"] != "0"
    assert entry.get("_EXE", run.tree + TRIXIE_EXE["sshd-session"]) == (
        run.tree + TRIXIE_EXE["sshd-session"])


def test_openssh10_as_written_in_a_chroot_is_spoofed_entry(openssh10):
    """Exactly as journald wrote them, every authentication line of the
    chrooted sshd is a spoofed_entry, and that is right.

    journald reads _EXE from /proc/PID/exe in its own root, so it records
    the binary's host path, /var/cache/pamsignal-tests/trixie/usr/lib/
    openssh/sshd-session.  That directory is not a system directory (an
    ordinary cache that another admin, a package or a container could put
    any program in), so PAMSignal cannot tell this writer from a forger who
    copied a program named sshd-session somewhere and runs it as root in a
    chroot.  Saying so loudly (severity 8, with the writer's UID and
    executable and what the line claimed) and reporting no user or source
    is the trust rule of pamsignal(8) working as documented."""
    run = openssh10
    as_written = scan(run.entries)
    # One spoofed_entry per line that claims something: what the parser
    # makes of the same line from the real host's sshd-session (the PAM
    # and "Connection closed" lines too, which pairing folds into the
    # attempt's event when the writer is genuine).
    real = [pamsignal.event_to_ecs(event) for event in (
        pamsignal.parse_entry(on_trixie_host(e, run.tree))
        for e in run.entries) if event is not None]
    assert len(as_written) == len(real) == 10, "\n".join(
        json.dumps(e, sort_keys=True) for e in as_written)
    for ev, want in zip(as_written, real):
        assert field(ev, "event.action") == "spoofed_entry", ev
        assert field(ev, "event.severity") == 8
        assert field(ev, "pamsignal.claimed_action") == field(
            want, "event.action")
        assert field(ev, "pamsignal.writer_uid") == 0
        assert field(ev, "process.name") == "sshd-session"
        assert field(ev, "process.executable") == (
            run.tree + "/usr/lib/openssh/sshd-session")
        assert field(ev, "service.name") == "sshd"
        assert "user" not in ev and "source" not in ev, ev
        assert ev["message"] == want["message"]
        assert ev["@timestamp"] == want["@timestamp"]
        assert field(ev, "pamsignal.cursor") == field(want,
                                                      "pamsignal.cursor")


def test_openssh10_on_a_trixie_host_gives_the_readme_events(openssh10):
    """With _EXE as on a real Debian 13 host and everything else as
    written: one login_failure per attempt (the PAM and "Connection
    closed" lines add none, and "Invalid user" is folded into its "Failed
    password for invalid user", pamsignal(8) "One attempt, one event"), then
    login_success, session_opened and session_closed with the duration of
    `sleep 1`. Two guesses at a password, fewer than the 3 that make a
    success suspicious (README "Detection")."""
    run = openssh10
    entries = [on_trixie_host(e, run.tree) for e in run.entries]
    exes = set(e["_EXE"] for e in entries if "_EXE" in e
               and e.get("SYSLOG_IDENTIFIER") in SSHD_PROGRAMS)
    assert exes <= set(TRIXIE_EXE.values()), exes
    events = scan(entries)
    got = [(field(e, "event.action"), field(e, "event.reason"),
            field(e, "user.name")) for e in events]
    assert got == [
        ("login_failure", "bad_password", run.user),
        ("login_failure", "invalid_user", run.invalid),
        ("login_success", None, run.user),
        ("session_opened", None, run.user),
        ("session_closed", None, run.user),
    ], "\n".join(json.dumps(e, sort_keys=True) for e in events)
    bad, unknown_pw, success, opened, closed = events
    for ev in events:
        assert field(ev, "service.name") == "sshd"
        assert ev["message"] in [_text(e.get("MESSAGE")) for e in entries]
        assert field(ev, "process.pid") > 0

    # The ports are the ones sshd also wrote in lines pamsignal ignores.
    _, m = the_line(run, r"^Connection closed by authenticating user %s "
                    r"127\.0\.0\.1 port (\d+) \[preauth\]$"
                    % re.escape(run.user))
    assert field(bad, "source.ip") == "127.0.0.1"
    assert field(bad, "source.port") == int(m.group(1))
    assert field(bad, "pamsignal.auth_method") == "password"
    assert field(bad, "event.outcome") == "failure"

    _, m = the_line(run, r"^Connection closed by invalid user %s "
                    r"127\.0\.0\.1 port (\d+) \[preauth\]$"
                    % re.escape(run.invalid))
    assert field(unknown_pw, "source.ip") == "127.0.0.1"
    assert field(unknown_pw, "source.port") == int(m.group(1))
    assert field(unknown_pw, "pamsignal.auth_method") == "password"

    _, m = the_line(run, r"^Disconnected from user %s 127\.0\.0\.1 "
                    r"port (\d+)$" % re.escape(run.user))
    assert field(success, "source.ip") == "127.0.0.1"
    assert field(success, "source.port") == int(m.group(1))
    assert field(success, "pamsignal.auth_method") == "password"
    assert field(success, "event.outcome") == "success"

    assert field(opened, "event.category") == ["session"]
    assert field(closed, "event.type") == ["end"]
    assert field(closed, "pamsignal.session_duration_s") >= 1.0
    assert field(opened, "process.pid") == field(closed, "process.pid")


# ---------------------------------------------------------------- Python 3.13


def _extra_entries(start):
    """Forms the fixtures do not have: non-UTF-8 MESSAGE, no MESSAGE,
    control and bidi characters in a user name, a forgery."""
    return [
        make_entry("sshd", list(b"Failed password for invalid user \xff\xfe"
                                b"adm from 203.0.113.9 port 4711 ssh2"),
                   sequence=start),
        make_entry("sshd", "x", sequence=start + 1, MESSAGE=None),
        make_entry("sshd-session", "Accepted password for ev\u202eil\x1b[31m"
                   " from 203.0.113.7 port 2 ssh2", sequence=start + 2),
        make_entry("sshd", "Accepted password for root from 6.6.6.6 port 1 "
                   "ssh2", sequence=start + 3, _UID="65534", _COMM="logger",
                   _EXE="/usr/bin/logger"),
    ]


@pytest.fixture(scope="module")
def py313(tree):
    """A directory inside the tree with pamsignal.py, the example
    configuration and an export of every fixture entry: (host path,
    path inside the tree)."""
    p = realsys.chroot_run(tree, ["python3", "-c",
                                  "import sys; print(sys.version)"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("3.13."), p.stdout
    host = tempfile.mkdtemp(prefix="pamsignal-py313-",
                            dir=os.path.join(tree, "tmp"))
    os.chmod(host, 0o755)
    shutil.copy(PAMSIGNAL, host)
    shutil.copy(os.path.join(REPO, "pamsignal.conf.example"), host)
    with open(FIXTURES, encoding="utf-8") as f:
        cases = json.load(f)
    entries = []
    for number, case in enumerate(cases, 1):
        fields = dict(case["entry"])
        entries.append(make_entry(fields.pop("SYSLOG_IDENTIFIER"),
                                  fields.pop("MESSAGE"), sequence=number,
                                  **fields))
    entries += _extra_entries(len(entries) + 1)
    with open(os.path.join(host, "export.json"), "w") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")
        f.write("this line is not JSON\n")
    yield host, "/" + os.path.relpath(host, tree)
    shutil.rmtree(host, ignore_errors=True)


def both(tree, py313, *args):
    """pamsignal.py ARGS under the host's Python and under the tree's
    Python 3.13, each from the scratch directory; (host, trixie)
    CompletedProcess, bytes.  "{}" in ARGS is the scratch directory."""
    host_dir, inside = py313
    kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    here = subprocess.run(
        [sys.executable, os.path.join(host_dir, "pamsignal.py")]
        + [a.replace("{}", host_dir) for a in args], cwd=host_dir, **kw)
    there = subprocess.run(
        ["chroot", tree, "env", "-C", inside, "python3",
         inside + "/pamsignal.py"] + [a.replace("{}", inside) for a in args],
        **kw)
    return here, there


@pytest.mark.parametrize("json_flag", [["--json"], []], ids=["json", "text"])
def test_python313_scan_prints_the_same_bytes(tree, py313, json_flag):
    here, there = both(tree, py313, "scan", *(json_flag + ["{}/export.json"]))
    assert here.returncode == 0, here.stderr
    assert there.returncode == 0, there.stderr
    assert len(here.stdout.splitlines()) > 100
    assert there.stdout == here.stdout
    assert there.stderr == here.stderr  # the non-JSON line's warning


def test_python313_version_and_check_config(tree, py313):
    here, there = both(tree, py313, "--version")
    assert there.returncode == here.returncode == 0, there.stderr
    assert there.stdout == here.stdout
    assert there.stdout.startswith(b"pamsignal ")

    here, there = both(tree, py313, "--config", "pamsignal.conf.example",
                       "check-config")
    assert there.returncode == here.returncode == 0, there.stderr
    assert there.stdout == here.stdout == (
        b"pamsignal.conf.example: OK (1 channel)\n")

    with open(os.path.join(py313[0], "bad.conf"), "w") as f:
        f.write("[pamsignal]\nstat_dir = /tmp\n")
    here, there = both(tree, py313, "--config", "bad.conf", "check-config")
    assert there.returncode == here.returncode == 78
    assert there.stderr == here.stderr
    assert b"did you mean 'state_dir'" in there.stderr

    here, there = both(tree, py313, "--help")
    assert there.returncode == 0, there.stderr
    assert b"check-config" in there.stdout
