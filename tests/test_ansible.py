"""The Ansible role (contrib/ansible): lint-clean, and applied for real.

Debian's ansible-playbook applies the example play (site.yml) over SSH to
a Debian 13 boot tree with python3-apt (tests/realsys.py ansible-tree),
booted with systemd-nspawn (--volatile=overlay: the cached tree is never
written).  The container shares the host's network, so its sshd moves to
a free loopback port and takes a throw-away root key (both bound in
read-only), and the service inside reaches a webhook receiver run here.
One boot for the module: a dry run, then each method twice in turn (the
release file from this worktree, a .deb, a signed apt repository)."""
import base64
import functools
import hashlib
import hmac
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import types

import pytest

import realsys
from receivers import HttpReceiver
from support import PAMSIGNAL, REPO, wait_for

pytestmark = pytest.mark.e2e

ANSIBLE_DIR = os.path.join(REPO, "contrib", "ansible")
ROLE = os.path.join(ANSIBLE_DIR, "roles", "pamsignal")
#: The container's sshd; another port when something already has it.
SSH_PORT = int(os.environ.get("PAMSIGNAL_ANSIBLE_SSH_PORT", "2351"))
RECAP = re.compile(r"^\S+\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)"
                   r"\s+failed=(\d+)", re.M)


def require_ansible():
    realsys.require_binaries("ansible-playbook", "ansible-lint")


def ansible_env(workdir):
    """Ansible with no user or project configuration, its temporary and
    cache files in `workdir`; pipelining (fewer SSH round trips, as many
    sites set it) for speed."""
    config = os.path.join(workdir, "ansible.cfg")
    open(config, "w").close()
    return dict(
        os.environ, ANSIBLE_CONFIG=config, ANSIBLE_NOCOLOR="1",
        ANSIBLE_FORCE_COLOR="0", ANSIBLE_HOST_KEY_CHECKING="False",
        ANSIBLE_RETRY_FILES_ENABLED="False", ANSIBLE_PIPELINING="True",
        ANSIBLE_LOCAL_TEMP=os.path.join(workdir, "tmp"),
        ANSIBLE_SSH_CONTROL_PATH_DIR=os.path.join(workdir, "cp"),
        ANSIBLE_ROLES_PATH=os.path.dirname(ROLE),
        XDG_CACHE_HOME=os.path.join(workdir, "cache"))


def run(command, workdir, timeout=600):
    return subprocess.run(
        command, cwd=ANSIBLE_DIR, env=ansible_env(workdir),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True, timeout=timeout)


def recap(output):
    """(ok, changed, unreachable, failed) of the one host in PLAY RECAP."""
    (found,) = RECAP.findall(output.split("PLAY RECAP", 1)[-1])
    return tuple(int(number) for number in found)


def webhook_secret():
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


def signature_valid(request, secret):
    """Standard Webhooks: v1,base64 HMAC-SHA256 of "id.timestamp.body"."""
    key = base64.b64decode(secret[len("whsec_"):])
    signed = ("%s.%s." % (request.headers["webhook-id"],
                          request.headers["webhook-timestamp"])).encode()
    expected = base64.b64encode(hmac.new(key, signed + request.body,
                                         hashlib.sha256).digest()).decode()
    return request.headers["webhook-signature"] == "v1," + expected


# ------------------------------------------------------------ static checks


def test_the_example_play_and_the_role_pass_syntax_check_and_lint(
        tmp_path):
    require_ansible()
    syntax = run(["ansible-playbook", "--syntax-check", "-i", "servers,",
                  "site.yml"], str(tmp_path))
    assert syntax.returncode == 0, syntax.stdout
    # production is ansible-lint's strictest profile; --offline installs
    # nothing.  Only what is written in the files themselves is excused.
    lint = run(["ansible-lint", "--offline", "--profile", "production",
                "-p", "site.yml", "roles/pamsignal"], str(tmp_path))
    assert lint.returncode == 0, lint.stdout
    assert "production profile: 0 failure(s), 0 warning(s)" in lint.stdout


def check_play(channel):
    """A play that runs only the role's checks of its variables."""
    return [{"hosts": "localhost", "connection": "local",
             "gather_facts": False,
             "vars": {"pamsignal_file_src": PAMSIGNAL,
                      "pamsignal_settings": {"alerts": {
                          "ignore_sources": ["192.0.2.0/24"]}},
                      "pamsignal_channels": [channel]},
             "tasks": [{"ansible.builtin.include_role": {
                 "name": "pamsignal", "tasks_from": "check"}}]}]


SECRET_MARK = "NotForTheLog"


@pytest.mark.parametrize("channel", [
    {"name": "hook", "type": "webhook", "options": {
        "url": "http://127.0.0.1:9/", "secret": SECRET_MARK +
        "\n[channel:evil]\ntype = webhook\nurl = http://127.0.0.1:1/"}},
    {"name": "hook", "type": "webhook", "options": {
        "url": "http://127.0.0.1:9/" + SECRET_MARK + " ;cut"}},
    {"name": "hook", "type": "webhook", "options": {
        "url": "http://127.0.0.1:9/", "events\n" + SECRET_MARK: "*"}},
    {"name": "hook]\n[" + SECRET_MARK, "type": "webhook", "options": {}},
], ids=["line-break-in-value", "comment-in-value", "line-break-in-key",
        "bad-channel-name"])
def test_values_unfit_for_the_ini_file_are_refused_unshown(tmp_path,
                                                             channel):
    require_ansible()
    play = tmp_path / "check.yml"
    play.write_text(json.dumps(check_play(channel)))
    result = run(["ansible-playbook", "-i", "localhost,", str(play)],
                 str(tmp_path), timeout=120)
    assert result.returncode != 0, result.stdout
    assert "no key or value may hold a line break" in result.stdout
    assert SECRET_MARK not in result.stdout


def test_fit_values_pass_the_checks(tmp_path):
    require_ansible()
    play = tmp_path / "check.yml"
    play.write_text(json.dumps(check_play({
        "name": "hook", "type": "webhook", "options": {
            "url": "http://127.0.0.1:9/", "secret": webhook_secret(),
            "events": ["login_success", "sudo_command"]}})))
    result = run(["ansible-playbook", "-i", "localhost,", str(play)],
                 str(tmp_path), timeout=120)
    assert result.returncode == 0, result.stdout
    assert recap(result.stdout)[3] == 0


@pytest.mark.parametrize("keys,refused", [
    ({"pamsignal_apt_key_url": "http://192.0.2.1/key.gpg"}, True),
    ({"pamsignal_rpm_repository_url": "https://192.0.2.1/rpm",
      "pamsignal_rpm_key_url": "http://192.0.2.1/key.asc"}, True),
    ({"pamsignal_apt_key_url": "https://192.0.2.1/key.gpg"}, False),
    ({"pamsignal_apt_key_url": "http://192.0.2.1/key.gpg",
      "pamsignal_apt_key_checksum": "sha256:" + "0" * 64}, False),
], ids=["apt-http", "rpm-http", "apt-https", "apt-http-pinned"])
def test_a_signing_key_comes_over_https_or_pinned(tmp_path, keys, refused):
    """Over plain http a man in the middle could hand over his own key,
    which would then vouch for his packages."""
    require_ansible()
    play = check_play({"name": "hook", "type": "webhook",
                       "options": {"url": "http://127.0.0.1:9/"}})
    play[0]["gather_facts"] = True  # the repository check names the OS
    play[0]["vars"].update(dict({
        "pamsignal_install_method": "repository",
        "pamsignal_apt_repository_url": "http://192.0.2.1/apt",
        "pamsignal_apt_key_url": "https://192.0.2.1/key.gpg",
        "pamsignal_rpm_repository_url": "http://192.0.2.1/rpm",
        "pamsignal_rpm_key_url": "https://192.0.2.1/key.asc"}, **keys))
    (tmp_path / "check.yml").write_text(json.dumps(play))
    result = run(["ansible-playbook", "-i", "localhost,",
                  str(tmp_path / "check.yml")], str(tmp_path), timeout=120)
    said = "pamsignal_apt_key_url is https:// (or file://)" in result.stdout
    assert (result.returncode != 0, said) == (refused, refused), \
        result.stdout


def test_a_release_file_is_checked_against_its_checksum(tmp_path):
    """On the controller, before anything is copied (--check: the copy
    itself is only simulated)."""
    require_ansible()
    right = "sha256:" + sha256_of(PAMSIGNAL)
    wrong = "sha256:" + hashlib.sha256(b"another release").hexdigest()
    outcomes = {}
    for checksum in (right, wrong):
        play = tmp_path / "file.yml"
        play.write_text(json.dumps([{
            "hosts": "localhost", "connection": "local",
            "gather_facts": False,
            "vars": {"pamsignal_file_src": PAMSIGNAL,
                     "pamsignal_file_checksum": checksum},
            "tasks": [{"ansible.builtin.include_role": {
                "name": "pamsignal", "tasks_from": "install-file"}}]}]))
        outcomes[checksum] = run(["ansible-playbook", "--check", "-i",
                                  "localhost,", str(play)], str(tmp_path),
                                 timeout=120)
    assert outcomes[right].returncode == 0, outcomes[right].stdout
    assert outcomes[wrong].returncode != 0, outcomes[wrong].stdout
    assert "does not match pamsignal_file_checksum" in \
        outcomes[wrong].stdout
    assert "TASK [pamsignal : Copy the release file]" not in \
        outcomes[wrong].stdout


# ------------------------------------------------------------ for real


def free_loopback_port(preferred):
    """`preferred` if nothing listens on it on 127.0.0.1, else one the
    kernel picks."""
    for port in (preferred, 0):
        probe = socket.socket()
        try:
            probe.bind(("127.0.0.1", port))
            return probe.getsockname()[1]
        except OSError:
            continue
        finally:
            probe.close()
    raise RuntimeError("no free port on 127.0.0.1")


class Deployment(object):
    """The booted container, the receiver, the inventory, and the output
    and duration of each run of the play."""

    def __init__(self, work):
        self.work = work
        self.inventory = os.path.join(work, "inventory.yml")
        self.outputs = []
        self.seconds = []

    def play(self, variables, options=()):
        """Run site.yml with these extra variables; its output."""
        path = os.path.join(self.work, "vars-%d.json" % len(self.outputs))
        with open(path, "w") as handle:
            json.dump(variables, handle)
        # --diff -v: what an admin debugging a run would see.
        began = time.monotonic()
        output = run(["ansible-playbook", "-i", self.inventory, "-e",
                      "@" + path, "--diff", "-v", "site.yml"] +
                     list(options), self.work).stdout
        self.seconds.append(time.monotonic() - began)
        self.outputs.append(output)
        return output


def write_inventory(path, port, key, user="root"):
    host = {"ansible_host": "127.0.0.1", "ansible_port": port,
            "ansible_user": user, "ansible_ssh_private_key_file": key,
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o "
            "UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes"}
    with open(path, "w") as handle:
        json.dump({"servers": {"hosts": {"box": host}}}, handle)


def play_variables(deployment):
    """The configuration every method's play gets."""
    return {"pamsignal_settings": {
                "pamsignal": {"first_start": "now"},
                "detection": {"brute_force_fast": "6 in 10m"},
                "alerts": {"ignore_sources": ["192.0.2.0/24",
                                              "198.51.100.0/24"],
                           "cooldown": False},
                "report": {"send_to": "hook"}},
            "pamsignal_report_timer": True,
            "pamsignal_channels": [{
                "name": "hook", "type": "webhook",
                "options": {"url": deployment.receiver.url + "/pamsignal",
                            "secret": deployment.secret}}]}


def file_variables(deployment):
    return dict(play_variables(deployment), pamsignal_install_method="file",
                pamsignal_file_src=PAMSIGNAL,
                pamsignal_file_checksum="sha256:" + sha256_of(PAMSIGNAL))


def sha256_of(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    require_ansible()
    realsys.require_root()
    realsys.require_binaries("systemd-nspawn", "nsenter", "ssh",
                             "ssh-keygen")
    tree = realsys.require_tree(
        realsys.ANSIBLE_TREE, realsys.ANSIBLE_NEEDS,
        realsys.build_ansible_tree, "bootable Debian 13 tree with python3-apt")
    work = str(tmp_path_factory.mktemp("ansible"))
    found = Deployment(work)
    found.port = free_loopback_port(SSH_PORT)
    found.key, _ = realsys.make_keypair(work)
    sshd_conf = os.path.join(work, "sshd-port.conf")
    with open(sshd_conf, "w") as handle:
        # Read before Debian's own sshd_config: the first value wins.
        handle.write("Port %d\nListenAddress 127.0.0.1\n"
                     "PermitRootLogin prohibit-password\n"
                     "PasswordAuthentication no\nUseDNS no\n" % found.port)
    found.secret = webhook_secret()
    binds = [(sshd_conf, "/etc/ssh/sshd_config.d/pamsignal-test.conf"),
             (found.key + ".pub", "/root/.ssh/authorized_keys")]
    try:
        with HttpReceiver() as found.receiver, realsys.booted_container(
                os.path.join(work, "nspawn.log"), binds,
                "ansible role on a booted tree", tree=tree,
                private_network=False) as box:
            found.container = box
            assert wait_for(lambda: realsys._ssh_banner("127.0.0.1",
                                                        found.port),
                            timeout=30), box.run(["systemctl", "status",
                                                  "ssh"], check=False).stdout
            # apt's own timers must not hold its lock while the role
            # installs.
            box.run(["systemctl", "stop", "apt-daily.timer",
                     "apt-daily-upgrade.timer", "dpkg-db-backup.timer"])
            write_inventory(found.inventory, found.port, found.key)
            found.dry_run = found.play(file_variables(found), ["--check"])
            found.dry_run_left = box.run(["ls", "/usr/bin/pamsignal",
                                          "/etc/pamsignal"], check=False)
            for _ in range(2):
                found.play(file_variables(found))
            yield found
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print("ansible plays: %s s" % ", ".join(
            "%.0f" % seconds for seconds in found.seconds))


def test_a_dry_run_on_a_new_host_passes_and_changes_nothing(deployment):
    ok, changed, unreachable, failed = recap(deployment.dry_run)
    assert (unreachable, failed) == (0, 0), deployment.dry_run[-4000:]
    assert changed >= 2, deployment.dry_run  # what a real run would do
    assert "No such file" in deployment.dry_run_left.stderr
    assert deployment.dry_run_left.stdout == ""


def test_the_first_run_installs_and_starts_the_service(deployment):
    first = deployment.outputs[1]
    ok, changed, unreachable, failed = recap(first)
    assert (unreachable, failed) == (0, 0), first[-4000:]
    assert changed >= 3, first  # program, configuration, install
    assert "RUNNING HANDLER [pamsignal : Reload pamsignal]" in first
    # The configuration came first, so the service started with it.
    assert "kept /etc/pamsignal/pamsignal.conf" in first
    box = deployment.container
    assert box.run(["systemctl", "is-active", "pamsignal"]).stdout.strip() \
        == "active"
    assert box.show("UnitFileState") == "enabled"
    assert "reload failed" not in box.show("StatusText")
    program = box.run(["sha256sum", "/usr/bin/pamsignal"]).stdout.split()[0]
    assert program == sha256_of(PAMSIGNAL)
    assert box.run(["stat", "-c", "%a", "/usr/bin/pamsignal"]) \
        .stdout.strip() == "755"


def test_the_second_run_changes_nothing(deployment):
    second = deployment.outputs[2]
    ok, changed, unreachable, failed = recap(second)
    assert (changed, unreachable, failed) == (0, 0, 0), second[-4000:]
    assert ok > 0
    assert "RUNNING HANDLER" not in second


def test_the_configuration_holds_the_channel_root_only(deployment):
    box = deployment.container
    config = "/etc/pamsignal/pamsignal.conf"
    assert box.run(["stat", "-c", "%a %U %G", config]).stdout.split() == \
        ["600", "root", "root"]
    assert box.run(["stat", "-c", "%a", "/etc/pamsignal"]).stdout.strip() \
        == "700"
    text = box.run(["cat", config]).stdout
    assert "\n[channel:hook]\ntype = webhook\n" in text
    assert "\nsecret = %s\n" % deployment.secret in text
    assert "\nurl = %s/pamsignal\n" % deployment.receiver.url in text
    assert "\ncooldown = off\n" in text
    assert "\nignore_sources = 192.0.2.0/24, 198.51.100.0/24\n" in text
    assert "\n[detection]\nbrute_force_fast = 6 in 10m\n" in text
    assert "\n[report]\nsend_to = hook\n" in text
    check = box.run(["pamsignal", "check-config"], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "OK (1 channel)" in check.stdout


def test_the_daily_report_timer_is_enabled_when_asked(deployment):
    box = deployment.container
    assert box.show("UnitFileState", "pamsignal-report.timer") == "enabled"
    assert box.show("ActiveState", "pamsignal-report.timer") == "active"
    assert box.show("FragmentPath", "pamsignal-report.service") == \
        "/etc/systemd/system/pamsignal-report.service"  # from install


def test_the_service_alerts_the_configured_webhook(deployment):
    box = deployment.container
    receiver = deployment.receiver
    result = box.run(["pamsignal", "test-alert"], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hook (webhook): delivered" in result.stdout
    # A real root login through the container's sshd, seen by the
    # service the role set up, arrives signed with the role's secret.
    login = realsys.ssh_key("root", deployment.key, port=deployment.port)
    assert login.returncode == 0, login.stderr

    def logins():
        return [request for request in receiver.requests
                if isinstance(request.json, dict) and
                request.json.get("event", {}).get("action") ==
                "login_success" and
                request.json.get("user", {}).get("name") == "root"]

    assert wait_for(logins, timeout=30), box.unit_log()[-3000:]
    assert all(signature_valid(request, deployment.secret)
               for request in receiver.requests)
    assert logins()[0].json["source"]["ip"] == "127.0.0.1"


def test_a_bad_setting_is_refused_and_a_good_one_reloaded(deployment):
    box = deployment.container
    config = "/etc/pamsignal/pamsignal.conf"
    before = box.run(["cat", config]).stdout
    main_pid = box.show("MainPID")
    reloaded = "configuration reloaded from /run/pamsignal/pamsignal.conf"
    reloads = box.unit_log().count(reloaded)
    variables = file_variables(deployment)
    variables["pamsignal_settings"]["detection"]["brute_force_fast"] = "lots"
    refused = deployment.play(variables)
    assert recap(refused)[3] == 1, refused
    failing_task = refused.split("fatal: ", 1)[0].rsplit("TASK [", 1)[1]
    assert failing_task.startswith("pamsignal : Write /etc/pamsignal/"
                                   "pamsignal.conf]"), refused
    assert box.run(["cat", config]).stdout == before
    variables["pamsignal_settings"]["detection"]["brute_force_fast"] = \
        "7 in 10m"
    changed = deployment.play(variables)
    assert_recap(changed, lambda count: count == 2)  # the file, the reload
    assert "RUNNING HANDLER [pamsignal : Reload pamsignal]" in changed
    assert "\nbrute_force_fast = 7 in 10m\n" in box.run(["cat", config]).stdout
    # Reloaded in place: the same process, which read the new file.
    assert box.show("MainPID") == main_pid
    assert wait_for(lambda: box.unit_log().count(reloaded) > reloads,
                    timeout=30), box.unit_log()[-3000:]
    assert "reload failed" not in box.show("StatusText")


def test_a_login_user_made_root_by_become_can_configure(deployment):
    """site.yml's setup: an admin's login, root through sudo (become).
    The template's validate then checks Ansible's copy in that user's
    ~/.ansible/tmp, a directory root's check-config would not trust."""
    box = deployment.container
    config = "/etc/pamsignal/pamsignal.conf"
    box.run(["useradd", "-m", "-s", "/bin/bash", "admin"])
    box.run(["sh", "-c", "echo 'admin ALL=(ALL) NOPASSWD:ALL' > "
             "/etc/sudoers.d/admin && chmod 440 /etc/sudoers.d/admin && "
             "install -d -o admin -m 700 /home/admin/.ssh && "
             "install -o admin -m 600 /root/.ssh/authorized_keys "
             "/home/admin/.ssh/authorized_keys"])
    as_root = deployment.inventory
    deployment.inventory = os.path.join(deployment.work, "admin.yml")
    write_inventory(deployment.inventory, deployment.port, deployment.key,
                    "admin")
    try:
        variables = file_variables(deployment)
        detection = variables["pamsignal_settings"]["detection"]
        detection["brute_force_fast"] = "8 in 10m"
        changed = deployment.play(variables)
        assert recap(changed)[2:] == (0, 0), changed[-4000:]
        assert "\nbrute_force_fast = 8 in 10m\n" in box.run(
            ["cat", config]).stdout
        # The check did run: a bad value is still refused.
        detection["brute_force_fast"] = "lots"
        refused = deployment.play(variables)
        assert recap(refused)[3] == 1, refused
        assert "Write /etc/pamsignal/pamsignal.conf" in refused.split(
            "fatal: ", 1)[0].rsplit("TASK [", 1)[1]
        assert "\nbrute_force_fast = 8 in 10m\n" in box.run(
            ["cat", config]).stdout
    finally:
        deployment.inventory = as_root


def test_the_secret_is_never_shown(deployment):
    """In any run so far: the dry run, both runs, a refused and a changed
    configuration."""
    for output in deployment.outputs:
        assert deployment.secret not in output
        # The result was hidden, not merely empty.
        assert "the output has been hidden" in output
    # Ansible logs each module's arguments to the host's journal.
    journal = deployment.container.run(["journalctl", "-o", "json",
                                        "--no-pager"]).stdout
    assert "Invoked with" in journal
    assert deployment.secret not in journal


# ------------------------------------------------------------ packages
#
# The role's package and repository paths get what the project publishes:
# the .deb of `make deb` (the session's, tests/conftest.py) and the
# signed repository of `make repo-apt`, signed with a throw-away key and
# served here.


#: The key's name as the project publishes it (README, `make repo-apt`).
KEY_NAME = "pamsignal-archive-keyring.gpg"


class Signer(object):
    """A throw-away OpenPGP key in its own GNUPGHOME."""

    def __init__(self, directory, name):
        self.home = os.path.join(directory, "gnupg-" + name)
        self.user = "%s@example.invalid" % name
        os.makedirs(self.home, mode=0o700)
        self.gpg(["--passphrase", "", "--quick-gen-key",
                  "PAMSignal test %s <%s>" % (name, self.user),
                  "ed25519", "sign", "1d"])

    def export(self, path):
        """The public key as a binary keyring file, as the project
        publishes it."""
        with open(path, "wb") as handle:
            subprocess.run(["gpg", "--homedir", self.home, "--batch",
                            "--export"], stdout=handle, check=True,
                           timeout=60)

    def gpg(self, arguments):
        return realsys._check(["gpg", "--homedir", self.home, "--batch",
                               "--pinentry-mode", "loopback"] + arguments)

    def close(self):
        realsys._run(["gpgconf", "--homedir", self.home, "--kill",
                      "gpg-agent"])


def signed_repository(directory, deb, signer):
    """`make repo-apt` of the session's .deb (not built again), signed by
    `signer`; the repository's directory (with the public key)."""
    dist = os.path.join(directory, "dist")
    os.makedirs(dist)
    shutil.copy(deb, dist)
    result = realsys._run(
        ["make", "-C", REPO, "-o", "deb", "repo-apt", "DISTDIR=" + dist,
         "GPG_KEY=" + signer.user, "GNUPGHOME=" + signer.home],
        timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return os.path.join(dist, "repo")


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_directory(directory):
    """An HTTP server for `directory` on 127.0.0.1, in a thread."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietFiles,
                                            directory=directory))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


def assert_recap(output, changed):
    ok, done, unreachable, failed = recap(output)
    assert (unreachable, failed) == (0, 0), output[-4000:]
    assert changed(done), output


def assert_packaged_service(box):
    owner = box.run(["dpkg-query", "-S", "/usr/bin/pamsignal"]).stdout
    assert owner.startswith("pamsignal:"), owner
    assert box.run(["systemctl", "is-active", "pamsignal"]).stdout.strip() \
        == "active"
    assert box.show("UnitFileState") == "enabled"
    assert box.show("FragmentPath") in (
        "/lib/systemd/system/pamsignal.service",
        "/usr/lib/systemd/system/pamsignal.service")
    assert "OK (1 channel)" in box.run(["pamsignal", "check-config"]).stdout


@pytest.fixture(scope="module")
def packages(deployment, debian_package):
    """The .deb and the signed repository serving it; the host left with
    no apt source but this one, and no pamsignal yet."""
    found = types.SimpleNamespace()
    work = deployment.work
    found.deb = debian_package
    found.signer = Signer(work, "repo")
    found.stranger = Signer(work, "stranger")
    found.repo = signed_repository(work, found.deb, found.signer)
    found.server = serve_directory(found.repo)
    found.url = "http://127.0.0.1:%d" % found.server.server_address[1]
    found.stranger.export(os.path.join(found.repo, "stranger.gpg"))
    # The release file and its SHA256SUMS, as a release publishes them.
    shutil.copy(PAMSIGNAL, os.path.join(found.repo, "pamsignal.py"))
    with open(os.path.join(found.repo, "SHA256SUMS"), "w") as handle:
        handle.write("%s  pamsignal.py\n" % sha256_of(PAMSIGNAL))
    box = deployment.container
    box.run(["pamsignal", "uninstall", "--purge"])
    box.run(["sh", "-c", "rm -f /etc/apt/sources.list "
             "/etc/apt/sources.list.d/*"])
    try:
        yield found
    finally:
        found.server.shutdown()
        found.server.server_close()
        found.signer.close()
        found.stranger.close()


def test_the_file_method_downloads_the_release_checked(deployment,
                                                        packages):
    """pamsignal_file_url, its checksum read from the release's
    SHA256SUMS."""
    box = deployment.container
    variables = dict(play_variables(deployment),
                     pamsignal_install_method="file",
                     pamsignal_file_src="",  # site.yml names one
                     pamsignal_file_url=packages.url + "/pamsignal.py",
                     pamsignal_file_checksum="sha256:%s/SHA256SUMS"
                     % packages.url)
    try:
        first = deployment.play(variables)
        assert_recap(first, lambda changed: changed >= 3)
        assert "TASK [pamsignal : Download the release file]" in first
        assert box.run(["sha256sum", "/usr/bin/pamsignal"]).stdout \
            .split()[0] == sha256_of(PAMSIGNAL)
        assert box.run(["systemctl", "is-active", "pamsignal"]) \
            .stdout.strip() == "active"
        second = deployment.play(variables)
        assert_recap(second, lambda changed: changed == 0)
    finally:
        box.run(["pamsignal", "uninstall", "--purge"], check=False)


def test_the_package_method_installs_a_deb_idempotently(deployment,
                                                         packages):
    variables = dict(play_variables(deployment),
                     pamsignal_install_method="package",
                     pamsignal_package=packages.deb)
    first = deployment.play(variables)
    assert_recap(first, lambda changed: changed >= 3)
    assert_packaged_service(deployment.container)
    second = deployment.play(variables)
    assert_recap(second, lambda changed: changed == 0)


def test_the_repository_method_installs_from_the_signed_repository(
        deployment, packages):
    box = deployment.container
    box.run(["dpkg", "--purge", "pamsignal"])
    key = os.path.join(packages.repo, KEY_NAME)
    keyring = "/etc/apt/keyrings/" + KEY_NAME
    # Set up by hand first, as the README shows; then taken over.
    box.write("/etc/apt/sources.list.d/pamsignal.list",
              "deb [signed-by=%s] %s stable main\n" % (keyring,
                                                      packages.url))
    variables = dict(play_variables(deployment),
                     pamsignal_install_method="repository",
                     pamsignal_apt_repository_url=packages.url,
                     pamsignal_apt_key_url=packages.url + "/" + KEY_NAME,
                     pamsignal_apt_key_checksum="sha256:" + sha256_of(key))
    first = deployment.play(variables)
    assert_recap(first, lambda changed: changed >= 3)
    assert_packaged_service(box)
    source = box.run(["cat", "/etc/apt/sources.list.d/"
                      "pamsignal.sources"]).stdout
    assert "\nSigned-By: %s\n" % keyring in source
    assert "\nURIs: %s\n" % packages.url in source
    assert box.run(["sha256sum", keyring]).stdout.split()[0] == \
        sha256_of(key)
    assert box.run(["ls", "/etc/apt/sources.list.d"]).stdout.split() == \
        ["pamsignal.sources"]
    second = deployment.play(variables)
    assert_recap(second, lambda changed: changed == 0)
    # The key in Signed-By is what apt checks the repository with: the
    # role put it nowhere else, and another key there is refused.
    box.run(["python3", "-c", "import sys, urllib.request; urllib.request"
             ".urlretrieve(*sys.argv[1:])", packages.url + "/stranger.gpg",
             keyring])
    update = box.run(["apt-get", "update"], check=False)
    assert "OpenPGP signature verification failed: %s stable InRelease" \
        % packages.url in update.stdout + update.stderr, update
