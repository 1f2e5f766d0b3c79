"""Running as a service: sd_notify, signals, reload, health, degradation.

The real agent (`python3 pamsignal.py run`) against a fake journalctl, with
a real AF_UNIX datagram socket as $NOTIFY_SOCKET, real signals and a real
read-only bind mount."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import realsys
import receivers
from support import (PAMSIGNAL, AgentProcess, FakeJournal, json_line,
                     make_entry, pamsignal, wait_for, write_config)

FAILED = "Failed password for alice from 203.0.113.5 port %d ssh2"
ACCEPTED = "Accepted password for alice from 203.0.113.5 port %d ssh2"


class NotifySocket:
    """What systemd listens on: a datagram socket; keeps every message."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.env_value = "@" + address[1:] if address[0] == "\0" else address
        self.received = []
        self.lock = threading.Lock()
        self.open = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self):
        while self.open:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.received.append(data.decode("utf-8"))

    def messages(self):
        with self.lock:
            return list(self.received)

    def fields(self):
        """Every message as a dict of its KEY=VALUE lines."""
        return [dict(line.split("=", 1) for line in message.split("\n"))
                for message in self.messages()]

    def wait(self, predicate, timeout=20, since=0):
        """The first message (from index `since`) the predicate accepts."""
        assert wait_for(lambda: any(predicate(m) for m in self.fields()[
            since:]), timeout=timeout), self.messages()
        return [m for m in self.fields()[since:] if predicate(m)][0]

    def close(self):
        self.open = False
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path):
    """After each test, end what it started and left running (a failed
    test leaves its agent, and a fake journalctl that waits for ever)."""
    yield
    marker = str(tmp_path).encode()
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid() and \
                marker in _cmdline(pid):
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def notify_socket(tmp_path):
    sock = NotifySocket(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


class Service:
    """The agent run as systemd would: NOTIFY_SOCKET set, a fake journalctl
    that prints whatever the test appends to a feed file."""

    def __init__(self, tmp_path, notify, extra_env=None, config_extra="",
                 plan=None, stdout=subprocess.PIPE):
        self.tmp_path = tmp_path
        self.feed = tmp_path / "feed.jsonl"
        self.feed.write_text("")
        tail = {"tail": str(self.feed)}
        self.fake = FakeJournal(tmp_path, {"follow": (plan or []) + [tail]})
        self.state_dir = tmp_path / "state"
        self.config = str(tmp_path / "pamsignal.conf")
        self.metrics = str(self.state_dir / "pamsignal.prom")
        self.write_config(config_extra)
        env = self.fake.env()
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_USEC", None)
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify.env_value
        env.update(extra_env or {})
        self.process = subprocess.Popen(
            [sys.executable, PAMSIGNAL, "--config", self.config, "run",
             "--json"], stdout=stdout, stderr=subprocess.PIPE, env=env)
        self.sequence = 0

    def write_config(self, extra="", events="*"):
        write_config(self.config, (
            "[pamsignal]\nstate_dir = %s\njournalctl = %s\n%s\n"
            "[channel:out]\ntype = console\nevents = %s\n"
            "cooldown = off\nrate_limit = off\n"
            % (self.state_dir, self.fake.program, extra, events)))

    def append(self, message, identifier="sshd"):
        """One more journal entry; returns its cursor."""
        self.sequence += 1
        entry = make_entry(identifier, message, sequence=self.sequence,
                           __REALTIME_TIMESTAMP=str(int(time.time() * 1e6)))
        with open(str(self.feed), "a") as handle:
            handle.write(json_line(entry))
        return entry["__CURSOR"]

    def handled(self, cursor, timeout=20):
        """Wait until the agent saved this entry's cursor."""
        def saved():
            try:
                with open(str(self.state_dir / "state.json")) as handle:
                    return json.load(handle).get("cursor") == cursor
            except (OSError, ValueError):
                return False
        assert wait_for(saved, timeout=timeout), cursor

    def status(self, *args):
        return subprocess.run(
            [sys.executable, PAMSIGNAL, "--config", self.config, "status"]
            + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=30)

    def stop(self, sig=signal.SIGTERM):
        if self.process.poll() is None:
            self.process.send_signal(sig)
        if self.process.stdout is None:
            _, err = self.process.communicate(timeout=30)
            return [], err.decode(), self.process.returncode
        out, err = self.process.communicate(timeout=30)
        return ([json.loads(line) for line in out.decode().splitlines()],
                err.decode(), self.process.returncode)


def actions(events, action, component=None):
    return [e for e in events if e["event"]["action"] == action and (
        component is None or e["pamsignal"].get("detail") == component)]


def ready_after(notify, index):
    """A READY=1 among messages after the first `index` ones."""
    return wait_for(lambda: any("READY" in m for m in notify.fields()[
        index:]))


# ---------------------------------------------------------------- sd_notify


def test_ready_status_watchdog_and_stopping(tmp_path, notify_socket):
    service = Service(tmp_path, notify_socket,
                      extra_env={"WATCHDOG_USEC": "300000"})
    ready = notify_socket.wait(lambda m: m.get("READY") == "1")
    assert ready["STATUS"].startswith("Following the journal")
    service.handled(service.append(FAILED % 1))
    # Pings keep coming from the main loop, every WATCHDOG_USEC / 2.
    assert wait_for(lambda: sum("WATCHDOG" in m for m in
                                notify_socket.fields()) >= 5)
    events, stderr, code = service.stop()
    stopping = notify_socket.wait(lambda m: m.get("STOPPING") == "1")
    assert stopping["STATUS"] == "Stopping"
    assert code == 0 and len(events) == 1
    fields = notify_socket.fields()
    first = [min(i for i, m in enumerate(fields) if key in m)
             for key in ("READY", "WATCHDOG", "STOPPING")]
    assert first == sorted(first)
    assert all(m.get("WATCHDOG", "1") == "1" for m in notify_socket.fields())


def test_abstract_socket_and_watchdog_of_another_pid(tmp_path):
    notify = NotifySocket("\0pamsignal-test-%s" % secrets.token_hex(6))
    try:
        service = Service(tmp_path, notify, extra_env={
            "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        notify.wait(lambda m: m.get("READY") == "1")
        # The loop pings before it reads, so this entry proves it looped.
        service.handled(service.append(FAILED % 2))
        _, _, code = service.stop()
        assert code == 0
        notify.wait(lambda m: m.get("STOPPING") == "1")
        assert not any("WATCHDOG" in m for m in notify.fields())
    finally:
        notify.close()


def test_no_notify_socket_is_no_error(tmp_path):
    service = Service(tmp_path, None)
    service.handled(service.append(FAILED % 3))
    events, stderr, code = service.stop()
    assert code == 0 and len(events) == 1
    assert "notify" not in stderr


@pytest.mark.parametrize("environ, pid, expected", [
    ({}, 5, None),
    ({"WATCHDOG_USEC": "30000000"}, 5, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "5"}, 5, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "6"}, 5, None),
    ({"WATCHDOG_USEC": "0"}, 5, None),
    ({"WATCHDOG_USEC": "soon"}, 5, None),
])
def test_watchdog_interval(environ, pid, expected):
    assert pamsignal.watchdog_interval_s(environ, pid) == expected


@pytest.mark.parametrize("value, expected", [
    ("/run/systemd/notify", "/run/systemd/notify"),
    ("@abstract", "\0abstract"),
    ("vsock:2:1234", None), ("", None)])
def test_notify_address(value, expected):
    assert pamsignal.notify_address({"NOTIFY_SOCKET": value}) == expected


# ---------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_finishes_saves_and_ends_a_hung_journalctl(tmp_path, sig):
    first = make_entry("sshd", FAILED % 10, sequence=1)
    fake = FakeJournal(tmp_path, {"follow": [{
        "output": [json_line(first)], "hang": True, "ignore_term": True}]})
    config = write_config(tmp_path / "pamsignal.conf", (
        "[pamsignal]\nstate_dir = %s\njournalctl = %s\n"
        % (tmp_path / "state", fake.program)))
    agent = AgentProcess(config, env=fake.env())
    state = tmp_path / "state" / "state.json"
    assert wait_for(lambda: state.exists() and json.loads(
        state.read_text()).get("cursor") == first["__CURSOR"])
    journalctl = [pid for pid in os.listdir("/proc") if pid.isdigit()
                  and fake.program.encode() in _cmdline(pid)]
    assert journalctl, "the fake journalctl should be running"
    agent.process.send_signal(sig)
    events, stderr, code = agent.stop(timeout=30)
    assert code == 0, stderr
    assert [e["source"]["port"] for e in events] == [10]
    assert not [pid for pid in journalctl
                if fake.program.encode() in _cmdline(pid)]
    metrics = pamsignal.parse_metrics(
        (tmp_path / "state" / "pamsignal.prom").read_text())
    assert metrics["pamsignal_running"][0][1] == 0


def _cmdline(pid):
    try:
        with open("/proc/%s/cmdline" % pid, "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def test_sighup_reload_replaces_channels_and_keeps_counters(
        tmp_path, notify_socket):
    service = Service(tmp_path, notify_socket, config_extra=(
        "\n[detection]\nbrute_force_fast = 3 in 10m\n"))
    notify_socket.wait(lambda m: m.get("READY") == "1")
    service.append(FAILED % 21)
    service.handled(service.append(FAILED % 22))
    service.write_config("\n[detection]\nbrute_force_fast = 3 in 10m\n"
                         "learning_period = 1d\n",
                         events="brute_force_detected, login_success")
    seen = len(notify_socket.messages())
    before_us = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
    service.process.send_signal(signal.SIGHUP)
    reloading = notify_socket.wait(lambda m: m.get("RELOADING") == "1")
    after_us = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
    assert before_us <= int(reloading["MONOTONIC_USEC"]) <= after_us
    assert ready_after(notify_socket, seen + 1)
    service.handled(service.append(FAILED % 23))
    events, stderr, code = service.stop()
    assert code == 0
    assert "configuration reloaded from %s (1 channel)" % service.config \
        in stderr
    # Old channel: every failure; new channel: not login_failure, but the
    # third failure still crossed the threshold the first two started.
    assert [e["source"]["port"] for e in actions(events, "login_failure")] \
        == [21, 22]
    (brute,) = actions(events, "brute_force_detected")
    assert brute["pamsignal"]["attempts"] == 3
    metrics = pamsignal.parse_metrics(open(service.metrics).read())
    assert ({"result": "ok"}, 1.0) in metrics[
        "pamsignal_config_reloads_total"]


def test_invalid_reload_keeps_the_old_configuration_and_says_why(
        tmp_path, notify_socket):
    service = Service(tmp_path, notify_socket)
    notify_socket.wait(lambda m: m.get("READY") == "1")
    write_config(service.config, "[pamsignal]\nstate_dir = %s\n"
                 "journalctl = %s\n[detection]\nbrute_force_fast = lots\n"
                 % (service.state_dir, service.fake.program))
    seen = len(notify_socket.messages())
    service.process.send_signal(signal.SIGHUP)
    notify_socket.wait(lambda m: m.get("RELOADING") == "1")
    assert ready_after(notify_socket, seen + 1)
    status = [m["STATUS"] for m in notify_socket.fields()[seen:]
              if "STATUS" in m][-1]
    with open(service.config) as handle:
        line = handle.read().splitlines().index("brute_force_fast = lots")
    where = "%s:%d: [detection] brute_force_fast" % (service.config,
                                                     line + 1)
    assert "configuration reload failed" in status and where in status
    # Still on the old configuration: the channel takes every event.
    service.handled(service.append(FAILED % 31))
    events, stderr, code = service.stop()
    assert code == 0
    assert "configuration reload failed; still running on the previous " \
        "configuration" in stderr
    assert "%s: expected 'N in DURATION'" % where in stderr
    (failed,) = actions(events, "config_reload_failed")
    assert failed["event"]["category"] == ["configuration"]
    assert failed["event"]["outcome"] == "failure"
    assert where in failed["message"]
    assert [e["source"]["port"] for e in actions(events, "login_failure")] \
        == [31]
    metrics = pamsignal.parse_metrics(open(service.metrics).read())
    assert ({"result": "failed"}, 1.0) in metrics[
        "pamsignal_config_reloads_total"]
    assert where in metrics["pamsignal_last_error_info"][0][0]["message"]


def test_a_reload_to_an_unusable_ca_file_keeps_the_agent_running(
        tmp_path, notify_socket):
    service = Service(tmp_path, notify_socket)
    notify_socket.wait(lambda m: m.get("READY") == "1")
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    write_config(service.config, "[pamsignal]\nstate_dir = %s\n"
                 "journalctl = %s\n[channel:hook]\ntype = webhook\n"
                 "url = https://127.0.0.1:9/x\nca_file = %s\n"
                 % (service.state_dir, service.fake.program, bad))
    os.chmod(str(service.config), 0o600)  # the URL is a secret
    seen = len(notify_socket.messages())
    service.process.send_signal(signal.SIGHUP)
    assert ready_after(notify_socket, seen + 1)
    service.handled(service.append(FAILED % 33))  # the old channel works
    events, stderr, code = service.stop()
    assert code == 0, stderr
    assert "[channel:hook] ca_file: cannot load %s" % bad in stderr
    assert [e["source"]["port"] for e in actions(events, "login_failure")] \
        == [33]


# ---------------------------------------------------------------- health


def test_metrics_file_and_status_of_a_running_then_stopped_agent(tmp_path):
    service = Service(tmp_path, None)
    service.append(FAILED % 41)
    service.handled(service.append(ACCEPTED % 42))
    assert wait_for(lambda: os.path.exists(service.metrics))
    text = open(service.metrics).read()
    check_exposition_format(text)
    result = service.status()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is running (pid %d" % service.process.pid in result.stdout
    assert "degraded:   no" in result.stdout
    # The counts are written every METRICS_FLUSH_S: wait for them.
    assert wait_for(lambda: json.loads(service.status("--json").stdout)[
        "entries"] == 2, timeout=3 * pamsignal.METRICS_FLUSH_S)
    report = json.loads(service.status("--json").stdout)
    assert report["state"] == "running"
    assert report["events"] == {"login_failure": 1, "login_success": 1}
    assert report["channels"] == {"out": {"sent": 2, "failed": 0}}
    assert report["journal_lag_s"] >= 0
    _, _, code = service.stop()
    assert code == 0
    result = service.status()
    assert result.returncode == 1
    assert "is not running: it stopped cleanly" in result.stdout
    assert json.loads(service.status("--json").stdout)["state"] == "stopped"


def test_a_dripping_channel_shows_as_failed_and_degraded(tmp_path):
    """`run` with a webhook whose receiver drips its answer a byte a
    second: each request ends at the channel's 3 s timeout as a failure,
    and status says the channel is degraded."""
    with receivers.HttpReceiver(default=receivers.Drip(60)) as receiver:
        service = Service(tmp_path, None, config_extra=(
            "[channel:slow]\ntype = webhook\nurl = %s/hook\ntimeout = 3s\n"
            % receiver.url))
        service.handled(service.append(ACCEPTED % 43))

        def report():
            return json.loads(service.status("--json").stdout)

        assert wait_for(lambda: report()["channels"].get("slow", {}).get(
            "failed", 0) >= 1, timeout=90)
        shown = report()
        assert "channel:slow" in shown["degraded"]
        assert shown["channels"]["slow"]["waiting"] >= 1  # and the news
        assert "timed out (no complete answer within the 3 s timeout)" in \
            shown["last_error"]
        assert service.status().returncode == 1
        _, err, _ = service.stop()
    assert "channel slow: cannot reach 127.0.0.1: timed out" in err


def test_status_of_a_killed_agent_and_of_none(tmp_path):
    service = Service(tmp_path, None)
    assert wait_for(lambda: os.path.exists(service.metrics))
    service.stop(signal.SIGKILL)
    result = service.status()
    assert result.returncode == 1
    assert "ended without stopping cleanly" in result.stdout
    os.unlink(service.metrics)
    result = service.status()
    assert result.returncode == 1
    assert "no health file %s" % service.metrics in result.stdout


def test_health_report_calls_old_metrics_of_a_live_process_stale():
    text = pamsignal.render_metrics([
        ("pamsignal_running", {}, 1), ("pamsignal_pid", {}, 77),
        ("pamsignal_metrics_time_seconds", {}, 1000.0)])
    metrics = pamsignal.parse_metrics(text)
    fresh = pamsignal.health_report(metrics, 1005.0, alive=lambda pid: True)
    old = pamsignal.health_report(
        metrics, 1001.0 + pamsignal.METRICS_STALE_S, alive=lambda pid: True)
    gone = pamsignal.health_report(metrics, 1005.0, alive=lambda pid: False)
    assert (fresh["state"], old["state"], gone["state"]) == (
        "running", "stale", "gone")
    assert "is not responding" in pamsignal.render_status(old, "/x")


def test_label_values_are_escaped_and_read_back():
    message = 'a "quoted" back\\slash\nand a new line'
    text = pamsignal.render_metrics([
        ("pamsignal_last_error_info", {"message": message}, 1),
        ("pamsignal_events_total", {"action": "login_success"}, 3)])
    check_exposition_format(text)
    assert '{message="a \\"quoted\\" back\\\\slash\\nand a new line"} 1' \
        in text
    metrics = pamsignal.parse_metrics(text)
    assert metrics["pamsignal_last_error_info"] == [({"message": message},
                                                     1.0)]


def check_exposition_format(text):
    """Prometheus text format: HELP and TYPE once per family, before its
    samples; sample lines `name{k="v",...} number`."""
    import re
    sample = re.compile(r'^([a-z_]+)(\{[a-z_]+="(?:[^"\\\n]|\\[\\n"])*"'
                        r'(?:,[a-z_]+="(?:[^"\\\n]|\\[\\n"])*")*\})? '
                        r'(-?[0-9.]+(?:e[+-]?[0-9]+)?)$')
    helped, typed = set(), {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge") and name not in typed
            typed[name] = kind
        else:
            match = sample.match(line)
            assert match, line
            assert match.group(1) in helped and match.group(1) in typed
            if typed[match.group(1)] == "counter":
                assert match.group(1).endswith("_total")


# ---------------------------------------------------------------- degradation


def test_crashing_then_missing_journalctl_is_one_degradation(
        tmp_path, notify_socket):
    crash = {"exit": 1, "stderr": "Failed to open journal: Bad message\n"}
    service = Service(tmp_path, notify_socket, plan=[
        # (a cursor of its own: append() numbers its entries from 1)
        dict(crash, output=[json_line(make_entry("sshd", FAILED % 51,
                                                 sequence=100))]),
        crash])
    notify_socket.wait(lambda m: "Degraded: journal: journalctl exited "
                       "with status 1: Failed to open journal"
                       in m.get("STATUS", ""))
    assert wait_for(lambda: len(service.fake.calls()) >= 2)
    # Missing for a while: its restarts fail too, still one degradation.
    program = service.fake.program
    os.rename(program, program + ".away")
    notify_socket.wait(lambda m: "cannot start %s" % program
                       in m.get("STATUS", ""), timeout=30)
    missing = len(notify_socket.messages())
    os.rename(program + ".away", program)
    notify_socket.wait(lambda m: m.get("STATUS", "").startswith(
        "Following the journal"), timeout=60, since=missing)
    service.handled(service.append(FAILED % 52))
    events, stderr, code = service.stop()
    assert code == 0
    (degraded,) = actions(events, "monitoring_degraded", "journal")
    assert "Failed to open journal" in degraded["message"]
    assert degraded["event"]["severity"] == 7
    assert len(actions(events, "monitoring_restored", "journal")) == 1
    assert [e["source"]["port"] for e in actions(events, "login_failure")] \
        == [51, 52]
    assert stderr.count("monitoring degraded: journal") == 1


def _mount(*args):
    subprocess.run(["mount"] + list(args), check=True, timeout=30)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="a read-only bind mount needs root")
def test_read_only_state_directory_degrades_then_recovers(
        tmp_path, notify_socket):
    metrics_file = tmp_path / "metrics" / "pamsignal.prom"
    metrics_file.parent.mkdir()
    service = Service(tmp_path, notify_socket,
                      config_extra="metrics_file = %s\n" % metrics_file)
    notify_socket.wait(lambda m: m.get("READY") == "1")
    service.handled(service.append(FAILED % 61))
    state = str(service.state_dir)
    _mount("--bind", state, state)
    try:
        _mount("-o", "remount,bind,ro", state)
        service.append(FAILED % 62)
        notify_socket.wait(lambda m: "Degraded: state: " in m.get(
            "STATUS", "") and "Read-only file system" in m["STATUS"])
        service.append(FAILED % 63)  # still reported while degraded
    finally:
        subprocess.run(["umount", state], timeout=30)
    last = service.append(FAILED % 64)
    service.handled(last)  # saved again once writable
    events, stderr, code = service.stop()
    assert code == 0
    assert [e["source"]["port"] for e in actions(events, "login_failure")] \
        == [61, 62, 63, 64]
    (degraded,) = actions(events, "monitoring_degraded", "state")
    assert "Read-only file system" in degraded["message"]
    assert len(actions(events, "monitoring_restored", "state")) == 1
    assert "monitoring degraded: state:" in stderr


def test_failing_console_channel_is_degraded_not_fatal(tmp_path):
    with open("/dev/full", "w") as full:
        service = Service(tmp_path, None, stdout=full)
    service.handled(service.append(FAILED % 71))

    def failing():
        result = service.status("--json")
        report = json.loads(result.stdout) if result.stdout else {}
        return "channel:out" in report.get("degraded", ()) and \
            report["channels"]["out"]["failed"] >= 1
    assert wait_for(failing, timeout=3 * pamsignal.METRICS_FLUSH_S)
    service.handled(service.append(FAILED % 72))  # still reading
    _, stderr, code = service.stop()
    assert code == 0
    assert stderr.count("monitoring degraded: channel:out") == 1
    assert "No space left on device: 'standard output'" in stderr


class FlakySink(pamsignal.Sink):
    """A channel that fails `failures` times, then works."""

    def __init__(self, name, failures):
        pamsignal.Sink.__init__(self, name)
        self.failures = failures
        self.sent = []

    def send(self, event, delay_s=0):
        if self.failures:
            self.failures -= 1
            raise OSError("connection refused")
        self.sent.append(event)


def test_the_agent_keeps_time_by_the_clock_it_is_given(tmp_path):
    """Agent takes its wall clock as Pipeline and Spool do: its start, a
    degradation's event and the error's time come from that clock."""
    config = pamsignal.parse_config("[pamsignal]\nstate_dir = %s\n"
                                    % tmp_path)
    record = FlakySink("record", 0)
    agent = pamsignal.Agent(config, [pamsignal.Channel(
        record, pamsignal.ChannelGate(pamsignal.SHOW_EVERYTHING))],
        clock=lambda: 1796544000.5)
    agent.impair("journal", "journalctl is not running")
    (degraded,) = [e for e in record.sent
                   if e.action == "monitoring_degraded"]
    assert degraded.timestamp_us == 1796544000500000
    metrics = pamsignal.parse_metrics(pamsignal.render_metrics(
        agent.metric_samples(1796544060.5)))
    assert metrics["pamsignal_start_time_seconds"] == [({}, 1796544000.5)]
    assert metrics["pamsignal_uptime_seconds"] == [({}, 60.0)]
    assert metrics["pamsignal_last_error_time_seconds"] == [
        ({}, 1796544000.5)]


def test_a_channel_failing_many_times_is_one_degraded_one_restored(
        tmp_path):
    config = pamsignal.parse_config("[pamsignal]\nstate_dir = %s\n"
                                    % tmp_path)
    flaky, record = FlakySink("flaky", 3), FlakySink("record", 0)
    everything = pamsignal.SHOW_EVERYTHING
    agent = pamsignal.Agent(config, [
        pamsignal.Channel(sink, pamsignal.ChannelGate(everything))
        for sink in (flaky, record)])
    agent.store.prepare()
    for port in range(81, 86):
        agent.follow_lines([json_line(make_entry(
            "sshd", FAILED % port, sequence=port)).encode()], 1.0)
        agent.check_channels()
    got = [(e.action, e.detail) for e in record.sent
           if e.action in pamsignal.AGENT_ACTIONS]
    assert got == [("monitoring_degraded", "channel:flaky"),
                   ("monitoring_restored", "channel:flaky")]
    assert agent.pipeline.failed["flaky"] == 3
    assert agent.pipeline.sent["record"] == len(record.sent)


def test_no_journald_is_said_at_once_and_its_arrival_followed(tmp_path):
    """Without journald, journalctl -f waits for ever without a word: the
    agent says what is missing and what to start, and follows a journald
    that appears (its socket bound) without a restart of its own."""
    config = pamsignal.parse_config("[pamsignal]\nstate_dir = %s\n"
                                    % tmp_path)
    record = FlakySink("record", 0)
    agent = pamsignal.Agent(config, [pamsignal.Channel(
        record, pamsignal.ChannelGate(pamsignal.SHOW_EVERYTHING))])
    socket_path = str(tmp_path / "journal-socket")
    agent.source.socket_path = socket_path
    agent.check_journal(100.0)
    agent.pipeline.flush()
    (degraded,) = [e for e in record.sent
                   if e.action == "monitoring_degraded"]
    assert degraded.detail == "journal"
    assert socket_path in degraded.message
    assert "start it (systemctl start systemd-journald" in degraded.message
    agent.check_journal(101.0)  # still missing: said once
    agent.pipeline.flush()
    assert [e.action for e in record.sent] == ["monitoring_degraded"]

    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        journald.bind(socket_path)
        agent.source.restart_at = 1e9  # a restart must come from its arrival
        agent.check_journal(102.0)
        assert agent.source.process is None
        assert agent.source.restart_at == 102.0
    finally:
        journald.close()


def test_a_socket_left_by_a_dead_journald_is_no_journald(tmp_path):
    """The socket file outlives its journald (killed, or a machine restored
    from a snapshot): the agent still says none runs, and follows the one
    that binds it again."""
    socket_path = str(tmp_path / "journal-socket")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(socket_path)
    dead.close()
    assert os.path.exists(socket_path)
    assert pamsignal.journald_absence(socket_path) == (
        "nothing listens on %s" % socket_path)
    config = pamsignal.parse_config("[pamsignal]\nstate_dir = %s\n"
                                    % tmp_path)
    record = FlakySink("record", 0)
    agent = pamsignal.Agent(config, [pamsignal.Channel(
        record, pamsignal.ChannelGate(pamsignal.SHOW_EVERYTHING))])
    agent.source.socket_path = socket_path
    agent.check_journal(100.0)
    agent.pipeline.flush()
    (degraded,) = record.sent
    assert degraded.message.startswith(
        "no systemd-journald runs here (nothing listens on %s)" % socket_path)

    os.unlink(socket_path)  # as a starting journald does
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        journald.bind(socket_path)
        assert pamsignal.journald_absence(socket_path) is None
        agent.check_journal(101.0)
        assert agent.source.restart_at == 101.0
    finally:
        journald.close()


def test_test_alert_without_a_configuration_file_says_how_to_make_one():
    missing = pamsignal.no_channel_message("/etc/pamsignal/pamsignal.conf",
                                           exists=False)
    assert missing.startswith("there is no configuration file "
                              "/etc/pamsignal/pamsignal.conf: create it "
                              "with `pamsignal install`")
    empty = pamsignal.no_channel_message("/x.conf", exists=True)
    assert empty.startswith("no channel is configured in /x.conf: add a "
                            "[channel:NAME] section")
    if os.path.exists(pamsignal.DEFAULT_CONFIG_PATH):
        return  # this machine has one: the command itself is not tried
    result = subprocess.run([sys.executable, PAMSIGNAL, "test-alert"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr == "pamsignal: error: %s\n" % missing


# ------------------------------------------------------- a full disk, named


@pytest.fixture
def full_disk(tmp_path):
    """A tiny tmpfs mounted for the test and filled to the last byte."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        realsys.unavailable("mounting a tmpfs needs root and mount")
    disk = tmp_path / "full"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(disk))
    try:
        with open(str(disk / "filler"), "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"x" * 4096)
            except OSError:
                pass
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], timeout=30)


def test_every_write_on_a_full_disk_names_its_file(tmp_path, full_disk,
                                                   capsys):
    metrics_file = str(full_disk / "pamsignal.prom")
    config = pamsignal.parse_config(
        "[pamsignal]\nstate_dir = %s\nmetrics_file = %s\n"
        % (tmp_path / "state", metrics_file))
    agent = pamsignal.Agent(config, [])
    agent.write_metrics(1.0)
    assert agent.health.impaired["metrics"] == (
        "%s: No space left on device" % metrics_file)
    # The state and the detection counters.
    for store in (pamsignal.StateStore(str(full_disk)),
                  pamsignal.StateStore(str(full_disk), "detection.json")):
        with pytest.raises(pamsignal.StateError) as raised:
            store.save({"version": 1})
        assert str(raised.value) == "cannot save state to %s: No space " \
            "left on device" % store.path
    # Any file written whole.
    with pytest.raises(OSError) as raised:
        pamsignal.replace_file(str(full_disk / "x.json"), "{}")
    assert raised.value.filename == str(full_disk / "x.json")
    # A channel's spool: the alert is kept in memory, and the log says
    # which file the disk refused.
    spool = pamsignal.Spool(str(full_disk / "spool"), 1, 60)
    capsys.readouterr()
    event = pamsignal.Event(action="login_success", user="alice",
                            timestamp_us=1)
    assert spool.put(event)
    err = capsys.readouterr().err
    assert "cannot write the spool file %s/%s.alert: No space left on " \
        "device; keeping alerts in memory" % (
            spool.directory, pamsignal.alert_id(event)) in err
    # A second alert overflows it: the count of what it dropped cannot be
    # written either, and that says where.
    spool.put(event._replace(user="bob"))
    spool.flush()
    err += capsys.readouterr().err
    assert "cannot write %s/dropped.json: No space left on device" \
        % spool.directory in err
    assert "None" not in err
