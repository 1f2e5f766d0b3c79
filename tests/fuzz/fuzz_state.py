"""Fuzz target: the agent's saved state as it restarts with it.

An input is state.json (first byte even: cursor, position, open sessions,
sudo totals) or detection.json (first byte odd: failure counters and the
baseline), the rest its bytes. The agent must restore from it (a damaged
file is ignored with a warning), know where to resume journalctl, and go
on: the events of a short attack and session, run through the restored
stages, must render everywhere, and the state saved after must be JSON.
"""

import atexit
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

pamsignal = harness.pamsignal

STATE_DIR = os.path.join(tempfile.gettempdir(),
                         "pamsignal-fuzz-state-%d" % os.getpid())
atexit.register(shutil.rmtree, STATE_DIR, ignore_errors=True)
CONFIG = pamsignal.parse_config(
    "[pamsignal]\nstate_dir = %s\nhost_provider = none\n[detection]\n"
    "brute_force_fast = 2 in 10m\nsuccess_after_failures = 1 in 1h\n"
    "learning_period = 0s\n" % STATE_DIR)

#: The key the sessions below are paired by (boot / PID / service).
SESSION_KEY = "b0/4242/sshd"
T0 = 1795780000000000


def events():
    """An attack that succeeds, a session closing, a first sudo."""
    common = dict(service="sshd", hostname="web1", pid=4242,
                  context_key=SESSION_KEY)
    failure = pamsignal.Event(
        action="login_failure", reason="bad_password", user="root",
        source_ip="203.0.113.9", source_port=4000, auth_method="password",
        **common)
    return [
        failure._replace(timestamp_us=T0),
        failure._replace(timestamp_us=T0 + 1000000, user="admin"),
        failure._replace(timestamp_us=T0 + 2000000, action="login_success",
                         reason=None),
        pamsignal.Event(action="session_closed", timestamp_us=T0 + 9000000,
                        **common),
        pamsignal.Event(action="sudo_command", timestamp_us=T0 + 9500000,
                        user="alice", target_user="root", service="sudo",
                        context_key="b0/77/sudo", command_line="/bin/id"),
        pamsignal.Event(action="login_failure", reason="bad_password",
                        service="sudo", user="alice", attempts=3,
                        timestamp_us=T0 + 9600000, context_key="b0/77/sudo"),
    ]


EVENTS = events()


def check(data):
    if not data:
        return
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    os.makedirs(STATE_DIR)
    file_name = "detection.json" if data[0] % 2 else "state.json"
    with open(os.path.join(STATE_DIR, file_name), "wb") as f:
        f.write(data[1:])
    agent = pamsignal.Agent(CONFIG, [])
    agent.restore()
    agent.source.pin_first_start(T0 / 1e6)
    position = agent.source.position(1795780000.0)
    assert all(type(argument) is str for argument in position), position
    pipeline = agent.pipeline
    for event in EVENTS:
        event = pipeline.sudo_attempts.observe(
            pipeline.sessions.observe(event))
        if event is None:
            continue
        # Restored values are shapes checked, not parsed again.
        harness.render_everywhere(event, parsed=False,
                                  sinks=harness.SOME_SINKS)
        for found in pipeline.detector.observe(event) + \
                pipeline.baseline.observe(event):
            harness.render_everywhere(found, parsed=False,
                                      sinks=harness.SOME_SINKS)
    json.dumps([pipeline.sessions.to_state(),
                pipeline.sudo_attempts.to_state(),
                pipeline.detector.to_state(), pipeline.baseline.to_state()],
               allow_nan=False)


def seeds():
    """The files the agent itself saves after these events."""
    shutil.rmtree(STATE_DIR, ignore_errors=True)
    agent = pamsignal.Agent(CONFIG, [])
    agent.store.prepare()
    pipeline = agent.pipeline
    opened = EVENTS[3]._replace(action="session_opened",
                                timestamp_us=T0 + 3000000, user="root",
                                source_ip="203.0.113.9", source_port=4000)
    for event in EVENTS[:3] + [opened, EVENTS[4]]:
        pipeline.sessions.observe(event)
        pipeline.detector.observe(event)
        pipeline.baseline.observe(event)
    pipeline.sudo_attempts.observe(EVENTS[5]._replace(attempts=None))
    agent.source.advance("s=abc;i=1f;b=b0;m=2;t=5f;x=9", T0)
    agent.source.since_us = T0 - 3600000000
    agent.pipeline.events = 1
    agent.save(0.0)
    agent.save_detection(0.0)
    found = []
    for number, name in enumerate(("state.json", "detection.json")):
        with open(os.path.join(STATE_DIR, name), "rb") as f:
            found.append(bytes([number]) + f.read())
    return found


DICTIONARY = ['"version":1', '"cursor":', '"realtime_us":', '"since_us":',
              '"sessions":', '"sudo_attempts":', '"counters":',
              '"baseline":', '"repeated":', '"once":', '"times":',
              '"users":', '"fired":', '"sources":', '"started_us":',
              '"networks":', '"asns":', '"countries":', '"sudo_users":',
              '"opened_us":', '"source_port":', '"user_id":', '"user":',
              '"source_ip":', "-1", "1e400", "9" * 330, "null", "true",
              "[]", "{}", '"%s"' % SESSION_KEY, '["', '",']

if __name__ == "__main__":
    harness.fuzz(check, seeds, DICTIONARY)
