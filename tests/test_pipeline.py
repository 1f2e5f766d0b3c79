"""Stages after the parser (session pairing, sudo attempt counting) and the
`scan` command, driven by journal entries as journalctl exports them."""
import io
import json
import tracemalloc

import pytest

from support import make_entry, pamsignal


def scan(tmp_path, entries, *flags, raw_lines=()):
    export = tmp_path / "export.json"
    export.write_text("".join(json.dumps(e) + "\n" for e in entries) +
                      "".join(raw_lines))
    out = io.StringIO()
    code = pamsignal.main(["scan"] + list(flags) + [str(export)], stdout=out)
    return code, out.getvalue()


def scan_events(tmp_path, entries):
    code, out = scan(tmp_path, entries, "--json")
    assert code == 0
    return [json.loads(line) for line in out.splitlines()]


def sequence(*lines, **common):
    """Entries in order, one second apart, from the same process."""
    return [make_entry(identifier, message, sequence=number, **common)
            for number, (identifier, message) in enumerate(lines, 1)]


SUDO_FAIL = ("sudo", "pam_unix(sudo:auth): authentication failure; logname= "
             "uid=1000 euid=0 tty= ruser=alice rhost=  user=alice")
SUDO_OK = ("sudo", "   alice : PWD=/home/alice ; USER=root ; "
           "COMMAND=/usr/bin/id")


def sudo_total(count):
    return ("sudo", "   alice : %d incorrect password attempt%s ; "
            "PWD=/home/alice ; USER=root ; COMMAND=/usr/bin/id"
            % (count, "" if count == 1 else "s"))


def failures(events):
    return [e.get("pamsignal", {}).get("attempts", 1) for e in events
            if e["event"]["action"] == "login_failure"]


@pytest.mark.parametrize("lines, counted", [
    ([SUDO_FAIL, SUDO_OK], [1]),
    ([SUDO_FAIL, sudo_total(1)], [1]),
    ([SUDO_FAIL, sudo_total(3)], [1, 2]),
    ([sudo_total(3)], [3]),
    ([SUDO_FAIL, SUDO_FAIL, sudo_total(2)], [1, 1]),
])
def test_each_failed_sudo_password_counts_once(tmp_path, lines, counted):
    assert failures(scan_events(tmp_path, sequence(*lines))) == counted


def test_sudo_totals_of_other_processes_are_not_reduced(tmp_path):
    first = make_entry(*SUDO_FAIL, sequence=1, _PID="10")
    total = make_entry(*sudo_total(3), sequence=2, _PID="11")
    assert failures(scan_events(tmp_path, [first, total])) == [1, 3]


def test_ssh_session_close_carries_duration(tmp_path):
    entries = sequence(
        ("sshd", "Accepted password for alice from 203.0.113.5 port 4 ssh2"),
        ("sshd", "pam_unix(sshd:session): session opened for user "
                 "alice(uid=1000) by (uid=0)"),
        ("sshd", "Received disconnect from 203.0.113.5 port 4:11: bye"),
        ("sshd", "pam_unix(sshd:session): session closed for user alice"))
    entries[3]["__REALTIME_TIMESTAMP"] = str(
        int(entries[1]["__REALTIME_TIMESTAMP"]) + 3723500000)
    events = scan_events(tmp_path, entries)
    assert [e["event"]["action"] for e in events] == [
        "login_success", "session_opened", "session_closed"]
    assert events[2]["pamsignal"]["session_duration_s"] == 3723.5
    assert events[2]["user"]["name"] == "alice"


def test_su_close_is_completed_with_who_opened_it(tmp_path):
    events = scan_events(tmp_path, sequence(
        ("su", "pam_unix(su:session): session opened for user "
               "root(uid=0) by alice(uid=1000)"),
        ("su", "pam_unix(su:session): session closed for user root")))
    closed = events[1]
    assert closed["user"] == {"name": "alice", "id": "1000",
                              "target": {"name": "root"}}
    assert closed["pamsignal"]["session_duration_s"] == 1.0


def test_sessions_pair_by_process_and_logind_by_id(tmp_path):
    opened_a = make_entry("sshd", "pam_unix(sshd:session): session opened "
                          "for user a by (uid=0)", sequence=1, _PID="1")
    opened_b = make_entry("sshd", "pam_unix(sshd:session): session opened "
                          "for user b by (uid=0)", sequence=2, _PID="2")
    logind = make_entry("systemd-logind", "New session 7 of user b.",
                        sequence=3, _PID="99")
    closed_a = make_entry("sshd", "pam_unix(sshd:session): session closed "
                          "for user a", sequence=5, _PID="1")
    removed = make_entry("systemd-logind", "Removed session 7.",
                         sequence=9, _PID="99")
    events = scan_events(tmp_path, [opened_a, opened_b, logind, closed_a,
                                    removed])
    assert events[3]["pamsignal"]["session_duration_s"] == 4.0
    assert events[4]["user"]["name"] == "b"
    assert events[4]["pamsignal"]["session_duration_s"] == 6.0


def test_close_without_open_has_no_duration(tmp_path):
    events = scan_events(tmp_path, sequence(
        ("sshd", "pam_unix(sshd:session): session closed for user alice")))
    assert "session_duration_s" not in events[0].get("pamsignal", {})


def test_session_table_is_bounded_and_survives_a_restart():
    tracker = pamsignal.SessionTracker(limit=3)
    for number in range(5):
        tracker.observe(pamsignal.Event(
            action="session_opened", timestamp_us=number * 1000000,
            user="u%d" % number, context_key="k%d" % number))
    assert list(tracker.open_sessions) == ["k2", "k3", "k4"]
    saved = json.loads(json.dumps(tracker.to_state()))
    restored = pamsignal.SessionTracker(limit=3)
    restored.load_state(saved + [["bad"], 7, ["k9", {"opened_us": "x"}]])
    closed = restored.observe(pamsignal.Event(
        action="session_closed", timestamp_us=10000000, context_key="k3"))
    assert closed.user == "u3" and closed.session_duration_s == 7.0
    assert list(restored.open_sessions) == ["k2", "k4"]


def test_scan_text_output_is_one_readable_line_per_event(tmp_path):
    code, out = scan(tmp_path, sequence(
        ("sshd", "Accepted publickey for alice from 2001:db8::5 port 22 "
                 "ssh2: ED25519 SHA256:abc"),
        ("sudo", "   alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; "
                 "COMMAND=/usr/bin/systemctl restart nginx")))
    assert code == 0
    assert out.splitlines() == [
        "2026-11-27 11:46:41Z login_success user=alice "
        "source=[2001:db8::5]:22 source_type=documentation service=sshd "
        "method=publickey "
        "key=\"ED25519 SHA256:abc\" host=web1",
        "2026-11-27 11:46:42Z sudo_command user=alice as=root service=sudo "
        "tty=pts/0 command=\"/usr/bin/systemctl restart nginx\" host=web1"]


def test_hostile_text_cannot_forge_fields_or_reach_the_terminal_raw(
        tmp_path):
    name = 'ev"il\x1b[31m x=1\u202e'
    entries = sequence(("sshd", "Invalid user %s from 203.0.113.5 port 7"
                        % name))
    code, text = scan(tmp_path, entries)
    assert "\x1b" not in text and "\u202e" not in text
    assert 'user="ev\\"il\\x1b[31m x=1\\u202e" source=203.0.113.5:7' in text
    code, out = scan(tmp_path, entries, "--json")
    assert "\x1b" not in out and "\u202e" not in out
    assert json.loads(out)["user"]["name"] == name


@pytest.mark.parametrize("name", [
    "eve\u2800source\uff1d6.6.6.6",  # a blank and a fullwidth equals sign
    "eve\u3000source=6.6.6.6",  # an ideographic space
    "jos\u00e9"])
def test_a_name_beyond_printable_ascii_is_shown_quoted(tmp_path, name):
    # Look-alikes of a space or "=" must not make one value pass for two
    # pairs: anything beyond printable ASCII is quoted, so its extent shows.
    entries = sequence(("sshd", "Invalid user %s from 203.0.113.5 port 7"
                        % name))
    code, text = scan(tmp_path, entries)
    assert 'user="%s" source=203.0.113.5:7' % name in text


def test_scan_skips_garbage_and_says_so(tmp_path, capsys):
    code, out = scan(tmp_path, sequence(
        ("sshd", "Failed password for bob from 203.0.113.5 port 9 ssh2")),
        "--json", raw_lines=["garbage\n", "\n", "[]\n"])
    assert code == 0 and len(out.splitlines()) == 1
    assert "not a journal JSON object (2 so far)" in capsys.readouterr().err


@pytest.mark.parametrize("line, expected", [
    (b'{"MESSAGE": "x"}', {"MESSAGE": "x"}),
    (b' \t{"MESSAGE": "x"} \r\n', {"MESSAGE": "x"}),
    (b'{"MESSAGE": "\xff"}\n', {"MESSAGE": "\ufffd"}),
    (b'{"MESSAGE": "x"} trailing', None),
    (b'{"MESSAGE": "x"}{"MESSAGE": "y"}', None),
    (b'{"MESSAGE": "x"}\x0b', None),  # not JSON white space
    (b'\xef\xbb\xbf{"MESSAGE": "x"}', None),
    (b'["MESSAGE"]', None), (b'"MESSAGE"', None), (b"", None),
    (b"[" * 100000, None), (b'{"MESSAGE": ', None),
])
def test_a_line_is_one_json_object_or_nothing(line, expected):
    assert pamsignal.decode_line(line) == expected


def test_scan_of_something_that_is_not_an_export_fails_clearly(
        tmp_path, capsys):
    code, out = scan(tmp_path, [], raw_lines=[
        "Nov 27 sshd[1]: Failed password for bob\n"])
    assert code == 1 and out == ""
    assert "export them with `journalctl -o json`" in capsys.readouterr().err


def test_scan_of_missing_file_is_a_plain_error(tmp_path, capsys):
    code = pamsignal.main(["scan", str(tmp_path / "nope.json")],
                          stdout=io.StringIO())
    assert code == 1
    assert "cannot read" in capsys.readouterr().err


class ChunkCounter(io.BytesIO):
    """An export that remembers the longest piece anyone read of it."""

    longest = 0

    def _seen(self, data):
        self.longest = max(self.longest, len(data))
        return data

    def readline(self, size=-1):
        return self._seen(io.BytesIO.readline(self, size))

    def read(self, size=-1):
        return self._seen(io.BytesIO.read(self, size))

    def __next__(self):
        return self._seen(io.BytesIO.__next__(self))


def test_an_over_long_export_line_is_skipped_without_being_held():
    cap = pamsignal.MAX_LINE_BYTES
    stream = ChunkCounter(b"one\n" + b"x" * (3 * cap) + b"\n" +
                          b"y" * cap + b"\n" + b"z" * (cap + 1) + b"\n"
                          b"last")
    warnings = []
    lines = list(pamsignal.export_lines(
        stream, lambda level, text: warnings.append((level, text))))
    assert lines == [b"one\n", b"y" * cap + b"\n", b"last"]
    assert stream.longest <= cap + 1
    assert warnings == [("warning", "skipped a line longer than %d bytes "
                         "(%d so far)" % (cap, count)) for count in (1, 2)]


def test_scan_skips_an_over_long_line_and_reads_on(tmp_path, capsys):
    """The live source's cap holds for an export: the events on either
    side, a warning, and the long line never in memory whole."""
    good = sequence(("sshd", "Failed password for bob from 203.0.113.5 "
                     "port 9 ssh2"), ("sshd", "Failed password for carol "
                                      "from 203.0.113.6 port 9 ssh2"))
    long_entry = dict(good[0], MESSAGE="Failed password for " + "A" * (
        5 * pamsignal.MAX_LINE_BYTES) + " from 203.0.113.7 port 9 ssh2")
    export = tmp_path / "export.json"
    export.write_text("".join(json.dumps(entry) + "\n" for entry in (
        good[0], long_entry, good[1])))
    del long_entry
    out = io.StringIO()
    tracemalloc.start()
    try:
        code = pamsignal.main(["scan", "--json", str(export)], stdout=out)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 3 * pamsignal.MAX_LINE_BYTES, peak
    assert code == 0
    assert [event["user"]["name"] for event in
            map(json.loads, out.getvalue().splitlines())] == ["bob", "carol"]
    assert "skipped a line longer than" in capsys.readouterr().err


def test_sudo_attempt_ledger_survives_a_restart():
    fail = pamsignal.parse_entry(make_entry(*SUDO_FAIL, sequence=1))
    total = pamsignal.parse_entry(make_entry(*sudo_total(3), sequence=2))
    before = pamsignal.SudoAttempts()
    assert before.observe(fail) is fail
    after = pamsignal.SudoAttempts()
    after.load_state(json.loads(json.dumps(before.to_state())) +
                     [["x", "1"], "junk", ["y", True]])
    assert after.observe(total).attempts == 2
    assert after.reported == {}
