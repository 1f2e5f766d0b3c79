"""A light agent at rest: what only some configurations use is imported
when they use it, and `run` neither keeps the script's syntax tree nor
compiles the file again: it starts over from the compiled module.
The figures themselves are measured by bench/bench_memory.py."""
import json
import os
import subprocess
import sys

import pytest

from support import (COMPILE_PEAK_PROBE, PAMSIGNAL, REPO, FakeJournal,
                     make_entry, pamsignal, wait_for, write_config)

#: Modules of TLS, HTTP, e-mail and the config's spelling hints.
OPTIONAL_MODULES = ("ssl", "urllib.request", "urllib.error", "http.client",
                    "email.message", "email.utils", "smtplib", "difflib")

#: Loads pamsignal in a fresh interpreter and prints which of
#: OPTIONAL_MODULES are loaded after each step the test names.
PROBE = r"""
import json, sys
sys.path.insert(0, %(repo)r)
optional = %(modules)r
loaded = {}
import pamsignal
loaded["import"] = [m for m in optional if m in sys.modules]
config = pamsignal.parse_config(%(config)r)
agent = pamsignal.Agent(config, pamsignal.build_channels(config), None,
                        False)
loaded["agent"] = [m for m in optional if m in sys.modules]
for channel in agent.pipeline.channels:
    channel.sink.open()
loaded["opened"] = [m for m in optional if m in sys.modules]
# what a channel does to post: a submodule the lazy name imports itself
pamsignal.urllib.request.Request("https://hooks.example.com/x")
loaded["posting"] = [m for m in optional if m in sys.modules]
print(json.dumps(loaded))
"""


def modules_loaded(tmp_path, config_text):
    config_text = "[pamsignal]\nstate_dir = %s\nlog_dir = %s\n%s" % (
        tmp_path / "state", tmp_path / "log", config_text)
    out = subprocess.check_output(
        [sys.executable, "-c", PROBE % {"repo": REPO, "config": config_text,
                                        "modules": OPTIONAL_MODULES}],
        cwd=str(tmp_path), universal_newlines=True, timeout=120)
    return json.loads(out)


def test_an_agent_without_network_channels_loads_no_tls_http_or_mail(
        tmp_path):
    loaded = modules_loaded(tmp_path, "[channel:log]\ntype = journal\n")
    assert (loaded["import"], loaded["agent"], loaded["opened"]) == (
        [], [], [])


def test_a_network_channel_brings_tls_when_it_opens_and_http_to_post(
        tmp_path):
    loaded = modules_loaded(tmp_path, "[channel:hook]\ntype = webhook\n"
                            "url = https://hooks.example.com/x\n")
    assert loaded["agent"] == []
    assert "ssl" in loaded["opened"]
    assert "urllib.request" not in loaded["opened"]
    assert "urllib.request" in loaded["posting"]


def test_a_lazy_module_is_the_module_and_names_what_it_lacks():
    assert pamsignal.ssl.CERT_REQUIRED == __import__("ssl").CERT_REQUIRED
    with pytest.raises(ImportError):
        pamsignal.LazyModule("wsgiref").no_such_part  # noqa: B018


def status_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status
                if line.startswith(("VmRSS", "VmHWM"))}


@pytest.fixture
def agent_in(tmp_path):
    """Start `python3 pamsignal.py run` in a directory (a fake journalctl
    that waits for ever); yields (process, stderr path)."""
    started = []

    def start(cwd):
        fake = FakeJournal(tmp_path, {"follow": [{"hang": True}]})
        config = write_config(tmp_path / "pamsignal.conf", (
            "[pamsignal]\nstate_dir = %s\njournalctl = %s\n"
            % (tmp_path / "state", fake.program)))
        stderr = str(tmp_path / "stderr")
        with open(stderr, "wb") as handle:
            process = subprocess.Popen(
                [sys.executable, PAMSIGNAL, "--config", config, "run"],
                stdout=subprocess.DEVNULL, stderr=handle, cwd=str(cwd),
                env=fake.env())
        started.append(process)
        assert wait_for(lambda: "this host:" in read(stderr) or
                        process.poll() is not None, timeout=60), read(stderr)
        assert process.poll() is None, read(stderr)
        return process, stderr

    yield start
    for process in started:
        process.terminate()
        process.wait(30)


def read(path):
    with open(path, errors="replace") as handle:
        return handle.read()


def test_run_starts_over_from_the_compiled_file_and_never_compiles(
        agent_in, tmp_path):
    process, stderr = agent_in(tmp_path)
    with open("/proc/%d/cmdline" % process.pid, "rb") as handle:
        argv = handle.read().decode().split("\0")
    # the same process (systemd's MAINPID), now the program that reads the
    # compiled file back
    assert argv[argv.index("-c") + 1] == pamsignal.RERUN_PROGRAM
    assert argv[argv.index("-c") + 3:-1] == [
        PAMSIGNAL, "--config", str(tmp_path / "pamsignal.conf"), "run"]
    # Its peak (VmHWM starts afresh at exec) stays far below what merely
    # compiling the file costs: it neither compiled nor kept a syntax tree.
    compiling = int(subprocess.check_output(
        [sys.executable, "-c", COMPILE_PEAK_PROBE, PAMSIGNAL],
        universal_newlines=True, timeout=120))
    assert status_kib(process.pid)["VmHWM"] < compiling - 10 * 1024


def test_run_never_imports_from_the_current_directory(agent_in, tmp_path):
    """Root may start it anywhere: a json.py or socket.py in the current
    directory must not be what it imports (sys.path[0] as for a script)."""
    here = tmp_path / "somewhere"
    here.mkdir()
    marker = tmp_path / "imported"
    for name in ("json", "socket", "configparser"):
        (here / (name + ".py")).write_text(
            "open(%r, 'a').write(%r)\n" % (str(marker), name))
    agent_in(here)
    assert not marker.exists()
    assert os.path.isdir(str(tmp_path / "state"))


@pytest.mark.parametrize("command", [["scan", "--json", "-"],
                                     ["report", "--json", "-"]])
def test_a_long_read_of_an_export_starts_over_from_the_compiled_file(
        tmp_path, command):
    # scan and report may read a month of a journal: they drop the
    # script's syntax tree as run does, and print what they always did.
    config = write_config(tmp_path / "pamsignal.conf", "")
    lines = "".join(json.dumps(make_entry(
        "sshd", "Failed password for root from 203.0.113.%d port 22 ssh2"
        % number, number)) + "\n" for number in range(1, 8))
    process = subprocess.Popen(
        [sys.executable, PAMSIGNAL, "--config", config] + command,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True)

    def started_over():
        with open("/proc/%d/cmdline" % process.pid, "rb") as handle:
            argv = handle.read().decode().split("\0")
        return "-c" in argv and \
            argv[argv.index("-c") + 1] == pamsignal.RERUN_PROGRAM

    assert wait_for(started_over, timeout=60)
    printed, errors = process.communicate(lines, timeout=120)
    assert process.returncode == 0, errors
    assert printed == subprocess.check_output(
        [sys.executable, "-c", "import sys; sys.path.insert(0, %r); "
         "import pamsignal; sys.exit(pamsignal.main(sys.argv[1:]))"
         % REPO, "--config", config] + command, input=lines,
        universal_newlines=True, timeout=120)
    assert printed.count("203.0.113.") >= 7
