"""Shared test helpers: the module under test, journal entries, a fake
journalctl for faults a real journal cannot be made to show."""
import json
import os
import re
import stat
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAMSIGNAL = os.path.join(REPO, "pamsignal.py")
sys.path.insert(0, REPO)

import pamsignal  # noqa: E402
from realsys import wait_for  # noqa: E402,F401 (shared with realsys)

#: The usual writer of each watched identifier, as journald records it.
DEFAULT_WRITERS = {
    "sshd": ("/usr/sbin/sshd", "0"),
    "sshd-session": ("/usr/lib/openssh/sshd-session", "0"),
    "sshd-auth": ("/usr/lib/openssh/sshd-auth", "0"),
    "sudo": ("/usr/bin/sudo", "1000"),
    "su": ("/usr/bin/su", "1000"),
    "login": ("/usr/bin/login", "0"),
    "systemd-logind": ("/lib/systemd/systemd-logind", "0"),
}


def make_entry(identifier, message, sequence=1, **overrides):
    """A journal entry as `journalctl -o json` prints it, from a real
    writer unless the overrides say otherwise (None removes a field)."""
    exe, uid = DEFAULT_WRITERS.get(identifier, ("/usr/bin/" + identifier,
                                                "0"))
    entry = {
        "__CURSOR": "s=0123456789abcdef;i=%x;b=feedface;m=1;t=2;x=3"
                    % sequence,
        "__REALTIME_TIMESTAMP": str(1795780000000000 + sequence * 1000000),
        "__MONOTONIC_TIMESTAMP": "123",
        "_BOOT_ID": "feedface",
        "SYSLOG_IDENTIFIER": identifier,
        "MESSAGE": message,
        "_COMM": os.path.basename(exe)[:15],
        "_EXE": exe,
        "_UID": uid,
        "_PID": "4242",
        "_TRANSPORT": "syslog",
        "_HOSTNAME": "web1",
    }
    for key, value in overrides.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


def flatten(tree, prefix=""):
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        path = prefix + key
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def parse_flat(entry):
    event = pamsignal.parse_entry(entry)
    return None if event is None else flatten(pamsignal.event_to_ecs(event))


FAKE_JOURNALCTL = r'''#!%(python)s
"""Fake journalctl: invocation N plays step N of the plan in $FAKE_PLAN
(the last step repeats) and appends its argv to $FAKE_PLAN.calls."""
import json, os, signal, sys, time
plan_path = os.environ["FAKE_PLAN"]
with open(plan_path) as handle:
    plan = json.load(handle)
calls = plan_path + ".calls"
with open(calls, "a") as handle:
    handle.write(json.dumps(sys.argv[1:]) + "\n")
with open(calls) as handle:
    number = sum(1 for _ in handle) - 1
mode = "follow" if "--follow" in sys.argv else "once"
steps = plan[mode]
step = steps[min(number if mode == "follow" else 0, len(steps) - 1)]
out = sys.stdout.buffer
if step.get("ignore_term"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
for chunk in step.get("output", []):
    if isinstance(chunk, (int, float)):
        out.flush()
        time.sleep(chunk)
    else:
        out.write(chunk.encode("utf-8", "surrogateescape"))
out.flush()
if step.get("stderr"):
    sys.stderr.write(step["stderr"])
    sys.stderr.flush()
if step.get("tail"):  # hand out what the test appends to this file
    with open(step["tail"], "rb") as feed:
        while True:
            line = feed.readline()
            if line.endswith(b"\n"):
                out.write(line)
                out.flush()
            else:
                feed.seek(feed.tell() - len(line))
                time.sleep(0.05)
if step.get("hang"):
    time.sleep(3600)
sys.exit(step.get("exit", 0))
'''


class FakeJournal:
    """A fake journalctl program and the plan it plays.

    plan = {"follow": [step, ...], "once": [step]}; a step is
    {"output": [text or seconds-to-sleep, ...], "exit": N, "hang": bool,
     "stderr": text, "tail": path whose appended lines it prints, for ever,
     "ignore_term": bool (SIGTERM does not end it)}.
    """

    def __init__(self, directory, plan):
        self.directory = str(directory)
        self.program = os.path.join(self.directory, "journalctl")
        self.plan_path = os.path.join(self.directory, "plan.json")
        with open(self.program, "w") as handle:
            handle.write(FAKE_JOURNALCTL % {"python": sys.executable})
        os.chmod(self.program, os.stat(self.program).st_mode | stat.S_IXUSR)
        self.write_plan(plan)

    def write_plan(self, plan):
        plan = dict({"once": [{}]}, **plan)
        with open(self.plan_path, "w") as handle:
            json.dump(plan, handle)

    def calls(self):
        try:
            with open(self.plan_path + ".calls") as handle:
                return [json.loads(line) for line in handle]
        except FileNotFoundError:
            return []

    def env(self):
        return dict(os.environ, FAKE_PLAN=self.plan_path)


def json_line(entry):
    return json.dumps(entry) + "\n"


def with_test_log_dir(text):
    """The configuration text with `log_dir = STATE_DIR-audit` after its
    state_dir line, when it has one and names no log_dir."""
    if re.search(r"(?m)^log_dir\s*=", text):
        return text
    return re.sub(r"(?m)^(state_dir\s*=\s*(/\S*)\s*\n)",
                  lambda m: "%slog_dir = %s-audit\n" % (m.group(1),
                                                       m.group(2)),
                  text, count=1)


def write_config(path, text):
    """The file as an admin keeps it: readable by its owner only (one
    that holds a channel's secrets must be).  An agent run on it keeps its
    audit log beside its state_dir, never in the machine's
    /var/log/pamsignal: a log_dir line follows the state_dir line unless
    the text names one."""
    with open(str(path), "w") as handle:
        handle.write(with_test_log_dir(text))
    os.chmod(str(path), 0o600)
    return str(path)


class AgentProcess:
    """`pamsignal.py --config CFG run --json` as a user would start it."""

    def __init__(self, config_path, env=None):
        self.process = subprocess.Popen(
            [sys.executable, PAMSIGNAL, "--config", config_path, "run",
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=env)

    def stop(self, timeout=15):
        if self.process.poll() is None:
            self.process.terminate()
        out, err = self.process.communicate(timeout=timeout)
        return ([json.loads(line) for line in out.decode().splitlines()],
                err.decode(), self.process.returncode)


#: Prints the peak memory (VmHWM, KiB) of a Python that only compiles the
#: file named in argv[1]: what a process that compiled pamsignal.py holds at
#: least (tests/test_memory.py, tests/test_service_boot.py).
COMPILE_PEAK_PROBE = (
    "import sys; compile(open(sys.argv[1], 'rb').read(), sys.argv[1], "
    "'exec'); print([line.split()[1] for line in open('/proc/self/status')"
    " if line.startswith('VmHWM:')][0])")


#: The journal fixtures, each entry beside the event it must give.
MESSAGES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "fixtures", "messages.json")


def captured_export():
    """A `journalctl -o json` export of the lines captured on Debian 12
    (the probe_* fixtures); the event actions they hold."""
    with open(MESSAGES) as handle:
        fixtures = [f for f in json.load(handle)
                    if f["name"].startswith("probe_")]
    lines, actions = [], set()
    for sequence, fixture in enumerate(fixtures, 1):
        entry = dict(fixture["entry"])
        lines.append(json.dumps(make_entry(
            entry.pop("SYSLOG_IDENTIFIER"), entry.pop("MESSAGE"), sequence,
            **entry)))
        if fixture["expect"]:
            actions.add(fixture["expect"]["event.action"])
    return "\n".join(lines) + "\n", actions


def event_summary(scan_json):
    return [(e["event"]["action"], e.get("user", {}).get("name"),
             e.get("source", {}).get("ip"))
            for e in map(json.loads, scan_json.splitlines())]
