"""One attempt, one event for sshd: the lines of a connection, as OpenSSH
writes them (order, PIDs and wording taken from real runs of Debian 12's
OpenSSH 9.2 and from the sources), through `scan`; what detection counts
of them; and the new forms against forged copies and hostile user names.
"""
import json

import pytest

from support import make_entry, pamsignal

MONITOR, PAM_CHILD, OTHER = "2101", "2102", "2201"
SOURCE = "203.0.113.5"


def lines(*specs, start=1):
    """Entries one second apart; a spec is MESSAGE or (PID, MESSAGE)."""
    entries = []
    for number, spec in enumerate(specs, start):
        pid, message = spec if isinstance(spec, tuple) else (MONITOR, spec)
        entries.append(make_entry("sshd", message, sequence=number,
                                  _PID=pid))
    return entries


def scan(tmp_path, entries, config=None):
    export = tmp_path / "export.json"
    export.write_text("".join(json.dumps(e) + "\n" for e in entries))
    argv = ["scan", "--json", str(export)]
    if config is not None:
        path = tmp_path / "pamsignal.conf"
        path.write_text(config)
        argv = ["--config", str(path)] + argv
    import io
    out = io.StringIO()
    assert pamsignal.main(argv, stdout=out) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


def summary(events):
    """(action, reason, user, method) of each event, in order."""
    return [(e["event"]["action"], e["event"].get("reason"),
             e.get("user", {}).get("name"),
             e.get("pamsignal", {}).get("auth_method")) for e in events]


PAM_UNIX = ("pam_unix(sshd:auth): authentication failure; logname= uid=0 "
            "euid=0 tty=ssh ruser= rhost=%s  user=alice" % SOURCE)
PAM_UNIX_UNKNOWN = ("pam_unix(sshd:auth): authentication failure; logname= "
                    "uid=0 euid=0 tty=ssh ruser= rhost=%s" % SOURCE)
PAM_ERROR = "error: PAM: Authentication failure for alice from %s" % SOURCE
FAILED = "Failed password for alice from %s port 40001 ssh2" % SOURCE
CLOSED = ("Connection closed by authenticating user alice %s port 40001 "
          "[preauth]" % SOURCE)


@pytest.mark.parametrize("connection, expected", [
    # Debian 12, a wrong password: PAM's line, sshd's line, the close.
    (lines(PAM_UNIX, FAILED, CLOSED),
     [("login_failure", "bad_password", "alice", "password")]),
    # Keyboard-interactive, the client gave up after one wrong answer:
    # the PAM child has a PID of its own and sshd writes no Failed line.
    (lines((PAM_CHILD, PAM_UNIX), PAM_ERROR,
           "Postponed keyboard-interactive for alice from %s port 40001 "
           "ssh2 [preauth]" % SOURCE, CLOSED),
     [("login_failure", "bad_password", "alice",
       "keyboard-interactive/pam")]),
    # ... and when sshd does write its Failed line.
    (lines((PAM_CHILD, PAM_UNIX), PAM_ERROR,
           "Failed keyboard-interactive/pam for alice from %s port 40001 "
           "ssh2" % SOURCE, CLOSED),
     [("login_failure", "bad_password", "alice",
       "keyboard-interactive/pam")]),
    # An invalid user's guess: announced, then PAM, then sshd: one event.
    (lines("Invalid user admin from %s port 40001" % SOURCE,
           "pam_unix(sshd:auth): check pass; user unknown",
           PAM_UNIX_UNKNOWN,
           "Failed password for invalid user admin from %s port 40001 ssh2"
           % SOURCE,
           "Connection closed by invalid user admin %s port 40001 [preauth]"
           % SOURCE),
     [("login_failure", "invalid_user", "admin", "password")]),
    # An invalid user that only offered keys: the announcement alone.
    (lines("Invalid user admin from %s port 40001" % SOURCE,
           "Connection closed by invalid user admin %s port 40001 [preauth]"
           % SOURCE),
     [("login_failure", "invalid_user", "admin", None)]),
    # A client that offered keys and left (sshd logs those below INFO).
    (lines(CLOSED), [("login_failure", "key_probe", "alice", None)]),
    # A JSch client's "Auth fail", then the close: one key probe.
    (lines("Received disconnect from %s port 40001:3: com.jcraft.jsch."
           "JSchException: Auth fail [preauth]" % SOURCE,
           "Disconnected from authenticating user alice %s port 40001 "
           "[preauth]" % SOURCE),
     [("login_failure", "key_probe", None, None)]),
    # A polite goodbye after a counted failure adds nothing.
    (lines(PAM_UNIX, FAILED, "Received disconnect from %s port 40001:11: "
           "Bye Bye [preauth]" % SOURCE,
           "Disconnected from authenticating user alice %s port 40001 "
           "[preauth]" % SOURCE),
     [("login_failure", "bad_password", "alice", "password")]),
    # A connection that closed before authenticating: nothing.
    (lines("Connection closed by %s port 40001 [preauth]" % SOURCE), []),
    # pam_faillock refusing a locked account, then sshd's line.
    (lines("pam_faillock(sshd:auth): Consecutive login failures for user "
           "alice account temporarily locked", FAILED, CLOSED),
     [("login_failure", "bad_password", "alice", "password")]),
    # A wrong answer, then the right one, in one keyboard-interactive run.
    (lines((PAM_CHILD, PAM_UNIX), PAM_ERROR,
           "Accepted keyboard-interactive/pam for alice from %s port 40001 "
           "ssh2" % SOURCE),
     [("login_failure", "bad_password", "alice", "keyboard-interactive/pam"),
      ("login_success", None, "alice", "keyboard-interactive/pam")]),
    # A PAM failure and nothing after it at all (end of the export).
    (lines(PAM_UNIX), [("login_failure", "bad_password", "alice", None)]),
])
def test_one_attempt_is_one_event(tmp_path, connection, expected):
    events = [e for e in scan(tmp_path, connection)
              if e["event"]["action"] != "brute_force_detected"]
    assert summary(events) == expected


def test_a_pam_failure_alone_keeps_its_source_and_takes_the_port(tmp_path):
    events = scan(tmp_path, lines((PAM_CHILD, PAM_UNIX), PAM_ERROR, CLOSED))
    assert events[0]["source"] == {"ip": SOURCE, "port": 40001}
    assert events[0]["process"]["pid"] == int(MONITOR)


def test_locked_account_is_said_on_the_one_event(tmp_path):
    events = scan(tmp_path, lines(
        "pam_faillock(sshd:auth): Consecutive login failures for user "
        "alice account temporarily locked", FAILED))
    assert events[0]["pamsignal"]["detail"] == "pam_faillock: account locked"


def test_held_failure_waits_only_a_short_time(tmp_path):
    """Released by the first line after SSH_HOLD_US, before that line's
    own event, whoever wrote it."""
    late = 1 + pamsignal.SSH_HOLD_US // 1000000 + 1
    other = lines((OTHER, "Accepted password for bob from 192.0.2.9 port 1 "
                   "ssh2"), start=late)
    events = scan(tmp_path, lines(PAM_UNIX) + other)
    assert summary(events) == [
        ("login_failure", "bad_password", "alice", None),
        ("login_success", None, "bob", "password")]
    # Within the wait, the other connection's line does not release it.
    soon = lines((OTHER, "Accepted password for bob from 192.0.2.9 port 1 "
                  "ssh2"), start=2)
    assert [e["user"]["name"] for e in scan(tmp_path, lines(PAM_UNIX) + soon)
            ] == ["bob", "alice"]


def test_parallel_keyboard_interactive_connections_count_apart(tmp_path):
    events = scan(tmp_path, lines(
        ("3001", PAM_UNIX), ("3002", PAM_UNIX),
        ("3000", PAM_ERROR), ("3010", PAM_ERROR),
        ("3000", CLOSED), ("3010", CLOSED.replace("40001", "40002"))))
    assert summary(events) == [
        ("login_failure", "bad_password", "alice",
         "keyboard-interactive/pam")] * 2


def max_auth_tries(count, port=40001):
    """MaxAuthTries reached as OpenSSH 7.4-10.x writes it."""
    attempts = []
    for _ in range(count):
        attempts += [PAM_UNIX, FAILED.replace("40001", str(port))]
    return attempts + [
        "error: maximum authentication attempts exceeded for alice from %s "
        "port %d ssh2 [preauth]" % (SOURCE, port),
        "Disconnecting authenticating user alice %s port %d: Too many "
        "authentication failures [preauth]" % (SOURCE, port)]


def test_max_auth_tries_is_its_guesses_and_one_max_attempts(tmp_path):
    events = [e for e in scan(tmp_path, lines(*max_auth_tries(6)))
              if e["event"]["action"] == "login_failure"]
    assert [e["event"].get("reason") for e in events] == \
        ["bad_password"] * 6 + ["max_attempts"]
    assert events[-1]["source"]["ip"] == SOURCE


@pytest.mark.parametrize("threshold, fires", [(6, True), (7, False)])
def test_detection_counts_guesses_not_lines(tmp_path, threshold, fires):
    """Six Failed lines and the MaxAuthTries lines are six guesses."""
    events = scan(tmp_path, lines(*max_auth_tries(6)), config=(
        "[detection]\nbrute_force_fast = %d in 10m\n" % threshold))
    found = [e for e in events if e["event"]["action"] ==
             "brute_force_detected" and e["pamsignal"]["counted_by"] ==
             "source"]
    assert bool(found) == fires
    if fires:
        assert found[0]["pamsignal"]["attempts"] == 6


def test_old_disconnect_takes_the_address_from_its_connection(tmp_path):
    """OpenSSH 6.6 writes no "maximum ..." line and no address."""
    events = scan(tmp_path, lines(
        FAILED.replace(" ssh2", " ssh2"), FAILED,
        "Disconnecting: Too many authentication failures for alice "
        "[preauth]"))
    assert summary(events)[-1] == ("login_failure", "max_attempts", "alice",
                                   None)
    assert events[-1]["source"] == {"ip": SOURCE, "port": 40001}


def test_held_failure_survives_a_restart():
    attempts = pamsignal.SshAttempts()
    for entry in lines((PAM_CHILD, PAM_UNIX), PAM_ERROR):
        assert attempts.observe(pamsignal.parse_entry(entry)) == []
    saved = json.loads(json.dumps(attempts.to_state()))
    restarted = pamsignal.SshAttempts()
    restarted.load_state(saved)
    (close,) = lines(CLOSED, start=3)
    released = restarted.observe(pamsignal.parse_entry(close))
    assert [(e.action, e.user, e.auth_method, e.source_port)
            for e in released] == [("login_failure", "alice",
                                    "keyboard-interactive/pam", 40001)]
    # Garbage in the saved state is skipped, not trusted.
    restarted.load_state({"held": [["k", {"action": "login_failure"}],
                                   ["j", "x"], 5], "connections": {}})
    assert not restarted.held


def test_throttling_is_an_event_and_context_of_the_brute_force(tmp_path):
    throttle = ("drop connection #0 from [%s]:40009 on [198.51.100.1]:22 "
                "penalty: failed authentication" % SOURCE)
    attempts = []
    for port in range(40001, 40006):
        attempts += [(str(port), FAILED.replace("40001", str(port)))]
    events = scan(tmp_path, lines((OTHER, throttle), *attempts))
    assert events[0]["event"]["action"] == "source_throttled"
    assert events[0]["destination"] == {"ip": "198.51.100.1", "port": 22}
    (found,) = [e for e in events if e["event"]["action"] ==
                "brute_force_detected"]
    assert found["pamsignal"]["detail"] == \
        "sshd throttled this source: penalty: failed authentication"
    # Without the throttling line, the same attack has no such note.
    events = scan(tmp_path, lines(*attempts))
    (found,) = [e for e in events if e["event"]["action"] ==
                "brute_force_detected"]
    assert "detail" not in found["pamsignal"]


PROBES = ["banner exchange: Connection from %s port %d: invalid format"
          % (SOURCE, port) for port in range(50001, 50004)]


def test_probes_are_counted_only_when_asked(tmp_path):
    events = scan(tmp_path, lines(*PROBES))
    assert [e["event"]["action"] for e in events] == ["ssh_probe"] * 3
    events = scan(tmp_path, lines(*PROBES), config=(
        "[detection]\nssh_probes = 3 in 10m\n"))
    found = [e for e in events if e["event"]["action"] ==
             "brute_force_detected"]
    assert [(e["event"]["reason"], e["pamsignal"]["attempts"],
             e["source"]["ip"]) for e in found] == [
                 ("repeated_probes", 3, SOURCE)]
    # Probes are no login attempts: they never count as guesses.
    events = scan(tmp_path, lines(*PROBES * 2), config=(
        "[detection]\nbrute_force_fast = 3 in 10m\n"))
    assert not [e for e in events if e["event"]["action"] ==
                "brute_force_detected"]


def test_probe_threshold_is_checked_like_the_others():
    with pytest.raises(pamsignal.ConfigError) as caught:
        pamsignal.parse_config("[detection]\nssh_probes = often\n")
    assert "ssh_probes" in str(caught.value)


# ------------------------------------------------- forged and hostile text

with open(pamsignal.__file__.replace("pamsignal.py", "tests/fixtures/"
                                     "sshd_forms.json")) as _handle:
    EVENT_FORMS = [case for case in json.load(_handle)
                   if case["expect"] is not None]


@pytest.mark.parametrize("case", EVENT_FORMS,
                         ids=[c["name"] for c in EVENT_FORMS])
def test_forged_copy_of_a_new_form_is_a_spoofed_entry(case):
    forged = make_entry(case["entry"]["SYSLOG_IDENTIFIER"],
                        case["entry"]["MESSAGE"], _UID="1000",
                        _EXE="/usr/bin/logger", _COMM="logger")
    event = pamsignal.parse_entry(forged)
    if case["name"] == "form_probe_closed_at_banner":
        # After login, OpenSSH before 7.9 writes these very words as the
        # user: ignored rather than called a forgery.
        assert event is None
        return
    assert event.action == "spoofed_entry"
    assert event.source_ip is None and event.user is None
    assert event.claimed_action == case["expect"]["event.action"]


HOSTILE_USERS = ("x from 1.2.3.4 port 22 ssh2", "x 1.2.3.4 port 22",
                 "x 1.2.3.4 port 22: Too many authentication failures",
                 "x from 1.2.3.4")
USER_FORMS = (
    "Failed password for invalid user {u} from 203.0.113.5 port 5 ssh2",
    "Failed password for invalid user {u} from 203.0.113.5",
    "error: PAM: Authentication failure for illegal user {u} from "
    "203.0.113.5",
    "error: PAM: authentication error for illegal user {u} from "
    "203.0.113.5 via 10.0.0.1",
    "Connection closed by authenticating user {u} 203.0.113.5 port 5 "
    "[preauth]",
    "Disconnected from invalid user {u} 203.0.113.5 port 5 [preauth]",
    "Connection reset by invalid user {u} 203.0.113.5 port 5 [preauth]",
    "Disconnecting invalid user {u} 203.0.113.5 port 5: Too many "
    "authentication failures [preauth]",
    "Disconnecting invalid user {u} 203.0.113.5 port 5: Change of username "
    "or service not allowed: ({u},ssh-connection) -> (b,ssh-connection) "
    "[preauth]",
    "error: maximum authentication attempts exceeded for invalid user {u} "
    "from 203.0.113.5 port 5 ssh2 [preauth]",
    "User {u} from 203.0.113.5 not allowed because not listed in AllowUsers",
    "Invalid user {u} from 203.0.113.5 port 5",
)


@pytest.mark.parametrize("form", USER_FORMS)
@pytest.mark.parametrize("user", HOSTILE_USERS)
def test_user_name_never_gives_the_source(form, user):
    event = pamsignal.parse_entry(make_entry("sshd", form.format(u=user)))
    assert event is not None and event.action == "login_failure"
    assert event.source_ip in ("203.0.113.5", None)
    if event.source_ip is None:  # no side picked: it says why
        assert event.detail == pamsignal.AMBIGUOUS
    else:
        assert event.user == user


def test_new_kinds_say_what_happened():
    refused = pamsignal.parse_entry(make_entry(
        "sshd", "Authentication refused: bad ownership or modes for "
        "directory /home/alice/.ssh"))
    alert = pamsignal.alert_text(refused)
    assert alert.title == "sshd refuses a key file on web1"
    assert ("Detail", "bad ownership or modes for directory "
            "/home/alice/.ssh") in alert.facts
    assert "chmod" in alert.advice
    probe = pamsignal.parse_entry(make_entry(
        "sshd", "banner exchange: Connection from 203.0.113.5 port 5: "
        "invalid format"))
    assert pamsignal.render_text(probe).endswith(
        "ssh_probe source=203.0.113.5:5 service=sshd reason=bad_banner "
        "detail=\"invalid format\" host=web1")
    # A failed login keeps its old line: no detail in it.
    failed = pamsignal.parse_entry(make_entry("sshd", FAILED))
    assert "detail=" not in pamsignal.render_text(failed)


@pytest.mark.parametrize("message, guess", [
    (CLOSED, True),  # keys offered: one guess per connection
    ("pam_faillock(sshd:auth): Consecutive login failures for user alice "
     "account temporarily locked", True),
    ("Disconnecting invalid user admin 203.0.113.5 port 5: Change of "
     "username or service not allowed: (admin,ssh-connection) -> "
     "(root,ssh-connection) [preauth]", False),
    ("error: maximum authentication attempts exceeded for alice from "
     "203.0.113.5 port 5 ssh2 [preauth]", False),
    ("refused connect from 203.0.113.5 (203.0.113.5)", False),
])
def test_what_counts_as_a_guess(message, guess):
    event = pamsignal.parse_entry(make_entry("sshd", message))
    assert pamsignal.is_guess(event._replace(pairing=None)) is guess


# ---------------------------------------------------------------- live


class Kept:
    """A channel's sink that keeps what it is given."""
    name = "kept"

    def __init__(self):
        self.events = []

    def send(self, alert):
        self.events.append(getattr(alert, "event", alert))

    def flush(self):
        pass


def live_pipeline(config_text=""):
    kept = Kept()
    pipeline = pamsignal.Pipeline(
        [pamsignal.Channel(kept, pamsignal.ChannelGate(
            pamsignal.SHOW_EVERYTHING))],
        pamsignal.parse_config(config_text).detection)
    return pipeline, kept


def at(entry, seconds):
    """The entry with its own time `seconds` after the epoch."""
    return dict(entry, __REALTIME_TIMESTAMP=str(int(seconds * 1000000)))


ATTEMPT = ("Invalid user eve from %s port 4001" % SOURCE,
           "pam_unix(sshd:auth): authentication failure; logname= uid=0 "
           "euid=0 tty=ssh ruser= rhost=%s" % SOURCE,
           "Failed password for invalid user eve from %s port 4001 ssh2"
           % SOURCE,
           "Connection closed by invalid user eve %s port 4001 [preauth]"
           % SOURCE)


def failures_of(kept):
    return [(e.user, e.reason, e.source_port) for e in kept.events
            if e.action == "login_failure"]


def guess_held(wall):
    """(live pipeline, its kept events) holding an invalid user's guess:
    the first two lines of ATTEMPT, of time `wall`, read at `wall`."""
    pipeline, kept = live_pipeline()
    for entry in lines(*ATTEMPT[:2]):
        pipeline.process_entry(at(entry, wall), wall)
    return pipeline, kept


def test_live_an_attempt_read_behind_the_journal_stays_one_event():
    # The agent reads a backlog an hour old (after a restart, behind a
    # flood); the journal pauses 1.5 s between two reads. The held lines
    # wait 10 s of the journal's time, not of the wall clock.
    pipeline, kept = live_pipeline()
    first, second, third, last = lines(*ATTEMPT)
    wall = 1795780000.0
    for entry, own in ((first, wall - 3600), (second, wall - 3599.9)):
        pipeline.process_entry(at(entry, own), wall)
    pipeline.tick(wall + 1.5)
    assert failures_of(kept) == []
    for entry, own in ((third, wall - 3597.2), (last, wall - 3597)):
        pipeline.process_entry(at(entry, own), wall + 1.6)
    pipeline.tick(wall + 30)
    assert failures_of(kept) == [("eve", "invalid_user", 4001)]


def test_live_a_held_guess_goes_out_when_the_journal_stays_quiet():
    wall = 1795780000.0
    pipeline, kept = guess_held(wall)
    pipeline.tick(wall + 9.9)
    assert failures_of(kept) == []
    pipeline.tick(wall + 10.1)
    assert failures_of(kept) == [("eve", "invalid_user", 4001)]


def test_live_a_restored_guess_waits_on_from_where_the_journal_was_left():
    # Stopped an hour ago holding an invalid user's guess: after the
    # restart the rest of its attempt is in the backlog, so the guess
    # waits 10 s of journal time from the last entry handled.
    before, kept_before = live_pipeline()
    wall = 1795780000.0
    first, second, third, last = lines(*ATTEMPT)
    for entry, own in ((first, wall - 3600), (second, wall - 3599.9)):
        before.process_entry(at(entry, own), wall - 3599.9)
    saved = json.loads(json.dumps(before.to_state()))
    after, kept = live_pipeline()
    after.load_state(saved, int(wall * 1e6))
    after.resume_journal_time(int((wall - 3599.9) * 1e6), wall)
    after.tick(wall + 2)  # journalctl slow to start on the backlog
    assert failures_of(kept) == []
    for entry, own in ((third, wall - 3597.2), (last, wall - 3597)):
        after.process_entry(at(entry, own), wall + 2.5)
    after.tick(wall + 30)
    assert failures_of(kept) == [("eve", "invalid_user", 4001)]
    assert kept_before.events == []


def test_live_a_clock_set_back_does_not_hold_a_guess_for_as_long():
    # NTP sets a fast clock back an hour right after a guess was held: the
    # guess still goes out about 10 s later, not an hour later.
    wall = 1795780000.0
    pipeline, kept = guess_held(wall)
    pipeline.tick(wall - 3600 + 5)
    assert failures_of(kept) == []
    pipeline.tick(wall - 3600 + 15.1)
    assert failures_of(kept) == [("eve", "invalid_user", 4001)]


def test_live_a_held_guess_waits_while_journalctl_is_restarting():
    # journalctl dies 1 s after a guess was held and is back 17 s later
    # (its backoff): that time is no journal time, so the rest of the
    # attempt it then gives still joins the guess.
    wall = 1795780000.0
    pipeline, kept = guess_held(wall)
    pipeline.journal_followed(False, wall + 1)
    for down_s in (5, 12, 17):
        pipeline.tick(wall + down_s)
    pipeline.journal_followed(True, wall + 17)
    pipeline.tick(wall + 17.5)
    assert failures_of(kept) == []
    for entry in lines(*ATTEMPT[2:], start=3):
        pipeline.process_entry(at(entry, wall + 0.2), wall + 17.5)
    pipeline.tick(wall + 40)
    assert failures_of(kept) == [("eve", "invalid_user", 4001)]


def test_live_journalctl_dying_again_and_again_still_lets_a_guess_go():
    # A quiet journal, journalctl running 9 s and dead 1 s over and over:
    # the time it ran adds up, so the guess goes out after 10 s of it.
    wall = 1795780000.0
    pipeline, kept = guess_held(wall)
    pipeline.journal_followed(False, wall + 9)
    pipeline.tick(wall + 9.5)
    pipeline.journal_followed(True, wall + 10)
    pipeline.tick(wall + 10.9)  # 9.9 s followed
    assert failures_of(kept) == []
    pipeline.tick(wall + 11.2)  # 10.2 s
    assert failures_of(kept) == [("eve", "invalid_user", 4001)]
