"""What root trusts, and what it opens (issue 14, parts 3 to 5).

Run as root against the real thing: files chown'ed to `nobody`, FIFOs,
symlinks and directories planted where the agent keeps its files (FIFOs
in a directory the unprivileged user owns are planted by that user), and
the real commands (`run`, `check-config`, `test-alert`, `stage-config`,
`status`, SIGHUP). A hang is caught by a subprocess timeout, never by
timing anything."""
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import realsys
import receivers
from support import (PAMSIGNAL, FakeJournal, json_line, make_entry,
                     pamsignal, wait_for, write_config)

#: Long enough for any real run; a command still going then has hung.
HANG_S = 60

FAILED = "Failed password for alice from 203.0.113.5 port %d ssh2"


@pytest.fixture(autouse=True)
def as_root():
    realsys.require_root()
    realsys.require_binaries("runuser", "mkfifo")


@pytest.fixture(scope="module")
def nobody():
    account = pwd.getpwnam("nobody")
    return account.pw_uid, account.pw_gid


def start(*args, env=None):
    """pamsignal.py with these arguments, in a process group of its own
    so that a hung one is ended with what it started."""
    return subprocess.Popen([sys.executable, PAMSIGNAL] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, env=env,
                            start_new_session=True)


def finish(process, sig=None):
    """(stdout, stderr) once it exits (after `sig`, if given); a process
    still running HANG_S later has hung: killed, and the test fails."""
    if sig is not None and process.poll() is None:
        process.send_signal(sig)
    try:
        out, err = process.communicate(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("%s hung: still running %d s later" % (
            " ".join(process.args[2:]), HANG_S), pytrace=False)
    return out, err


def cli(*args, env=None):
    process = start(*args, env=env)
    out, err = finish(process)
    return subprocess.CompletedProcess(process.args, process.returncode,
                                       out, err)


# ---------------------------------------------------------------- part 3:
# root trusts only files only root can change


class World:
    """A configuration naming one file of each kind root would run or
    read, all root's to begin with (0644, the configuration 0600)."""

    def __init__(self, tmp_path):
        self.root = tmp_path
        (tmp_path / "bin").mkdir()
        self.fake = FakeJournal(tmp_path / "bin", {"follow": [{"hang": True}]})
        certs = receivers.make_cert(str(tmp_path / "certs"))
        self.files = {
            "journalctl": self.fake.program,
            "ca_file": certs.ca_file,
            "asn_db": str(tmp_path / "geo" / "asn.mmdb"),
            "country_db": str(tmp_path / "geo" / "country.mmdb"),
            "city_db": str(tmp_path / "geo" / "city.mmdb"),
            "credential": str(tmp_path / "creds" / "hook-url"),
        }
        for role in ("asn_db", "country_db", "city_db"):
            os.makedirs(os.path.dirname(self.files[role]), exist_ok=True)
            with open(self.files[role], "wb") as handle:
                handle.write(b"not yet a database")
        os.makedirs(os.path.dirname(self.files["credential"]))
        with open(self.files["credential"], "w") as handle:
            handle.write("http://127.0.0.1:9/hook\n")
        for path in self.files.values():
            os.chmod(path, 0o755 if path == self.fake.program else 0o644)
        self.config = write_config(tmp_path / "pamsignal.conf", (
            "[pamsignal]\nstate_dir = %s\njournalctl = %s\n"
            "[geoip]\nasn_db = %s\ncountry_db = %s\ncity_db = %s\n"
            "[channel:hook]\ntype = webhook\nurl = credential:hook-url\n"
            "ca_file = %s\n" % (
                tmp_path / "state", self.files["journalctl"],
                self.files["asn_db"], self.files["country_db"],
                self.files["city_db"], self.files["ca_file"])))
        os.chmod(self.config, 0o600)
        self.files["config"] = self.config

    def env(self):
        return dict(self.fake.env(), CREDENTIALS_DIRECTORY=os.path.dirname(
            self.files["credential"]))

    def run(self, *args):
        return cli("--config", self.config, *args, env=self.env())


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def assert_refused(result, path):
    assert result.returncode == 78, result.stdout + result.stderr
    assert "chown root:root %s; chmod go-w %s" % (path, path) \
        in result.stderr


@pytest.mark.parametrize("mode", [0o644, 0o600])
def test_root_owned_files_pass(world, mode):
    for kind, path in world.files.items():
        if kind not in ("config", "journalctl"):
            os.chmod(path, mode)
    result = world.run("check-config")
    assert result.returncode == 0, result.stderr
    assert "OK (1 channel)" in result.stdout


@pytest.mark.parametrize("kind", ["config", "journalctl", "ca_file",
                                  "asn_db", "country_db", "city_db",
                                  "credential"])
def test_a_file_another_user_can_change_is_refused(world, nobody, kind):
    path = world.files[kind]
    os.chown(path, *nobody)
    os.chmod(path, 0o666)
    result = world.run("check-config")
    assert_refused(result, path)
    assert "owned by nobody (uid %d) and writable by group and others" \
        % nobody[0] in result.stderr


@pytest.mark.parametrize("kind", ["config", "journalctl", "ca_file"])
def test_root_owned_but_writable_by_others_is_refused(world, kind):
    path = world.files[kind]
    os.chmod(path, 0o646)
    assert_refused(world.run("check-config"), path)


@pytest.mark.parametrize("command", [
    ["run"], ["test-alert"], ["stage-config", "STAGED"], ["status"],
    ["lookup", "192.0.2.1"], ["scan", os.devnull]])
def test_every_command_root_runs_refuses(world, nobody, command):
    os.chown(world.files["journalctl"], *nobody)
    command = [str(world.root / "staged.conf") if word == "STAGED" else word
               for word in command]
    result = world.run(*command)
    assert_refused(result, world.files["journalctl"])
    # Refused before anything ran: no journalctl call, nothing staged.
    assert world.fake.calls() == []
    assert not (world.root / "staged.conf").exists()


def test_stage_config_refuses_an_untrusted_source(world, nobody, tmp_path):
    os.chown(world.config, *nobody)
    result = world.run("stage-config", str(tmp_path / "staged.conf"))
    assert_refused(result, world.config)
    assert not (tmp_path / "staged.conf").exists()


def test_a_group_writable_directory_above_is_refused(world):
    directory = os.path.dirname(world.files["asn_db"])
    os.chmod(directory, 0o775)
    assert_refused(world.run("check-config"), directory)
    os.chmod(directory, 0o755)
    assert world.run("check-config").returncode == 0


def test_a_directory_another_user_owns_is_refused(world, nobody):
    directory = os.path.dirname(world.files["credential"])
    os.chown(directory, *nobody)
    result = world.run("check-config")
    assert_refused(result, directory)
    assert "owned by nobody" in result.stderr


def test_sticky_directories_protect_roots_files_but_not_missing_ones(
        world, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(str(shared), 0o1777)  # as /tmp
    moved = str(shared / "asn.mmdb")
    shutil.move(world.files["asn_db"], moved)
    text = open(world.config).read()
    write_config(world.config, text.replace(world.files["asn_db"], moved))
    assert world.run("check-config").returncode == 0, "root's file in it"
    os.unlink(moved)  # anyone could create it there now
    result = world.run("check-config")
    assert result.returncode == 78
    assert "%s does not exist, and %s, where anyone could create it, is " \
        "writable by group and others" % (moved, shared) in result.stderr


def test_a_program_found_on_path_is_judged_by_its_real_path(
        world, nobody, tmp_path):
    # journalctl = journalctl, found first in a directory of links whose
    # link points at a file nobody owns.
    links = tmp_path / "links"
    links.mkdir()
    os.symlink(world.files["journalctl"], str(links / "journalctl"))
    os.chown(world.files["journalctl"], *nobody)
    text = open(world.config).read()
    write_config(world.config, text.replace(
        "journalctl = %s" % world.files["journalctl"],
        "journalctl = journalctl"))
    env = dict(world.env(), PATH="%s:%s" % (links, os.environ["PATH"]))
    result = cli("--config", world.config, "check-config", env=env)
    assert_refused(result, world.files["journalctl"])


def test_run_refuses_a_state_directory_another_user_owns(world, nobody):
    state = world.root / "state"
    state.mkdir()
    os.chown(str(state), *nobody)
    result = world.run("run")
    assert_refused(result, str(state))
    assert "[pamsignal] state_dir" in result.stderr
    assert world.fake.calls() == []


def test_a_reload_to_an_untrusted_configuration_keeps_the_old_one(
        tmp_path, nobody):
    feed = tmp_path / "feed.jsonl"
    feed.write_text("")
    fake = FakeJournal(tmp_path, {"follow": [{"tail": str(feed)}]})
    channel = "[channel:out]\ntype = console\nevents = %s\n"
    config = write_config(tmp_path / "pamsignal.conf", (
        "[pamsignal]\nstate_dir = %s\njournalctl = %s\n"
        % (tmp_path / "state", fake.program)))
    base = open(config).read()
    write_config(config, base + channel % "*")
    agent = start("--config", config, "run", "--json", env=fake.env())
    stderr = LineReader(agent.stderr)
    try:
        assert wait_for(lambda: "following the journal" in stderr.text())
        os.chown(config, *nobody)
        write_config(config, base + channel % "login_success")  # silence
        agent.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "configuration reload failed" in
                        stderr.text()), stderr.text()
        entry = make_entry("sshd", FAILED % 7)
        with open(str(feed), "a") as handle:
            handle.write(json_line(entry))
        assert wait_for(lambda: entry["__CURSOR"] in read_text(
            tmp_path / "state" / "state.json"))
    finally:
        out, _ = finish(agent, signal.SIGTERM)
    stderr.join()
    events = [json.loads(line) for line in out.splitlines()]
    assert "still running on the previous configuration" in stderr.text()
    assert "%s is owned by nobody" % config in stderr.text()
    assert "chown root:root %s" % config in stderr.text()
    (failed,) = [e for e in events
                 if e["event"]["action"] == "config_reload_failed"]
    assert "chown root:root %s" % config in failed["message"]
    # Still the old configuration: the failure is reported.
    assert [e["source"]["port"] for e in events
            if e["event"]["action"] == "login_failure"] == [7]


class LineReader:
    """Collects a pipe's lines in a thread, so a test can wait on them."""

    def __init__(self, stream):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(stream,),
                                       daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in iter(stream.readline, ""):
            self.lines.append(line)

    def text(self):
        return "".join(self.lines)

    def join(self):
        self.thread.join(HANG_S)


def read_text(path):
    try:
        with open(str(path)) as handle:
            return handle.read()
    except OSError:
        return ""


# ---------------------------------------------------------------- part 4:
# files in the state directory are opened as files

FORGED = pamsignal.Event(action="login_success", timestamp_us=int(
    time.time() * 1e6), user="forged", source_ip="198.51.100.66",
    service="sshd", hostname="web1", message="forged")

#: What a symlink planted in the state directory points at: files that,
#: read as the agent's own, would move its cursor, forge an alert or
#: report drops that never happened.
VICTIMS = {
    "state.json": {"version": 1, "cursor": "s=planted;i=1",
                   "realtime_us": 1, "sessions": []},
    "detection.json": {"version": 1, "counters": {}, "baseline": {}},
    "pamsignal.prom": "pamsignal_running 1\n",
    "spool/hook/dropped.json": {"spool_full": 5},
    "spool/hook/%s.alert" % ("f" * 32): {
        "version": 1, "event": pamsignal.event_to_record(FORGED)},
}


def plant(state, kind, victims_dir):
    """A FIFO, symlink or directory at each name the agent keeps."""
    planted = []
    for name, content in sorted(VICTIMS.items()):
        path = os.path.join(str(state), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            os.mkdir(path)
        else:
            victim = os.path.join(str(victims_dir), name.replace("/", "_"))
            with open(victim, "w") as handle:
                handle.write(content if isinstance(content, str)
                             else json.dumps(content))
            os.symlink(victim, path)
        planted.append(path)
    return planted


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_planted_state_files_are_set_aside_and_alerts_still_flow(
        tmp_path, kind):
    state = tmp_path / "state"
    victims = tmp_path / "victims"
    victims.mkdir()
    planted = plant(state, kind, victims)
    before = {path: open(path).read() for path in glob.glob(
        str(victims / "*"))}
    feed = tmp_path / "feed.jsonl"
    feed.write_text("")
    fake = FakeJournal(tmp_path, {"follow": [{"tail": str(feed)}]})
    with receivers.HttpReceiver() as hook:
        config = write_config(tmp_path / "pamsignal.conf", (
            "[pamsignal]\nstate_dir = %s\njournalctl = %s\n"
            "[channel:hook]\ntype = webhook\nurl = %s/hook\nevents = *\n"
            "cooldown = off\nrate_limit = off\n"
            % (state, fake.program, hook.url)))
        os.chmod(config, 0o600)
        agent = start("--config", config, "run", env=fake.env())
        try:
            with open(str(feed), "a") as handle:
                handle.write(json_line(make_entry("sshd", FAILED % 4)))
            hook.wait_for(1, timeout=30)
        finally:
            # A FIFO hung it past SIGTERM: the timeout is the failure.
            _, err = finish(agent, signal.SIGTERM)
        delivered = [request.json for request in hook.requests]
    assert agent.returncode == 0, err
    assert [(e["event"]["action"], e["user"]["name"], e["source"]["port"])
            for e in delivered] == [("login_failure", "alice", 4)], err
    assert "monitoring degraded" not in err
    # Nothing read through the links, nothing written through them.
    assert all("--after-cursor=s=planted;i=1" not in call
               for call in fake.calls())
    assert before == {path: open(path).read() for path in before}
    for path in planted:
        aside = glob.glob(path + ".not-a-file-*")
        if path.endswith(".prom") and kind != "directory":
            # Only ever replaced by a rename, never opened: nothing to move.
            assert aside == [] and os.path.isfile(path) and \
                not os.path.islink(path)
            continue
        assert len(aside) == 1, (path, err)
        assert "%s was a %s" % (path, {"fifo": "FIFO", "symlink":
                                       "symbolic link"}.get(kind, kind)) in err
        assert not os.path.exists(path) or (
            os.path.isfile(path) and not os.path.islink(path))


# ---------------------------------------------------------------- part 5:
# root's helpers never open a name the service user controls


@pytest.fixture
def service_runtime(nobody):
    """A directory as /run/pamsignal is: 0700, owned by the service's
    (here: nobody's) user, below directories it can traverse."""
    top = tempfile.mkdtemp(prefix="pamsignal-trust-")
    os.chmod(top, 0o755)
    runtime = os.path.join(top, "run")
    os.mkdir(runtime, 0o700)
    os.chown(runtime, *nobody)
    yield runtime
    shutil.rmtree(top)


def as_nobody(*command):
    subprocess.run(["runuser", "-u", "nobody", "--"] + list(command),
                   check=True, timeout=HANG_S)


@pytest.mark.parametrize("planted", ["fifo", "symlink", "directory"])
def test_stage_config_never_opens_what_the_service_user_planted(
        tmp_path, service_runtime, nobody, planted):
    source = write_config(tmp_path / "pamsignal.conf",
                          "[pamsignal]\nfirst_start = boot\n")
    os.chmod(source, 0o600)
    destination = os.path.join(service_runtime, "pamsignal.conf")
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    for name in (destination + ".tmp", destination):
        if planted == "fifo":
            as_nobody("mkfifo", name)
        elif planted == "symlink":
            as_nobody("ln", "-s", str(victim), name)
        else:
            as_nobody("mkdir", name)
    # A FIFO blocked this for ever: the timeout is the failure.
    result = cli("--config", source, "stage-config", destination)
    assert result.returncode == 0, result.stderr
    with open(destination) as handle:
        assert handle.read() == "[pamsignal]\nfirst_start = boot\n"
    copy = os.lstat(destination)
    assert (copy.st_uid, copy.st_gid) == nobody
    assert copy.st_mode & 0o7777 == 0o600
    assert victim.read_text() == "root's file\n"
    assert os.lstat(destination + ".tmp")  # left alone, never opened


def test_status_never_blocks_on_a_planted_metrics_file(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.mkfifo(str(state / "pamsignal.prom"))
    config = write_config(tmp_path / "pamsignal.conf",
                          "[pamsignal]\nstate_dir = %s\n" % state)
    result = cli("--config", config, "status")
    assert result.returncode == 1
    assert "%s: is a FIFO, not a regular file" % (state / "pamsignal.prom") \
        in result.stderr
    os.unlink(str(state / "pamsignal.prom"))
    os.symlink("/etc/shadow", str(state / "pamsignal.prom"))
    result = cli("--config", config, "status")
    assert result.returncode == 1
    assert "is a symbolic link, not a regular file" in result.stderr


def test_uninstall_purge_removes_links_not_what_they_point_at(tmp_path):
    """The service's user fills its state directory with links to root's
    files; `uninstall --purge` (root) removes the links only."""
    assert cli("install", "--root", str(tmp_path)).returncode == 0
    state = tmp_path / "var/lib/private/pamsignal"
    (state / "spool").mkdir(parents=True)
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file").write_text("root's\n")
    os.symlink(str(keep), str(state / "spool" / "hook"))
    os.symlink(str(keep / "file"), str(state / "state.json"))
    result = cli("uninstall", "--root", str(tmp_path), "--purge")
    assert result.returncode == 0, result.stderr
    assert not state.exists()
    assert (keep / "file").read_text() == "root's\n"


# ---------------------------------------------------------------- part 6:
# a setuid program's caller writes only about itself (the journal's
# trusted fields: _UID, _EXE, _COMM, _TRANSPORT)

#: What the caller of setuid sudo chose as a prompt, or wrote from a
#: program of its own bound over /usr/bin/sudo in a namespace of its own.
FORGED_DOOR = ("pam_unix(cockpit:session): session opened for user "
               "root(uid=0) by (uid=0)")
FORGED_GDM = ("pam_unix(gdm-password:session): session opened for user "
              "root(uid=0) by (uid=0)")
FORGED_SUDO = "  root : TTY=pts/0 ; PWD=/%s ; USER=root ; COMMAND=/bin/sh"
SETUID_EXE = {"cockpit-session": "/usr/lib/cockpit/cockpit-session"}


@pytest.mark.parametrize("identifier", ["sshd", "su", "sudo"])
@pytest.mark.parametrize("prefix", ["error: ", "fatal: ", "warning: "])
@pytest.mark.parametrize("forged", [True, False])
def test_a_pam_line_behind_a_log_prefix_is_read_not_a_crash(
        identifier, prefix, forged):
    # The rules read past sshd's `error: ` prefix; the PAM service check
    # did not, and a forged line crashed the agent at every restart (its
    # cursor never moved past it).
    message = prefix + "pam_unix(%s:session): session opened for user " \
        "root(uid=0) by (uid=0)" % identifier
    forger = {"_UID": "1000", "_COMM": "logger", "_EXE": "/usr/bin/logger"}
    event = pamsignal.parse_entry(make_entry(identifier, message,
                                             **(forger if forged else {})))
    if forged:
        assert event.action == "spoofed_entry"
    else:  # the genuine writer's own: read as without the prefix
        assert event == pamsignal.parse_entry(make_entry(
            identifier, message[len(prefix):]))._replace(message=message)


def parsed(identifier, message, uid, **fields):
    event = pamsignal.parse_entry(make_entry(identifier, message,
                                             _UID=uid, **fields))
    return event and event._asdict()


@pytest.mark.parametrize("message", [FORGED_DOOR, FORGED_SUDO % "root"])
def test_a_setuid_programs_output_is_not_its_log(message):
    """`runuser -u nobody -- systemd-cat -t sudo sudo -S -p PROMPT true`:
    the prompt reaches the journal as sudo's (_TRANSPORT=stdout, sudo's
    _EXE, nobody's UID), worded as its caller chose."""
    event = parsed("sudo", message, "65534", _TRANSPORT="stdout")
    assert event["action"] == "spoofed_entry"
    assert event["writer_uid"] == 65534
    # Root's own stdout (a unit's) stays trusted.
    assert parsed("sshd", "Accepted password for alice from 192.0.2.1 "
                  "port 22 ssh2", "0", _TRANSPORT="stdout")["action"] == \
        "login_success"


@pytest.mark.parametrize("identifier,message,claimed", [
    # PAM lines of a service not the program's own
    ("sudo", FORGED_GDM, "login_success"),
    ("sudo", FORGED_DOOR, "login_success"),
    ("su", FORGED_GDM, "login_success"),
    ("sudo", "pam_unix(su:session): session opened for user root(uid=0) "
     "by alice(uid=1000)", "session_opened"),
    # a door's login, from a caller
    ("cockpit-session", "pam_unix(cockpit:session): session opened for user "
     "root(uid=0) by (uid=65534)", "login_success"),
    # a session naming another UID than the writer's
    ("sudo", "pam_unix(sudo:session): session opened for user root(uid=0) "
     "by (uid=0)", "session_opened"),
    ("su", "pam_unix(su-l:session): session opened for user root(uid=0) "
     "by alice(uid=1000)", "session_opened"),
    ("doas", "pam_unix(doas:session): session opened for user root(uid=0) "
     "by (uid=0)", "session_opened"),
    ("pkexec", "pam_unix(polkit-1:session): session opened for user "
     "root(uid=0) by (uid=1000)", "session_opened"),
    # a PAM failure naming another UID
    ("sudo", "pam_unix(sudo:auth): authentication failure; logname= uid=1000 "
     "euid=0 tty=/dev/pts/0 ruser=alice rhost=  user=alice",
     "login_failure"),
    # the acting user, named from the real UID, is root
    ("sudo", FORGED_SUDO % "root", "sudo_command"),
    ("sudo", "root : 3 incorrect password attempts ; TTY=pts/0 ; PWD=/ ; "
     "USER=root ; COMMAND=/bin/sh", "login_failure"),
    ("sudo", '@cee:{"sudo":{"accept":{"submituser":"root","runuser":"root",'
     '"command":"/bin/sh"}}}', "sudo_command"),
    ("sudo", "pam_unix(sudo:auth): authentication failure; logname= "
     "uid=65534 euid=0 tty=/dev/pts/0 ruser=root rhost=  user=root",
     "login_failure"),
    ("doas", "failed auth for root", "login_failure"),
    ("pkexec", "root: Error executing command as another user: Not "
     "authorized [USER=root] [TTY=unknown] [CWD=/] [COMMAND=/bin/sh]",
     "login_failure"),
])
def test_a_callers_line_about_someone_else_is_spoofed(identifier, message,
                                                       claimed):
    """A user's own program bound over /usr/bin/sudo in a user and mount
    namespace (`unshare -Urm`) shows sudo's _EXE and _COMM with the user's
    UID: only what is about that UID counts."""
    event = parsed(identifier, message, "65534",
                   _EXE=SETUID_EXE.get(identifier, "/usr/bin/" + identifier),
                   _COMM=identifier)
    assert event["action"] == "spoofed_entry", event
    assert event["claimed_action"] == claimed
    assert event["writer_uid"] == 65534
    assert event["detail"]


@pytest.mark.parametrize("identifier,message,action", [
    # measured here (sudo 1.9.13, util-linux su 2.38, Debian 12), the
    # writer's UID 65534 as in the real lines' own UID
    ("sudo", "nobody : PWD=/work ; USER=root ; COMMAND=/usr/bin/id",
     "sudo_command"),
    ("sudo", "pam_unix(sudo:session): session opened for user root(uid=0) "
     "by (uid=65534)", "session_opened"),
    ("sudo", "pam_unix(sudo-i:session): session opened for user "
     "root(uid=0) by (uid=65534)", "session_opened"),
    ("sudo", "pam_unix(sudo:session): session closed for user root",
     "session_closed"),
    ("sudo", "pam_unix(sudo:auth): authentication failure; logname= "
     "uid=65534 euid=0 tty= ruser=nobody rhost=  user=nobody",
     "login_failure"),
    ("su", "(to alice) nobody on none", "login_success"),
    ("su", "pam_unix(su:session): session opened for user alice(uid=1000) "
     "by (uid=65534)", "session_opened"),
    ("su", "pam_unix(su:auth): authentication failure; logname= uid=65534 "
     "euid=0 tty=/dev/pts/1 ruser=nobody rhost=  user=root",
     "login_failure"),
    # pam_unix's `by NAME` is the terminal's login name: not tied
    ("sudo", "pam_unix(sudo:session): session opened for user root(uid=0) "
     "by root(uid=65534)", "session_opened"),
    # pam_ldap (nss-pam-ldapd) names no UID in its failure: a mistyped
    # sudo or su password on an LDAP host is a failure, not a forgery
    ("sudo", "pam_ldap(sudo:auth): Authentication failure; user=nobody",
     "login_failure"),
    ("su", "pam_ldap(su:auth): Authentication failure; user=root",
     "login_failure"),
])
def test_a_callers_line_about_itself_counts(identifier, message, action):
    assert parsed(identifier, message, "65534")["action"] == action


def test_root_writers_are_not_tied():
    """sudo and su run by root write as root: no tie, and a PAM line of
    another service from root is no event, as before."""
    assert parsed("sudo", FORGED_SUDO % "root", "0")["action"] == \
        "sudo_command"
    assert parsed("sudo", FORGED_GDM, "0") is None


@pytest.mark.parametrize("identifier,message", [
    ("doas", "failed auth for alice"),
    ("doas", "command not permitted for alice: /bin/sh"),
    ("pkexec", "alice: Error executing command as another user: Not "
     "authorized [USER=root] [TTY=unknown] [CWD=/] [COMMAND=/bin/sh]"),
    ("sudo", "alice : PWD=/ ; USER=root ; COMMAND=/bin/sh"),
])
def test_the_agent_ties_a_callers_name_to_its_uid(identifier, message):
    """`run` asks the account database: a caller's line naming another
    account than its UID's is spoofed; an alias of the same UID is not."""
    accounts = {"alice": "1000", "bob": "1001", "alias": "1001"}
    owners = {"1000": "alice", "1001": "bob"}

    def lookup(name, uid):
        if uid is None:
            return name, accounts.get(name)
        return owners.get(uid), uid

    def observed(uid, name="alice"):
        acting = pamsignal.ActingUsers(lookup)
        return acting.observe(pamsignal.parse_entry(make_entry(
            identifier, message.replace("alice", name), _UID=uid,
            _COMM=identifier, _EXE="/usr/bin/" + identifier)), live=True)

    forged = observed("1001")
    assert forged.action == "spoofed_entry", forged
    assert "UID 1001 that wrote it is bob" in forged.detail
    assert observed("1000").action != "spoofed_entry"
    assert observed("1001", "alias").action != "spoofed_entry"


def _scan_own_entries(cursor, marker):
    """scan --json of the entries after `cursor` written by the processes
    that wrote `marker` (each test reads only its own)."""
    deadline = time.time() + 15
    while True:
        entries = realsys.journal_entries(cursor)
        pids = set(entry.get("_PID") for entry in entries
                   if marker in realsys._text(entry.get("MESSAGE")))
        if len(pids) and time.time() > deadline - 13 or \
                time.time() > deadline:
            break
        time.sleep(0.5)
    assert pids, "the forged lines never reached the journal"
    own = [entry for entry in entries if entry.get("_PID") in pids]
    result = subprocess.run(
        [sys.executable, PAMSIGNAL, "scan", "--json", "-"],
        input="".join(json.dumps(entry) + "\n" for entry in own),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=HANG_S)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return own, [event["event"]["action"] for event in events]


@pytest.fixture
def real_journal():
    realsys.ensure_journald()
    realsys.require_binaries("systemd-cat", "sudo", "unshare", "logger")


def test_e2e_a_setuid_programs_prompt_is_no_login(real_journal):
    """The real attack: nobody runs the real sudo under systemd-cat with
    a prompt worded as a Cockpit login and a sudo command."""
    marker = "psetrust%d" % os.getpid()
    cursor = realsys.journal_cursor()
    prompt = "%s\n%s\n" % (FORGED_DOOR, FORGED_SUDO % marker)
    # sudo waits for a password while journald reads its /proc entry (a
    # sudo gone by then leaves the entry without _EXE)
    forger = subprocess.Popen(
        ["runuser", "-u", "nobody", "--", "systemd-cat", "-t", "sudo",
         "/usr/bin/sudo", "-S", "-p", prompt, "true"], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    forger.stdin.close()
    forger.wait(timeout=HANG_S)
    own, actions = _scan_own_entries(cursor, marker)
    assert any(entry.get("_TRANSPORT") == "stdout" and
               entry.get("_EXE") == "/usr/bin/sudo" for entry in own), own
    assert "login_success" not in actions and \
        "sudo_command" not in actions, actions
    assert actions.count("spoofed_entry") >= 2, actions


@pytest.fixture
def open_dir():
    """A directory nobody can read (pytest's tmp_path is root's only)."""
    path = tempfile.mkdtemp(prefix="psetrust")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_e2e_a_program_bound_over_sudo_is_no_login(real_journal, open_dir):
    """The real attack: in a user and mount namespace of its own, nobody
    binds a copy of logger over /usr/bin/sudo and writes a gdm login and a
    sudo command by root; journald records sudo's _EXE and _COMM."""
    fake = os.path.join(open_dir, "fakesudo")
    shutil.copy("/usr/bin/logger", fake)
    os.chmod(fake, 0o755)
    probe = subprocess.run(["runuser", "-u", "nobody", "--", "unshare",
                            "-Urm", "true"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT,
                           universal_newlines=True, timeout=HANG_S)
    if probe.returncode != 0:
        pytest.skip("an unprivileged user namespace is not permitted "
                    "here: %s" % probe.stdout.strip())
    marker = "psetrust%d" % os.getpid()
    cursor = realsys.journal_cursor()
    script = ('mount --bind %s /usr/bin/sudo && (echo "%s"; echo "%s"; '
              'sleep 2) | /usr/bin/sudo -t sudo'
              % (fake, FORGED_GDM, (FORGED_SUDO % marker).replace(
                  "/bin/sh", "/usr/bin/id")))
    result = subprocess.run(["runuser", "-u", "nobody", "--", "unshare",
                             "-Urm", "sh", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True, timeout=HANG_S)
    assert result.returncode == 0, result.stdout
    own, actions = _scan_own_entries(cursor, marker)
    assert all(entry.get("_UID") == str(pwd.getpwnam("nobody").pw_uid)
               for entry in own), own
    assert "login_success" not in actions and \
        "sudo_command" not in actions, actions
    assert actions.count("spoofed_entry") == 2, actions
