"""The text report in colour on a terminal (a real pseudo-terminal), and
never on a pipe or with NO_COLOR set; the colour changes nothing else."""
import os
import pty
import re
import subprocess
import sys

import pytest

from support import PAMSIGNAL, json_line, write_config
from test_report import story

SGR = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report-colour")
    path = directory / "story.json"
    path.write_text("".join(json_line(line) for line in story()))
    write_config(directory / "pamsignal.conf", "")
    return str(path)


def report(export, terminal, **environment):
    """The report's standard output, on a pseudo-terminal or a pipe."""
    env = dict(os.environ, TZ="UTC", COLUMNS="120", **environment)
    if "NO_COLOR" not in environment:
        env.pop("NO_COLOR", None)
    command = [sys.executable, PAMSIGNAL, "--config", os.path.join(
        os.path.dirname(export), "pamsignal.conf"), "report", export]
    if not terminal:
        return subprocess.run(command, stdout=subprocess.PIPE, env=env,
                              universal_newlines=True, timeout=60,
                              check=True).stdout
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(command, stdout=follower, env=env)
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the writer is gone
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(timeout=60) == 0
    finally:
        os.close(leader)
    return output.decode("utf-8").replace("\r\n", "\n")


def test_a_terminal_gets_colour_and_nothing_else_changes(export):
    plain = report(export, terminal=False)
    coloured = report(export, terminal=True)
    assert SGR.sub("", coloured) == plain
    lines = coloured.split("\n")
    assert lines[0].startswith("\x1b[1mPAMSignal report: ")
    assert "\x1b[1mDetections (3)\x1b[0m" in lines
    detections = lines[lines.index("\x1b[1mDetections (3)\x1b[0m") + 1:][:3]
    assert all(line.startswith("\x1b[31m") and line.endswith("\x1b[0m")
               for line in detections)
    assert [line for line in lines if line.startswith("\x1b[2m")][0] \
        .startswith("\x1b[2mUSER ")


def test_no_colour_with_no_color_or_on_a_pipe(export):
    assert SGR.search(report(export, terminal=False)) is None
    assert SGR.search(report(export, terminal=True, NO_COLOR="1")) is None
    # An empty NO_COLOR does not count (no-color.org).
    assert SGR.search(report(export, terminal=True, NO_COLOR="")) \
        is not None
