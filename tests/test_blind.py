"""A flood must not blind the monitor: under a real systemd (the Debian 13
tree booted with systemd-nspawn, systemd 257, OpenSSH 10), with journald's
per-unit rate limit lowered so a short flood passes it.

(a) Without PAMSignal's drop-in, a flood of ssh lines makes journald drop a
    real login's lines; the agent says so twice: journald's "Suppressed N
    messages from ssh.service" becomes journal_suppressed, and the session
    that wtmpdb recorded with no login in the journal becomes
    unaccounted_session.
(b) With the drop-in `pamsignal install` writes, in effect once ssh.service
    restarts (install says so and leaves that to the admin; status tells
    until then), the same flood and login: login_success arrives and the
    session is accounted for.

One boot for both (--volatile=overlay: the cached tree is never written;
--private-network: the container's sshd on its own port 22 cannot collide
with anything on the host)."""
import json
import os
import re
import time

import pytest

import realsys
from support import REPO, pamsignal, wait_for

pytestmark = pytest.mark.e2e

#: journald's limit inside the container: a flood of a few hundred
#: connections passes it even with the burst scaled up by free disk space
#: (up to 6x on a large disk), and flood and login fit in one interval.
JOURNALD_LIMIT = "[Journal]\nRateLimitIntervalSec=30s\nRateLimitBurst=20\n"
RATE_INTERVAL_S = 30
#: OpenSSH 10 would refuse the flooding address (PerSourcePenalties), and
#: so the real login after it; many connections at once are the point.
SSHD_FLOODABLE = "PerSourcePenalties no\nMaxStartups 10000\n"
FLOOD_CONNECTIONS = 400
DROPINS = ["/etc/systemd/system/%s.d/pamsignal-ratelimit.conf" % unit
           for unit in ("ssh.service", "sshd.service")]

#: Run in the container's network namespace by the host's python3: each
#: connection sends sshd a bad banner, which it logs (one INFO, one ERR).
#: Sixteen at a time, so flood and login fit well within one interval.
FLOOD = """
import concurrent.futures, socket, sys

def connect(_):
    try:
        with socket.create_connection(("127.0.0.1", 22), timeout=5) as s:
            s.sendall(b"flood\\r\\n")
            s.recv(256)
    except OSError:
        pass

with concurrent.futures.ThreadPoolExecutor(16) as pool:
    list(pool.map(connect, range(int(sys.argv[1]))))
"""


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    with realsys.booted_container(
            str(tmp_path_factory.mktemp("blind") / "nspawn.log"),
            [(REPO, realsys.INSIDE_SRC)], "flood tests") as container:
        container.run(["mkdir", "-p", "/etc/systemd/journald.conf.d",
                       "/etc/ssh/sshd_config.d"])
        container.write("/etc/systemd/journald.conf.d/test-limit.conf",
                        JOURNALD_LIMIT)
        container.write("/etc/ssh/sshd_config.d/test-flood.conf",
                        SSHD_FLOODABLE)
        container.run(["systemctl", "restart", "systemd-journald",
                       "ssh.service"])
        yield container


def new_user(box, prefix):
    name = prefix + os.urandom(3).hex()
    box.run(["useradd", "-m", "-s", "/bin/bash", name])
    box.run(["chpasswd"], input="%s:Pw-%s\n" % (name, name))
    return name


def login_with_pty(box, name):
    """A real password login with a terminal (-tt), so sshd writes the
    login records."""
    return box.run(
        ["sshpass", "-p", "Pw-" + name, "ssh", "-tt", "-F", "/dev/null",
         "-o", "StrictHostKeyChecking=no", "-o",
         "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-p", "22",
         "%s@127.0.0.1" % name, "true"], check=False, net=True)


def flood(box):
    started = time.monotonic()
    box.run(["python3", "-c", FLOOD, str(FLOOD_CONNECTIONS)], net=True,
            timeout=300)
    print("flood of %d connections: %.1f s" % (
        FLOOD_CONNECTIONS, time.monotonic() - started))


def agent_events(box):
    """The events the agent printed (its console, as JSON lines)."""
    text = box.run(["journalctl", "-u", "pamsignal.service", "-o", "cat",
                    "--no-pager"]).stdout
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return events


def found(box, action, **fields):
    def matching():
        return [event for event in agent_events(box)
                if event["event"]["action"] == action and all(
                    _field(event, path) == value
                    for path, value in fields.items())]
    return matching


def _field(event, path):
    for part in path.split("__"):
        event = event.get(part, {}) if isinstance(event, dict) else {}
    return event if event != {} else None


def ssh_lines(box, name):
    return box.run(["journalctl", "-u", "ssh.service", "-o", "cat",
                    "--no-pager", "--grep", name], check=False).stdout


def status(box):
    return box.run(["pamsignal", "status"], check=False).stdout


def install(box):
    said = box.run(["python3", realsys.INSIDE_SRC + "/pamsignal.py",
                    "install"]).stdout
    box.write("/etc/pamsignal/pamsignal.conf",
              "[channel:console]\ntype = console\nformat = json\n"
              "cooldown = off\n")
    box.run(["systemctl", "restart", "pamsignal.service"])
    return said


def test_a_flood_without_the_dropin_is_reported_twice(box):
    install(box)
    for dropin in DROPINS:
        box.run(["rm", dropin])
    box.run(["systemctl", "daemon-reload"])
    assert "not lifted for ssh.service" in status(box)
    name = new_user(box, "psa")
    flood(box)
    assert login_with_pty(box, name).returncode == 0
    # journald writes its suppression entry when ssh.service logs again
    # after the interval: one more connection, once it is over.
    time.sleep(RATE_INTERVAL_S + 1)
    assert name not in ssh_lines(box, name)  # the journal lost the login
    suppressed = found(box, "journal_suppressed",
                       pamsignal__unit="ssh.service")

    def poked():  # each connection makes ssh.service log again
        box.run(["python3", "-c", FLOOD, "1"], net=True)
        return suppressed()
    assert wait_for(poked, timeout=90, interval=3), box.run([
        "journalctl", "-o", "json", "--no-pager", "--since", "-3min",
        "MESSAGE_ID=" + pamsignal.JOURNAL_DROPPED_MESSAGE_ID]).stdout
    alert = suppressed()[0]
    assert alert["pamsignal"]["dropped"] > 0
    assert alert["event"]["severity"] == 8
    assert alert["service"]["name"] == "systemd-journald"
    unaccounted = found(box, "unaccounted_session", user__name=name)
    assert wait_for(unaccounted, timeout=90), agent_events(box)[-5:]
    session = unaccounted()[0]
    assert session["source"]["ip"] == "127.0.0.1"
    assert session["pamsignal"]["login_record"] == \
        "/var/lib/wtmpdb/wtmp.db"
    assert re.match(r"pts/\d+$", session["pamsignal"]["tty"])
    assert not found(box, "login_success", user__name=name)()
    # status reads the metrics, written every 10 s.
    assert wait_for(lambda: re.search(
        r"suppressed: ssh\.service \d+ times \(\d+ lines\)\n +last: "
        r"\S+ \d+ lines of ssh\.service dropped\n", status(box)),
        timeout=30), status(box)
    assert "0 sessions accounted for, 1 unaccounted" in status(box), \
        status(box)
    # Both kinds of login records stay readable in the unit's sandbox.
    main = box.run(["systemctl", "show", "-P", "MainPID",
                    "pamsignal.service"]).stdout.strip()
    owner = box.run(["stat", "-L", "-c", "%u", "/var/lib/pamsignal/"
                     "state.json"]).stdout.strip()
    probe = box.run(["nsenter", "--target", main, "--all", "-S", owner,
                     "-G", owner, "python3", "-c",
                     "import os; print(os.getuid(), "
                     "len(open('/var/log/wtmp', 'rb').read()), "
                     "open('/var/lib/wtmpdb/wtmp.db', 'rb').read(15))"])
    uid, wtmp_bytes, magic = probe.stdout.split(None, 2)
    assert uid == owner != "0"
    assert int(wtmp_bytes) >= 384 and magic.strip() == "b'SQLite format 3'"


def test_with_the_dropin_the_login_is_kept(box):
    sshd_pid = box.run(["systemctl", "show", "-P", "MainPID",
                        "ssh.service"]).stdout
    said = install(box)  # writes the drop-ins again, daemon-reload
    assert "not restarted for you: run `systemctl restart ssh`" in said
    assert box.run(["systemctl", "show", "-P", "MainPID",
                    "ssh.service"]).stdout == sshd_pid
    for dropin in DROPINS:
        text = box.run(["cat", dropin]).stdout
        assert "LogRateLimitBurst=1000000" in text
    assert "lifted for ssh.service (1000000 lines per 30s); in effect " \
        "once it restarts (systemctl restart ssh.service)" in status(box)
    box.run(["systemctl", "restart", "ssh.service"])  # the admin's step
    assert "lifted for ssh.service (1000000 lines per 30s)\n" in status(box)
    name = new_user(box, "psb")
    flood(box)
    assert login_with_pty(box, name).returncode == 0
    assert wait_for(found(box, "login_success", user__name=name),
                    timeout=60), agent_events(box)[-5:]
    assert "Accepted password for %s" % name in ssh_lines(box, name)

    def accounted():
        return re.search(r"records: +(\d+) sessions accounted for",
                         status(box))
    # The witness judged the session (metrics are written every 10 s).
    assert wait_for(lambda: accounted() and int(accounted().group(1)) >= 1,
                    timeout=90), status(box)
    assert not found(box, "unaccounted_session", user__name=name)()
