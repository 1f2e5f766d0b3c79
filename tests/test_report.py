"""`pamsignal report`: sessions, failures, detections and sudo/su over a
range, from an export or the real journal, as text and as JSON; the same
Pipeline as `run`, so a report agrees with what `scan` prints."""
import calendar
import json
import os
import re
import subprocess
import sys
import time

import pytest

import realsys
from support import (PAMSIGNAL, REPO, json_line, make_entry, pamsignal,
                     write_config)

#: The story's first second (seconds since the epoch, 2026-11-27 ~01:46).
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
    in with a key for an hour, uses sudo and su; bob's password is guessed
    from 198.51.100.9 until it works, and his session is cut by a reboot;
    someone forges a root login; after the reboot dave stays logged in."""
    lines = [entry(5, "sshd", closed("carol"), 50)]
    lines += [entry(10, "sshd", "Accepted publickey for alice from "
                    "203.0.113.5 port 4000 ssh2: ED25519 SHA256:abcdef", 100),
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
    write_config(directory / "pamsignal.conf", "")
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
    result = subprocess.run(
        [sys.executable, PAMSIGNAL, "--config", config or os.path.join(
            os.path.dirname(argv[-1]), "pamsignal.conf")] + list(argv), input=stdin, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, env=environment,
        timeout=120)
    return result


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
         "source": "203.0.113.5", "source_port": 4000,
         "method": "publickey", "key": "ED25519 SHA256:abcdef",
         "start": at(11), "end": at(3611), "duration_s": 3600.0,
         "state": "closed"},
        {"user": "bob", "service": "sshd", "hostname": "web1",
         "source": "198.51.100.9", "source_port": 5100, "method": "password",
         "start": at(201), "state": "ended_by_reboot"},
        {"user": "alice", "target_user": "root", "service": "su",
         "hostname": "web1", "start": at(400), "end": at(460),
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
         "last": at(105), "reasons": {"bad_password": 6}, "users": ["bob"],
         "users_more": 0},
        {"source": "192.0.2.7", "count": 1, "first": at(110),
         "last": at(110), "reasons": {"invalid_user": 1},
         "users": ["admin"], "users_more": 0}]
    assert failures["by_account"][0] == {
        "user": "bob", "count": 6, "first": at(100), "last": at(105),
        "reasons": {"bad_password": 6}, "sources": ["198.51.100.9"],
        "sources_more": 0}
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
    document = report_json("--source", "203.0.113.5", export)
    assert [(s["user"], s["source"]) for s in document["sessions"]] == [
        ("alice", "203.0.113.5")]
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
