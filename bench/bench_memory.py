#!/usr/bin/env python3
"""Resident memory of the agent (a benchmark, not a test): `pamsignal.py
run` started as an admin starts it, with a temporary configuration and a
fake journalctl, read from /proc once it has settled.

For each interpreter (Debian's /usr/bin/python3 and the pyenv 3.6 that
.ci/pythons uses, when there) it reports VmRSS (resident now) and VmHWM
(the peak since the process last started a program: for `run`, since it
started over from its compiled module) of:
  import src   `import pamsignal` alone, compiled from source as a script
               is (and whether TLS, HTTP or e-mail modules came with it);
  import pyc   the same from its compiled .pyc file;
  idle         `run` with no channel, nothing in the journal;
  idle hook    `run` with one webhook channel, nothing to send;
  busy         `run` with no channel after a brute force of ATTEMPTS
               failed logins from as many addresses (two journal entries
               each), every event printed;
  busy hook    the same with the webhook channel, its alerts delivered to
               a receiver on 127.0.0.1.

Usage: python3 bench/bench_memory.py [ATTEMPTS]   (default 20000)
"""
import glob
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
AGENT = os.path.join(os.path.dirname(HERE), "pamsignal.py")
sys.path.insert(0, HERE)

from bench_detection import attack_lines  # noqa: E402

#: A journalctl that plays FEED when following, then waits; any other
#: call (the agent's stall probe) finds nothing.
FAKE_JOURNALCTL = """#!/bin/sh
case " $* " in
*" --follow "*) cat '%s'; exec sleep 100000 ;;
esac
exit 0
"""

#: Modules that only channels and some commands need.
OPTIONAL_MODULES = ("ssl", "urllib.request", "http.client", "email.message",
                    "smtplib", "difflib")

SETTLE_TIMEOUT_S = 600


def interpreters():
    """(label, path) of Debian's python3 and the newest pyenv 3.6."""
    found = [("Debian " + version_of("/usr/bin/python3"), "/usr/bin/python3")]
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    builds = sorted(glob.glob(os.path.join(root, "versions", "3.6.*",
                                           "bin", "python3")))
    if builds:
        found.append(("pyenv " + version_of(builds[-1]), builds[-1]))
    else:
        print("no pyenv Python 3.6 under %s: measured with Debian's only"
              % root)
    return found


def version_of(python):
    return subprocess.check_output(
        [python, "-c", "import platform; print(platform.python_version())"],
        universal_newlines=True).strip()


def memory_kib(pid):
    """(VmRSS, VmHWM) of a process, in KiB."""
    values = {}
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def import_alone(python, directory, from_source):
    """(VmRSS, VmHWM, optional modules loaded) after `import pamsignal`
    from `directory`: compiled from source (-B: no .pyc read or written),
    or from the .pyc file compiled there before."""
    probe = ("import json, sys; sys.path.insert(0, %r); import pamsignal; "
             "status = open('/proc/self/status').read().split('\\n'); "
             "kib = {l.split(':')[0]: int(l.split()[1]) for l in status "
             "if l.startswith(('VmRSS', 'VmHWM'))}; "
             "print(json.dumps([kib['VmRSS'], kib['VmHWM'], "
             "[m for m in %r if m in sys.modules]]))"
             % (directory, OPTIONAL_MODULES))
    environ = dict(os.environ)
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.check_output(
        [python] + (["-B"] if from_source else []) + ["-c", probe],
        universal_newlines=True, env=environ)
    return json.loads(out)


def import_cached(python, work):
    """`import pamsignal` from its compiled (.pyc) file, as a module is
    usually imported: a copy compiled first."""
    directory = os.path.join(work, "import-" + os.path.basename(
        os.path.dirname(os.path.dirname(python))))
    os.makedirs(directory)
    shutil.copy(AGENT, directory)
    subprocess.check_call([python, "-m", "py_compile",
                           os.path.join(directory, "pamsignal.py")])
    return import_alone(python, directory, from_source=False)


class Receiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver that counts and answers 200."""

    received = 0

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Receiver.received += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def write_feed(path, attempts):
    """The journal the fake journalctl plays; the last entry's cursor."""
    cursor = None
    with open(path, "wb") as feed:
        for line in attack_lines(attempts):
            feed.write(line + b"\n")
            cursor = json.loads(line.decode())["__CURSOR"]
    return cursor


def saved_cursor(state_dir):
    try:
        with open(os.path.join(state_dir, "state.json")) as handle:
            return json.load(handle).get("cursor")
    except (OSError, ValueError):
        return None


def settle(pid, state_dir, last_cursor):
    """Wait until every entry is handled and the resident size holds
    still for two seconds; then (VmRSS, VmHWM)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while last_cursor and saved_cursor(state_dir) != last_cursor:
        if time.monotonic() > deadline:
            raise SystemExit("the agent did not get through the feed")
        time.sleep(0.5)
    previous = None
    while time.monotonic() < deadline:
        time.sleep(2)
        current = memory_kib(pid)
        if previous and abs(current[0] - previous[0]) < 64:
            return current
        previous = current
    return current


def run_agent(python, work, name, feed, last_cursor, hook_url):
    """Start `run`, let it settle, return (VmRSS, VmHWM), stop it."""
    directory = os.path.join(work, name)
    os.makedirs(directory)
    journalctl = os.path.join(directory, "journalctl")
    with open(journalctl, "w") as handle:
        handle.write(FAKE_JOURNALCTL % feed)
    os.chmod(journalctl, 0o755)
    state_dir = os.path.join(directory, "state")
    config = os.path.join(directory, "pamsignal.conf")
    with open(config, "w") as handle:
        handle.write("[pamsignal]\nstate_dir = %s\nlog_dir = %s\n"
                     "journalctl = %s\n" % (state_dir, os.path.join(
                         directory, "log"), journalctl))
        if hook_url:
            handle.write("[channel:hook]\ntype = webhook\nurl = %s\n"
                         % hook_url)
    os.chmod(config, 0o600)
    with open(os.path.join(directory, "stderr"), "wb") as stderr:
        agent = subprocess.Popen([python, AGENT, "--config", config, "run"],
                                 stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        state = os.path.join(state_dir, "state.json")
        while not os.path.exists(state) and agent.poll() is None:
            time.sleep(0.2)  # it saves its start position once following
        if agent.poll() is not None:
            raise SystemExit("the agent stopped: see %s/stderr" % directory)
        return settle(agent.pid, state_dir, last_cursor)
    finally:
        agent.terminate()
        agent.wait(30)


def mib(kib):
    return "%.1f" % (kib / 1024.0)


def main():
    attempts = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    work = tempfile.mkdtemp(prefix="pamsignal-bench-memory-")
    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_url = "http://127.0.0.1:%d/hook" % server.server_port
    empty = os.path.join(work, "empty.json")
    open(empty, "w").close()
    attack = os.path.join(work, "attack.json")
    last_cursor = write_feed(attack, attempts)
    print("MiB (VmRSS now / VmHWM peak); busy = %d failed logins from as "
          "many addresses" % attempts)
    print("%-20s %-12s %-12s %-12s %-12s %-12s %-12s" % (
        "interpreter", "import src", "import pyc", "idle", "idle hook",
        "busy", "busy hook"))
    try:
        for label, python in interpreters():
            rss, hwm, loaded = import_alone(python, os.path.dirname(AGENT),
                                         from_source=True)
            cells = ["%s / %s" % (mib(rss), mib(hwm))]
            rss, hwm, _ = import_cached(python, work)
            cells.append("%s / %s" % (mib(rss), mib(hwm)))
            for name, feed, cursor, url in (
                    ("idle", empty, None, None),
                    ("idle-hook", empty, None, hook_url),
                    ("busy", attack, last_cursor, None),
                    ("busy-hook", attack, last_cursor, hook_url)):
                rss, hwm = run_agent(python, os.path.join(work, label), name,
                                     feed, cursor, url)
                cells.append("%s / %s" % (mib(rss), mib(hwm)))
            print("%-20s %-12s %-12s %-12s %-12s %-12s %-12s"
                  % ((label,) + tuple(cells)))
            if loaded:
                print("  `import pamsignal` loaded: %s" % ", ".join(loaded))
        print("webhook alerts received: %d" % Receiver.received)
    finally:
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
