"""The benchmarks name what they need: a missing program is reported with
the package that brings it, not as a traceback halfway through."""
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

import realsys
from support import REPO


@pytest.mark.parametrize("script, program, package", [
    ("bench_pipeline.py", "journalctl", "systemd"),
    ("bench_report.py", "journalctl", "systemd"),
    ("bench_delivery.py", "openssl", "openssl"),
    ("bench_syslog.py", "openssl", "openssl"),
    ("bench_instructions.py", "valgrind", "valgrind"),
])
def test_a_missing_program_is_named_with_its_package(tmp_path, script,
                                                     program, package):
    arguments = ["--entries", "10"] if script == "bench_instructions.py" \
        else ["10"]
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", script)] + arguments,
        env=dict(os.environ, PATH=str(tmp_path)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "%s is missing: apt-get install -y %s" % (program, package))


def test_compare_feeds_both_versions_the_same_lines():
    """bench_compare.py: the same file loaded twice finds the same events
    in each corpus (only the speed may differ)."""
    pamsignal_py = os.path.join(REPO, "pamsignal.py")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "bench_compare.py"),
         pamsignal_py, pamsignal_py, "400", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert len(rows) == 4, rows
    events = [row.rsplit("(", 1)[1] for row in rows]
    assert events[0] == events[1] and events[2] == events[3], rows
    assert events[2] != "0 events)", rows


def test_the_instruction_bench_counts_each_stage():
    """bench_instructions.py on a few entries: a row per stage, each count
    an instruction count (the first one base, each stage adding to the one
    before, the text line instead of the JSON one); the figures
    themselves are not judged."""
    if not shutil.which("valgrind"):
        realsys.unavailable("valgrind is missing (tests/check.sh installs "
                            "it)")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "bench_instructions.py"),
         "--entries", "4", "--mix", "stress"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^\| (.+?) \| ([+-]\d+) \| (\d+) \|$",
                      result.stdout, re.MULTILINE)
    assert [name for name, _, _ in rows] == [
        "decoding the JSON line", "parsing (trust checks, rules)",
        "sessions, pairing, enrichment, detection",
        "`scan --json`: policy, rendering, printing",
        "`scan` (text) instead"]
    adds = [int(added) for _, added, _ in rows]
    totals = [int(total) for _, _, total in rows]
    assert adds[0] == totals[0] > 1000  # decoding an entry is real work
    for index in (1, 2, 3):
        assert totals[index] == totals[index - 1] + adds[index]
    assert totals[4] == totals[2] + adds[4]
    assert "stress mix, 4 entries" in result.stdout


def test_the_side_by_side_bench_prints_its_tables(tmp_path):
    """bench_versus.py on a tiny size: every contender ran (Debian's
    fail2ban and sshguard unpacked into the test cache) and each table
    has its rows; the figures themselves are not judged."""
    for program in ("/usr/bin/time", "apt-get", "dpkg"):
        if not shutil.which(program):
            realsys.unavailable("%s is missing (tests/check.sh installs it)"
                                % program)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "bench_versus.py"),
         "--lines", "40", "--attempts", "30", "--rounds", "1", "--profile"],
        env=dict(os.environ, TMPDIR=str(tmp_path)), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    rows = re.findall(r"^\| (.+?) \| ([\d,]+) \| (\d+) MB \| (.*) \|$", out,
                      re.MULTILINE)
    names = [name for name, _, _, _ in rows]
    contenders = ["`pamsignal.py scan --json` (journal export)",
                  "`pamsignal.py scan` (text)",
                  "fail2ban-regex, sshd filter (syslog text)",
                  "sshguard's parser (C, syslog text)",
                  "a bare `json.loads` loop over the export"]
    assert names == contenders * 2  # the README mix, then the stress mix
    for name, _, _, ratio in rows:
        assert bool(re.match(r"^\d+\.\d\dx / \d+\.\d\dx$", ratio)) == \
            (not name.startswith("`pamsignal.py"))
    assert "README mix, 40 lines:" in out and "stress mix" in out
    stages = re.findall(r"^\| (.+?) \| [+-]\d+\.\d\d us \| \d+\.\d\d us \|$",
                        out, re.MULTILINE)
    assert len(stages) == 5 and stages[0] == "decoding the JSON line"
    assert "pamsignal.py" in out.split("cProfile")[1]  # its own functions
    assert re.search(r"^30 distinct failed attempts, `scan --json`: [\d,]+ "
                     r"entries/s, peak RSS \d+ MB$", out, re.MULTILINE)


def test_the_flood_bench_sees_every_failed_attempt_of_a_real_sshd():
    """bench_flood.py for a few seconds: a real sshd was tried, the agent
    followed the real journal and printed an event for every failed
    password sshd logged; the figures themselves are not judged."""
    realsys.require_root()
    realsys.require_binaries("/usr/sbin/sshd", "ssh", "sshpass",
                             "journalctl")
    bench = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "bench", "bench_flood.py"),
         "--clients", "2", "--seconds", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, start_new_session=True)
    try:
        out, err = bench.communicate(timeout=400)
    finally:  # its sshd, agent and followers go with it
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.communicate()
    assert bench.returncode == 0, err
    made = int(re.search(r"^attempts made +(\d+) ", out, re.M).group(1))
    told, failures, events, _ = map(int, re.search(
        r"^failed passwords with an event (\d+) of (\d+) \(events for "
        r"them (\d+)\); other failures \(cut off before a password\) "
        r"(\d+)$", out, re.M).groups())
    # each wrong password sshd logged (matched by its source address and
    # port) is one event, none missed and none twice
    assert made >= failures > 0 and told == events == failures, out
    for name in ("journal to agent output", "journal to journalctl -f"):
        assert re.search(r"^%s +median \d+ ms, 99%% \d+ ms, largest \d+ ms$"
                         % name, out, re.M), out
    assert re.search(r"^agent CPU \(with its journalctl\) [\d.]+ s: ", out,
                     re.M), out
