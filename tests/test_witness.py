"""A flood must not blind the monitor, offline parts: journald's
suppression entry as an event (trust, metrics, status), the drop-in that
lifts sshd's rate limit (install, make install, status), the login records
(wtmp and wtmpdb parsers, the follower, the decision), and the exact
journalctl invocation against the real journalctl. The booted-systemd half
is tests/test_blind.py."""
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import realsys
from support import PAMSIGNAL, REPO, make_entry, pamsignal

SECOND = 1000000
T0 = 1796544079959553  # a real wtmpdb Login value (Debian 13, 2026-12-06)

#: wtmpdb's table, as read from the file sshd 10.0 (libwtmpdb 0.73) wrote
#: in the booted Debian 13 tree (sqlite_master of /var/log/wtmp.db).
WTMPDB_SCHEMA = ("CREATE TABLE wtmp(ID INTEGER PRIMARY KEY, Type INTEGER, "
                 "User TEXT NOT NULL, Login INTEGER, Logout INTEGER, "
                 "TTY TEXT, RemoteHost TEXT, Service TEXT) STRICT")


def suppression(**fields):
    entry = make_entry(
        "systemd-journald", "Suppressed 6371 messages from ssh.service",
        MESSAGE_ID=pamsignal.JOURNAL_DROPPED_MESSAGE_ID, N_DROPPED="6371",
        OBJECT_SYSTEMD_UNIT="ssh.service", _TRANSPORT="driver",
        _EXE="/usr/lib/systemd/systemd-journald", _COMM="systemd-journal")
    entry.update(fields)
    return {key: value for key, value in entry.items() if value is not None}


# ------------------------------------------------------- the suppression


@pytest.mark.parametrize("unit, watched", [
    ("ssh.service", True), ("sshd.service", True),
    ("sshd@3-10.0.0.1:22-10.0.0.9:5122.service", True),
    ("session-12.scope", True), ("getty@tty1.service", True),
    ("serial-getty@ttyS0.service", True), ("systemd-logind.service", True),
    ("cockpit-session.service", True), ("polkit.service", True),
    ("gdm.service", True), ("run-p4107-i4407.service", True),
    ("cron.service", False), ("nginx.service", False),
    ("user@1000.service", False), ("ssh.socket", False),
])
def test_which_units_carry_logins(unit, watched):
    event = pamsignal.parse_entry(suppression(OBJECT_SYSTEMD_UNIT=unit))
    assert (event is not None) == watched
    if watched:
        assert event.action == "journal_suppressed" and event.unit == unit


@pytest.mark.parametrize("forgery", [
    {"_TRANSPORT": "journal"},  # a client of the native socket
    {"_TRANSPORT": "syslog"},  # logger, syslog(3)
    {"_TRANSPORT": "stdout"},  # a unit's output
    {"_TRANSPORT": None},
    {"SYSLOG_IDENTIFIER": "sshd-helper"},  # not journald, even via driver
])
def test_only_journald_itself_writes_the_suppression(forgery):
    event = pamsignal.parse_entry(suppression(**forgery))
    assert event.action == "spoofed_entry"
    assert event.claimed_action == "journal_suppressed"
    assert event.dropped is None


@pytest.mark.parametrize("bad", [
    {"N_DROPPED": "many"}, {"N_DROPPED": None}, {"N_DROPPED": "-5"},
    {"N_DROPPED": ["1", "2"]}, {"N_DROPPED": [255, 0]},
    {"OBJECT_SYSTEMD_UNIT": ["ssh.service", "ssh.service"]},
    {"MESSAGE": None}, {"MESSAGE": "x" * 100000},
])
def test_a_malformed_suppression_never_crashes(bad):
    event = pamsignal.parse_entry(suppression(**bad))
    assert event is None or event.action == "journal_suppressed"
    if event is not None:
        assert event.dropped is None or event.dropped >= 0
        assert len(event.message) <= pamsignal.MAX_UNTRUSTED_MESSAGE_CHARS


def test_the_suppression_renders_everywhere():
    event = pamsignal.parse_entry(suppression())
    ecs = pamsignal.event_to_ecs(event)
    assert ecs["pamsignal"]["unit"] == "ssh.service"
    assert ecs["pamsignal"]["dropped"] == 6371
    assert ecs["event"]["severity"] == 8
    assert "unit=ssh.service dropped=6371" in pamsignal.render_text(event)
    text = pamsignal.alert_text(event)
    assert text.title == "Login lines dropped by the journal: ssh.service " \
        "on web1"
    assert ("Lines dropped", "6371") in text.facts
    assert "lift the limit" in text.advice


def test_suppressions_and_unaccounted_sessions_are_never_held_back():
    config = pamsignal.parse_config(
        "[alerts]\ncooldown = 1h\nrate_limit = 1 in 1h\n").alerts
    gate = pamsignal.Throttle(config.cooldown, config.rate_limit)
    sent = []
    for n in range(50):
        sent += gate.admit(pamsignal.Event(
            action="login_failure", source_ip="198.51.100.7", user="root",
            timestamp_us=n), n)
        sent += gate.admit(pamsignal.parse_entry(suppression()), n)
        sent += gate.admit(pamsignal.Event(
            action="unaccounted_session", user="alice", timestamp_us=n), n)
    kinds = [alert.action for alert in sent]
    assert kinds.count("journal_suppressed") == 50
    assert kinds.count("unaccounted_session") == 50
    assert kinds.count("login_failure") == 1


def test_suppressions_are_counted_and_shown_by_status():
    pipeline = pamsignal.Pipeline([], pamsignal.parse_config("").detection)
    pipeline.process_entry(suppression(N_DROPPED="100"))
    pipeline.process_entry(suppression(
        N_DROPPED="23", __REALTIME_TIMESTAMP=str(1796544100 * SECOND)))
    pipeline.process_entry(suppression(
        OBJECT_SYSTEMD_UNIT="session-3.scope", N_DROPPED="7",
        __REALTIME_TIMESTAMP=str(1796544000 * SECOND)))
    text = pamsignal.render_metrics(pamsignal.suppression_samples(pipeline))
    assert 'pamsignal_journal_suppressed_total{unit="ssh.service"} 2' in text
    assert 'pamsignal_journal_dropped_lines_total{unit="ssh.service"} 123' \
        in text
    # The last one reported, which is the one of session-3.scope.
    assert 'pamsignal_journal_last_suppression_time_seconds{dropped="7",' \
        'unit="session-3.scope"} 1796544000' in text
    report = pamsignal.health_report(pamsignal.parse_metrics(text), 0.0,
                                     alive=lambda pid: False)
    assert report["suppressed"] == {"session-3.scope": 1, "ssh.service": 2}
    assert report["last_suppression"] == {
        "unit": "session-3.scope", "dropped": 7,
        "time": "2026-12-06T08:00:00.000000Z"}
    for n in range(pamsignal.MAX_SUPPRESSED_UNITS + 10):  # bounded labels
        pipeline.process_entry(suppression(
            OBJECT_SYSTEMD_UNIT="sshd@%d.service" % n))
    assert len(pipeline.suppressions) == pamsignal.MAX_SUPPRESSED_UNITS + 1
    assert pipeline.suppressions["other"] == 12
    shown = pamsignal.render_status(report, "/x.prom")
    assert "suppressed: session-3.scope 1 times (7 lines), ssh.service 2 " \
        "times (123 lines)\n" in shown
    assert "last: 2026-12-06T08:00:00.000000Z 7 lines of session-3.scope " \
        "dropped" in shown


# -------------------------------------------- the real journalctl invocation


NATIVE_FORGER = """
import socket, sys
payload = sys.argv[1].encode()
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.sendto(payload, "/run/systemd/journal/socket")
"""


def follow(position, stop_marker, timeout=30):
    """Lines of the agent's own journalctl command until `stop_marker`."""
    command = pamsignal.follow_command("journalctl", position)
    process = subprocess.Popen(command, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
    lines, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(json.loads(line))
            if stop_marker in line.decode("utf-8", "replace"):
                break
    finally:
        process.kill()
        process.wait()
    return lines


def test_journalctl_delivers_suppressions_beside_the_watched_services():
    """follow_command against the real journalctl: the `+` group brings
    MESSAGE_ID entries beside the SYSLOG_IDENTIFIER ones, after a time and
    after a cursor (systemd 252 skipped the first match after a cursor of
    a non-matching entry; here the cursor is a matching one, as the agent's
    always is), and a forgery through the native socket or logger is not
    taken for journald's word."""
    realsys.require_root()
    realsys.ensure_journald()
    tag = "pst" + os.urandom(4).hex()
    since = ["--since=@%.6f" % (time.time() - 1)]
    realsys.forge("root", "sshd", "%s first" % tag)
    realsys.forge("nobody", "systemd-journald",
                  "Suppressed 9 messages from ssh.service %s" % tag)
    forged = "\n".join([
        "MESSAGE=Suppressed 5 messages from ssh.service %s" % tag,
        "MESSAGE_ID=" + pamsignal.JOURNAL_DROPPED_MESSAGE_ID,
        "N_DROPPED=5", "OBJECT_SYSTEMD_UNIT=ssh.service",
        "SYSLOG_IDENTIFIER=systemd-journald", "_TRANSPORT=driver", ""])
    # The system's python3: nobody cannot run one under /root.
    realsys.require_binaries("/usr/bin/python3", "runuser")
    subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3",
                    "-c", NATIVE_FORGER, forged], check=True, timeout=30)
    for n in range(200):  # a burst, as journalctl must follow one
        realsys.forge("root", "sshd", "%s burst %d" % (tag, n))
    realsys.forge("root", "sshd", "%s last" % tag)
    seen = []
    for position in (since, None):
        if position is None:  # resume after the cursor of the first line
            first = [line for line in seen if tag + " first" in
                     line.get("MESSAGE", "")]
            position = ["--after-cursor=" + first[0]["__CURSOR"]]
        seen = [line for line in follow(position, tag + " last")
                if tag in str(line.get("MESSAGE", ""))]
        messages = [line["MESSAGE"] for line in seen]
        assert messages[-1] == "%s last" % tag
        assert sum("burst" in message for message in messages) == 200
        claims = [line for line in seen if line.get("MESSAGE_ID")]
        # The logger line has no MESSAGE_ID and no watched identifier.
        assert [line["N_DROPPED"] for line in claims] == ["5"]
        assert claims[0]["_TRANSPORT"] == "journal"  # not journald's own
        event = pamsignal.parse_entry(claims[0])
        assert event.action == "spoofed_entry"
        assert event.claimed_action == "journal_suppressed"
        assert event.writer_uid == 65534


# ------------------------------------------------------------- the drop-in


def test_the_embedded_dropin_is_the_shipped_file():
    with open(os.path.join(REPO, "contrib", "systemd",
                           "pamsignal-ratelimit.conf")) as handle:
        assert handle.read() == pamsignal.SSH_RATELIMIT_DROPIN
    lines = pamsignal.SSH_RATELIMIT_DROPIN.splitlines()
    assert lines[-3:] == ["[Service]", "LogRateLimitIntervalSec=30s",
                          "LogRateLimitBurst=1000000"]


def cli(*args):
    return subprocess.run([sys.executable, PAMSIGNAL] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def test_install_writes_the_dropins_and_uninstall_removes_them(tmp_path):
    root = str(tmp_path)
    admins = tmp_path / "etc/systemd/system/sshd.service.d/admin.conf"
    admins.parent.mkdir(parents=True)
    admins.write_text("[Service]\nNice=5\n")
    result = cli("install", "--root", root)
    assert result.returncode == 0, result.stderr
    for unit in ("ssh.service", "sshd.service"):
        dropin = tmp_path / "etc/systemd/system" / (unit + ".d") / \
            "pamsignal-ratelimit.conf"
        assert dropin.read_text() == pamsignal.SSH_RATELIMIT_DROPIN
        assert os.stat(str(dropin)).st_mode & 0o777 == 0o644
        assert "wrote %s" % dropin in result.stdout
    result = cli("uninstall", "--root", root)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "etc/systemd/system/ssh.service.d").exists()
    assert admins.read_text() == "[Service]\nNice=5\n"  # the admin's stays
    assert not (admins.parent / "pamsignal-ratelimit.conf").exists()


def test_make_install_installs_the_dropins(tmp_path):
    result = subprocess.run(["make", "-C", REPO, "install",
                             "DESTDIR=%s" % tmp_path],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for unit in ("ssh", "sshd"):
        dropin = tmp_path / ("lib/systemd/system/%s.service.d/"
                             "pamsignal-ratelimit.conf" % unit)
        assert dropin.read_text() == pamsignal.SSH_RATELIMIT_DROPIN
    subprocess.run(["make", "-C", REPO, "uninstall", "DESTDIR=%s" % tmp_path],
                   stdout=subprocess.PIPE, check=True, timeout=60)
    assert not list(tmp_path.glob("lib/systemd/system/*.d"))


def show(*units):
    return "\n".join("Id=%s\nLoadState=%s\nLogRateLimitIntervalUSec=%s\n"
                     "LogRateLimitBurst=%s\nActiveEnterTimestamp=@1000\n"
                     "DropInPaths=/etc/a.conf /etc/b.conf\n" % unit
                     for unit in units)


@pytest.mark.parametrize("text, verdict", [
    (show(("ssh.service", "loaded", "30s", "1000000"),
          ("ssh.service", "loaded", "30s", "1000000")),
     "lifted for ssh.service (1000000 lines per 30s)"),
    (show(("ssh.service", "loaded", "0", "0"),
          ("sshd.service", "not-found", "0", "0")),
     "not lifted for ssh.service: a flood can make journald drop a login "
     "(`pamsignal install` writes the drop-in)"),
    # A burst journald's own default exceeds is no lifting.
    (show(("sshd.service", "loaded", "30s", "10000")), "not lifted for "
     "sshd.service: a flood can make journald drop a login (`pamsignal "
     "install` writes the drop-in)"),
    (show(("ssh.service", "not-found", "0", "0")), "unknown (no sshd unit)"),
    ("", "unknown (no sshd unit)"),
    ("garbage\n=\n\nId=\n", "unknown (no sshd unit)"),
])
def test_status_says_whether_the_limit_is_lifted(text, verdict):
    assert pamsignal.ratelimit_verdict(text, lambda path: 999) == verdict


def test_status_says_a_dropin_newer_than_the_unit_waits_for_a_restart():
    text = show(("ssh.service", "loaded", "30s", "1000000"))
    newer = {"/etc/a.conf": 999, "/etc/b.conf": 1001}.__getitem__
    assert pamsignal.ratelimit_verdict(text, newer) == (
        "lifted for ssh.service (1000000 lines per 30s); in effect once it "
        "restarts (systemctl restart ssh.service)")

    def missing(path):
        raise FileNotFoundError(path)
    assert pamsignal.ratelimit_verdict(text, missing) == \
        "lifted for ssh.service (1000000 lines per 30s)"
    # systemd before 248 prints times as text: no claim either way.
    old = text.replace("@1000", "Sun 2026-12-06 08:00:00 UTC")
    assert pamsignal.ratelimit_verdict(old, newer) == \
        "lifted for ssh.service (1000000 lines per 30s)"


# ------------------------------------------------------ the login records


def utmp(kind=7, pid=4242, line=b"pts/1", user=b"alice",
         host=b"203.0.113.5", seconds=T0 // SECOND, micros=T0 % SECOND):
    return pamsignal.UTMP_FORMAT.pack(
        kind, pid, line, line[-4:], user, host, 0, 0, 0, seconds, micros,
        0, 0, 0, 0, b"")


def test_utmp_records_are_384_bytes():
    assert pamsignal.UTMP_FORMAT.size == 384


def test_a_wtmp_login_record():
    (record,) = pamsignal.parse_utmp(utmp(kind=6, user=b"LOGIN") + utmp() +
                                     utmp(kind=8, user=b""))
    assert record == pamsignal.LoginRecord(
        T0, "alice", "203.0.113.5", None, "pts/1", 4242, None)


def test_the_record_sshd_wrote_in_the_booted_tree():
    """Bytes 384-767 of /var/log/wtmp after one `ssh -tt` login there
    (od dump; zero bytes elided): USER_PROCESS, pid 78, pts/1, user expu,
    host 127.0.0.1."""
    raw = bytearray(384)
    raw[0:4] = b"\x07\x00\x00\x00"
    raw[4:8] = b"\x4e\x00\x00\x00"
    raw[8:13] = b"pts/1"
    raw[40:48] = b"ts/1expu"
    raw[76:85] = b"127.0.0.1"
    raw[340:352] = bytes.fromhex("4f16156b41a40e007f000001")
    (record,) = pamsignal.parse_utmp(bytes(raw))
    assert (record.user, record.tty, record.source_ip, record.pid) == (
        "expu", "pts/1", "127.0.0.1", 78)
    assert record.time_us == 0x6b15164f * SECOND + 0x0ea441


@pytest.mark.parametrize("raw", [
    b"", b"\x07", utmp()[:383], os.urandom(384), b"\xff" * 384,
    b"\0" * 384, utmp(user=b"\0alice"), utmp(seconds=-5),
    utmp(micros=1000000), utmp(micros=-1),
])
def test_hostile_wtmp_records_never_crash(raw):
    for record in pamsignal.parse_utmp(raw):
        assert record.user and record.time_us > 0


def test_hostile_text_in_a_wtmp_record_is_bounded():
    (record,) = pamsignal.parse_utmp(utmp(
        user=b"a\xffb\x1b[31m" + b"x" * 30, host=b"h" * 256,
        line=b"\x00\x01"))
    assert record.user.startswith("a\ufffdb\x1b[31m")
    # 256 bytes with no NUL: read whole, and no host name (a 256-letter
    # label is none).
    assert record.source_ip is None and record.source_domain is None
    assert record.tty is None
    # A name with an ANSI escape reaches the alert escaped.
    event = pamsignal.unaccounted_event(record, "/var/log/wtmp", "web1")
    assert "\x1b" not in pamsignal.render_text(event)


def login(at, user="alice", ip="203.0.113.5", action="login_success",
          service="sshd"):
    return pamsignal.journal_login(pamsignal.Event(
        action=action, timestamp_us=at, user=user, source_ip=ip,
        service=service))


def record(at=T0, user="alice", ip="203.0.113.5"):
    return pamsignal.login_record(user, ip, "pts/1", at)


GRACE = pamsignal.ACCOUNT_GRACE_US


@pytest.mark.parametrize("logins, accounted", [
    ([login(T0 - 1 * SECOND)], True),
    ([login(T0 + 3 * SECOND, action="session_opened", ip=None)], True),
    ([login(T0 - 1 * SECOND, user="bob")], False),
    ([login(T0 - 1 * SECOND, ip="198.51.100.1")], False),
    ([login(T0 - 1 * SECOND, ip="::ffff:203.0.113.5")], False),
    ([login(T0 - 600 * SECOND)], False),
    ([login(T0 - 1 * SECOND, service="sudo", ip=None)], False),
    ([login(T0 - 1 * SECOND, service="su-l", ip=None)], False),
    ([pamsignal.journal_login(pamsignal.Event(
        action="session_opened", timestamp_us=T0, user="alice",
        target_user="root", service="other"))], False),
    ([], False),
])
def test_which_journal_logins_account_for_a_record(logins, accounted):
    logins = [each for each in logins if each is not None]
    unaccounted, waiting = pamsignal.judge_records(
        [record()], logins, read_until_us=T0 + GRACE)
    assert waiting == []
    assert unaccounted == ([] if accounted else [record()])


def test_a_record_waits_until_the_journal_was_read_past_it():
    judge = pamsignal.judge_records
    assert judge([record()], [], T0 + GRACE - 1) == ([], [record()])
    assert judge([record()], [], None) == ([], [record()])
    assert judge([record()], [], T0 + GRACE) == ([record()], [])
    # A quiet journal: the wall clock decides, later.
    quiet = pamsignal.QUIET_GRACE_US
    assert quiet > GRACE
    assert judge([record()], [], T0, T0 + quiet - 1) == ([], [record()])
    assert judge([record()], [], T0, T0 + quiet) == ([record()], [])


def test_a_record_without_an_address_matches_any_address():
    console = pamsignal.login_record("root", "", "tty1", T0)
    assert console.source_ip is None and console.tty == "tty1"
    assert pamsignal.judge_records([console], [login(T0, user="root")],
                                   T0 + GRACE) == ([], [])


def test_the_witness_keeps_bounded_memory():
    witness = pamsignal.LoginWitness([])
    for n in range(pamsignal.MAX_RECENT_LOGINS * 3):
        witness.observe(pamsignal.Event(action="login_success", user="u%d" % n,
                                        timestamp_us=T0 + n, service="sshd"))
    assert len(witness.logins) == pamsignal.MAX_RECENT_LOGINS
    assert witness.logins[-1].user == "u%d" % (
        pamsignal.MAX_RECENT_LOGINS * 3 - 1)


def test_wtmp_is_followed_like_a_tail(tmp_path):
    path = tmp_path / "wtmp"
    path.write_bytes(utmp(user=b"old"))
    follower = pamsignal.LoginRecordFile(str(path))
    follower.open()
    assert follower.read() == []  # what was there before is history
    with open(str(path), "ab") as handle:
        handle.write(utmp(user=b"new") + utmp(user=b"half")[:100])
    assert [r.user for r in follower.read()] == ["new"]
    with open(str(path), "ab") as handle:
        handle.write(utmp(user=b"half")[100:])
    assert [r.user for r in follower.read()] == ["half"]
    assert follower.read() == []
    path.write_bytes(utmp(user=b"truncated"))  # shorter: from its start
    assert [r.user for r in follower.read()] == ["truncated"]
    os.rename(str(path), str(tmp_path / "wtmp.1"))  # rotated
    assert follower.read() == []
    path.write_bytes(utmp(user=b"rotated") + utmp(user=b"rotated2"))
    assert [r.user for r in follower.read()] == ["rotated", "rotated2"]
    assert follower.problem is None and follower.kind == "wtmp"


def test_a_wtmp_file_larger_than_a_batch_is_read_in_steps(tmp_path):
    path = tmp_path / "wtmp"
    follower = pamsignal.LoginRecordFile(str(path))
    follower.open()  # not there yet: read from the start once it is
    path.write_bytes(utmp() * (pamsignal.MAX_RECORDS_PER_READ + 5))
    assert len(follower.read()) == pamsignal.MAX_RECORDS_PER_READ
    assert len(follower.read()) == 5


def wtmpdb(path, rows):
    """Create wtmpdb's table (the real schema) if missing, add rows."""
    schema = WTMPDB_SCHEMA if sqlite3.sqlite_version_info >= (3, 37) \
        else WTMPDB_SCHEMA[:-len(" STRICT")]  # STRICT came in SQLite 3.37
    connection = sqlite3.connect(str(path))
    with connection:
        connection.execute(schema.replace("TABLE", "TABLE IF NOT EXISTS"))
        connection.executemany(
            "INSERT INTO wtmp (Type, User, Login, Logout, TTY, RemoteHost, "
            "Service) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    connection.close()


def test_wtmpdb_is_followed_by_row_id(tmp_path):
    path = tmp_path / "wtmp.db"
    wtmpdb(path, [])
    wtmpdb(path, [(3, "old", T0, None, "pts/0", "192.0.2.1", None)])
    follower = pamsignal.LoginRecordFile(str(path))
    follower.open()
    assert follower.read() == []
    wtmpdb(path, [
        (1, "reboot", T0, None, "~", "6.1.0", None),  # BOOT_TIME
        (3, "expu", T0 + 1, T0 + 9, "pts/1", "127.0.0.1", None),
        (3, "carol", T0 + 2, None, "tty1", None, "login"),
        (3, "", T0 + 3, None, None, None, None)])
    records = follower.read()
    assert [(r.user, r.source_ip, r.tty, r.service) for r in records] == [
        ("expu", "127.0.0.1", "pts/1", None), ("carol", None, "tty1", "login")]
    assert follower.kind == "wtmpdb" and follower.problem is None
    assert follower.read() == []


def test_wtmpdb_is_opened_read_only(tmp_path):
    path = tmp_path / "wtmp.db"
    wtmpdb(path, [])
    os.chmod(str(path), 0o444)
    os.chmod(str(tmp_path), 0o555)  # no journal file could be made
    try:
        follower = pamsignal.LoginRecordFile(str(path))
        follower.open()
        assert follower.problem is None
    finally:
        os.chmod(str(tmp_path), 0o755)


@pytest.mark.parametrize("content", [
    pamsignal.SQLITE_MAGIC + os.urandom(4000),
    pamsignal.SQLITE_MAGIC,
])
def test_a_broken_wtmpdb_is_a_problem_not_a_crash(tmp_path, content):
    path = tmp_path / "wtmp.db"
    path.write_bytes(content)
    follower = pamsignal.LoginRecordFile(str(path))
    follower.open()
    assert follower.read() == []
    assert follower.problem.startswith("cannot read %s" % path)


def test_a_fifo_as_login_records_is_a_problem_not_a_hang(tmp_path):
    # The follower is read in the agent's main loop: a FIFO put there
    # blocked it (the journal, alerts and the watchdog with it).
    path = tmp_path / "wtmp"
    os.mkfifo(str(path))
    follower = pamsignal.LoginRecordFile(str(path))
    done = threading.Thread(target=follower.open, daemon=True)
    done.start()
    done.join(30)
    if done.is_alive():  # unblock the old code's open() before failing
        os.close(os.open(str(path), os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert "is a FIFO, not a regular file" in follower.problem


def test_a_wtmpdb_name_not_in_utf8_blinds_nothing(tmp_path):
    path = tmp_path / "wtmp.db"
    wtmpdb(path, [])
    follower = pamsignal.LoginRecordFile(str(path))
    follower.open()
    connection = sqlite3.connect(str(path))
    with connection:
        connection.execute(
            "INSERT INTO wtmp (Type, User, Login, TTY, RemoteHost) VALUES "
            "(3, CAST(x'ff61' AS TEXT), ?, 'pts/1', '192.0.2.7')", (T0,))
    connection.close()
    wtmpdb(path, [(3, "dave", T0 + 1, None, "pts/2", "192.0.2.8", None)])
    records = follower.read()
    assert follower.problem is None
    assert [(r.user, r.source_ip) for r in records] == [
        ("\ufffda", "192.0.2.7"), ("dave", "192.0.2.8")]


def test_a_wtmpdb_row_id_that_is_not_a_number_is_passed_over(tmp_path):
    # Only a table made by hand can hold one (wtmpdb's is STRICT), but the
    # comparison of text with a number crashed the agent.
    path = tmp_path / "wtmp.db"
    connection = sqlite3.connect(str(path))
    with connection:
        connection.execute("CREATE TABLE wtmp(ID, Type INTEGER, User TEXT, "
                           "Login INTEGER, Logout INTEGER, TTY TEXT, "
                           "RemoteHost TEXT, Service TEXT)")
        connection.execute("INSERT INTO wtmp VALUES (1, 3, 'old', ?, NULL, "
                           "'pts/0', '192.0.2.1', NULL)", (T0,))
    follower = pamsignal.LoginRecordFile(str(path))
    follower.open()
    with connection:
        connection.execute("INSERT INTO wtmp VALUES ('zz', 3, 'odd', ?, "
                           "NULL, 'pts/3', '192.0.2.9', NULL)", (T0 + 1,))
        connection.execute("INSERT INTO wtmp VALUES (2, 3, 'erin', ?, NULL, "
                           "'pts/4', '192.0.2.10', NULL)", (T0 + 2,))
    connection.close()
    assert [r.user for r in follower.read()] == ["erin"]
    assert follower.problem is None


def test_a_foreign_sqlite_file_is_a_problem(tmp_path):
    path = tmp_path / "other.db"
    connection = sqlite3.connect(str(path))
    connection.execute("CREATE TABLE t (x)")
    connection.close()
    follower = pamsignal.LoginRecordFile(str(path))
    follower.open()
    assert "no such table: wtmp" in follower.problem


def test_the_witness_reports_what_no_login_explains(tmp_path):
    path = tmp_path / "wtmp"
    path.write_bytes(b"")
    witness = pamsignal.LoginWitness([pamsignal.LoginRecordFile(str(path))])
    witness.open(T0)
    witness.observe(pamsignal.Event(action="login_success", user="alice",
                                    source_ip="203.0.113.5", service="sshd",
                                    timestamp_us=T0))
    path.write_bytes(utmp() + utmp(user=b"mallory", host=b"198.51.100.9") +
                     utmp(user=b"ancient", seconds=T0 // SECOND - 3600))
    assert witness.check(T0, None) == []  # not read far enough yet
    ((found, where),) = witness.check(T0 + GRACE, None)
    assert (found.user, found.source_ip, where) == (
        "mallory", "198.51.100.9", str(path))
    assert witness.verdicts == {"accounted": 1, "unaccounted": 1}
    assert witness.check(T0 + 100 * GRACE, None) == []  # reported once


# ----------------------------------------------------------- configuration


@pytest.mark.parametrize("value, paths", [
    ("auto", "auto"), ("AUTO", "auto"), ("off", ()),
    ("/var/log/wtmp", ("/var/log/wtmp",)),
    ("/var/log/wtmp, /var/lib/wtmpdb/wtmp.db",
     ("/var/log/wtmp", "/var/lib/wtmpdb/wtmp.db")),
])
def test_the_login_records_key(value, paths):
    config = pamsignal.parse_config("[detection]\nlogin_records = %s\n"
                                    % value)
    assert config.detection.login_records == paths


@pytest.mark.parametrize("value", ["wtmp", "/var/log/wtmp, relative", ""])
def test_a_bad_login_records_key_names_line_and_key(value):
    with pytest.raises(pamsignal.ConfigError) as error:
        pamsignal.parse_config("[detection]\n\nlogin_records = %s\n" % value,
                               "p.conf")
    assert str(error.value.problems[0]).startswith(
        "p.conf:3: [detection] login_records: expected auto, off or "
        "absolute paths")


def test_auto_prefers_wtmpdb_even_before_its_first_login():
    links = {pamsignal.WTMPDB_FILE, pamsignal.WTMP_FILE}
    assert pamsignal.login_record_paths("auto", links.__contains__) == (
        pamsignal.WTMPDB_FILE,)
    assert pamsignal.login_record_paths(
        "auto", {pamsignal.WTMP_FILE}.__contains__) == (pamsignal.WTMP_FILE,)
    assert pamsignal.login_record_paths("auto", set().__contains__) == ()
    assert pamsignal.login_record_paths(("/a",)) == ("/a",)


def test_the_example_configuration_documents_the_key():
    assert "login_records = auto" in pamsignal.example_config()
    out = io.StringIO()
    assert pamsignal.main(["--config", os.path.join(
        REPO, "pamsignal.conf.example"), "check-config"], out) == 0
