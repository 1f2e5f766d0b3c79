"""The sshd forms of a failed, refused, abandoned or probing connection,
written by real sshds, one event per attempt:

- Debian 12's OpenSSH 9.2 (the host's /usr/sbin/sshd), with the live agent
  (`run --json`) reading the journal;
- Debian 13's OpenSSH 10 (sshd-session, the cached tree's sshd chrooted,
  realsys.ChrootSshd), read back from the journal and given to `scan`.

Each sshd here is started for this module with its own port and
configuration (keyboard-interactive on, MaxAuthTries 3, AllowUsers, and
for OpenSSH 10 a PerSourcePenalties that bites at the first failure).
Each scenario connects from a loopback address of its own
(realsys.unique_loopback) and only that source's events are looked at, so
other logins on the machine cannot disturb it.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

import realsys
from conftest import configured_agent, field, random_name
from support import PAMSIGNAL, pamsignal

pytestmark = pytest.mark.e2e

ALLOWED = "pssf"  # AllowUsers pssf*: users made with this prefix may log in
REFUSED = "pssr"
#: sshd_config lines of this module's servers.
FORMS_OPTIONS = [
    "KbdInteractiveAuthentication yes",
    "MaxAuthTries 3",
    "AllowUsers %s*" % ALLOWED,
]


def wrong_answers(workdir):
    """An SSH_ASKPASS program that always gives a wrong password, so one
    ssh run keeps guessing until sshd's MaxAuthTries stops it."""
    path = os.path.join(workdir, "askpass")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho wrong-password\n")
    os.chmod(path, 0o755)
    return path


def keyboard_interactive(user, port, source):
    """One wrong answer to PAM's prompt, then the client gives up."""
    return realsys._ssh(
        user, ["PreferredAuthentications=keyboard-interactive",
               "PubkeyAuthentication=no", "NumberOfPasswordPrompts=1"],
        "true", "127.0.0.1", port, 60, prefix=["sshpass", "-e"],
        env=dict(os.environ, SSHPASS="wrong-password"), source=source)


def guesses_until_cut_off(user, port, source, askpass):
    return realsys._ssh(
        user, ["PreferredAuthentications=password", "PubkeyAuthentication=no",
               "NumberOfPasswordPrompts=10"], "true", "127.0.0.1", port, 60,
        env=dict(os.environ, SSH_ASKPASS=askpass,
                 SSH_ASKPASS_REQUIRE="force"), source=source)


def password_once(user, port, source):
    return realsys.ssh_password(user, "wrong-password", port=port,
                                source=source)


def offer_key_and_leave(user, port, source, key_path):
    """A key the server does not know: the client has nothing else to try."""
    return realsys._ssh(
        user, ["BatchMode=yes", "IdentitiesOnly=yes",
               "PreferredAuthentications=publickey",
               "IdentityFile=%s" % key_path], "true", "127.0.0.1", port, 60,
        source=source)


def send_garbage(port, source):
    """A raw TCP client that speaks HTTP to sshd."""
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass


class Sources(object):
    """One loopback source per scenario."""

    def __init__(self, *names):
        for name in names:
            setattr(self, name, realsys.unique_loopback())


def of(events, source):
    return [e for e in events if field(e, "source.ip") == source]


def summary(events):
    return [(field(e, "event.action"), field(e, "event.reason"),
             field(e, "user.name"), field(e, "pamsignal.auth_method"))
            for e in events]


# ------------------------------------------------- Debian 12, OpenSSH 9.2


class HostSshd(object):
    """The host's sshd on a port and configuration of its own."""

    def __init__(self, options):
        self.dir = tempfile.mkdtemp(prefix="pamsignal-sshforms-")
        self.port = realsys.free_port()
        self.pidfile = os.path.join(self.dir, "sshd.pid")
        lines = ["Port %d" % self.port, "ListenAddress 127.0.0.1",
                 "PidFile " + self.pidfile,
                 "AuthorizedKeysFile .ssh/authorized_keys"]
        lines += ["HostKey /etc/ssh/ssh_host_%s_key" % t
                  for t in ("ed25519", "ecdsa", "rsa")
                  if os.path.exists("/etc/ssh/ssh_host_%s_key" % t)]
        self.config = os.path.join(self.dir, "sshd_config")
        with open(self.config, "w") as f:
            f.write("\n".join(lines + list(options) +
                              realsys._SSHD_TEST_OPTIONS) + "\n")

    def start(self, timeout=20):
        os.makedirs("/run/sshd", exist_ok=True)
        realsys._check([realsys.SSHD, "-t", "-f", self.config])
        realsys._check([realsys.SSHD, "-f", self.config],
                       stdin=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while not realsys._ssh_banner("127.0.0.1", self.port):
            if time.time() > deadline:
                raise RuntimeError("sshd did not come up on port %d"
                                   % self.port)
            time.sleep(0.1)
        return self

    def stop(self):
        pid = realsys._read_pid(self.pidfile)
        if pid and realsys._pid_alive_sshd(pid):
            os.kill(pid, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def forms_sshd(journald):
    realsys.require_root()
    realsys.require_binaries(realsys.SSHD, "ssh", "sshpass", "ssh-keygen")
    server = HostSshd(FORMS_OPTIONS).start()
    yield server
    server.stop()


@pytest.fixture
def forms_agent(forms_sshd, sshd, tmp_path):
    """The agent, counting a brute force at 3 failures (the shared sshd
    serves the barrier logins)."""
    agent = configured_agent(str(tmp_path / "agent"),
                             "\n[detection]\nbrute_force_fast = 3 in 10m\n")
    agent.start()
    yield agent
    agent.stop()


def settled(agent, counts, timeout=30):
    """{source: its events} once each source gave the number of events
    `counts` names, and then time passed in which none should add to them:
    a PAM failure waits up to SSH_HOLD_US for its sshd line, and a barrier
    login proves that everything before it has been read."""
    deadline = time.time() + timeout
    for source, count in counts.items():
        while len(of(agent.events(), source)) < count:
            if time.time() > deadline:
                pytest.fail("fewer than %d events from %s:\n%s" % (
                    count, source, agent.dump()), pytrace=False)
            time.sleep(0.2)
    time.sleep(1 + pamsignal.SSH_HOLD_US / 1e6)
    barrier = random_name("psbar")
    mark = agent.mark()
    realsys.ssh_password(barrier, "x")
    agent.wait_event(lambda e: field(e, "user.name") == barrier, since=mark)
    return {source: of(agent.events(), source) for source in counts}


def test_openssh_9_2_forms_end_to_end(forms_agent, forms_sshd, tmp_path):
    port = forms_sshd.port
    src = Sources("kbd", "max", "refused", "key", "garbage")
    allowed, _ = realsys.create_user(ALLOWED)
    refused, _ = realsys.create_user(REFUSED)
    key_path, _ = realsys.make_keypair(str(tmp_path))
    try:
        assert keyboard_interactive(allowed, port, src.kbd).returncode == 255
        assert guesses_until_cut_off(allowed, port, src.max,
                                     wrong_answers(str(tmp_path))
                                     ).returncode == 255
        assert password_once(refused, port, src.refused).returncode == 255
        assert offer_key_and_leave(allowed, port, src.key,
                                   key_path).returncode == 255
        send_garbage(port, src.garbage)

        got = settled(forms_agent, {src.kbd: 1, src.max: 5, src.refused: 2,
                                    src.key: 1, src.garbage: 1})
        # Keyboard-interactive through PAM: sshd writes the PAM failure
        # (from the PAM child and itself) and no Failed line. One event.
        assert summary(got[src.kbd]) == [
            ("login_failure", "bad_password", allowed,
             "keyboard-interactive/pam")]
        # MaxAuthTries 3: three guesses, the cut-off, one brute force of
        # three (guesses, not lines).
        events = got[src.max]
        assert sorted(summary(events)) == sorted(
            [("login_failure", "bad_password", allowed, "password")] * 3 +
            [("login_failure", "max_attempts", allowed, None),
             ("brute_force_detected", "repeated_failures", None, None)])
        (found,) = [e for e in events
                    if field(e, "event.action") == "brute_force_detected"]
        assert field(found, "pamsignal.attempts") == 3
        # AllowUsers: the refusal, then the guess sshd still lets it make.
        events = got[src.refused]
        assert summary(events) == [
            ("login_failure", "not_allowed", refused, None),
            ("login_failure", "invalid_user", refused, "password")]
        assert field(events[0], "pamsignal.detail") == \
            "not listed in AllowUsers"
        # A client that offered a key and left.
        assert summary(got[src.key]) == [
            ("login_failure", "key_probe", allowed, None)]
        # HTTP spoken to sshd: a probe, not a login.
        (probe,) = got[src.garbage]
        assert summary([probe]) == [("ssh_probe", "bad_banner", None, None)]
        assert field(probe, "pamsignal.detail") == "invalid format"
    finally:
        realsys.delete_user(allowed)
        realsys.delete_user(refused)


def test_forged_new_form_is_spoofed(forms_agent):
    mark = forms_agent.mark()
    realsys.forge("nobody", "sshd", "Connection closed by authenticating "
                  "user root 6.6.6.6 port 1 [preauth]")
    event = forms_agent.wait_event(
        lambda e: field(e, "event.action") == "spoofed_entry" and
        "6.6.6.6" in field(e, "message", ""), since=mark)
    assert field(event, "pamsignal.claimed_action") == "login_failure"
    assert field(event, "source.ip") is None


# ------------------------------------------------- Debian 13, OpenSSH 10


def _text(value):
    if isinstance(value, list):
        return bytes(value).decode("utf-8", "replace")
    return value or ""


def scan(entries, config_path):
    data = "".join(json.dumps(e) + "\n" for e in entries)
    p = subprocess.run(
        [sys.executable, PAMSIGNAL, "--config", config_path, "scan",
         "--json", "-"], input=data, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return [json.loads(line) for line in p.stdout.splitlines()]


def test_openssh_10_forms_end_to_end(tree, tmp_path):
    realsys.require_binaries("ssh", "sshpass", "unshare", "chroot")
    tree = os.path.realpath(tree)
    src = Sources("kbd", "max", "refused", "key", "garbage")
    allowed, _ = realsys.create_tree_user(tree, ALLOWED)
    refused, _ = realsys.create_tree_user(tree, REFUSED)
    key_path, _ = realsys.make_keypair(str(tmp_path))
    sshd = realsys.ChrootSshd(tree, port=realsys.free_port(), options=(
        FORMS_OPTIONS + ["PerSourcePenalties authfail:120s min:1s"]))
    try:
        sshd.start()
        port = sshd.port
        cursor = realsys.journal_cursor()
        keyboard_interactive(allowed, port, src.kbd)
        guesses_until_cut_off(allowed, port, src.max,
                              wrong_answers(str(tmp_path)))
        realsys.wait_for_journal(
            r"^Disconnecting authenticating user %s %s port \d+: Too many "
            r"authentication failures \[preauth\]$"
            % (allowed, src.max.replace(".", r"\.")), cursor)
        # The penalty for the failures: sshd turns the source away (once
        # the listener has seen the connection's process end).
        time.sleep(2)
        deadline = time.time() + 30
        while not [e for e in realsys.journal_entries(cursor)
                   if _text(e.get("MESSAGE")).startswith(
                       "drop connection #") and
                   "[%s]" % src.max in _text(e.get("MESSAGE"))]:
            assert time.time() < deadline, "sshd never dropped %s" % src.max
            password_once(allowed, port, src.max)
        password_once(refused, port, src.refused)
        offer_key_and_leave(allowed, port, src.key, key_path)
        send_garbage(port, src.garbage)
        realsys.wait_for_journal(
            r"^banner exchange: Connection from %s port \d+: invalid format$"
            % src.garbage.replace(".", r"\."), cursor)
        realsys.wait_for_journal(
            r"^Connection closed by authenticating user %s %s port \d+ "
            r"\[preauth\]$" % (allowed, src.key.replace(".", r"\.")), cursor)
        # What the tree's programs wrote: _EXE inside the tree, or none
        # when the writer had exited before journald looked (only this
        # test's sources are looked at below).
        entries = [e for e in realsys.journal_entries(cursor)
                   if _text(e.get("_EXE")).startswith(tree + "/") or
                   "_EXE" not in e and e.get("SYSLOG_IDENTIFIER") in (
                       "sshd", "sshd-session", "sshd-auth")]
    finally:
        sshd.stop()
        realsys.delete_tree_user(tree, allowed)
        realsys.delete_tree_user(tree, refused)
    # As a Debian 13 host's journald stores them: _EXE on that host.
    for entry in entries:
        if "_EXE" in entry:
            entry["_EXE"] = _text(entry["_EXE"])[len(tree):]
    # OpenSSH 10 writes a connection's lines as sshd-session.
    assert "sshd-session" in {e.get("SYSLOG_IDENTIFIER") for e in entries}
    # Kept for a reader of a failure: what the real sshd wrote.
    (tmp_path / "journal.json").write_text("".join(
        json.dumps(e) + "\n" for e in entries))
    config = tmp_path / "pamsignal.conf"
    config.write_text("[detection]\nbrute_force_fast = 3 in 10m\n")
    events = scan(entries, str(config))

    assert summary(of(events, src.kbd)) == [
        ("login_failure", "bad_password", allowed,
         "keyboard-interactive/pam")]
    guessed = of(events, src.max)
    assert sorted(summary(guessed))[:5] == sorted(
        [("login_failure", "bad_password", allowed, "password")] * 3 +
        [("login_failure", "max_attempts", allowed, None),
         ("brute_force_detected", "repeated_failures", None, None)])
    throttled = [e for e in guessed
                 if field(e, "event.action") == "source_throttled"]
    assert throttled and all(
        field(e, "event.reason") == "penalty" and
        field(e, "pamsignal.detail") == "penalty: failed authentication" and
        field(e, "destination.port") == port for e in throttled)
    assert len(guessed) == 5 + len(throttled)
    assert summary(of(events, src.refused)) == [
        ("login_failure", "not_allowed", refused, None),
        ("login_failure", "invalid_user", refused, "password")]
    assert summary(of(events, src.key)) == [
        ("login_failure", "key_probe", allowed, None)]
    assert summary(of(events, src.garbage)) == [
        ("ssh_probe", "bad_banner", None, None)]
