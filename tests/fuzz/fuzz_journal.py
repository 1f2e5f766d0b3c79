"""Fuzz target: a journal line through decoding, parse_entry, the
detectors and every renderer.

An input is either a raw `journalctl -o json` line (first byte even), or,
so that the fuzzer spends its time on the message grammar rather than on
JSON syntax, a compact entry (first byte odd): byte 1 picks the
SYSLOG_IDENTIFIER, byte 2 the writer (genuine, forged, ...), the rest is
MESSAGE. A line must decode to an entry or None; an entry must parse to
None or an event that obeys the contract and renders everywhere.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

pamsignal = harness.pamsignal

FIXTURES = os.path.join(harness.TESTS, "fixtures", "messages.json")

#: Identifiers a compact input can claim: the watched ones and a stranger.
IDENTIFIERS = sorted(pamsignal.WATCHED_SERVICES) + ["cron"]

#: Writers a compact input can have: (_UID, _EXE, _COMM, _TRANSPORT);
#: a program named "%s" is the identifier's own.
WRITERS = [
    ("0", "/usr/sbin/%s", "%s", "syslog"),
    ("0", "/usr/bin/%s", "%s", "journal"),
    ("1000", "/usr/bin/%s", "%s", "syslog"),  # the caller of setuid sudo
    ("0", None, "%s", "syslog"),  # the writer exited before journald looked
    ("1000", None, "%s", "syslog"),
    ("0", "/usr/sbin/%s (deleted)", "%s", "stdout"),
    ("65534", "/usr/bin/logger", "logger", "syslog"),
    ("0", "/tmp/%s", "%s", "syslog"),
    ("0", "/usr/sbin/%s", "%s", "kernel"),
]

#: The program of each identifier, as its binary is named.
PROGRAMS = {"sshd-session": "sshd-session", "sshd-auth": "sshd-auth",
            "systemd-logind": "systemd-logind"}


def compact_entry(data):
    identifier = IDENTIFIERS[data[1] % len(IDENTIFIERS)] if len(data) > 1 \
        else "sshd"
    uid, exe, comm, transport = WRITERS[data[2] % len(WRITERS)] \
        if len(data) > 2 else WRITERS[0]
    program = PROGRAMS.get(identifier, identifier)
    entry = {"SYSLOG_IDENTIFIER": identifier,
             "MESSAGE": data[3:].decode("utf-8", "replace"),
             "_UID": uid, "_COMM": comm % program if "%s" in comm else comm,
             "_PID": "4242", "_TRANSPORT": transport, "_HOSTNAME": "web1",
             "_BOOT_ID": "b0", "__CURSOR": "s=1;i=2",
             "__REALTIME_TIMESTAMP": "1795780000123456"}
    if exe is not None:
        entry["_EXE"] = exe % program if "%s" in exe else exe
    return entry


def entries_of(data):
    """The journal entry an input stands for, or None for a line that is
    no journal object."""
    if not data:
        return None
    if data[0] % 2:
        return compact_entry(data)
    return PIPELINE.decode(data[1:])


#: Thresholds of one, so that every failure reaches the detectors' rules.
HAIR_TRIGGER = pamsignal.default_config().detection._replace(
    brute_force_fast=pamsignal.Threshold(1, 600),
    brute_force_slow=pamsignal.Threshold(1, 600),
    user_enumeration=pamsignal.Threshold(1, 600),
    distributed_attack=pamsignal.Threshold(1, 600),
    success_after_failures=pamsignal.Threshold(1, 600), learning_period=0)

PIPELINE = pamsignal.Pipeline([], HAIR_TRIGGER)


def check(data):
    entry = entries_of(data)
    if entry is None:
        return
    assert isinstance(entry, dict)
    event = pamsignal.parse_entry(entry)
    if event is None:
        return
    assert event.action in pamsignal.PARSED_ACTIONS, event.action
    harness.render_everywhere(event)
    # Twice through fresh detectors: pairs, totals and thresholds fire.
    sessions = pamsignal.SessionTracker()
    sudo = pamsignal.SudoAttempts()
    detector = pamsignal.FailureDetector(HAIR_TRIGGER)
    baseline = pamsignal.Baseline(0)
    for _ in range(2):
        seen = sudo.observe(sessions.observe(event))
        if seen is None:
            continue
        for found in detector.observe(seen) + baseline.observe(seen):
            # Its fields come from the event just rendered everywhere.
            harness.render_everywhere(found, sinks=harness.SOME_SINKS)
    json.dumps([sessions.to_state(), sudo.to_state(), detector.to_state(),
                baseline.to_state()], allow_nan=False)


def seeds():
    """Every fixture entry, as a raw line and as a compact entry."""
    with open(FIXTURES, encoding="utf-8") as f:
        fixtures = json.load(f)
    found = []
    for fixture in fixtures:
        entry = dict(fixture["entry"])
        entry.setdefault("__REALTIME_TIMESTAMP", "1795780000123456")
        found.append(b"\0" + json.dumps(entry).encode("utf-8"))
        identifier = entry.get("SYSLOG_IDENTIFIER")
        message = entry.get("MESSAGE")
        if identifier in IDENTIFIERS and isinstance(message, str):
            found.append(bytes([1, IDENTIFIERS.index(identifier), 0]) +
                         message.encode("utf-8"))
    return found


def dictionary():
    """The words of the fixture messages, and JSON and field names."""
    with open(FIXTURES, encoding="utf-8") as f:
        fixtures = json.load(f)
    words = set(['":"', '", "', '": [', "\\u00", "\\ud800", "\\n", " from ",
                 " port ", " for ", " ssh2", "[preauth]", "::ffff:", "%eth0"])
    for fixture in fixtures:
        words.update(fixture["entry"])
        message = fixture["entry"].get("MESSAGE")
        if isinstance(message, str):
            words.update(word for word in message.split() if len(word) > 1)
    return sorted(words)


if __name__ == "__main__":
    harness.fuzz(check, seeds, dictionary())
