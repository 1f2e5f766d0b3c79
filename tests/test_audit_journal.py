"""The audit log and the `journal` channel against the real journald
(issue 17): entries written through the native protocol and read back with
journalctl, the agent never taking its own entries for logins, the head
anchored in the journal and checked by `verify-log --journal`, fail2ban's
own fail2ban-regex banning on the agent's brute_force_detected entries,
and a full disk (a tiny tmpfs) that leaves the other channels alerting."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import pamsignal
import realsys
from conftest import AGENT_SCRIPT, configured_agent, random_name

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "bench"))
import needs  # noqa: E402 (bench/needs.py unpacks Debian packages)

pytestmark = pytest.mark.e2e

HERE = os.path.dirname(os.path.abspath(__file__))
FILTER = os.path.join(HERE, "..", "contrib", "fail2ban", "filter.d",
                      "pamsignal.conf")
#: Debian's fail2ban, unpacked (dpkg -x) once and kept between runs.
FAIL2BAN_CACHE = os.path.join(needs.UNPACKED, "fail2ban")


def journal(*matches):
    """Entries matching the journalctl matches, long fields included."""
    out = subprocess.run(
        ["journalctl", "-o", "json", "--all", "--no-pager"] + list(matches),
        stdout=subprocess.PIPE, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def wait_journal(*matches, timeout=20):
    """The entries once there is at least one (journald is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        found = journal(*matches)
        if found or time.monotonic() > deadline:
            assert found, "no journal entry for %s" % (matches,)
            return found
        time.sleep(0.2)


def pamsignal_cli(config, *arguments):
    return subprocess.run([sys.executable, AGENT_SCRIPT, "--config", config]
                          + list(arguments), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True)


def brute_force(user, ip):
    return pamsignal.Event(
        timestamp_us=int(time.time() * 1e6), action="brute_force_detected",
        user=user, source_ip=ip, attempts=5, window_s=600, hostname="web1",
        counted_by="source")


# ------------------------------------------------- the journal channel alone


def test_the_journal_channel_writes_ecs_fields(journald):
    user = random_name("psjc")
    sink = pamsignal.JournalSink("j")
    sink.send(brute_force(user, "192.0.2.44"))
    sink.close()
    (entry,) = wait_journal("MESSAGE_ID=" + pamsignal.EVENT_MESSAGE_IDS[
        "brute_force_detected"], "USER_NAME=" + user)
    assert entry["SYSLOG_IDENTIFIER"] == "pamsignal"
    assert entry["_TRANSPORT"] == "journal"
    assert entry["EVENT_ACTION"] == "brute_force_detected"
    assert entry["EVENT_CATEGORY"] == "intrusion_detection"
    assert entry["SOURCE_IP"] == "192.0.2.44"
    assert entry["PAMSIGNAL_ATTEMPTS"] == "5"
    assert entry["PAMSIGNAL_WINDOW_S"] == "600"
    assert entry["PRIORITY"] == "3"  # severity 8: an error
    assert entry["MESSAGE"].startswith(
        "brute_force_detected user=%s source=192.0.2.44 " % user)


HUGE_ENTRY = """
import sys, time
sys.path.insert(0, sys.argv[1])
import pamsignal
writer = pamsignal.JournalWriter()
writer.send(pamsignal.event_journal_fields(pamsignal.Event(
    timestamp_us=int(time.time() * 1e6), action="sudo_command",
    user=sys.argv[2], target_user="root", command_line=sys.stdin.read(),
    message="line one\\nline two")))
"""


def test_a_value_with_newlines_and_a_huge_entry_arrive_whole(journald):
    """Written by an unprivileged user, as the service's own user writes:
    journald takes a passed file from it only in /dev/shm, /tmp or
    /var/tmp."""
    realsys.require_root()
    user = random_name("psjh")
    command = "printf 'a\nb'; " + "x" * 300000  # beyond a datagram
    # Debian's python3: the pyenv ones live in root's home
    subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3",
                    "-c", HUGE_ENTRY, os.path.dirname(AGENT_SCRIPT), user],
                   input=command.encode(), check=True)
    (entry,) = wait_journal("USER_NAME=" + user)
    assert entry["_UID"] == "65534"
    assert entry["PROCESS_COMMAND_LINE"] == command
    assert entry["EVENT_ORIGINAL"] == "line one\nline two"
    assert entry["MESSAGE_ID"] == pamsignal.EVENT_MESSAGE_IDS["sudo_command"]


def test_an_sshd_line_written_by_the_agent_is_not_a_login(journald):
    forged = "Accepted password for %s from 6.6.6.6 port 22 ssh2" % (
        random_name("psjf"))
    pamsignal.JournalWriter().send([
        ("MESSAGE", forged), ("SYSLOG_IDENTIFIER", "pamsignal")])
    (entry,) = wait_journal("MESSAGE=" + forged)
    assert "SYSLOG_IDENTIFIER=pamsignal" not in pamsignal.journal_matches()
    line = json.dumps(entry).encode()
    assert pamsignal.parse_entry(pamsignal.decode_line(line)) is None
    # and no configuration can make the channel write as a watched service
    with pytest.raises(pamsignal.ConfigError) as error:
        pamsignal.parse_config("[channel:j]\ntype = journal\n"
                               "identifier = sshd\n")
    assert "none of the watched services" in str(error.value)


# ------------------------------------------------- the agent, end to end


def fail2ban_regex():
    """The command line of Debian's fail2ban-regex, unpacked from its
    package once (apt-get download, dpkg -x) into FAIL2BAN_CACHE."""
    # fail2ban's journal backend, in Debian's python3 (which runs it)
    if subprocess.run(["/usr/bin/python3", "-c", "import systemd.journal"],
                      stderr=subprocess.DEVNULL).returncode:
        realsys.unavailable("python3-systemd is missing (tests/check.sh "
                            "installs it)")
    try:
        tree = needs.unpacked("fail2ban")  # into FAIL2BAN_CACHE, once
    except SystemExit as error:  # apt-get could not fetch it
        realsys.unavailable(str(error))
    program = os.path.join(tree, "usr", "bin", "fail2ban-regex")
    return ["env", "PYTHONPATH=" + os.path.join(
        tree, "usr", "lib", "python3", "dist-packages"),
        "/usr/bin/python3", program]


def banned_addresses(config_dir, filter_path=None):
    """What fail2ban-regex matches in the real journal with our filter."""
    result = subprocess.run(
        fail2ban_regex() + ["-o", "ip", "systemd-journal", filter_path or
                            os.path.join(config_dir, "filter.d",
                                         "pamsignal.conf")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


@pytest.fixture(scope="module")
def fail2ban_config(tmp_path_factory):
    """Our filter next to fail2ban's own common.conf, as installed."""
    fail2ban_regex()
    directory = str(tmp_path_factory.mktemp("fail2ban"))
    os.makedirs(os.path.join(directory, "filter.d"))
    shutil.copy(os.path.join(FAIL2BAN_CACHE, "etc", "fail2ban", "filter.d",
                             "common.conf"),
                os.path.join(directory, "filter.d"))
    shutil.copy(FILTER, os.path.join(directory, "filter.d"))
    return directory


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, journald, sshd, users):
    """One agent with a journal channel and the console: a login, an
    sshd-looking entry of its own, then a brute force from another
    address (the barrier: once it is reported, everything before was
    read). Stopped at the end, so its head is anchored."""
    realsys.require_root()
    workdir = str(tmp_path_factory.mktemp("audit-agent"))
    agent = configured_agent(workdir, (
        "[detection]\nbrute_force_fast = 2 in 10m\n"
        "[audit]\nanchor_every = 5\n"
        "[channel:j]\ntype = journal\nevents = *\ncooldown = off\n"
        "rate_limit = off\n"
        "[channel:screen]\ntype = console\nformat = json\nevents = *\n"
        "cooldown = off\nrate_limit = off\n"))
    agent.start()
    found = {"login_from": realsys.unique_loopback(),
             "attacker": realsys.unique_loopback(),
             "forged": "Accepted password for %s from 6.6.6.6 port %d ssh2"
             % (users.plain, 1024 + os.getpid() % 60000)}
    try:
        assert realsys.ssh_password(users.plain, users.plain_pw,
                                    source=found["login_from"]
                                    ).returncode == 0
        agent.wait_event(lambda e: e["event"]["action"] == "login_success"
                         and e.get("source", {}).get("ip") ==
                         found["login_from"], timeout=30)
        wait_journal("SOURCE_IP=" + found["login_from"], "EVENT_ACTION="
                     "login_success")
        pamsignal.JournalWriter().send([("MESSAGE", found["forged"]),
                                        ("SYSLOG_IDENTIFIER", "pamsignal")])
        wait_journal("MESSAGE=" + found["forged"])
        for _ in range(2):
            realsys.ssh_password(users.plain, "wrong-" + users.plain_pw,
                                 source=found["attacker"])
        agent.wait_event(
            lambda e: e["event"]["action"] == "brute_force_detected" and
            e.get("source", {}).get("ip") == found["attacker"], timeout=60)
        found["brute_force"] = wait_journal(
            "MESSAGE_ID=" + pamsignal.EVENT_MESSAGE_IDS[
                "brute_force_detected"], "SOURCE_IP=" + found["attacker"])
        found["login"] = journal("SOURCE_IP=" + found["login_from"],
                                 "EVENT_ACTION=login_success")
    finally:
        found["exit"] = agent.stop()
    found["events"] = agent.events()
    found["config"] = agent.config
    found["log_dir"] = os.path.join(workdir, "log")
    return found


def test_the_agent_writes_its_events_to_the_journal(scenario, users):
    (entry,) = scenario["login"]
    assert entry["USER_NAME"] == users.plain
    assert entry["SERVICE_NAME"] == "sshd"
    assert entry["MESSAGE_ID"] == pamsignal.EVENT_MESSAGE_IDS[
        "login_success"]
    assert entry["EVENT_ORIGINAL"].startswith("Accepted password for %s"
                                              % users.plain)
    # a MESSAGE_ID match finds it among all other entries
    ids = [e["__CURSOR"] for e in journal(
        "MESSAGE_ID=" + pamsignal.EVENT_MESSAGE_IDS["login_success"])]
    assert entry["__CURSOR"] in ids


def test_the_agent_does_not_read_its_own_entries_back(scenario):
    logins = [e for e in scenario["events"]
              if e["event"]["action"] == "login_success" and
              e.get("source", {}).get("ip") == scenario["login_from"]]
    assert len(logins) == 1, "its own journal entry was read as a login"
    # (others may forge lines from 6.6.6.6 meanwhile: only ours counts)
    assert not [e for e in scenario["events"]
                if scenario["forged"] in json.dumps(e)], \
        "its sshd-looking entry was taken for a login or a forgery"


def test_the_audit_log_holds_events_and_decisions(scenario):
    assert scenario["exit"] == 0
    records = [json.loads(line) for _, _, line in pamsignal.ChainLines(
        pamsignal.audit_files(scenario["log_dir"]))]
    attack = [r for r in records if r["kind"] == "event" and
              r["event"]["event"]["action"] == "brute_force_detected" and
              r["event"]["source"]["ip"] == scenario["attacker"]]
    assert len(attack) == 1
    decisions = sorted((r["channel"], r["decision"]) for r in records
                       if r["kind"] == "alert" and r["id"] == attack[0]["id"])
    assert decisions == [("j", "sent"), ("screen", "sent")]
    assert records[0]["kind"] == "agent_started"
    assert records[-1]["kind"] == "agent_stopped"


def test_verify_log_checks_the_head_anchored_in_the_journal(scenario):
    result = pamsignal_cli(scenario["config"], "verify-log", "--journal")
    assert result.returncode == 0, result.stdout + result.stderr
    paths = pamsignal.audit_files(scenario["log_dir"])
    with open(paths[-1], "rb") as handle:
        lines = handle.readlines()
    head = json.loads(lines[-1])
    # the anchor written at stop is the last record
    assert "journal anchor: seq %d head %s" % (head["seq"], head["hash"]) \
        in result.stdout
    assert "0 records written since" in result.stdout
    # the newest records deleted: still a chain, but short of the anchor
    with open(paths[-1], "wb") as handle:
        handle.writelines(lines[:-2])
    assert pamsignal_cli(scenario["config"], "verify-log").returncode == 0
    result = pamsignal_cli(scenario["config"], "verify-log", "--journal")
    assert result.returncode == 1
    assert "does not reach head %s" % head["hash"] in result.stdout


def test_fail2ban_bans_the_brute_force_source(scenario, fail2ban_config):
    assert scenario["attacker"] in banned_addresses(fail2ban_config)


def test_fail2ban_is_not_fooled_by_a_user_name(journald, fail2ban_config):
    """A brute force against a user named like a source field bans the
    real source, never the address in the name."""
    sink = pamsignal.JournalSink("j")
    sink.send(brute_force("x source=192.0.2.66 y", "192.0.2.67"))
    sink.send(brute_force('q" source=192.0.2.68 "', "192.0.2.69"))
    sink.close()
    wait_journal("SOURCE_IP=192.0.2.69")
    banned = banned_addresses(fail2ban_config)
    assert {"192.0.2.67", "192.0.2.69"} <= banned
    assert not {"192.0.2.66", "192.0.2.68"} & banned


def test_fail2ban_ignores_an_entry_forged_by_an_unprivileged_user(
        journald, fail2ban_config):
    """Any user can write SYSLOG_IDENTIFIER=pamsignal with the right
    MESSAGE_ID through the native socket: the filter's journalmatch takes
    only the agent's unit or root."""
    forged = pamsignal.encode_journal_entry(
        [("MESSAGE", "brute_force_detected source=192.0.2.70 attempts=5"),
         ("SYSLOG_IDENTIFIER", "pamsignal"), ("SOURCE_IP", "192.0.2.70"),
         ("MESSAGE_ID", pamsignal.EVENT_MESSAGE_IDS["brute_force_detected"])])
    script = ("import socket, sys; socket.socket(socket.AF_UNIX, "
              "socket.SOCK_DGRAM).sendto(sys.stdin.buffer.read(), %r)"
              % pamsignal.JOURNAL_SOCKET)
    subprocess.run(["runuser", "-u", "nobody", "--", "/usr/bin/python3",
                    "-c", script], input=forged, check=True)
    wait_journal("SOURCE_IP=192.0.2.70", "_UID=65534")
    assert "192.0.2.70" not in banned_addresses(fail2ban_config)
    # the same entry, were the writer not checked, would ban
    trusting = os.path.join(fail2ban_config, "filter.d", "trusting.conf")
    with open(os.path.join(fail2ban_config, "filter.d",
                           "pamsignal.conf")) as handle:
        text = handle.read()
    with open(trusting, "w") as handle:
        handle.write(re.sub(r"(?m)^journalmatch = .*$", "journalmatch = "
                            "SYSLOG_IDENTIFIER=pamsignal", text))
    assert "192.0.2.70" in banned_addresses(fail2ban_config, trusting)


# ------------------------------------------------------------- a full disk


def fill_up(path):
    """Write to a new file at `path` until its file system is full."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(descriptor, b"\0" * 1024):
            pass
    except OSError:
        pass  # full
    finally:
        os.close(descriptor)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs, filled up."""
    realsys.require_root()
    mount = tmp_path / "log"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=700",
                             "tmpfs", str(mount)], stderr=subprocess.PIPE)
    if result.returncode:
        realsys.unavailable("cannot mount a tmpfs: %s" % result.stderr)
    filler = str(mount / "filler")
    fill_up(filler)
    try:
        yield str(mount), filler
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_keeps_the_other_channels_alerting(
        full_disk, tmp_path, sshd, users):
    mount, filler = full_disk
    agent = configured_agent(str(tmp_path / "agent"), (
        "[channel:screen]\ntype = console\nformat = json\n"))
    with open(agent.config) as handle:
        text = handle.read()
    with open(agent.config, "w") as handle:
        handle.write(text.replace(os.path.join(str(tmp_path / "agent"),
                                               "log"), mount))
    agent.start()
    try:
        source = login_seen(agent, users)

        def status():
            result = pamsignal_cli(agent.config, "status", "--json")
            return json.loads(result.stdout)

        assert realsys_wait(lambda: "audit_log" in status()["degraded"]
                            and status()["audit"]["not_written"] >= 2), \
            status()
        text = pamsignal_cli(agent.config, "status").stdout
        assert "audit_log" in text and "not written" in text
        os.unlink(filler)
        second = login_seen(agent, users)
        assert realsys_wait(lambda: "audit_log" not in status()["degraded"])
    finally:
        assert agent.stop() == 0
    lines = pamsignal.ChainLines(pamsignal.audit_files(mount))
    assert pamsignal.verify_chain(lines).problem is None
    lost = [json.loads(line) for _, _, line in lines
            if json.loads(line)["kind"] == "not_written"]
    assert lost and lost[0]["records"] >= 2
    events = [json.loads(line)["event"] for _, _, line in lines
              if json.loads(line)["kind"] == "event"]
    assert second in [e.get("source", {}).get("ip") for e in events]
    assert source not in [e.get("source", {}).get("ip") for e in events]


@contextlib.contextmanager
def small_tmpfs(tmp_path, size):
    """A tmpfs of `size` under tmp_path, unmounted after."""
    realsys.require_root()
    mount = str(tmp_path / "log")
    os.mkdir(mount)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + size, "tmpfs",
                       mount]).returncode:
        realsys.unavailable("cannot mount a tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount])


def test_a_batch_the_disk_refuses_is_counted_whole(tmp_path):
    """Records are written a batch at a time: a batch the disk refuses
    (full: a short write) leaves no part of itself in the file, each of
    its records is counted, and the chain goes on from the last record
    written, with a record saying how many were lost."""
    with small_tmpfs(tmp_path, "64k") as mount:
        filler = os.path.join(mount, "filler")
        with open(filler, "wb") as handle:
            handle.write(b"\0" * 40 * 1024)  # about 24 KiB left
        settings = pamsignal.parse_config(
            "[audit]\nanchor_every = off\nanchor_interval = off\n").audit
        log = pamsignal.AuditLog(settings, mount)
        log.open()
        for number in range(5):
            assert log.append({"kind": "event", "n": number})
        log.flush()
        assert log.error is None and log.records == 6
        size = os.path.getsize(os.path.join(mount, "audit.jsonl"))
        for number in range(30):  # about 30 KiB: more than is left
            log.append({"kind": "event", "n": 100 + number, "pad": "x" * 1000})
        log.flush()
        assert "No space left" in log.error
        assert (log.lost, log.unwritten, log.records) == (30, 30, 6)
        assert os.path.getsize(os.path.join(mount, "audit.jsonl")) == size
        os.unlink(filler)
        assert log.append({"kind": "event", "n": 200})  # at once, now
        assert log.error is None and log.lost == 0
        log.close()
        lines = pamsignal.ChainLines(pamsignal.audit_files(mount))
        assert pamsignal.verify_chain(lines).problem is None
        kinds = [(json.loads(line)["kind"], json.loads(line).get("records"),
                  json.loads(line).get("n")) for _, _, line in lines]
        assert kinds == [("agent_started", None, None)] + [
            ("event", None, number) for number in range(5)] + [
            ("not_written", 30, None), ("event", None, 200),
            ("agent_stopped", 8, None)]


def login_seen(agent, users):
    """A real ssh login from a loopback address of its own, once the agent
    has reported it; returns that address."""
    source = realsys.unique_loopback()
    assert realsys.ssh_password(users.plain, users.plain_pw,
                                source=source).returncode == 0
    agent.wait_event(lambda e: e["event"]["action"] == "login_success" and
                     e.get("source", {}).get("ip") == source, timeout=30)
    return source


def realsys_wait(predicate, timeout=40):
    """Poll (the metrics file is rewritten every 10 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def test_a_read_only_disk_is_counted_and_the_gap_said(tmp_path):
    """The log's file system turned read-only (as after an I/O error):
    records are counted, not written; once it is writable again the chain
    goes on with a record saying how many were lost."""
    with small_tmpfs(tmp_path, "1m") as mount:
        settings = pamsignal.parse_config("").audit
        log = pamsignal.AuditLog(settings, mount)
        log.open()
        log.close()  # (a file open for writing would keep it writable)
        subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
        log = pamsignal.AuditLog(settings, mount)
        log.open()
        assert not log.append({"kind": "event", "n": 1})
        assert "Read-only file system" in log.error
        assert log.unwritten == 2  # its start too
        subprocess.run(["mount", "-o", "remount,rw", mount], check=True)
        assert log.append({"kind": "event", "n": 2})
        assert log.error is None
        log.close()
        lines = pamsignal.ChainLines(pamsignal.audit_files(mount))
        assert pamsignal.verify_chain(lines).problem is None
        kinds = [(json.loads(line)["kind"], json.loads(line).get("records"))
                 for _, _, line in lines]
        assert kinds == [("agent_started", None), ("agent_stopped", 1),
                         ("not_written", 2), ("event", None),
                         ("agent_stopped", 2)]

