"""What root typed, end to end (issue 18): the real kernel's TTY audit,
the real journald, a real root ssh login through an sshd whose PAM stack
has the README's pam_tty_audit line, typed into on a real pty, and
`pamsignal.py run` and `report` as admins run them.

Kernel auditing is switched on for the module only (and put back as it
was); the sshd runs in a mount namespace of its own with the PAM file on
/etc/pam.d/sshd there, so no other login on the machine is audited (see
tests/ttyaudit_sys.py).  No auditd runs, so the kernel also copies each
record to its log, which journald reads too: the typed lines must come
once.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import pamsignal
import realsys
import ttyaudit_sys
from conftest import AGENT_SCRIPT, configured_agent, field

pytestmark = pytest.mark.e2e

SECRET = "not-in-any-record-" + os.urandom(4).hex()

#: (keys typed, what the terminal shows when they are done)
STEPS = [
    (b"echo one\r", ttyaudit_sys.PROMPT),
    (b"echo twX\x7fo\r", ttyaudit_sys.PROMPT),
    (b"echo thee\x1b[D\x1b[Dr\r", ttyaudit_sys.PROMPT),
    (b"echo garbage\x15echo four\r", ttyaudit_sys.PROMPT),
    # The secret is read in line mode with echo off, as a password prompt
    # reads. The prompt is printed once echo is off, and is not in the
    # command line itself (whose echo must not be taken for it).
    (b"stty -echo; printf '%s? ' SECRET; read S; stty echo\r", "SECRET? "),
    (SECRET.encode() + b"\r", ttyaudit_sys.PROMPT),
    (b"cat /etc/hostnam\t", "e "),  # completed to /etc/hostname
    (b"\r", ttyaudit_sys.PROMPT),
    (b"exit\r", None),
]
TYPED = ["echo one", "echo two", "echo three", "echo four",
         "stty -echo; printf '%s? ' SECRET; read S; stty echo",
         "cat /etc/hostnam<tab>", "exit"]


@pytest.fixture(scope="module")
def audited(journald, tmp_path_factory):
    """Kernel auditing on, and an sshd with pam_tty_audit for root."""
    realsys.require_binaries("ssh", "ssh-keygen", "unshare", "logger")
    workdir = str(tmp_path_factory.mktemp("ttyaudit"))
    key, _ = realsys.make_keypair(workdir)
    pam_files = {
        "/etc/pam.d/" + service: ttyaudit_sys.pam_file_with_tty_audit(
            os.path.join(workdir, service + ".pam"),
            base="/etc/pam.d/" + service)
        for service in ("sshd", "sudo")}
    with open(key + ".pub") as public:
        sshd = ttyaudit_sys.AuditedSshd(workdir, pam_files, public.read())
    with ttyaudit_sys.kernel_audit_on():
        sshd.start()
        try:
            yield sshd, key
        finally:
            sshd.stop()


def forge_tty_record(session):
    """An unprivileged user's copy of a TTY record, through syslog."""
    data = b"forged-by-nobody\r".hex().upper()
    realsys.forge("nobody", "audit", "TTY tty pid=1 uid=0 auid=0 ses=%s "
                  "major=136 minor=9 comm=\"bash\" data=%s" % (session, data))


@pytest.fixture
def tty_agent(audited, tmp_path):
    """`pamsignal.py run --json` with tty_audit on, for one test."""
    agent = configured_agent(str(tmp_path / "agent"),
                             "[detection]\ntty_audit = yes\n")
    agent.start()
    yield agent
    agent.stop(signal.SIGTERM)


def typed_close(agent):
    """The agent's session_closed of a root session with typed lines."""
    return agent.wait_event(
        lambda event: field(event, "event.action") == "session_closed"
        and field(event, "user.name") == "root"
        and field(event, "pamsignal.typed_lines"), timeout=30)


def test_root_session_closed_shows_what_was_typed(audited, tty_agent,
                                                  tmp_path):
    sshd, key = audited
    cursor = realsys.journal_cursor()
    since = time.time()
    shown = ttyaudit_sys.type_into_session(sshd.port, key, STEPS)
    assert SECRET not in shown  # echo was off: the premise holds
    closed = typed_close(tty_agent)
    assert closed["pamsignal"]["typed_lines"] == TYPED
    assert closed["service"]["name"] == "sshd"
    entries = realsys.journal_entries(cursor)
    records = [entry for entry in entries
               if entry.get("_TRANSPORT") == "audit" and
               entry.get("_AUDIT_TYPE") == "1319" and
               b"echo one" in bytes.fromhex(entry["_AUDIT_FIELD_DATA"])]
    assert records, "the kernel wrote no TTY record for the session"
    # The secret typed with echo off is in no record and no entry at all.
    assert not any(SECRET in json.dumps(entry) for entry in entries)
    assert not any(SECRET.encode().hex().upper() in json.dumps(entry)
                   for entry in entries)

    # report --user root over the real journal says the same.
    config = tmp_path / "report.conf"
    config.write_text("[detection]\ntty_audit = yes\n")
    report = subprocess.run(
        [sys.executable, AGENT_SCRIPT, "--config", str(config), "report",
         "--json", "--user", "root", "--since", "@%d" % int(since - 1)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    assert report.returncode == 0, report.stderr
    sessions = [session for session in json.loads(report.stdout)["sessions"]
                if session.get("source") == "127.0.0.1" and
                session.get("typed")]
    assert [session["typed"] for session in sessions] == [TYPED]


def audit_session_of(sshd, cursor):
    """The audit session PAM started for the root login sshd serves now
    (its USER_START record names the session process)."""
    found = {}

    def started():
        processes = {str(pid) for pid in sshd.session_processes()}
        for entry in realsys.journal_entries(cursor):
            if entry.get("_TRANSPORT") == "audit" and \
                    entry.get("_AUDIT_TYPE") == "1105" and \
                    entry.get("_PID") in processes:
                found["session"] = entry["_AUDIT_SESSION"]
                return True
        return False

    assert realsys.wait_for(started, 15), "no USER_START of the login"
    return found["session"]


def test_a_forged_record_is_never_typed_input(audited, tty_agent,
                                              tmp_path):
    """While root's session is open, nobody writes a TTY record's text
    through syslog for its audit session: it reaches the journal, and
    neither `run` nor `scan` of the export takes it."""
    sshd, key = audited
    cursor = realsys.journal_cursor()
    steps = [(b"echo first\r", ttyaudit_sys.PROMPT),
             (b"sleep 0.1\r", ttyaudit_sys.PROMPT),
             (b"exit\r", None)]

    def forge_when_open(step):
        if step == 0:
            forge_tty_record(audit_session_of(sshd, cursor))

    ttyaudit_sys.type_into_session(sshd.port, key, steps,
                                        between=forge_when_open)
    closed = typed_close(tty_agent)
    assert closed["pamsignal"]["typed_lines"] == [
        "echo first", "sleep 0.1", "exit"]
    entries = realsys.journal_entries(cursor)
    forged = [entry for entry in entries
              if "forged-by-nobody" in realsys._text(entry.get("MESSAGE"))
              or "666F72676564" in realsys._text(entry.get("MESSAGE"))]
    assert forged and all(entry["_TRANSPORT"] == "syslog"
                          for entry in forged)
    export = "".join(json.dumps(entry) + "\n" for entry in entries).encode()
    config = tmp_path / "scan.conf"
    config.write_text("[detection]\ntty_audit = yes\n")
    scanned = subprocess.run(
        [sys.executable, AGENT_SCRIPT, "--config", str(config), "scan",
         "--json", "-"], input=export, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, timeout=120)
    assert scanned.returncode == 0, scanned.stderr
    typed = [event["pamsignal"]["typed_lines"] for event in map(
        json.loads, scanned.stdout.decode().splitlines())
        if field(event, "pamsignal.typed_lines")]
    assert typed == [["echo first", "sleep 0.1", "exit"]]
    assert pamsignal.parse_audit_record(forged[0]) is None


def test_sudo_to_root_inside_a_users_login(audited, tty_agent, make_user):
    """A user logs in (not audited: the line enables root only) and runs a
    root shell through sudo (the README's open_only line in sudo's PAM
    file): what is typed as root goes to the sudo session, which shares the
    user's audit session, and the user's own session has none."""
    sshd, key = audited
    user, password = make_user(groups=("sudo",))
    root_prompt = "PSROOT# "
    steps = [(b"echo as-user\r", ttyaudit_sys.PROMPT),
             (("sudo env PS1='%s' bash --norc -i\r" % root_prompt).encode(),
              "password for"),
             (password.encode() + b"\r", root_prompt),
             (b"id -u\r", root_prompt),
             (b"echo as-rooX\x7ft\r", root_prompt),
             (b"exit\r", ttyaudit_sys.PROMPT),
             (b"echo user-again\r", ttyaudit_sys.PROMPT),
             (b"exit\r", None)]
    ttyaudit_sys.type_into_session(sshd.port, key, steps, user=user)
    closed = tty_agent.wait_event(
        lambda event: field(event, "event.action") == "session_closed"
        and field(event, "service.name") == "sshd"
        and field(event, "user.name") == user, timeout=30)
    sudo_closed = [event for event in tty_agent.events()
                   if field(event, "event.action") == "session_closed" and
                   field(event, "service.name") == "sudo"]
    assert [field(event, "pamsignal.typed_lines")
            for event in sudo_closed] == [["id -u", "echo as-root", "exit"]]
    assert "typed_lines" not in closed["pamsignal"]
    assert password not in json.dumps(tty_agent.events())


def test_with_auditd_the_records_come_once_all_the_same(audited, tty_agent,
                                                       tmp_path):
    """With auditd connected the kernel sends each record to it and no
    copy to its log; journald still gets them from the audit multicast
    group, and the lines are the same."""
    sshd, key = audited
    auditd = ttyaudit_sys.PrivateAuditd(str(tmp_path)).start()
    try:
        cursor = realsys.journal_cursor()
        steps = [(b"echo with-auditd\r", ttyaudit_sys.PROMPT),
                 (b"exit\r", None)]
        ttyaudit_sys.type_into_session(sshd.port, key, steps)
        closed = typed_close(tty_agent)
        assert auditd.foreign or realsys.wait_for(
            lambda: "type=USER_END" in auditd.output(), 15)
    finally:
        auditd.stop()
    assert closed["pamsignal"]["typed_lines"] == ["echo with-auditd", "exit"]
    data = b"echo with-auditd\r".hex().upper()
    assert auditd.foreign or data in auditd.output()  # auditd had it
    entries = [entry for entry in realsys.journal_entries(cursor)
               if data in realsys._text(entry.get("MESSAGE"))]
    assert [entry["_TRANSPORT"] for entry in entries] == ["audit"]
