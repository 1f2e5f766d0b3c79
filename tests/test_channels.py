"""Alert channels without the network: configuration, the text of an
alert in each markup, escaping of hostile names, length limits, how a
service's answer is judged, signatures, and the durable spool."""
import base64
import hashlib
import hmac
import html
import json
import os

import pytest

from support import pamsignal

HOSTILE_NAMES = [
    "<b>root</b>&amp;", "*bold* _it_ ~strike~ `code`", "[click](http://evil)",
    "@everyone @here <@123>", "line1\nline2\r\nFailed: fake", "x" * 5000,
    "\u202eevil\u202c", "a|b>c#d\\e",
]


def event(action="login_success", user="alice", **fields):
    values = dict(action=action, user=user, source_ip="203.0.113.5",
                  source_port=51234, service="sshd", auth_method="password",
                  hostname="web1", timestamp_us=1795780000000000,
                  message="Accepted password for %s from 203.0.113.5 port "
                  "51234 ssh2" % user)
    values.update(fields)
    return pamsignal.Event(**values)


def channel(text, path="/etc/p.conf"):
    (configured,) = pamsignal.parse_config(text, path).channels
    return configured


def problems_of(text):
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.parse_config(text, "/etc/p.conf")
    return [str(problem) for problem in raised.value.problems]


def sink_for(text):
    configured = channel(text)
    return pamsignal.CHANNEL_TYPES[configured.type](configured.name,
                                                    configured.options)


# ------------------------------------------------------------- configuration


def test_every_type_is_configured_and_its_secrets_never_show():
    config = pamsignal.parse_config(
        "[channel:tg]\ntype = telegram\nbot_token = 123:ABC-def\n"
        "chat_id = -1001234567\n"
        "[channel:sl]\ntype = slack\nurl = https://hooks.slack.com/s/T/B/X\n"
        "[channel:mail]\ntype = email\nhost = smtp.example.com\n"
        "sender = ps@example.com\nrecipients = a@example.com, b@example.com\n"
        "username = ps\npassword = hunter2\n")
    tg, slack, mail = config.channels
    assert tg.options["bot_token"].value == "123:ABC-def"
    assert mail.options["recipients"] == ("a@example.com", "b@example.com")
    shown = repr(config)
    for secret in ("123:ABC-def", "hooks.slack.com", "hunter2"):
        assert secret not in shown
    assert "Secret(***)" in shown


@pytest.mark.parametrize("text, message", [
    ("[channel:s]\ntype = slack\nurl = http://hooks.slack.com/x\n",
     "/etc/p.conf:3: [channel:s] url: expected an https:// URL (http:// "
     "only to a loopback address), got a http:// URL to hooks.slack.com"),
    ("[channel:t]\ntype = telegram\nbot_token = 1:a\n",
     "/etc/p.conf:1: [channel:t]: a telegram channel needs chat_id"),
    ("[channel:t]\ntype = telegram\nbot_token = 1:a b\nchat_id = 5\n",
     "/etc/p.conf:3: [channel:t] bot_token: expected a secret without "
     "spaces, or credential:NAME for a systemd credential"),
    ("[channel:t]\ntype = telegram\nbot_token = 1:a\nchat_id = me\n",
     "/etc/p.conf:4: [channel:t] chat_id: expected a numeric chat id (such "
     "as -1001234567) or @channelname, got 'me'"),
    ("[channel:w]\ntype = webhook\nurl = https://x.example\ntimeout = 1h\n",
     "/etc/p.conf:4: [channel:w] timeout: expected a timeout from 1s to "
     "300s, got '1h'"),
    ("[channel:d]\ntype = discord\nurl = https://d.example/w\n"
     "template = {user} {password}\n",
     "/etc/p.conf:4: [channel:d] template: unknown placeholder {password};"
     " expected some of: {title}, {facts}, {advice}, {action}, {severity}, "
     "{user}, {target_user}, {source}, {service}, {reason}, {host}, "
     "{time}, {command}, {attempts}, {message}, {asn}, {country}, "
     "{source_type}, {destination}"),
    ("[channel:m]\ntype = email\nhost = smtp.example.com\nsender = me\n"
     "recipients = a@example.com\n",
     "/etc/p.conf:4: [channel:m] sender: expected comma-separated e-mail "
     "addresses such as admin@example.com, got 'me'"),
    ("[channel:n]\ntype = ntfy\nurl = https://ntfy.sh/t\nsecret = x\n",
     "/etc/p.conf:4: [channel:n] secret: unknown key for a ntfy channel"),
])
def test_bad_channel_settings_are_named(text, message):
    found = problems_of(text)
    assert found == [message]


def test_http_is_allowed_to_loopback_only():
    for url in ("http://127.0.0.1:8080/x", "http://[::1]/x",
                "http://localhost/x", "https://example.com/x"):
        assert pamsignal.check_url(url) == url
    for url in ("http://10.0.0.1/x", "ftp://127.0.0.1/x", "https:///x",
                "http://127.0.0.1:99999/x"):
        with pytest.raises(ValueError):
            pamsignal.check_url(url)


def write_config(tmp_path, text, mode):
    path = tmp_path / "pamsignal.conf"
    path.write_text(text)
    os.chmod(str(path), mode)
    return str(path)


def test_a_world_readable_file_with_secrets_is_refused(tmp_path):
    path = write_config(tmp_path, "[channel:tg]\ntype = telegram\n"
                        "bot_token = 1:SECRET\nchat_id = 5\n", 0o644)
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(path, environ={})
    (problem,) = raised.value.problems
    assert str(problem) == (
        "%s: holds secrets ([channel:tg] bot_token) but other users can "
        "read it (group or world); run: chmod 600 %s (or move secrets to "
        "credential:NAME)" % (path, path))
    assert "SECRET" not in str(problem)
    os.chmod(path, 0o640)  # a group may hold people too
    with pytest.raises(pamsignal.ConfigError):
        pamsignal.load_config(path, environ={})
    os.chmod(path, 0o600)
    assert pamsignal.load_config(path, environ={}).channels[0].options[
        "bot_token"].value == "1:SECRET"


def test_secrets_come_from_systemd_credentials(tmp_path):
    credentials = tmp_path / "creds"
    credentials.mkdir()
    (credentials / "tg-token").write_text("42:FROM-CREDENTIAL\n")
    (credentials / "hook").write_text("http://10.1.1.1/insecure\n")
    path = write_config(tmp_path, "[channel:tg]\ntype = telegram\n"
                        "bot_token = credential:tg-token\nchat_id = 5\n",
                        0o644)  # no secret in the file: readable is fine
    config = pamsignal.load_config(path, environ={
        "CREDENTIALS_DIRECTORY": str(credentials)})
    assert config.channels[0].options["bot_token"].value == \
        "42:FROM-CREDENTIAL"
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(path, environ={})
    assert "credential:tg-token, but no credentials were passed" in str(
        raised.value)
    bad = write_config(tmp_path, "[channel:h]\ntype = webhook\n"
                       "url = credential:hook\n", 0o600)
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(bad, environ={
            "CREDENTIALS_DIRECTORY": str(credentials)})
    assert "credential hook: expected an https:// URL" in str(raised.value)
    missing = write_config(tmp_path, "[channel:h]\ntype = webhook\n"
                           "url = credential:nope\n", 0o600)
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(missing, environ={
            "CREDENTIALS_DIRECTORY": str(credentials)})
    assert "cannot read credential nope: No such file or directory" in str(
        raised.value)


# ------------------------------------------------------------------ messages


def test_the_default_layout_says_what_who_where_when_and_what_to_do():
    alert = pamsignal.alert_text(event("success_after_failures",
                                       attempts=7, counted_by="source"),
                                 delay_s=900)
    assert alert.title == "Login after failed attempts: alice on web1"
    facts = dict(alert.facts)
    assert facts["From"] == "203.0.113.5:51234"
    assert facts["Service"] == "sshd (password)"
    assert facts["Severity"] == "9/10"
    assert facts["Time"] == "2026-11-27 11:46:40 UTC (delivered 15 min late)"
    assert "passwd -l" in alert.advice
    assert pamsignal.alert_text(event()).advice is None
    brute = pamsignal.alert_text(pamsignal.Event(
        action="brute_force_detected", source_ip="198.51.100.7",
        hostname="web1", timestamp_us=0, attempts=5, window_s=600))
    assert brute.title == "Brute force: 198.51.100.7 on web1"
    assert dict(brute.facts)["Attempts"] == "5 in 600 s"
    assert "block it" in brute.advice


def sinks():
    return [
        ("telegram", sink_for("[channel:t]\ntype = telegram\n"
                              "bot_token = 1:A\nchat_id = 5\n")),
        ("slack", sink_for("[channel:s]\ntype = slack\n"
                           "url = https://hooks.example/s\n")),
        ("discord", sink_for("[channel:d]\ntype = discord\n"
                             "url = https://discord.example/w\n")),
        ("teams", sink_for("[channel:m]\ntype = teams\n"
                           "url = https://teams.example/w\n")),
        ("ntfy", sink_for("[channel:n]\ntype = ntfy\n"
                          "url = https://ntfy.example/topic\n")),
        ("gotify", sink_for("[channel:g]\ntype = gotify\n"
                            "url = https://gotify.example\ntoken = T\n")),
    ]


def visible_text(kind, body):
    """The text a person reads, from the request body of each service."""
    payload = json.loads(body)
    if kind == "telegram":
        return payload["text"]
    if kind == "slack":
        return payload["blocks"][0]["text"]["text"]
    if kind == "discord":
        return payload["content"]
    if kind == "teams":
        card = payload["attachments"][0]["content"]
        return "\n".join(json.dumps(block, ensure_ascii=False)
                         for block in card["body"])
    return payload["title"] + "\n" + payload["message"]


LIMITS = {"telegram": 4096, "slack": 3000, "discord": 2000, "ntfy": 4000}


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_user_names_render_safely_on_every_channel(name):
    for kind, sink in sinks():
        url, headers, body = sink.request(event(user=name), 0)
        text = visible_text(kind, body)
        assert "\n\nline2" not in text and "line2\r" not in text, kind
        assert "\u202e" not in text, kind
        if kind == "telegram":
            assert "<b>root</b>" not in text  # only our own tags
            assert "&amp;amp;" in text or "&amp;" not in name
        if kind == "slack":
            assert "<b>" not in text and "*bold*" not in text
        if kind == "discord":
            assert "@everyone" not in text and "[click](" not in text
            assert json.loads(body)["allowed_mentions"] == {"parse": []}
        if kind == "teams":
            assert "[click](" not in text and "*bold*" not in text
        if kind in LIMITS:
            assert len(text) <= LIMITS[kind], kind


def test_long_alerts_are_shortened_never_refused():
    huge = event(user="u" * 300, command_line="c" * 300,
                 message="m" * 5000, users_tried=("x" * 299,) * 50)
    for kind, sink in sinks():
        _, _, body = sink.request(huge, 0)
        text = visible_text(kind, body)
        assert len(text) <= LIMITS.get(kind, 30000), kind
        assert "Login: " in text or "Login\\: " in text, kind
    tight = pamsignal.compose(pamsignal.alert_text(huge), pamsignal.Markup(
        "<b>%s:</b> %s", "<b>%s</b>", 120, pamsignal.escape_html))
    assert len(tight) <= 120 and tight.count("<b>") == tight.count("</b>")


def test_templates_escape_values_but_not_the_admins_markup():
    sink = sink_for("[channel:t]\ntype = telegram\nbot_token = 1:A\n"
                    "chat_id = 5\ntemplate = <b>{title}</b>\\n{user} "
                    "from {source}\n")
    _, _, body = sink.request(event(user="<i>x</i>"), 0)
    assert json.loads(body)["text"] == (
        '<b>Login: "&lt;i&gt;x&lt;/i&gt;" on web1</b>\n"&lt;i&gt;x&lt;/i&gt;" '
        "from 203.0.113.5:51234")


def test_requests_go_where_each_service_expects():
    (_, telegram), (_, slack), _, _, (_, ntfy), (_, gotify) = sinks()
    url, headers, body = telegram.request(event(), 0)
    assert url == "https://api.telegram.org/bot1:A/sendMessage"
    payload = json.loads(body)
    assert payload["parse_mode"] == "HTML" and payload["chat_id"] == "5"
    assert payload["link_preview_options"] == {"is_disabled": True}
    url, headers, body = ntfy.request(event(), 0)
    assert url == "https://ntfy.example/"
    assert json.loads(body)["topic"] == "topic"
    assert json.loads(body)["priority"] == 3
    url, headers, body = gotify.request(event(severity=9), 0)
    assert url == "https://gotify.example/message"
    assert headers["X-Gotify-Key"] == "T"
    assert json.loads(body)["priority"] == 9


def test_webhook_posts_the_event_contract_signed():
    sink = sink_for("[channel:h]\ntype = webhook\nurl = https://h.example/\n"
                    "secret = whsec_" + base64.b64encode(b"k" * 24).decode()
                    + "\n")
    url, headers, body = sink.request(event(), 0)
    assert json.loads(body) == pamsignal.event_to_ecs(event())
    signed = ("%s.%s." % (headers["webhook-id"], headers[
        "webhook-timestamp"])).encode() + body
    expected = base64.b64encode(hmac.new(b"k" * 24, signed,
                                         hashlib.sha256).digest()).decode()
    assert headers["webhook-signature"] == "v1," + expected
    plain = sink_for("[channel:h]\ntype = webhook\nurl = https://h.example/\n")
    assert "webhook-signature" not in plain.request(event(), 0)[1]


# ------------------------------------------------------------------ answers


class Headers(dict):
    def get(self, key, default=None):
        return dict.get(self, key, default)


@pytest.mark.parametrize("status, headers, body, permanent, retry_after", [
    (429, {"Retry-After": "7"}, b"", False, 7.0),
    (429, {}, b'{"ok":false,"error_code":429,"parameters":'
     b'{"retry_after":31}}', False, 31.0),
    (429, {}, b'{"message":"rate limited","retry_after":1.5,"global":false}',
     False, 1.5),
    (429, {"Retry-After": "99999999"}, b"", False, 3600.0),
    (500, {}, b"oops", False, None),
    (503, {}, b"", False, None),
    (408, {}, b"", False, None),
    (400, {}, b"invalid_payload", True, None),
    (413, {}, b"too large", True, None),
    # A wrong address or credential is the channel's fault, not the
    # alert's: it waits in the spool until the admin fixes it.
    (404, {}, b'{"ok":false,"description":"Not Found"}', False, None),
    (403, {}, b"\x1b[31mred", False, None),
    (401, {}, b"invalid_token", False, None),
    (302, {"Location": "https://elsewhere.example/x"}, b"", False, None),
    # Any 3xx (a proxy in the way) and an interim answer left as the last
    # one say nothing of the alert: retried too.
    (300, {}, b"", False, None),
    (304, {}, b"", False, None),
    (305, {"Location": "http://proxy.example/"}, b"", False, None),
    (306, {}, b"", False, None),
    (103, {}, b"", False, None),
    # retry_after read robustly, whatever else the answer holds.
    (429, {}, b'{"retry_after":7,"parameters":"x"}', False, 7.0),
    (429, {}, b'{"parameters":{"retry_after":"9"}}', False, 9.0),
    pytest.param(429, {}, b"[" * 5000, False, None,
                 id="too-deep-for-json"),  # taken as no JSON
])
def test_answers_are_judged_retry_or_give_up(status, headers, body,
                                              permanent, retry_after):
    failure = pamsignal.judge_response(status, Headers(headers), body)
    assert failure.permanent is permanent
    assert failure.retry_after == retry_after
    assert str(failure).startswith(("HTTP %d" % status,
                                    "rate limited, HTTP 429"))
    assert "\x1b" not in str(failure)
    if status == 302:
        assert "moved to elsewhere.example" in str(failure)
    assert pamsignal.judge_response(204, Headers(), b"") is None


def test_backoff_grows_with_jitter_to_a_cap():
    assert pamsignal.retry_delay_s(1, lambda: 0.5) == 2.0
    assert pamsignal.retry_delay_s(3, lambda: 0.5) == 8.0
    assert pamsignal.retry_delay_s(50, lambda: 0.5) == 600.0
    assert pamsignal.retry_delay_s(2, lambda: 0.0) == pytest.approx(3.2)
    assert pamsignal.retry_delay_s(2, lambda: 1.0) == pytest.approx(4.8)


def test_errors_never_show_secrets():
    assert pamsignal.redact("GET /bot1:SECRET/sendMessage failed",
                            ["1:SECRET"]) == "GET /bot***/sendMessage failed"
    # As a service may echo it: percent-encoded, JSON-escaped.
    assert pamsignal.redact("GET /bot1%3ASECRET/x", ["1:SECRET"]) == \
        "GET /bot***/x"
    assert pamsignal.redact('{"key": "a\\"b\\u00e9", "url": "h:\\/\\/x"}',
                            ['a"b\u00e9', "h://x"]) == \
        '{"key": "***", "url": "***"}'


def test_telegram_says_what_its_ok_false_means():
    sink = sink_for("[channel:t]\ntype = telegram\nbot_token = 1:T\n"
                    "chat_id = 5\n")
    refused = sink.judge(200, Headers(), b'{"ok":\nfalse,"description":"x"}')
    assert refused.permanent and "Telegram refused" in str(refused)
    for taken in (b'{"ok":true}', b"<html>portal</html>", b"[" * 5000,
                  b'{"result":{"text":"\\"ok\\":false"}}'):
        assert sink.judge(200, Headers(), taken) is None


def test_a_retry_now_still_waits_the_first_backoff_step():
    for asked in (0.0, 0.5, -3.0):
        assert pamsignal.retry_wait_s(7, asked) == pamsignal.RETRY_FIRST_S
    assert pamsignal.retry_wait_s(1, 30.0) == 30.0
    assert pamsignal.retry_wait_s(3, None, lambda: 0.5) == 8.0


# -------------------------------------------------------------------- spool


def test_events_survive_the_spool_exactly():
    original = event(users_tried=("a", "b"), attempts=3, severity=9)
    record = json.loads(json.dumps(pamsignal.event_to_record(original)))
    assert pamsignal.event_from_record(record) == original
    for damaged in (None, [], {"action": "nope", "timestamp_us": 1},
                    dict(record, timestamp_us="1"), dict(record, user=[1]),
                    dict(record, unknown_field="x"), dict(record, user=True),
                    dict(record, user={"a": 1}),
                    dict(record, source_ip="1:7.0.0.1"),
                    dict(record, source_ip="::ffff:1.2.3.4"),
                    dict(record, destination_ip="host.example")):
        assert pamsignal.event_from_record(damaged) is None


@pytest.mark.parametrize("fields", [
    {"repeat": 2},  # the third of identical accesses
    {"action": "journal_suppressed", "unit": "ssh.service", "dropped": 6371},
    {"action": "unaccounted_session", "login_record": "/var/log/wtmp",
     "tty": "pts/3"},
    {"journal_time": "9999999999999999999"},
])
def test_every_kind_of_event_survives_the_spool(fields):
    """Fields added with later detections come back from the spool in
    their own type: an alert that cannot be read back is dropped."""
    original = event(**fields)
    record = json.loads(json.dumps(pamsignal.event_to_record(original)))
    assert pamsignal.event_from_record(record) == original


def spool(tmp_path, clock, max_alerts=100, max_age_s=3600):
    opened = pamsignal.Spool(str(tmp_path / "spool"), max_alerts, max_age_s,
                             clock=lambda: clock[0])
    opened.open()
    return opened


def test_spool_keeps_order_until_delivered_and_refuses_a_second_copy(
        tmp_path):
    clock = [1000.0]
    queue = spool(tmp_path, clock)
    first, second = event(user="a"), event(user="b")
    assert queue.put(first) and queue.put(second)
    assert queue.take(0) is None  # not handed over before flush
    queue.flush()
    name, taken = queue.take(0)
    assert taken == first
    assert queue.take(0)[1] == first  # still there until delivered
    queue.delivered(name)
    assert queue.put(first) is False  # read again after a crash: no repeat
    assert queue.take(0)[1] == second
    # A restart finds what was waiting.
    again = spool(tmp_path, clock)
    assert again.take(0)[1] == second
    assert again.depth() == 1


def test_spool_bounds_drop_the_oldest_and_count_why(tmp_path):
    clock = [1000.0]
    queue = spool(tmp_path, clock, max_alerts=3, max_age_s=60)
    for n in range(5):
        queue.put(event(user="u%d" % n))
    queue.flush()
    assert queue.depth() == 3
    assert queue.take(0)[1].user == "u2"
    clock[0] += 61
    assert queue.take(0) is None
    assert queue.take_dropped()["reasons"] == {"spool_full": 2, "too_old": 3}
    assert queue.take_dropped() == {}
    files = os.listdir(str(tmp_path / "spool"))
    assert not [f for f in files if f.endswith(".alert")]


def test_a_damaged_spool_file_is_dropped_with_a_warning(tmp_path, capsys):
    clock = [1000.0]
    queue = spool(tmp_path, clock)
    queue.put(event())
    queue.flush()
    (name,) = [f for f in os.listdir(str(tmp_path / "spool"))
               if f.endswith(".alert")]
    (tmp_path / "spool" / name).write_text('{"version": 1, "event": [')
    assert queue.take(0) is None
    assert queue.take_dropped()["reasons"] == {"unreadable": 1}
    assert "dropping unreadable spool file" in capsys.readouterr().err


def test_channel_names_become_safe_directory_names():
    assert pamsignal.spool_directory_name("ops-telegram") == "ops-telegram"
    odd = pamsignal.spool_directory_name("../../etc")
    assert "/" not in odd and not odd.startswith(".")
    assert odd != pamsignal.spool_directory_name("__.._etc")


def test_a_hostile_name_cannot_add_mail_headers():
    sink = sink_for("[channel:m]\ntype = email\nhost = 127.0.0.1\n"
                    "sender = ps@example.com\nrecipients = a@example.com\n")
    hostile = "=?utf-8?q?a=0D=0AReply-To:_x@evil.example?="
    message = sink.message(event("brute_force_detected", user=hostile), 0)
    text = message.as_string()
    assert "Reply-To" not in message and "\nReply-To" not in text
    assert "a=0D=0AReply-To" in str(message["Subject"])


def test_telegram_names_cannot_mention_anyone():
    sink = sink_for("[channel:t]\ntype = telegram\nbot_token = 1:A\n"
                    "chat_id = 5\n")
    _, _, body = sink.request(event(user="@boss"), 0)
    assert "@boss" not in json.loads(body)["text"]


def test_escaping_that_lengthens_text_still_fills_the_limit():
    shown = pamsignal.fit_escaped("&" * 100, 30, pamsignal.escape_html)
    assert shown == "&amp;" * 5 + "\u2026"
    long_command = event("sudo_command", command_line="&" * 290)
    alert = pamsignal.alert_text(long_command)
    values = pamsignal.template_values(long_command, alert)
    text = pamsignal.compose(
        alert, pamsignal.Markup("", "", 4096, pamsignal.escape_html),
        "<b>{title}</b>" + "{command}" * 15, values)
    assert text.startswith('<b>sudo: alice on web1</b>"&amp;')
    assert 4000 < len(text) <= 4096


def test_an_unloadable_ca_file_is_a_configuration_error(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    path = write_config(tmp_path, "[channel:h]\ntype = webhook\n"
                        "url = https://h.example/\nca_file = %s\n" % bad,
                        0o600)
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.load_config(path, environ={})
    (problem,) = raised.value.problems
    assert str(problem).startswith(
        "%s:4: [channel:h] ca_file: cannot load %s: " % (path, bad))


def test_tombstones_are_pruned_by_age_and_number(tmp_path):
    clock = [100000.0]
    queue = spool(tmp_path, clock)
    directory = tmp_path / "spool"
    for n in range(3):
        (directory / ("old%d.sent" % n)).write_text("")
        os.utime(str(directory / ("old%d.sent" % n)), (1, 1))
    (directory / "fresh.sent").write_text("")
    os.utime(str(directory / "fresh.sent"), (clock[0], clock[0]))
    queue.prune_tombstones()
    assert sorted(os.listdir(str(directory))) == ["fresh.sent"]


def test_a_new_spool_adopts_the_alerts_the_disk_refused(tmp_path):
    clock = [1000.0]
    old = spool(tmp_path, clock)
    old.in_memory["abc"] = event(user="kept")
    old.ready.append((clock[0], "abc"))
    new = spool(tmp_path, clock)
    new.adopt(old)
    name, taken = new.take(0)
    assert (name, taken.user) == ("abc", "kept")
    new.delivered(name)
    assert new.depth() == 0 and not new.in_memory


def test_a_full_spool_drops_by_value_not_age(tmp_path):
    """The red team's flood: one root login, then a flood of sudo repeats
    and their digests into a backlogged spool. The root login stays."""
    clock = [1000.0]
    queue = spool(tmp_path, clock, max_alerts=5)
    root = event("login_success", user="root", source_ip="198.51.100.7")
    queue.put(root)
    forged = event("spoofed_entry", source_ip=None, user=None, writer_uid=1000)
    queue.put(forged)
    queue.put(event("sudo_command", source_ip=None, user="mallory",
                    target_user="root", command_line="/bin/sh"))
    for n in range(1, 3):
        queue.put(event("sudo_command", source_ip=None, user="mallory",
                        target_user="root", command_line="/bin/true",
                        repeat=n))
    queue.flush()
    for n in range(4):  # digests of further repeats keep coming
        clock[0] += 1
        queue.put(event("alert_digest", source_ip=None, user="mallory",
                        reason="repeat", held_back=100 + n))
        queue.flush()
    kept = []
    while True:
        taken = queue.take(0)
        if taken is None:
            break
        kept.append(taken[1])
        queue.delivered(taken[0])
    assert kept[:3] == [root, forged, kept[2]]
    assert kept[2].command_line == "/bin/sh"  # a unique access stays
    assert [alert.held_back for alert in kept[3:]] == [102, 103]
    lost = queue.take_dropped()
    assert lost["reasons"] == {"spool_full": 4}
    assert lost["actions"] == {"sudo_command": 2, "alert_digest": 2}
    assert lost["users"] == ["mallory"]
    assert lost["held"] == 100 + 101  # what the two lost digests counted
    assert pamsignal.LostAlerts.from_json(lost).summary() == (
        "4 spool full (2 alert_digest of 201 held back, 2 sudo_command)")
    # Counted across a restart until reported.
    assert spool(tmp_path, clock).take_dropped() == {}


def test_what_a_spool_lost_is_kept_across_a_restart(tmp_path):
    clock = [1000.0]
    queue = spool(tmp_path, clock, max_alerts=1)
    queue.put(event("login_success", user="root"))
    queue.put(event("login_failure", user="alice", source_ip="192.0.2.9"))
    queue.flush()
    again = spool(tmp_path, clock, max_alerts=1)
    assert again.take_dropped() == {
        "reasons": {"spool_full": 1}, "actions": {"login_failure": 1},
        "users": ["alice"], "sources": ["192.0.2.9"], "held": 0}


def old_enforce_bounds(queue):
    """How a full spool chose what to drop before it chose all at once:
    the least valuable, then the oldest, then the first in line, one by
    one."""
    while len(queue.ready) > queue.max_alerts:
        victim = min(queue.ready, key=lambda item: (
            queue._value(item[1]), item[0]))
        queue._drop_locked(victim[1], "spool_full")


def fill_mixed(queue, clock):
    """Alerts of every value, with ties in age and in value and age."""
    kinds = [
        lambda n: event("login_success", user="root%d" % n),
        lambda n: event("login_failure", user="bob%d" % n),
        lambda n: event("sudo_command", user="sam%d" % n, source_ip=None,
                        target_user="root", command_line="/bin/sh"),
        lambda n: event("sudo_command", user="rep%d" % n, source_ip=None,
                        target_user="root", command_line="/bin/sh",
                        repeat=n + 1),
        lambda n: event("alert_digest", user="dig%d" % n, reason="repeat",
                        held_back=n),
        lambda n: event("login_success", user="al%d" % n)]
    for n in range(40):
        if n % 3:  # two in three share a second with the one before
            clock[0] += 1
        queue.put(kinds[(n * 7) % len(kinds)](n))
        queue.put(kinds[n % len(kinds)](n + 100))
    queue.flush()


def test_a_cut_spool_drops_and_counts_what_it_did_one_at_a_time(tmp_path):
    outcomes = []
    for how in ("now", "before"):
        clock = [1000.0]
        queue = spool(tmp_path / how, clock, max_alerts=1000)
        if how == "before":
            queue._enforce_bounds = lambda queue=queue: old_enforce_bounds(
                queue)
        fill_mixed(queue, clock)
        queue.max_alerts = 17  # the admin lowers the bound
        queue.put(event("login_failure", user="last"))
        queue.flush()
        directory = tmp_path / how / "spool"
        with open(str(directory / "dropped.json")) as saved:
            on_disk = json.load(saved)
        outcomes.append((
            list(queue.ready), sorted(os.listdir(str(directory))), on_disk,
            queue.lost_since_start().to_json(), queue.take_dropped()))
    assert outcomes[0] == outcomes[1]
    ready, _, _, _, dropped = outcomes[0]
    assert len(ready) == 17
    assert dropped["reasons"] == {"spool_full": 81 - 17}
    kept = [pamsignal.alert_value(queue._load(name)) for _, name in ready]
    assert min(kept) >= (1, 4) and (0, 5) not in kept


def test_cutting_a_big_spool_down_is_one_pass(tmp_path, monkeypatch):
    """5,000 alerts left by an outage, a bound of 1,000: one scan of
    their values and one write of dropped.json, not one per alert."""
    directory = tmp_path / "spool"
    directory.mkdir()
    for n in range(5000):
        alert = event("login_failure", user="u%d" % n,
                      timestamp_us=1795780000000000 + n)
        (directory / (pamsignal.alert_id(alert) + ".alert")).write_text(
            json.dumps({"version": 1,
                        "event": pamsignal.event_to_record(alert)}))
    writes, looks = [], [0]
    replace_file, value = pamsignal.replace_file, pamsignal.Spool._value

    def counted_replace(path, text, *args, **kwargs):
        writes.append(os.path.basename(path))
        return replace_file(path, text, *args, **kwargs)

    def counted_value(queue, name):
        looks[0] += 1
        if looks[0] > 3 * 5000:  # quadratic: stop it here, not in minutes
            raise AssertionError("alert values looked up %d times"
                                 % looks[0])
        return value(queue, name)

    monkeypatch.setattr(pamsignal, "replace_file", counted_replace)
    monkeypatch.setattr(pamsignal.Spool, "_value", counted_value)
    queue = spool(tmp_path, [2e9], max_alerts=1000)
    assert queue.depth() == 1000
    assert writes.count("dropped.json") == 1
    assert queue.take_dropped()["reasons"] == {"spool_full": 4000}
    assert len([name for name in os.listdir(str(directory))
                if name.endswith(".alert")]) == 1000


def visible_title(kind, body):
    """The first line a person reads, with the channel's own escaping of
    &, < and > undone (every channel leaves double quotes as they are)."""
    text = visible_text(kind, body)
    if kind == "teams":
        text = json.loads(text.splitlines()[0])["text"]
    return html.unescape(text.splitlines()[0]).replace("\\\\", "\\") \
        .replace("*", "").replace("<b>", "").replace("</b>", "") \
        .replace("\u2060", "")


@pytest.mark.parametrize("name, shown", [
    ("x from 6.6.6.6 port 22", '"x from 6.6.6.6 port 22"'),
    ('x" from 6.6.6.6 "', '"x\\" from 6.6.6.6 \\""'),
    ("bob on web2", '"bob on web2"'),
    ("alice", "alice"), ("svc-deploy.2@corp", "svc-deploy.2@corp"),
])
def test_attacker_chosen_names_in_titles_cannot_pose_as_other_fields(
        name, shown):
    """`Failed login: x from 6.6.6.6 port 22 on vm` read as if the source
    were 6.6.6.6: a name that is not a plain word is quoted, everywhere."""
    failed = event("login_failure", user=name, source_ip="192.0.2.1",
                   hostname="vm")
    title = "Failed login: %s on vm" % shown
    assert pamsignal.alert_text(failed).title == title
    for kind, sink in sinks():
        _, _, body = sink.request(failed, 0)
        assert visible_title(kind, body).endswith(title), kind
    mail = sink_for("[channel:e]\ntype = email\nhost = 127.0.0.1\n"
                    "sender = p@example.com\nrecipients = a@example.com\n"
                    "security = none\n").message(failed, 0)
    assert mail["Subject"] == "[PAMSignal] " + title
    facts = dict(pamsignal.alert_text(failed).facts)
    assert facts["User"] == shown
    # sudo: the person, the account and the command, each one value.
    ran = pamsignal.alert_text(event(
        "sudo_command", user=name, target_user="root x",
        command_line="/bin/true from 6.6.6.6", source_ip=None))
    assert ran.title == "sudo: %s as \"root x\" on web1" % shown
    assert dict(ran.facts)["Command"] == '"/bin/true from 6.6.6.6"'
    assert dict(ran.facts)["As"] == '"root x"'
