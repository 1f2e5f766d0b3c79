"""Delivery against real local receivers (tests/receivers.py): each channel
type over HTTP and HTTPS with a verified certificate, e-mail over SMTP
with STARTTLS, TLS and login, and the courier's retries, waits and drops
on 429, 500, refusals, timeouts, dropped connections and a receiver that
is down for a while. Nothing is mocked: the requests cross real sockets."""
import json
import os
import subprocess
import sys
import time
import urllib.parse

import pytest

import receivers
from receivers import HttpReceiver, SmtpReceiver
from support import pamsignal, wait_for


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return receivers.make_cert(str(tmp_path_factory.mktemp("certs")))


@pytest.fixture
def receiver():
    with HttpReceiver() as rx:
        yield rx


def login(user="alice", at_s=1795780000):
    return pamsignal.Event(
        action="login_success", user=user, source_ip="203.0.113.5",
        source_port=51234, service="sshd", auth_method="publickey",
        hostname="web1", timestamp_us=at_s * 1000000,
        cursor="s=1;i=%x" % (hash(user) & 0xffff),
        message="Accepted publickey for %s from 203.0.113.5 port 51234 "
        "ssh2" % user)


def sink_for(text):
    (configured,) = pamsignal.parse_config(text).channels
    return pamsignal.CHANNEL_TYPES[configured.type](configured.name,
                                                    configured.options)


# ------------------------------------------------------------ each channel


def test_telegram_posts_html_to_the_bot_api(receiver):
    receiver.script(receivers.telegram_ok())
    sink = sink_for("[channel:t]\ntype = telegram\nbot_token = 123:TOKEN\n"
                    "chat_id = -100200\napi_url = %s\n" % receiver.url)
    sink.send(login("<b>mallory</b>"))
    (request,) = receiver.wait_for(1)
    assert request.path == "/bot123:TOKEN/sendMessage"
    assert request.headers["Content-Type"] == "application/json"
    assert request.json["chat_id"] == "-100200"
    assert request.json["parse_mode"] == "HTML"
    assert "&lt;b&gt;mallory&lt;/b&gt;" in request.json["text"]
    assert request.headers["User-Agent"].startswith("pamsignal/")


def test_each_webhook_service_gets_its_own_shape(receiver):
    receiver.script([receivers.slack_ok(), receivers.discord_ok(),
                     receivers.teams_ok(), receivers.ntfy_ok(),
                     receivers.gotify_ok()])
    for kind, extra in (("slack", ""), ("discord", ""), ("teams", ""),
                        ("ntfy", "token = tk_abc\n"),
                        ("gotify", "token = app-token\n")):
        path = "/topic" if kind == "ntfy" else "/" + kind
        sink_for("[channel:c]\ntype = %s\nurl = %s%s\n%s"
                 % (kind, receiver.url, path, extra)).send(login())
    slack, discord, teams, ntfy, gotify = receiver.wait_for(5)
    assert slack.path == "/slack"
    assert slack.json["blocks"][0]["text"]["type"] == "mrkdwn"
    assert discord.json["allowed_mentions"] == {"parse": []}
    assert teams.json["attachments"][0]["contentType"] == \
        "application/vnd.microsoft.card.adaptive"
    assert ntfy.path == "/" and ntfy.json["topic"] == "topic"
    assert ntfy.headers["Authorization"] == "Bearer tk_abc"
    assert gotify.path == "/gotify/message"
    assert gotify.headers["X-Gotify-Key"] == "app-token"
    for request in (slack, discord, teams, ntfy, gotify):
        assert "alice" in request.text


def test_tls_is_verified_against_the_configured_ca(certs):
    with HttpReceiver(tls=certs) as rx:
        good = sink_for("[channel:h]\ntype = webhook\nurl = %s/x\n"
                        "ca_file = %s\n" % (rx.localhost_url, certs.ca_file))
        good.send(login())
        assert rx.wait_for(1)[0].tls
        wrong = sink_for("[channel:h]\ntype = webhook\nurl = %s/x\n"
                         "ca_file = %s\n" % (rx.localhost_url,
                                             certs.other_ca_file))
        with pytest.raises(pamsignal.DeliveryError) as raised:
            wrong.send(login())
        assert "TLS certificate not trusted" in str(raised.value)
        assert not raised.value.permanent
        system = sink_for("[channel:h]\ntype = webhook\nurl = %s/x\n"
                          % rx.localhost_url)
        with pytest.raises(pamsignal.DeliveryError):
            system.send(login())  # a self-signed CA is not in the system's
    assert len(rx.requests) == 1


def test_a_proxy_from_the_environment_is_used(receiver, monkeypatch):
    with HttpReceiver() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        sink_for("[channel:h]\ntype = webhook\nurl = %s/hook\n"
                 % receiver.url).send(login())
        (request,) = proxy.wait_for(1)
    assert request.target == receiver.url + "/hook"
    assert receiver.requests == []


def https_proxy(monkeypatch, proxy):
    monkeypatch.setenv("https_proxy", proxy.url)
    for name in ("HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_https_goes_through_the_proxys_tunnel(certs, monkeypatch):
    with HttpReceiver(tls=certs) as rx, receivers.ConnectProxy() as proxy:
        https_proxy(monkeypatch, proxy)
        sink_for("[channel:h]\ntype = webhook\nurl = %s/hook\n"
                 "ca_file = %s\n" % (rx.localhost_url, certs.ca_file)
                 ).send(login())
        (request,) = rx.wait_for(1)
    assert request.tls and request.path == "/hook"
    assert proxy.targets == ["localhost:%d" % rx.port]


def test_a_proxy_dripping_its_answer_to_connect_times_out(monkeypatch):
    """The proxy's answer to CONNECT shares the request's one deadline: a
    header line every 0.3 s held the request for as long as it went on."""
    with receivers.ConnectProxy(drip=30) as proxy:
        https_proxy(monkeypatch, proxy)
        sink = sink_for("[channel:h]\ntype = webhook\nurl = https://"
                        "hooks.example.com/hook\ntimeout = 2s\n")
        started = time.monotonic()
        with pytest.raises(pamsignal.DeliveryError) as raised:
            sink.send(login())
        took = time.monotonic() - started
    assert str(raised.value) == ("cannot reach hooks.example.com: timed out "
                                 "(no complete answer within the 2 s "
                                 "timeout)")
    assert took < 6
    assert proxy.targets == ["hooks.example.com:443"]


@pytest.mark.parametrize("response, permanent, text", [
    (receivers.Respond(500, b"boom"), False, "HTTP 500: boom"),
    (receivers.slack_error(400, "invalid_payload"), True,
     "HTTP 400: invalid_payload"),
    (receivers.Drop(), False, "cannot reach 127.0.0.1"),
    (receivers.Reset(), False, "cannot reach 127.0.0.1"),
    (receivers.Hang(5), False, "timed out"),
])
def test_failures_are_reported_with_their_reason(receiver, response,
                                                 permanent, text):
    receiver.script(response)
    sink = sink_for("[channel:s]\ntype = slack\nurl = %s/T0/B0/SECRETPART\n"
                    "timeout = 1s\n" % receiver.url)
    with pytest.raises(pamsignal.DeliveryError) as raised:
        sink.send(login())
    assert text in str(raised.value)
    assert raised.value.permanent is permanent
    assert "SECRETPART" not in str(raised.value)


# ------------------------------------------------------------------ e-mail


def email_sink(mx, certs, security="starttls", password="s3cret"):
    return sink_for(
        "[channel:m]\ntype = email\nhost = 127.0.0.1\nport = %d\n"
        "security = %s\nusername = ps\npassword = %s\nca_file = %s\n"
        "sender = pamsignal@example.com\n"
        "recipients = admin@example.com, ops@example.com\n"
        % (mx.port, security, password, certs.ca_file))


def test_email_over_starttls_with_login(certs):
    with SmtpReceiver(tls=certs, user="ps", password="s3cret") as mx:
        email_sink(mx, certs).send(login("eve\r\nBcc: victim@example.com"))
        (mail,) = mx.wait_for(1)
    assert mail.tls and mail.auth_user == "ps"
    assert mail.rcpt_to == ["admin@example.com", "ops@example.com"]
    assert mail.message["Subject"].startswith("[PAMSignal] Login: \"eve")
    assert "Bcc" not in mail.message
    assert "victim@example.com" not in mail.rcpt_to
    assert "203.0.113.5:51234" in mail.text


def test_email_over_implicit_tls(certs):
    with SmtpReceiver(tls=certs, implicit_tls=True, user="ps",
                      password="s3cret") as mx:
        email_sink(mx, certs, security="tls").send(login())
        (mail,) = mx.wait_for(1)
    assert mail.tls


def test_an_smtp_reply_too_long_to_read_is_retried(certs):
    """smtplib's own "500 Line too long." is no refusal by the server."""
    with SmtpReceiver(tls=certs, user="ps", password="s3cret") as mx:
        mx.fail_next(451, "x" * 9000, command="MAIL")
        with pytest.raises(pamsignal.DeliveryError) as raised:
            email_sink(mx, certs).send(login())
    assert not raised.value.permanent
    assert "Line too long" in str(raised.value)


def test_email_failures_say_retry_or_give_up(certs):
    with SmtpReceiver(tls=certs, user="ps", password="s3cret") as mx:
        with pytest.raises(pamsignal.DeliveryError) as raised:
            email_sink(mx, certs, password="wrong").send(login())
        assert raised.value.permanent and "SMTP 535" in str(raised.value)
        assert "wrong" not in str(raised.value)
        mx.fail_next(451, command="MAIL")
        with pytest.raises(pamsignal.DeliveryError) as raised:
            email_sink(mx, certs).send(login())
        assert not raised.value.permanent and "SMTP 451" in str(raised.value)
        email_sink(mx, certs).send(login())
        assert len(mx.wait_for(1)) == 1


@pytest.mark.parametrize("where, security", [
    ("greeting", "none"), ("EHLO", "starttls"), ("EHLO", "tls")])
def test_an_smtp_reply_that_never_ends_is_not_read_forever(certs, where,
                                                            security):
    """smtplib keeps every line of a multi-line reply, however many: a
    server sending "220-..." lines without end grew memory until the
    timeout (478 MB in 2 s). At most 1 MiB is read in one session, then
    the delivery fails, to be retried."""
    with SmtpReceiver(tls=certs, implicit_tls=security == "tls",
                      long_reply=(where, 8 * 1024 * 1024)) as mx:
        sink = sink_for(
            "[channel:m]\ntype = email\nhost = 127.0.0.1\nport = %d\n"
            "security = %s\nca_file = %s\nsender = p@example.com\n"
            "recipients = a@example.com\ntimeout = 60s\n" % (
                mx.port, security, certs.ca_file))
        with pytest.raises(pamsignal.DeliveryError) as raised:
            sink.send(login())
        assert str(raised.value) == (
            "127.0.0.1 sent more than 1048576 bytes in one SMTP session (a "
            "reply that never ends?)")
        assert not raised.value.permanent
        assert mx.messages == []


# ----------------------------------------------------------------- courier


def courier_for(sink, tmp_path, max_alerts=100):
    spool = pamsignal.Spool(str(tmp_path / "spool"), max_alerts, 86400)
    spool.open()
    return pamsignal.Courier(sink, spool), spool


def run_courier(courier, done, timeout=20):
    """Start the courier, wait until `done()`, and stop it whatever
    happens."""
    courier.start()
    try:
        assert wait_for(done, timeout=timeout)
    finally:
        courier.stop()


def test_courier_waits_as_a_429_asks_then_delivers(receiver, tmp_path):
    receiver.script([receivers.telegram_429(3), receivers.telegram_ok()])
    sink = sink_for("[channel:t]\ntype = telegram\nbot_token = 1:T\n"
                    "chat_id = 5\napi_url = %s\n" % receiver.url)
    courier, spool = courier_for(sink, tmp_path)
    spool.put(login())
    spool.flush()
    run_courier(courier, lambda: courier.delivered == 1)
    assert len(receiver.requests) == 2
    assert courier.last_wait_s == 3.0
    assert courier.failed == 1 and spool.depth() == 0


@pytest.mark.parametrize("retry_after", [
    {"Retry-After": "0"}, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
    {"Content-Type": "application/json"}])
def test_a_429_saying_retry_now_is_not_a_busy_loop(receiver, tmp_path,
                                                   capsys, retry_after):
    """Retry-After: 0, a date gone by, or a JSON retry_after of 0: the
    courier still waits the backoff's first step between attempts."""
    receiver.default = receivers.Respond(
        429, b'{"ok":false,"parameters":{"retry_after":0}}', retry_after)
    sink = sink_for("[channel:t]\ntype = telegram\nbot_token = 1:T\n"
                    "chat_id = 5\napi_url = %s\n" % receiver.url)
    courier, spool = courier_for(sink, tmp_path)
    spool.put(login())
    spool.flush()
    courier.start()
    try:
        assert wait_for(lambda: courier.failures >= 1)
        courier.stopping.wait(1.0)
    finally:
        courier.stop()
    assert len(receiver.requests) == 1
    assert courier.last_wait_s >= pamsignal.RETRY_FIRST_S
    assert capsys.readouterr().err.count("warning") == 1
    assert spool.depth() == 1


def test_courier_drops_what_is_refused_and_goes_on(receiver, tmp_path,
                                                   capsys):
    receiver.script([receivers.slack_error(400, "invalid_blocks"),
                     receivers.slack_ok()])
    sink = sink_for("[channel:s]\ntype = slack\nurl = %s/hook\n"
                    % receiver.url)
    courier, spool = courier_for(sink, tmp_path)
    spool.put(login("first"))
    spool.put(login("second"))
    spool.flush()
    run_courier(courier, lambda: courier.delivered == 2)
    first, second, notice = receiver.requests
    assert "first" in first.text and "second" in second.text
    assert "Alerts lost" in notice.text and "1 refused" in notice.text
    assert "refused the login_success alert" in capsys.readouterr().err
    assert "HTTP 400: invalid_blocks" in courier.last_error


def test_a_receiver_down_for_a_while_gets_everything_once(receiver,
                                                         tmp_path):
    sink = sink_for("[channel:h]\ntype = webhook\nurl = %s/hook\n"
                    % receiver.url)
    receiver.down()
    courier, spool = courier_for(sink, tmp_path)
    for n in range(3):
        spool.put(login("user%d" % n))
    spool.flush()
    courier.start()
    try:
        assert wait_for(lambda: courier.failed >= 2, timeout=20)
        assert receiver.requests == []
        receiver.up()
        assert wait_for(lambda: courier.delivered == 3, timeout=30)
    finally:
        courier.stop()
    users = [request.json["user"]["name"] for request in receiver.requests]
    assert users == ["user0", "user1", "user2"]
    # The alerts that waited say so.
    assert all(request.json["@timestamp"].startswith("2026-11-27T11:46:40")
               for request in receiver.requests)


def test_a_full_spool_reports_what_it_lost_once_delivery_works(
        receiver, tmp_path):
    sink = sink_for("[channel:h]\ntype = webhook\nurl = %s/hook\n"
                    % receiver.url)
    courier, spool = courier_for(sink, tmp_path, max_alerts=2)
    for n in range(5):
        spool.put(login("user%d" % n))
    spool.flush()
    run_courier(courier, lambda: courier.delivered == 3)
    actions = [r.json["event"]["action"] for r in receiver.requests]
    assert actions == ["login_success", "login_success", "alerts_dropped"]
    notice = receiver.requests[2].json
    assert notice["pamsignal"]["held_back"] == 3
    assert notice["pamsignal"]["detail"] == "3 spool full (3 login_success)"
    # All alike: the oldest went; the report names who was lost.
    assert [r.json["user"]["name"] for r in receiver.requests[:2]] == [
        "user3", "user4"]
    assert notice["pamsignal"]["users_tried"] == ["user0", "user1", "user2"]
    assert notice["pamsignal"]["sources"] == ["203.0.113.5"]


# ------------------------------------------------------------- test-alert


def test_test_alert_reports_each_channel(receiver, tmp_path, capsys):
    receiver.script([receivers.slack_ok(), receivers.Respond(403, b"nope")])
    config = tmp_path / "pamsignal.conf"
    config.write_text(
        "[pamsignal]\nstate_dir = %s\n"
        "[channel:good]\ntype = slack\nurl = %s/good\n"
        "[channel:bad]\ntype = discord\nurl = %s/bad\n"
        % (tmp_path / "state", receiver.url, receiver.url))
    os.chmod(str(config), 0o600)
    out = __import__("io").StringIO()
    assert pamsignal.main(["--config", str(config), "test-alert"], out) == 1
    assert out.getvalue().splitlines() == [
        "good (slack): delivered",
        "bad (discord): NOT delivered: HTTP 403: nope (check the channel's "
        "URL and credentials; alerts wait in the spool until it is fixed)"]
    sample = receiver.requests[0].json["blocks"][0]["text"]["text"]
    assert "alice" in sample and "test" in sample
    out = __import__("io").StringIO()
    assert pamsignal.main(["--config", str(config), "test-alert",
                           "--channel", "good"], out) == 0
    assert out.getvalue() == "good (slack): delivered\n"
    assert pamsignal.main(["--config", str(config), "test-alert",
                           "--channel", "nope"], out) == 2
    assert "no channel 'nope'; configured: good, bad" in \
        capsys.readouterr().err
    json.dumps(receiver.requests[0].json)  # the sample is plain JSON


def test_a_spool_the_disk_refuses_keeps_alerts_in_memory(receiver, tmp_path,
                                                         capsys):
    sink = sink_for("[channel:h]\ntype = webhook\nurl = %s/hook\n"
                    % receiver.url)
    courier, spool = courier_for(sink, tmp_path)
    directory = tmp_path / "spool"
    directory.rmdir()
    directory.write_text("not a directory any more")  # ENOTDIR on write
    assert spool.put(login("kept"))
    spool.flush()
    assert "keeping alerts in memory" in capsys.readouterr().err
    courier.start()
    try:
        assert wait_for(lambda: courier.delivered == 1, timeout=20)
        directory.unlink()
        directory.mkdir()
        assert spool.put(login("on-disk"))
        spool.flush()
        assert wait_for(lambda: courier.delivered == 2, timeout=20)
    finally:
        courier.stop()
    assert [r.json["user"]["name"] for r in receiver.requests] == [
        "kept", "on-disk"]
    assert "is writable again" in capsys.readouterr().err


def spooled_agent(tmp_path, text, alerts):
    """An Agent (not running) configured with `text` after its state_dir,
    and `alerts` already in its one channel's spool."""
    config = pamsignal.parse_config("[pamsignal]\nstate_dir = %s\n%s"
                                    % (tmp_path / "state", text))
    channels = pamsignal.build_channels(config)
    (channel,) = channels
    channel.spool.open()
    for alert in alerts:
        channel.spool.put(alert)
    channel.spool.flush()
    return pamsignal.Agent(config, channels), channel


def test_metrics_show_each_spool(receiver, tmp_path):
    agent, _ = spooled_agent(tmp_path, "[channel:hook]\ntype = webhook\n"
                             "url = %s/hook\n" % receiver.url, [login()])
    text = pamsignal.render_metrics(agent.metric_samples(2e9))
    metrics = pamsignal.parse_metrics(text)
    assert metrics["pamsignal_spool_alerts"] == [({"channel": "hook"}, 1.0)]
    assert metrics["pamsignal_alerts_sent_total"] == [
        ({"channel": "hook"}, 0.0)]
    assert "# TYPE pamsignal_spool_oldest_age_seconds gauge" in text
    report = pamsignal.health_report(metrics, 2e9 + 1, alive=lambda pid: True)
    assert report["channels"]["hook"]["waiting"] == 1
    shown = pamsignal.render_status(report, "/x.prom")
    assert "hook 0 sent 0 failed, 1 waiting (oldest" in shown


def test_redirects_are_not_followed(receiver):
    with HttpReceiver() as elsewhere:
        receiver.script(receivers.Respond(302, headers={
            "Location": elsewhere.url + "/stolen"}))
        sink = sink_for("[channel:g]\ntype = gotify\nurl = %s\n"
                        "token = GOTIFYKEY\n" % receiver.url)
        with pytest.raises(pamsignal.DeliveryError) as raised:
            sink.send(login())
        assert elsewhere.requests == []
    assert not raised.value.permanent
    assert "the service moved to 127.0.0.1" in str(raised.value)
    assert "GOTIFYKEY" not in str(raised.value)


def test_an_interim_answer_before_the_final_one_is_skipped(receiver):
    """103 Early Hints, then 200: delivered (http.client skips only 100)."""
    receiver.script(receivers.Interim(200, b"ok"))
    sink = sink_for("[channel:h]\ntype = webhook\nurl = %s/hook\n"
                    % receiver.url)
    sink.send(login())
    assert len(receiver.requests) == 1


TOKEN = "123456789:AAHsecretSECRETsecretSECRETsecret123"


@pytest.mark.parametrize("echo", [
    lambda path: "x" * 150 + "Cannot POST " + path,  # cut inside the token
    lambda path: "Cannot POST " + urllib.parse.quote(path, safe="/"),
    lambda path: "bad token " + path.split(":")[1],
], ids=["cut-at-200", "percent-encoded", "secret-part-alone"])
def test_a_token_the_service_echoes_is_never_shown(receiver, echo):
    """However the service echoes the token (cut at 200 characters,
    percent-encoded, JSON-escaped, its secret part alone), the error, and
    so the log, status and audit log, never holds any of it."""
    receiver.script(receivers.Dynamic(lambda request: receivers.Respond(
        404, echo(request.path))))
    sink = sink_for("[channel:t]\ntype = telegram\nbot_token = %s\n"
                    "chat_id = 5\napi_url = %s\n" % (TOKEN, receiver.url))
    with pytest.raises(pamsignal.DeliveryError) as raised:
        sink.send(login())
    shown = str(raised.value)
    assert "***" in shown
    for piece in ("AAHsecret", "secret123", "SECRETsecret"):
        assert piece not in shown


@pytest.mark.parametrize("status", [429, 400, 200])
def test_a_deeply_nested_answer_is_just_not_json(receiver, tmp_path, status):
    """"[[[[..." makes json.loads raise RecursionError: the answer is then
    judged as one that is not JSON, never as a bug that drops the alert,
    and test-alert says what happened instead of crashing."""
    receiver.default = receivers.Respond(status, b"[" * 5000)
    for kind, options in (("telegram", "bot_token = 1:T\nchat_id = 5\n"),
                          ("whatsapp", "token = T\nphone_number_id = 1\n"
                           "recipients = 4915112345678\n")):
        done = run_test_alert(tmp_path, "[channel:deep]\ntype = %s\n%s"
                              "api_url = %s\ntimeout = 3s\n"
                              % (kind, options, receiver.url), "deep JSON")
        assert "Traceback" not in done.stderr.decode(), done.stderr
        assert done.stdout.decode().startswith("deep (%s): " % kind)
        assert done.returncode == (0 if status == 200 else 1)


def test_a_url_echoed_json_escaped_is_never_shown(receiver):
    """A secret URL echoed in JSON the way PHP writes it (\\/ for /)."""
    receiver.script(receivers.Dynamic(lambda request: receivers.Respond(
        400, json.dumps({"url": receiver.url + request.path}).replace(
            "/", "\\/"))))
    sink = sink_for("[channel:h]\ntype = webhook\nurl = %s/hook/S3CRETPATH"
                    "\n" % receiver.url)
    with pytest.raises(pamsignal.DeliveryError) as raised:
        sink.send(login())
    assert "S3CRETPATH" not in str(raised.value)
    assert "***" in str(raised.value)


class Broken(pamsignal.Sink):
    """A sink with a bug for one alert: it raises something unexpected."""

    def __init__(self):
        pamsignal.Sink.__init__(self, "broken")
        self.sent = []

    def send(self, event, delay_s=0):
        if event.user == "poison":
            raise KeyError("a bug")
        self.sent.append(event.user)


def test_an_alert_that_always_breaks_its_sink_is_set_aside(tmp_path):
    courier, spool = courier_for(Broken(), tmp_path)
    spool.put(login("poison"))
    spool.put(login("next"))
    spool.flush()
    courier.stopping.wait = lambda seconds: None  # no backoff sleeps here
    for _ in range(pamsignal.MAX_UNEXPECTED_FAILURES + 1):
        taken = spool.take(0)
        if taken is None:
            break
        courier.deliver_one(*taken)
    assert courier.sink.sent == ["next"]
    _, notice = spool.take(0)  # once delivery works, the loss is told
    assert (notice.action, notice.detail) == (
        "alerts_dropped", "1 refused (1 login_success)")
    assert notice.users_tried == ("poison",)


def test_metrics_files_never_follow_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.chmod(str(victim), 0o600)
    target = tmp_path / "collector" / "pamsignal.prom"
    target.parent.mkdir()
    os.symlink(str(victim), str(target) + ".tmp")
    pamsignal.replace_file(str(target), "# metrics\n", mode=0o644)
    assert victim.read_text() == "precious"
    assert oct(os.stat(str(victim)).st_mode & 0o777) == "0o600"
    assert target.read_text() == "# metrics\n"
    assert sorted(os.listdir(str(target.parent))) == [
        "pamsignal.prom", "pamsignal.prom.tmp"]


def test_a_spool_that_cannot_be_opened_keeps_its_channel_degraded(
        receiver, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "spool").write_text("a file where the spools should be")
    config = pamsignal.parse_config(
        "[pamsignal]\nstate_dir = %s\n[channel:hook]\ntype = webhook\n"
        "url = %s/hook\n" % (state, receiver.url))
    agent = pamsignal.Agent(config, pamsignal.build_channels(config))
    agent.open_channels()
    try:
        for _ in range(3):
            agent.check_channels()
        assert "channel:hook" in agent.health.impaired
        assert "Not a directory" in agent.health.impaired["channel:hook"]
    finally:
        agent.close_channels()


def test_delivery_counts_survive_a_reload(receiver, tmp_path):
    config = pamsignal.parse_config(
        "[pamsignal]\nstate_dir = %s\n[channel:hook]\ntype = webhook\n"
        "url = %s/hook\n" % (tmp_path / "state", receiver.url))
    agent = pamsignal.Agent(config, pamsignal.build_channels(config))
    agent.open_channels()
    (channel,) = agent.pipeline.channels
    channel.spool.put(login())
    channel.spool.flush()
    assert wait_for(lambda: agent.channels.couriers[0].delivered == 1,
                    timeout=20)
    agent._apply(config, pamsignal.build_channels(config))
    try:
        metrics = pamsignal.parse_metrics(pamsignal.render_metrics(
            agent.metric_samples(2e9)))
        assert metrics["pamsignal_alerts_sent_total"] == [
            ({"channel": "hook"}, 1.0)]
    finally:
        agent.close_channels()


def test_metrics_and_status_say_which_alerts_a_spool_dropped(receiver,
                                                            tmp_path):
    repeats = [pamsignal.Event(
        action="sudo_command", user="mallory", target_user="root",
        command_line="/bin/true", service="sudo", repeat=n + 1,
        timestamp_us=1795780000000000 + n) for n in range(3)]
    agent, channel = spooled_agent(
        tmp_path, "spool_max_alerts = 1\n[channel:hook]\ntype = webhook\n"
        "url = %s/hook\n" % receiver.url, [login("root")] + repeats)
    metrics = pamsignal.parse_metrics(pamsignal.render_metrics(
        agent.metric_samples(2e9)))
    assert metrics["pamsignal_alerts_dropped_total"] == [
        ({"channel": "hook", "action": "sudo_command"}, 3.0)]
    report = pamsignal.health_report(metrics, 2e9 + 1,
                                     alive=lambda pid: True)
    assert report["channels"]["hook"]["dropped"] == {"sudo_command": 3}
    assert report["channels"]["hook"]["dropped_users"] == ["mallory"]
    shown = pamsignal.render_status(report, "/x.prom")
    assert "1 waiting" in shown
    assert "3 dropped (3 sudo_command; users: mallory)" in shown
    # The root login was kept.
    assert channel.spool.take(0)[1].user == "root"


# ------------------------------------------------ one deadline per request


def run_test_alert(tmp_path, channel_text, what):
    """`pamsignal.py test-alert` run as an admin runs it, with `channel_text`;
    fails the test if it is still waiting after 30 s (the channels' 3 s
    timeout and a wide margin)."""
    config = tmp_path / "pamsignal.conf"
    config.write_text("[pamsignal]\nstate_dir = %s\n%s"
                      % (tmp_path / "state", channel_text))
    os.chmod(str(config), 0o600)
    try:
        return subprocess.run(
            [sys.executable, pamsignal.__file__, "--config", str(config),
             "test-alert"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("test-alert still waiting on %s after 30 s with "
                    "timeout = 3s" % what)


def test_test_alert_gives_up_on_a_dripping_receiver(receiver, tmp_path):
    """The receiver answers a byte a second for a minute; with timeout =
    3s, test-alert must have finished (well before the 60 s) and said the
    request timed out."""
    receiver.script([receivers.Drip(60)])
    done = run_test_alert(
        tmp_path, "[channel:slow]\ntype = webhook\nurl = %s/hook\n"
        "timeout = 3s\n" % receiver.url, "a dripping receiver")
    assert done.returncode == 1, done.stderr
    assert done.stdout.decode() == (
        "slow (webhook): NOT delivered: cannot reach 127.0.0.1: timed out "
        "(no complete answer within the 3 s timeout)\n")
    assert len(receiver.requests) == 1


def test_a_request_past_its_deadline_fails_and_degrades_the_channel(
        receiver, tmp_path):
    """In `run`: a dripping receiver counts as a failure and its channel
    as degraded, as soon as a request runs long."""
    receiver.script([receivers.Drip(60)] * 3)
    agent, channel = spooled_agent(
        tmp_path, "[channel:slow]\ntype = webhook\nurl = %s/hook\n"
        "timeout = 60s\n" % receiver.url, [login()])
    agent.open_channels()
    try:
        # A request in flight longer than SLOW_REQUEST_S: degraded already.
        assert wait_for(lambda: "slow" in agent.failing_channels(),
                        timeout=40)
        assert "waiting" in agent.failing_channels()["slow"]
        agent.check_channels()
        metrics = pamsignal.parse_metrics(pamsignal.render_metrics(
            agent.metric_samples(2e9)))
        assert ({"component": "channel:slow"}, 1.0) in metrics[
            "pamsignal_degraded"]
    finally:
        for courier in agent.channels.couriers:
            courier.stop(0)
    receiver.stop()


def test_an_smtp_server_dripping_its_greeting_times_out(tmp_path):
    """The same for e-mail: a greeting a byte a second for a minute."""
    with SmtpReceiver(drip_greeting=60) as mx:
        done = run_test_alert(
            tmp_path, "[channel:mail]\ntype = email\nhost = 127.0.0.1\n"
            "port = %d\nsecurity = none\nsender = p@example.com\n"
            "recipients = a@example.com\ntimeout = 3s\n" % mx.port,
            "a dripping SMTP server")
    assert done.returncode == 1, done.stderr
    assert done.stdout.decode() == (
        "mail (email): NOT delivered: cannot reach 127.0.0.1: timed out "
        "(no complete answer within the 3 s timeout)\n")
