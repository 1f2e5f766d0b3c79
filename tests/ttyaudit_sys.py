"""The real kernel's TTY audit for the tests (issue 18): the kernel's audit
switch, an sshd whose PAM stack enables pam_tty_audit for root, and a root
shell typed into on a real pty.

Measured on this machine (Linux 6.18, systemd-journald 252 listening on the
audit multicast group, no auditd, Debian 12's Linux-PAM 1.5.2 and OpenSSH
9.2):

- With kernel auditing off (`enabled 0`, the default without auditd or
  `audit=1`) a process whose TTY audit flag is set produces no TTY records
  at all.  With it on, each record reaches the journal twice: once as
  `_TRANSPORT=audit` (`_AUDIT_TYPE=1319`, `_AUDIT_TYPE_NAME=TTY`, the
  keystrokes hex in `_AUDIT_FIELD_DATA`, `_AUDIT_SESSION`, `_UID`, `_PID`)
  and once from the kernel log (`_TRANSPORT=kernel`, MESSAGE
  "audit: type=1319 audit(...): tty pid=... data=HEX").
- The kernel writes a record when the reading process changes between
  canonical and raw mode, when its buffer fills and when the process exits:
  bash (readline, raw mode) collects several command lines into one record,
  and a `read -s` (canonical, no echo) flushes what came before.  What is
  typed at a prompt with echo off is not in any record.
- In a PID namespace of its own (a booted container) the kernel answers
  every audit status request, TTY audit's too, with EPERM: pam_tty_audit
  cannot work there, so the tests use the host's sshd instead.
- Nothing here persists: the test's sshd runs in a mount namespace of its
  own, where a PAM file of the test's is bind-mounted over /etc/pam.d/sshd
  (the host's file and every other sshd are untouched), and the kernel's
  audit switch is put back as it was.
"""

import contextlib
import os
import re
import select
import socket
import struct
import subprocess
import tempfile
import shlex
import shutil
import sys
import time

import realsys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))
import needs  # noqa: E402 (bench/needs.py unpacks Debian packages)

NETLINK_AUDIT = 9
AUDIT_GET, AUDIT_SET = 1000, 1001
AUDIT_STATUS_ENABLED = 0x1
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                      "README.md")


def readme_pam_line(open_only=False):
    """The pam_tty_audit line the README tells admins to add to sshd's PAM
    file (or, open_only, to sudo's): the tests use exactly that line."""
    with open(README) as readme:
        for line in readme:
            if line.startswith("session ") and "pam_tty_audit.so" in line \
                    and ("open_only" in line) == open_only:
                return line.strip()
    raise AssertionError("the README gives no pam_tty_audit line")


def _audit_request(kind, payload=b""):
    """One request on the audit netlink socket; the kernel's answer of the
    same type (or b"" for a bare acknowledgement).  OSError when refused."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                       NETLINK_AUDIT) as sock:
        sock.bind((0, 0))
        sock.settimeout(5)
        sock.send(struct.pack("=IHHII", 16 + len(payload), kind,
                              NLM_F_REQUEST | NLM_F_ACK, 1, 0) + payload)
        answer = b""
        for _ in range(3):
            data = sock.recv(65536)
            length, reply_type = struct.unpack("=IH", data[:6])
            body = data[16:length]
            if reply_type == NLMSG_ERROR:
                error = struct.unpack("=i", body[:4])[0]
                if error:
                    raise OSError(-error, os.strerror(-error))
                if kind == AUDIT_SET:
                    return answer
            elif reply_type == kind:
                return body
        return answer


def audit_status():
    """(enabled, audit daemon PID) as the kernel reports them: enabled 0
    off, 1 on, 2 on and locked; PID 0 when no auditd is connected."""
    _, enabled, _, pid = struct.unpack("=4I", _audit_request(AUDIT_GET)[:16])
    return enabled, pid


def audit_enabled():
    return audit_status()[0]


def set_audit_enabled(value):
    payload = struct.pack("=10I", AUDIT_STATUS_ENABLED, value, *([0] * 8))
    _audit_request(AUDIT_SET, payload)


@contextlib.contextmanager
def kernel_audit_on():
    """Kernel auditing on for the block, then as it was.  Skips (fails in
    CI) when this kernel refuses audit (no CONFIG_AUDIT, a container)."""
    try:
        before = audit_enabled()
        if before == 0:
            set_audit_enabled(1)
    except OSError as error:
        realsys.unavailable(
            "the kernel refuses audit requests here (%s): TTY audit "
            "cannot be tested" % error)
    try:
        yield
    finally:
        if before == 0:
            set_audit_enabled(0)


#: Debian's auditd, unpacked (apt-get download, dpkg -x) once and kept
#: between runs: never installed, so no service of it is ever started.
AUDITD_CACHE = os.path.join(needs.UNPACKED, "auditd")
AUDITD_PACKAGES = ("auditd", "libauparse0")


def unpacked_auditd():
    """The auditd program of the cached unpacked tree, and its libraries'
    directory (unpacked here when missing)."""
    try:
        tree = needs.unpacked("auditd", AUDITD_PACKAGES)  # AUDITD_CACHE
    except SystemExit as error:  # apt-get could not fetch them
        realsys.unavailable(str(error))
    libraries = ":".join(os.path.join(tree, part) for part in (
        "lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"))
    return os.path.join(tree, "sbin", "auditd"), libraries


class PrivateAuditd(object):
    """Debian's auditd run by the test in the foreground (`-f -n`, its
    records on its own output, never a log of the host's), leaving the
    kernel's audit switch as it found it (`-s nochange`).  Where an auditd
    already runs, that one is used as it is (`foreign`: its PID; what it
    writes is not read)."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.process = None
        self.foreign = None
        self.output_path = os.path.join(workdir, "auditd.out")

    def start(self, timeout=20):
        self.foreign = audit_status()[1] or None
        if self.foreign:
            return self
        program, libraries = unpacked_auditd()
        conf_dir = os.path.join(self.workdir, "audit")
        os.makedirs(conf_dir, exist_ok=True)
        with open(os.path.join(AUDITD_CACHE, "etc", "audit",
                               "auditd.conf")) as shipped:
            conf = shipped.read()
        conf = re.sub(r"(?m)^log_file = .*$", "log_file = " + os.path.join(
            self.workdir, "audit.log"), conf)
        conf = re.sub(r"(?m)^plugin_dir = .*$", "plugin_dir = " +
                      os.path.join(self.workdir, "plugins"), conf)
        path = os.path.join(conf_dir, "auditd.conf")
        with open(path, "w") as out:
            out.write(conf)
        os.chmod(path, 0o640)
        with open(self.output_path, "wb") as output:
            self.process = subprocess.Popen(
                [program, "-f", "-n", "-s", "nochange", "-c", conf_dir],
                stdin=subprocess.DEVNULL, stdout=output,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, LD_LIBRARY_PATH=libraries))
        if not realsys.wait_for(
                lambda: audit_status()[1] == self.process.pid or
                self.process.poll() is not None, timeout) or \
                self.process.poll() is not None:
            self.stop()
            raise RuntimeError("auditd did not connect to the kernel: %s"
                               % self.output())
        return self

    def output(self):
        """What the test's auditd wrote (None for a foreign one)."""
        if self.foreign:
            return None
        with open(self.output_path, "rb") as output:
            return output.read().decode("utf-8", "replace")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def pam_file_with_tty_audit(path, base="/etc/pam.d/sshd", line=None):
    """Write the PAM stack `base` with the README's pam_tty_audit line for
    it (or `line`) added at its end."""
    line = line or readme_pam_line(open_only=base.startswith(
        "/etc/pam.d/sudo"))
    with open(base) as stack:
        text = stack.read()
    with open(path, "w") as out:
        out.write(text.rstrip("\n") + "\n" + line + "\n")
    return path


class AuditedSshd(object):
    """An sshd on 127.0.0.1:PORT for logins by key, run in a mount
    namespace of its own where each of `pam_files` ({PAM file: the test's
    version}) is bind-mounted on the PAM file it names, so only its logins
    (and the su run in them) get pam_tty_audit."""

    def __init__(self, workdir, pam_files, public_key, port=None):
        self.workdir = workdir
        self.pam_files = pam_files
        self.public_key = public_key
        self.port = port or realsys.free_port()
        self.pidfile = os.path.join(workdir, "sshd.pid")
        self.pid = None
        self.keys_dir = None

    def _config(self):
        # sshd reads the key file as the user logging in: a directory any
        # user can pass through, a file any user can read.
        self.keys_dir = tempfile.mkdtemp(prefix="pamsignal-ttyaudit-keys-")
        os.chmod(self.keys_dir, 0o755)
        keys = os.path.join(self.keys_dir, "authorized_keys")
        with open(keys, "w") as out:
            out.write(self.public_key)
        os.chmod(keys, 0o644)
        lines = ["Port %d" % self.port, "ListenAddress 127.0.0.1",
                 "PidFile " + self.pidfile,
                 "AuthorizedKeysFile " + keys,
                 "StrictModes no",  # the key file lives under TMPDIR
                 "PermitRootLogin prohibit-password",
                 "PasswordAuthentication no",
                 "KbdInteractiveAuthentication no",
                 "UsePAM yes", "SyslogFacility AUTH", "LogLevel INFO",
                 "UseDNS no", "PrintMotd no", "PrintLastLog no"]
        lines += ["HostKey /etc/ssh/ssh_host_%s_key" % kind
                  for kind in ("ed25519", "ecdsa", "rsa")
                  if os.path.exists("/etc/ssh/ssh_host_%s_key" % kind)]
        path = os.path.join(self.workdir, "sshd_config")
        with open(path, "w") as out:
            out.write("\n".join(lines) + "\n")
        return path

    def start(self, timeout=20):
        realsys.require_binaries("unshare", "ssh-keygen", realsys.SSHD)
        if not any(os.path.exists("/etc/ssh/ssh_host_%s_key" % kind)
                   for kind in ("ed25519", "ecdsa", "rsa")):
            subprocess.run(["ssh-keygen", "-A"], check=True, timeout=60)
        config = self._config()
        os.makedirs("/run/sshd", exist_ok=True)
        subprocess.run([realsys.SSHD, "-t", "-f", config], check=True,
                       timeout=30)
        # sshd daemonises itself and keeps the namespace (and its mount)
        # alive; the namespace goes with it.
        mounts = [argument for target, source in sorted(
            self.pam_files.items()) for argument in (source, target)]
        subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-euc",
             'sshd=$1 config=$2; shift 2\n'
             'while [ "$#" -gt 0 ]; do mount --bind "$1" "$2"; shift 2; done\n'
             'exec "$sshd" -f "$config"',
             "sh", realsys.SSHD, config] + mounts,
            check=True, timeout=30, stdin=subprocess.DEVNULL)
        if not realsys.wait_for(self._listening, timeout):
            raise RuntimeError("the TTY audit sshd did not come up on port "
                               "%d" % self.port)
        with open(self.pidfile) as pid_text:
            self.pid = int(pid_text.read())
        return self

    def _listening(self):
        return os.path.exists(self.pidfile) and \
            realsys._ssh_banner("127.0.0.1", self.port)

    def session_processes(self):
        """PIDs of the session processes (the privileged sshd children that
        run PAM) of the logins it serves now."""
        return realsys.child_processes(self.pid) if self.pid else []

    def stop(self):
        if self.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(self.pid, 15)
            self.pid = None
        if self.keys_dir is not None:
            shutil.rmtree(self.keys_dir, ignore_errors=True)
            self.keys_dir = None


#: The test shell's prompt: each command is done when it shows again.
PROMPT = "PSTTY# "


def _read_until(master, shown, awaited, timeout):
    """Read the pty until `awaited` appears after what was `shown` (or,
    when None, until anything more came); all output so far."""
    output = shown
    deadline = time.time() + timeout
    while (awaited not in output[len(shown):]) if awaited else \
            len(output) == len(shown):
        if time.time() > deadline:
            raise RuntimeError("the session never showed what was awaited; "
                               "output so far: %r" % output[-400:])
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the session has ended
                break
            if not chunk:
                break
            output += chunk
    return output


def type_into_session(port, key_path, steps, timeout=60, between=None,
                      user="root"):
    """Log in as `user` by key on a real pty and type each step: (bytes to
    type, text the terminal must show before the next step, or None to go
    on once anything was echoed), calling between(step index) after each.
    The last step should end the shell.  Returns what the terminal
    showed."""
    master, slave = os.openpty()
    command = ["ssh", "-tt", "-F", "/dev/null", "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-o", "IdentitiesOnly=yes",
               "-o", "IdentityAgent=none", "-i", key_path,
               "-p", str(port), "%s@127.0.0.1" % user,
               "env PS1=%s HISTFILE=/dev/null bash --norc -i"
               % shlex.quote(PROMPT)]
    process = subprocess.Popen(command, stdin=slave, stdout=slave,
                               stderr=slave, start_new_session=True,
                               close_fds=True)
    os.close(slave)
    shown = b""
    try:
        shown = _read_until(master, shown, PROMPT.encode(), timeout)
        for index, (keys, awaited) in enumerate(steps):
            os.write(master, keys)
            shown = _read_until(master, shown, awaited and awaited.encode(),
                                timeout)
            if between is not None:
                between(index)
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
    return shown.decode("utf-8", "replace")
