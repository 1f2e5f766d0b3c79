"""The channels admins page themselves with, against local receivers that
check each request as the real service does (tests/receivers.py
WhatsAppAPI, PagerDutyAPI): WhatsApp Cloud API, PagerDuty Events API v2,
and the webhook's extra headers and client certificate (mutual TLS).
Nothing is mocked: every request crosses a real socket, HTTPS ones are
verified against the test CA."""
import io
import os
import signal

import pytest

import realsys
import receivers
from receivers import HttpReceiver, PagerDutyAPI, WhatsAppAPI
from support import pamsignal, wait_for
from test_channels import HOSTILE_NAMES

TOKEN = "EAAGm0PX4ZCpsBAtest-token"
PHONE_ID = "106540352242922"
ROUTING_KEY = "R0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return receivers.make_cert(str(tmp_path_factory.mktemp("certs")))


def event(action="login_success", user="alice", source_ip="203.0.113.5",
          at_s=1795780000, **fields):
    values = dict(action=action, user=user, source_ip=source_ip,
                  source_port=51234, service="sshd", auth_method="password",
                  hostname="web1", timestamp_us=at_s * 1000000,
                  message="Accepted password for %s from %s port 51234 "
                  "ssh2" % (user, source_ip))
    values.update(fields)
    return pamsignal.Event(**values)


def sink_for(text):
    (configured,) = pamsignal.parse_config(text).channels
    return pamsignal.CHANNEL_TYPES[configured.type](configured.name,
                                                    configured.options)


def whatsapp(url, recipients="4915112345678, 15551234567", token=TOKEN,
             extra=""):
    return sink_for("[channel:wa]\ntype = whatsapp\ntoken = %s\n"
                    "phone_number_id = %s\nrecipients = %s\napi_url = %s\n%s"
                    % (token, PHONE_ID, recipients, url, extra))


def pagerduty(url, key=ROUTING_KEY, extra=""):
    return sink_for("[channel:pd]\ntype = pagerduty\nrouting_key = %s\n"
                    "api_url = %s/v2/enqueue\n%s" % (key, url, extra))


def courier_for(sink, tmp_path):
    spool = pamsignal.Spool(str(tmp_path / "spool"), 100, 86400)
    spool.open()
    return pamsignal.Courier(sink, spool), spool


def deliver_through_spool(sink, tmp_path, events, delivered):
    """Put `events` in a real spool and run the courier until it has
    delivered `delivered` alerts."""
    courier, spool = courier_for(sink, tmp_path)
    for each in events:
        spool.put(each)
    spool.flush()
    courier.start()
    try:
        assert wait_for(lambda: courier.delivered == delivered, timeout=30)
    finally:
        courier.stop()
    return courier, spool


# ------------------------------------------------------------------ WhatsApp


def test_whatsapp_sends_one_text_to_each_recipient():
    api = WhatsAppAPI(TOKEN, PHONE_ID)
    with HttpReceiver(default=api) as rx:
        whatsapp(rx.url).send(event())
        first, second = rx.wait_for(2)
    assert api.refusals == []
    assert first.path == "/v23.0/%s/messages" % PHONE_ID
    assert [r.json["to"] for r in (first, second)] == ["4915112345678",
                                                      "15551234567"]
    body = first.json["text"]["body"]
    assert body.splitlines()[0] == "Login: alice on web1"
    assert "203.0.113.5" in body
    assert first.json["text"]["preview_url"] is False


def test_whatsapp_api_version_and_template_are_the_admins():
    api = WhatsAppAPI(TOKEN, PHONE_ID)
    with HttpReceiver(default=api) as rx:
        whatsapp(rx.url, "15551234567", extra="api_version = v24.0\n"
                 "template = {user} from {source}\n").send(event())
        (request,) = rx.wait_for(1)
    assert api.refusals == []
    assert request.path.startswith("/v24.0/")
    assert request.json["text"]["body"] == "alice from 203.0.113.5:51234"


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_whatsapp_takes_hostile_names_within_its_limit(name):
    api = WhatsAppAPI(TOKEN, PHONE_ID)
    with HttpReceiver(default=api) as rx:
        whatsapp(rx.url, "15551234567").send(event(user=name))
        (request,) = rx.wait_for(1)
    assert api.refusals == []
    body = request.json["text"]["body"]
    assert len(body) <= WhatsAppAPI.TEXT_LIMIT
    # A line break in a name cannot start a line of its own.
    assert "\nFailed: fake" not in body and "\nline2" not in body


def test_whatsapp_retries_only_the_recipients_that_missed_it():
    api = WhatsAppAPI(TOKEN, PHONE_ID)
    with HttpReceiver(default=api) as rx:
        rx.script([api, receivers.whatsapp_rate_limited()])
        sink = whatsapp(rx.url)
        with pytest.raises(pamsignal.DeliveryError) as raised:
            sink.send(event())
        assert not raised.value.permanent
        assert "rate limited" in str(raised.value)
        assert "130429" in str(raised.value)
        sink.send(event())
        requests = rx.wait_for(3)
    assert [r.json["to"] for r in requests] == [
        "4915112345678", "15551234567", "15551234567"]
    assert len(api.accepted) == 2


def test_whatsapp_rate_limit_waits_in_the_spool_then_delivers(tmp_path):
    api = WhatsAppAPI(TOKEN, PHONE_ID)
    with HttpReceiver(default=api) as rx:
        rx.script([receivers.whatsapp_rate_limited()])
        courier, spool = deliver_through_spool(
            whatsapp(rx.url, "15551234567"), tmp_path, [event()], 1)
    assert courier.failed == 1 and spool.depth() == 0
    assert len(api.accepted) == 1


@pytest.mark.parametrize("status, code, permanent, retry_after", [
    (400, 130429, False, None), (400, 131056, False, None),
    (429, 4, False, 7.0), (500, 1, False, None), (503, 2, False, None),
    (400, 100, True, None), (400, 131030, True, None),
    (401, 190, False, None), (403, 10, False, None)])
def test_whatsapp_answers_are_judged_by_their_graph_code(
        status, code, permanent, retry_after):
    failure = pamsignal.graph_api_failure(
        status, {"Retry-After": "7"} if status == 429 else {},
        b'{"error": {"message": "(#%d) x", "type": "OAuthException", '
        b'"code": %d, "fbtrace_id": "Az"}}' % (code, code))
    assert failure.permanent is permanent
    assert failure.retry_after == retry_after
    assert "WhatsApp error %d: (#%d) x" % (code, code) in str(failure)


def test_whatsapp_bad_token_keeps_alerts_and_never_shows_the_token():
    api = WhatsAppAPI("the-right-token", PHONE_ID)
    with HttpReceiver(default=api) as rx:
        with pytest.raises(pamsignal.DeliveryError) as raised:
            whatsapp(rx.url, token=TOKEN).send(event())
    assert [why for _, why in api.refusals] == ["token"]
    assert not raised.value.permanent  # waits in the spool for a fix
    assert "WhatsApp error 190" in str(raised.value)
    assert "check the token" in str(raised.value)
    assert TOKEN not in str(raised.value)


def test_whatsapp_refusal_of_a_recipient_is_permanent():
    api = WhatsAppAPI(TOKEN, PHONE_ID, allowed=("4915112345678",))
    with HttpReceiver(default=api) as rx:
        with pytest.raises(pamsignal.DeliveryError) as raised:
            whatsapp(rx.url).send(event())
    assert raised.value.permanent
    assert "131030" in str(raised.value)
    assert "not in allowed list" in str(raised.value)


# ----------------------------------------------------------------- PagerDuty


def test_pagerduty_triggers_with_the_event_as_details():
    api = PagerDutyAPI(ROUTING_KEY)
    with HttpReceiver(default=api) as rx:
        pagerduty(rx.url).send(event("brute_force_detected", user=None,
                                     attempts=12, window_s=600))
        (request,) = rx.wait_for(1)
    assert api.refusals == []
    sent = request.json
    assert sent["event_action"] == "trigger"
    assert sent["routing_key"] == ROUTING_KEY
    payload = sent["payload"]
    assert payload["source"] == "web1"
    assert payload["severity"] == pamsignal.pagerduty_severity(
        event("brute_force_detected"))
    assert payload["class"] == "brute_force_detected"
    assert payload["component"] == "sshd"
    assert payload["timestamp"] == "2026-11-27T11:46:40.000000Z"
    assert payload["custom_details"]["source"]["ip"] == "203.0.113.5"
    assert payload["custom_details"]["pamsignal"]["attempts"] == 12
    assert "203.0.113.5" in payload["summary"]


@pytest.mark.parametrize("severity, expected", [
    (10, "critical"), (9, "critical"), (8, "error"), (7, "error"),
    (6, "warning"), (4, "warning"), (3, "info"), (0, "info")])
def test_pagerduty_severity_follows_the_events(severity, expected):
    assert pamsignal.pagerduty_severity(event(severity=severity)) == expected


def test_pagerduty_repeats_update_one_incident_others_open_their_own():
    api = PagerDutyAPI(ROUTING_KEY)
    with HttpReceiver(default=api) as rx:
        sink = pagerduty(rx.url)
        for each in (event(), event(at_s=1795780600),
                     event(source_ip="198.51.100.9"),
                     event("login_failure", reason="bad_password"),
                     event(hostname="web2")):
            sink.send(each)
        rx.wait_for(5)
    assert api.refusals == []
    keys = [request.json["dedup_key"] for request in rx.requests]
    assert keys[0] == keys[1]  # the same login again: one incident
    assert len(set(keys[1:])) == 4  # another source, action or host
    assert sorted(api.incidents.values()) == [1, 1, 1, 2]
    assert all(len(key) <= 255 for key in keys)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_pagerduty_takes_hostile_names_within_its_limits(name):
    api = PagerDutyAPI(ROUTING_KEY)
    with HttpReceiver(default=api) as rx:
        pagerduty(rx.url).send(event(user=name, source_ip=None))
        (request,) = rx.wait_for(1)
    assert api.refusals == []
    assert len(request.json["payload"]["summary"]) <= 1024
    assert request.json["payload"]["custom_details"]["user"]["name"] == name
    assert name not in request.json["dedup_key"]  # hashed, never raw


def test_pagerduty_429_is_retried_through_the_spool(tmp_path):
    api = PagerDutyAPI(ROUTING_KEY)
    with HttpReceiver(default=api) as rx:
        rx.script([receivers.pagerduty_429()])
        courier, spool = deliver_through_spool(pagerduty(rx.url), tmp_path,
                                               [event()], 1)
        assert len(rx.requests) == 2
    assert courier.failed == 1 and spool.depth() == 0
    assert len(api.accepted) == 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_pagerduty_server_errors_are_retried(status):
    with HttpReceiver() as rx:
        rx.script([receivers.Respond(status, b"upstream")])
        with pytest.raises(pamsignal.DeliveryError) as raised:
            pagerduty(rx.url).send(event())
    assert not raised.value.permanent
    assert "HTTP %d" % status in str(raised.value)


def test_pagerduty_invalid_event_is_dropped_with_its_reason(tmp_path,
                                                            capsys):
    api = PagerDutyAPI(ROUTING_KEY)
    with HttpReceiver(default=api) as rx:
        rx.script([receivers.pagerduty_invalid(
            ["'payload.summary' is missing"])])
        courier, _ = deliver_through_spool(
            pagerduty(rx.url), tmp_path, [event(user="first"),
                                          event(user="second")], 2)
        refused, second, notice = rx.requests
    assert "first" in refused.text and "second" in second.text
    assert notice.json["payload"]["class"] == "alerts_dropped"
    assert "payload.summary" in courier.last_error
    assert "refused the login_success alert" in capsys.readouterr().err


def test_pagerduty_unknown_routing_key_keeps_alerts_waiting():
    api = PagerDutyAPI(ROUTING_KEY)
    with HttpReceiver(default=api) as rx:
        wrong = "X" * 32
        with pytest.raises(pamsignal.DeliveryError) as raised:
            pagerduty(rx.url, key=wrong).send(event())
    assert [why for _, why in api.refusals] == ["routing_key"]
    assert not raised.value.permanent
    assert "Invalid routing key" in str(raised.value)
    assert "check routing_key" in str(raised.value)
    assert wrong not in str(raised.value)


def test_a_routing_key_of_the_wrong_shape_is_a_configuration_error():
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.parse_config("[channel:pd]\ntype = pagerduty\n"
                               "routing_key = short\n", "/etc/p.conf")
    (problem,) = raised.value.problems
    assert problem.key == "routing_key" and problem.line == 3
    assert "32-character" in str(problem) and "short" not in str(problem)


# ---------------------------------------------------------------- TLS, CLI


@pytest.mark.parametrize("kind", ["whatsapp", "pagerduty"])
def test_tls_is_verified_with_the_configured_ca(certs, kind):
    api = WhatsAppAPI(TOKEN, PHONE_ID) if kind == "whatsapp" \
        else PagerDutyAPI(ROUTING_KEY)
    make = whatsapp if kind == "whatsapp" else pagerduty
    with HttpReceiver(tls=certs, default=api) as rx:
        make(rx.localhost_url, extra="ca_file = %s\n"
             % certs.ca_file).send(event())
        assert rx.wait_for(1)[0].tls
        with pytest.raises(pamsignal.DeliveryError) as raised:
            make(rx.localhost_url, extra="ca_file = %s\n"
                 % certs.other_ca_file).send(event())
    assert "TLS certificate not trusted" in str(raised.value)
    assert len(api.accepted) == len(rx.requests) >= 1


def test_test_alert_reaches_each_new_channel(tmp_path, certs):
    whatsapp_api = WhatsAppAPI(TOKEN, PHONE_ID)
    pagerduty_api = PagerDutyAPI(ROUTING_KEY)
    client_cert, client_key = certs.client_cert()
    with HttpReceiver(default=whatsapp_api) as wa, \
            HttpReceiver(default=pagerduty_api) as pd, \
            HttpReceiver(tls=certs.server_context(
                require_client_cert=True)) as hook:
        config = tmp_path / "pamsignal.conf"
        config.write_text(
            "[pamsignal]\nstate_dir = %s\n"
            "[channel:wa]\ntype = whatsapp\ntoken = %s\nphone_number_id = %s"
            "\nrecipients = 15551234567\napi_url = %s\n"
            "[channel:pd]\ntype = pagerduty\nrouting_key = %s\n"
            "api_url = %s/v2/enqueue\n"
            "[channel:hook]\ntype = webhook\nurl = %s/in\nca_file = %s\n"
            "cert_file = %s\nkey_file = %s\nheaders = X-Api-Key: k-123\n"
            % (tmp_path / "state", TOKEN, PHONE_ID, wa.url, ROUTING_KEY,
               pd.url, hook.localhost_url, certs.ca_file, client_cert,
               client_key))
        os.chmod(str(config), 0o600)
        out = io.StringIO()
        assert pamsignal.main(["--config", str(config), "test-alert"],
                              out) == 0
        assert hook.requests[0].headers["X-Api-Key"] == "k-123"
    assert out.getvalue().splitlines() == [
        "wa (whatsapp): delivered", "pd (pagerduty): delivered",
        "hook (webhook): delivered"]
    assert whatsapp_api.refusals == [] and pagerduty_api.refusals == []
    assert "test" in whatsapp_api.accepted[0].json["text"]["body"].lower()


# ------------------------------------------------------------------ webhook


def webhook(url, extra=""):
    return sink_for("[channel:hook]\ntype = webhook\nurl = %s/in\n%s"
                    % (url, extra))


def test_webhook_presents_a_client_certificate_to_a_receiver_requiring_one(
        certs):
    cert_file, key_file = certs.client_cert()
    with HttpReceiver(tls=certs.server_context(
            require_client_cert=True)) as rx:
        with pytest.raises(pamsignal.DeliveryError):
            webhook(rx.localhost_url, "ca_file = %s\n"
                    % certs.ca_file).send(event())
        assert rx.requests == []  # refused in the handshake
        webhook(rx.localhost_url, "ca_file = %s\ncert_file = %s\n"
                "key_file = %s\n" % (certs.ca_file, cert_file,
                                     key_file)).send(event())
        (request,) = rx.wait_for(1)
    assert request.tls and request.json["user"]["name"] == "alice"


def write_config(tmp_path, text, mode=0o600):
    path = tmp_path / "pamsignal.conf"
    path.write_text(text)
    os.chmod(str(path), mode)
    return str(path)


def test_webhook_client_key_readable_by_others_is_refused(tmp_path, certs):
    cert_file, key_file = certs.client_cert()
    exposed = tmp_path / "client.key"
    with open(key_file) as source:
        exposed.write_text(source.read())
    os.chmod(str(exposed), 0o644)
    path = write_config(tmp_path, "[channel:hook]\ntype = webhook\n"
                        "url = https://hook.example.com/in\ncert_file = %s\n"
                        "key_file = %s\n" % (cert_file, exposed))
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(path, environ={}, as_root=False)
    (problem,) = raised.value.problems
    assert problem.key == "key_file"
    assert "other users can read it" in str(problem)
    os.chmod(str(exposed), 0o600)
    assert pamsignal.load_config(path, environ={}, as_root=False)
    alone = write_config(tmp_path, "[channel:hook]\ntype = webhook\n"
                         "url = https://hook.example.com/in\ncert_file = %s\n"
                         % cert_file)
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(alone, environ={}, as_root=False)
    assert "cert_file and key_file go together" in str(raised.value)


def test_webhook_headers_arrive_exactly_with_credentials_resolved(tmp_path):
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "hook-token").write_text("tok-9f8e7d\n")
    with HttpReceiver() as rx:
        path = write_config(
            tmp_path, "[channel:hook]\ntype = webhook\nurl = %s/in\n"
            "secret = whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n"
            "headers = Authorization: Bearer credential:hook-token\n"
            "    X-Team:  ops;a  b\n"
            "    X-Empty-Prefix: credential:hook-token\n"
            % rx.url)
        (configured,) = pamsignal.load_config(path, environ={
            "CREDENTIALS_DIRECTORY": str(credentials)},
            as_root=False).channels
        sink = pamsignal.WebhookSink(configured.name, configured.options)
        sink.send(event())
        (request,) = rx.wait_for(1)
    assert request.headers["Authorization"] == "Bearer tok-9f8e7d"
    assert request.headers.get_all("X-Team") == ["ops;a  b"]
    assert request.headers["X-Empty-Prefix"] == "tok-9f8e7d"
    assert request.headers["webhook-signature"].startswith("v1,")
    assert request.headers["Content-Type"] == "application/json"
    assert "tok-9f8e7d" not in repr(configured)


def test_webhook_header_values_never_show_in_errors():
    with HttpReceiver() as rx:
        rx.script([receivers.Respond(500, b"bad key sk-live-4242")])
        with pytest.raises(pamsignal.DeliveryError) as raised:
            webhook(rx.url, "headers = X-Api-Key: sk-live-4242\n").send(
                event())
    assert "sk-live-4242" not in str(raised.value)
    assert "HTTP 500" in str(raised.value)


@pytest.mark.parametrize("headers, expected", [
    ("X-A: one\rX-Injected: yes", "header X-A: expected a header value "
     "of printable ASCII, without line breaks"),
    ("X-A: caf\u00e9 \u20ac", "header X-A: expected a header value of "
     "printable ASCII"),
    ("webhook-signature: v1,forged", "header webhook-signature is set by "
     "pamsignal itself"),
    ("Content-Type: text/plain", "header Content-Type is set by pamsignal"),
    ("X A: b", "header names of letters"),
    ("X-A", "expected one Name: value a line"),
    ("X-A: 1\n  x-a: 2", "given twice"),
    ("X-A: 1\n  X-B: 2\x0bX-C: 3", "header X-B: expected a header value"),
])
def test_bad_headers_are_refused_with_file_line_and_key(headers, expected):
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.parse_config("[channel:hook]\ntype = webhook\n"
                               "url = https://hook.example.com/in\n"
                               "headers = %s\n" % headers, "/etc/p.conf")
    (problem,) = raised.value.problems
    assert (problem.path, problem.line, problem.key) == (
        "/etc/p.conf", 4, "headers")
    assert expected in str(problem)


def test_a_credential_with_a_line_break_is_refused_as_a_header(tmp_path):
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "hook-token").write_text("tok\r\nX-Injected: yes\n")
    path = write_config(tmp_path, "[channel:hook]\ntype = webhook\n"
                        "url = https://hook.example.com/in\n"
                        "headers = Authorization: Bearer "
                        "credential:hook-token\n", 0o600)
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(path, environ={
            "CREDENTIALS_DIRECTORY": str(credentials)}, as_root=False)
    assert "[channel:hook] headers: credential hook-token: expected a " \
        "header value of printable ASCII, without line breaks" in str(
            raised.value)


def test_inline_header_values_make_the_file_a_secret_one(tmp_path):
    path = write_config(tmp_path, "[channel:hook]\ntype = webhook\n"
                        "url = http://127.0.0.1:9/in\n"
                        "headers = X-Api-Key: sk-1\n", 0o644)
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(path, environ={}, as_root=False)
    assert "holds secrets ([channel:hook] headers)" in str(raised.value)


def test_root_refuses_a_header_credential_others_can_change(tmp_path):
    realsys.require_root()
    credentials = tmp_path / "creds"
    credentials.mkdir()
    token = credentials / "hook-token"
    token.write_text("tok\n")
    os.chmod(str(token), 0o666)
    os.chmod(str(tmp_path), 0o755)
    path = write_config(tmp_path, "[channel:hook]\ntype = webhook\n"
                        "url = https://hook.example.com/in\n"
                        "headers = Authorization: Bearer "
                        "credential:hook-token\n")
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(path, environ={
            "CREDENTIALS_DIRECTORY": str(credentials)}, as_root=True)
    (problem,) = raised.value.problems
    assert (problem.section, problem.key) == ("channel:hook", "headers")
    assert problem.message.startswith("%s is writable by group and "
                                      "others" % token)
    os.chmod(str(token), 0o600)
    (configured,) = pamsignal.load_config(path, environ={
        "CREDENTIALS_DIRECTORY": str(credentials)}, as_root=True).channels
    assert configured.options["headers"][0].secret.value == "tok"


# ---------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_real_logins_page_once_per_incident_and_reach_whatsapp(
        journald, sshd, tmp_path, make_user):
    """Real ssh logins -> journald -> `pamsignal.py run` -> PagerDuty and
    WhatsApp receivers: both logins of one user from one address reach
    both, and PagerDuty sees them as one incident."""
    from conftest import configured_agent
    pagerduty_api = PagerDutyAPI(ROUTING_KEY)
    whatsapp_api = WhatsAppAPI(TOKEN, PHONE_ID)
    with HttpReceiver(default=pagerduty_api) as pd, \
            HttpReceiver(default=whatsapp_api) as wa:
        agent = configured_agent(str(tmp_path / "agent"), (
            "[channel:pd]\ntype = pagerduty\nrouting_key = %s\n"
            "api_url = %s/v2/enqueue\nevents = login_success\n"
            "cooldown = off\nrepeats = off\n"
            "[channel:wa]\ntype = whatsapp\ntoken = %s\n"
            "phone_number_id = %s\nrecipients = 15551234567\n"
            "api_url = %s\nevents = login_success\ncooldown = off\n"
            "repeats = off\n" % (ROUTING_KEY, pd.url, TOKEN, PHONE_ID,
                                 wa.url)))
        agent.start()
        try:
            user, password = make_user()
            for _ in range(2):
                assert realsys.ssh_password(user, password).returncode == 0

            def paged():
                return [r.json for r in pagerduty_api.accepted
                        if r.json["payload"]["custom_details"].get(
                            "user", {}).get("name") == user]

            def texted():
                return [r.json for r in whatsapp_api.accepted
                        if user in r.json["text"]["body"]]

            assert wait_for(lambda: len(paged()) == 2 and
                            len(texted()) == 2, timeout=60), \
                agent.stderr_text()
        finally:
            agent.stop(signal.SIGTERM)
    first, second = paged()
    assert first["dedup_key"] == second["dedup_key"]
    assert first["payload"]["custom_details"]["source"]["ip"] == "127.0.0.1"
    assert pagerduty_api.refusals == [] and whatsapp_api.refusals == []
