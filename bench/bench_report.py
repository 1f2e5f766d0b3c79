#!/usr/bin/env python3
"""Speed of `pamsignal report` beside journalctl itself (a benchmark, not
a test).

Writes N synthetic journal entries (bench_pipeline.py's mix: a server
under SSH brute force, logins, sessions, sudo and other programs) into a
real journal file with systemd-journal-remote, then times:

  journalctl -o json              all entries, all fields: what journalctl
                                  can emit here
  journalctl as report runs it    --output-fields and the watched matches
  report (journal)                `pamsignal.py report --json` reading the
                                  journal file through journalctl
  report (export)                 `pamsignal.py report --json FILE`

Rates are journal entries covered per second; the ratio is report's rate
over journalctl -o json's. Also the peak memory of report over N and 4N
entries (bounded memory means about the same peak).
Usage: python3 bench/bench_report.py [N]   (default 200000)
"""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PAMSIGNAL = os.path.join(os.path.dirname(HERE), "pamsignal.py")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import pamsignal  # noqa: E402
from bench_pipeline import JOURNAL_REMOTE, timed, write_journal  # noqa: E402
from needs import program  # noqa: E402

# VmHWM, not ru_maxrss (which Linux carries over from the parent).
_MEASURE_REPORT = (
    "import sys; sys.path.insert(0, sys.argv[1]); import pamsignal; "
    "pamsignal.main(['--config', sys.argv[2], 'report', '--json', "
    "sys.argv[3]], open('/dev/null', 'w'));"
    " print([l.split()[1] for l in open('/proc/self/status') "
    "if l.startswith('VmHWM:')][0])")


def report_peak_rss_mib(config, export):
    """Peak resident memory of `report` over an export, in MiB."""
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE_REPORT, os.path.dirname(HERE),
         config, export], stdout=subprocess.PIPE, check=True)
    return int(result.stdout) / 1024.0


def write_config(directory, journal):
    """A config whose journalctl reads the bench journal file."""
    wrapper = os.path.join(directory, "journalctl-file")
    with open(wrapper, "w") as handle:
        handle.write("#!/bin/sh\nexec journalctl --directory=%s \"$@\"\n"
                     % journal)
    os.chmod(wrapper, 0o755)
    config = os.path.join(directory, "report.conf")
    with open(config, "w") as handle:
        handle.write("[pamsignal]\njournalctl = %s\n" % wrapper)
    os.chmod(config, 0o600)
    return config


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200000
    program("journalctl", "systemd")
    program(JOURNAL_REMOTE, "systemd-journal-remote")
    directory = tempfile.mkdtemp(prefix="pamsignal-bench-report-")
    try:
        journal = write_journal(directory, count)
        config = write_config(directory, journal)
        export = os.path.join(directory, "export.json")
        with open(export, "w") as handle:
            plain = timed(["journalctl", "--directory=" + journal, "-o",
                           "json", "--no-pager"], handle)
        with open(os.devnull, "w") as sink:
            trimmed = timed(["journalctl", "--directory=" + journal]
                            + pamsignal.report_command("journalctl", None,
                                                       None)[1:], sink)
            from_journal = timed([sys.executable, PAMSIGNAL, "--config",
                                  config, "report", "--json"], sink)
            from_export = timed([sys.executable, PAMSIGNAL, "--config",
                                 config, "report", "--json", export], sink)
        big = os.path.join(directory, "export4.json")
        with open(export, "rb") as source, open(big, "wb") as handle:
            lines = source.readlines()
            for _ in range(4):
                handle.writelines(lines)
        rss_small = report_peak_rss_mib(config, export)
        rss_big = report_peak_rss_mib(config, big)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print("entries: %d, Python %s" % (count, sys.version.split()[0]))
    rows = (("journalctl -o json (all fields)", plain),
            ("journalctl as report runs it (fields+match)", trimmed),
            ("pamsignal.py report --json (journal)", from_journal),
            ("pamsignal.py report --json FILE", from_export))
    for name, seconds in rows:
        print("%-44s %10.0f entries/s" % (name, count / seconds))
    print("%-44s %10.2f" % ("report (journal) / journalctl -o json",
                            plain / from_journal))
    print("%-44s %7.1f MiB / %.1f MiB" % (
        "report peak RSS, N / 4N entries", rss_small, rss_big))


if __name__ == "__main__":
    main()
