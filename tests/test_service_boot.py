"""pamsignal.service under a real systemd: a Debian 13 tree booted with
`systemd-nspawn -b` (docs/CONTRIBUTING.md), the agent installed inside by
`pamsignal.py install`, real ssh logins through the container's own sshd.

The tree is cached (tests/realsys.py boot-tree, run by .ci/run) and booted
with --volatile=overlay, so every run starts from the same clean tree and
writes nothing into it; --private-network keeps its sshd (port 22) away from
the host's test sshd."""
import json
import os
import re

import pytest

import realsys
from support import COMPILE_PEAK_PROBE, REPO, pamsignal, wait_for

pytestmark = pytest.mark.e2e

INSIDE_SRC = realsys.INSIDE_SRC
DROP_IN = "/etc/systemd/system/pamsignal.service.d/test-watchdog.conf"


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    realsys.require_binaries("ssh", "sshpass")
    with realsys.booted_container(
            str(tmp_path_factory.mktemp("nspawn") / "nspawn.log"),
            [(REPO, INSIDE_SRC)], "nspawn service tests") as box:
        yield box


def wait_log(container, pattern, timeout=30):
    regex = re.compile(pattern)
    assert wait_for(lambda: regex.search(container.unit_log()),
                    timeout=timeout), container.unit_log()[-3000:]


def ssh(container, user, password):
    return container.run(
        ["sshpass", "-p", password, "ssh", "-F", "/dev/null", "-o",
         "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "LogLevel=ERROR", "-o", "NumberOfPasswordPrompts=1", "-p",
         "22", "%s@127.0.0.1" % user, "true"], check=False, net=True)


def test_install_starts_the_hardened_service(container):
    result = container.run(["python3", INSIDE_SRC + "/pamsignal.py",
                            "install"])
    assert "running: systemctl restart pamsignal.service" \
        in result.stdout
    # Type=notify: active (not activating) means READY=1 arrived.
    assert container.run(["systemctl", "is-active", "pamsignal"]) \
        .stdout.strip() == "active"
    assert container.show("StatusText").startswith("Following the journal")
    assert container.show("UnitFileState") == "enabled"
    unit = container.run(["cat", "/etc/systemd/system/pamsignal.service"])
    with open(os.path.join(REPO, "pamsignal.service")) as handle:
        assert unit.stdout == handle.read()
    mode = container.run(["stat", "-c", "%a %U", "/etc/pamsignal/"
                          "pamsignal.conf"]).stdout.split()
    assert mode == ["600", "root"]


def test_a_real_ssh_login_reaches_the_agent_in_its_sandbox(container):
    name = "psn" + os.urandom(4).hex()
    container.run(["useradd", "-m", "-s", "/bin/bash", name])
    container.run(["chpasswd"], input="%s:Pw-%s\n" % (name, name))
    assert ssh(container, name, "Pw-" + name).returncode == 0
    assert ssh(container, name, "wrong").returncode != 0
    wait_log(container, r"login_success user=%s source=127\.0\.0\.1:\d+ .*"
             r"service=sshd method=password" % name)
    wait_log(container, r"login_failure user=%s .*reason=bad_password"
             % name)
    # State in /var/lib/pamsignal, owned by the transient user.
    owner = container.run(["stat", "-L", "-c", "%u", "/var/lib/pamsignal/"
                           "state.json"]).stdout.strip()
    assert owner != "0"
    # /proc/net stays readable for the service's user in its namespaces.
    main = container.show("MainPID")
    script = ("import os; rows = open('/proc/net/tcp').read().splitlines();"
              "print(os.getuid(), len(rows))")
    probe = container.run(["nsenter", "--target", main, "--all", "-S",
                           owner, "-G", owner, "python3", "-c", script])
    uid, rows = probe.stdout.split()
    assert uid == owner and int(rows) >= 2  # header and sshd's listener
    status = container.run(["pamsignal", "status", "--json"], check=False)
    report = json.loads(status.stdout)
    assert report["state"] == "running", status.stdout
    assert report["degraded"] == []


def test_the_sandboxed_service_starts_over_light(container):
    """The unit's sandbox (the system call filter, PrivateTmp for the
    hand-over file) lets `run` start over from the compiled file in the
    same process (see tests/test_memory.py)."""
    main = container.show("MainPID")
    argv = container.run(["cat", "/proc/%s/cmdline" % main]).stdout \
        .split("\0")
    assert argv[argv.index("-c") + 1] == pamsignal.RERUN_PROGRAM
    status = dict(line.split(":", 1) for line in container.run(
        ["cat", "/proc/%s/status" % main]).stdout.splitlines())
    compiling = container.run(["python3", "-c", COMPILE_PEAK_PROBE,
                               INSIDE_SRC + "/pamsignal.py"]).stdout
    assert int(status["VmHWM"].split()[0]) < int(compiling) - 10 * 1024


HOOK_RECEIVER = """\
import http.server

class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open("/root/hook.jsonl", "ab") as out:
            out.write(body + b"\\n")
        self.send_response(200)
        self.end_headers()

http.server.HTTPServer(("127.0.0.1", 8088), Hook).serve_forever()
"""


def test_a_login_reaches_a_webhook_from_the_sandbox(container):
    """The unit's sandbox lets the courier reach the network and keep its
    spool in the state directory: a real login arrives at a webhook."""
    container.write("/root/rx.py", HOOK_RECEIVER)
    container.run(["systemd-run", "--quiet", "--unit=hookrx", "python3",
                   "/root/rx.py"])
    container.write("/etc/pamsignal/pamsignal.conf",
                    "[channel:hook]\ntype = webhook\n"
                    "url = http://127.0.0.1:8088/hook\n"
                    "events = login_success\ncooldown = off\n"
                    "[channel:log]\ntype = console\n")
    container.run(["systemctl", "reload", "pamsignal"])
    wait_log(container, r"configuration reloaded from "
             r"/run/pamsignal/pamsignal\.conf \(2 channels\)")
    name = "psw" + os.urandom(4).hex()
    container.run(["useradd", "-m", "-s", "/bin/bash", name])
    container.run(["chpasswd"], input="%s:Pw-%s\n" % (name, name))
    assert ssh(container, name, "Pw-" + name).returncode == 0

    def delivered():
        found = container.run(["cat", "/root/hook.jsonl"], check=False)
        return [json.loads(line) for line in found.stdout.splitlines()
                if name in line]

    assert wait_for(delivered, timeout=30), container.unit_log()[-2000:]
    (alert,) = delivered()
    assert alert["event"]["action"] == "login_success"
    assert alert["user"]["name"] == name
    assert alert["source"]["ip"] == "127.0.0.1"
    owner = container.run(["stat", "-L", "-c", "%u", "/var/lib/pamsignal/"
                           "spool/hook"]).stdout.strip()
    assert owner != "0"


REPORT_UNITS = ("/etc/systemd/system/pamsignal-report.service",
                "/etc/systemd/system/pamsignal-report.timer")


def exposure(container, unit):
    """systemd-analyze security's overall exposure of a loaded unit."""
    found = re.search(r"Overall exposure level for %s: (\d+\.\d)" % (
        re.escape(unit)), container.run(["systemd-analyze", "security",
                                         "--no-pager", unit]).stdout)
    assert found
    return float(found.group(1))


def test_the_report_units_load_cleanly_and_are_sandboxed_as_the_agent(
        container):
    # --man=no: `install` (the bare file) installs no man page.
    verify = container.run(["systemd-analyze", "verify", "--man=no"] +
                           list(REPORT_UNITS), check=False)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    assert exposure(container, "pamsignal-report.service") <= \
        exposure(container, "pamsignal.service")
    # Off until the admin enables it.
    assert container.show("UnitFileState", "pamsignal-report.timer") == \
        "disabled"


def test_the_report_service_without_send_to_says_so_and_fails(container):
    assert container.run(["systemctl", "start", "pamsignal-report.service"],
                         check=False).returncode != 0
    assert container.show("ExecMainStatus", "pamsignal-report.service") \
        == "78"
    log = container.run(["journalctl", "-u", "pamsignal-report.service",
                         "-o", "cat", "--no-pager"]).stdout
    assert "[report] send_to: names no channel" in log


def summaries(container):
    found = container.run(["cat", "/root/hook.jsonl"], check=False)
    return [json.loads(line) for line in found.stdout.splitlines()
            if '"report_summary"' in line]


def test_the_report_service_sends_yesterday_once_after_a_run_by_hand(
        container):
    """A run by hand as root, then the service as its dynamic user: the
    service can use the spool root wrote (handed to the state's owner),
    and the same report reaches the webhook once."""
    container.write("/etc/pamsignal/pamsignal.conf",
                    "[report]\nsend_to = hook\n[channel:hook]\n"
                    "type = webhook\nurl = http://127.0.0.1:8088/hook\n"
                    "events = login_success\ncooldown = off\n")
    by_hand = container.run(["pamsignal", "report", "--since", "yesterday",
                             "--until", "today", "--send", "hook"])
    assert by_hand.stdout == "report to hook: sent\n"
    container.run(["systemctl", "start", "pamsignal-report.service"])
    assert container.show("Result", "pamsignal-report.service") == "success"
    log = container.run(["journalctl", "-u", "pamsignal-report.service",
                         "-o", "cat", "--no-pager"]).stdout
    assert "report to hook: already sent within the hour" in log
    (summary,) = summaries(container)
    day = container.run(["date", "-d", "yesterday", "+%Y-%m-%d"]).stdout
    assert summary["message"].startswith("PAMSignal report: %s 00:00 to "
                                         % day.strip())
    assert summary["pamsignal"]["detail"] in summary["message"]
    owner = container.run(["stat", "-L", "-c", "%u", "/var/lib/pamsignal/"
                           "report-spool/hook"]).stdout.strip()
    assert owner == container.run(["stat", "-L", "-c", "%u",
                                   "/var/lib/pamsignal"]).stdout.strip()
    assert owner != "0"


def test_the_enabled_timer_is_listed(container):
    container.run(["systemctl", "enable", "--now",
                   "pamsignal-report.timer"])
    listed = container.run(["systemctl", "list-timers", "--all",
                            "--no-pager", "pamsignal-report.timer"]).stdout
    (line,) = [line for line in listed.splitlines()
               if "pamsignal-report.timer" in line]
    assert "pamsignal-report.service" in line
    assert container.show("UnitFileState", "pamsignal-report.timer") == \
        "enabled"
    container.run(["systemctl", "disable", "--now",
                   "pamsignal-report.timer"])


SYSLOG_RECEIVER = """\
import ssl, socket
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/root/syslogrx/server.pem",
                        "/root/syslogrx/server.key")
context.load_verify_locations("/root/syslogrx/ca.pem")
context.verify_mode = ssl.CERT_REQUIRED  # a client certificate, or no
listener = socket.create_server(("127.0.0.1", 6514))
while True:
    raw, _ = listener.accept()
    try:
        conn = context.wrap_socket(raw, server_side=True)
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        with open("/root/syslog.bin", "ab") as out:
            out.write(data)
    except OSError:
        pass
    raw.close()
"""
SYSLOG_DROP_IN = "/etc/systemd/system/pamsignal.service.d/siem-key.conf"


def test_a_login_reaches_a_tls_syslog_collector_with_a_client_key(
        container, tmp_path):
    """As the README says to set it up: certificates where all may read
    them, the client key passed by LoadCredential=, a collector that
    requires the client certificate; a real login arrives as ECS JSON."""
    import receivers
    import siem_formats
    from test_syslog import make_client_cert
    certs = receivers.make_cert(str(tmp_path), ("localhost", "127.0.0.1"))
    cert, key = make_client_cert(certs, "pamsignal.client.test")
    container.run(["mkdir", "-p", "/root/syslogrx", "/etc/ssl/pamsignal"])
    for source, target in ((certs.cert_file, "/root/syslogrx/server.pem"),
                           (certs.key_file, "/root/syslogrx/server.key"),
                           (certs.ca_file, "/root/syslogrx/ca.pem"),
                           (certs.ca_file, "/etc/ssl/pamsignal/ca.pem"),
                           (cert, "/etc/ssl/pamsignal/client.pem"),
                           (key, "/etc/pamsignal/client.key")):
        with open(source) as handle:
            container.write(target, handle.read())
    container.run(["chmod", "644", "/etc/ssl/pamsignal/ca.pem",
                   "/etc/ssl/pamsignal/client.pem"])
    container.run(["chmod", "600", "/etc/pamsignal/client.key"])
    container.write("/root/syslogrx/rx.py", SYSLOG_RECEIVER)
    container.run(["systemd-run", "--quiet", "--unit=syslogrx", "python3",
                   "/root/syslogrx/rx.py"])
    container.run(["mkdir", "-p", os.path.dirname(SYSLOG_DROP_IN)])
    container.write(SYSLOG_DROP_IN, "[Service]\nLoadCredential=siem-key:"
                    "/etc/pamsignal/client.key\n")
    container.write("/etc/pamsignal/pamsignal.conf",
                    "[channel:siem]\ntype = syslog\n"
                    "target = tls://127.0.0.1:6514\nformat = json\n"
                    "ca_file = /etc/ssl/pamsignal/ca.pem\n"
                    "cert_file = /etc/ssl/pamsignal/client.pem\n"
                    "key_file = /run/credentials/pamsignal.service/"
                    "siem-key\n[channel:log]\ntype = console\n")
    container.run(["systemctl", "daemon-reload"])
    restart = container.run(["systemctl", "restart", "pamsignal"],
                            check=False)
    assert restart.returncode == 0, container.unit_log()[-3000:]
    name = "pss" + os.urandom(4).hex()
    container.run(["useradd", "-m", "-s", "/bin/bash", name])
    container.run(["chpasswd"], input="%s:Pw-%s\n" % (name, name))
    assert ssh(container, name, "Pw-" + name).returncode == 0

    def delivered():
        found = container.run(["cat", "/root/syslog.bin"], check=False)
        messages = siem_formats.octet_frames(found.stdout.encode())
        return [json.loads(siem_formats.parse_rfc5424(message)["msg"])
                for message in messages if name.encode() in message and
                b"login_success" in message]

    try:
        assert wait_for(delivered, timeout=30), container.unit_log()[-3000:]
    finally:
        container.run(["rm", "-f", SYSLOG_DROP_IN])
        container.run(["systemctl", "daemon-reload"])
        container.run(["systemctl", "stop", "syslogrx"], check=False)
    (alert,) = delivered()
    assert (alert["event"]["action"], alert["user"]["name"]) == (
        "login_success", name)


def test_reload_valid_and_invalid_configurations(container):
    config = "/etc/pamsignal/pamsignal.conf"
    container.write(config, "[channel:console]\ntype = console\n"
                    "format = json\n")
    container.run(["systemctl", "reload", "pamsignal"])
    wait_log(container, r"configuration reloaded from "
             r"/run/pamsignal/pamsignal\.conf \(1 channel\)")
    container.write(config, "[detection]\nbrute_force_fast = lots\n")
    container.run(["systemctl", "reload", "pamsignal"])
    assert wait_for(lambda: "configuration reload failed" in
                    container.show("StatusText"), timeout=30)
    assert "pamsignal.conf:2: [detection] brute_force_fast" in \
        container.show("StatusText")
    # The json console of the valid reload printed the failure event.
    wait_log(container, r'"action": "config_reload_failed"')
    assert container.run(["systemctl", "is-active", "pamsignal"]) \
        .stdout.strip() == "active"
    container.write(config, "")
    container.run(["systemctl", "reload", "pamsignal"])
    assert wait_for(lambda: "reload failed" not in
                    container.show("StatusText"), timeout=30)


def test_reload_opens_nothing_the_service_user_planted(container):
    """ExecReload=+ runs stage-config as root in /run/pamsignal, which the
    service's user owns: FIFOs it plants there (at the copy and at a
    temporary name) must not block the reload."""
    main = container.show("MainPID")
    owner = container.run(["stat", "-c", "%u", "/run/pamsignal"]) \
        .stdout.strip()
    for name in ("pamsignal.conf.tmp", "pamsignal.conf"):
        container.run(["nsenter", "--target", main, "--all", "-S", owner,
                       "-G", owner, "sh", "-c", 'rm -f "$1"; mkfifo "$1"',
                       "sh", "/run/pamsignal/" + name])
    before = container.unit_log().count("configuration reloaded")
    container.write("/etc/pamsignal/pamsignal.conf",
                    "[channel:planted]\ntype = console\n")
    # A FIFO blocked stage-config for ever: the timeout is the failure.
    container.run(["systemctl", "reload", "pamsignal"], timeout=60)
    assert wait_for(lambda: container.unit_log().count(
        "configuration reloaded") > before, timeout=30)
    copy = container.run(["stat", "-c", "%F %u %a",
                          "/run/pamsignal/pamsignal.conf"]).stdout.split()
    assert copy == ["regular", "file", owner, "600"]
    container.write("/etc/pamsignal/pamsignal.conf", "")
    container.run(["systemctl", "reload", "pamsignal"])


def test_the_watchdog_restarts_a_hung_agent(container):
    container.run(["mkdir", "-p", os.path.dirname(DROP_IN)])
    container.write(DROP_IN, "[Service]\nWatchdogSec=2s\nRestartSec=1s\n")
    container.run(["systemctl", "daemon-reload"])
    container.run(["systemctl", "restart", "pamsignal"])
    hung = container.show("MainPID")
    container.run(["kill", "-STOP", hung])
    assert wait_for(lambda: container.show("MainPID") not in (hung, "0")
                    and container.show("ActiveState") == "active",
                    timeout=60)
    assert int(container.show("NRestarts")) >= 1
    wait_log(container, r"Failed with result 'watchdog'")
    container.run(["rm", DROP_IN])
    container.run(["systemctl", "daemon-reload"])


def test_a_bad_configuration_at_start_fails_without_restarts(container):
    config = "/etc/pamsignal/pamsignal.conf"
    container.write(config, "[pamsignal]\nfirst_start = yesterday\n")
    assert container.run(["systemctl", "restart", "pamsignal"],
                         check=False).returncode != 0
    # With a restart pending it would be "activating (auto-restart)".
    assert wait_for(lambda: container.show("ActiveState") == "failed")
    assert container.show("ExecMainStatus") == "78"
    wait_log(container, r"pamsignal\.conf:2: \[pamsignal\] first_start: "
             r"expected now, boot, all")
    container.write(config, "")
    container.run(["systemctl", "reset-failed", "pamsignal"])
    container.run(["systemctl", "start", "pamsignal"])
    assert container.show("ActiveState") == "active"


def test_stop_and_uninstall(container):
    container.run(["systemctl", "stop", "pamsignal"])
    assert container.show("ActiveState") == "inactive"
    assert container.show("Result") == "success"
    wait_log(container, r"stopped after \d+ entries")
    status = container.run(["pamsignal", "status"], check=False)
    assert status.returncode == 1
    assert "stopped cleanly" in status.stdout
    # The audit log in the unit's LogsDirectory, written by its transient
    # user, reaches the head it anchored in the journal at stop.
    verified = container.run(["pamsignal", "verify-log", "--journal"],
                             check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "0 records written since" in verified.stdout
    result = container.run(["pamsignal", "uninstall"])
    assert "kept the configuration, state and logs" in result.stdout
    assert container.run(["systemctl", "cat", "pamsignal"],
                         check=False).returncode != 0
    for unit in REPORT_UNITS:
        assert container.run(["test", "-e", unit],
                             check=False).returncode != 0
    assert container.run(["test", "-e", "/var/lib/private/pamsignal/"
                          "state.json"], check=False).returncode == 0
    assert container.run(["test", "-e", "/usr/bin/pamsignal"],
                         check=False).returncode != 0
