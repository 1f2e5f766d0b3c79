"""The syslog channel against a real collector: Debian's rsyslogd started
by the test on loopback (tests/syslog_collector.py) over UDP, TCP with
octet counting, TCP with LF framing and TLS (gtls, a throw-away CA),
every record read back by its specification; a collector restarted while
alerts flow; client certificates; a wrong CA or host name refused; the
agent and test-alert as an admin runs them."""
import grp
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time

import pytest

import realsys
import receivers
import siem_formats
import syslog_collector
from support import PAMSIGNAL, FakeJournal, json_line, make_entry, \
    pamsignal, wait_for, write_config
from syslog_collector import Collector
from test_syslog_render import HOSTILE_NAMES, LEEF_EXACT, cef_carried


def require_rsyslog(tls=False):
    realsys.require_binaries(syslog_collector.RSYSLOGD, "openssl")
    if tls and not os.path.exists(syslog_collector.GTLS_DRIVER):
        realsys.unavailable("rsyslog's TLS driver is missing: apt-get "
                            "install rsyslog-gnutls")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    require_rsyslog(tls=True)
    return receivers.make_cert(str(tmp_path_factory.mktemp("certs")),
                               ("localhost", "127.0.0.1"))


@pytest.fixture(scope="module")
def collectors(tmp_path_factory, certs):
    """One running collector per transport, shared by the module (each
    test tells its own messages apart by APP-NAME)."""
    directory = tmp_path_factory.mktemp("collectors")
    running = {}
    try:
        for transport in ("udp", "tcp", "tls"):
            running[transport] = Collector(directory, transport,
                                           certs=certs).start()
        yield running
    finally:
        for collector in running.values():
            collector.stop()


def app_name():
    return "t" + secrets.token_hex(6)


def sink_for(text):
    (configured,) = pamsignal.parse_config(text).channels
    return pamsignal.SyslogSink(configured.name, configured.options)


def config_for(collector, transport, extra=""):
    return "[channel:siem]\ntype = syslog\ntarget = %s://127.0.0.1:%d\n%s" \
        % (transport, collector.port, extra)


def received(collector, app, count, timeout=30):
    """The messages with APP-NAME (or TAG) `app`, once `count` came."""
    mine = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [message for message in collector.messages()
                if (b" %s " % app.encode()) in message[:200]
                or (b" %s: " % app.encode()) in message[:200]]
        if len(mine) >= count:
            break
        time.sleep(0.05)
    return mine


def hostile_events():
    return [pamsignal.Event(
        action="login_failure", timestamp_us=1795780000000000 + number,
        user=name, target_user=name + "2", source_ip="203.0.113.9",
        source_port=40000 + number, service="sshd", hostname="web1",
        reason="invalid_user", message="Invalid user %s" % name)
        for number, name in enumerate(HOSTILE_NAMES)]


def names_in(record, fmt):
    """(user, message) as the collector's record carries them."""
    if fmt == "cef":
        _, values = siem_formats.parse_cef(record)
        return values["duser"] if "suser" not in values else \
            values["suser"], values["msg"]
    if fmt == "leef":
        _, values = siem_formats.parse_leef(record)
        return values["usrName"], values["msg"]
    ecs = json.loads(record)
    return ecs["user"]["name"], ecs["message"]


TRANSPORTS = [("udp", ""), ("tcp", ""), ("tcp", "framing = lf\n"),
              ("tls", "")]


@pytest.mark.parametrize("transport, extra", TRANSPORTS,
                         ids=["udp", "tcp-octet", "tcp-lf", "tls"])
@pytest.mark.parametrize("fmt", ["cef", "leef", "json"])
@pytest.mark.parametrize("header", ["rfc5424", "rfc3164"])
def test_the_collector_reads_every_record_and_hostile_names_exactly(
        collectors, certs, transport, extra, fmt, header):
    app = app_name()
    if transport == "tls":
        extra += "ca_file = %s\n" % certs.ca_file
    sink = sink_for(config_for(
        collectors[transport], transport, extra +
        "format = %s\nheader = %s\napp_name = %s\n" % (fmt, header, app)))
    events = hostile_events()
    sink.send_batch([(evt, 0) for evt in events])
    sink.close()
    messages = received(collectors[transport], app, len(events))
    assert len(messages) == len(events)  # none split, none lost
    parse = siem_formats.parse_rfc5424 if header == "rfc5424" \
        else siem_formats.parse_rfc3164
    for evt, message in zip(events, messages):  # one connection: in order
        parsed = parse(message)
        assert parsed["hostname"] == "web1"
        user, text = names_in(parsed["msg"], fmt)
        if fmt == "leef" and evt.user not in LEEF_EXACT:
            assert user == pamsignal.escape_text(evt.user).replace(
                "^", "\\x5e")
        elif fmt == "cef":
            assert (user, text) == (cef_carried(evt.user),
                                    cef_carried(evt.message))
        else:
            assert (user, text) == (evt.user, evt.message)
        if header == "rfc5424":
            assert parsed["sd"]["pamsignal@32473"]["id"] == \
                pamsignal.alert_id(evt)


def test_rsyslogs_own_cef_parser_reads_hostile_names_exactly(tmp_path):
    """liblognorm's CEF parser (rsyslog's mmnormalize), an implementation
    that is not ours, reads every record and value as sent."""
    require_rsyslog()
    collector = Collector(tmp_path, "tcp", parse_cef=True).start()
    events = hostile_events()
    try:
        sink = sink_for(config_for(collector, "tcp", ""))
        sink.send_batch([(evt, 0) for evt in events])
        assert len(collector.wait_for(len(events))) == len(events)
        assert wait_for(lambda: len(collector.cef_records()) == len(events))
    finally:
        collector.stop()
    for evt, record in zip(events, collector.cef_records()):
        assert (record["DeviceVendor"], record["DeviceProduct"],
                record["SignatureID"], record["Name"], record["Severity"]) \
            == ("PAMSignal", "pamsignal", "login_failure", "Failed login",
                "3")
        values = record["Extensions"]
        assert (values["suser"], values["duser"], values["msg"]) == (
            cef_carried(evt.user), cef_carried(evt.target_user),
            cef_carried(evt.message))
        assert values["externalId"] == pamsignal.alert_id(evt)
        # liblognorm 2.0.6 drops the first letter of the first key ("rt"
        # reads as "t"); CEF puts the extension right after the last |.
        assert values.get("rt", values.get("t")) == "1795780000000"


def test_the_longest_record_fits_rsyslogs_default_message_size(tmp_path):
    require_rsyslog()
    collector = Collector(tmp_path, "tcp", max_size=None).start()
    try:
        app = app_name()
        huge = "\u00e9|=\\" * 3000
        evt = pamsignal.Event(
            action="sudo_command", timestamp_us=1795780000000000,
            user=huge, target_user="root", command_line=huge, message=huge,
            hostname="web1", service="sudo")
        sink = sink_for(config_for(collector, "tcp", "app_name = %s\n"
                                   % app))
        sink.send(evt)
        # And a message of exactly the largest size sent: it arrives whole.
        head = b"<85>1 - - %s - - - " % app.encode()
        largest = head + b"x" * (pamsignal.MAX_SYSLOG_BYTES - len(head))
        sink._send_stream(pamsignal.frame_syslog(largest, "octet"), 1)
        message, second = received(collector, app, 2)
    finally:
        collector.stop()
    assert second == largest
    assert message == pamsignal.render_syslog(evt, sink.layout)
    _, values = siem_formats.parse_cef(siem_formats.parse_rfc5424(
        message)["msg"])
    assert values["duser"] == "root"
    assert values["suser"].endswith("\u2026")
    assert huge.startswith(values["suser"][:-1])


def stream_courier(collector, transport, tmp_path, certs, app):
    extra = "app_name = %s\nformat = json\n" % app
    if transport == "tls":
        extra += "ca_file = %s\n" % certs.ca_file
    sink = sink_for(config_for(collector, transport, extra))
    spool = pamsignal.Spool(str(tmp_path / "spool"), 100000, 86400)
    spool.open()
    return pamsignal.Courier(sink, spool), spool


def numbered(count, offset=0):
    return [pamsignal.Event(action="session_opened", user="user%d" % n,
                            timestamp_us=1795780000000000 + n,
                            service="sshd", hostname="web1")
            for n in range(offset, offset + count)]


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_collector_restarted_while_alerts_flow_loses_nothing(
        tmp_path, certs, transport):
    collector = Collector(tmp_path, transport, certs=certs).start()
    app = app_name()
    courier, spool = stream_courier(collector, transport, tmp_path, certs,
                                    app)
    total, stopped, restarted = 600, threading.Event(), threading.Event()

    def feed():
        for first in range(0, total, 20):
            for evt in numbered(20, first):
                spool.put(evt)
            spool.flush()
            time.sleep(0.01)
            if first == 200:
                # the next ones while it is down: were all sent before it
                # stopped, no delivery would fail
                stopped.wait(60)
            if first == 300:
                restarted.wait(60)  # the rest while it comes back

    courier.start()
    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        assert wait_for(lambda: courier.delivered >= 100, timeout=60)
        collector.stop()
        stopped.set()
        assert wait_for(lambda: courier.failed >= 1, timeout=30)
        collector.start()
        restarted.set()
        feeder.join(60)
        assert wait_for(lambda: courier.delivered >= total and
                        spool.depth() == 0, timeout=120), courier.last_error
    finally:
        stopped.set()
        restarted.set()
        courier.stop()
        collector.stop()
    users = [json.loads(siem_formats.parse_rfc5424(message)["msg"])[
        "user"]["name"] for message in received(collector, app, total)]
    assert set(users) == set("user%d" % n for n in range(total))
    # A batch the collector had not finished reading is sent again whole,
    # never more than one batch.
    assert len(users) - total <= pamsignal.SyslogSink.MAX_BATCH
    assert courier.delivered == total


def test_the_spool_hands_out_batches_oldest_first(tmp_path):
    spool = pamsignal.Spool(str(tmp_path / "spool"), 100, 86400)
    spool.open()
    events = numbered(5)
    for evt in events:
        spool.put(evt)
    spool.flush()
    batch = spool.take_batch(3, 0)
    assert [evt for _, evt in batch] == events[:3]
    spool.delivered(batch[0][0])
    assert [evt for _, evt in spool.take_batch(10, 0)] == events[1:]
    assert spool.take_batch(10, 0) == spool.take_batch(10, 0)  # not taken
    for name, _ in spool.take_batch(10, 0):
        spool.delivered(name)
    assert spool.take_batch(10, 0) == []


def test_udp_counts_what_went_out_before_a_refusal(tmp_path):
    """Nothing listens: the first datagram leaves (best effort), the
    kernel's port-unreachable refuses the next; the rest stay spooled."""
    sink = sink_for("[channel:siem]\ntype = syslog\ntarget = "
                    "udp://127.0.0.1:%d\n" % syslog_collector.free_port(
                        "udp"))
    spool = pamsignal.Spool(str(tmp_path / "spool"), 100, 86400)
    spool.open()
    for evt in numbered(3):
        spool.put(evt)
    spool.flush()
    courier = pamsignal.Courier(sink, spool)
    courier.stopping.set()  # no waiting out the retry
    courier.deliver_batch(spool.take_batch(10, 0))
    sink.close()
    assert (courier.delivered, courier.failed, spool.depth()) == (1, 1, 2)
    assert courier.last_error == ("cannot send to 127.0.0.1:%d: Connection "
                                  "refused" % sink.target.port)


def make_client_cert(certs, name):
    """A client certificate (extendedKeyUsage clientAuth) for `name`,
    signed by the test CA, its key readable by the owner only."""
    cert = os.path.join(certs.directory, "client-%s.pem" % name)
    key = os.path.join(certs.directory, "client-%s.key" % name)
    if not os.path.exists(cert):
        ext = cert + ".ext"
        with open(ext, "w") as handle:
            handle.write("[v3]\nbasicConstraints = critical, CA:FALSE\n"
                         "keyUsage = critical, digitalSignature\n"
                         "extendedKeyUsage = clientAuth\n"
                         "subjectAltName = DNS:%s\n" % name)
        receivers._openssl("req", "-new", "-newkey", "ec", "-pkeyopt",
                           "ec_paramgen_curve:prime256v1", "-nodes",
                           "-subj", "/CN=%s" % name, "-keyout", key,
                           "-out", cert + ".csr")
        receivers._openssl("x509", "-req", "-in", cert + ".csr", "-sha256",
                           "-days", "30", "-CA", certs.ca_file, "-CAkey",
                           certs.ca_key_file, "-set_serial", "0x%x" %
                           secrets.randbits(62), "-extfile", ext,
                           "-extensions", "v3", "-out", cert)
    os.chmod(key, 0o600)
    return cert, key


def test_a_collector_that_requires_a_client_certificate(tmp_path, certs):
    cert, key = make_client_cert(certs, "pamsignal.client.test")
    collector = Collector(tmp_path, "tls", certs=certs,
                          permitted_peer="pamsignal.client.test").start()
    try:
        app = app_name()
        base = config_for(collector, "tls", "ca_file = %s\napp_name = %s\n"
                          % (certs.ca_file, app))
        with_cert = sink_for(base + "cert_file = %s\nkey_file = %s\n"
                             % (cert, key))
        with_cert.send(numbered(1)[0])
        assert len(received(collector, app, 1)) == 1
        stranger, stranger_key = make_client_cert(certs, "someone.else")
        for sink in (sink_for(base), sink_for(
                base + "cert_file = %s\nkey_file = %s\n" % (stranger,
                                                            stranger_key))):
            with pytest.raises(pamsignal.DeliveryError) as refused:
                sink.send(numbered(1, 1)[0])
            # rsyslog hangs up after the handshake without a TLS alert:
            # noticed before the alert is sent, so it waits in the spool.
            assert str(refused.value) == (
                "127.0.0.1:%d closed the connection before any alert was "
                "sent: it does not accept this client (its log says why: a"
                " client certificate, an address it does not allow?)"
                % collector.port)
        assert len(received(collector, app, 2, timeout=2)) == 1
    finally:
        collector.stop()


@pytest.mark.parametrize("mode, group", [
    (0o604, None),          # the world
    (0o640, "nogroup"),     # a group that is not ours
])
def test_a_key_file_others_can_read_is_refused(tmp_path, certs, mode,
                                               group):
    realsys.require_root()  # to give the file to another group
    cert, key = make_client_cert(certs, "pamsignal.client.test")
    mine = str(tmp_path / "client.key")
    with open(key, "rb") as source, open(mine, "wb") as copy:
        copy.write(source.read())
    config = write_config(tmp_path / "p.conf", config_for(
        Collector(tmp_path, "tls"), "tls", "cert_file = %s\nkey_file = %s\n"
        % (cert, mine)))
    os.chmod(config, 0o600)
    os.chmod(mine, 0o640)  # group-readable by our own group: allowed
    pamsignal.load_config(config)
    if group:
        os.chown(mine, -1, grp.getgrnam(group).gr_gid)
    os.chmod(mine, mode)
    with pytest.raises(pamsignal.ConfigError) as refused:
        pamsignal.load_config(config)
    assert str(refused.value) == (
        "%s:%d: [channel:siem] key_file: %s holds a private key but other "
        "users can read it (group or world); run: chmod 600 %s"
        % (config, line_of(config, "key_file"), mine, mine))


def test_a_client_certificate_with_the_wrong_key_is_refused(tmp_path,
                                                            certs):
    cert, _ = make_client_cert(certs, "pamsignal.client.test")
    _, other_key = make_client_cert(certs, "someone.else")
    config = write_config(tmp_path / "p.conf", config_for(
        Collector(tmp_path, "tls"), "tls", "cert_file = %s\nkey_file = %s\n"
        % (cert, other_key)))
    os.chmod(config, 0o600)
    with pytest.raises(pamsignal.ConfigError) as refused:
        pamsignal.load_config(config)
    (problem,) = refused.value.problems
    assert str(problem).startswith(
        "%s:%d: [channel:siem] cert_file: cannot load %s with %s: " % (
            config, line_of(config, "cert_file"), cert, other_key))


def line_of(config, key):
    """The line of the config file that sets `key`."""
    with open(config) as handle:
        return next(number for number, line in enumerate(handle, 1)
                    if line.startswith(key + " "))


@pytest.mark.parametrize("wrong", ["ca", "host"])
def test_a_wrong_ca_or_host_name_is_refused_and_the_alert_waits(
        tmp_path, certs, wrong):
    served = certs if wrong == "ca" else receivers.make_cert(
        certs.directory, ("siem.wrong.test",))
    collector = Collector(tmp_path, "tls", certs=served).start()
    try:
        config = pamsignal.parse_config(
            "[pamsignal]\nstate_dir = %s\n" % (tmp_path / "state") +
            config_for(collector, "tls", "ca_file = %s\n" % (
                certs.other_ca_file if wrong == "ca" else certs.ca_file)))
        channels = pamsignal.build_channels(config)
        agent = pamsignal.Agent(config, channels)
        agent.open_channels()
        (channel,) = channels
        login = numbered(1)[0]
        channel.spool.put(login)
        channel.spool.flush()
        (courier,) = agent.channels.couriers
        assert wait_for(lambda: courier.failed >= 1, timeout=20)
        agent.check_channels()
        reason = agent.failing_channels()["siem"]
        assert reason.startswith("127.0.0.1:%d: TLS certificate not "
                                 "trusted: " % collector.port)
        if wrong == "host":  # OpenSSL's words, or Python 3.6's own
            assert "IP address mismatch, certificate is not valid for " \
                "'127.0.0.1'" in reason or reason.endswith(
                    "hostname '127.0.0.1' doesn't match 'siem.wrong.test'")
        assert "channel:siem" in agent.health.impaired
        courier.stop()
        # The alert waits, with the agent's own word that the channel is
        # degraded (a SIEM channel takes every event).
        waiting = channel.spool.take_batch(10, 0)
        assert [event for _, event in waiting][0] == login
        assert [event.action for _, event in waiting] == [
            "session_opened", "monitoring_degraded"]
        assert collector.messages() == []
    finally:
        collector.stop()


def run_cli(*argv):
    return subprocess.run([sys.executable, PAMSIGNAL] + list(argv),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def test_test_alert_reports_delivered_or_the_exact_error(
        tmp_path, collectors, certs):
    app, free = app_name(), syslog_collector.free_port()
    path = write_config(tmp_path / "p.conf", (
        "[pamsignal]\nstate_dir = %s\n" % (tmp_path / "state")) +
        config_for(collectors["tcp"], "tcp", "app_name = %s\n" % app) +
        config_for(collectors["tls"], "tls", "ca_file = %s\n"
                   % certs.other_ca_file).replace("siem", "wrong-ca") +
        "[channel:down]\ntype = syslog\ntarget = tcp://127.0.0.1:%d\n"
        % free)
    os.chmod(path, 0o600)
    done = run_cli("--config", path, "test-alert", "--channel", "siem")
    assert (done.returncode, done.stdout) == (0, "siem (syslog): delivered\n")
    (message,) = received(collectors["tcp"], app, 1)
    _, values = siem_formats.parse_cef(siem_formats.parse_rfc5424(message)[
        "msg"])
    assert values["duser"] == "alice" and "test alert" in values["msg"]
    done = run_cli("--config", path, "test-alert", "--channel", "down",
                   "--channel", "wrong-ca")
    assert done.returncode == 1
    wrong_ca, down = done.stdout.splitlines()
    assert wrong_ca.startswith(
        "wrong-ca (syslog): NOT delivered: 127.0.0.1:%d: TLS certificate "
        "not trusted: " % collectors["tls"].port)
    assert down == ("down (syslog): NOT delivered: cannot reach "
                    "127.0.0.1:%d: Connection refused" % free)


def test_udp_says_it_is_best_effort(tmp_path, collectors):
    app = app_name()
    path = write_config(tmp_path / "p.conf", (
        "[pamsignal]\nstate_dir = %s\n" % (tmp_path / "state")) +
        config_for(collectors["udp"], "udp", "app_name = %s\n" % app))
    os.chmod(path, 0o600)
    done = run_cli("--config", path, "check-config")
    assert done.returncode == 0
    assert done.stdout.splitlines()[1] == (
        "[channel:siem] " + pamsignal.SyslogSink.UDP_NOTE)
    done = run_cli("--config", path, "test-alert")
    assert (done.returncode, done.stdout) == (
        0, "siem (syslog): sent (not confirmed: UDP is best effort)\n")
    assert "warning: channel siem: " + pamsignal.SyslogSink.UDP_NOTE in \
        done.stderr
    assert len(received(collectors["udp"], app, 1)) == 1


def test_the_agent_forwards_every_event_to_the_collector(tmp_path,
                                                          collectors):
    """`run` as an admin runs it, journal entries from a fake journalctl:
    routine events (a session opened, a failure) reach the SIEM too,
    repeats are not held back, and nothing goes twice."""
    app = app_name()
    entries = [
        make_entry("sshd", "Failed password for root from 198.51.100.9 "
                   "port 4000%d ssh2" % n, sequence=n) for n in range(3)]
    entries.append(make_entry(
        "sshd", "pam_unix(sshd:session): session opened for user alice("
        "uid=1000) by (uid=0)", sequence=5))
    journal = FakeJournal(tmp_path, {"follow": [{"output": [
        json_line(entry) for entry in entries] + [3600]}]})
    path = write_config(tmp_path / "p.conf", (
        "[pamsignal]\nstate_dir = %s\njournalctl = %s\nfirst_start = all\n"
        % (tmp_path / "state", journal.program)) + config_for(
            collectors["tcp"], "tcp", "app_name = %s\n" % app))
    os.chmod(path, 0o600)
    with open(str(tmp_path / "agent.err"), "wb") as errors:
        agent = subprocess.Popen([sys.executable, PAMSIGNAL, "--config",
                                  path, "run"], stdout=subprocess.DEVNULL,
                                 stderr=errors, env=journal.env())
        try:
            messages = received(collectors["tcp"], app, 4)
        finally:
            agent.terminate()
            agent.wait(20)
    assert len(messages) >= 4, (tmp_path / "agent.err").read_text()
    actions = sorted(siem_formats.parse_rfc5424(message)["msgid"]
                     for message in messages)
    assert [action for action in actions if action in
            pamsignal.PARSED_ACTIONS] == ["login_failure"] * 3 + [
                "session_opened"]
    # Stopped and all read: each event went once.
    assert len(received(collectors["tcp"], app, 99, timeout=1)) == len(
        messages)


# ----------------------------------- a collector that talks back (not rsyslog)


@pytest.fixture(scope="module")
def own_certs(tmp_path_factory):
    """Certificates for a collector of the test's own (no rsyslog)."""
    return receivers.make_cert(str(tmp_path_factory.mktemp("own-certs")),
                               ("localhost", "127.0.0.1"))


class TalkingCollector(receivers.LoopbackListener):
    """A TCP or TLS syslog collector in a thread that sends back what
    some collectors do and rsyslog does not: `greeting` as soon as a
    client is connected, `ack` once it has read everything (the client's
    end of stream) and before it closes in turn. `flood` bytes are sent
    (before reading) instead. What each connection brought, in order:
    `batches`."""

    threaded = False  # the batches in the order they came

    def __init__(self, transport, certs, greeting=b"", ack=b"", flood=0):
        self.context = None
        if transport == "tls":
            self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.context.load_cert_chain(certs.cert_file, certs.key_file)
        self.greeting, self.ack, self.flood = greeting, ack, flood
        self.batches = []
        super().__init__()

    def _connection(self, client):
        try:
            client.settimeout(10)
            self._talk(client)
        except (OSError, ValueError):
            pass  # the sender gave up on us
        finally:
            client.close()

    def _talk(self, client):
        if self.context is not None:
            client = self.context.wrap_socket(client, server_side=True)
        client.sendall(self.greeting + b"x" * self.flood)
        data = b""
        while True:
            chunk = client.recv(65536)  # b"": FIN, or TLS close_notify
            if not chunk:
                break
            data += chunk
        self.batches.append(data)
        client.sendall(self.ack)
        if self.context is not None:
            client.unwrap()  # close_notify in turn


@pytest.mark.parametrize("transport", ["tcp", "tls"])
@pytest.mark.parametrize("greeting, ack", [
    (b"220 collector ready\n", b""), (b"", b"OK\n" * 5),
    (b"hello\n", b"OK\n" * 5)], ids=["greeting", "ack", "both"])
def test_a_collector_that_talks_back_still_confirms_the_batch(
        own_certs, transport, greeting, ack):
    """What the collector sends is read and dropped while PAMSignal waits
    for it to close (OpenSSL 3 refused to close TLS over it: the batch
    was sent again and again, forever)."""
    with TalkingCollector(transport, own_certs, greeting, ack) as collector:
        sink = sink_for(config_for(
            collector, transport, "timeout = 5s\nformat = json\n" + (
                "ca_file = %s\n" % own_certs.ca_file
                if transport == "tls" else "")))
        sink.send_batch([(event, 0) for event in numbered(5)])
    batch, probe = collector.batches
    assert [json.loads(siem_formats.parse_rfc5424(message)["msg"])["user"][
        "name"] for message in siem_formats.octet_frames(batch)] == [
            "user%d" % number for number in range(5)]
    assert probe == b""


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_collector_that_never_stops_talking_is_not_read_forever(
        own_certs, transport):
    """At most 1 MiB (MAX_COLLECTOR_BYTES) is read from it, then the
    batch is to go again; long before the timeout."""
    with TalkingCollector(transport, own_certs,
                          flood=8 * 1024 * 1024) as collector:
        sink = sink_for(config_for(
            collector, transport, "timeout = 30s\n" + (
                "ca_file = %s\n" % own_certs.ca_file
                if transport == "tls" else "")))
        started = time.monotonic()
        with pytest.raises(pamsignal.DeliveryError) as failure:
            sink.send_batch([(event, 0) for event in numbered(2)])
        took = time.monotonic() - started
    assert str(failure.value) == (
        "127.0.0.1:%d sent more than %d bytes while it should have been "
        "reading ours and closing; sending them again" % (
            collector.port, 1024 * 1024))
    assert not failure.value.permanent
    assert took < 10
