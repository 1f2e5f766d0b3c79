"""The journal source against a fake journalctl: deaths, garbage, hangs."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from realsys import child_processes
from support import (PAMSIGNAL, AgentProcess, FakeJournal, json_line,
                     make_entry, pamsignal, wait_for, write_config)

FAILED = "Failed password for alice from 203.0.113.5 port %d ssh2"


def agent_config(tmp_path, fake, extra=""):
    return write_config(tmp_path / "pamsignal.conf", (
        "[pamsignal]\nstate_dir = %s\njournalctl = %s\n%s"
        % (tmp_path / "state", fake.program, extra)))


def ports(events):
    return [e["source"]["port"] for e in events
            if e["event"]["action"] == "login_failure"]


def read_state(tmp_path):
    with open(str(tmp_path / "state" / "state.json")) as handle:
        return json.load(handle)


def cursor_saved(tmp_path, entry):
    """A wait_for condition: the agent has saved `entry`'s cursor."""
    state = tmp_path / "state" / "state.json"
    return lambda: state.exists() and read_state(tmp_path).get(
        "cursor") == entry["__CURSOR"]


def test_follow_command_asks_only_for_watched_services_from_now(tmp_path):
    fake = FakeJournal(tmp_path, {"follow": [{"hang": True}]})
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    assert wait_for(lambda: fake.calls())
    agent.stop()
    argv = fake.calls()[0]
    assert argv[:3] == ["--follow", "--output=json", "--no-pager"]
    assert "SYSLOG_IDENTIFIER=sshd-session" in argv
    assert "SYSLOG_IDENTIFIER=sudo" in argv
    assert not any(a.startswith("SYSLOG_IDENTIFIER=cron") for a in argv)
    assert any(a.startswith("--output-fields=MESSAGE,") for a in argv)
    since = [a for a in argv if a.startswith("--since=@")]
    assert len(since) == 1 and float(since[0][9:]) > 1.7e9


def test_restarts_after_death_mid_line_and_resumes_after_cursor(tmp_path):
    first = make_entry("sshd", FAILED % 1001, sequence=1)
    second = make_entry("sshd", FAILED % 1002, sequence=2)
    fake = FakeJournal(tmp_path, {"follow": [
        {"output": [json_line(first), json_line(second)[:40]], "exit": 1,
         "stderr": "journal corrupted\n"},
        {"output": [json_line(second)], "hang": True}]})
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    assert wait_for(lambda: len(fake.calls()) >= 2)
    assert wait_for(cursor_saved(tmp_path, second))
    events, stderr, code = agent.stop()
    assert ports(events) == [1001, 1002]
    assert "--after-cursor=%s" % first["__CURSOR"] in fake.calls()[1]
    assert "exited with status 1: journal corrupted" in stderr
    assert code == 0


def test_garbage_huge_and_unknown_fields_do_not_stop_it(tmp_path):
    odd = make_entry("sshd", FAILED % 2002, sequence=3,
                     FOO=[1, 2, 3], BAR=None, _UNKNOWN={"x": 1})
    odd["BAR"] = None
    binary = make_entry("sshd", None, sequence=4)
    binary["MESSAGE"] = list(
        (FAILED % 2003).replace("alice", "al\xffce").encode("latin-1"))
    huge = make_entry("sshd", "Failed password for " + "x" * 1000000 +
                      " from 198.51.100.1 port 1 ssh2", sequence=5)
    oversized = "{" + " " * (5 * 1024 * 1024) + "}\n"
    fake = FakeJournal(tmp_path, {"follow": [{"output": [
        "not json at all\n", "[1, 2, 3]\n", "{\"MESSAGE\": \n",
        json_line(huge), oversized, json_line(odd), json_line(binary),
        "\n"], "hang": True}]})
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    assert wait_for(cursor_saved(tmp_path, binary))
    events, stderr, _ = agent.stop()
    assert ports(events) == [2002, 2003]
    assert events[1]["user"]["name"] == "al\ufffdce"
    assert "not a journal JSON object" in stderr
    assert "dropped a journal line longer than" in stderr


def test_journalctl_that_cannot_start_is_a_plain_error(tmp_path):
    config = write_config(tmp_path / "c.conf", (
        "[pamsignal]\nstate_dir = %s\njournalctl = /nonexistent/journalctl\n"
        % (tmp_path / "state")))
    result = subprocess.run([sys.executable, PAMSIGNAL, "--config", config,
                             "run"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, timeout=30)
    assert result.returncode == 1
    assert b"cannot start /nonexistent/journalctl: No such file" \
        in result.stderr


def test_refused_cursor_falls_back_to_time_of_last_entry(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text(json.dumps(
        {"version": 1, "cursor": "s=dead;i=1", "realtime_us":
         1795780000123456, "sessions": []}))
    # From its time, journalctl shows the last handled entry once more.
    handled = make_entry("sshd", FAILED % 3001, __CURSOR="s=dead;i=1")
    new = make_entry("sshd", FAILED % 3002, sequence=7)
    refusal = {"exit": 1,
               "stderr": "Failed to seek to cursor: Invalid argument"}
    fake = FakeJournal(tmp_path, {"follow": [
        refusal, refusal, refusal,
        {"output": [json_line(handled), json_line(new)], "hang": True}]})
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    assert wait_for(cursor_saved(tmp_path, new), timeout=30)
    events, stderr, _ = agent.stop()
    calls = fake.calls()
    assert all("--after-cursor=s=dead;i=1" in c for c in calls[:3])
    assert "--since=@1795780000.123456" in calls[3]
    assert "refusing the saved cursor" in stderr
    assert ports(events) == [3002]


def test_the_entry_after_which_journalctl_was_asked_is_not_handled_again(
        tmp_path):
    # A journalctl that gives back the very entry named by --after-cursor
    # (not right, but not ours to trust) made one more event each start.
    entry = make_entry("sshd", FAILED % 4444, sequence=3)
    again = {"output": [json_line(entry)], "exit": 0}
    fake = FakeJournal(tmp_path, {"follow": [
        again, again, dict(again, hang=True)]})
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    assert wait_for(lambda: len(fake.calls()) >= 3, timeout=30)
    assert wait_for(cursor_saved(tmp_path, entry))
    events, _, _ = agent.stop()
    assert "--after-cursor=%s" % entry["__CURSOR"] in fake.calls()[2]
    assert ports(events) == [4444]


def test_a_refused_cursor_never_resumes_from_a_time_still_to_come(tmp_path):
    # The last entry was stamped ahead (the clock was set back since): from
    # its time, journalctl would skip all that is written until then.
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    ahead_us = int((time.time() + 10 * 365 * 86400) * 1e6)
    (state_dir / "state.json").write_text(json.dumps(
        {"version": 1, "cursor": "s=dead;i=1", "realtime_us": ahead_us,
         "sessions": []}))
    refusal = {"exit": 1,
               "stderr": "Failed to seek to cursor: Invalid argument"}
    fake = FakeJournal(tmp_path, {"follow": [
        refusal, refusal, refusal, {"hang": True}]})
    before_s = time.time()
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    assert wait_for(lambda: len(fake.calls()) >= 4, timeout=30)
    agent.stop()
    since = [a for a in fake.calls()[3] if a.startswith("--since=@")]
    assert len(since) == 1
    assert before_s <= float(since[0][len("--since=@"):]) <= time.time()


def test_journalctl_closing_its_stderr_early_is_no_busy_loop(tmp_path):
    """A wrapper that sends journalctl's stderr away closes the pipe at
    once; the agent must not spin on it (it did, at 100% CPU)."""
    fake = FakeJournal(tmp_path, {"follow": [{"hang": True}]})
    wrapper = tmp_path / "quiet-journalctl"
    wrapper.write_text("#!/bin/sh\nexec %s \"$@\" 2>&-\n" % fake.program)
    wrapper.chmod(0o755)
    config = write_config(tmp_path / "q.conf", (
        "[pamsignal]\nstate_dir = %s\njournalctl = %s\n"
        % (tmp_path / "state", wrapper)))
    agent = AgentProcess(config, env=fake.env())
    assert wait_for(lambda: fake.calls())
    wait_for(lambda: False, timeout=2.0)
    with open("/proc/%d/stat" % agent.process.pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    cpu_ticks = int(fields[11]) + int(fields[12])  # utime + stime
    agent.stop()
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    # A spinning loop burns the whole 2 s; an idle one a few start-up ticks.
    assert cpu_ticks < ticks_per_second, cpu_ticks


def test_sigterm_saves_cursor_of_entries_that_gave_no_event(tmp_path):
    quiet = make_entry("sshd", "Server listening on 0.0.0.0 port 22.",
                       sequence=9)
    fake = FakeJournal(tmp_path, {"follow": [
        {"output": [json_line(quiet)], "hang": True}]})
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    assert wait_for(lambda: fake.calls())
    wait_for(lambda: False, timeout=1.0)
    events, _, code = agent.stop()
    assert code == 0 and events == []
    assert read_state(tmp_path)["cursor"] == quiet["__CURSOR"]


def test_a_silent_follower_is_restarted_when_entries_were_missed(tmp_path):
    fake = FakeJournal(tmp_path, {"follow": [{"hang": True}]})
    source = pamsignal.JournalSource(fake.program, "now", cursor="s=1;i=2")
    os.environ["FAKE_PLAN"] = fake.plan_path
    try:
        source.start(now=0.0)
        assert wait_for(lambda: len(fake.calls()) == 1)
        source.supervise(now=10.0, probe=lambda: True)
        assert source.process is not None, "checked too early"
        source.supervise(now=pamsignal.STALL_CHECK_S + 1,
                         probe=lambda: False)
        assert source.process is not None, "nothing missed, no restart"
        source.supervise(now=2 * pamsignal.STALL_CHECK_S + 2,
                         probe=lambda: True)
        assert source.process is None
        source.supervise(now=2 * pamsignal.STALL_CHECK_S + 3)
        assert source.process is not None
        assert wait_for(lambda: len(fake.calls()) == 2)
        assert "--after-cursor=s=1;i=2" in fake.calls()[1]
    finally:
        source.stop()
        del os.environ["FAKE_PLAN"]


@pytest.mark.parametrize("age_s, missed", [(3600, True), (0, False),
                                           (None, False)])
def test_missed_entries_probe_compares_the_newest_entry_age(
        tmp_path, age_s, missed):
    import time
    output = [] if age_s is None else [json_line(make_entry(
        "sshd", "x", __REALTIME_TIMESTAMP=str(int((time.time() - age_s)
                                                   * 1e6))))]
    fake = FakeJournal(tmp_path, {"follow": [{"hang": True}],
                                  "once": [{"output": output}]})
    source = pamsignal.JournalSource(fake.program, "now", cursor="s=1;i=2")
    os.environ["FAKE_PLAN"] = fake.plan_path
    try:
        assert source.missed_entries() is missed
    finally:
        del os.environ["FAKE_PLAN"]
    probe_argv = fake.calls()[0]
    assert "--follow" not in probe_argv
    assert "--after-cursor=s=1;i=2" in probe_argv
    assert "--lines=1" in probe_argv


def test_start_position_is_kept_when_stopped_before_any_entry(tmp_path):
    fake = FakeJournal(tmp_path, {"follow": [{"hang": True}]})
    config = agent_config(tmp_path, fake, "first_start = -1h\n")
    agent = AgentProcess(config, env=fake.env())
    assert wait_for(lambda: len(fake.calls()) == 1)
    agent.stop()
    again = AgentProcess(config, env=fake.env())
    assert wait_for(lambda: len(fake.calls()) == 2)
    again.stop()
    first, second = [[a for a in call if a.startswith("--since=@")]
                     for call in fake.calls()]
    assert first == second and len(first) == 1
    import time
    assert abs(float(first[0][9:]) - (time.time() - 3600)) < 120
    assert read_state(tmp_path)["cursor"] is None


def test_a_stop_that_signals_journalctl_too_is_not_a_journalctl_failure(
        tmp_path):
    """systemctl stop (KillMode=control-group) signals journalctl with the
    agent: that is no failure to report before `stopped`."""
    fake = FakeJournal(tmp_path, {"follow": [{"hang": True}]})
    agent = subprocess.Popen(
        [sys.executable, PAMSIGNAL, "--config", agent_config(tmp_path, fake),
         "run", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=fake.env(), start_new_session=True)
    try:
        # Stopped while following: the agent in its loop, journalctl alive.
        assert wait_for(lambda: os.path.exists(
            str(tmp_path / "state" / "state.json")) and
            child_processes(agent.pid, fake.program))
        time.sleep(0.5)
        os.killpg(agent.pid, signal.SIGTERM)
        _, stderr = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
    stderr = stderr.decode()
    assert "stopped after" in stderr
    assert "journalctl exited" not in stderr, stderr
    assert agent.returncode == 0


def test_journalctl_killed_while_running_is_said_when_restarted(tmp_path):
    fake = FakeJournal(tmp_path, {"follow": [{"hang": True}]})
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    assert wait_for(lambda: fake.calls() and
                    child_processes(agent.process.pid, fake.program))
    (follower,) = child_processes(agent.process.pid, fake.program)
    os.kill(follower, signal.SIGKILL)
    assert wait_for(lambda: len(fake.calls()) >= 2)
    _, stderr, code = agent.stop()
    assert "journalctl exited with status -9; restarting it" in stderr
    assert code == 0


def backlog_attempt(first_us=None, apart_us=10**6):
    """An invalid user's guess, its four lines as journalctl gives them:
    `apart_us` apart from `first_us` (by default a day old, a second
    apart)."""
    if first_us is None:
        first_us = int((time.time() - 86400) * 1e6)
    return [make_entry("sshd", message, sequence=number,
                       __REALTIME_TIMESTAMP=str(first_us +
                                                (number - 1) * apart_us))
            for number, message in enumerate((
                "Invalid user eve from 203.0.113.7 port 4001",
                "pam_unix(sshd:auth): authentication failure; logname= "
                "uid=0 euid=0 tty=ssh ruser= rhost=203.0.113.7",
                "Failed password for invalid user eve from 203.0.113.7 "
                "port 4001 ssh2",
                "Connection closed by invalid user eve 203.0.113.7 port "
                "4001 [preauth]"), 1)]


def guesses(events):
    return [(e["user"]["name"], e["event"]["reason"], e["source"]["port"])
            for e in events if e["event"]["action"] == "login_failure"]


def test_an_agent_catching_up_keeps_each_attempt_one_event(tmp_path):
    """A backlog (entries days old, as after a stop or a stall) comes in
    two reads, the second a moment later: an invalid user's guess held
    for the rest of its connection's lines must wait for them, not be let
    go by the wall clock in between, or the one attempt is two events."""
    attempt = backlog_attempt()
    # 1.5 s: longer than the agent waits for a line, so it sees the
    # journal quiet in between, as when journalctl pauses in a backlog.
    fake = FakeJournal(tmp_path, {"follow": [{"output": [
        json_line(attempt[0]), json_line(attempt[1]), 1.5,
        json_line(attempt[2]), json_line(attempt[3])], "hang": True}]})
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    try:
        assert wait_for(cursor_saved(tmp_path, attempt[3]))
    finally:
        events, _, code = agent.stop()
    assert code == 0
    assert guesses(events) == [("eve", "invalid_user", 4001)]


def test_a_stream_of_keystrokes_does_not_hold_a_guess_back(tmp_path):
    """With TTY audit on, keystroke records come without a pause while a
    user types; an invalid user's guess held for the rest of its lines
    must still go out about 10 s on (by the journal's time), not wait
    for the typing to stop."""
    start = time.time()
    guess = backlog_attempt(int(start * 1e6) + 1, apart_us=1)[:2]
    typing = []
    for step in range(1, 120):  # a record every 0.3 s for 36 s
        typing += [0.3, json_line({
            "_TRANSPORT": "audit", "_AUDIT_TYPE": "1319", "_PID": "777",
            "_UID": "1000", "_AUDIT_SESSION": "5", "_BOOT_ID": "feedface",
            "_AUDIT_FIELD_DATA": b"ls\r".hex().upper(),
            "__CURSOR": "s=0123456789abcdef;i=%x;b=feedface;m=1;t=2;x=3"
                        % (100 + step),
            "__REALTIME_TIMESTAMP": str(int((start + 0.3 * step) * 1e6))})]
    fake = FakeJournal(tmp_path, {"follow": [{"output": [
        json_line(guess[0]), json_line(guess[1])] + typing, "hang": True}]})
    agent = AgentProcess(agent_config(tmp_path, fake, "[detection]\n"
                                      "tty_audit = yes\n"), env=fake.env())
    state = tmp_path / "state" / "state.json"

    def guess_told():
        saved = read_state(tmp_path) if state.exists() else {}
        cursor = saved.get("cursor") or ""
        return cursor.endswith("x=3") and \
            int(cursor.split(";i=")[1].split(";")[0], 16) > 100 \
            and not saved.get("pipeline", saved).get(
                "ssh_attempts", {"held": [1]})["held"]

    try:
        assert wait_for(guess_told, timeout=25)
        elapsed = time.time() - start
    finally:
        events, _, code = agent.stop()
    assert code == 0 and elapsed < 30  # the typing had not stopped
    assert guesses(events) == [("eve", "invalid_user", 4001)]


def test_a_guess_held_at_a_stop_waits_for_the_backlog_after_it(tmp_path):
    """Stopped while holding an invalid user's guess, restarted with the
    rest of the attempt in the backlog (and journalctl slow to give it):
    the guess waits on from the last entry handled, and is one event."""
    attempt = backlog_attempt()
    fake = FakeJournal(tmp_path, {"follow": [
        {"output": [json_line(attempt[0]), json_line(attempt[1])],
         "hang": True},
        {"output": [1.5, json_line(attempt[2]), json_line(attempt[3])],
         "hang": True}]})
    config = agent_config(tmp_path, fake)
    first = AgentProcess(config, env=fake.env())
    try:
        assert wait_for(cursor_saved(tmp_path, attempt[1]))
    finally:
        told_first, _, code = first.stop()
    assert code == 0 and guesses(told_first) == []
    again = AgentProcess(config, env=fake.env())
    try:
        assert wait_for(cursor_saved(tmp_path, attempt[3]))
    finally:
        told_again, _, code = again.stop()
    assert code == 0
    assert guesses(told_again) == [("eve", "invalid_user", 4001)]


def test_a_guess_waits_while_journalctl_is_restarting(tmp_path):
    """journalctl dies just after giving the first half of an attempt and
    fails twice more before it comes back (2 + 5 + 10 s of backoff): the
    time it was not running is no journal time, so the guess held for
    the rest of its lines is still one event with them."""
    attempt = backlog_attempt()
    fake = FakeJournal(tmp_path, {"follow": [
        {"output": [json_line(attempt[0]), json_line(attempt[1])],
         "exit": 1},
        {"exit": 1}, {"exit": 1},
        {"output": [json_line(attempt[2]), json_line(attempt[3])],
         "hang": True}]})
    started = time.time()
    agent = AgentProcess(agent_config(tmp_path, fake), env=fake.env())
    try:
        assert wait_for(cursor_saved(tmp_path, attempt[3]), timeout=40)
        # The case itself: journalctl was away longer than a guess waits.
        assert time.time() - started > pamsignal.SSH_HOLD_US / 1e6
    finally:
        events, stderr, code = agent.stop()
    assert code == 0 and len(fake.calls()) >= 4
    assert stderr.count("journalctl exited with status 1; restarting") == 3
    assert guesses(events) == [("eve", "invalid_user", 4001)]
