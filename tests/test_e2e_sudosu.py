"""End to end against the real sudo, su and login: the host's Debian 12
programs (sudo 1.9.13, util-linux su 2.38, shadow's login 4.13) through the
running agent, and the Debian 13 tree's sudo 1.9.16 with
`Defaults log_format=json` and util-linux login 2.41 in a private overlay
of that tree (the host's /etc/sudoers is never touched: other tests run
sudo at the same time), their journal lines read back through `scan`.

Wrong then right passwords, typed on a real pty where the program wants
one; each test reads only its own fresh users' events."""
import fcntl
import json
import os
import pwd
import re
import select
import subprocess
import termios
import time

import pytest

import realsys
from conftest import field, random_name
from test_e2e import barrier, count, is_event

pytestmark = pytest.mark.e2e

HERE = os.path.dirname(os.path.abspath(__file__))
PAMSIGNAL = os.path.join(os.path.dirname(HERE), "pamsignal.py")


def _controlling_tty():
    # In the child: a session of its own with the pty as its terminal,
    # as getty gives login (login refuses to run without one).
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def converse(argv, script, timeout=60):
    """Run `argv` on a fresh pty; `script` is [(prompt regex, reply)]:
    each reply is typed once the output since the last reply matches its
    prompt (and, for a password, once echo is off, as a person would).
    Returns (returncode, output)."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(argv, stdin=slave, stdout=slave,
                                   stderr=slave, close_fds=True,
                                   preexec_fn=_controlling_tty)
    finally:
        os.close(slave)
    output, since, steps = b"", 0, list(script)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: no slave open (util-linux login
                    chunk = b""  # hangs the terminal up and reopens it)
                if not chunk:
                    if process.poll() is not None:
                        break
                    time.sleep(0.05)
                output += chunk
            if steps and re.search(steps[0][0].encode(), output[since:]):
                prompt, reply = steps.pop(0)
                if "assword" in prompt:
                    while termios.tcgetattr(master)[3] & termios.ECHO and \
                            time.time() < deadline:
                        time.sleep(0.02)
                os.write(master, reply.encode() + b"\n")
                since = len(output)
        else:
            process.kill()
    finally:
        os.close(master)
    return process.wait(timeout=10), output.decode("utf-8", "replace")


def login_script(user, wrong, right):
    """A wrong password, the prompt again, the right one, then leave."""
    return [(r"login: $", user), (r"assword: $", wrong),
            (r"login: $", user), (r"assword: $", right),
            (r"[$#] $", "exit")]


# ---------------------------------------------------------------- host


def test_sudo_wrong_then_right_password(agent, make_user):
    """sudo 1.9.13: a wrong password, then the right one in the same run.
    One failure; the command; the session opened and closed, both naming
    who acted (pam_unix wrote only `by (uid=N)`) and as whom."""
    user, password = make_user(groups=("sudo",))
    uid = str(pwd.getpwnam(user).pw_uid)
    mark = agent.mark()
    result = realsys._run(["runuser", "-u", user, "--", "sudo", "-S", "-k",
                           "-p", "", "--", "true"],
                          input="wrong-%s\n%s\n" % (password, password),
                          timeout=60)
    assert result.returncode == 0, result
    closed = agent.wait_event(is_event("session_closed", user__name=user),
                              since=mark)
    opened = agent.wait_event(is_event("session_opened", user__name=user),
                              since=mark)
    for session in (opened, closed):
        assert field(session, "user.id") == uid
        assert field(session, "user.target.name") == "root"
        assert field(session, "service.name") == "sudo"
    assert isinstance(field(closed, "pamsignal.session_duration_s"), float)
    barrier(agent, since=mark)
    events = agent.events(mark)
    assert count(events, is_event("login_failure", user__name=user)) == 1, \
        agent.dump(mark)
    assert count(events, is_event("sudo_command", user__name=user)) == 1


def test_sudo_command_past_sudos_line_length_is_whole(agent, make_user):
    """sudo 1.9.13 splits a line past 960 bytes into `(command continued)`
    lines (a short first line here: the break is at the space before the
    1000-character word). The event's command is the whole command, its
    hidden end included."""
    user, password = make_user(groups=("sudo",))
    script = "true %s; echo end-of-%s" % ("x" * 1000, user)
    mark = agent.mark()
    result = realsys._run(["runuser", "-u", user, "--", "sudo", "-S", "-k",
                           "-p", "", "--", "/bin/sh", "-c", script],
                          input="%s\n" % password, timeout=60)
    assert result.returncode == 0, result
    command = agent.wait_event(is_event("sudo_command", user__name=user),
                               since=mark)
    line = field(command, "process.command_line")
    assert line.endswith("; echo end-of-%s'" % user), line
    assert "x" * 1000 in line and field(command, "pamsignal.detail") is None


def test_su_sessions_name_who_acted(agent, make_user):
    """util-linux su 2.38: one wrong password (one failure, PAM's line and
    FAILED SU paired), then the right one: the session's events name the
    caller by name and UID, and the account he became."""
    user, _ = make_user()
    target, target_password = make_user()
    uid = str(pwd.getpwnam(user).pw_uid)
    mark = agent.mark()
    rc, out = realsys.su_as(user, "wrong-" + target_password, target)
    assert rc != 0, out
    rc, out = realsys.su_as(user, target_password, target, "echo su-ok")
    assert rc == 0 and "su-ok" in out, out
    closed = agent.wait_event(
        is_event("session_closed", user__target__name=target), since=mark)
    opened = agent.wait_event(
        is_event("session_opened", user__target__name=target), since=mark)
    for session in (opened, closed):
        assert field(session, "user.name") == user
        assert field(session, "user.id") == uid
    barrier(agent, since=mark)
    failures = [e for e in agent.events(mark)
                if is_event("login_failure", user__name=user)(e)]
    assert len(failures) == 1, agent.dump(mark)
    assert field(failures[0], "user.target.name") == target
    assert field(failures[0], "message").startswith("FAILED SU ")


def test_shadow_login_wrong_then_right(agent, make_user):
    """shadow's login 4.13 on a pty: a wrong password (pam_unix's line and
    FAILED LOGIN: one failure), then the right one (login's session)."""
    user, password = make_user()
    mark = agent.mark()
    rc, out = converse(["/bin/login"], login_script(
        user, "wrong-" + password, password))
    assert "Login incorrect" in out, out
    agent.wait_event(is_event("session_closed", user__name=user,
                              service__name="login"), since=mark)
    barrier(agent, since=mark)
    failures = [e for e in agent.events(mark)
                if is_event("login_failure", user__name=user)(e)]
    assert len(failures) == 1, agent.dump(mark)
    assert field(failures[0], "event.reason") == "bad_password"
    assert field(failures[0], "message").startswith("FAILED LOGIN (1) on ")
    assert count(agent.events(mark), is_event(
        "session_opened", user__name=user, service__name="login")) == 1


# ---------------------------------------------------------------- Debian 13


@pytest.fixture(scope="module")
def trixie_overlay(journald, tmp_path_factory):
    """A private overlay of the cached Debian 13 tree, its /dev/log
    reaching the host journal, with a sudoer (`Defaults log_format=json`)
    and a user sudoers does not know."""
    realsys.require_root()
    if not realsys.trixie_tree_complete():
        realsys.unavailable("the Debian 13 tree is not built "
                            "(python3 tests/realsys.py trixie-tree)")
    workdir = str(tmp_path_factory.mktemp("trixie-sudosu"))
    os.makedirs(os.path.join(workdir, "upper", "run", "systemd", "journal"))
    overlay = realsys.TreeOverlay(
        realsys.TRIXIE_TREE, workdir,
        binds=("/proc", "/dev", "/run/systemd/journal"))
    overlay.start()
    accounts = {role: (random_name(prefix), realsys.new_password())
                for role, prefix in (("sudoer", "psjs"),
                                     ("stranger", "psjn"))}
    setup = ["set -e"]
    for name, password in accounts.values():
        setup += ["useradd -m %s" % name,
                  "echo %s:%s | chpasswd" % (name, password)]
    setup += ["printf 'Defaults log_format=json\\n%s ALL=(ALL) ALL\\n' "
              "> /etc/sudoers.d/json" % accounts["sudoer"][0],
              "chmod 440 /etc/sudoers.d/json", "visudo -c -q"]
    try:
        done = overlay.run(["sh", "-c", "\n".join(setup)])
        assert done.returncode == 0, done
        yield overlay, accounts
    finally:
        overlay.stop()


def tree_events(overlay, cursor, users):
    """The journal entries the tree's programs wrote for `users` since
    `cursor`, through `scan --json -`. journald names the overlay's host
    path as _EXE, which is no system directory; the trust rules are tested
    on the host's programs, so here it is put back to the tree's own."""
    prefix = overlay.merged
    entries, pids = [], set()
    for entry in realsys.journal_entries(cursor):
        if entry.get("SYSLOG_IDENTIFIER") not in ("sudo", "login"):
            continue
        exe = entry.get("_EXE") or ""
        if not exe.startswith(prefix + "/"):
            continue  # another test's sudo or login on the host
        entry["_EXE"] = exe[len(prefix):]
        if any(user in realsys._text(entry.get("MESSAGE")) for user in users):
            pids.add(entry.get("_PID"))
        entries.append(entry)
    mine = [e for e in entries if e.get("_PID") in pids]
    scanned = subprocess.run(
        ["python3", PAMSIGNAL, "scan", "--json", "-"],
        input="".join(json.dumps(e) + "\n" for e in mine),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    assert scanned.returncode == 0, scanned.stderr
    return [json.loads(line) for line in scanned.stdout.splitlines()], mine


def wait_for_tree_line(cursor, pattern):
    return realsys.wait_for_journal(pattern, cursor, timeout=30)


def test_sudo_json_lines_of_the_real_sudo(trixie_overlay):
    """sudo 1.9.16 with log_format=json: a wrong password then no more
    input (one failure: pam_unix's line, sudo's reject record with its
    total), the right one (an accept record: the command), and a user not
    in sudoers (a refusal, no guess)."""
    overlay, accounts = trixie_overlay
    sudoer, password = accounts["sudoer"]
    stranger, stranger_password = accounts["stranger"]
    cursor = realsys.journal_cursor()
    for user, typed in ((sudoer, "wrong-" + password), (sudoer, password),
                        (stranger, stranger_password)):
        overlay.run(["runuser", "-u", user, "--", "sudo", "-S", "-k", "-p",
                     "", "--", "id", "-u"], input=typed + "\n", timeout=60)
    wait_for_tree_line(cursor, r'^@cee:\{"sudo":\{"reject":.*"reason":'
                       r'"user NOT in sudoers".*"submituser":"%s"' % stranger)
    events, entries = tree_events(overlay, cursor, (sudoer, stranger))
    assert any(realsys._text(e.get("MESSAGE")).startswith('@cee:{"sudo":')
               for e in entries)
    by_action = {}
    for event in events:
        by_action.setdefault(event["event"]["action"], []).append(event)
    failures = by_action.get("login_failure", [])
    assert [(field(e, "user.name"), field(e, "event.reason"))
            for e in failures] == [(sudoer, "bad_password"),
                                   (stranger, "not_in_sudoers")], events
    [command] = by_action["sudo_command"]
    assert field(command, "user.name") == sudoer
    assert field(command, "user.target.name") == "root"
    assert field(command, "process.command_line") == "/usr/bin/id -u"
    for session in by_action["session_opened"] + by_action["session_closed"]:
        assert field(session, "user.name") == sudoer


def test_util_linux_login_of_the_real_login(trixie_overlay):
    """util-linux login 2.41 on a pty: FAILED LOGIN for the wrong password
    (paired with pam_unix's line: one failure), then the session of the
    right one. (Run chrooted like this, it wrote no `LOGIN ON` line; the
    fixtures hold that form from its source.)"""
    overlay, accounts = trixie_overlay
    user, password = accounts["stranger"]
    cursor = realsys.journal_cursor()
    rc, out = converse(
        ["nsenter", "--target", str(overlay.holder.pid), "--mount",
         "--root", "--wd", "--", "chroot", overlay.merged, "/usr/bin/login"],
        login_script(user, "wrong-" + password, password))
    assert "Login incorrect" in out, out
    wait_for_tree_line(cursor, r"^pam_unix\(login:session\): session closed "
                       r"for user %s$" % user)
    events, _ = tree_events(overlay, cursor, (user,))
    failures = [e for e in events if e["event"]["action"] == "login_failure"]
    assert [(field(e, "user.name"), field(e, "event.reason"))
            for e in failures] == [(user, "bad_password")], events
    assert re.match(r"^FAILED LOGIN 1 FROM pts/\d+ FOR %s, " % user,
                    field(failures[0], "message"))
    assert re.match(r"^pts/\d+$", field(failures[0], "pamsignal.tty"))
    assert [(e["event"]["action"], field(e, "user.name")) for e in events
            if e["event"]["action"].startswith("session_")] == [
        ("session_opened", user), ("session_closed", user)]
