"""`pamsignal report`: sessions, failures, detections and sudo/su over a
range, from an export or the real journal, as text and as JSON; the same
Pipeline as `run`, so a report agrees with what `scan` prints."""
import json
import os
import re
import subprocess
import sys

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
