"""End to end: real journald, sshd, sudo and su; the agent run as users run
it (`python3 pamsignal.py --config CFG run --json`); assertions on what it
printed.  Each test gets a fresh agent (first_start = now) and, where it
counts events, fresh users, so tests never see each other's logins."""

import re
import signal
import time

import pytest

import realsys
from conftest import configured_agent, field, random_name

pytestmark = pytest.mark.e2e

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def is_event(action, **dotted):
    """Predicate: event.action == action and each dotted field (given with
    "__" for ".", e.g. user__name="x") equals its value."""
    want = dict((k.replace("__", "."), v) for k, v in dotted.items())

    def pred(ev):
        if field(ev, "event.action") != action:
            return False
        return all(field(ev, k) == v for k, v in want.items())

    pred.__doc__ = "%s %r" % (action, want)
    return pred


def no_nulls(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            no_nulls(v, path + "." + k if path else k)
    elif isinstance(obj, list):
        for v in obj:
            no_nulls(v, path)
    else:
        assert obj is not None, "null at %s" % path


def check_common(ev, service=None):
    """Fields every event carries (the event reference in pamsignal(8))."""
    no_nulls(ev)
    assert RFC3339_UTC.match(ev.get("@timestamp", "")), ev
    assert field(ev, "event.outcome") in ("success", "failure", "unknown"), ev
    assert isinstance(field(ev, "process.pid"), int), ev
    assert field(ev, "host.hostname"), ev
    assert field(ev, "message"), ev
    if service is not None:
        assert field(ev, "service.name") == service, ev


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def barrier(agent, since=0):
    """Make sure the agent has processed everything now in the journal: log
    an invalid-user attempt with a unique name and wait for its report
    (the journal is read in order)."""
    name = random_name("psbar")
    realsys.ssh_password(name, "x")
    agent.wait_event(is_event("login_failure", user__name=name), since=since)


def port_of(entry):
    return int(re.search(r" port (\d+)", entry["MESSAGE"]).group(1))


def count(events, pred):
    return len([e for e in events if pred(e)])


# ---------------------------------------------------------------- sshd


def test_failed_password_reported_once(sshd, agent, make_user):
    user, pw = make_user()
    cur = realsys.journal_cursor()
    mark = agent.mark()
    r = realsys.ssh_password(user, "wrong-" + pw)
    assert r.returncode != 0
    line = realsys.wait_for_journal(
        r"^Failed password for %s from 127\.0\.0\.1 port \d+ ssh2$" % user,
        cur,
        identifier="sshd",
    )
    # the companion lines of the same attempt are in the journal too
    realsys.wait_for_journal(
        r"^pam_unix\(sshd:auth\): authentication failure;.* user=%s$" % user,
        cur,
    )
    realsys.wait_for_journal(
        r"^Connection closed by authenticating user %s " % user, cur
    )

    ev = agent.wait_event(
        is_event("login_failure", user__name=user), since=mark
    )
    check_common(ev, service="sshd")
    assert field(ev, "event.outcome") == "failure"
    assert field(ev, "event.reason") == "bad_password"
    assert field(ev, "source.ip") == "127.0.0.1"
    assert is_int(field(ev, "source.port"))
    assert field(ev, "source.port") == port_of(line)
    assert field(ev, "process.pid") == int(line["_PID"])

    barrier(agent, since=mark)
    got = [
        e
        for e in agent.events(mark)
        if is_event("login_failure", user__name=user)(e)
    ]
    assert len(got) == 1, (
        "one wrong password, %d login_failure events:\n%s" % (len(got), got)
    )


def test_invalid_user(sshd, agent):
    name = random_name("psnouser")
    cur = realsys.journal_cursor()
    mark = agent.mark()
    realsys.ssh_password(name, "whatever")
    line = realsys.wait_for_journal(
        r"^Invalid user %s from 127\.0\.0\.1 port \d+$" % name, cur
    )
    ev = agent.wait_event(
        is_event("login_failure", user__name=name), since=mark
    )
    check_common(ev, service="sshd")
    assert field(ev, "event.reason") == "invalid_user"
    assert field(ev, "source.ip") == "127.0.0.1"
    assert field(ev, "source.port") == port_of(line)


def test_success_password(sshd, agent, make_user):
    user, pw = make_user()
    cur = realsys.journal_cursor()
    mark = agent.mark()
    r = realsys.ssh_password(user, pw, "echo ok")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r
    line = realsys.wait_for_journal(
        r"^Accepted password for %s from 127\.0\.0\.1 port \d+ ssh2$" % user,
        cur,
    )
    ev = agent.wait_event(
        is_event("login_success", user__name=user), since=mark
    )
    check_common(ev, service="sshd")
    assert field(ev, "event.outcome") == "success"
    assert field(ev, "pamsignal.auth_method") == "password"
    assert field(ev, "source.ip") == "127.0.0.1"
    assert field(ev, "source.port") == port_of(line)
    assert field(ev, "pamsignal.key") is None


def test_success_publickey(sshd, agent, users):
    cur = realsys.journal_cursor()
    mark = agent.mark()
    r = realsys.ssh_key(users.plain, users.key_path, "echo ok")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r
    line = realsys.wait_for_journal(
        r"^Accepted publickey for %s from 127\.0\.0\.1 port \d+ ssh2: "
        r"ED25519 SHA256:" % users.plain,
        cur,
    )
    ev = agent.wait_event(
        is_event(
            "login_success", user__name=users.plain, source__port=port_of(line)
        ),
        since=mark,
    )
    check_common(ev, service="sshd")
    assert field(ev, "pamsignal.auth_method") == "publickey"
    assert field(ev, "pamsignal.key", "").startswith("ED25519 SHA256:")
    assert field(ev, "pamsignal.key") == users.key_fp
    assert field(ev, "source.ip") == "127.0.0.1"


def test_success_over_ipv6(sshd, agent, make_user):
    user, pw = make_user()
    cur = realsys.journal_cursor()
    mark = agent.mark()
    r = realsys.ssh_password(user, pw, host="::1")
    assert r.returncode == 0, r
    line = realsys.wait_for_journal(
        r"^Accepted password for %s from ::1 port \d+ ssh2$" % user, cur
    )
    ev = agent.wait_event(
        is_event("login_success", user__name=user), since=mark
    )
    assert field(ev, "source.ip") == "::1"
    assert field(ev, "source.port") == port_of(line)


def test_session_opened_and_closed_with_duration(sshd, agent, make_user):
    user, pw = make_user()
    cur = realsys.journal_cursor()
    mark = agent.mark()
    r = realsys.ssh_password(user, pw, "sleep 2")
    assert r.returncode == 0, r
    realsys.wait_for_journal(
        r"^pam_unix\(sshd:session\): session closed for user %s$" % user, cur
    )
    opened = agent.wait_event(
        is_event("session_opened", user__name=user), since=mark
    )
    check_common(opened, service="sshd")
    closed = agent.wait_event(
        is_event("session_closed", user__name=user), since=mark
    )
    check_common(closed, service="sshd")
    evs = agent.events(mark)
    assert evs.index(opened) < evs.index(closed)
    dur = field(closed, "pamsignal.session_duration_s")
    assert isinstance(dur, (int, float)) and not isinstance(dur, bool), closed
    assert dur >= 2, closed


# ---------------------------------------------------------------- sudo, su


def test_sudo_command(agent, users):
    marker = random_name("sudo-marker-")
    cur = realsys.journal_cursor()
    mark = agent.mark()
    r = realsys.sudo_as(users.sudoer, users.sudoer_pw, ["echo", marker])
    assert r.returncode == 0 and marker in r.stdout, r
    realsys.wait_for_journal(
        r"%s : .*USER=root ; COMMAND=.*%s" % (users.sudoer, marker),
        cur,
        identifier="sudo",
    )
    ev = agent.wait_event(
        lambda e: (
            is_event("sudo_command", user__name=users.sudoer)(e)
            and marker in (field(e, "process.command_line") or "")
        ),
        since=mark,
    )
    check_common(ev, service="sudo")
    assert field(ev, "user.target.name") == "root"
    assert field(ev, "process.command_line").endswith("echo " + marker)


def test_sudo_wrong_password_reported_once(agent, make_user):
    user, pw = make_user(groups=("sudo",))
    cur = realsys.journal_cursor()
    mark = agent.mark()
    r = realsys.sudo_as(user, "wrong-" + pw, ["true"])
    assert r.returncode != 0
    realsys.wait_for_journal(
        r"%s : 1 incorrect password attempt" % user, cur, identifier="sudo"
    )
    ev = agent.wait_event(
        is_event("login_failure", user__name=user), since=mark
    )
    check_common(ev, service="sudo")
    assert field(ev, "event.reason") == "bad_password"
    barrier(agent, since=mark)
    n = count(agent.events(mark), is_event("login_failure", user__name=user))
    assert n == 1, agent.dump(mark)


def test_su_success(agent, make_user):
    user, _ = make_user()
    target, target_pw = make_user()
    cur = realsys.journal_cursor()
    mark = agent.mark()
    rc, out = realsys.su_as(user, target_pw, target, "echo su-ok")
    assert rc == 0 and "su-ok" in out, out
    realsys.wait_for_journal(
        r"^\(to %s\) %s on pts/\d+$" % (target, user), cur, identifier="su"
    )
    ev = agent.wait_event(
        is_event("login_success", user__name=user), since=mark
    )
    check_common(ev, service="su")
    assert field(ev, "event.outcome") == "success"
    assert field(ev, "user.target.name") == target


def test_su_failure_reported_once(agent, make_user):
    user, _ = make_user()
    target, target_pw = make_user()
    cur = realsys.journal_cursor()
    mark = agent.mark()
    rc, out = realsys.su_as(user, "wrong-" + target_pw, target)
    assert rc != 0, out
    realsys.wait_for_journal(
        r"^FAILED SU \(to %s\) %s on pts/\d+$" % (target, user),
        cur,
        identifier="su",
    )
    ev = agent.wait_event(
        is_event("login_failure", user__name=user), since=mark
    )
    check_common(ev, service="su")
    assert field(ev, "event.outcome") == "failure"
    assert field(ev, "event.reason") == "bad_password"
    assert field(ev, "user.target.name") == target
    barrier(agent, since=mark)
    n = count(agent.events(mark), is_event("login_failure", user__name=user))
    assert n == 1, agent.dump(mark)


# ---------------------------------------------------------------- trust


def test_forged_entry_is_spoofed_not_a_login(sshd, agent):
    msg = "Accepted password for root from 6.6.6.6 port 1 ssh2"
    cur = realsys.journal_cursor()
    mark = agent.mark()
    realsys.forge("nobody", "sshd", msg)
    realsys.wait_for_journal(
        r"^%s$" % re.escape(msg), cur, identifier="sshd", _UID="65534"
    )
    ev = agent.wait_event(
        lambda e: (
            field(e, "event.action") == "spoofed_entry"
            and "6.6.6.6" in (field(e, "message") or "")
        ),
        since=mark,
    )
    no_nulls(ev)
    assert field(ev, "pamsignal.writer_uid") == 65534, ev
    assert field(ev, "pamsignal.claimed_action") == "login_success", ev
    assert field(ev, "source.ip") is None and field(ev, "user.name") is None, (
        ev
    )
    barrier(agent, since=mark)
    bad = [
        e
        for e in agent.events(mark)
        if field(e, "event.action") == "login_success"
        and field(e, "source.ip") == "6.6.6.6"
    ]
    assert not bad, bad


# ---------------------------------------------------------------- restarts


def _identity(ev):
    return (
        ev.get("@timestamp"),
        field(ev, "event.action"),
        field(ev, "message"),
    )


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"]
)
def test_restart_reports_downtime_login_exactly_once(
    sshd, agent, make_user, sig
):
    before, before_pw = make_user()
    during, during_pw = make_user()

    # 1. a login while the agent runs
    cur = realsys.journal_cursor()
    assert realsys.ssh_password(before, before_pw).returncode == 0
    realsys.wait_for_journal(
        r"^pam_unix\(sshd:session\): session closed for user %s$" % before, cur
    )
    agent.wait_event(is_event("login_success", user__name=before))
    barrier(agent)
    if sig == signal.SIGKILL:
        time.sleep(2)  # a kill at an arbitrary instant; not mid-write
    first_run = agent.events()

    # 2. stop it, log in while it is down
    rc = agent.stop(sig)
    if sig == signal.SIGTERM:
        assert rc in (0, -signal.SIGTERM), "exit code %s after SIGTERM\n%s" % (
            rc,
            agent.stderr_text(),
        )
    cur = realsys.journal_cursor()
    assert realsys.ssh_password(during, during_pw).returncode == 0
    realsys.wait_for_journal(r"^Accepted password for %s from " % during, cur)
    realsys.wait_for_journal(
        r"^pam_unix\(sshd:session\): session closed for user %s$" % during, cur
    )

    # 3. start it again on the same state_dir
    mark = agent.mark()
    agent.start()
    ev = agent.wait_event(
        is_event("login_success", user__name=during), since=mark
    )
    check_common(ev, service="sshd")
    barrier(agent, since=mark)
    second_run = agent.events(mark)
    n = count(second_run, is_event("login_success", user__name=during))
    assert n == 1, "downtime login reported %d times:\n%s" % (
        n,
        agent.dump(mark),
    )
    old = set(_identity(e) for e in first_run)
    again = [e for e in second_run if _identity(e) in old]
    assert not again, "reported again after restart:\n%s" % again
    assert count(second_run, lambda e: field(e, "user.name") == before) == 0


def test_restart_before_anything_was_seen_keeps_position(
    sshd, agent, make_user
):
    """Started, stopped before any watched entry arrived (a quiet server
    rebooted), someone logs in, started again: that login is reported."""
    user, pw = make_user()
    time.sleep(1)
    assert agent.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    cur = realsys.journal_cursor()
    assert realsys.ssh_password(user, pw).returncode == 0
    realsys.wait_for_journal(r"^Accepted password for %s from " % user, cur)
    mark = agent.mark()
    agent.start()
    ev = agent.wait_event(
        is_event("login_success", user__name=user), since=mark
    )
    check_common(ev, service="sshd")
    barrier(agent, since=mark)
    n = count(agent.events(mark), is_event("login_success", user__name=user))
    assert n == 1, agent.dump(mark)


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"]
)
def test_open_session_survives_an_agent_restart(sshd, agent, make_user, sig):
    """The session table is saved with the cursor: a session opened before
    a restart and closed after it still gets its duration."""
    import threading

    user, pw = make_user()
    login = threading.Thread(
        target=realsys.ssh_password, args=(user, pw, "sleep 6")
    )
    login.start()
    try:
        opened = agent.wait_event(
            is_event("session_opened", user__name=user, service__name="sshd")
        )
        barrier(agent)  # its state (and the open session) is saved
        agent.stop(sig)
        mark = agent.mark()
        agent.start()
    finally:
        login.join(60)
    closed = agent.wait_event(
        is_event("session_closed", user__name=user, service__name="sshd"),
        since=mark,
    )
    duration = field(closed, "pamsignal.session_duration_s")
    assert isinstance(duration, float) and duration >= 5.0, closed
    assert field(closed, "process.pid") == field(opened, "process.pid")


def test_brute_force_then_success_raises_both_alerts(sshd, agent, make_user):
    """Real failed logins until the brute force fires, then the right
    password from the same address: the success-after-failures alert."""
    user, pw = make_user()
    # A source of its own: another login from 127.0.0.1 meanwhile (another
    # test run, a person) must not change what this source is counted.
    client = realsys.unique_loopback()
    for _ in range(5):
        assert realsys.ssh_password(user, "wrong-" + pw,
                                    source=client).returncode != 0
    # One attack, one alert: from the source (the account crossed with it).
    source = agent.wait_event(
        is_event("brute_force_detected", source__ip=client))
    assert field(source, "pamsignal.counted_by") == "source", source
    assert field(source, "event.reason") == "repeated_failures", source
    assert field(source, "pamsignal.attempts") == 5, source
    assert field(source, "pamsignal.window_s") == 600, source
    assert field(source, "pamsignal.users_tried") == [user], source

    assert realsys.ssh_password(user, pw, source=client).returncode == 0
    alert = agent.wait_event(
        is_event("success_after_failures", user__name=user))
    assert field(alert, "event.severity") == 9, alert
    assert field(alert, "source.ip") == client, alert
    assert field(alert, "pamsignal.attempts") >= 5, alert
    assert field(alert, "pamsignal.auth_method") == "password", alert


@pytest.fixture
def paging_agent(journald, sshd, tmp_path):
    """An agent with a configured channel, so the alert policy applies:
    the defaults plus individual failures, with a 10 minute cooldown."""
    paging = configured_agent(str(tmp_path), (
        "[alerts]\nevents = default, login_failure\ncooldown = 10m\n"
        "[channel:screen]\ntype = console\nformat = json\n"))
    paging.start()
    yield paging
    if paging.running():
        paging.stop(signal.SIGTERM)


def test_policy_holds_repeats_never_a_success_and_digests_at_stop(
        paging_agent, make_user):
    """Real failures from one address: the first is sent, repeats are held
    by the cooldown, the success after them is sent at once, and what was
    held comes out as one digest when the agent stops."""
    user, pw = make_user()
    client = realsys.unique_loopback()
    for _ in range(5):
        assert realsys.ssh_password(user, "wrong-" + pw,
                                    source=client).returncode != 0
    paging_agent.wait_event(is_event("brute_force_detected",
                                     source__ip=client))
    assert realsys.ssh_password(user, pw, source=client).returncode == 0
    paging_agent.wait_event(is_event("success_after_failures",
                                     user__name=user))
    paging_agent.wait_event(is_event("login_success", user__name=user))
    failures = [e for e in paging_agent.events()
                if is_event("login_failure", user__name=user)(e)]
    assert len(failures) == 1, failures
    assert paging_agent.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    (digest,) = [e for e in paging_agent.events()
                 if is_event("alert_digest")(e) and
                 field(e, "pamsignal.sources") == [client]]
    summary = field(digest, "event.reason"), field(
        digest, "pamsignal.sources"), field(digest, "pamsignal.users_tried")
    assert summary == ("cooldown", [client], [user]), digest
    held = field(digest, "pamsignal.held_back")
    assert held >= 4 and field(digest, "pamsignal.detail") == \
        "%d login_failure" % held, digest
