"""End to end: the real agent (`pamsignal.py run --json`, following the real
journal) reports which local address an SSH client came in through. A
private sshd listens on a second loopback address (127.0.0.2) on a free
port, so the destination is unmistakable and the shared test sshd on
127.0.0.1:2222 is left to other test runs."""
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

import realsys
from conftest import field

pytestmark = pytest.mark.e2e

SECOND_LOOPBACK = "127.0.0.2"


def free_port(host):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@pytest.fixture
def second_sshd(journald):
    """Our own sshd on 127.0.0.2 and a free port; stopped by its pid."""
    realsys.require_root()
    realsys.require_binaries(realsys.SSHD, "ssh", "sshpass")
    if not any(os.path.exists("/etc/ssh/ssh_host_%s_key" % kind)
               for kind in ("ed25519", "ecdsa", "rsa")):
        realsys._check(["ssh-keygen", "-A"])
    os.makedirs("/run/sshd", exist_ok=True)
    os.chmod("/run/sshd", 0o755)
    port = free_port(SECOND_LOOPBACK)
    workdir = tempfile.mkdtemp(prefix="pamsignal-e2e-sshd2-")
    config = os.path.join(workdir, "sshd_config")
    lines = ["Port %d" % port, "ListenAddress %s" % SECOND_LOOPBACK,
             "PidFile none"]
    lines += ["HostKey /etc/ssh/ssh_host_%s_key" % kind
              for kind in ("ed25519", "ecdsa", "rsa")
              if os.path.exists("/etc/ssh/ssh_host_%s_key" % kind)]
    lines += realsys._SSHD_TEST_OPTIONS
    with open(config, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    realsys._check([realsys.SSHD, "-t", "-f", config])
    process = subprocess.Popen([realsys.SSHD, "-D", "-f", config],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 20
    while not realsys._ssh_banner(SECOND_LOOPBACK, port, timeout=0.5):
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            pytest.fail("sshd on %s:%d did not come up" % (SECOND_LOOPBACK,
                                                          port))
        time.sleep(0.1)
    yield port
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


def open_session(user, password, host, port):
    """An ssh login whose session stays open until the caller ends it."""
    argv = ["sshpass", "-e", "ssh"] + realsys._SSH_COMMON + [
        "-o", "PreferredAuthentications=password",
        "-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1",
        "-p", str(port), "-l", user, host, "sleep 120"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,
                            env=dict(os.environ, SSHPASS=password),
                            start_new_session=True)


def reported_login(agent, make_user, host, port):
    """A fresh user logs in to host:port; the agent's login_success. The
    session stays open until the agent has reported it, so the connection
    is surely in /proc/net/tcp when the agent looks."""
    user, password = make_user()
    mark = agent.mark()
    client = open_session(user, password, host, port)
    try:
        return agent.wait_event(
            lambda e: field(e, "event.action") == "login_success"
            and field(e, "user.name") == user, since=mark)
    finally:
        client.terminate()
        client.wait(10)


def test_the_destination_of_an_ssh_login_is_reported(agent, second_sshd,
                                                     make_user):
    event = reported_login(agent, make_user, SECOND_LOOPBACK, second_sshd)
    assert field(event, "destination.ip") == SECOND_LOOPBACK, event
    assert field(event, "destination.port") == second_sshd, event
    assert field(event, "source.ip") == "127.0.0.1", event
    assert field(event, "pamsignal.source_network_type") == "loopback", event
    # The shared sshd's logins in the same agent go to 127.0.0.1:2222.
    event = reported_login(agent, make_user, "127.0.0.1", realsys.SSH_PORT)
    assert (field(event, "destination.ip"), field(event, "destination.port")
            ) == ("127.0.0.1", realsys.SSH_PORT), event
