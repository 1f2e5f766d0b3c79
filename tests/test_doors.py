"""The other doors in (pamsignal(8), "Other doors in"): pkexec and polkit,
doas, run0, Cockpit, gdm, lightdm, sddm.

Unit tests of what pairs their lines and of polkitd's trust rule, then the
real programs in one booted Debian 13 tree (tests/realsys.py doors-tree:
the boot tree with opendoas, pkexec, polkitd and libpam-systemd; run0 is
systemd 257's): wrong and right passwords through doas and pkexec's own
text agent, a refused doas command, run0 as root, `systemd-run --pty`
with a PAM login session (what machinectl shell asks for), and forged
copies of
every form written with `logger` by an unprivileged user. The journal of
the container is read back with the agent's own journalctl fields and
matches, by `pamsignal.py scan` inside it, where the polkitd account
exists; meanwhile the agent runs there as the hardened service
(`pamsignal.py install`) and follows it all live. Cockpit and the display
managers do not run here: their forms are fixtures from their sources
(fixtures/doors_forms.json)."""
import json
import secrets
import shlex
import subprocess

import pytest

import realsys
from support import REPO, make_entry, pamsignal, wait_for

INSIDE_SRC = realsys.INSIDE_SRC
HOSTILE = "x from 1.2.3.4 port 22 ssh2"
HELPER_FAILURE = ("pam_unix(polkit-1:auth): authentication failure; logname="
                  " uid=1000 euid=0 tty= ruser=alice rhost=  user=alice")
VERDICT = ("Operator of unix-process:99:1 %s authorization for action "
           "org.freedesktop.policykit.exec for unix-process:99:1 [pkexec "
           "/usr/bin/id] (owned by unix-user:alice)")
FAILED = VERDICT % "FAILED to authenticate to gain"
SUCCEEDED = VERDICT % ("successfully authenticated as unix-user:alice to "
                       "gain ONE-SHOT")
REFUSED = ("alice: Error executing command as another user: Not authorized "
           "[USER=root] [TTY=/dev/pts/1] [CWD=/] [COMMAND=/usr/bin/id]")
POLKITD = {"_EXE": "/usr/lib/polkit-1/polkitd", "_COMM": "polkitd",
           "_UID": "995"}
ACCOUNTS = {"polkitd": "995"}


def polkit_events(*lines):
    """(identifier, message, fields) lines through PolkitAttempts, one
    second apart; the events it lets through, the held ones at the end."""
    attempts = pamsignal.PolkitAttempts()
    out = []
    for second, (identifier, message, fields) in enumerate(lines, 1):
        event = pamsignal.parse_entry(make_entry(
            identifier, message, sequence=second, _PID=str(100 + second),
            **fields), accounts=ACCOUNTS)
        out += attempts.observe(event)
    return out + attempts.drain()


HELPER = ("polkit-agent-helper-1", HELPER_FAILURE, {
    "_EXE": "/usr/lib/polkit-1/polkit-agent-helper-1",
    "_COMM": "polkit-agent-he", "_UID": "1000"})
PKEXEC_REFUSAL = ("pkexec", REFUSED, {"_UID": "1000"})


def test_a_wrong_pkexec_password_is_one_event():
    (event,) = polkit_events(HELPER, ("polkitd", FAILED, POLKITD),
                             PKEXEC_REFUSAL)
    assert (event.action, event.service, event.user, event.user_id) == (
        "login_failure", "polkit", "alice", "1000")
    assert event.command_line == "pkexec /usr/bin/id"
    assert event.detail == "org.freedesktop.policykit.exec"


def test_an_agent_that_asked_twice_is_one_event_of_two_attempts():
    (event,) = polkit_events(HELPER, HELPER, ("polkitd", FAILED, POLKITD))
    assert (event.service, event.attempts) == ("polkit", 2)


def test_a_failure_then_success_in_one_agent_session_is_two_events():
    events = polkit_events(HELPER, ("polkitd", SUCCEEDED, POLKITD))
    assert [(e.action, e.service) for e in events] == [
        ("login_failure", "polkit-1"), ("login_success", "polkit")]


def test_a_helper_failure_no_verdict_follows_is_released_in_time():
    attempts = pamsignal.PolkitAttempts()
    failure = pamsignal.parse_entry(make_entry(
        HELPER[0], HELPER[1], **HELPER[2]))
    assert attempts.observe(failure) == []
    assert attempts.due(failure.timestamp_us + 1000000) == []
    assert attempts.due(failure.timestamp_us + pamsignal.SSH_HOLD_US) == [
        failure]
    assert attempts.drain() == []


def test_a_pkexec_refusal_nobody_judged_is_its_own_event():
    (event,) = polkit_events(PKEXEC_REFUSAL)
    assert (event.service, event.reason) == ("pkexec", "not_authorized")


def test_a_verdict_for_another_user_does_not_swallow_a_refusal():
    other = ("polkitd", FAILED.replace("unix-user:alice", "unix-user:bob"),
             POLKITD)
    events = polkit_events(other, PKEXEC_REFUSAL)
    assert [(e.service, e.user) for e in events] == [
        ("polkit", "bob"), ("pkexec", "alice")]


@pytest.mark.parametrize("uid,accounts,genuine", [
    ("995", ACCOUNTS, True),
    ("995", None, False),           # no such account here: not trusted
    ("1000", ACCOUNTS, False),      # a person's process
    ("0", None, True),              # polkit before 0.106 ran as root
])
def test_polkitd_is_trusted_only_as_its_own_account(uid, accounts, genuine):
    event = pamsignal.parse_entry(make_entry(
        "polkitd", FAILED, **dict(POLKITD, _UID=uid)), accounts=accounts)
    assert (event.action == "login_failure") is genuine
    assert (event.action == "spoofed_entry") is not genuine


def test_polkitd_account_elsewhere_than_its_directory_is_forged():
    event = pamsignal.parse_entry(make_entry(
        "polkitd", FAILED, **dict(POLKITD, _EXE="/tmp/polkitd")),
        accounts=ACCOUNTS)
    assert event.action == "spoofed_entry"


class Account(object):
    def __init__(self, uid):
        self.pw_uid = uid


@pytest.mark.parametrize("uid,expected", [
    (995, {"polkitd": "995"}),
    (0, {}),          # root's UID would trust anything root writes anyway
    (1000, {}),       # a UID people's accounts get
    (None, {}),       # no polkitd account on this machine
])
def test_service_account_uids_takes_only_system_accounts(uid, expected):
    def getpwnam(name):
        assert name == "polkitd"
        if uid is None:
            raise KeyError(name)
        return Account(uid)
    assert pamsignal.service_account_uids(getpwnam) == expected


RUN0_UNIT = ("systemd", "Starting run-p92-i6.service - [run0] /usr/bin/id...",
             {"_EXE": "/usr/lib/systemd/systemd", "_PID": "1",
              "_TRANSPORT": "journal"})
RUN0_SESSION = ("(id)", "pam_unix(systemd-run0:session): session opened for "
                "user bob(uid=1001) by (uid=1000)",
                {"_EXE": pamsignal.EXECUTOR_EXE, "_COMM": "(id)",
                 "_SYSTEMD_UNIT": "run-p92-i6.service"})


def run0_events(*lines):
    pairs = pamsignal.Run0Commands()
    out = []
    for second, (identifier, message, fields) in enumerate(lines, 1):
        out += pairs.observe(pamsignal.parse_entry(make_entry(
            identifier, message, sequence=second, **fields)))
    return out, pairs


def test_run0s_command_takes_who_from_its_units_session():
    (command, opened), pairs = run0_events(RUN0_UNIT, RUN0_SESSION)
    assert (command.action, command.service, command.command_line) == (
        "sudo_command", "run0", "/usr/bin/id")
    assert (command.user_id, command.target_user) == ("1000", "bob")
    assert (opened.action, opened.service) == ("session_opened",
                                               "systemd-run0")
    assert pairs.drain() == []


def test_run0s_command_is_not_paired_with_another_units_session():
    other = RUN0_SESSION[:2] + (dict(RUN0_SESSION[2],
                                     _SYSTEMD_UNIT="run-p5-i7.service"),)
    (opened,), pairs = run0_events(RUN0_UNIT, other)
    assert opened.service == "systemd-run0"
    (alone,) = pairs.drain()
    assert alone.command_line == "/usr/bin/id" and alone.user_id is None


def test_run0s_command_without_a_session_goes_out_in_time():
    (), pairs = run0_events(RUN0_UNIT)
    (held,) = pairs.held.values()
    assert pairs.due(held.timestamp_us + 1000000) == []
    assert pairs.due(held.timestamp_us + pamsignal.SSH_HOLD_US) == [held]


def restarted(pairs):
    """A new pairing of the same kind, from the state `pairs` saved (as
    JSON, as the state file keeps it)."""
    again = type(pairs)()
    again.load_state(json.loads(json.dumps(pairs.to_state())))
    return again


def test_a_held_polkit_failure_survives_a_restart():
    attempts = pamsignal.PolkitAttempts()
    failure = pamsignal.parse_entry(make_entry(HELPER[0], HELPER[1],
                                               **HELPER[2]))
    assert attempts.observe(failure) == []
    verdict = pamsignal.parse_entry(make_entry(
        "polkitd", FAILED, sequence=2, **POLKITD), accounts=ACCOUNTS)
    again = restarted(attempts)
    (event,) = again.observe(verdict)
    assert (event.service, event.user_id) == ("polkit", "1000")
    refusal = pamsignal.parse_entry(make_entry(
        PKEXEC_REFUSAL[0], PKEXEC_REFUSAL[1], sequence=3,
        **PKEXEC_REFUSAL[2]))
    assert restarted(again).observe(refusal) == []


def test_a_held_run0_command_survives_a_restart():
    (), pairs = run0_events(RUN0_UNIT)
    session = pamsignal.parse_entry(make_entry(
        RUN0_SESSION[0], RUN0_SESSION[1], sequence=2, **RUN0_SESSION[2]))
    command, _ = restarted(pairs).observe(session)
    assert (command.command_line, command.user_id) == ("/usr/bin/id",
                                                        "1000")


@pytest.mark.parametrize("saved", [None, [], {"held": [["b", [{}]]]},
                                   {"held": "x", "refused": [["k", "1"]]}])
def test_damaged_door_state_is_skipped(saved):
    for pairs in (pamsignal.PolkitAttempts(), pamsignal.Run0Commands()):
        pairs.load_state(saved)
        assert not pairs.held and pairs.drain() == []


def test_the_journal_is_asked_for_run0s_lines_by_program_and_pid():
    matches = pamsignal.journal_matches()
    at = matches.index("_EXE=" + pamsignal.EXECUTOR_EXE)
    assert matches[at - 1:] == [
        "+", "_EXE=" + pamsignal.EXECUTOR_EXE,
        "+", "MESSAGE_ID=" + pamsignal.UNIT_STARTING_MESSAGE_ID]
    for identifier in ("pkexec", "polkitd", "polkit-agent-helper-1", "doas",
                       "cockpit-session", "gdm-password]", "lightdm",
                       "sddm-helper"):
        assert "SYSLOG_IDENTIFIER=" + identifier in matches


# ---------------------------------------------------------------- real


@pytest.mark.e2e
def test_the_running_agent_hears_forged_doors_as_forgeries(agent):
    """Live, through the agent's own journalctl on this machine: forged
    door lines (and a unit start with PID 1's MESSAGE_ID, sent with
    `logger --journald`) reach it and are spoofed entries."""
    mark = agent.mark()
    token = secrets.token_hex(4)
    forged = [("doas", "failed auth for %s %s" % (HOSTILE, token)),
              ("polkitd", FAILED.replace("/usr/bin/id", token)),
              ("gdm-password]", "pam_unix(gdm-password:session): session "
               "opened for user r%s(uid=0) by (uid=0)" % token)]
    for identifier, message in forged:
        realsys.forge("nobody", identifier, message)
    unit_start = "Starting run-p1-i1.service - [run0] /bin/sh %s..." % token
    subprocess.run(["runuser", "-u", "nobody", "--", "logger", "--journald"],
                   input="MESSAGE_ID=%s\nSYSLOG_IDENTIFIER=systemd\n"
                   "MESSAGE=%s\n" % (pamsignal.UNIT_STARTING_MESSAGE_ID,
                                      unit_start),
                   universal_newlines=True, check=True, timeout=30)
    for message in [message for _, message in forged] + [unit_start]:
        event = agent.wait_event(
            lambda e, message=message: e.get("message") == message,
            since=mark)
        assert event["event"]["action"] == "spoofed_entry", event
        assert event["pamsignal"]["writer_uid"] == 65534
        assert "user" not in event and "source" not in event


#: Forged copies of each door's forms, written by `logger` as nobody;
#: where the form lets a name hold spaces, one imitating sshd's text.
FORGERIES = (
    ("doas", "failed auth for " + HOSTILE),
    ("doas", "root ran command /bin/sh as root from /"),
    ("pkexec", "root: Executing command [USER=root] [TTY=/dev/pts/0] "
     "[CWD=/] [COMMAND=/bin/sh]"),
    ("polkitd", SUCCEEDED),
    ("polkit-agent-helper-1", HELPER_FAILURE.replace(
        "rhost=", "rhost=1.2.3.4 user=" + HOSTILE)),
    ("cockpit-session", "pam_unix(cockpit:auth): authentication failure; "
     "logname= uid=0 euid=0 tty= ruser= rhost=1.2.3.4  user=root"),
    ("gdm-password]", "pam_unix(gdm-password:session): session opened for "
     "user root(uid=0) by (uid=0)"),
    ("lightdm", "pam_unix(lightdm:session): session opened for user root("
     "uid=0) by (uid=0)"),
    ("sddm-helper", "pam_unix(sddm:session): session opened for user root("
     "uid=0) by (uid=0)"),
)
#: run0's PAM line forged: the journal is asked for it by its program
#: (systemd-executor), so a copy from logger is not even read.
RUN0_FORGERY = ("(id)", "pam_unix(systemd-run0:session): session opened "
                "for user root(uid=0) by (uid=1000)")


@pytest.fixture(scope="module")
def doors(tmp_path_factory):
    """The booted doors tree after every action, and what `pamsignal.py
    scan --json` made of its journal: (events, user names, container)."""
    realsys.require_root()
    realsys.require_binaries("systemd-nspawn", "nsenter")
    tree = realsys.require_tree(realsys.DOORS_TREE, realsys.DOORS_NEEDS,
                                realsys.build_doors_tree,
                                "Debian 13 tree with doas and pkexec")
    names = {"admin": "psd" + secrets.token_hex(3),
             "other": "psd" + secrets.token_hex(3)}
    password = realsys.new_password()
    with realsys.booted_container(
            str(tmp_path_factory.mktemp("nspawn") / "nspawn.log"),
            [(REPO, INSIDE_SRC)], "doors tests", tree=tree) as box:
        for role, name in names.items():
            # Only the admin is one of polkit's administrators (group
            # sudo): with two, its agent would ask which one to be.
            box.run(["useradd", "-m", "-s", "/bin/bash"] +
                    (["-G", "sudo"] if role == "admin" else []) + [name])
            box.run(["chpasswd"], input="%s:%s\n" % (name, password))
        # The agent as a hardened service (DynamicUser), following live.
        box.run(["python3", INSIDE_SRC + "/pamsignal.py", "install"],
                timeout=120)
        # The tree's /etc/doas.conf: --volatile=overlay forgets it.
        box.write("/etc/doas.conf", "permit %s as root\n" % names["admin"])
        box.run(["chmod", "0600", "/etc/doas.conf"])
        cursor = box.run(["journalctl", "-n", "0", "--show-cursor"]).stdout
        cursor = cursor.strip().rsplit("cursor: ", 1)[-1]

        def typed(user, passwords, *command):
            result = box.run(
                ["python3", INSIDE_SRC + "/tests/pty_answer.py",
                 json.dumps(passwords), "runuser", "-u", user, "--"] +
                list(command), timeout=120)
            return json.loads(result.stdout)

        runs = {
            "doas_wrong": typed(names["admin"], ["wrong"], "doas", "id"),
            "doas_right": typed(names["admin"], [password], "doas", "id"),
            "doas_refused": typed(names["other"], [], "doas", "id"),
            "pkexec_wrong": typed(names["admin"], ["wrong"], "pkexec", "id"),
            "pkexec_right": typed(names["admin"], [password], "pkexec",
                                  "id"),
        }
        runs["run0"] = box.run(["run0", "-u", names["other"], "true"],
                               check=False)
        # What machinectl shell asks systemd for: a PAM login session.
        runs["systemd_run"] = json.loads(box.run(
            ["python3", INSIDE_SRC + "/tests/pty_answer.py", "[]",
             "systemd-run", "--pty", "--uid=" + names["other"], "-p",
             "PAMName=login", "true"], timeout=120).stdout)
        for identifier, message in FORGERIES + (RUN0_FORGERY,):
            box.run(["runuser", "-u", "nobody", "--", "logger", "-t",
                     identifier, "--", message])
        box.run(["journalctl", "--sync"])
        # The service has read everything once it told the last forgery.
        last = FORGERIES[-1][1]
        wait_for(lambda: last in box.unit_log(), timeout=60)
        runs["service"] = box.unit_log()
        # Read as the agent asks journalctl (its fields and matches), so
        # that what they leave out is missing here too.
        read = ["journalctl", "-o", "json", "--no-pager", "--all",
                "--after-cursor", cursor, "--output-fields=" +
                ",".join(pamsignal.JOURNAL_FIELDS)] + \
            pamsignal.journal_matches()
        scan = box.run(["sh", "-c", '%s | python3 %s/pamsignal.py scan '
                        '--json -' % (" ".join(shlex.quote(word) for word in
                                               read), INSIDE_SRC)],
                       timeout=120)
        events = [json.loads(line) for line in scan.stdout.splitlines()]
        with open(str(tmp_path_factory.mktemp("scan") / "events.json"),
                  "w") as record:  # for a failure's post-mortem
            record.write(scan.stdout)
        yield events, names, runs


def of(events, service, action=None, user=None):
    return [e for e in events if e["service"]["name"] == service and
            (action is None or e["event"]["action"] == action) and
            (user is None or e.get("user", {}).get("name") == user)]


def told(events, service, action, user=None, text=None):
    """The events of `service` and `action` (for `user`). A line that a
    user's own setuid doas, pkexec or polkit helper wrote may reach
    journald without the writer's program (it exited, or journald looked
    too late): it is then a spoofed_entry claiming the same, with the
    user's UID (README, known limits); `text` (or `user`) picks it out."""
    return of(events, service, action, user) + [
        e for e in of(events, service, "spoofed_entry")
        if e["pamsignal"]["claimed_action"] == action and
        e["pamsignal"]["writer_uid"] != 65534 and
        (text or user) in e["message"]]


@pytest.mark.e2e
def test_doas_wrong_and_right_password_and_a_refusal(doors):
    events, names, runs = doors
    admin, other = names["admin"], names["other"]
    assert runs["doas_wrong"]["rc"] == 1 and runs["doas_right"]["rc"] == 0
    (failure,) = told(events, "doas", "login_failure", admin)
    assert failure["event"].get("reason") in ("bad_password", None)
    (command,) = of(events, "doas", "sudo_command", admin)
    assert command["user"]["target"]["name"] == "root"
    assert command["process"]["command_line"] == "id"
    (opened,) = told(events, "doas", "session_opened",
                     text="session opened for user root")
    assert opened["message"].startswith("pam_unix(doas:session): ")
    (refused,) = told(events, "doas", "login_failure", other)
    assert refused["message"].startswith("command not permitted for ")


@pytest.mark.e2e
def test_pkexec_wrong_password_is_one_event_and_right_one_a_command(doors):
    events, names, runs = doors
    admin = names["admin"]
    assert runs["pkexec_wrong"]["rc"] == 127, runs["pkexec_wrong"]
    assert runs["pkexec_right"]["rc"] == 0, runs["pkexec_right"]
    failures = [e for service in ("polkit", "polkit-1", "pkexec")
                for e in of(events, service, "login_failure", admin)]
    assert [(e["service"]["name"], e["event"]["reason"]) for e in failures
            ] == [("polkit", "bad_password")]
    assert failures[0]["process"]["command_line"].endswith("pkexec id")
    if not of(events, "polkit-agent-helper-1", "spoofed_entry"):
        assert failures[0]["user"]["id"].isdigit()  # the helper's, paired
    (success,) = of(events, "polkit", "login_success", admin)
    assert success["pamsignal"]["detail"].startswith(
        "org.freedesktop.policykit.exec")
    (command,) = of(events, "pkexec", "sudo_command", admin)
    assert command["user"]["target"]["name"] == "root"
    assert command["process"]["command_line"] == "/usr/bin/id"


@pytest.mark.e2e
def test_run0_names_whom_root_became_and_the_command(doors):
    events, names, runs = doors
    assert runs["run0"].returncode == 0, runs["run0"].stderr
    opened = [e for e in of(events, "systemd-run0", "session_opened")
              if e["user"]["target"]["name"] == names["other"]]
    assert len(opened) == 1 and opened[0]["user"]["id"] == "0"
    (command,) = [e for e in of(events, "run0", "sudo_command")
                  if e["user"]["target"]["name"] == names["other"]]
    assert command["process"]["command_line"] == "/usr/bin/true"
    assert command["user"]["id"] == "0"
    assert command["pamsignal"]["unit"] == opened[0]["pamsignal"]["unit"]


@pytest.mark.e2e
def test_systemd_run_with_a_pam_login_names_whom_it_became(doors):
    events, names, runs = doors
    assert runs["systemd_run"]["rc"] == 0, runs["systemd_run"]
    (opened,) = of(events, "login", "session_opened", names["other"])
    assert opened["process"]["pid"] > 1


@pytest.mark.e2e
def test_the_service_in_its_sandbox_trusts_polkitd_by_its_account(doors):
    """pamsignal.service (DynamicUser) looked polkitd's account up: the
    wrong pkexec password is one event, polkitd's lines no forgery."""
    _, names, runs = doors
    lines = [line for line in runs["service"].splitlines()
             if " user=%s " % names["admin"] in line and
             " service=polkit " in line]
    assert [line.split()[2] for line in lines] == [
        "login_failure", "login_success"], lines
    spoofed = [line for line in runs["service"].splitlines()
               if "spoofed_entry service=polkit " in line]
    assert spoofed and all("writer_uid=65534" in line for line in spoofed)


@pytest.mark.e2e
def test_forged_copies_are_spoofed_entries_that_name_nobody(doors):
    events, _, _ = doors
    spoofed = [e for e in events if e["event"]["action"] == "spoofed_entry"
               and e["pamsignal"]["writer_uid"] == 65534]
    assert sorted(e["message"] for e in spoofed) == sorted(
        message for _, message in FORGERIES)
    for event in spoofed:
        assert "user" not in event and "source" not in event
    assert not [e for e in events if e["message"] == RUN0_FORGERY[1]]
    assert not [e for e in events if "1.2.3.4" in json.dumps(e.get("source"))
                or HOSTILE in json.dumps(e.get("user"))]
