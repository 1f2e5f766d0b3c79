"""`pamsignal report`: sessions, failures, detections and sudo/su over a
range, from an export or the real journal, as text and as JSON; the same
Pipeline as `run`, so a report agrees with what `scan` prints."""
import calendar
import io
import json
import os
import re
import subprocess
import sys
import time

import pytest

import realsys
from test_enrich import ASN_NETWORKS, COUNTRY_NETWORKS, write_database
from support import (PAMSIGNAL, REPO, FakeJournal, json_line, make_entry,
                     pamsignal, write_config)

#: The story's start (seconds since the epoch: 2026-11-27 11:46:40 UTC).
T0 = 1795780000
BOOT_1, BOOT_2 = "b00700000000000000000000000000b1", \
    "b00700000000000000000000000000b2"


def entry(at_s, identifier, message, pid, boot=BOOT_1, **overrides):
    """One entry `at_s` seconds into the story."""
    return make_entry(identifier, message, sequence=at_s,
                      _PID=str(pid), _BOOT_ID=boot, **overrides)


def opened(user, service="sshd", by="(uid=0)"):
    return "pam_unix(%s:session): session opened for user %s(uid=1000) " \
        "by %s" % (service, user, by)


def closed(user, service="sshd"):
    return "pam_unix(%s:session): session closed for user %s" % (service,
                                                                  user)


def story():
    """A day on web1: carol's session began before the export; alice logs
    in with a key from Viet Nam for an hour, uses sudo and su; bob's
    password is guessed from 198.51.100.9 until it works, and his session
    is cut by a reboot; someone forges a root login; after the reboot dave
    stays logged in."""
    lines = [entry(5, "sshd", closed("carol"), 50)]
    lines += [entry(10, "sshd", "Accepted publickey for alice from "
                    "31.13.70.5 port 4000 ssh2: ED25519 SHA256:abcdef", 100),
              entry(11, "sshd", opened("alice"), 100)]
    for attempt in range(6):
        lines.append(entry(100 + attempt, "sshd", "Failed password for bob "
                           "from 198.51.100.9 port %d ssh2" % (5000 + attempt),
                           200 + attempt))
    lines.append(entry(110, "sshd", "Failed password for invalid user admin "
                       "from 192.0.2.7 port 6000 ssh2", 300))
    lines += [entry(200, "sshd", "Accepted password for bob from "
                    "198.51.100.9 port 5100 ssh2", 400),
              entry(201, "sshd", opened("bob"), 400)]
    lines += [entry(300, "sudo", "   alice : TTY=pts/0 ; PWD=/home/alice ; "
                    "USER=root ; COMMAND=/usr/bin/systemctl restart nginx",
                    500),
              entry(301, "sudo", opened("root", "sudo", "alice(uid=1000)"),
                    500),
              entry(302, "sudo", closed("root", "sudo"), 500),
              entry(399, "su", "(to root) alice on pts/0", 600),
              entry(400, "su", opened("root", "su", "alice(uid=1000)"), 600),
              entry(460, "su", closed("root", "su"), 600),
              entry(500, "sshd", "Accepted password for root from 6.6.6.6 "
                    "port 1 ssh2", 700, _UID="65534", _COMM="logger",
                    _EXE="/usr/bin/logger"),
              entry(3611, "sshd", closed("alice"), 100),
              entry(7200, "sshd", "Accepted password for dave from "
                    "203.0.113.80 port 7000 ssh2", 800, boot=BOOT_2),
              entry(7201, "sshd", opened("dave"), 800, boot=BOOT_2)]
    return lines


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    asn = write_database(directory / "asn.mmdb", ASN_NETWORKS,
                         database_type="GeoLite2-ASN")
    country = write_database(directory / "country.mmdb", COUNTRY_NETWORKS,
                             database_type="GeoLite2-Country")
    write_config(directory / "pamsignal.conf", "[geoip]\nasn_db = %s\n"
                 "country_db = %s\n" % (asn, country))
    return directory


@pytest.fixture(scope="module")
def export(workdir):
    path = workdir / "story.json"
    path.write_text("".join(json_line(line) for line in story()))
    return str(path)


def run_cli(*argv, columns=None, stdin=None, env=None, config=None):
    environment = dict(os.environ, TZ="UTC", **(env or {}))
    environment.pop("NO_COLOR", None)
    if columns is not None:
        environment["COLUMNS"] = str(columns)
    # The config beside the export, unless told.
    config = config or os.path.join(os.path.dirname(argv[-1]),
                                    "pamsignal.conf")
    return subprocess.run(
        [sys.executable, PAMSIGNAL, "--config", config] + list(argv),
        input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, env=environment, timeout=120)


def report_json(*argv):
    result = run_cli("report", "--json", *argv)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def at(seconds):
    return pamsignal.format_timestamp((T0 + seconds) * 1000000)


# ------------------------------------------------------------ the sessions

def test_every_session_field_by_field(export):
    sessions = report_json(export)["sessions"]
    assert sessions == [
        {"user": "carol", "service": "sshd", "hostname": "web1",
         "started_before_range": True, "end": at(5), "state": "closed"},
        {"user": "alice", "service": "sshd", "hostname": "web1",
         "source": "31.13.70.5", "source_port": 4000, "as_number": 64500,
         "as_org": "Viettel Home", "country": "VN",
         "method": "publickey", "key": "ED25519 SHA256:abcdef",
         "start": at(11), "end": at(3611), "duration_s": 3600.0,
         "state": "closed"},
        {"user": "bob", "service": "sshd", "hostname": "web1",
         "source": "198.51.100.9", "source_port": 5100, "method": "password",
         "start": at(201), "state": "ended_by_reboot"},
        {"user": "alice", "target_user": "root", "service": "su",
         "tty": "pts/0", "hostname": "web1", "start": at(400), "end": at(460),
         "duration_s": 60.0, "state": "closed"},
        {"user": "dave", "service": "sshd", "hostname": "web1",
         "source": "203.0.113.80", "source_port": 7000, "method": "password",
         "start": at(7201), "state": "open"}]


def test_failures_detections_and_privilege_use(export):
    document = report_json(export)
    failures = document["failures"]
    assert failures["total"] == 7
    assert failures["by_source"] == [
        {"source": "198.51.100.9", "count": 6, "first": at(100),
         "last": at(105), "reasons": {"bad_password": 6},
         "detected": ["brute_force_detected", "success_after_failures"],
         "users": ["bob"], "users_more": 0},
        {"source": "192.0.2.7", "count": 1, "first": at(110),
         "last": at(110), "reasons": {"invalid_user": 1}, "detected": [],
         "users": ["admin"], "users_more": 0}]
    assert failures["by_account"][0] == {
        "user": "bob", "count": 6, "first": at(100), "last": at(105),
        "reasons": {"bad_password": 6},
        "detected": ["success_after_failures"],
        "sources": ["198.51.100.9"], "sources_more": 0}
    assert failures["per_hour"] == [
        {"hour": pamsignal.format_timestamp((T0 + 100) // 3600 * 3600
                                            * 1000000), "count": 7}]
    actions = [(d["event"]["action"], d["@timestamp"])
               for d in document["detections"]]
    assert actions == [("brute_force_detected", at(104)),
                       ("success_after_failures", at(200)),
                       ("spoofed_entry", at(500))]
    assert document["detections"][2]["pamsignal"]["writer_uid"] == 65534
    assert document["privileged"] == [
        {"user": "alice", "sudo": 1, "su": 1, "targets": ["root"],
         "first": at(300), "last": at(400),
         "commands": [{"command": "/usr/bin/systemctl restart nginx",
                       "count": 1}], "commands_more": 0}]
    assert document["report"]["entries"] == len(story())
    assert (document["sessions_more"], document["detections_more"],
            document["privileged_more"]) == (0, 0, 0)


def test_report_agrees_with_scan_on_the_same_export(export):
    """scan prints the events the Pipeline gives; the report is built from
    the same events, so every count and pairing matches."""
    scanned = run_cli("scan", "--json", export)
    assert scanned.returncode == 0, scanned.stderr
    events = [json.loads(line) for line in scanned.stdout.splitlines()]
    document = report_json(export)
    by_action = {}
    for event in events:
        by_action.setdefault(event["event"]["action"], []).append(event)
    assert document["failures"]["total"] == len(by_action["login_failure"])
    assert sorted(d["@timestamp"] for d in document["detections"]) == sorted(
        e["@timestamp"] for e in events
        if e["event"]["action"] in pamsignal.REPORT_DETECTIONS)
    closed = sorted((e["user"]["name"], e["pamsignal"]["session_duration_s"])
                    for e in by_action["session_closed"]
                    if e["service"]["name"] == "sshd"
                    and "session_duration_s" in e.get("pamsignal", {}))
    assert closed == sorted((s["user"], s["duration_s"])
                            for s in document["sessions"]
                            if s["service"] == "sshd" and "duration_s" in s)
    assert document["privileged"][0]["sudo"] == len(by_action["sudo_command"])


def test_standard_input_gives_the_same_report(export, workdir):
    with open(export) as handle:
        result = run_cli("report", "--json", "-", stdin=handle.read(),
                         config=str(workdir / "pamsignal.conf"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == report_json(export)


def test_an_over_long_line_on_standard_input_is_skipped(export, workdir):
    """The cap of the live source: the line past it is left out with a
    warning and the report reads on (the same reader as scan)."""
    lines = story()
    huge = dict(lines[3], MESSAGE="Failed password for bob from "
                "198.51.100.9 port 1 ssh2" + " " * (
                    pamsignal.MAX_LINE_BYTES + 1))
    text = "".join(json_line(line) for line in lines[:3] + [huge] +
                   lines[3:])
    result = run_cli("report", "--json", "-", stdin=text,
                     config=str(workdir / "pamsignal.conf"))
    assert result.returncode == 0, result.stderr
    assert "skipped a line longer than %d bytes" % \
        pamsignal.MAX_LINE_BYTES in result.stderr
    assert json.loads(result.stdout) == report_json(export)


# ------------------------------------------------------------ the range

def test_since_makes_an_earlier_open_a_session_before_the_range(export):
    document = report_json("--since", "@%d" % (T0 + 50), export)
    alice = [s for s in document["sessions"] if s["user"] == "alice"
             and s["service"] == "sshd"]
    # The open (and the login with its key) lie before --since.
    assert alice == [{"user": "alice", "service": "sshd", "hostname": "web1",
                      "started_before_range": True, "end": at(3611),
                      "state": "closed"}]
    assert document["report"]["since"] == at(50)
    assert "carol" not in [s["user"] for s in document["sessions"]]


def test_until_leaves_sessions_open_and_later_events_out(export):
    document = report_json("--until", "@%d" % (T0 + 250), export)
    states = {s["user"]: s["state"] for s in document["sessions"]}
    assert states == {"carol": "closed", "alice": "open", "bob": "open"}
    assert document["privileged"] == []
    assert [d["event"]["action"] for d in document["detections"]] == [
        "brute_force_detected", "success_after_failures"]


def test_user_keeps_only_what_concerns_that_account(export):
    document = report_json("--user", "bob", export)
    assert [s["user"] for s in document["sessions"]] == ["bob"]
    assert document["failures"]["total"] == 6
    assert [row["source"] for row in document["failures"]["by_source"]] \
        == ["198.51.100.9"]
    assert [d["event"]["action"] for d in document["detections"]] == [
        "brute_force_detected", "success_after_failures"]
    assert document["privileged"] == []
    assert document["report"]["user"] == "bob"


def test_source_keeps_only_what_came_from_that_address(export):
    document = report_json("--source", "31.13.70.5", export)
    assert [(s["user"], s["source"]) for s in document["sessions"]] == [
        ("alice", "31.13.70.5")]
    assert document["failures"]["total"] == 0
    assert document["detections"] == [] and document["privileged"] == []


def test_a_time_it_cannot_read_is_a_usage_error(export):
    result = run_cli("report", "--since", "last tuesday", export)
    assert result.returncode == 2
    assert "cannot read the time 'last tuesday'" in result.stderr


@pytest.mark.parametrize("text, expected", [
    ("now", T0), ("@1795700000", 1795700000), ("-2h", T0 - 7200),
    ("90m ago", T0 - 5400), ("today", 1795737600),
    ("yesterday", 1795651200), ("2026-11-27", 1795737600),
    ("2026-11-27 10:30", 1795737600 + 37800),
    ("2026-11-27T10:30:05", 1795737600 + 37805)])
def test_when_reads_like_journalctl(text, expected):
    assert pamsignal.parse_when(text, T0, time.gmtime, calendar.timegm) \
        == expected * 1000000


@pytest.mark.parametrize("text", ["2026-13-01", "-2w", "2h", "soon", ""])
def test_when_refuses_what_it_cannot_read(text):
    with pytest.raises(pamsignal.UsageError):
        pamsignal.parse_when(text, T0, time.gmtime, calendar.timegm)


@pytest.mark.parametrize("text, why", [
    ("1969-12-31", "lies outside"), ("0000-01-01", "lies outside"),
    ("-999999999d", "lies outside"), ("+999999999d", "lies outside"),
    ("999999999d ago", "lies outside"), ("@999999999999", "lies outside"),
    ("2025-02-31", "no such day"), ("2023-02-29", "no such day"),
    ("2026-04-31 10:00", "no such day")])
def test_when_refuses_a_time_journalctl_would_refuse(text, why):
    """No @-86400 for journalctl to reject, no 2025-02-31 read as 3 March:
    a usage error naming the option."""
    with pytest.raises(pamsignal.UsageError) as caught:
        pamsignal.parse_when(text, T0, time.gmtime, calendar.timegm,
                             option="--until")
    assert why in str(caught.value) and "--until" in str(caught.value)


@pytest.mark.parametrize("text, expected", [
    ("1970-01-01", 0), ("9999-12-31 23:59:59", 253402300799),
    ("2024-02-29", 1709164800), ("@0", 0)])
def test_when_takes_the_edges_of_what_a_journal_holds(text, expected):
    assert pamsignal.parse_when(text, T0, time.gmtime, calendar.timegm) \
        == expected * 1000000


def test_an_impossible_since_is_a_usage_error_before_journalctl(workdir):
    """Exit 2 with the option named; journalctl is never started."""
    (workdir / "never").mkdir()
    fake = FakeJournal(workdir / "never", {"once": [{"output": []}]})
    config = write_config(workdir / "never.conf", "[pamsignal]\n"
                          "journalctl = %s\n" % fake.program)
    for option in ("--since=1969-12-31", "--until=2025-02-31"):
        result = run_cli("report", option, config=config,
                         env={"FAKE_PLAN": fake.plan_path})
        assert (result.returncode, result.stdout) == (2, ""), result.stderr
        assert option.split("=")[0] + " " in result.stderr
        assert "journalctl failed" not in result.stderr
    assert fake.calls() == []


# ------------------------------------------------------------ the output

def documented_keys():
    """The keys of the README's table of the JSON document."""
    with open(os.path.join(REPO, "README.md")) as handle:
        readme = handle.read()
    part = readme.split("### The JSON document", 1)[1].split("\n#", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", part, re.M))


#: Keys whose values are documented whole, not key by key.
WHOLE_VALUES = ("detections[]", "reasons")


def printed_keys(value, path=""):
    if isinstance(value, list):
        if path + "[]" in WHOLE_VALUES:
            return {path + "[]"} if value else set()
        if value and isinstance(value[0], dict):
            return set().union(*(printed_keys(item, path + "[]")
                                 for item in value))
        return {path} if value else set()
    if isinstance(value, dict) and path.rsplit(".", 1)[-1] \
            not in WHOLE_VALUES:
        return set().union(*(printed_keys(item, (path + "." if path else "")
                                          + key)
                             for key, item in value.items()))
    return {path}


def test_json_matches_its_documentation(export):
    documents = [report_json(export),
                 report_json("--since", "@%d" % T0, "--until",
                             "@%d" % (T0 + 9999), "--user", "alice",
                             "--source", "31.13.70.5", export)]
    printed = set().union(*(printed_keys(document)
                            for document in documents))
    assert printed == documented_keys()
    # A detection is the event contract itself, as scan prints it.
    assert documents[0]["detections"][0]["event"]["category"] == [
        "intrusion_detection"]


@pytest.mark.parametrize("columns", [60, 100, 200])
def test_text_fits_the_terminal_width(export, columns):
    result = run_cli("report", export, columns=columns)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert "\x1b" not in result.stdout  # no colour on a pipe
    text = result.stdout
    for heading in ("Sessions (5)", "Failures (7)", "Detections (3)",
                    "sudo and su, by user (1)", "Failures per hour"):
        assert heading in lines
    header = next(line for line in lines if line.startswith("USER "))
    rows = lines[lines.index(header) + 1:lines.index(header) + 6]
    # The columns line up: each row's FROM starts under the header's.
    column = header.index("FROM")
    assert [row[column:].split(" ")[0] for row in rows][1:4] == (
        ["31.13.70.5", "198.51.100.9", "pts/0"] if columns >= 100 else
        ["31.13…", "198.5…", "pts/0"])
    assert ("reboot/crash" in text and "still open" in text
            and "before range" in text) == (columns >= 100)
    if columns == 200:
        assert "publickey ED25519 SHA256:abcdef" in text
        assert "AS64500 Viettel Home" in text
        assert "2026-11-27 11:46" in rows[1]  # the year on a wide one
    else:
        assert "…" in text


def test_the_chart_draws_failures_per_hour():
    hour = 3600 * 1000000
    per_hour = [{"hour": pamsignal.format_timestamp(T0 // 3600 * hour),
                 "count": 10},
                {"hour": pamsignal.format_timestamp((T0 // 3600 + 2) * hour),
                 "count": 5}]
    lines = pamsignal.failures_chart(per_hour, 80)
    assert [line.split("  ", 1)[1] if "  " in line else line
            for line in lines] == ["Failures per hour", "#" * 50 + " 10",
                                   "0", "#" * 25 + " 5"]


def test_counters_stay_bounded_and_say_how_much_more():
    builder = pamsignal.ReportBuilder()
    limit = pamsignal.MAX_REPORT_KEYS
    for number in range(limit + 5):
        builder.add(pamsignal.Event(
            timestamp_us=number, action="login_failure", user="root",
            source_ip="10.%d.%d.1" % divmod(number, 256)))
    failures = builder.document()["failures"]
    assert len(failures["by_source"]) == limit
    assert failures["by_source_more"] == 5
    assert failures["total"] == limit + 5
    (root,) = failures["by_account"]
    assert (root["count"], len(root["sources"]), root["sources_more"]) == (
        limit + 5, pamsignal.MAX_REPORT_NAMES,
        limit + 5 - pamsignal.MAX_REPORT_NAMES)


def test_progress_shows_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    ticks = iter([0, 0.5, 2.0, 3.0])
    terminal = Terminal()
    progress = pamsignal.Progress(terminal, clock=lambda: next(ticks))
    progress.update(1024)
    progress.update(2048)
    progress.done()
    assert terminal.getvalue() == "\rread 2048 entries (1024/s)  \r\x1b[K"
    pipe = io.StringIO()
    silent = pamsignal.Progress(pipe, clock=lambda: 5.0)
    silent.update(1024)
    silent.done()
    assert pipe.getvalue() == ""


# ------------------------------------------------------------ the real journal

def test_report_over_the_real_journal_after_real_logins(sshd, make_user,
                                                        tmp_path):
    """Real sshd failures and a login from a loopback address of the
    test's own, real sudo and su, read back through journalctl; only the
    test's own users are reported, so other logins cannot disturb it."""
    user, password = make_user(groups=("sudo",))
    target, target_password = make_user()
    client = realsys.unique_loopback()
    since = int(time.time()) - 1
    cursor = realsys.journal_cursor()
    for _ in range(2):
        assert realsys.ssh_password(user, "wrong-" + password,
                                    source=client).returncode != 0
    assert realsys.ssh_password(user, password, source=client).returncode == 0
    marker = "report-%d" % os.getpid()
    assert realsys.sudo_as(user, password, ["echo", marker]).returncode == 0
    assert realsys.su_as(user, target_password, target)[0] == 0
    realsys.wait_for_journal(r"session closed for user %s\b" % user, cursor)
    realsys.wait_for_journal(r"su:session\): session closed for user %s\b"
                             % target, cursor)
    config = write_config(tmp_path / "pamsignal.conf", "")

    def report(*options):
        result = run_cli("report", "--json", "--since", "@%d" % since,
                         *options, config=config)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    document = report("--user", user)
    (login,) = [s for s in document["sessions"] if s["service"] == "sshd"]
    assert (login["user"], login["source"], login["method"],
            login["state"]) == (user, client, "password", "closed")
    assert login["duration_s"] >= 0 and login["start"] <= login["end"]
    (switch,) = [s for s in document["sessions"] if s["service"] == "su"]
    assert (switch["user"], switch["target_user"], switch["state"]) == (
        user, target, "closed")
    assert document["failures"]["total"] == 2
    assert [(row["source"], row["count"], row["users"]) for row in
            document["failures"]["by_source"]] == [(client, 2, [user])]
    (used,) = document["privileged"]
    assert (used["user"], used["sudo"], used["su"]) == (user, 1, 1)
    assert sorted(used["targets"]) == sorted(["root", target])
    assert [c["command"] for c in used["commands"]] == [
        "/usr/bin/echo " + marker]
    # From the test's address only: the login and its failures, no su.
    by_source = report("--source", client)
    assert [s["user"] for s in by_source["sessions"]] == [user]
    assert by_source["failures"]["total"] == 2
    assert by_source["privileged"] == []


# ------------------------------------------------------------ journalctl

def test_the_journal_is_read_over_the_range_with_runs_matches(workdir,
                                                              export):
    """Without FILE, journalctl is asked for the range (as @EPOCH) and the
    watched services only; what it gives makes the same report."""
    (workdir / "fake").mkdir()
    fake = FakeJournal(workdir / "fake", {"once": [{"output": [
        json_line(line) for line in story()]}]})
    config = write_config(workdir / "fake.conf", "[pamsignal]\njournalctl ="
                          " %s\n" % fake.program)
    range_options = ("--since", "@%d" % (T0 + 50),
                     "--until", "@%d" % (T0 + 5000))
    result = run_cli("report", "--json", *range_options, config=config,
                     env={"FAKE_PLAN": fake.plan_path})
    assert result.returncode == 0, result.stderr
    (call,) = fake.calls()
    assert call[:4] == ["--output=json", "--no-pager", "--all", "--quiet"]
    assert call[5:7] == ["--since=@%d" % (T0 + 50),
                         "--until=@%d" % (T0 + 5000)]
    assert call[7:] == pamsignal.journal_matches()
    assert json.loads(result.stdout) == report_json(*range_options + (
        export,))


def test_a_failing_journalctl_is_an_error_not_a_short_report(workdir):
    (workdir / "failing").mkdir()
    fake = FakeJournal(workdir / "failing", {"once": [{
        "output": [json_line(story()[1])], "exit": 1,
        "stderr": "Failed to open journal\n"}]})
    config = write_config(workdir / "failing.conf", "[pamsignal]\n"
                          "journalctl = %s\n" % fake.program)
    result = run_cli("report", config=config,
                     env={"FAKE_PLAN": fake.plan_path})
    assert (result.returncode, result.stdout) == (1, "")
    assert "Failed to open journal" in result.stderr
    assert "failed (exit 1); the report would be incomplete" in \
        result.stderr


def test_a_long_range_puts_several_hours_in_a_bar():
    hour = 3600 * 1000000
    per_hour = [{"hour": pamsignal.format_timestamp((T0 // 3600 + n) * hour),
                 "count": 1} for n in range(0, 100, 10)]
    lines = pamsignal.failures_chart(per_hour, 80)
    assert lines[0] == "Failures per 2 hours"  # 91 hours in 46 rows
    assert len(lines) - 1 == 46 <= pamsignal.CHART_ROWS
    assert sum(int(line.rsplit(" ", 1)[1]) for line in lines[1:]) == 10


def old_chart_rows(per_hour):
    """chart_rows as it was (walking every hour of the span): the oracle."""
    hours = {calendar.timegm(time.strptime(row["hour"][:19],
                                           "%Y-%m-%dT%H:%M:%S")) // 3600:
             row["count"] for row in per_hour}
    first, last = min(hours), max(hours)
    step = -(-(last - first + 1) // pamsignal.CHART_ROWS)
    return step, [(start, sum(hours.get(hour, 0)
                              for hour in range(start, start + step)))
                  for start in range(first, last + 1, step)]


def hourly(*hours_and_counts):
    return [{"hour": pamsignal.format_timestamp((T0 // 3600 + hour) *
                                                3600 * 1000000),
             "count": count} for hour, count in hours_and_counts]


@pytest.mark.parametrize("per_hour", [
    hourly((0, 3)), hourly((0, 10), (2, 5)),
    hourly(*((n, n + 1) for n in range(0, 100, 10))),
    hourly(*((n * 7, n % 4) for n in range(60))),
    hourly((0, 1), (47, 2)), hourly((0, 1), (48, 2)), hourly((0, 1), (49, 2)),
    hourly((-5000, 4), (0, 1), (24 * 365, 9))])
def test_the_chart_rows_are_those_of_the_hour_by_hour_walk(per_hour):
    assert pamsignal.chart_rows(per_hour) == old_chart_rows(per_hour)


def test_a_chart_over_eight_thousand_years_costs_its_rows_only():
    """A failure in 1970 and one in 9999 are 70 million hours apart: the
    chart's work follows its rows (counted as lines run, not timed)."""
    per_hour = [{"hour": pamsignal.format_timestamp(0), "count": 1},
                {"hour": pamsignal.format_timestamp(253402300000000000),
                 "count": 2}]
    budget = [1000]  # lines run in pamsignal.py (strptime's are not)

    def count_lines(frame, event, arg):
        if frame.f_code.co_filename != pamsignal.__file__:
            return None
        budget[0] -= 1
        if budget[0] < 0:
            raise RuntimeError("chart_rows walks the span")
        return count_lines

    sys.settrace(count_lines)
    try:
        step, rows = pamsignal.chart_rows(per_hour)
    finally:
        sys.settrace(None)
    assert len(rows) <= pamsignal.CHART_ROWS
    assert (rows[0], rows[-1][1], sum(count for _, count in rows)) == \
        ((0, 1), 2, 3)
    assert rows[-1][0] <= 253402300000 // 3600 < rows[-1][0] + step
    assert len(pamsignal.failures_chart(per_hour, 80)) == len(rows) + 1
    assert "<svg" in pamsignal.failures_svg(per_hour)


def test_attacker_text_cannot_reach_the_terminal_raw():
    builder = pamsignal.ReportBuilder()
    hostile = "root\x1b[2J\u202eevil"
    for action in ("login_failure", "sudo_command"):
        builder.add(pamsignal.Event(
            timestamp_us=T0 * 1000000, action=action, user=hostile,
            target_user="root", source_ip="192.0.2.1",
            command_line="/bin/sh -c '\x1b]0;owned\x07'"))
    text = "\n".join(pamsignal.render_report(builder.document(), 200))
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    assert "root\\x1b[2J\\u202eevil" in text


def test_a_relative_time_is_written_with_an_equals_sign(export):
    """`--since=-3650d`: argparse would take `-3650d` alone for an option."""
    document = report_json("--since=-3650d", export)
    assert len(document["sessions"]) == 5
    assert document["report"]["since"] < at(0)


def test_a_login_from_a_new_network_is_among_the_detections(workdir):
    """After the learning period, alice's first login from another network
    is a `new_source` detection in the report, as `run` alerts it."""
    directory = workdir / "baseline"
    directory.mkdir()
    config = write_config(directory / "pamsignal.conf",
                          "[detection]\nlearning_period = 1m\n")
    export = directory / "export.json"
    export.write_text("".join(json_line(line) for line in [
        entry(0, "sshd", "Accepted publickey for alice from 31.13.70.5 "
              "port 4000 ssh2: ED25519 SHA256:abcdef", 100),
        entry(600, "sshd", "Accepted publickey for alice from 31.13.70.6 "
              "port 4001 ssh2: ED25519 SHA256:abcdef", 101),
        entry(700, "sshd", "Accepted password for alice from 8.8.8.8 "
              "port 4002 ssh2", 102)]))
    result = run_cli("report", "--json", str(export), config=config)
    assert result.returncode == 0, result.stderr
    (detection,) = json.loads(result.stdout)["detections"]
    assert (detection["event"]["action"], detection["source"]["ip"],
            detection["pamsignal"]["network"]) == (
        "new_source", "8.8.8.8", "8.8.8.0/24")
