#!/usr/bin/env python3
"""Throughput of PAMSignal beside journalctl itself (a benchmark, not a test).

Writes N synthetic journal entries of a realistic mix into a real journal
file (systemd-journal-remote), then times:

  journalctl -o json            reading all entries (the agent's upstream)
  journalctl -o json + fields   the same with --output-fields and matches,
                                exactly as the agent runs it
  scan (in process)             decode + parse + sessions, one core
  scan (command)                `pamsignal.py scan --json FILE`, end to end
  run (command)                 `pamsignal.py run [--json]` fed by the real
                                journalctl over the journal file, with its
                                audit log (the default, kept in the bench's
                                directory) and without

and the peak memory of scan for N and 4N entries (flat memory means the
same peak). Usage: python3 bench/bench_pipeline.py [N]   (default 200000)
"""
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PAMSIGNAL = os.path.join(os.path.dirname(HERE), "pamsignal.py")
sys.path.insert(0, os.path.dirname(HERE))

import pamsignal  # noqa: E402
from needs import program  # noqa: E402

JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"

#: (weight, identifier, message template) of a server under SSH brute
#: force, line for line as OpenSSH 9 and sudo write it: each failed attempt
#: is a pam_unix line, sshd's "Failed" line and a disconnect; a few logins,
#: sessions and sudo; and the rest of the system (cron, kernel, units).
#: About a third of all entries become events.
MIX = (
    (20, "sshd", "pam_unix(sshd:auth): authentication failure; logname= "
     "uid=0 euid=0 tty=ssh ruser= rhost=203.0.113.%d  user=root%d"),
    (20, "sshd", "Failed password for root from 203.0.113.%d port %d ssh2"),
    (10, "sshd", "Connection closed by authenticating user root "
     "203.0.113.%d port %d [preauth]"),
    (10, "sshd", "Received disconnect from 203.0.113.%d port %d:11: Bye "
     "Bye [preauth]"),
    (5, "sshd", "Invalid user admin%d from 198.51.100.%d port 22"),
    (5, "sshd", "Failed password for invalid user admin%d from "
     "198.51.100.%d port 22 ssh2"),
    (5, "sshd", "pam_unix(sshd:auth): check pass; user unknown%d%d"),
    (2, "sshd", "Accepted publickey for alice from 192.0.2.%d port %d ssh2: "
     "ED25519 SHA256:Yx1c0FfZ4u3q0Wm1bqjz0Wj2n7I1s5r7m3x2kP4QvXw"),
    (2, "sshd", "pam_unix(sshd:session): session opened for user "
     "alice(uid=1000) by (uid=%d%d)"),
    (2, "sshd", "pam_unix(sshd:session): session closed for user alice%d%d"),
    (2, "sudo", "   alice : TTY=pts/%d ; PWD=/home/alice ; USER=root ; "
     "COMMAND=/usr/bin/systemctl restart app%d"),
    (2, "sudo", "pam_unix(sudo:session): session opened for user "
     "root(uid=0) by alice(uid=%d%d)"),
    (15, "CRON", "pam_unix(cron:session): session opened for user "
     "root(uid=0) by (uid=%d%d)"),
    (10, "kernel", "audit: type=1400 audit(%d.1:2): apparmor=\"DENIED\" "
     "operation=\"open\" pid=%d"),
    (10, "systemd", "Started session-%d.scope - Session %d of User alice."),
)


def synthetic_entries(count, seed=7):
    rng = random.Random(seed)
    weights = [w for w, _, _ in MIX]
    start_us = 1795780000000000
    for number in range(count):
        _, identifier, template = rng.choices(MIX, weights)[0]
        message = template % (rng.randrange(1, 250), rng.randrange(1024,
                                                                   65535))
        yield {
            "__REALTIME_TIMESTAMP": str(start_us + number * 1000),
            "__MONOTONIC_TIMESTAMP": str(number * 1000),
            "_BOOT_ID": "0f6c6b5d6a2a4f35a1e1b1d9c3b0f6e1",
            "_MACHINE_ID": "5f2b6a3c9d8e4f7a8b1c2d3e4f5a6b7c",
            "_HOSTNAME": "web1", "PRIORITY": "6", "SYSLOG_FACILITY": "4",
            "SYSLOG_IDENTIFIER": identifier, "SYSLOG_PID": "4242",
            "MESSAGE": message, "_PID": "4242",
            "_UID": "1000" if identifier == "sudo" else "0",
            "_GID": "0", "_COMM": identifier.lower(),
            "_EXE": "/usr/sbin/" + identifier.lower(),
            "_CMDLINE": "sshd: root [priv]", "_TRANSPORT": "syslog",
            "_CAP_EFFECTIVE": "1ffffffffff",
            "_SYSTEMD_CGROUP": "/system.slice/ssh.service",
            "_SYSTEMD_UNIT": "ssh.service",
            "_SYSTEMD_SLICE": "system.slice",
            "_SOURCE_REALTIME_TIMESTAMP": str(start_us + number * 1000 - 7),
        }


def write_journal(directory, count):
    """Export format -> systemd-journal-remote -> a real .journal file."""
    export = os.path.join(directory, "entries.export")
    with open(export, "w") as handle:
        for entry in synthetic_entries(count):
            for key, value in entry.items():
                handle.write("%s=%s\n" % (key, value))
            handle.write("\n")
    # journal-remote rotates large outputs: keep them all in one directory.
    journal_dir = os.path.join(directory, "journal")
    os.mkdir(journal_dir)
    subprocess.run([JOURNAL_REMOTE, "--output=" + os.path.join(
        journal_dir, "bench.journal"), export], check=True,
        stderr=subprocess.DEVNULL)
    return journal_dir


def timed(command, stdout):
    started = time.perf_counter()
    subprocess.run(command, stdout=stdout, check=True)
    return time.perf_counter() - started


# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent
# across fork and exec, so the benchmark's own size would show up.
_MEASURE_SCAN = (
    "import sys; sys.path.insert(0, sys.argv[1]); import pamsignal; "
    "pamsignal.main(['scan', '--json', sys.argv[2]], open('/dev/null', 'w'));"
    " print([l.split()[1] for l in open('/proc/self/status') "
    "if l.startswith('VmHWM:')][0])")


def scan_peak_rss_mib(export):
    """Peak resident memory of `scan` over an export, in MiB."""
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_SCAN, os.path.dirname(HERE), export],
        stdout=subprocess.PIPE, check=True)
    return int(result.stdout) / 1024.0


def run_command_seconds(directory, journal, last_cursor, *flags, audit=True):
    """`pamsignal run` with the real journalctl reading the journal file,
    keeping its audit log (as by default) in the bench's directory, or
    none."""
    wrapper = os.path.join(directory, "journalctl-file")
    with open(wrapper, "w") as handle:
        handle.write("#!/bin/sh\n# journalctl over the bench file; no "
                     "follow, so it ends when the file is read\n"
                     "for a; do shift; [ \"$a\" = --follow ] || set -- "
                     "\"$@\" \"$a\"; done\nexec journalctl --directory=%s "
                     "\"$@\"\n" % journal)
    os.chmod(wrapper, 0o755)
    config = os.path.join(directory, "run.conf")
    name = "".join(flags) + ("" if audit else "-no-audit")
    state = os.path.join(directory, "state" + name)
    with open(config, "w") as handle:
        handle.write("[pamsignal]\nstate_dir = %s\nlog_dir = %s\n"
                     "journalctl = %s\nfirst_start = all\n[audit]\n"
                     "enabled = %s\n" % (state, os.path.join(
                         directory, "log" + name), wrapper,
                         "yes" if audit else "no"))
    started = time.perf_counter()
    with open(os.devnull, "w") as sink:
        agent = subprocess.Popen([sys.executable, PAMSIGNAL, "--config",
                                  config, "run"] + list(flags), stdout=sink,
                                 stderr=subprocess.DEVNULL)
    state_file = os.path.join(state, "state.json")
    try:
        while True:
            try:
                with open(state_file) as handle:
                    if json.load(handle).get("cursor") == last_cursor:
                        break
            except (OSError, ValueError):
                pass
            if agent.poll() is not None:
                raise RuntimeError("agent exited early")
            if time.perf_counter() - started > 600:
                raise RuntimeError("agent did not reach the last entry")
            time.sleep(0.02)
        return time.perf_counter() - started
    finally:
        agent.terminate()
        agent.wait()


def in_process_rate(lines, module=pamsignal):
    """Entries/s of a fresh Pipeline of `module` (pamsignal, or another
    version of it: bench_compare.py) over the lines, and its events."""
    pipeline = module.Pipeline([], module.default_config().detection)
    started = time.perf_counter()
    for line in lines:
        entry = pipeline.decode(line)
        if entry is not None:
            pipeline.process_entry(entry)
    return len(lines) / (time.perf_counter() - started), pipeline.events


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    program("journalctl", "systemd")
    program(JOURNAL_REMOTE, "systemd-journal-remote")
    directory = tempfile.mkdtemp(prefix="pamsignal-bench-")
    try:
        journal = write_journal(directory, count)
        export = os.path.join(directory, "export.json")
        fields = "--output-fields=" + ",".join(pamsignal.JOURNAL_FIELDS)
        with open(export, "w") as handle:
            plain = timed(["journalctl", "--directory=" + journal, "-o",
                           "json", "--no-pager"], handle)
        with open(os.devnull, "w") as sink:
            trimmed = timed(["journalctl", "--directory=" + journal, "-o",
                             "json", "--no-pager", "--all", fields]
                            + pamsignal.journal_matches(), sink)
        with open(export, "rb") as handle:
            lines = handle.readlines()
        if len(lines) != count:
            raise RuntimeError("journal holds %d of %d entries"
                               % (len(lines), count))
        # The agent asks journalctl only for the watched services.
        last_cursor = next(
            entry["__CURSOR"] for entry in map(json.loads, reversed(lines))
            if entry.get("SYSLOG_IDENTIFIER") in pamsignal.WATCHED_SERVICES)
        with open(os.devnull, "w") as sink:
            scan_seconds = timed([sys.executable, PAMSIGNAL, "scan", "--json",
                                  export], sink)
        rate, events = in_process_rate(lines)
        run_seconds = run_command_seconds(directory, journal, last_cursor,
                                          "--json")
        run_text_seconds = run_command_seconds(directory, journal,
                                               last_cursor)
        run_bare_seconds = run_command_seconds(directory, journal,
                                               last_cursor, "--json",
                                               audit=False)
        big = os.path.join(directory, "export4.json")
        with open(big, "wb") as handle:
            for _ in range(4):
                handle.writelines(lines)
        rss_small = scan_peak_rss_mib(export)
        rss_big = scan_peak_rss_mib(big)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("entries: %d (%d events), Python %s" % (
        count, events, sys.version.split()[0]))
    print("%-44s %10.0f entries/s" % ("journalctl -o json (all fields)",
                                       count / plain))
    print("%-44s %10.0f entries/s" % (
        "journalctl as the agent runs it (fields+match)", count / trimmed))
    print("%-44s %10.0f entries/s" % ("scan, in process (one core)", rate))
    print("%-44s %10.0f entries/s" % ("pamsignal.py scan --json FILE",
                                       count / scan_seconds))
    print("%-44s %10.0f entries/s" % ("pamsignal.py run --json (+journalctl)",
                                       count / run_seconds))
    print("%-44s %10.0f entries/s" % ("pamsignal.py run, text (+journalctl)",
                                       count / run_text_seconds))
    print("%-44s %10.0f entries/s" % ("pamsignal.py run --json, no audit log",
                                       count / run_bare_seconds))
    print("%-44s %7.1f MiB / %.1f MiB" % (
        "scan peak RSS, N / 4N entries", rss_small, rss_big))


if __name__ == "__main__":
    main()
