"""Drive the real thing: systemd-journald, OpenSSH, sudo, su, logger.

Plain functions for the end-to-end tests (see docs/CONTRIBUTING.md).
Everything needs root and the real binaries: run by hand without them, a
test skips with the reason; under CI (CI=true) the same condition fails
the test instead, since .ci/run installs everything and nothing may skip
there.

Measured on Debian 12 (OpenSSH 9.2p1, sudo 1.9.13p3, util-linux 2.38.1,
systemd 252 journald, no systemd as PID 1), from `journalctl -o json`:

- sshd logs with SYSLOG_IDENTIFIER=sshd, _TRANSPORT=syslog, _COMM=sshd.
  Pre-auth and session lines ("Failed password ...", "Accepted ...",
  "pam_unix(sshd:auth|session) ...", "Connection closed by ... [preauth]")
  carry _UID=0 and _EXE=/usr/sbin/sshd.  The post-auth child lines
  ("Received disconnect from ...", "Disconnected from user ...") carry the
  *user's* _UID and no _EXE at all.
- One wrong password (sshpass, NumberOfPasswordPrompts=1) gives three lines:
  "pam_unix(sshd:auth): authentication failure; ... rhost=127.0.0.1  user=U",
  "Failed password for U from 127.0.0.1 port N ssh2",
  "Connection closed by authenticating user U 127.0.0.1 port N [preauth]".
- sudo is setuid: its lines carry SYSLOG_IDENTIFIER=sudo, _COMM=sudo,
  _EXE=/usr/bin/sudo and the *caller's* _UID (e.g. 1002), facility authpriv:
  " U : PWD=/tmp ; USER=root ; COMMAND=/usr/bin/echo X" (no TTY= with
  `sudo -S` and no tty; note the leading space), then
  "pam_unix(sudo:session): session opened for user root(uid=0) by (uid=1002)".
  A wrong password: "pam_unix(sudo:auth): authentication failure; logname=
  uid=1002 euid=0 tty= ruser=U rhost=  user=U", "... conversation failed",
  "... auth could not identify password for [U]",
  " U : 1 incorrect password attempt ; PWD=... ; USER=root ; COMMAND=...".
- util-linux su likewise: SYSLOG_IDENTIFIER=su, _EXE=/usr/bin/su, the
  caller's _UID.  Success "(to T) U on pts/0" (facility auth, PRIORITY 5),
  then "pam_unix(su:session): session opened for user T(uid=..) by (uid=..)";
  failure "pam_unix(su:auth): authentication failure; ... ruser=U ... user=T"
  and "FAILED SU (to T) U on pts/0".  su reads the password from stdin even
  without a tty (then the line says "on none"); su_as() below uses a real
  pty so the tty is "pts/N" as for a person.
- runuser (used to become the test users) logs its own
  "pam_unix(runuser:session): session opened for user U(uid=..) by (uid=0)"
  with SYSLOG_IDENTIFIER=runuser, _UID=0.
- `runuser -u nobody -- logger -t sshd MSG` lands as SYSLOG_IDENTIFIER=sshd,
  _TRANSPORT=syslog, _UID=65534, _COMM=logger and _EXE=/usr/bin/logger,
  or no _EXE at all when logger exited before journald looked it up.
- pam_limits / pam_systemd complain in this environment (no systemd, no
  CAP_SYS_RESOURCE): harmless extra lines under sshd, sudo, su, runuser.
- systemd 252 journalctl skips the first matching entry when --after-cursor
  is combined with a match (-t, FIELD=) and the cursor's entry does not
  match (systemd issue #30288, fixed in 255).  The helpers below therefore
  never filter in journalctl, only in Python.
"""

import contextlib
import fcntl
import functools
import glob
import json
import os
import re
import secrets
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import termios
import time

import pytest


SSHD = "/usr/sbin/sshd"
JOURNALD = "/lib/systemd/systemd-journald"
JOURNAL_DIR = "/run/systemd/journal"
SSH_PORT = int(os.environ.get("PAMSIGNAL_E2E_SSH_PORT", "2222"))
SSH_HOSTS = ("127.0.0.1", "::1")
# Fixed place (not mkdtemp) so a second call, even from another session,
# finds the sshd this module started.
SSHD_DIR = os.path.join(tempfile.gettempdir(), "pamsignal-e2e-sshd")

_state = {"sshd_pid": None, "sshd_owned": False, "sshd_foreign": [],
          "users": [], "keydir": None}


# ---------------------------------------------------------------- skipping


def in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason):
    """Skip (by hand) or fail (in CI, where nothing may skip)."""
    if in_ci():
        pytest.fail("e2e prerequisite missing in CI: " + reason, pytrace=False)
    pytest.skip(reason)


def require_root():
    if os.geteuid() != 0:
        unavailable(
            "end-to-end tests need root (real sshd, useradd, journald)"
        )


def require_binaries(*names):
    for name in names:
        if os.path.isabs(name):
            if not os.access(name, os.X_OK):
                unavailable(
                    "%s is missing (apt-get install it, see .ci/run)" % name
                )
        elif shutil.which(name) is None:
            unavailable(
                "%s is not on PATH (apt-get install it, see .ci/run)" % name
            )


def _run(cmd, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("universal_newlines", True)
    kw.setdefault("timeout", 60)
    return subprocess.run(cmd, **kw)


def _check(cmd, **kw):
    p = _run(cmd, **kw)
    if p.returncode != 0:
        raise RuntimeError(
            "%s failed (%d): %s%s"
            % (
                " ".join(shlex.quote(c) for c in cmd),
                p.returncode,
                p.stdout or "",
                p.stderr or "",
            )
        )
    return p


# ---------------------------------------------------------------- journal


def journald_answers():
    """Whether a journald answers here: its socket exists and journalctl
    reads the journal.  Not a process name: in a chroot or container the
    host's systemd-journald is visible in /proc but cannot be reached."""
    socket_path = os.path.join(JOURNAL_DIR, "socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        # Connected, not just present: the file outlives a journald that
        # died (or a machine restored from a snapshot).
        probe.connect(socket_path)
    except OSError:
        return False
    finally:
        probe.close()
    return _run(["journalctl", "-n", "0", "--no-pager"]).returncode == 0


def ensure_journald(timeout=20):
    """Make sure a real systemd-journald runs and /dev/log reaches it."""
    require_root()
    require_binaries("journalctl", "setsid", JOURNALD)
    os.makedirs(JOURNAL_DIR, exist_ok=True)
    started = not journald_answers()
    if started:
        # setsid -f: fork, new session, detached from pytest entirely.
        _check(
            ["setsid", "-f", JOURNALD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    dev_log = os.path.join(JOURNAL_DIR, "dev-log")
    deadline = time.time() + timeout
    while True:
        if os.path.exists(dev_log) and journald_answers():
            break
        if time.time() > deadline:
            raise RuntimeError(
                "systemd-journald did not come up within %ss" % timeout
            )
        time.sleep(0.1)
    if os.path.realpath("/dev/log") != dev_log:
        _check(["ln", "-sf", dev_log, "/dev/log"])
    if started:
        # A journald that has never had an entry (a fresh machine) has no
        # journal files, and `journalctl --show-cursor` fails there: its
        # first entry, which also proves that /dev/log reaches it.
        _check(["logger", "-t", "pamsignal-tests", "--",
                "journald started for the tests"])
        if not wait_for(lambda: "journald started for the tests" in _run(
                ["journalctl", "-n", "5", "--no-pager"]).stdout, timeout):
            raise RuntimeError(
                "systemd-journald started but never logged what was sent "
                "to /dev/log within %ss" % timeout
            )


def journal_cursor():
    """Cursor of the newest entry now in the journal (None if it is empty)."""
    p = _check(["journalctl", "-n", "0", "--show-cursor", "--no-pager"])
    for line in p.stdout.splitlines():
        if line.startswith("-- cursor: "):
            return line[len("-- cursor: ") :].strip()
    p = _check(["journalctl", "-n", "1", "-o", "json", "--no-pager"])
    for line in p.stdout.splitlines():
        return json.loads(line)["__CURSOR"]
    return None


def _text(value):
    # journalctl -o json gives non-UTF-8 or binary fields as a list of bytes.
    if isinstance(value, list):
        return bytes(value).decode("utf-8", "replace")
    return value if value is not None else ""


def journal_entries(after_cursor=None):
    """All entries after the cursor, as dicts (no journalctl-side filter)."""
    cmd = ["journalctl", "-o", "json", "--no-pager"]
    if after_cursor:
        cmd += ["--after-cursor", after_cursor]
    p = _check(cmd)
    out = []
    for line in p.stdout.splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


def wait_for_journal(
    pattern, after_cursor, timeout=15, identifier=None, **fields
):
    """Wait until the journal holds, after `after_cursor`, an entry whose
    MESSAGE matches the regex `pattern` (and SYSLOG_IDENTIFIER / other
    fields, when given); return that entry."""
    rx = re.compile(pattern)
    deadline = time.time() + timeout
    seen = []
    while True:
        seen = journal_entries(after_cursor)
        for e in seen:
            if (
                identifier is not None
                and e.get("SYSLOG_IDENTIFIER") != identifier
            ):
                continue
            if any(_text(e.get(k)) != str(v) for k, v in fields.items()):
                continue
            if rx.search(_text(e.get("MESSAGE"))):
                return e
        if time.time() > deadline:
            tail = "\n".join(
                "  %s[%s] uid=%s: %s"
                % (
                    e.get("SYSLOG_IDENTIFIER"),
                    e.get("_PID"),
                    e.get("_UID"),
                    _text(e.get("MESSAGE")),
                )
                for e in seen[-30:]
            )
            raise AssertionError(
                "journal never logged /%s/ within %ss; last entries:\n%s"
                % (pattern, timeout, tail)
            )
        time.sleep(0.2)


# ---------------------------------------------------------------- sshd


def _ssh_banner(host, port, timeout=2.0):
    """True when something answers on host:port with an SSH banner."""
    try:
        s = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return False
    try:
        s.settimeout(timeout)
        return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False
    finally:
        s.close()


def _pid_alive_sshd(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"sshd" in f.read()
    except (OSError, ValueError):
        return False


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def sshd_config_path():
    return os.path.join(SSHD_DIR, "sshd_config")


def ensure_sshd(timeout=20):
    """A real sshd with UsePAM and password logins on 127.0.0.1 and ::1,
    port SSH_PORT.  Idempotent.  If another sshd already serves one of the
    addresses on that port (a machine set up by hand, see
    docs/CONTRIBUTING.md), it is used as it is and never stopped; ours
    serves the others."""
    require_root()
    require_binaries(SSHD, "ssh", "ssh-keygen", "sshpass")
    os.makedirs(SSHD_DIR, exist_ok=True)
    pidfile = os.path.join(SSHD_DIR, "sshd.pid")
    pid = _read_pid(pidfile)
    if (
        pid
        and _pid_alive_sshd(pid)
        and all(_ssh_banner(h, SSH_PORT) for h in SSH_HOSTS)
    ):
        # Started by another run on this machine: used, never stopped here.
        _state["sshd_pid"], _state["sshd_owned"] = pid, False
        return SSH_PORT
    if not any(
        os.path.exists("/etc/ssh/ssh_host_%s_key" % t)
        for t in ("ed25519", "ecdsa", "rsa")
    ):
        _check(["ssh-keygen", "-A"])
    free, foreign = [], []
    for h in SSH_HOSTS:
        (foreign if _ssh_banner(h, SSH_PORT) else free).append(h)
    _state["sshd_foreign"] = foreign
    if not free:
        return SSH_PORT
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation dir
    os.chmod("/run/sshd", 0o755)
    lines = ["Port %d" % SSH_PORT]
    lines += ["ListenAddress %s" % h for h in free]
    for t in ("ed25519", "ecdsa", "rsa"):
        key = "/etc/ssh/ssh_host_%s_key" % t
        if os.path.exists(key):
            lines.append("HostKey " + key)
    lines += [
        "PidFile " + pidfile,
        "AuthorizedKeysFile .ssh/authorized_keys",
        "MaxAuthTries 6",
    ] + _SSHD_TEST_OPTIONS + [
        "Subsystem sftp /usr/lib/openssh/sftp-server",
    ]
    cfg = sshd_config_path()
    with open(cfg, "w") as f:
        f.write("\n".join(lines) + "\n")
    _check([SSHD, "-t", "-f", cfg])
    try:
        os.unlink(pidfile)
    except OSError:
        pass
    # sshd daemonises itself (new session, parent init), writes the pid file.
    _check([SSHD, "-f", cfg], stdin=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while True:
        pid = _read_pid(pidfile)
        if pid and all(_ssh_banner(h, SSH_PORT) for h in SSH_HOSTS):
            break
        if time.time() > deadline:
            raise RuntimeError(
                "sshd did not come up on %s port %d" % (free, SSH_PORT)
            )
        time.sleep(0.1)
    _state["sshd_pid"], _state["sshd_owned"] = pid, True
    return SSH_PORT


def stop_sshd():
    """Stop the sshd this process started (listener only, by its pid); one
    another run started is left to it."""
    pid, owned = _state.get("sshd_pid"), _state.get("sshd_owned")
    _state["sshd_pid"], _state["sshd_owned"] = None, False
    if not pid or not owned or not _pid_alive_sshd(pid):
        return
    try:
        os.kill(pid, 15)
    except OSError:
        return
    for _ in range(50):
        if not _pid_alive_sshd(pid):
            break
        time.sleep(0.1)
    try:
        os.unlink(os.path.join(SSHD_DIR, "sshd.pid"))
    except OSError:
        pass


# ---------------------------------------------------------------- users


def new_password():
    return "Pw-" + secrets.token_hex(8)


def create_user(prefix="pse", password=None, groups=()):
    """A throw-away local user with a password; returns (name, password)."""
    require_root()
    require_binaries("useradd", "chpasswd", "userdel")
    name = prefix + secrets.token_hex(4)
    password = password or new_password()
    cmd = ["useradd", "-m", "-s", "/bin/bash"]
    if groups:
        cmd += ["-G", ",".join(groups)]
    _check(cmd + [name])
    _state["users"].append(name)
    _check(["chpasswd"], input="%s:%s\n" % (name, password))
    return name, password


def sudoers_path(user):
    return "/etc/sudoers.d/pamsignal-test-" + user


def allow_sudo_nopasswd(user, command="/bin/true"):
    """One sudoers rule: `user` may run `command` as root without a
    password (`sudo -n`). Checked by visudo before it is put in place;
    removed with the user."""
    require_binaries("visudo")
    path = sudoers_path(user)
    temporary = path + ".new"  # sudo skips names with a dot
    with open(temporary, "w") as rule:
        rule.write("%s ALL=(root) NOPASSWD: %s\n" % (user, command))
    os.chmod(temporary, 0o440)
    try:
        _check(["visudo", "-c", "-q", "-f", temporary])
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def sudo_nopasswd(user, cmd="/bin/true", timeout=30):
    """`user` runs `cmd` through `sudo -n` (never asks for a password)."""
    return _run(["runuser", "-u", user, "--", "sudo", "-n", "--"]
                + _cmd_list(cmd), timeout=timeout)


def delete_user(name):
    if os.path.exists(sudoers_path(name)):
        os.unlink(sudoers_path(name))
    _run(["userdel", "-r", "-f", name])
    if name in _state["users"]:
        _state["users"].remove(name)


def delete_all_users():
    for name in list(_state["users"]):
        delete_user(name)


def make_keypair(directory=None):
    """A fresh ed25519 key pair: (private_path, "ED25519 SHA256:...")."""
    directory = directory or tempfile.mkdtemp(prefix="pamsignal-e2e-key-")
    path = os.path.join(directory, "id_ed25519")
    _check(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "pamsignal-e2e",
            "-f",
            path,
        ]
    )
    out = _check(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", path + ".pub"]
    ).stdout.split()
    # "256 SHA256:abc... pamsignal-e2e (ED25519)"
    return path, "%s %s" % (out[-1].strip("()"), out[1])


def authorize_key(user, private_path):
    home = os.path.expanduser("~" + user)
    sshdir = os.path.join(home, ".ssh")
    os.makedirs(sshdir, exist_ok=True)
    with open(private_path + ".pub") as f:
        pub = f.read()
    ak = os.path.join(sshdir, "authorized_keys")
    with open(ak, "a") as f:
        f.write(pub)
    _check(["chown", "-R", "%s:" % user, sshdir])
    os.chmod(sshdir, 0o700)
    os.chmod(ak, 0o600)


# ---------------------------------------------------------------- actions

_SSH_COMMON = [
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "GlobalKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=10",
    "-o",
    "IdentityAgent=none",
]


#: sshd_config lines every test sshd (host and Debian 13 tree) shares:
#: PAM and passwords on, INFO logging to AUTH, no DNS, room for bursts.
_SSHD_TEST_OPTIONS = [
    "UsePAM yes",
    "PasswordAuthentication yes",
    "KbdInteractiveAuthentication no",
    "PubkeyAuthentication yes",
    "PermitRootLogin no",
    "SyslogFacility AUTH",
    "LogLevel INFO",
    "UseDNS no",
    "PrintMotd no",
    "MaxStartups 100:30:200",
]


def _cmd_list(cmd):
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def free_port():
    """A TCP port nobody listens on now, for a server of a test's own."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unique_loopback():
    """A loopback address of its own (127.a.b.c, never 127.0.0.x) for one
    test's ssh client: counters per source then see only that test's
    attempts, whoever else logs in from 127.0.0.1 meanwhile."""
    a, b, c = (secrets.randbelow(254) + 1 for _ in range(3))
    return "127.%d.%d.%d" % (a, b, c)


def _ssh(user, options, cmd, host, port, timeout, prefix=(), env=None,
         source=None):
    """One ssh login to the test sshd with the given -o options, from the
    loopback address `source` when given (ssh's BindAddress)."""
    argv = list(prefix) + ["ssh"] + _SSH_COMMON
    if source:
        options = list(options) + ["BindAddress=%s" % source]
    for option in options:
        argv += ["-o", option]
    argv += ["-p", str(port or SSH_PORT), "-l", user, host, cmd]
    return _run(argv, env=env, stdin=subprocess.DEVNULL, timeout=timeout)


def ssh_password(
    user, password, cmd="true", host="127.0.0.1", port=None, timeout=60,
    source=None,
):
    """One password login (exactly one password attempt); CompletedProcess."""
    return _ssh(user, ["PreferredAuthentications=password",
                       "PubkeyAuthentication=no",
                       "NumberOfPasswordPrompts=1"], cmd, host, port, timeout,
                prefix=["sshpass", "-e"],
                env=dict(os.environ, SSHPASS=password), source=source)


def ssh_key(
    user, key_path, cmd="true", host="127.0.0.1", port=None, timeout=60
):
    """One public-key login with the given private key; CompletedProcess."""
    return _ssh(user, ["BatchMode=yes", "IdentitiesOnly=yes",
                       "PreferredAuthentications=publickey",
                       "PasswordAuthentication=no",
                       "IdentityFile=%s" % key_path], cmd, host, port,
                timeout)


def sudo_as(user, password, cmd, timeout=60):
    """`user` runs `cmd` through sudo (no cached credentials, password
    on stdin)."""
    argv = [
        "runuser",
        "-u",
        user,
        "--",
        "sudo",
        "-S",
        "-k",
        "-p",
        "",
        "--",
    ] + _cmd_list(cmd)
    return _run(argv, input=password + "\n", timeout=timeout)


def su_as(user, password, target, cmd="true", timeout=30):
    """`user` runs `su -c cmd target`, typing `password` at su's prompt on a
    real pty (so su logs "on pts/N").  Returns (returncode, output)."""
    require_binaries("runuser", "su")
    master, slave = os.openpty()
    try:
        p = subprocess.Popen(
            ["runuser", "-u", user, "--", "su", "-c", cmd, target],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(slave)
    out = b""
    sent = False
    deadline = time.time() + timeout
    try:
        while True:
            r, _, _ = select.select([master], [], [], 0.05)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every slave end is closed
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and b"assword" in out:
                # PAM's prompt turns echo off with TCSAFLUSH, which throws
                # away anything typed before: wait for it, as a person would.
                if not termios.tcgetattr(master)[3] & termios.ECHO:
                    os.write(master, password.encode() + b"\n")
                    sent = True
            if time.time() > deadline:
                p.kill()
                raise RuntimeError(
                    "su did not finish; output so far: %r" % out
                )
    finally:
        os.close(master)
    rc = p.wait(timeout=timeout)
    return rc, out.decode("utf-8", "replace")


def forge(uid_user, identifier, message):
    """Write `message` to syslog as `identifier`, from an unprivileged user."""
    require_binaries("runuser", "logger")
    return _check(
        [
            "runuser",
            "-u",
            uid_user,
            "--",
            "logger",
            "-t",
            identifier,
            "--",
            message,
        ]
    )


# ---------------------------------------------------------------- Debian 13
#
# Debian 12's OpenSSH 9.2 logs as `sshd`; 9.8 and later log each connection
# as `sshd-session` (10.x also has `sshd-auth`), and Debian 13 has Python
# 3.13.  A debootstrapped Debian 13 (trixie) tree, cached between runs,
# lets the tests run that newer software for real (docs/CONTRIBUTING.md).
# Build it with `python3 tests/realsys.py trixie-tree` (.ci/run does).
#
# Measured (Debian 13 tree, OpenSSH 10.0p2 Debian-7+deb13u4, Linux-PAM 1.7,
# Python 3.13.5; host journald of Debian 12):
#
# - The tree's sshd run in a chroot logs through /dev/log like any sshd, but
#   journald takes _EXE from /proc/PID/exe as *it* sees it: the host path
#   of the tree, e.g. /var/cache/pamsignal-tests/trixie/usr/lib/openssh/
#   sshd-session.  _COMM is sshd-session, _UID 0, _TRANSPORT syslog.
# - The listener logs as `sshd` ("Server listening on ...").  Every line of
#   a connection, pre-auth ones included, is written by sshd-session with
#   SYSLOG_IDENTIFIER=sshd-session: sshd-auth's own messages (the "[preauth]"
#   ones) travel over the monitor's log channel and sshd-session writes them.
# - The post-login child ("Received disconnect ...", "Disconnected from user
#   ...") logs as sshd-session with the user's _UID and usually no _EXE
#   (it has exited before journald looks it up; now and then it has not).
# - Linux-PAM 1.7 pam_unix: "session opened for user U(uid=N) by U(uid=0)".

TRIXIE_TREE = os.environ.get(
    "PAMSIGNAL_TRIXIE_TREE", "/var/cache/pamsignal-tests/trixie"
)
TRIXIE_SSH_PORT = int(os.environ.get("PAMSIGNAL_TRIXIE_SSH_PORT", "2223"))
TRIXIE_PACKAGES = ("openssh-server", "sudo", "python3")
# Written last, after debootstrap succeeded: a tree without it is not done.
TRIXIE_MARKER = ".pamsignal-tree-complete"
TRIXIE_NEEDS = (
    "usr/sbin/sshd",
    "usr/lib/openssh/sshd-session",
    "usr/lib/openssh/sshd-auth",
    "usr/bin/python3",
    "usr/bin/sudo",
    "usr/sbin/useradd",
    "usr/sbin/chpasswd",
    "etc/ssh/ssh_host_ed25519_key",
)
# A Debian 13 tree that boots under `systemd-nspawn -b`: systemd as PID 1,
# dbus, sshd and python3, for the service tests (tests/test_service_boot.py).
BOOT_TREE = os.environ.get(
    "PAMSIGNAL_BOOT_TREE", "/var/cache/pamsignal-tests/trixie-boot"
)
BOOT_PACKAGES = ("systemd-sysv", "dbus", "python3", "openssh-server", "sudo")
BOOT_NEEDS = (
    "usr/lib/systemd/systemd",
    "usr/bin/dbus-daemon",
    "usr/bin/python3",
    "usr/sbin/sshd",
    "usr/bin/sudo",
    "usr/bin/systemctl",
    "etc/ssh/ssh_host_ed25519_key",
)


def build_boot_tree(tree=None, mirror=None, timeout=900):
    """The bootable Debian 13 tree, built once and cached like the other."""
    return build_debian_tree(
        "trixie",
        tree or BOOT_TREE,
        mirror,
        timeout,
        packages=BOOT_PACKAGES,
        needs=BOOT_NEEDS,
    )


# The boot tree and the other doors in (tests/test_doors.py): OpenDoas,
# pkexec with polkitd (and pkttyagent), libpam-systemd for logind's
# sessions; run0 comes with Debian 13's systemd 257.
DOORS_TREE = os.environ.get(
    "PAMSIGNAL_DOORS_TREE", "/var/cache/pamsignal-tests/trixie-doors"
)
DOORS_PACKAGES = BOOT_PACKAGES + ("opendoas", "pkexec", "polkitd",
                                  "libpam-systemd")
DOORS_NEEDS = BOOT_NEEDS + ("usr/bin/doas", "usr/bin/pkexec",
                            "usr/bin/pkttyagent", "usr/bin/run0")


def build_doors_tree(tree=None, mirror=None, timeout=900):
    """The bootable tree with doas, pkexec and polkitd, built once."""
    return build_debian_tree(
        "trixie",
        tree or DOORS_TREE,
        mirror,
        timeout,
        packages=DOORS_PACKAGES,
        needs=DOORS_NEEDS,
    )


# Minimal trees of the releases the Debian package is installed on
# (tests/test_deb.py): minbase and python3, nothing else, so the package's
# own dependencies are what makes it work.  Debian 13's is the tree above.
PACKAGE_TREE_DIR = os.environ.get(
    "PAMSIGNAL_PACKAGE_TREE_DIR", "/var/cache/pamsignal-tests"
)
PACKAGE_TREE_PACKAGES = ("python3",)
PACKAGE_TREE_NEEDS = (
    "usr/bin/python3",
    "usr/bin/dpkg",
    "usr/bin/apt-get",
    "usr/bin/gpgv",
)
#: Debian suite -> its number, for the package trees.
PACKAGE_SUITES = {"bullseye": 11, "bookworm": 12, "trixie": 13}


def package_tree(suite):
    """(path, needs) of the minimal tree of a suite in PACKAGE_SUITES."""
    if suite == "trixie":
        return TRIXIE_TREE, TRIXIE_NEEDS
    return os.path.join(PACKAGE_TREE_DIR, suite), PACKAGE_TREE_NEEDS


def require_package_tree(suite):
    """The cached minimal tree of `suite`; built now when run by hand, a
    failure under CI (tests/check.sh builds it before the tests)."""
    require_root()
    tree, needs = package_tree(suite)
    if in_ci() and not trixie_tree_complete(tree, needs):
        pytest.fail(
            "the Debian %s tree %s is missing; tests/check.sh builds it "
            "(python3 tests/realsys.py %s-tree)" % (suite, tree, suite),
            pytrace=False,
        )
    return require_tree(tree, needs, functools.partial(
        build_package_tree, suite), "Debian %s tree" % suite)


def build_package_tree(suite, mirror=None, timeout=900):
    """The minimal tree of `suite`, built once and cached."""
    if suite == "trixie":
        return build_trixie_tree(mirror=mirror, timeout=timeout)
    tree, needs = package_tree(suite)
    return build_debian_tree(
        suite,
        tree,
        mirror,
        timeout,
        packages=PACKAGE_TREE_PACKAGES,
        needs=needs,
    )


# The boot tree and python3-apt, which Ansible's apt module needs on the
# host it manages (tests/test_ansible.py).
ANSIBLE_TREE = os.environ.get(
    "PAMSIGNAL_ANSIBLE_TREE", "/var/cache/pamsignal-tests/trixie-boot-apt"
)
ANSIBLE_PACKAGES = BOOT_PACKAGES + ("python3-apt",)
ANSIBLE_NEEDS = BOOT_NEEDS + ("usr/lib/python3/dist-packages/apt/__init__.py",)


def build_ansible_tree(tree=None, mirror=None, timeout=900):
    """The bootable tree for the Ansible role, built once and cached."""
    return build_debian_tree(
        "trixie",
        tree or ANSIBLE_TREE,
        mirror,
        timeout,
        packages=ANSIBLE_PACKAGES,
        needs=ANSIBLE_NEEDS,
    )


# A Debian 12 minbase as debootstrap leaves it, without python3: the fresh
# machine the README's test command starts from (tests/test_fresh.py).
BARE_TREE = os.environ.get(
    "PAMSIGNAL_BARE_TREE", "/var/cache/pamsignal-tests/bookworm-bare"
)
BARE_NEEDS = ("usr/bin/apt-get", "usr/bin/dpkg", "usr/bin/bash")


def build_bare_tree(tree=None, mirror=None, timeout=900):
    """The Debian 12 minbase with nothing added, built once and cached."""
    return build_debian_tree(
        "bookworm",
        tree or BARE_TREE,
        mirror,
        timeout,
        packages=(),
        needs=BARE_NEEDS,
    )


DEBIAN_SUITES = frozenset(
    (
        "buster",
        "bullseye",
        "bookworm",
        "trixie",
        "forky",
        "sid",
        "oldoldstable",
        "oldstable",
        "stable",
        "testing",
        "unstable",
    )
)


def _deb822_stanzas(text):
    stanza, key = {}, None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if stanza:
                yield stanza
            stanza, key = {}, None
        elif line.startswith("#"):
            continue
        elif line[0] in " \t" and key:
            stanza[key] += " " + line.strip()
        else:
            key, _, value = line.partition(":")
            key = key.strip().lower()
            stanza[key] = value.strip()


def apt_debian_mirror():
    """The Debian archive URL this machine's apt uses (from
    /etc/apt/sources.list*; PAMSIGNAL_DEBIAN_MIRROR overrides), or None."""
    if os.environ.get("PAMSIGNAL_DEBIAN_MIRROR"):
        return os.environ["PAMSIGNAL_DEBIAN_MIRROR"]
    found = []
    paths = ["/etc/apt/sources.list"]
    paths += sorted(glob.glob("/etc/apt/sources.list.d/*.list"))
    paths += sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        if path.endswith(".sources"):
            for st in _deb822_stanzas(text):
                if "deb" not in st.get("types", "").split():
                    continue
                if st.get("enabled", "yes").lower() == "no":
                    continue
                if DEBIAN_SUITES & set(st.get("suites", "").split()):
                    found += st.get("uris", "").split()
            continue
        for line in text.splitlines():
            words = line.split()
            if not words or words[0] != "deb":
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # [arch=.. signed-by=..]
                end = [i for i, w in enumerate(words) if w.endswith("]")]
                words = words[end[0] + 1 :] if end else []
            if len(words) >= 2 and words[1] in DEBIAN_SUITES:
                found.append(words[0])
    for uri in found:
        if uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
    return None


def apt_proxy_env():
    """http_proxy/https_proxy for debootstrap, from apt's own settings."""
    env = {}
    for scheme in ("http", "https"):
        try:
            p = _run(
                ["apt-config", "shell", "P", "Acquire::%s::Proxy" % scheme]
            )
        except OSError:
            return env
        m = re.match(r"^P='(.*)'$", p.stdout.strip())
        if p.returncode == 0 and m and m.group(1).lower() not in (
            "",
            "direct",
            "false",
        ):
            env[scheme + "_proxy"] = m.group(1)
    return env


def trixie_tree_complete(tree=None, needs=TRIXIE_NEEDS):
    tree = tree or TRIXIE_TREE
    return os.path.isfile(os.path.join(tree, TRIXIE_MARKER)) and all(
        os.path.lexists(os.path.join(tree, f)) for f in needs
    )


def _mounts_under(path):
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(
                r"\\([0-7]{3})",
                lambda m: chr(int(m.group(1), 8)),
                line.split()[4],
            )
            if point == path or point.startswith(path + "/"):
                found.append(point)
    return found


def _remove_tree(path):
    """rm -rf a (partial) tree, never through a mount inside it: a host
    /dev or /proc bound into it must not be deleted with it."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        _run(["umount", "-l", point])
    left = _mounts_under(path)
    if left:
        raise RuntimeError(
            "will not delete %s: still mounted inside it: %s" % (path, left)
        )
    _check(["rm", "-rf", "--one-file-system", path])


def build_trixie_tree(tree=None, mirror=None, timeout=600):
    """The Debian 13 tree with its sshd (see build_debian_tree)."""
    return build_debian_tree(
        "trixie",
        tree or TRIXIE_TREE,
        mirror,
        timeout,
        packages=TRIXIE_PACKAGES,
        needs=TRIXIE_NEEDS,
    )


def build_debian_tree(suite, tree, mirror, timeout, packages, needs):
    """Make sure the Debian `suite` tree exists and is complete; build it
    with debootstrap (minbase and `packages`) from this machine's apt
    mirror if not.  Returns (tree, seconds the build took), seconds None
    when it was cached.  Idempotent and safe to run concurrently (a lock
    file)."""
    tree = os.path.abspath(tree)
    if len([p for p in tree.split("/") if p]) < 2:
        raise RuntimeError("refusing tree path %r" % tree)
    os.makedirs(os.path.dirname(tree), exist_ok=True)
    with open(tree + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if trixie_tree_complete(tree, needs):
            return tree, None
        if os.path.lexists(tree):
            if not os.path.exists(os.path.join(tree, TRIXIE_MARKER)):
                raise RuntimeError(
                    "%s exists but was not built by these tests (no %s); "
                    "remove it or build the tree elsewhere"
                    % (tree, TRIXIE_MARKER)
                )
            _remove_tree(tree)  # ours, but damaged: build it again
        if shutil.which("debootstrap") is None:
            raise RuntimeError(
                "debootstrap is not installed (apt-get install -y debootstrap)"
            )
        mirror = mirror or apt_debian_mirror()
        if not mirror:
            raise RuntimeError(
                "no Debian mirror in /etc/apt/sources.list*; "
                "set PAMSIGNAL_DEBIAN_MIRROR"
            )
        work = tree + ".build"
        if os.path.lexists(work):
            _remove_tree(work)  # left by a build that was interrupted
        cmd = [
            "debootstrap",
            "--variant=minbase",
        ] + (["--include=" + ",".join(packages)] if packages else []) + [
            suite,
            work,
            mirror,
        ]
        started = time.time()
        p = _run(
            cmd,
            env=dict(os.environ, **apt_proxy_env()),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
        seconds = time.time() - started
        if p.returncode != 0:
            try:
                _remove_tree(work)
            except RuntimeError:
                pass  # the next build tries again
            raise RuntimeError(
                "%s failed (%d) after %.0f s:\n%s"
                % (
                    " ".join(cmd),
                    p.returncode,
                    seconds,
                    "\n".join(p.stdout.splitlines()[-15:]),
                )
            )
        missing = [
            f
            for f in needs
            if not os.path.lexists(os.path.join(work, f))
        ]
        if missing:
            raise RuntimeError(
                "debootstrap left %s without %s" % (work, ", ".join(missing))
            )
        with open(os.path.join(work, TRIXIE_MARKER), "w") as f:
            json.dump(
                {
                    "built": time.strftime(
                        "%Y-%m-%dT%H:%M:%SZ", time.gmtime()
                    ),
                    "mirror": mirror,
                    "suite": suite,
                    "packages": list(packages),
                    "seconds": round(seconds, 1),
                },
                f,
            )
            f.write("\n")
        os.rename(work, tree)
        return tree, seconds


def require_tree(tree, needs, build, label):
    """The cached tree, built first if it is not complete; a test that
    needs it is unavailable() when it cannot be built."""
    if not trixie_tree_complete(tree, needs):
        try:
            build()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
            unavailable("no %s: %s" % (label, error))
    return tree


def chroot_run(tree, cmd, **kw):
    """Run `cmd` chrooted into the tree (no mounts); CompletedProcess."""
    return _run(["chroot", tree] + _cmd_list(cmd), **kw)


def create_tree_user(tree, prefix="psn", password=None):
    """A throw-away user with a password inside the tree's own
    /etc/passwd and /etc/shadow; returns (name, password)."""
    name = prefix + secrets.token_hex(4)
    password = password or new_password()
    p = chroot_run(tree, ["useradd", "-m", "-s", "/bin/bash", name])
    if p.returncode != 0:
        raise RuntimeError("useradd in %s failed: %s" % (tree, p.stderr))
    p = chroot_run(tree, ["chpasswd"], input="%s:%s\n" % (name, password))
    if p.returncode != 0:
        chroot_run(tree, ["userdel", "-r", name])
        raise RuntimeError("chpasswd in %s failed: %s" % (tree, p.stderr))
    return name, password


def delete_tree_user(tree, name):
    chroot_run(tree, ["userdel", "-r", name])


def _procs_rooted_in(tree):
    """PIDs of the processes chrooted into the tree (other than us)."""
    tree = os.path.realpath(tree)
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if os.readlink("/proc/%s/root" % d) == tree:
                found.append(int(d))
        except OSError:
            continue
    return found


class ChrootSshd(object):
    """The tree's own sshd, run chrooted into it in a private mount
    namespace (`unshare --mount`), with the host's /proc, /dev, /dev/pts
    and /run/systemd/journal bound in: /dev/log (a link to
    /run/systemd/journal/dev-log) then reaches the host journald.  The
    mounts exist only in that namespace and vanish with its processes, so
    nothing is left mounted inside the cached tree."""

    def __init__(self, tree, port=None, options=()):
        self.tree = os.path.realpath(tree)
        self.port = port or TRIXIE_SSH_PORT
        # sshd_config lines of this server's own; sshd takes the first
        # value of a keyword, so they come before the shared ones.
        self.options = list(options)
        self.proc = None
        self.rundir = None  # host path; inside the tree it is self.inside
        self.inside = None
        self.log_path = None

    def start(self, timeout=20):
        require_binaries("unshare", "chroot", "mount")
        if _ssh_banner("127.0.0.1", self.port):
            raise RuntimeError(
                "something already serves SSH on 127.0.0.1 port %d "
                "(PAMSIGNAL_TRIXIE_SSH_PORT picks another)" % self.port
            )
        os.makedirs(os.path.join(self.tree, "run", "sshd"), exist_ok=True)
        os.chmod(os.path.join(self.tree, "run", "sshd"), 0o755)
        self.rundir = tempfile.mkdtemp(
            prefix="pamsignal-e2e-", dir=os.path.join(self.tree, "run")
        )
        self.inside = "/" + os.path.relpath(self.rundir, self.tree)
        cfg = os.path.join(self.inside, "sshd_config")
        lines = ["Port %d" % self.port, "ListenAddress 127.0.0.1"]
        for t in ("ed25519", "ecdsa", "rsa"):
            key = "etc/ssh/ssh_host_%s_key" % t
            if os.path.exists(os.path.join(self.tree, key)):
                lines.append("HostKey /" + key)
        lines += ["PidFile none"] + self.options + _SSHD_TEST_OPTIONS
        with open(os.path.join(self.rundir, "sshd_config"), "w") as f:
            f.write("\n".join(lines) + "\n")
        p = chroot_run(self.tree, ["/usr/sbin/sshd", "-t", "-f", cfg])
        if p.returncode != 0:
            raise RuntimeError("sshd -t in the tree: %s" % p.stderr)
        t = shlex.quote(self.tree)
        script = " && ".join(
            [
                "mount --bind /proc %s/proc" % t,
                "mount --bind /dev %s/dev" % t,
                "mount --bind /dev/pts %s/dev/pts" % t,
                "mkdir -p %s%s" % (t, JOURNAL_DIR),
                "mount --bind %s %s%s" % (JOURNAL_DIR, t, JOURNAL_DIR),
                "exec chroot %s /usr/sbin/sshd -D -f %s"
                % (t, shlex.quote(cfg)),
            ]
        )
        self.log_path = os.path.join(self.rundir, "sshd.log")
        cursor = journal_cursor()
        with open(self.log_path, "w") as log:
            # unshare and sh exec: self.proc.pid ends up being sshd itself.
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--"]
                + ["sh", "-c", "set -e; " + script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.time() + timeout
        while not _ssh_banner("127.0.0.1", self.port, timeout=0.5):
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(
                    "the tree's sshd did not come up on port %d: %s"
                    % (self.port, self.log_text())
                )
            time.sleep(0.1)
        # Its first line proves that /dev/log inside reaches our journald.
        wait_for_journal(
            r"^Server listening on 127\.0\.0\.1 port %d\.$" % self.port,
            cursor,
            timeout=timeout,
        )
        return self

    def log_text(self):
        try:
            with open(self.log_path) as f:
                return f.read()
        except (OSError, TypeError):
            return ""

    def stop(self, timeout=10):
        """Stop the listener (by its pid), then whatever it left running
        chrooted in the tree (connection processes, by their pids)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
            self.proc = None
            for pid in _procs_rooted_in(self.tree):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        if self.rundir:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None


# ---------------------------------------------------------------- packages


def build_deb(source, dist):
    """`make deb` in the source tree `source`, the result in `dist`."""
    p = _run(["make", "-C", source, "deb", "DISTDIR=" + dist], timeout=300)
    if p.returncode != 0:
        raise RuntimeError("make deb failed:\n%s%s" % (p.stdout, p.stderr))
    return p


# ---------------------------------------------------------------- overlays
#
# The cached trees are shared between test runs and engineers: a test that
# installs into one works on an overlay of it instead.


def wait_for(predicate, timeout=20.0, interval=0.1):
    """Poll until predicate() is true or the time is up; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def overlay_mount_script(lower, workdir, merged, binds):
    """Shell commands that mount an overlayfs of `lower` on `merged` (its
    upper and work directories in `workdir`) and bind the host's `binds`
    (absolute paths: /proc, /dev, ... with what is mounted below them) at
    the same places inside."""
    q = shlex.quote
    upper, work = (os.path.join(workdir, d) for d in ("upper", "work"))
    commands = [
        "mount -t overlay overlay -o lowerdir=%s,upperdir=%s,workdir=%s %s"
        % (q(lower), q(upper), q(work), q(merged))
    ]
    # --rbind: what is mounted below them comes too (/dev/pts, the
    # cgroup file systems under /sys/fs/cgroup that journald needs).
    commands += ["mount --rbind %s %s%s" % (q(b), q(merged), q(b))
                 for b in binds]
    return " && ".join(commands)


class TreeOverlay(object):
    """A writable copy of a cached tree that costs nothing and leaves the
    tree untouched: an overlayfs, the tree below, `workdir`/upper above
    (what the runs wrote, readable from here with upper()).

    Two ways to mount it.  By default in a private mount namespace, with
    the host's /proc and /dev (and /dev/pts) bound in: a `cat` reading a pipe
    from us holds that namespace open; stop() closes the pipe, and should
    this process die the pipe closes all the same, so no mount is ever
    left behind on the host.  With host_visible=True it is mounted on the
    host at `workdir`/merged, with nothing bound in, for tools that take a
    path (rpm --root, systemd-nspawn -D); stop() unmounts it.  `binds`
    replaces the host paths bound into the private view.

    Also a context manager: `with TreeOverlay(...) as overlay:`."""

    #: What a chroot into the private view needs of the host (/dev with
    #: /dev/pts).
    BINDS = ("/proc", "/dev")

    def __init__(self, tree, workdir, host_visible=False, binds=BINDS):
        self.tree = os.path.realpath(tree)
        self.workdir = workdir
        self.merged = os.path.join(workdir, "merged")
        self.host_visible = host_visible
        self.binds = binds
        self.holder = None
        self.mounted = False

    def start(self, timeout=20):
        require_binaries("unshare", "nsenter", "chroot", "mount")
        for directory in ("merged", "upper", "work"):
            os.makedirs(os.path.join(self.workdir, directory), exist_ok=True)
        if self.host_visible:
            script = overlay_mount_script(self.tree, self.workdir,
                                          self.merged, ())
            p = _run(["sh", "-c", "set -e; " + script])
            self.mounted = p.returncode == 0
        else:
            self.holder = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--",
                 "cat"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            # Mount only once unshare has made the namespace private and
            # run cat: a mount made earlier could propagate to the host.
            if not wait_for(lambda: self._holder_comm() == "cat", timeout):
                self.stop()
                raise RuntimeError("unshare did not start its namespace")
            script = overlay_mount_script(self.tree, self.workdir,
                                          self.merged, self.binds)
            p = self._nsenter(["sh", "-c", "set -e; " + script])
        if p.returncode != 0:
            self.stop()
            raise RuntimeError("overlay of %s: %s" % (self.tree, p.stderr))
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()

    def _holder_comm(self):
        try:
            with open("/proc/%d/comm" % self.holder.pid) as f:
                return f.read().strip()
        except OSError:
            return None

    def _nsenter(self, cmd, **kw):
        if self.holder is None:  # host_visible: the host's namespace
            return _run(cmd, **kw)
        # --root --wd: the holder's root and directory, not the
        # namespace's, so that run from a chroot we stay in it.
        return _run(
            ["nsenter", "--target", str(self.holder.pid), "--mount",
             "--root", "--wd", "--"] + cmd,
            **kw
        )

    def run(self, cmd, **kw):
        """`cmd` chrooted into the overlay; CompletedProcess."""
        return self._nsenter(["chroot", self.merged] + _cmd_list(cmd), **kw)

    def apt_get(self, *arguments):
        """`apt-get -y ARGUMENTS` in the overlay, never asking."""
        return self.run(
            ["apt-get", "-q", "-y"] + list(arguments),
            stdin=subprocess.DEVNULL,
            timeout=300,
            env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
        )

    def package_status(self, package):
        """"ii |1.0" (dpkg's status letters and the version) of a
        package in the overlay, or None when dpkg knows none."""
        result = self.run(["dpkg-query", "-W",
                           "-f=${db:Status-Abbrev}|${Version}", package])
        return result.stdout.strip() if result.returncode == 0 else None

    def path(self, inside):
        """The host's way to a path inside the overlay (in the private
        mode through the holder's root, which sees its namespace)."""
        if self.holder is None:
            return os.path.join(self.merged, inside.lstrip("/"))
        return "/proc/%d/root%s/%s" % (
            self.holder.pid,
            self.merged,
            inside.lstrip("/"),
        )

    def upper(self):
        """The overlay's upper directory: what was written or deleted."""
        return os.path.join(self.workdir, "upper")

    def stop(self, timeout=10):
        if self.holder is not None:
            self.holder.stdin.close()  # cat exits, the namespace with it
            try:
                self.holder.wait(timeout)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait(timeout)
            self.holder = None
        if self.mounted:
            _run(["umount", self.merged])
            if os.path.ismount(self.merged):
                raise RuntimeError("could not unmount the overlay %s"
                                   % self.merged)
            self.mounted = False
        for directory in ("upper", "work"):  # unmounted: plain files now
            shutil.rmtree(os.path.join(self.workdir, directory),
                          ignore_errors=True)


def child_processes(pid, program=None):
    """PIDs of the live (not zombie) children of `pid`; with `program`,
    only those whose command line holds that path."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            if program is not None:
                with open("/proc/%s/cmdline" % entry, "rb") as handle:
                    if program.encode() not in handle.read().split(b"\0"):
                        continue
        except (OSError, IndexError):
            continue  # gone meanwhile
        found.append(int(entry))
    return found


#: Where a booted container sees a bound source tree (read-only).
INSIDE_SRC = "/mnt/src"


#: cgroup hierarchies a container's tree is made in: the unified one and
#: (hybrid hosts) systemd's named v1 one.
CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup")


def own_cgroups(name):
    """A fresh cgroup `name` in each hierarchy there is, for one container.

    With --keep-unit and no systemd on the host, nspawn puts the container
    in a "payload" cgroup beside its own: started from the root cgroup,
    every container would share /payload/system.slice/ssh.service and the
    rest, and one container's systemd would stop, kill and set the journal
    rate limit (cgroup xattrs) of another's units."""
    made = []
    for root in CGROUP_ROOTS:
        if os.path.exists(os.path.join(root, "cgroup.procs")):
            path = os.path.join(root, name)
            os.mkdir(path)
            made.append(path)
    return made


def _join_cgroups(paths):
    def join():  # in the child, before nspawn runs
        for path in paths:
            with open(os.path.join(path, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))
    return join


def remove_cgroups(paths):
    """Remove the (by now empty) cgroups a container left, deepest first."""
    for top in paths:
        for directory, _, _ in sorted(os.walk(top), reverse=True):
            try:
                os.rmdir(directory)
            except OSError:
                pass  # still busy or already gone: the host cleans up later


class Container(object):
    """A tree booted with `systemd-nspawn -b` (docs/CONTRIBUTING.md):
    systemd as PID 1, --volatile=overlay so the tree itself is never
    written, and --private-network so its sshd keeps away from the host's
    ports (private_network=False shares the host's network instead).
    `binds` are (host path, path inside) pairs bound read-only.  run()
    executes in all its namespaces."""

    def __init__(self, tree, log_path, binds=(), private_network=True):
        self.tree = tree
        self.log_path = log_path
        self.binds = list(binds)
        self.private_network = private_network
        self.nspawn = None
        self.init = None
        self.cgroups = []

    def start(self, timeout=60):
        command = ["systemd-nspawn", "-q", "-D", self.tree, "-b",
                   "--register=no", "--keep-unit", "--volatile=overlay"]
        if self.private_network:
            command.append("--private-network")
        command += ["--bind-ro=%s:%s" % bind for bind in self.binds]
        self.cgroups = own_cgroups("pamsignal-nspawn-%d-%s" % (
            os.getpid(), secrets.token_hex(4)))
        with open(self.log_path, "w") as log:
            self.nspawn = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,
                preexec_fn=_join_cgroups(self.cgroups))
        assert wait_for(lambda: child_processes(self.nspawn.pid) or
                        self.nspawn.poll() is not None, timeout=timeout)
        if self.nspawn.poll() is not None:
            raise RuntimeError("systemd-nspawn exited at once: %s"
                               % self.log())
        (self.init,) = child_processes(self.nspawn.pid)

        said = []

        def booted():  # nothing answers until the child has become init
            state = self.run(["systemctl", "is-system-running", "--wait"],
                             check=False, timeout=timeout)
            said[:] = [(state.stdout + state.stderr).strip()]
            return state.stdout.strip() in ("running", "degraded")
        if not wait_for(booted, timeout=timeout, interval=0.5):
            raise RuntimeError(
                "the container did not report itself booted within %ss; "
                "systemctl is-system-running said %r; its console:\n%s"
                % (timeout, said, self.log()))
        return self

    def log(self):
        with open(self.log_path) as handle:
            return handle.read()[-3000:]

    def run(self, command, check=True, input=None, timeout=60, net=False):
        namespaces = ["--net"] if net else ["--all"]
        result = subprocess.run(
            ["nsenter", "--target", str(self.init)] + namespaces + ["--"] +
            command, input=input, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
        if check:
            assert result.returncode == 0, (command, result.stdout,
                                            result.stderr)
        return result

    def show(self, prop, unit="pamsignal.service"):
        return self.run(["systemctl", "show", "-P", prop,
                         unit]).stdout.strip()

    def unit_log(self):
        return self.run(["journalctl", "-u", "pamsignal.service", "-o",
                         "cat", "--no-pager"]).stdout

    def write(self, path, text):
        self.run(["sh", "-c", 'cat > "$1"', "sh", path], input=text)

    def stop(self):
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.terminate()  # nspawn asks the container to power off
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)
        remove_cgroups(self.cgroups)
        self.cgroups = []


def require_boot_tree():
    """The bootable Debian 13 tree, built now if it is missing."""
    require_root()
    require_binaries("systemd-nspawn", "nsenter")
    return require_tree(BOOT_TREE, BOOT_NEEDS, build_boot_tree,
                        "bootable Debian 13 tree")


@contextlib.contextmanager
def booted_container(log_path, binds, label, boot_timeout=180, tree=None,
                     private_network=True):
    """The boot tree (or another bootable `tree`) booted (Container) for
    the duration; prints how long the `label` tests had it.  The boot may
    take long on a machine busy with other work: the timeout only bounds a
    hang."""
    box = Container(tree or require_boot_tree(), log_path, binds,
                    private_network)
    started = time.monotonic()
    try:
        yield box.start(boot_timeout)
    finally:
        box.stop()
        print("%s: %.0f s" % (label, time.monotonic() - started))


def _main(argv):
    builders = {
        "trixie-tree": ("Debian 13 tree", build_trixie_tree),
        "boot-tree": ("Debian 13 boot tree", build_boot_tree),
        "ansible-tree": ("Debian 13 boot tree with python3-apt",
                         build_ansible_tree),
        "bare-tree": ("Debian 12 minbase tree", build_bare_tree),
        "doors-tree": ("Debian 13 boot tree with doas, pkexec, polkitd",
                       build_doors_tree),
    }
    for suite, number in sorted(PACKAGE_SUITES.items()):
        if suite != "trixie":  # trixie-tree above is its package tree
            builders[suite + "-tree"] = (
                "Debian %d tree" % number,
                functools.partial(build_package_tree, suite),
            )
    if argv[1:] == ["journald"]:
        try:
            ensure_journald()
        except RuntimeError as e:
            sys.stderr.write("journald: %s\n" % e)
            return 1
        print("journald answers on %s" % JOURNAL_DIR)
        return 0
    if len(argv) != 2 or argv[1] not in builders:
        sys.stderr.write(
            "usage: %s journald|%s\n" % (argv[0], "|".join(builders))
        )
        return 2
    label, build = builders[argv[1]]
    if os.geteuid() != 0:
        sys.stderr.write("building the %s needs root\n" % label)
        return 1
    try:
        tree, seconds = build()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        sys.stderr.write("%s: %s\n" % (label, e))
        return 1
    if seconds is None:
        print("%s: %s is complete (cached)" % (label, tree))
    else:
        print("%s: built %s in %.0f s" % (label, tree, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv))
