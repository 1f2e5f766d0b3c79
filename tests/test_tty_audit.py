"""What root typed (issue 18, pam_tty_audit): the keystroke decoder, the
audit records taken (and those refused), the lines handed to the session
they were typed in, and where they show (session_closed, alerts, report).

tests/fixtures/tty_audit/ holds real journal entries captured on the
project's machine (Linux 6.18, systemd-journald 252, no auditd, OpenSSH
9.2, Linux-PAM 1.5.2; see tests/ttyaudit_sys.py): a root ssh login
through an sshd whose PAM stack had pam_tty_audit, typing edits, a tab
completion, Ctrl-U, Ctrl-W, a `read -s` secret and an arrow key
(root_ssh_session.json, with the kernel log's copy of every record), and
three USER_TTY records (user_tty.json).  Pure: no journald needed.
"""

import io
import json
import os
import re

import pytest

import pamsignal
from pamsignal import NO_CARRY, decode_keystrokes

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "tty_audit")
SESSION = os.path.join(FIXTURES, "root_ssh_session.json")
USER_TTY = os.path.join(FIXTURES, "user_tty.json")

#: What was typed in the captured session, as the decoder must read it.
#: The secret typed at `read -s` (twice) is in no record: echo was off.
SESSION_LINES = [
    "echo one",                       # typed as is
    "echo two",                       # "twX", DEL, "o"
    "echo three",                     # "thee", left, left, "r"
    "ls /et<tab>c/host<tab>",         # completion: its text is not in the data
    "echo four",                      # "echo garbage", Ctrl-U, "echo four"
    "echo five seven",                # "echo five six", Ctrl-W, "seven"
    "read -s -p 'SECRET? ' S",
    "<up>",                           # history: the recalled line is unknown
    "echo caf\u00e9",
    "exit",
]


def entries(path):
    with open(path) as export:
        return [json.loads(line) for line in export]


def lines_of(*chunks):
    """Decode chunks as consecutive records of one reader."""
    carry, lines = NO_CARRY, []
    for chunk in chunks:
        more, carry = decode_keystrokes(chunk, carry)
        lines += more
    return lines


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("data, expected", [
    (b"ls -l\r", ["ls -l"]),
    (b"ls\n", ["ls"]),                          # canonical mode: LF
    (b"ls\r\nid\r", ["ls", "id"]),               # CR LF is one line end
    (b"\r\r\n\r", []),                           # empty lines left out
    (b"lx\x7fs\r", ["ls"]),                      # DEL
    (b"lx\x08s\r", ["ls"]),                      # ^H
    (b"\x7f\x7fls\r", ["ls"]),                   # backspace at the start
    (b"ac\x1b[Db\r", ["abc"]),                   # left arrow, insert
    (b"ac\x1bODb\r", ["abc"]),                   # application-mode arrow
    (b"bc\x01a\x05d\r", ["abcd"]),               # Ctrl-A, Ctrl-E
    (b"bc\x1b[Ha\x1b[Fd\r", ["abcd"]),           # Home, End
    (b"bc\x1b[1~a\x1b[4~d\r", ["abcd"]),         # Home, End (vt)
    (b"abxc\x1b[D\x1b[D\x1b[3~\r", ["abc"]),     # Delete
    (b"abxc\x02\x02\x04\r", ["abc"]),            # Ctrl-B, Ctrl-D deletes
    (b"ab\x02\x06c\r", ["abc"]),                 # Ctrl-F
    (b"rm -rf /\x15ls\r", ["ls"]),               # Ctrl-U
    (b"ls /etc /tmp\x02\x02\x02\x02\x0b\r", ["ls /etc "]),  # Ctrl-K
    (b"echo a bc  \x17d\r", ["echo a d"]),       # Ctrl-W: a word and blanks
    (b"echo foo-bar\x1b\x7fx\r", ["echo foo-x"]),  # Alt-Backspace
    (b"one two\x1bbX\r", ["one Xtwo"]),          # Alt-B
    (b"one two\x1b[1;5DX\x1b[1;5CY\r", ["one XtwoY"]),  # Ctrl-arrows
    (b"a\x01\x1bfX\r", ["aX"]),                  # Alt-F
    (b"cd /et\t\r", ["cd /et<tab>"]),            # completion is marked
    (b"cd /et\t\x7f\x7fc\r", ["cd /et<tab><bs><bs>c"]),  # then edits shown
    (b"cd /et\t\x1b[D\x15\r", ["cd /et<tab><left><^U>"]),
    (b"\x1b[Avi\r", ["<up>vi"]),                 # history, then typing
    (b"\x10\x0e\r", ["<up><down>"]),             # Ctrl-P, Ctrl-N
    (b"\x12passwd\r", ["<^R>passwd"]),           # reverse search
    (b"sleep 9\x03", ["sleep 9<^C>"]),           # cancelled, not run
    (b"\x04", ["<^D>"]),                         # end of input
    (b"a\x0cb\r", ["ab"]),                       # Ctrl-L: nothing to show
    (b"\x1b[200~paste\x1b[201~\r", ["paste"]),   # bracketed paste
    (b"x\x1b[99zy\r", ["x<esc>y"]),              # an unknown sequence
    (b"x\x1bqy\r", ["x<M-q>y"]),                 # an unknown Alt key
    (b"x\x18y\r", ["x<^X>y"]),                   # an unknown control
    (b"caf\xc3\xa9\r", ["caf\u00e9"]),
    (b"a\xffb\r", ["a\ufffdb"]),                 # not UTF-8
])
def test_decoding(data, expected):
    lines, carry = decode_keystrokes(data)
    assert lines == expected
    assert carry.tokens == ()


def test_a_line_goes_on_in_the_next_record():
    lines, carry = decode_keystrokes(b"systemctl sto")
    assert lines == [] and "".join(carry.tokens) == "systemctl sto"
    assert lines_of(b"systemctl sto", b"p nginx\r") == ["systemctl stop nginx"]


@pytest.mark.parametrize("first, second, expected", [
    (b"ls\x1b", b"[Dx\r", "lxs"),          # ESC alone at the end
    (b"ls\x1b[", b"Dx\r", "lxs"),          # CSI without its final byte
    (b"ls\x1b[1", b";5Dx\r", "xls"),
    (b"ls\x1bO", b"Dx\r", "lxs"),          # SS3 cut
    (b"ls\x1b", b"bx\r", "xls"),           # Alt-B cut
    (b"l\xc3", b"\xa9s\x1b[Dx\r", "l\u00e9xs"),  # a UTF-8 character cut
])
def test_a_key_cut_between_records_is_one_key(first, second, expected):
    assert lines_of(first, second) == [expected]
    assert decode_keystrokes(first + second)[0] == [expected]


def test_cr_then_lf_in_the_next_record_ends_one_line():
    assert lines_of(b"ls\r", b"\nid\r") == ["ls", "id"]
    assert lines_of(b"ls\r", b"\n\nid\r") == ["ls", "id"]


def test_a_long_line_is_cut():
    lines, _ = decode_keystrokes(b"x" * 5000 + b"\r")
    assert lines == ["x" * pamsignal.MAX_TYPED_LINE_CHARS + "\u2026"]
    lines = lines_of(*[b"y" * 300] * 3 + [b"\r"])
    assert lines == ["y" * pamsignal.MAX_TYPED_LINE_CHARS + "\u2026"]


def test_what_was_never_entered():
    _, carry = decode_keystrokes(b"rm -rf /srv")
    assert pamsignal.unfinished_line(carry) == "rm -rf /srv<no enter>"
    _, carry = decode_keystrokes(b"rm -rf /srv\r")
    assert pamsignal.unfinished_line(carry) is None


# ---------------------------------------------------------------- records


def test_the_real_session_decodes_to_what_was_typed():
    records = [pamsignal.parse_audit_record(entry)
               for entry in entries(SESSION)]
    tty = [record for record in records
           if record and record.kind == pamsignal.AUDIT_TTY]
    assert len(tty) == 3
    assert {(r.audit_session, r.uid, r.pid) for r in tty} == {
        ("627", "0", "27250")}
    assert lines_of(*[record.data for record in tty]) == SESSION_LINES
    assert not any(b"not-logged" in record.data for record in tty)
    starts = [record for record in records
              if record and record.kind == pamsignal.AUDIT_USER_START]
    assert [(r.pid, r.audit_session) for r in starts] == [("27231", "627")]


def test_kernel_log_copies_and_forgeries_are_refused():
    """Without auditd each record reaches the journal twice (captured
    here: kernel_copies.json, a bash with TTY audit set outside any login
    session, so the secret typed at its `read -s` shows what is left out
    too); the kernel log's copy carries no audit fields and is never
    taken."""
    copies = entries(os.path.join(FIXTURES, "kernel_copies.json"))
    kernel = [entry for entry in copies if entry["_TRANSPORT"] == "kernel"]
    audit = [entry for entry in copies if entry["_TRANSPORT"] == "audit"]
    assert len(kernel) == len(audit) == 2
    for twin, copy in zip(audit, kernel):
        assert copy["MESSAGE"].startswith("audit: type=1319 ")
        assert copy["MESSAGE"].endswith(
            "data=" + twin["_AUDIT_FIELD_DATA"])
        assert not any(key.startswith("_AUDIT") for key in copy)
        inside = dict(copy, _AUDIT_SESSION="7", _PID="1", _UID="0")
        assert pamsignal.parse_audit_record(inside) is None
        assert pamsignal.parse_audit_record(
            dict(twin, _AUDIT_SESSION="7")) is not None
    typed = lines_of(*[bytes.fromhex(entry["_AUDIT_FIELD_DATA"])
                       for entry in audit])
    assert typed == ["echo TTYPROBE1", "echo abc", "read -s SECRETVAR",
                     "exit"]
    session = entries(SESSION)
    tty = next(entry for entry in session
               if entry.get("_AUDIT_TYPE") == pamsignal.AUDIT_TTY)
    assert pamsignal.parse_audit_record(tty) is not None
    # What `logger` or the native protocol can write: another transport.
    for transport in ("syslog", "journal", "stdout", "kernel", None):
        forged = dict(tty, _TRANSPORT=transport)
        assert pamsignal.parse_audit_record(forged) is None
    for field, value in (("_AUDIT_TYPE", "1300"),
                         ("_AUDIT_SESSION", "4294967295"),
                         ("_AUDIT_SESSION", None), ("_PID", None),
                         ("_AUDIT_FIELD_DATA", "6C7"),
                         ("_AUDIT_FIELD_DATA", "6C 73"),
                         ("_AUDIT_FIELD_DATA", "zz"),
                         ("_AUDIT_FIELD_DATA", None),
                         ("_AUDIT_FIELD_DATA", "41" * 20000)):
        changed = dict(tty, **{field: value})
        assert pamsignal.parse_audit_record(changed) is None, (field, value)


def test_user_tty_data_is_quoted_text_or_hex():
    records = [entry for entry in entries(USER_TTY)
               if entry["_TRANSPORT"] == "audit"]
    assert [pamsignal.audit_data(entry["_AUDIT_FIELD_DATA"])
            for entry in records] == [b"ls", b"ls -l /root",
                                      "caf\u00e9 \"q\"".encode()]
    # Sent from outside any login session: not anyone's typing.
    assert all(pamsignal.parse_audit_record(entry) is None
               for entry in records)
    inside = dict(records[1], _AUDIT_SESSION="12")
    record = pamsignal.parse_audit_record(inside)
    assert record.kind == pamsignal.AUDIT_USER_TTY
    assert record.data == b"ls -l /root"


# ---------------------------------------------------------------- sessions


class Keep(pamsignal.Sink):
    """A channel's sink that keeps the events it is given."""

    def __init__(self):
        pamsignal.Sink.__init__(self, "keep")
        self.sent = []

    def send(self, event, delay_s=0):
        self.sent.append(event)


def keeping_pipeline(config="[detection]\ntty_audit = yes\n", **options):
    """(Pipeline showing every event to a Keep, the Keep)."""
    keep = Keep()
    return pamsignal.Pipeline(
        [pamsignal.Channel(keep, pamsignal.ChannelGate(
            pamsignal.SHOW_EVERYTHING))],
        pamsignal.parse_config(config).detection, **options), keep


def scan(lines, config="[detection]\ntty_audit = yes\n"):
    """The events `scan` gives for export lines (bytes), as Events."""
    pipeline, keep = keeping_pipeline(config, skip_unwatched=True)
    for line in lines:
        entry = pipeline.decode(line)
        if entry is not None:
            pipeline.process_entry(entry)
    pipeline.finish()
    return keep.sent


def session_lines():
    with open(SESSION, "rb") as export:
        return export.readlines()


def test_session_closed_carries_what_root_typed():
    closed = [event for event in scan(session_lines())
              if event.action == "session_closed"]
    assert len(closed) == 1
    assert closed[0].user == "root"
    assert list(closed[0].typed_lines) == SESSION_LINES
    assert closed[0].typed_more is None
    ecs = pamsignal.event_to_ecs(closed[0])
    assert ecs["pamsignal"]["typed_lines"] == SESSION_LINES
    assert "typed_more" not in ecs["pamsignal"]
    text = pamsignal.event_text(closed[0])
    assert 'typed="echo one \u23ce echo two \u23ce' in text


def test_off_by_default_nothing_is_read():
    closed = [event for event in scan(session_lines(), config="")
              if event.action == "session_closed"]
    assert closed[0].typed_lines is None
    assert pamsignal.parse_config("").detection.tty_audit is False


def test_the_records_before_or_after_the_session_line():
    """USER_START may reach the journal before or after sshd's session
    line (two transports): either order ties the session."""
    lines = session_lines()
    start = next(i for i, line in enumerate(lines) if b'"1105"' in line)
    opened = next(i for i, line in enumerate(lines)
                  if b"session opened" in line)
    assert opened < start  # as captured
    moved = list(lines)
    moved.insert(opened, moved.pop(start))
    closed = [event for event in scan(moved)
              if event.action == "session_closed"]
    assert list(closed[0].typed_lines) == SESSION_LINES


SUDO = os.path.join(FIXTURES, "sudo_in_user_session.json")


def sudo_lines():
    """A user's ssh login (not audited) with a root shell run by sudo
    (use_pty, pam_tty_audit open_only), captured: the shell's record, then
    sudo's USER_END, then sudo's own record of relaying the user's
    terminal, then sudo's "session closed" line."""
    with open(SUDO, "rb") as export:
        return export.readlines()


def closes(events):
    return {event.service: event for event in events
            if event.action == "session_closed"}


def test_sudo_to_root_is_typed_once_in_the_sudo_session():
    closed = closes(scan(sudo_lines()))
    assert list(closed["sudo"].typed_lines) == ["id -u", "echo as-root",
                                                "exit"]
    assert closed["sudo"].target_user == "root"
    # sudo's relay of the same keys (its own PID, the user's UID) is
    # neither the user's typing nor a second copy.
    assert closed["sshd"].typed_lines is None


def test_a_close_waits_for_the_last_keystrokes():
    """journald may store the close line before the shell's last record
    (two sockets); the close waits for PAM's USER_END, which the kernel
    sends after every record of the session."""
    lines = sudo_lines()
    shell = next(i for i, line in enumerate(lines)
                 if b'"_COMM": "bash"' in line)
    close = next(i for i, line in enumerate(lines)
                 if b"sudo:session): session closed" in line)
    moved = list(lines)
    moved.insert(shell, moved.pop(close))
    events = scan(moved)
    assert list(closes(events)["sudo"].typed_lines) == [
        "id -u", "echo as-root", "exit"]
    # Without USER_END at all, the end of the input releases it.
    no_end = [line for line in moved if b'"1106"' not in line]
    assert list(closes(scan(no_end))["sudo"].typed_lines) == [
        "id -u", "echo as-root", "exit"]


def held_close():
    """A TypedInput holding the captured sudo session's close (its
    USER_END not seen yet); the close event and the USER_END record."""
    typing = pamsignal.TypedInput()
    parsed = [json.loads(line) for line in sudo_lines()]
    end = None
    for item in parsed:
        record = pamsignal.parse_audit_record(item)
        if record is not None and record.kind == pamsignal.AUDIT_USER_END \
                and item["AUDIT_FIELD_EXE"] == "/usr/bin/sudo":
            end = record
        elif record is not None:
            typing.record(record)
        event = pamsignal.parse_entry(item)
        if event is not None and event.action == "session_opened":
            typing.note(event, item)
            typing.observe(event)
        elif event is not None and event.action == "session_closed" and \
                event.service == "sudo":
            closed = event
    assert typing.observe(closed) == []  # held
    return typing, closed, end


def test_a_held_close_is_let_go_after_its_wait():
    typing, closed, _ = held_close()
    assert typing.due(closed.timestamp_us + pamsignal.TTY_HOLD_US - 1) == []
    (released,) = typing.due(closed.timestamp_us + pamsignal.TTY_HOLD_US)
    assert list(released.typed_lines) == ["id -u", "echo as-root", "exit"]
    assert typing.drain() == []


def test_live_the_wait_runs_from_when_it_was_held():
    """A backlog read after a restart is old by the wall clock; its close
    still waits for USER_END (a few entries on), not for nothing."""
    typing, closed, end = held_close()
    # held_close() held it as scan does; hold it again as live, an hour on
    typing.closing.clear()
    wall_us = closed.timestamp_us + 3600 * 1000000
    assert typing.observe(closed, wall_us) == []
    assert typing.due(wall_us=wall_us + pamsignal.TTY_HOLD_US - 1) == []
    (released,) = typing.record(end)
    assert list(released.typed_lines) == ["id -u", "echo as-root", "exit"]
    # Released once: a repeated close line is no longer held.
    assert typing.observe(closed, wall_us) == [closed]


def test_a_held_close_waits_again_when_journalctl_is_back():
    """journalctl dead for 20 s right after a close was held: its wait
    starts again when journalctl is back, so USER_END, which it then
    gives, still finds the close held with its last keystrokes."""
    pipeline, keep = keeping_pipeline()
    parsed = [json.loads(line) for line in sudo_lines()]
    end = next(i for i, item in enumerate(parsed)
               if item.get("_AUDIT_TYPE") == pamsignal.AUDIT_USER_END and
               item["AUDIT_FIELD_EXE"] == "/usr/bin/sudo")
    close = next(i for i, item in enumerate(parsed) if
                 "(sudo:session): session closed" in item.get("MESSAGE", ""))
    parsed.insert(end, parsed.pop(close))  # stored before USER_END
    wall = int(parsed[-1]["__REALTIME_TIMESTAMP"]) / 1e6 + 3600
    for item in parsed[:end + 1]:
        pipeline.process_entry(item, wall)
    assert "sudo" not in [e.service for e in keep.sent
                          if e.action == "session_closed"]  # held
    pipeline.journal_followed(False, wall + 1)
    pipeline.tick(wall + 10)
    pipeline.journal_followed(True, wall + 21)
    pipeline.tick(wall + 21 + pamsignal.TTY_HOLD_US / 1e6 - 0.5)
    assert "sudo" not in [e.service for e in keep.sent
                          if e.action == "session_closed"]
    for item in parsed[end + 1:]:
        pipeline.process_entry(item, wall + 22)
    (closed,) = [e for e in keep.sent
                 if e.action == "session_closed" and e.service == "sudo"]
    assert list(closed.typed_lines) == ["id -u", "echo as-root", "exit"]


def test_a_held_close_survives_a_restart():
    typing, closed, end = held_close()
    saved = json.loads(json.dumps(typing.to_state()))
    again = pamsignal.TypedInput()
    again.load_state(saved)
    (released,) = again.record(end)
    assert released.action == "session_closed"
    assert list(released.typed_lines) == ["id -u", "echo as-root", "exit"]
    again.load_state([["x", {"action": "login_success"}], "junk", [1, {}]])
    assert again.drain() == []


def entry(pid, message=None, identifier="su", uid="1000", session=None,
          transport="syslog", realtime=1000000, **fields):
    """A journal entry of the fixture's boot (for the cases not captured:
    they follow the captured ones' shape)."""
    built = {"_BOOT_ID": "b1", "_PID": str(pid), "_UID": uid,
             "_TRANSPORT": transport,
             "__REALTIME_TIMESTAMP": str(realtime)}
    if message is not None:
        built.update(MESSAGE=message, SYSLOG_IDENTIFIER=identifier,
                     _COMM=identifier, _EXE="/usr/bin/" + identifier)
    if session is not None:
        built["_AUDIT_SESSION"] = session
    built.update(fields)
    return (json.dumps(built) + "\n").encode()


def tty(pid, session, uid, data, realtime=1000000):
    return entry(pid, uid=uid, session=session, transport="audit",
                 realtime=realtime, _AUDIT_TYPE="1319",
                 _AUDIT_FIELD_DATA=data.hex().upper())


def test_su_to_root_inside_a_users_login_gets_roots_typing():
    """su keeps the caller's audit session: the records of root's shell
    (UID 0) go to the su session, the user's own (pam_tty_audit enabled
    for both here) to the user's sshd session."""
    sshd_open = entry(500, "pam_unix(sshd:session): session opened for "
                      "user alice(uid=1000) by (uid=0)", "sshd", uid="0",
                      _EXE="/usr/sbin/sshd")
    start = entry(500, uid="0", session="44", transport="audit",
                  _AUDIT_TYPE="1105")
    su_open = entry(600, "pam_unix(su:session): session opened for user "
                    "root(uid=0) by alice(uid=1000)", session="44")
    su_close = entry(600, "pam_unix(su:session): session closed for user "
                     "root", session="44", realtime=3000000)
    sshd_close = entry(500, "pam_unix(sshd:session): session closed for "
                       "user alice", "sshd", uid="0", _EXE="/usr/sbin/sshd",
                       realtime=4000000)
    events = scan([sshd_open, start, tty(510, "44", "1000", b"su -\r"),
                   su_open, tty(610, "44", "0", b"id\rcat /etc/shado"),
                   tty(610, "44", "0", b"w\rexit\r"), su_close,
                   tty(510, "44", "1000", b"exit\r"), sshd_close])
    closed = {event.service: event for event in events
              if event.action == "session_closed"}
    assert list(closed["su"].typed_lines) == ["id", "cat /etc/shadow", "exit"]
    assert list(closed["sshd"].typed_lines) == ["su -", "exit"]


def test_records_of_no_known_session_are_counted_not_kept():
    sent = scan([tty(700, "45", "0", b"id\r")])
    assert sent == []


def test_a_line_never_entered_shows_at_the_close():
    opened = entry(600, "pam_unix(su:session): session opened for user "
                   "root(uid=0) by alice(uid=1000)", session="46")
    closed = entry(600, "pam_unix(su:session): session closed for user "
                   "root", session="46")
    events = scan([opened, tty(610, "46", "0", b"ls\rrm -rf /srv"), closed])
    assert list(events[-1].typed_lines) == ["ls", "rm -rf /srv<no enter>"]


def test_bounded_per_session_with_a_count_of_the_rest():
    opened = entry(600, "pam_unix(su:session): session opened for user "
                   "root(uid=0) by alice(uid=1000)", session="47")
    closed = entry(600, "pam_unix(su:session): session closed for user "
                   "root", session="47")
    flood = tty(610, "47", "0", b"".join(b"echo %d\r" % n
                                         for n in range(250)))
    event = scan([opened, flood, closed])[-1]
    assert len(event.typed_lines) == pamsignal.MAX_TYPED_LINES
    assert event.typed_lines[-1] == "echo %d" % (
        pamsignal.MAX_TYPED_LINES - 1)
    assert event.typed_more == 250 - pamsignal.MAX_TYPED_LINES
    long_lines = tty(610, "47", "0", (b"x" * 490 + b"\r") * 25)
    event = scan([opened, long_lines, long_lines, closed])[-1]
    assert sum(map(len, event.typed_lines)) <= pamsignal.MAX_TYPED_CHARS
    assert len(event.typed_lines) + event.typed_more == 50
    # In an alert: what fits, and how many more.
    text = pamsignal.alert_text(event)
    typed = dict(text.facts)["Typed"]
    assert len(typed) <= pamsignal.MAX_ALERT_VALUE_CHARS
    assert typed.endswith(" more)")
    shown = typed.count("x" * 490)
    assert typed.endswith("(+%d more)" % (50 - shown))


def test_bounded_in_sessions_kept():
    typing = pamsignal.TypedInput(limit=3)
    for pid in range(10):
        event = pamsignal.Event(action="session_opened", user="root",
                                pid=pid, context_key="b/%d/su" % pid,
                                timestamp_us=1)
        typing.audit_session_of.put("b/%d" % pid, str(pid))
        typing.observe(event)
    assert len(typing.typed) == 3
    assert list(typing.typed) == ["b/7/su", "b/8/su", "b/9/su"]


def test_typed_lines_survive_the_spool():
    event = pamsignal.Event(action="session_closed", user="root",
                            timestamp_us=1, typed_lines=("id", "ls"),
                            typed_more=3)
    again = pamsignal.event_from_record(json.loads(json.dumps(
        pamsignal.event_to_record(event))))
    assert again == event
    damaged = dict(pamsignal.event_to_record(event), typed_lines=[1, 2])
    assert pamsignal.event_from_record(damaged) is None


# ---------------------------------------------------------------- journal


def test_the_journal_is_read_for_records_only_when_on():
    assert "_TRANSPORT=audit" not in pamsignal.journal_matches()
    assert pamsignal.journal_fields() == "--output-fields=" + ",".join(
        pamsignal.JOURNAL_FIELDS)
    matches = pamsignal.journal_matches(tty_audit=True)
    group = matches[len(pamsignal.journal_matches()):]
    assert group == ["+", "_TRANSPORT=audit", "_AUDIT_TYPE=1319",
                     "_AUDIT_TYPE=1124", "_AUDIT_TYPE=1105",
                     "_AUDIT_TYPE=1106"]
    command = pamsignal.follow_command("journalctl", [], tty_audit=True)
    assert "_AUDIT_FIELD_DATA" in command[7] and \
        "_AUDIT_SESSION" in command[7]
    assert command[8:] == matches
    report = pamsignal.report_command("journalctl", None, None, True)
    assert report[-len(matches):] == matches


# ---------------------------------------------------------------- report


def run_report(tmp_path, *arguments, config="[detection]\ntty_audit = yes\n",
               export=SESSION):
    path = tmp_path / "pamsignal.conf"
    path.write_text(config)
    out = io.StringIO()
    code = pamsignal.main(["--config", str(path), "report"] +
                          list(arguments) + [export], stdout=out)
    assert code == 0
    return out.getvalue()


def test_report_shows_what_root_typed(tmp_path, monkeypatch):
    document = json.loads(run_report(tmp_path, "--json", "--user", "root"))
    (session,) = document["sessions"]
    assert session["user"] == "root" and session["state"] == "closed"
    assert session["typed"] == SESSION_LINES
    assert "typed_more" not in session
    monkeypatch.setenv("COLUMNS", "100")
    text = run_report(tmp_path, "--user", "root").splitlines()
    start = text.index("Typed in sessions (1)")
    assert text[start + 1].startswith("root  sshd  127.0.0.1  ")
    assert text[start + 2:start + 2 + len(SESSION_LINES)] == [
        "  " + line for line in SESSION_LINES]
    off = json.loads(run_report(tmp_path, "--json", config=""))
    assert "typed" not in off["sessions"][0]


def test_report_lists_a_sudo_session_typed_into(tmp_path):
    """sudo's sessions are commands, not rows, unless TTY audit recorded
    typing in one (a root shell): then it is a session of its own."""
    document = json.loads(run_report(tmp_path, "--json", export=SUDO))
    by_service = {session["service"]: session
                  for session in document["sessions"]}
    assert set(by_service) == {"sshd", "sudo"}
    sudo = by_service["sudo"]
    assert sudo["typed"] == ["id -u", "echo as-root", "exit"]
    assert sudo["target_user"] == "root"
    assert sudo["user"] == by_service["sshd"]["user"]  # who ran sudo
    assert sudo["state"] == "closed" and "start" in sudo
    assert "typed" not in by_service["sshd"]
    only_root = json.loads(run_report(tmp_path, "--json", "--user", "root",
                                      export=SUDO))
    assert [session["service"] for session in only_root["sessions"]] == [
        "sudo"]
    # Without TTY audit, sudo's session is a command again.
    off = json.loads(run_report(tmp_path, "--json", config="",
                                export=SUDO))
    assert [session["service"] for session in off["sessions"]] == ["sshd"]


def test_the_typed_keys_are_documented():
    """Every key the report prints for typed input is in the README's
    table of them (the JSON document's own table, checked by
    tests/test_report.py, is for the keys every report has)."""
    with open(os.path.join(HERE, "..", "README.md")) as handle:
        readme = handle.read()
    part = readme.split("## Privileged sessions (pam_tty_audit)", 1)[1]
    documented = set(re.findall(r"^\| `(sessions\[\]\.[^`]+)` \|",
                                part.split("\n## ", 1)[0], re.M))
    builder = pamsignal.ReportBuilder()
    builder.add(pamsignal.Event(
        action="session_closed", user="root", service="sshd",
        timestamp_us=1, context_key="b/1/sshd", typed_lines=("id",),
        typed_more=2))
    (session,) = builder.document()["sessions"]
    assert session["typed"] == ["id"] and session["typed_more"] == 2
    text = pamsignal.render_report(builder.document(), 80)
    start = text.index("Typed in sessions (1)")
    assert text[start + 2:start + 4] == ["  id", "  ... and 2 more lines"]
    printed = {"sessions[]." + key for key in session
               if key.startswith("typed")}
    assert printed == documented == {"sessions[].typed",
                                     "sessions[].typed_more"}


# ---------------------------------------------------------------- properties

try:
    import hypothesis
    from hypothesis import given, settings, strategies as st
except ImportError:  # pragma: no cover - tests/check.sh installs it
    hypothesis = None

if hypothesis is None:
    def test_properties_need_hypothesis():
        import realsys
        realsys.unavailable("pip install hypothesis (tests/check.sh does)")
else:
    #: Bytes that mean something to the decoder, and some that do not.
    KEY_BYTES = st.lists(st.sampled_from(
        [b"a", b"b", b" ", b"-", b"\r", b"\n", b"\t", b"\x7f", b"\x08",
         b"\x01", b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", b"\x0b",
         b"\x15", b"\x17", b"\x1b", b"[", b"O", b"1", b";", b"5", b"A",
         b"C", b"D", b"~", b"\xc3", b"\xa9", b"\xe2", b"\x82", b"\xff"]),
        max_size=40).map(b"".join)

    @settings(max_examples=int(os.environ.get(
        "PAMSIGNAL_PROPERTY_EXAMPLES", "300")), deadline=None)
    @given(KEY_BYTES, st.integers(min_value=0, max_value=40))
    def test_where_a_record_ends_changes_nothing(data, cut):
        """The kernel may end a record anywhere (a full buffer): decoding
        two records with the carry reads as decoding them as one."""
        cut = min(cut, len(data))
        whole, whole_carry = decode_keystrokes(data)
        first, carry = decode_keystrokes(data[:cut])
        second, split_carry = decode_keystrokes(data[cut:], carry)
        assert first + second == whole
        assert split_carry == whole_carry

    @settings(max_examples=int(os.environ.get(
        "PAMSIGNAL_PROPERTY_EXAMPLES", "300")), deadline=None)
    @given(st.lists(st.text(st.characters(min_codepoint=0x20,
                                          max_codepoint=0x7e),
                            min_size=1, max_size=60), max_size=8))
    def test_plain_typing_reads_back_exactly(typed):
        data = b"".join(line.encode() + b"\r" for line in typed)
        assert decode_keystrokes(data)[0] == typed

    @settings(max_examples=int(os.environ.get(
        "PAMSIGNAL_PROPERTY_EXAMPLES", "300")), deadline=None)
    @given(st.binary(max_size=300))
    def test_any_bytes_give_lines_without_control_characters(data):
        lines, carry = decode_keystrokes(data)
        for line in lines + [pamsignal.unfinished_line(carry) or ""]:
            assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in line)
        assert len(carry.pending) <= 64


# ---------------------------------------------------------------- the agent


def test_records_are_counted_by_verdict(tmp_path):
    config = pamsignal.parse_config(
        "[pamsignal]\nstate_dir = %s\n[detection]\ntty_audit = yes\n"
        % tmp_path)
    agent = pamsignal.Agent(config, [])
    for line in sudo_lines() + [tty(700, "45", "0", b"id\r")]:
        entry = agent.pipeline.decode(line)
        if entry is not None:
            agent.pipeline.process_entry(entry)
    samples = {labels["verdict"]: value for name, labels, value in
               agent.metric_samples(0.0)
               if name == "pamsignal_tty_records_total"}
    assert samples == {"typed": 1, "unclaimed": 1, "relayed": 1}
    text = pamsignal.render_metrics(agent.metric_samples(0.0))
    assert 'pamsignal_tty_records_total{verdict="relayed"} 1' in text


def test_the_agent_follows_the_records_and_keeps_a_held_close(tmp_path,
                                                              capsys):
    text = "[pamsignal]\nstate_dir = %s\n[detection]\ntty_audit = yes\n" \
        % tmp_path
    config = pamsignal.parse_config(text)
    agent = pamsignal.Agent(config, [])
    assert agent.source.tty_audit
    assert "_TRANSPORT=audit" in pamsignal.follow_command(
        "journalctl", [], agent.source.tty_audit)
    # Only a restart changes what journalctl is asked for.
    kept = agent._restart_only_kept(pamsignal.parse_config(
        text.replace("yes", "no")))
    assert kept.detection.tty_audit is True
    assert "tty_audit changed: takes effect at the next start" in \
        capsys.readouterr().err
    # A close held at a stop comes back at the next start.
    typing, closed, end = held_close()
    agent.pipeline.typing = typing
    agent.save(0.0)
    again = pamsignal.Agent(config, [])
    again.restore()
    (released,) = again.pipeline.typing.record(end)
    assert list(released.typed_lines) == ["id -u", "echo as-root", "exit"]
    off = pamsignal.Agent(pamsignal.parse_config(
        "[pamsignal]\nstate_dir = %s\n" % tmp_path), [])
    assert off.pipeline.typing is None and not off.source.tty_audit
    off.restore()  # a state with held closes, read with tty_audit off
