"""End to end delivery: real ssh logins -> real journald -> the agent
(`pamsignal.py run`) -> a real HTTPS webhook receiver with its own CA. The
receiver is down for a while and the agent is restarted in between: every
alert arrives, and each exactly once."""
import glob
import os
import signal

import pytest

import realsys
import receivers
from conftest import configured_agent
from support import wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture
def webhook(tmp_path):
    certs = receivers.make_cert(str(tmp_path / "certs"))
    with receivers.HttpReceiver(tls=certs) as rx:
        rx.ca_file = certs.ca_file
        yield rx


@pytest.fixture
def delivering_agent(journald, sshd, tmp_path, webhook):
    agent = configured_agent(str(tmp_path / "agent"), (
        "[channel:hook]\ntype = webhook\nurl = %s/pamsignal\n"
        "ca_file = %s\nsecret = shared-secret\nevents = login_success\n"
        % (webhook.localhost_url, webhook.ca_file)))
    agent.spool_dir = os.path.join(agent.state_dir, "spool", "hook")
    agent.start()
    yield agent
    if agent.running():
        agent.stop(signal.SIGTERM)


def logins_of(webhook, user):
    return [request.json for request in webhook.requests
            if request.json and request.json.get("user", {}).get("name")
            == user]


def waiting_alerts(agent):
    return glob.glob(os.path.join(agent.spool_dir, "*.alert"))


def test_every_alert_arrives_once_across_an_outage_and_a_restart(
        delivering_agent, webhook, make_user):
    user, pw = make_user()
    webhook.down()
    assert realsys.ssh_password(user, pw).returncode == 0
    assert wait_for(lambda: len(waiting_alerts(delivering_agent)) == 1,
                    timeout=30), delivering_agent.stderr_text()
    assert delivering_agent.stop(signal.SIGTERM) in (0, -signal.SIGTERM)

    assert realsys.ssh_password(user, pw).returncode == 0  # agent stopped
    delivering_agent.start()
    assert wait_for(lambda: len(waiting_alerts(delivering_agent)) == 2,
                    timeout=30), delivering_agent.stderr_text()
    assert "channel hook: cannot reach localhost" in \
        delivering_agent.stderr_text()
    assert logins_of(webhook, user) == []

    webhook.up()
    assert wait_for(lambda: len(logins_of(webhook, user)) == 2,
                    timeout=90), delivering_agent.stderr_text()
    # A third login after recovery is the barrier: it comes after the
    # first two, and nothing before it came twice.
    assert realsys.ssh_password(user, pw).returncode == 0
    assert wait_for(lambda: len(logins_of(webhook, user)) == 3,
                    timeout=30), delivering_agent.stderr_text()
    delivered = logins_of(webhook, user)
    ports = [alert["source"]["port"] for alert in delivered]
    assert len(set(ports)) == 3, delivered
    assert [alert["event"]["action"] for alert in delivered] == [
        "login_success"] * 3
    assert waiting_alerts(delivering_agent) == []
    signed = [r for r in webhook.requests if r.json in delivered]
    assert all(r.headers["webhook-signature"].startswith("v1,")
               for r in signed)


def test_a_hanging_channel_never_holds_up_the_others(
        journald, sshd, tmp_path, webhook, make_user):
    """The webhook answers nothing for a minute; the console channel of
    the same agent still shows every login at once."""
    webhook.script([receivers.Hang(60)] * 3)
    agent = configured_agent(str(tmp_path / "agent"), (
        "[channel:hook]\ntype = webhook\nurl = %s/x\nca_file = %s\n"
        "timeout = 60s\n[channel:screen]\ntype = console\nformat = json\n"
        "events = *\ncooldown = off\nrate_limit = off\n"
        % (webhook.localhost_url, webhook.ca_file)))
    agent.start()
    try:
        user, pw = make_user()
        for _ in range(2):
            assert realsys.ssh_password(user, pw).returncode == 0
        def logins():
            return [e for e in agent.events()
                    if e["event"]["action"] == "login_success" and
                    e.get("user", {}).get("name") == user]

        assert wait_for(lambda: len(logins()) == 2, timeout=30)
        assert len(webhook.requests) == 1  # the first, still unanswered
    finally:
        agent.stop(signal.SIGTERM)
