"""End to end, as the red team did it (issue 14): a webhook that is
backlogged (it answers 429 until it recovers), a real ssh login, then a
flood of real `sudo -n /bin/true` by a user with one NOPASSWD rule, more
than the channel's small spool holds. After recovery the login arrives,
the sudo repeats arrive as counted digests, and the drop report names
what was lost."""
import json
import os
import pwd
import signal

import pytest

import realsys
import receivers
from conftest import configured_agent
from support import wait_for

pytestmark = pytest.mark.e2e

#: Small enough that the flood overflows it: the login, the channel's own
#: "degraded" notice and the first sudo (unique alerts) plus a few repeats.
SPOOL_MAX_ALERTS = 6

#: Most sudo commands run before the spool must have dropped some.
MAX_FLOOD = 2000


def spool_drops(spool_dir):
    """What the spool dropped so far and has not reported ({} if none)."""
    try:
        with open(os.path.join(spool_dir, "dropped.json")) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def accounted(delivered, user):
    """The sudo commands of `user` that the delivered alerts account for:
    each sent alone, counted in a repeat digest, or counted in a digest
    the drop report says was lost (None until that report arrived)."""
    reports = [a for a in delivered
               if a["event"]["action"] == "alerts_dropped"]
    if not reports:
        return None
    mine = [a for a in delivered if a.get("user", {}).get("name") == user]
    alone = [a for a in mine if a["event"]["action"] == "sudo_command"]
    digests = [a["pamsignal"]["held_back"] for a in mine
               if a["event"]["action"] == "alert_digest"]
    lost = sum(int(part.split(" of ")[1].split()[0]) for report in reports
               for part in report["pamsignal"]["detail"].split(", ")
               if "alert_digest of" in part)
    lost_alone = sum(int(part.split()[0]) for report in reports
                     for part in report["pamsignal"]["detail"].strip(
                         ")").split("(")[-1].split(", ")
                     if part.endswith(" sudo_command"))
    return len(alone) + lost_alone + sum(digests) + lost


def unvouched(delivered, uid):
    """sudo lines reported as forged: journald could not read the writer
    of a sudo that had already exited (no _EXE, no _COMM), so pamsignal
    cannot vouch for it. Those of `uid` alone, and the forgeries held in
    cooldown digests (which name no writer: an upper bound; the test's
    short cooldown sends them soon)."""
    alone = [a for a in delivered if a["event"]["action"] == "spoofed_entry"
             and a["pamsignal"].get("writer_uid") == uid and
             a["pamsignal"].get("claimed_action") == "sudo_command"]
    held = sum(int(part.split()[0]) for a in delivered
               if a["event"]["action"] == "alert_digest" and
               a["event"]["reason"] == "cooldown"
               for part in a["pamsignal"]["detail"].split(", ")
               if part.endswith(" spoofed_entry"))
    return len(alone) + held


def test_a_sudo_flood_never_pushes_out_a_login(journald, sshd, tmp_path,
                                               make_user):
    backlogged = receivers.Respond(429, b"slow down",
                                   headers={"Retry-After": "1"})
    with receivers.HttpReceiver(default=backlogged) as webhook:
        agent = configured_agent(str(tmp_path / "agent"), (
            "spool_max_alerts = %d\n[channel:hook]\ntype = webhook\n"
            "url = %s/hook\nrepeats = 1 in 2s\ncooldown = 2s\n"
            % (SPOOL_MAX_ALERTS, webhook.url)))
        spool_dir = os.path.join(agent.state_dir, "spool", "hook")
        try:
            agent.start()
            user, password = make_user()
            realsys.allow_sudo_nopasswd(user, "/bin/true")
            uid = pwd.getpwnam(user).pw_uid
            assert realsys.ssh_password(user, password).returncode == 0

            def tried(action):
                return [r.json for r in webhook.requests if r.json and
                        r.json["event"]["action"] == action and
                        r.json.get("user", {}).get("name") == user]

            # The login is in the spool (the webhook keeps refusing it).
            assert wait_for(lambda: tried("login_success"), timeout=60), \
                agent.stderr_text()
            flood = 0
            while not spool_drops(spool_dir).get("reasons", {}).get(
                    "spool_full"):
                assert flood < MAX_FLOOD, (
                    "no drop after %d sudo commands:\n%s"
                    % (flood, agent.stderr_text()))
                done = realsys.sudo_nopasswd(user, "/bin/true")
                assert done.returncode == 0, done.stderr
                flood += 1
            assert flood > SPOOL_MAX_ALERTS

            mark = len(webhook.requests)
            webhook.default = receivers.Respond(200, b"ok")
            delivered = []

            def arrived():
                """The drop report, and every sudo accounted for."""
                delivered[:] = [r.json for r in webhook.requests[mark:]
                                if r.json]
                counted = accounted(delivered, user)
                return counted is not None and counted + unvouched(
                    delivered, uid) >= flood

            assert wait_for(arrived, timeout=120), (
                flood, accounted(delivered, user), delivered,
                agent.stderr_text())
        finally:
            if agent.running():
                agent.stop(signal.SIGTERM)

    def mine(action):
        return [a for a in delivered if a["event"]["action"] == action and
                a.get("user", {}).get("name") == user]

    # The login that mattered arrived.
    (login,) = mine("login_success")
    assert login["source"]["ip"] == "127.0.0.1"
    # The flood: the first sudo as itself, the repeats as counted
    # digests naming what repeated.
    alone = mine("sudo_command")  # one per window that saw no repeat
    assert alone and all(a["process"]["command_line"] == "/bin/true" and
                         "repeat" not in a["pamsignal"] for a in alone)
    assert len(alone) < flood / 10
    digests = mine("alert_digest")
    assert all(d["event"]["reason"] == "repeat" and
               d["process"]["command_line"] == "/bin/true" and
               d["user"]["target"]["name"] == "root" for d in digests)
    assert sum(d["pamsignal"]["held_back"] for d in digests) >= 1
    # What the full spool lost is named: kinds and whose.
    (report,) = [a for a in delivered
                 if a["event"]["action"] == "alerts_dropped"]
    assert "spool full" in report["pamsignal"]["detail"]
    assert "sudo_command" in report["pamsignal"]["detail"] or \
        "alert_digest" in report["pamsignal"]["detail"]
    assert user in report["pamsignal"]["users_tried"]
    assert flood - unvouched(delivered, uid) <= accounted(
        delivered, user) <= flood
    assert user in report["message"]
