"""The benchmarks name what they need: a missing program is reported with
the package that brings it, not as a traceback halfway through."""
import os
import subprocess
import sys

import pytest

from support import REPO


@pytest.mark.parametrize("script, program, package", [
    ("bench_pipeline.py", "journalctl", "systemd"),
    ("bench_report.py", "journalctl", "systemd"),
    ("bench_delivery.py", "openssl", "openssl"),
    ("bench_syslog.py", "openssl", "openssl"),
])
def test_a_missing_program_is_named_with_its_package(tmp_path, script,
                                                     program, package):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", script), "10"],
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
