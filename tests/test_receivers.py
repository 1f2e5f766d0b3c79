"""Self-test of tests/receivers.py, driven by the real client libraries
(urllib.request, http.client, ssl, smtplib)."""

import email.message
import errno
import http.client
import json
import os
import shutil
import smtplib
import socket
import ssl
import sys
import urllib.error
import urllib.request

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from receivers import (  # noqa: E402
    Drip,
    Drop,
    Dynamic,
    Hang,
    HttpReceiver,
    PagerDutyAPI,
    Reset,
    Respond,
    Slow,
    SmtpReceiver,
    Truncated,
    WhatsAppAPI,
    discord_429,
    discord_ok,
    gotify_ok,
    make_cert,
    ntfy_ok,
    slack_ok,
    teams_ok,
    telegram_429,
    telegram_ok,
    whatsapp_rate_limited,
)

#: A certificate that does not verify: its own class from Python 3.7, its
#: base class on 3.6.
CERT_REJECTED = getattr(ssl, "SSLCertVerificationError", ssl.SSLError)

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="the openssl command is missing")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is missing")
    return make_cert(str(tmp_path_factory.mktemp("certs")))


@pytest.fixture
def rx():
    with HttpReceiver() as receiver:
        yield receiver


def post(url, payload=None, headers=None, timeout=10, context=None,
         method="POST"):
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    return urllib.request.urlopen(request, timeout=timeout, context=context)


def http_error(url, payload=None):
    with pytest.raises(urllib.error.HTTPError) as info:
        post(url, payload)
    return info.value


# ------------------------------------------------------------------- HTTP


def test_records_each_request_in_full(rx):
    with post(rx.url + "/bot123:ABC/sendMessage?wait=true&x=",
              {"chat_id": 42, "text": "héllo"},
              {"X-Gotify-Key": "tok"}) as reply:
        assert reply.status == 200
        assert reply.read() == b"ok"
    (got,) = rx.wait_for(1)
    assert got.method == "POST"
    assert got.path == "/bot123:ABC/sendMessage"
    assert got.query == {"wait": "true", "x": ""}
    assert got.headers["x-gotify-key"] == "tok"
    assert got.headers.get("CONTENT-TYPE") == "application/json"
    assert "x-GOTIFY-key" in got.headers
    assert got.json == {"chat_id": 42, "text": "héllo"}
    assert got.body == json.dumps(got.json).encode()
    assert got.tls is False
    assert got.received_at > 0
    assert rx.requests == [got]


def test_non_json_and_chunked_bodies(rx):
    conn = http.client.HTTPConnection(rx.host, rx.port, timeout=10)
    conn.request("POST", "/topic", body=iter([b"line 1\n", b"line 2"]),
                 headers={"Title": "t"}, encode_chunked=True)
    assert conn.getresponse().read() == b"ok"
    conn.request("GET", "/again")        # same connection, kept alive
    assert conn.getresponse().status == 200
    conn.close()
    chunked, again = rx.wait_for(2)
    assert chunked.body == b"line 1\nline 2"
    assert chunked.json is None
    assert chunked.text == "line 1\nline 2"
    assert again.method == "GET" and again.body == b""


def test_script_is_fifo_then_default(rx):
    rx.script([Respond(429, headers={"Retry-After": "2"},
                       body=b'{"retry_after": 1.5}'),
               Respond(500),
               Respond(400, body=b"invalid_payload")])
    assert rx.pending == 3
    first = http_error(rx.url, {"n": 1})
    assert first.code == 429
    assert first.headers["Retry-After"] == "2"
    assert json.loads(first.read()) == {"retry_after": 1.5}
    assert http_error(rx.url, {"n": 2}).code == 500
    third = http_error(rx.url, {"n": 3})
    assert (third.code, third.read()) == (400, b"invalid_payload")
    with post(rx.url, {"n": 4}) as reply:
        assert reply.read() == b"ok"
    rx.default = Respond(503, body="down for maintenance")
    assert http_error(rx.url, {"n": 5}).code == 503
    got = rx.wait_for(5)
    assert [r.json["n"] for r in got] == [1, 2, 3, 4, 5]
    assert [r.response.status for r in got] == [429, 500, 400, 200, 503]
    assert rx.pending == 0


def test_dict_bodies_are_sent_as_json(rx):
    rx.script(Respond(201, {"id": 7}))
    with post(rx.url, {}) as reply:
        assert reply.status == 201
        assert reply.headers["Content-Type"] == "application/json"
        assert json.load(reply) == {"id": 7}


def test_dynamic_answers_from_the_request(rx):
    rx.default = Dynamic(lambda req: Respond(
        200 if req.headers.get("Authorization") == "Bearer good" else 401))
    with post(rx.url, {}, {"Authorization": "Bearer good"}) as reply:
        assert reply.status == 200
    assert http_error(rx.url, {}).code == 401


def test_telegram_shapes(rx):
    rx.script([telegram_429(3), telegram_ok(message_id=9)])
    limited = http_error(rx.url + "/botT/sendMessage",
                         {"chat_id": 5, "text": "a"})
    assert limited.code == 429
    assert json.loads(limited.read()) == {
        "ok": False, "error_code": 429,
        "description": "Too Many Requests: retry after 3",
        "parameters": {"retry_after": 3}}
    with post(rx.url + "/botT/sendMessage", {"chat_id": 5, "text": "a"}) \
            as reply:
        answer = json.load(reply)
    assert answer["ok"] is True
    assert answer["result"]["message_id"] == 9
    assert answer["result"]["chat"]["id"] == 5


def test_discord_shapes(rx):
    rx.script([discord_429(1.5), discord_ok(), discord_ok()])
    limited = http_error(rx.url + "/api/v10/webhooks/1/tok?wait=true",
                         {"content": "x"})
    assert limited.code == 429
    assert limited.headers["Retry-After"] == "2"
    assert limited.headers["X-RateLimit-Reset-After"] == "1.500"
    assert json.loads(limited.read()) == {
        "message": "You are being rate limited.", "retry_after": 1.5,
        "global": False}
    with post(rx.url + "/api/v10/webhooks/1/tok", {"content": "x"}) as r:
        assert (r.status, r.read()) == (204, b"")
    with post(rx.url + "/api/v10/webhooks/1/tok?wait=true",
              {"content": "x"}) as r:
        assert r.status == 200
        assert json.load(r)["content"] == "x"


def test_slack_teams_ntfy_gotify_shapes(rx):
    rx.script([slack_ok(), teams_ok(), ntfy_ok(), gotify_ok()])
    with post(rx.url + "/services/T/B/X", {"text": "x"}) as r:
        assert (r.status, r.read()) == (200, b"ok")
    with post(rx.url + "/workflows/x", {"type": "message"}) as r:
        assert (r.status, r.read()) == (202, b"")
    with post(rx.url + "/", {"topic": "alerts", "message": "m"}) as r:
        event = json.load(r)
    assert (event["topic"], event["message"]) == ("alerts", "m")
    assert event["event"] == "message"
    with post(rx.url + "/message", {"title": "t", "message": "m",
                                    "priority": 8}) as r:
        stored = json.load(r)
    assert (stored["title"], stored["priority"]) == ("t", 8)


def test_hang_makes_the_client_time_out(rx):
    rx.script(Hang(60))
    with pytest.raises((socket.timeout, urllib.error.URLError)):
        post(rx.url, {"n": 1}, timeout=0.5)
    (got,) = rx.wait_for(1)
    assert isinstance(got.response, Hang)
    # the default answers the next request at once, hang or no hang
    with post(rx.url, {"n": 2}) as reply:
        assert reply.status == 200
    rx.stop()           # does not wait for the 60 s


def test_drip_outlasts_a_per_read_timeout(rx):
    """A byte every 0.05 s for 3 s: each read of a client with a 1 s
    timeout gets its byte in time, so the whole answer arrives."""
    drip = Drip(seconds=3, interval=0.05, status=201, body=b"late")
    assert len(drip.answer()) == 60
    rx.script(drip)
    with post(rx.url, {"n": 1}, timeout=1) as reply:
        assert (reply.status, reply.read()) == (201, b"late")
        assert reply.headers["X-Drip"].startswith("a")
    assert rx.wait_for(1)[0].json == {"n": 1}


def test_drip_is_cut_by_stop(rx):
    rx.script(Drip(seconds=60, interval=1.0))
    connection = http.client.HTTPConnection("127.0.0.1", rx.port,
                                            timeout=30)
    connection.request("POST", "/", body=b"{}")
    rx.wait_for(1)
    rx.stop()  # does not wait for the 60 s
    with pytest.raises((http.client.HTTPException, OSError)):
        connection.getresponse().read()


def test_slow_answers_late(rx):
    rx.script(Slow(0.2, status=201, body=b"late"))
    with post(rx.url, {}, timeout=30) as reply:
        assert (reply.status, reply.read()) == (201, b"late")


def test_drop_closes_without_an_answer(rx):
    rx.script(Drop())
    with pytest.raises(http.client.RemoteDisconnected):
        post(rx.url, {"n": 1})
    assert rx.wait_for(1)[0].json == {"n": 1}


def test_reset_closes_with_rst(rx):
    rx.script(Reset())
    with pytest.raises(ConnectionResetError) as info:
        post(rx.url, {"n": 1})
    assert not isinstance(info.value, http.client.RemoteDisconnected)
    assert info.value.errno == errno.ECONNRESET
    assert rx.wait_for(1)[0].json == {"n": 1}


def test_truncated_answer(rx):
    rx.script(Truncated(200, b'{"ok": true}', cut=4))
    with post(rx.url, {}) as reply:
        with pytest.raises(http.client.IncompleteRead) as info:
            reply.read()
    assert info.value.partial == b'{"ok'


def test_down_refuses_then_up_serves_on_the_same_port(rx):
    port = rx.port
    with post(rx.url, {"n": 1}) as reply:
        assert reply.status == 200
    rx.down()
    assert not rx.is_up
    with pytest.raises(urllib.error.URLError) as info:
        post(rx.url, {"lost": True}, timeout=5)
    assert isinstance(info.value.reason, ConnectionRefusedError)
    rx.down()                                     # idempotent
    rx.up()
    assert rx.is_up and rx.port == port
    with post(rx.url, {"n": 2}) as reply:
        assert reply.status == 200
    assert [r.json for r in rx.wait_for(2)] == [{"n": 1}, {"n": 2}]


def test_down_releases_a_hanging_request_and_cuts_keepalive(rx):
    conn = http.client.HTTPConnection(rx.host, rx.port, timeout=10)
    conn.request("GET", "/keep")
    assert conn.getresponse().read() == b"ok"
    rx.script(Hang(60))
    hung = http.client.HTTPConnection(rx.host, rx.port, timeout=10)
    hung.request("POST", "/hang", body=b"x")
    rx.wait_for(2)
    rx.down()
    with pytest.raises((http.client.HTTPException, OSError)):
        hung.getresponse()
    with pytest.raises((http.client.HTTPException, OSError)):
        conn.request("GET", "/keep")
        conn.getresponse()
    rx.up()
    assert len(rx.requests) == 2


def test_wait_for_says_what_arrived(rx):
    with post(rx.url + "/only", {}):
        pass
    with pytest.raises(AssertionError) as info:
        rx.wait_for(2, timeout=0.2)
    assert "got 1" in str(info.value) and "/only" in str(info.value)


def test_restartable_and_context_manager():
    receiver = HttpReceiver()
    receiver.start()
    with post(receiver.url, {}) as reply:
        assert reply.status == 200
    receiver.stop()
    receiver.stop()
    with pytest.raises(urllib.error.URLError):
        post(receiver.url, {}, timeout=5)


# ------------------------------------------------------------------ HTTPS


def test_https_verified_with_the_configured_ca(certs):
    with HttpReceiver(tls=certs) as rx:
        assert rx.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=certs.ca_file)
        context.verify_flags |= getattr(ssl, "VERIFY_X509_STRICT", 0)
        for url in (rx.url, rx.localhost_url):
            with post(url + "/x", {"a": 1}, context=context) as reply:
                assert reply.read() == b"ok"
        got = rx.wait_for(2)
        assert all(r.tls for r in got)
        assert rx.errors == []


def test_https_rejected_by_an_unrelated_ca(certs):
    with HttpReceiver(tls=certs) as rx:
        for context in (ssl.create_default_context(
                            cafile=certs.other_ca_file),
                        ssl.create_default_context()):
            with pytest.raises(urllib.error.URLError) as info:
                post(rx.url, {}, context=context)
            assert isinstance(info.value.reason,
                              CERT_REJECTED)
        assert len(rx.wait_for_tls_failures(2)) == 2
        assert rx.requests == []


def test_certificate_signed_by_another_ca_is_rejected(certs):
    with HttpReceiver(tls=certs.rogue) as rx:
        with pytest.raises(urllib.error.URLError) as info:
            post(rx.url, {}, context=certs.client_context())
        assert isinstance(info.value.reason, CERT_REJECTED)
        with post(rx.url, {}, context=certs.rogue.client_context()) as r:
            assert r.status == 200


def test_certificate_for_another_name_is_rejected(certs):
    wrong = make_cert(certs.directory, names=("wrong.invalid",))
    assert wrong.ca_file == certs.ca_file
    with HttpReceiver(tls=wrong) as rx:
        # Python 3.6 checks the name itself, after the handshake, and
        # raises CertificateError (from 3.7 an alias of CERT_REJECTED).
        with pytest.raises((urllib.error.URLError,
                            ssl.CertificateError)) as info:
            post(rx.url, {}, context=certs.client_context())
        reason = getattr(info.value, "reason", info.value)
        assert isinstance(reason, (CERT_REJECTED, ssl.CertificateError))
        assert "mismatch" in str(reason) or "doesn't match" in str(reason)


def test_make_cert_is_cached(certs):
    stamp = os.stat(certs.cert_file).st_mtime_ns
    again = make_cert(certs.directory)
    assert again is certs
    assert os.stat(certs.cert_file).st_mtime_ns == stamp


@needs_openssl
def test_make_cert_reuses_files_on_disk(tmp_path):
    first = make_cert(str(tmp_path / "a"))
    import receivers
    receivers._CERT_CACHE.clear()
    second = make_cert(str(tmp_path / "a"))
    assert second is not first
    with open(first.cert_file, "rb") as a, open(second.cert_file, "rb") as b:
        assert a.read() == b.read()


def test_https_down_and_up(certs):
    with HttpReceiver(tls=certs) as rx:
        rx.down()
        with pytest.raises(urllib.error.URLError):
            post(rx.url, {}, context=certs.client_context(), timeout=5)
        rx.up()
        with post(rx.url, {}, context=certs.client_context()) as reply:
            assert reply.status == 200


# ------------------------------------------------------------------- SMTP


def mail(subject="Login alert", body="root logged in\n.dot line\n"):
    msg = email.message.EmailMessage()
    msg["From"] = "pamsignal@host.test"
    msg["To"] = "ops@example.test"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg


def test_smtp_starttls_and_login(certs):
    with SmtpReceiver(tls=certs, user="alert", password="s3cret") as mx:
        with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("starttls")
            assert not client.has_extn("auth")    # not before TLS
            client.starttls(context=certs.client_context())
            client.ehlo()
            assert client.has_extn("auth")
            client.login("alert", "s3cret")
            refused = client.send_message(
                mail(), to_addrs=["ops@example.test", "sec@example.test"])
            assert refused == {}
        (got,) = mx.wait_for(1)
        assert got.mail_from == "pamsignal@host.test"
        assert got.rcpt_to == ["ops@example.test", "sec@example.test"]
        assert got.tls is True and got.auth_user == "alert"
        assert got.message["Subject"] == "Login alert"
        assert got.text == "root logged in\n.dot line\n"
        assert b"\r\n.dot line\r\n" in got.data        # dot-unstuffed
        assert "STARTTLS" in mx.commands
        assert mx.commands[-1] == "QUIT"
        assert not any("s3cret" in c for c in mx.commands)


def test_smtp_auth_login_mechanism(certs):
    with SmtpReceiver(tls=certs, user="u", password="p",
                      mechanisms=("LOGIN",)) as mx:
        with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
            client.starttls(context=certs.client_context())
            client.login("u", "p")
            client.send_message(mail())
        assert mx.wait_for(1)[0].auth_user == "u"
        assert "AUTH LOGIN ..." in mx.commands


def test_smtp_wrong_password_is_535(certs):
    with SmtpReceiver(tls=certs, user="alert", password="s3cret") as mx:
        with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
            client.starttls(context=certs.client_context())
            with pytest.raises(smtplib.SMTPAuthenticationError) as info:
                client.login("alert", "wrong")
            assert info.value.smtp_code == 535
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                client.send_message(mail())
            assert refused.value.smtp_code == 530
        assert ("PLAIN", "alert") in mx.auth_failures
        assert mx.messages == []


def test_smtp_starttls_rejected_by_an_unrelated_ca(certs):
    with SmtpReceiver(tls=certs) as mx:
        client = smtplib.SMTP(mx.host, mx.port, timeout=10)
        try:
            with pytest.raises(CERT_REJECTED):
                client.starttls(
                    context=certs.client_context(certs.other_ca_file))
        finally:
            client.close()


def test_smtps_implicit_tls(certs):
    with SmtpReceiver(tls=certs, implicit_tls=True, user="u",
                      password="p") as mx:
        with smtplib.SMTP_SSL(mx.host, mx.port, timeout=10,
                              context=certs.client_context()) as client:
            assert not client.has_extn("starttls")
            client.login("u", "p")
            client.send_message(mail(subject="über"))
        got = mx.wait_for(1)[0]
        assert got.tls and got.message["Subject"] == "über"
        with pytest.raises(CERT_REJECTED):
            smtplib.SMTP_SSL(mx.host, mx.port, timeout=10,
                             context=ssl.create_default_context(
                                 cafile=certs.other_ca_file))


def test_smtp_plain_without_tls_or_auth():
    with SmtpReceiver() as mx:
        with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
            assert not client.has_extn("starttls")
            client.sendmail("a@x.test", ["b@x.test"],
                            b"Subject: hi\r\n\r\n..leading dot\r\nend\r\n")
        got = mx.wait_for(1)[0]
        assert got.tls is False and got.auth_user is None
        assert got.data == b"Subject: hi\r\n\r\n..leading dot\r\nend\r\n"


def test_smtp_require_tls():
    with SmtpReceiver(require_tls=True) as mx:
        with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                client.send_message(mail())
            assert info.value.smtp_code == 530


def test_smtp_fail_next():
    with SmtpReceiver() as mx:
        mx.fail_next(451)
        mx.fail_next(550, "5.1.1 No such user", command="RCPT")
        mx.fail_next(451, command="DATA_END")
        mx.fail_next(554, command="DATA")
        with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
            with pytest.raises(smtplib.SMTPSenderRefused) as info:
                client.send_message(mail())
            assert info.value.smtp_code == 451
            with pytest.raises(smtplib.SMTPRecipientsRefused) as info:
                client.send_message(mail())
            code, text = info.value.recipients["ops@example.test"]
            assert (code, text) == (550, b"5.1.1 No such user")
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.send_message(mail())
            assert info.value.smtp_code == 554
            with pytest.raises(smtplib.SMTPDataError) as info:
                client.send_message(mail())
            assert info.value.smtp_code == 451
            client.send_message(mail(subject="finally"))
        (got,) = mx.wait_for(1)
        assert got.message["Subject"] == "finally"


def test_smtp_421_closes_the_connection():
    with SmtpReceiver() as mx:
        mx.fail_next(421)
        client = smtplib.SMTP(mx.host, mx.port, timeout=10)
        with pytest.raises((smtplib.SMTPSenderRefused,
                            smtplib.SMTPServerDisconnected)):
            client.send_message(mail())
        client.close()


def test_smtp_small_commands():
    with SmtpReceiver() as mx:
        client = smtplib.SMTP(mx.host, mx.port, timeout=10)
        assert client.helo("agent.test")[0] == 250
        assert client.noop()[0] == 250
        assert client.rset()[0] == 250
        assert client.docmd("BOGUS")[0] == 502
        assert client.docmd("RCPT", "TO:<x@y.test>")[0] == 503
        assert client.quit()[0] == 221
        assert mx.commands[0] == "HELO agent.test"


def test_smtp_wait_for_timeout_and_down_up():
    with SmtpReceiver() as mx:
        with pytest.raises(AssertionError):
            mx.wait_for(1, timeout=0.2)
        port = mx.port
        mx.down()
        with pytest.raises(ConnectionRefusedError):
            smtplib.SMTP(mx.host, port, timeout=5)
        mx.up()
        with smtplib.SMTP(mx.host, mx.port, timeout=10) as client:
            client.send_message(mail())
        assert mx.port == port and len(mx.wait_for(1)) == 1


def test_smtp_drip_greeting_outlasts_a_per_read_timeout():
    """40 bytes, one every 0.1 s, to a client whose reads wait 2 s."""
    with SmtpReceiver(drip_greeting=4, drip_interval=0.1) as mx:
        with smtplib.SMTP(mx.host, mx.port, timeout=2) as client:
            assert client.noop()[0] == 250
            # The dripped greeting was whole: the session goes on.
            assert client.ehlo()[0] == 250


# ------------------------------------------------------ service-shaped APIs


def answer_of(url, payload, headers=None):
    """(status, JSON body or raw bytes) of a POST, error or not."""
    try:
        with post(url, payload, headers) as reply:
            status, body = reply.status, reply.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    try:
        return status, json.loads(body.decode())
    except ValueError:
        return status, body


WHATSAPP_MESSAGE = {"messaging_product": "whatsapp", "to": "15551234567",
                    "type": "text", "text": {"body": "root logged in"}}


def test_whatsapp_api_answers_as_the_cloud_api():
    api = WhatsAppAPI("EAAtoken", "1065")
    bearer = {"Authorization": "Bearer EAAtoken"}
    with HttpReceiver(default=api) as rx:
        url = rx.url + "/v23.0/1065/messages"
        status, sent = answer_of(url, WHATSAPP_MESSAGE, bearer)
        assert status == 200
        assert sent["contacts"] == [{"input": "15551234567",
                                     "wa_id": "15551234567"}]
        assert sent["messages"][0]["id"].startswith("wamid.")
        for target, payload, headers, code, why in (
                (url, WHATSAPP_MESSAGE, {"Authorization": "Bearer x"},
                 (401, 190), "token"),
                (url, WHATSAPP_MESSAGE, {}, (401, 190), "token"),
                (rx.url + "/v23.0/999/messages", WHATSAPP_MESSAGE, bearer,
                 (400, 100), "phone_number_id"),
                (rx.url + "/1065/messages", WHATSAPP_MESSAGE, bearer,
                 (400, 2500), "path"),
                (url, dict(WHATSAPP_MESSAGE, messaging_product="sms"),
                 bearer, (400, 100), "shape"),
                (url, dict(WHATSAPP_MESSAGE, to="+15551234567"), bearer,
                 (400, 100), "shape"),
                (url, dict(WHATSAPP_MESSAGE, text={"body": ""}), bearer,
                 (400, 100), "shape"),
                (url, dict(WHATSAPP_MESSAGE, text={"body": "x" * 4097}),
                 bearer, (400, 100), "length")):
            api.refusals[:] = []
            status, error = answer_of(target, payload, headers)
            assert (status, error["error"]["code"]) == code, why
            assert error["error"]["fbtrace_id"]
            assert [reason for _, reason in api.refusals] == [why]
        status, _ = answer_of(url, dict(WHATSAPP_MESSAGE, text={
            "body": "x" * 4096}), bearer)
        assert status == 200
    assert len(api.accepted) == 2


def test_whatsapp_api_allowed_list_and_rate_limit():
    api = WhatsAppAPI("t", "1", allowed=("15551234567",))
    with HttpReceiver(default=api) as rx:
        rx.script([whatsapp_rate_limited()])
        url = rx.url + "/v23.0/1/messages"
        bearer = {"Authorization": "Bearer t"}
        status, error = answer_of(url, WHATSAPP_MESSAGE, bearer)
        assert (status, error["error"]["code"]) == (400, 130429)
        status, error = answer_of(url, dict(WHATSAPP_MESSAGE,
                                            to="4915112345678"), bearer)
        assert (status, error["error"]["code"]) == (400, 131030)
        assert "allowed list" in error["error"]["error_data"]["details"]


PAGERDUTY_EVENT = {"routing_key": "a" * 32, "event_action": "trigger",
                   "dedup_key": "web1/login",
                   "payload": {"summary": "Login: root", "source": "web1",
                               "severity": "warning", "class": "login",
                               "custom_details": {"user": "root"}}}


def test_pagerduty_api_answers_as_the_events_api():
    api = PagerDutyAPI("a" * 32)
    with HttpReceiver(default=api) as rx:
        url = rx.url + "/v2/enqueue"
        assert answer_of(url, PAGERDUTY_EVENT) == (202, {
            "status": "success", "message": "Event processed",
            "dedup_key": "web1/login"})
        assert answer_of(url, PAGERDUTY_EVENT)[0] == 202
        assert api.incidents == {"web1/login": 2}
        summary_too_long = dict(PAGERDUTY_EVENT, payload=dict(
            PAGERDUTY_EVENT["payload"], summary="x" * 1025))
        for payload, why, error in (
                (dict(PAGERDUTY_EVENT, routing_key="short"), "routing_key",
                 "Length of 'routing_key' is incorrect"),
                (dict(PAGERDUTY_EVENT, routing_key="b" * 32), "routing_key",
                 "Invalid routing key"),
                (summary_too_long, "shape", "payload.summary"),
                (dict(PAGERDUTY_EVENT, payload=dict(
                    PAGERDUTY_EVENT["payload"], severity="high")), "shape",
                 "payload.severity"),
                (dict(PAGERDUTY_EVENT, dedup_key="k" * 256), "shape",
                 "dedup_key"),
                (dict(PAGERDUTY_EVENT, event_action="page"), "shape",
                 "event_action")):
            api.refusals[:] = []
            status, answer = answer_of(url, payload)
            assert status == 400 and answer["status"] == "invalid event"
            assert any(error in text for text in answer["errors"]), why
            assert [reason for _, reason in api.refusals] == [why]
        assert answer_of(rx.url + "/v1/enqueue", PAGERDUTY_EVENT)[0] == 404
    assert api.incidents == {"web1/login": 2}


def test_a_receiver_can_require_a_client_certificate(certs):
    cert_file, key_file = certs.client_cert()
    assert certs.client_cert() == (cert_file, key_file)  # cached
    with HttpReceiver(tls=certs.server_context(
            require_client_cert=True)) as rx:
        anonymous = certs.client_context()
        with pytest.raises((ssl.SSLError, urllib.error.URLError,
                            ConnectionError)):
            post(rx.localhost_url + "/x", {}, context=anonymous).read()
        known = certs.client_context()
        known.load_cert_chain(cert_file, key_file)
        with post(rx.localhost_url + "/x", {}, context=known) as reply:
            assert reply.status == 200
        stranger = certs.client_context()
        stranger.load_cert_chain(certs.rogue.cert_file, certs.rogue.key_file)
        with pytest.raises((ssl.SSLError, urllib.error.URLError,
                            ConnectionError)):
            post(rx.localhost_url + "/x", {}, context=stranger).read()
    assert len(rx.requests) == 1
