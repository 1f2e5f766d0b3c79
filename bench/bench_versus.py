#!/usr/bin/env python3
"""PAMSignal beside fail2ban and sshguard on the same sshd lines (a
benchmark, not a test).

Builds the same lines twice, as a `journalctl -o json` export (with the
trusted fields journald adds) and as syslog text, then runs each tool on
its own form of them, in alternating rounds:

  pamsignal.py scan --json EXPORT     every event printed as JSON
  pamsignal.py scan EXPORT            every event printed as text
  fail2ban-regex SYSLOG sshd.conf     Debian's fail2ban, its sshd filter
  sshg-parser < SYSLOG                Debian's sshguard, its parser (C)
  json.loads of every export line     what decoding alone costs

and prints lines/s (median of the rounds), peak RSS of each and
PAMSignal's ratio to each, for two mixes: the README mix (half `Failed
password for invalid user`, a quarter `Accepted publickey`, a quarter
`session opened`) and the stress mix (every entry an attack from a new
address); then a million distinct failed attempts through `scan --json`.
fail2ban and sshguard are Debian's packages unpacked (`dpkg -x`) into
/var/cache/pamsignal-tests, never installed.

Usage: python3 bench/bench_versus.py [--python PY] [--lines N]
           [--attempts N] [--rounds N] [--profile]
--python runs PAMSignal and the json.loads loop with another interpreter
(fail2ban always runs on Debian's /usr/bin/python3, as Debian runs it);
--profile adds, for the README mix, what each stage costs per entry and
the functions `scan --json` spends its time in (cProfile).
"""
import argparse
import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PAMSIGNAL = os.path.join(REPO, "pamsignal.py")

from needs import program, unpacked  # noqa: E402
import stages  # noqa: E402

#: GNU time: measures a child's peak RSS from outside without the
#: benchmark's own memory (Linux carries ru_maxrss across fork and exec).
TIME = "/usr/bin/time"

#: Entries the per-stage table (--profile) times.
STAGE_ENTRIES = 20000

#: The first entry's time, microseconds (2026-11-27 12:00 UTC).
START_US = 1795780800000000

_KEY = "ED25519 SHA256:Yx1c0FfZ4u3q0Wm1bqjz0Wj2n7I1s5r7m3x2kP4QvXw"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
           "Oct", "Nov", "Dec")


def attacker(number):
    """A distinct public address per number (IPv4 and IPv6 alternating)."""
    if number % 2:
        return "2a02:%x:%x::%x" % (1 + (number >> 32), number >> 16 & 0xffff,
                                   number & 0xffff)
    return "%d.%d.%d.%d" % (11 + (number >> 24) % 80, number >> 16 & 255,
                            number >> 8 & 255, number & 255)


def readme_mix(number):
    """(pid, message) of the README mix: per four entries two failures
    from a few hundred sources, then a login and its session."""
    connection = number // 4
    step = number % 4
    if step < 2:
        return 10000 + number, (
            "Failed password for invalid user admin%d from %s port %d ssh2"
            % (number % 50, attacker(number // 2 % 400), 1024 + number
               % 60000))
    pid = 500000 + connection  # the login and its session: one process
    if step == 2:
        return pid, ("Accepted publickey for alice from 192.0.2.%d port %d "
                     "ssh2: %s" % (connection % 250 + 1, 1024 + connection
                                   % 60000, _KEY))
    return pid, ("pam_unix(sshd:session): session opened for user "
                 "alice(uid=1000) by alice(uid=0)")


def stress_mix(number):
    """(pid, message): every entry an attack from a new address."""
    return 10000 + number, (
        "Failed password for invalid user admin%d from %s port %d ssh2"
        % (number % 50, attacker(number), 1024 + number % 60000))


def journal_line(number, pid, message):
    """One `journalctl -o json` line of sshd, with the fields journald
    adds itself (what PAMSignal trusts) as Debian 12 writes them."""
    realtime = START_US + number * 1000
    return (
        '{"__CURSOR":"s=7c1d0e5b2f4a4e0c9a3b8d6f1e2c4a5b;i=%x;'
        'b=0f6c6b5d6a2a4f35a1e1b1d9c3b0f6e1;m=%x;t=%x;x=%x",'
        '"__REALTIME_TIMESTAMP":"%d","__MONOTONIC_TIMESTAMP":"%d",'
        '"_BOOT_ID":"0f6c6b5d6a2a4f35a1e1b1d9c3b0f6e1",'
        '"_MACHINE_ID":"5f2b6a3c9d8e4f7a8b1c2d3e4f5a6b7c",'
        '"_HOSTNAME":"web1","PRIORITY":"6","SYSLOG_FACILITY":"4",'
        '"SYSLOG_IDENTIFIER":"sshd","SYSLOG_PID":"%d","MESSAGE":"%s",'
        '"_PID":"%d","_UID":"0","_GID":"0","_COMM":"sshd",'
        '"_EXE":"/usr/sbin/sshd","_CMDLINE":"sshd: [accepted]",'
        '"_CAP_EFFECTIVE":"1ffffffffff","_TRANSPORT":"syslog",'
        '"_SELINUX_CONTEXT":"unconfined\\n",'
        '"_SYSTEMD_CGROUP":"/system.slice/ssh.service",'
        '"_SYSTEMD_UNIT":"ssh.service","_SYSTEMD_SLICE":"system.slice",'
        '"_SYSTEMD_INVOCATION_ID":"3e0b5a1c2d4f4a6b8c9d0e1f2a3b4c5d",'
        '"_SOURCE_REALTIME_TIMESTAMP":"%d"}\n'
        % (number + 1, number * 1000, realtime, number + 1, realtime,
           number * 1000, pid, message, pid, realtime - 7))


def syslog_line(number, pid, message):
    """The same entry as rsyslog writes it to /var/log/auth.log."""
    seconds = START_US // 1000000 + number // 1000
    stamp = time.gmtime(seconds)
    return "%s %2d %02d:%02d:%02d web1 sshd[%d]: %s\n" % (
        _MONTHS[stamp.tm_mon - 1], stamp.tm_mday, stamp.tm_hour,
        stamp.tm_min, stamp.tm_sec, pid, message)


def write_inputs(directory, name, mix, count, syslog=True):
    """The export (and the syslog text) of `count` entries of `mix`."""
    export = os.path.join(directory, name + ".json")
    text = os.path.join(directory, name + ".log")
    with open(export, "w") as journal:
        with open(text if syslog else os.devnull, "w") as log:
            for number in range(count):
                pid, message = mix(number)
                journal.write(journal_line(number, pid, message))
                if syslog:
                    log.write(syslog_line(number, pid, message))
    return export, text


def measured(command, stdin=None):
    """(seconds, peak RSS in MiB) of one run of `command`."""
    with tempfile.NamedTemporaryFile(mode="r") as report, \
            open(os.devnull, "w") as sink:
        started = time.perf_counter()
        subprocess.run([TIME, "-f", "%M", "-o", report.name] + command,
                       stdin=stdin, stdout=sink, stderr=sink, check=True)
        seconds = time.perf_counter() - started
        return seconds, int(report.read().split()[-1]) / 1024.0


class Tools:
    """The command line of each contender, on one mix's files."""

    def __init__(self, python, config, fail2ban, sshguard):
        self.python = python
        self.config = config  # empty: built-in defaults
        self.fail2ban = fail2ban
        self.sshguard = sshguard

    def scan(self, export, *flags):
        return [self.python, PAMSIGNAL, "--config", self.config, "scan"] + \
            list(flags) + [export]

    def rows(self, export, text):
        """(name, run) per contender; run() -> (seconds, peak MiB)."""
        fail2ban = [
            "env", "PYTHONPATH=" + os.path.join(
                self.fail2ban, "usr", "lib", "python3", "dist-packages"),
            "/usr/bin/python3", os.path.join(self.fail2ban, "usr", "bin",
                                             "fail2ban-regex"),
            text, os.path.join(self.fail2ban, "etc", "fail2ban", "filter.d",
                               "sshd.conf")]
        parser = os.path.join(self.sshguard, "usr", "libexec", "sshguard",
                              "sshg-parser")

        def sshguard():
            with open(text) as lines:
                return measured([parser], stdin=lines)

        decode = [self.python, "-c", "import json, sys\n"
                  "for line in open(sys.argv[1], 'rb'): json.loads(line)",
                  export]
        return (
            ("`pamsignal.py scan --json` (journal export)",
             lambda: measured(self.scan(export, "--json"))),
            ("`pamsignal.py scan` (text)",
             lambda: measured(self.scan(export))),
            ("fail2ban-regex, sshd filter (syslog text)",
             lambda: measured(fail2ban)),
            ("sshguard's parser (C, syslog text)", sshguard),
            ("a bare `json.loads` loop over the export",
             lambda: measured(decode)),
        )


def median(values):
    return sorted(values)[(len(values) - 1) // 2]


def side_by_side(rows, count, rounds):
    """Median seconds and peak RSS per row, in rounds whose order turns,
    so the machine's load falls on every contender alike."""
    seconds = {name: [] for name, _ in rows}
    peaks = {name: [] for name, _ in rows}
    for turn in range(rounds):
        for name, run in rows[turn % len(rows):] + rows[:turn % len(rows)]:
            took, peak = run()
            seconds[name].append(took)
            peaks[name].append(peak)
    return [(name, count / median(seconds[name]), max(peaks[name]))
            for name, _ in rows]


def print_table(title, results):
    """A Markdown table (as the README shows it): lines/s, peak RSS, and
    how fast `scan --json` and `scan` (text) are beside each."""
    json_rate, text_rate = results[0][1], results[1][1]
    print("\n%s\n" % title)
    print("| tool | lines/s | peak RSS | scan --json / scan text beside it |")
    print("|---|---|---|---|")
    for index, (name, rate, peak) in enumerate(results):
        ratio = "" if index < 2 else "%.2fx / %.2fx" % (json_rate / rate,
                                                        text_rate / rate)
        print("| %s | %s | %.0f MB | %s |" % (name, "{:,.0f}".format(rate),
                                              peak, ratio))


def interpreter_version(python):
    return subprocess.run(
        [python, "-c", "import sys; print(sys.version.split()[0])"],
        stdout=subprocess.PIPE, universal_newlines=True,
        check=True).stdout.strip()


# ------------------------------------------------------------ --profile
# Run by the chosen interpreter itself (`bench_versus.py stages EXPORT`):
# it imports pamsignal.py, so the figures are that Python's.

def stage_costs(export):
    """Microseconds per entry: decoding, then parsing on top, then the
    whole pipeline without a channel, then `scan --json` and `scan` in
    process (best of 3 each); then cProfile's top functions of
    `scan --json`."""
    sys.path.insert(0, REPO)
    import pamsignal

    with open(export, "rb") as handle:  # enough to see, quick to repeat
        lines = handle.readlines()[:STAGE_ENTRIES]
    export = os.path.join(os.path.dirname(export), "stages.json")
    with open(export, "wb") as handle:
        handle.writelines(lines)
    config = os.path.join(os.path.dirname(export), "empty.conf")

    def pipeline():  # as `scan` has it, less its channel
        defaults = pamsignal.default_config()
        return pamsignal.Pipeline(
            [], defaults.detection, skip_unwatched=True,
            enricher=pamsignal.Enricher.from_config(defaults, False))

    def scan(*flags):
        runs = []
        for _ in range(3):
            with open(os.devnull, "w") as sink:
                started = time.perf_counter()
                pamsignal.main(["--config", config, "scan"] + list(flags)
                               + [export], sink)
                runs.append(time.perf_counter() - started)
        return min(runs) / len(lines) * 1e6

    costs = (("decoding the JSON line",
              stages.best_us(lines, pipeline, stages.decoding)),
             ("parsing (trust checks, rules)",
              stages.best_us(lines, pipeline, stages.parsing)),
             ("sessions, pairing, enrichment, detection",
              stages.best_us(lines, pipeline, stages.processing)),
             ("`scan --json`: policy, rendering, printing", scan("--json")),
             ("`scan` (text) instead", scan()))
    print("\nper entry, Python %s, %d entries (best of 3):\n"
          % (sys.version.split()[0], len(lines)))
    print("| stage | adds | total |")
    print("|---|---|---|")
    for index, (name, cost) in enumerate(costs):
        # each adds to the one before (text: instead of JSON's rendering)
        before = costs[index - 1][1] if index else 0.0
        print("| %s | %+.2f us | %.2f us |" % (name, cost - before, cost))

    profile = cProfile.Profile()
    with open(os.devnull, "w") as sink:
        profile.runcall(pamsignal.main, ["--config", config, "scan",
                                         "--json", export], sink)
    print("\n`scan --json`, cProfile, the 15 functions with the most own "
          "time:\n")
    pstats.Stats(profile, stream=sys.stdout).sort_stats(
        "tottime").print_stats(15)


# ------------------------------------------------------------ main

def parse_arguments(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of PAMSignal (default: this one)")
    parser.add_argument("--lines", type=int, default=100000,
                        help="lines per mix (default 100000)")
    parser.add_argument("--attempts", type=int, default=1000000,
                        help="distinct failed attempts (default 1000000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds, median taken (default 3)")
    parser.add_argument("--profile", action="store_true",
                        help="add the per-stage table and cProfile")
    arguments = parser.parse_args(argv)
    if min(arguments.lines, arguments.attempts, arguments.rounds) < 1:
        parser.error("sizes and rounds must be at least 1")
    return arguments


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["stages"]:
        return stage_costs(argv[1])
    arguments = parse_arguments(argv)
    program(TIME, "time")
    program(arguments.python, "python3")
    fail2ban = unpacked("fail2ban")
    sshguard = unpacked("sshguard")
    directory = tempfile.mkdtemp(prefix="pamsignal-versus-")
    try:
        config = os.path.join(directory, "empty.conf")
        open(config, "w").close()
        tools = Tools(arguments.python, config, fail2ban, sshguard)
        print("PAMSignal on Python %s (%s); %d rounds, median; load "
              "average %.1f" % (interpreter_version(arguments.python),
                                arguments.python, arguments.rounds,
                                os.getloadavg()[0]))
        for name, mix, title in (
                ("readme", readme_mix, "README mix"),
                ("stress", stress_mix, "stress mix (every entry an attack "
                 "from a new address)")):
            export, text = write_inputs(directory, name, mix, arguments.lines)
            print_table("%s, %d lines:" % (title, arguments.lines),
                        side_by_side(tools.rows(export, text),
                                     arguments.lines, arguments.rounds))
            if name == "readme" and arguments.profile:
                sys.stdout.flush()
                subprocess.run([arguments.python, os.path.abspath(__file__),
                                "stages", export], check=True)
        export, _ = write_inputs(directory, "million", stress_mix,
                                 arguments.attempts, syslog=False)
        runs = [measured(tools.scan(export, "--json"))
                for _ in range(arguments.rounds)]
        print("\n%d distinct failed attempts, `scan --json`: %s entries/s, "
              "peak RSS %.0f MB" % (
                  arguments.attempts, "{:,.0f}".format(
                      arguments.attempts / median([s for s, _ in runs])),
                  max(peak for _, peak in runs)))
        print("(load average %.1f at the end)" % os.getloadavg()[0])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
