"""One attempt, one event for sudo, su and login, and who acted in su and
sudo sessions: the lines of one run of each program, in the order and
with the PIDs and UIDs that real runs on Debian 12 (sudo 1.9.13, util-linux
su 2.38, shadow login 4.13) and the Debian 13 tree (sudo 1.9.16 with
log_format=json, util-linux login 2.41) wrote them, through `scan`; what
detection counts of them; forged copies of the new forms."""
import json

import pytest

from support import make_entry, pamsignal
from test_sshd_attempts import scan

CALLER, TARGET = "pse495dc53c", "pse77fd608e"
CALLER_UID = "1005"


def run_of(identifier, *specs, pid="22708", uid=CALLER_UID, start=1):
    """Entries one second apart, all of one process; a spec is MESSAGE or
    (PID, MESSAGE)."""
    entries = []
    for number, spec in enumerate(specs, start):
        own_pid, message = spec if isinstance(spec, tuple) else (pid, spec)
        entries.append(make_entry(identifier, message, sequence=number,
                                  _PID=own_pid, _UID=uid))
    return entries


def failures(events):
    """(reason, user, attempts) of each login_failure, in order."""
    return [(e["event"].get("reason"), e.get("user", {}).get("name"),
             e.get("pamsignal", {}).get("attempts"))
            for e in events if e["event"]["action"] == "login_failure"]


def brute_force_by_user(events):
    return [e for e in events if e["event"]["action"] ==
            "brute_force_detected" and e["pamsignal"]["counted_by"] == "user"]


SUDO_PAM = ("pam_unix(sudo:auth): authentication failure; logname= uid=1005 "
            "euid=0 tty= ruser=%s rhost=  user=%s" % (CALLER, CALLER))
SUDO_TAIL = " ; PWD=/tmp ; USER=root ; COMMAND=/usr/bin/true"
SUDO_MORE = ("PAM 2 more authentication failures; logname= uid=1005 euid=0 "
             "tty= ruser=%s rhost=  user=%s" % (CALLER, CALLER))


def sudo_json(kind, reason=None):
    """sudo 1.9.16's JSON line, keys in its order (trimmed)."""
    record = {"uuid": "50b0380403", "submituser": CALLER,
              "command": "/usr/bin/true", "runuser": "root", "runcwd": "/",
              "submitcwd": "/tmp", "runargv": ["true"]}
    if reason:
        record = dict({"reason": reason}, **record)
    return "@cee:" + json.dumps({"sudo": {kind: record}},
                                separators=(",", ":"))


# ---------------------------------------------------------------- sudo


def test_sudo_wrong_password_then_no_input_is_one_failure(tmp_path):
    """Debian 12, `sudo -S` given one wrong password and then end of input:
    PAM's failure, two lines for the missing second password (no guess),
    and sudo's total."""
    events = scan(tmp_path, run_of(
        "sudo", SUDO_PAM, "pam_unix(sudo:auth): conversation failed",
        "pam_unix(sudo:auth): auth could not identify password for [%s]"
        % CALLER, "%s : 1 incorrect password attempt%s" % (CALLER,
                                                          SUDO_TAIL)))
    assert failures(events) == [("bad_password", CALLER, None)]


@pytest.mark.parametrize("total", [
    "%s : 3 incorrect password attempts%s" % (CALLER, SUDO_TAIL),
    sudo_json("reject", "3 incorrect password attempts"),
], ids=["text", "json"])
@pytest.mark.parametrize("threshold, fires", [(3, True), (4, False)])
def test_sudo_three_wrong_passwords_are_three_guesses(tmp_path, total,
                                                      threshold, fires):
    """pam_unix logs the first failure of a run, then how many more;
    sudo's total is the rest of the guesses, not one more."""
    events = scan(tmp_path, run_of("sudo", SUDO_PAM, SUDO_MORE, total),
                  config="[detection]\nbrute_force_fast = %d in 10m\n"
                  % threshold)
    assert failures(events) == [("bad_password", CALLER, None),
                                ("bad_password", CALLER, 2)]
    found = brute_force_by_user(events)
    assert bool(found) == fires
    if fires:
        assert found[0]["pamsignal"]["attempts"] == 3


def test_sudo_json_refusal_is_no_guess(tmp_path):
    events = scan(tmp_path, run_of("sudo", sudo_json(
        "reject", "user NOT in sudoers")), config=(
        "[detection]\nbrute_force_fast = 1 in 10m\n"))
    assert failures(events) == [("not_in_sudoers", CALLER, None)]
    assert brute_force_by_user(events) == []


# ---------------------------------------------------------------- su


SU_PAM = ("pam_unix(su:auth): authentication failure; logname= uid=1005 "
          "euid=0 tty=/dev/pts/1 ruser=%s rhost=  user=%s" % (CALLER, TARGET))
SU_FAILED = "FAILED SU (to %s) %s on pts/1" % (TARGET, CALLER)


def test_su_wrong_password_is_one_event(tmp_path):
    """PAM's failure and su's FAILED SU of the same process: su's line is
    the event (other processes' lines in between change nothing)."""
    entries = run_of("su", SU_PAM, ("23494", "(to root) alice on pts/0"),
                     SU_FAILED, pid="23079")
    events = scan(tmp_path, entries)
    assert failures(events) == [("bad_password", CALLER, None)]
    failure = [e for e in events
               if e["event"]["action"] == "login_failure"][0]
    assert failure["message"] == SU_FAILED
    assert failure["user"]["target"]["name"] == TARGET
    assert failure["user"]["id"] == CALLER_UID


def test_su_killed_after_pam_failure_still_counts(tmp_path):
    """su stopped in pam_faildelay's pause never writes FAILED SU: PAM's
    line is the event, at the end of the input ..."""
    events = scan(tmp_path, run_of("su", SU_PAM, pid="23079"))
    assert failures(events) == [("bad_password", CALLER, None)]
    assert events[0]["user"]["target"]["name"] == TARGET


def test_su_held_failure_released_after_its_wait(tmp_path):
    """... or once the journal has moved on past the wait (10 s), before
    the lines that come later."""
    late = make_entry("su", "(to root) alice on pts/0", sequence=30,
                      _PID="30000", _UID="1000")
    events = scan(tmp_path, run_of("su", SU_PAM, pid="23079") + [late])
    assert [e["event"]["action"] for e in events] == [
        "login_failure", "login_success"]


def test_held_su_failure_survives_a_restart():
    pairs = pamsignal.ProgramAttempts()
    held = pamsignal.parse_entry(run_of("su", SU_PAM, pid="23079")[0])
    assert pairs.observe(held) == []
    restored = pamsignal.ProgramAttempts()
    restored.load_state(json.loads(json.dumps(pairs.to_state())))
    failed = pamsignal.parse_entry(run_of("su", SU_FAILED, pid="23079",
                                          start=2)[0])
    assert restored.observe(failed) == [failed]
    assert restored.drain() == []


# ---------------------------------------------------------------- login


LOGIN_PAM = ("pam_unix(login:auth): authentication failure; logname= uid=0 "
             "euid=0 tty=/dev/ttyS0 ruser= rhost=  user=alice")


@pytest.mark.parametrize("program_lines", [
    # shadow 4.13 (Debian 12): one line per failure, then the restatement.
    ["FAILED LOGIN (%d) on '/dev/ttyS0' FOR 'alice', Authentication "
     "failure" % n for n in (1, 2, 3)] +
    ["TOO MANY LOGIN TRIES (3) on '/dev/ttyS0' FOR 'alice'"],
    # util-linux (Debian 13): the last failure is FAILED LOGIN SESSION.
    ["FAILED LOGIN %d FROM ttyS0 FOR alice, Authentication failure" % n
     for n in (1, 2)] +
    ["FAILED LOGIN SESSION FROM ttyS0 FOR alice, Authentication failure"],
], ids=["shadow", "util-linux"])
@pytest.mark.parametrize("threshold, fires", [(3, True), (4, False)])
def test_console_login_counts_guesses(tmp_path, program_lines, threshold,
                                      fires):
    """pam_unix writes only the first failure of a login run; login one
    line per failure. Three wrong passwords are three guesses."""
    events = scan(tmp_path, run_of("login", LOGIN_PAM, *program_lines,
                                   pid="23515", uid="0"),
                  config="[detection]\nbrute_force_fast = %d in 10m\n"
                  % threshold)
    reasons = [reason for reason, _, _ in failures(events)]
    assert reasons.count("bad_password") == 3
    assert set(reasons) <= {"bad_password", "max_attempts"}
    for event in events:
        if event["event"]["action"] == "login_failure":
            assert event["pamsignal"]["tty_kind"] == "serial"
    found = brute_force_by_user(events)
    assert bool(found) == fires


# ---------------------------------------------------------------- acting


SUDO_SESSION = (
    "%s : PWD=/tmp ; USER=root ; COMMAND=/usr/bin/true" % CALLER,
    "pam_unix(sudo:session): session opened for user root(uid=0) by "
    "(uid=1005)",
    "pam_unix(sudo:session): session closed for user root")
SU_SESSION = (
    "(to %s) %s on pts/1" % (TARGET, CALLER),
    "pam_unix(su:session): session opened for user %s(uid=1006) by "
    "(uid=1005)" % TARGET,
    "pam_unix(su:session): session closed for user %s" % TARGET)


@pytest.mark.parametrize("identifier, run, target", [
    ("sudo", SUDO_SESSION, "root"),
    ("sudo", (sudo_json("accept"),) + SUDO_SESSION[1:], "root"),
    ("su", SU_SESSION, TARGET),
], ids=["sudo", "sudo-json", "su"])
def test_sessions_name_who_acted(tmp_path, identifier, run, target):
    """Debian 12's pam_unix finds no login name without utmp and writes
    `by (uid=1005)`: the su or sudo line of the same process names him."""
    events = scan(tmp_path, run_of(identifier, *run, pid="23033"))
    sessions = [e for e in events
                if e["event"]["action"].startswith("session_")]
    assert [e["event"]["action"] for e in sessions] == [
        "session_opened", "session_closed"]
    for event in sessions:
        assert event["user"]["name"] == CALLER
        assert event["user"]["id"] == CALLER_UID
        assert event["user"]["target"]["name"] == target


def test_another_process_lends_no_name(tmp_path):
    """The su line of another process (PID) names nobody's session."""
    entries = run_of("su", SU_SESSION[0], pid="4000") + run_of(
        "su", *SU_SESSION[1:], pid="4001", start=2)
    opened = [e for e in scan(tmp_path, entries)
              if e["event"]["action"] == "session_opened"][0]
    assert "name" not in opened["user"]
    assert opened["user"]["id"] == CALLER_UID


def test_live_sessions_ask_the_account_database():
    """Live, a session whose process wrote no su or sudo line is named
    from the account database; a scan (maybe of another host) is not."""
    asked = []

    def lookup(name, uid):
        asked.append((name, uid))
        return "alice", uid

    acting = pamsignal.ActingUsers(lookup)
    opened = pamsignal.parse_entry(run_of("sudo", SUDO_SESSION[1])[0])
    assert acting.observe(opened).user is None
    assert asked == []
    assert acting.observe(opened, live=True).user == "alice"
    assert asked == [(None, CALLER_UID)]


def test_account_of_reads_the_account_database():
    assert pamsignal.account_of(None, "0") == ("root", "0")
    assert pamsignal.account_of("root", None) == ("root", "0")
    unknown = "psez-no-such-user"
    assert pamsignal.account_of(unknown, None) == (unknown, None)
    assert pamsignal.account_of(None, "4294967294") in (
        (None, "4294967294"), ("nobody", "4294967294"))


# ---------------------------------------------------------------- trust


@pytest.mark.parametrize("identifier, message, claimed", [
    ("sudo", sudo_json("accept"), "sudo_command"),
    ("sudo", sudo_json("reject", "user NOT in sudoers"), "login_failure"),
    ("su", SU_PAM, "login_failure"),
    ("login", "LOGIN ON ttyS0 BY root", "login_success"),
    ("login", "'root' logged in  on '/dev/tty1'", "login_success"),
    ("login", "FAILED LOGIN SESSION FROM tty1 FOR root, Authentication "
     "failure", "login_failure"),
])
@pytest.mark.parametrize("writer", [
    {"_UID": "1000", "_EXE": "/usr/bin/logger", "_COMM": "logger"},
    # any process can call itself sudo and exit before journald looks
    {"_UID": "1000", "_EXE": None, "_COMM": "sudo"},
], ids=["logger", "renamed"])
def test_forged_copies_are_spoofed(identifier, message, claimed, writer):
    event = pamsignal.parse_entry(make_entry(identifier, message, **writer))
    assert event.action == "spoofed_entry"
    assert event.claimed_action == claimed
    assert event.user is None and event.source_ip is None


# ---------------------------------------------------------------- serial


@pytest.mark.parametrize("message, serial", [
    ("ROOT LOGIN ON ttyS0", True),
    ("LOGIN ON hvc0 BY alice", True),
    ("LOGIN ON tty1 BY alice", False),
    ("LOGIN ON pts/0 BY alice FROM 192.0.2.7", False),
])
def test_alerts_say_serial_console(message, serial):
    """An admin reading the alert sees that someone sat at a serial line
    (a cable, a BMC, a cloud's serial console), not at a screen."""
    event = pamsignal.parse_entry(make_entry("login", message))
    shown_tty = dict(pamsignal.alert_text(event).facts)["TTY"]
    for text in (shown_tty, pamsignal.event_text(event)):
        assert ("(serial console)" in text) is serial


@pytest.mark.parametrize("message", [
    "alice : TTY=pts/0 ; PWD=/home/bob ; USER=root ; COMMAND=/bin/evil",
    sudo_json("accept").replace(CALLER, "alice"),
    "alice : 3 incorrect password attempts ; TTY=pts/0 ; PWD=/ ; "
    "USER=root ; COMMAND=/bin/true",
])
def test_a_sudo_line_naming_another_user_is_spoofed_live(message):
    """bob (UID 1005) sends a line naming alice, then execs the real sudo
    so that journald finds its executable: live, the account database
    says UID 1005 is bob, and the line is a spoofed_entry."""
    event = pamsignal.parse_entry(run_of("sudo", message)[0])
    assert event.user == "alice" and event.user_id == CALLER_UID
    acting = pamsignal.ActingUsers(
        lambda name, uid: ("bob" if uid == CALLER_UID else name, uid))
    assert acting.observe(event) == event  # scan: no database
    spoofed = acting.observe(event, live=True)
    assert spoofed.action == "spoofed_entry"
    assert spoofed.claimed_action == event.action
    assert spoofed.writer_uid == int(CALLER_UID)
    assert spoofed.user is None and spoofed.command_line is None
    assert "UID 1005 that wrote it is bob" in spoofed.detail
    genuine = pamsignal.ActingUsers(lambda name, uid: ("alice", uid))
    assert genuine.observe(event, live=True) == event


# ---------------------------------------------------------------- sudo's
# long lines: do_syslog_sudo (lib/eventlog/eventlog.c) splits a line past
# MAXSYSLOGLEN (960) into `(command continued)` lines.


def sudo_split(user, line, maxlen=960):
    """The messages sudo 1.9.13 writes for one log line, as its
    do_syslog_sudo() splits it: at the last space before the limit
    (spaces dropped), mid-word when there is none."""
    messages, prefix, overhead = [], "%8s : " % user, 3
    while line:
        limit = maxlen - overhead - len(user)
        if len(line) > limit:
            cut = line.rfind(" ", 0, limit)
            cut = limit if cut < 0 else cut
            messages.append(prefix + line[:cut])
            line = line[cut:].lstrip(" ")
        else:
            messages.append(prefix + line)
            line = ""
        prefix, overhead = "%8s : (command continued) " % user, 23
    return messages


SUDO_OPENED = ("pam_unix(sudo:session): session opened for user root(uid=0)"
                " by %s(uid=%s)" % (CALLER, CALLER_UID))
#: The brief's `sudo /bin/sh -c "true $(printf 'x%.0s' $(seq 1000)); id"`
#: (sudo 1.9.13 quotes the argument): a short first line, then 1000 x's
#: broken mid-word, then the end.
LONG_WORD = "/bin/sh -c 'true %s; id'" % ("x" * 1000)
#: Many short words: a long first line broken at a space.
MANY_WORDS = "/bin/sh -c 'cd /tmp; %s id'" % ("echo abcdefg; " * 150)
#: A directory with blanks so long that COMMAND= is in a continuation.
LONG_PWD = "/srv/" + "/".join("dir %03d" % n for n in range(125))


def commands(events):
    return [(e.get("process", {}).get("command_line"),
             e.get("pamsignal", {}).get("detail"))
            for e in events if e["event"]["action"] == "sudo_command"]


@pytest.mark.parametrize("command, pwd", [
    (LONG_WORD, "/tmp"), (MANY_WORDS, "/tmp"), ("/usr/bin/id", LONG_PWD),
], ids=["long-word", "many-words", "command-in-continuation"])
def test_split_sudo_command_is_joined(tmp_path, command, pwd):
    line = "TTY=pts/0 ; PWD=%s ; USER=root ; COMMAND=%s" % (pwd, command)
    messages = sudo_split(CALLER, line)
    assert len(messages) > 1 and all(len(m) <= 975 for m in messages)
    events = scan(tmp_path, run_of("sudo", *messages + [SUDO_OPENED]))
    assert commands(events) == [(command, None)]
    command_event = [e for e in events
                     if e["event"]["action"] == "sudo_command"][0]
    assert command_event["process"]["working_directory"] == pwd
    assert command_event["user"]["target"]["name"] == "root"
    actions = [e["event"]["action"] for e in events]
    assert actions.index("sudo_command") < actions.index("session_opened")


def test_continuation_of_another_writer_is_not_joined(tmp_path):
    """Only the same process (PID) and writer (UID, program) continues a
    line: another's `(command continued)` line in between is not joined,
    nor does it let the held line go."""
    first, *rest = sudo_split(CALLER, "TTY=pts/0 ; PWD=/tmp ; USER=root ; "
                              "COMMAND=" + MANY_WORDS)
    forged = "%s : (command continued) ; rm -rf /" % CALLER
    for writer in ({"pid": "22709"}, {"uid": "1006"}):
        events = scan(tmp_path, run_of("sudo", first) +
                      run_of("sudo", forged, start=2, **writer) +
                      run_of("sudo", *rest, start=3))
        assert commands(events) == [(MANY_WORDS, None)]


def test_held_sudo_line_is_let_go_by_time_and_at_the_end(tmp_path):
    """A held line with no continuation goes out once the journal is
    SSH_HOLD_US past it, before what came later; or at the end of a scan.
    A fragment broken mid-word whose rest never came is marked cut."""
    first = sudo_split(CALLER, "TTY=pts/0 ; PWD=/tmp ; USER=root ; "
                       "COMMAND=" + LONG_WORD)[:2]
    late = make_entry("su", "(to root) alice on pts/0", sequence=30,
                      _PID="30000", _UID="1000")
    events = scan(tmp_path, run_of("sudo", *first) + [late])
    assert [e["event"]["action"] for e in events][:2] == [
        "sudo_command", "login_success"]
    (command, detail), = commands(events)
    assert command == LONG_WORD[:len(command)] and "; id" not in command
    assert detail == pamsignal.SUDO_TEXT_CUT
    events = scan(tmp_path, run_of("sudo", *first))
    assert commands(events) == [(command, pamsignal.SUDO_TEXT_CUT)]


def test_short_sudo_lines_are_not_held():
    lines = pamsignal.SudoContinuations()
    entry = run_of("sudo", "%s :%s" % (CALLER, SUDO_TAIL))[0]
    assert lines.observe(entry) == [entry] and not lines.held


def test_held_sudo_line_survives_a_restart_and_is_bounded():
    messages = sudo_split(CALLER, "TTY=pts/0 ; PWD=/tmp ; USER=root ; "
                          "COMMAND=" + MANY_WORDS)
    entries = run_of("sudo", *messages)
    lines = pamsignal.SudoContinuations()
    assert lines.observe(entries[0]) == []
    restored = pamsignal.SudoContinuations()
    restored.load_state(json.loads(json.dumps(lines.to_state())))
    for entry in entries[1:]:
        assert restored.observe(entry) == []
    joined, = restored.drain()
    assert pamsignal.parse_entry(joined).command_line == MANY_WORDS
    small = pamsignal.SudoContinuations(limit=2)
    for pid in ("1", "2", "3"):
        let_go = small.observe(run_of("sudo", messages[0], pid=pid)[0])
    assert len(small.held) == 2 and [e["_PID"] for e in let_go] == ["1"]
    bad = pamsignal.SudoContinuations()
    bad.load_state([["b/1", {"MESSAGE": 5}], ["b/2", {"EVIL": "x"}], "x"])
    assert not bad.held
