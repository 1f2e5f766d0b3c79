"""`pamsignal report --send CHANNEL`: the report's text as a
`report_summary` event through the channel's own report spool, to real
local receivers: a chat channel gets it cut to its message limit with a
"N more lines" line, mail gets it whole, an outage leaves it in the spool
for the next run, and nothing is sent twice."""
import glob
import html
import os
import re
import subprocess
import sys

import pytest

import receivers
from support import PAMSIGNAL, json_line, make_entry, pamsignal, write_config
from test_report import T0, story

#: The summary's first line, as the text report prints it.
HEAD = "PAMSignal report: "


def busy_story(users=60):
    """The report test's story and many short sessions after it, so the
    text is longer than a chat message."""
    lines = story()
    for number in range(users):
        pid = 1000 + number
        user = "user%03d" % number
        lines += [
            make_entry("sshd", "Accepted password for %s from 192.0.2.%d "
                       "port %d ssh2" % (user, number + 1, 40000 + number),
                       sequence=600 + 3 * number, _PID=str(pid)),
            make_entry("sshd", "pam_unix(sshd:session): session opened for "
                       "user %s(uid=1000) by (uid=0)" % user,
                       sequence=601 + 3 * number, _PID=str(pid)),
            make_entry("sshd", "pam_unix(sshd:session): session closed for "
                       "user %s" % user, sequence=602 + 3 * number,
                       _PID=str(pid))]
    return lines


def hostile_story():
    """The story and a failure for an account named to break markup."""
    return story() + [make_entry(
        "sshd", "Failed password for invalid user <b>x</b>``` from "
        "192.0.2.200 port 1 ssh2", sequence=900, _PID="3000")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report-send")
    busy = directory / "busy.json"
    busy.write_text("".join(json_line(line) for line in busy_story()))
    short = directory / "short.json"
    short.write_text("".join(json_line(line) for line in story()))
    hostile = directory / "hostile.json"
    hostile.write_text("".join(json_line(line) for line in hostile_story()))
    return {"busy": str(busy), "short": str(short), "hostile": str(hostile)}


def configure(tmp_path, channels, report="retry_for = off\n"):
    state = tmp_path / "state"
    return write_config(tmp_path / "pamsignal.conf", (
        "[pamsignal]\nstate_dir = %s\n[report]\n%s%s" % (state, report,
                                                          channels)))


def run(config, *argv, python=sys.executable):
    environment = dict(os.environ, TZ="UTC", COLUMNS="100")
    return subprocess.run(
        [python, PAMSIGNAL, "--config", config, "report"]
        + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, env=environment, timeout=120)


def text_report(config, export):
    """The report as a 100-column terminal shows it: what a summary
    carries."""
    done = run(config, export)
    assert done.returncode == 0, done.stderr
    return done.stdout.rstrip("\n").split("\n")


def telegram_channel(receiver, name="ops"):
    return ("[channel:%s]\ntype = telegram\nbot_token = 123:abc\n"
            "chat_id = 42\napi_url = %s\n" % (name, receiver.url))


@pytest.fixture
def telegram():
    with receivers.HttpReceiver(default=receivers.telegram_ok()) as rx:
        yield rx


def pre_lines(text):
    """The report lines inside a Telegram message's <pre> block."""
    block = re.search(r"<pre>(.*)</pre>", text, re.S).group(1)
    return html.unescape(block).replace("@\u2060", "@").split("\n")


def test_a_chat_channel_gets_the_summary_cut_with_how_many_more(
        tmp_path, exports, telegram):
    config = configure(tmp_path, telegram_channel(telegram))
    done = run(config, "--send", "ops", exports["busy"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "report to ops: sent\n"
    (request,) = telegram.requests
    assert request.path == "/bot123:abc/sendMessage"
    text = request.json["text"]
    assert request.json["parse_mode"] == "HTML"
    assert len(text) <= 4096
    assert text.startswith("<b>Login report on ")
    whole = text_report(config, exports["busy"])
    shown = pre_lines(text)
    assert shown[0].startswith(HEAD) and shown == whole[:len(shown)]
    more = re.search(r"</pre>\n\.\.\. (\d+) more lines: pamsignal report "
                     r"on \S+ shows them all\Z", text)
    assert more, text[-200:]
    assert int(more.group(1)) == len(whole) - len(shown) > 0


def test_mail_gets_the_whole_text(tmp_path, exports):
    with receivers.SmtpReceiver() as mx:
        config = configure(tmp_path, (
            "[channel:mail]\ntype = email\nhost = 127.0.0.1\nport = %d\n"
            "security = none\nsender = pamsignal@example.com\n"
            "recipients = admin@example.com\n" % mx.port))
        done = run(config, "--send", "mail", exports["busy"])
        assert done.returncode == 0, done.stderr
        (mail,) = mx.messages
    whole = text_report(config, exports["busy"])
    subject = str(mail.message["Subject"]).strip()  # unfolded
    assert subject.startswith("[PAMSignal] Login report on ")
    assert subject.endswith(", " + whole[0][len(HEAD):])
    body = mail.text.rstrip("\n").split("\n")
    assert body[0] == subject[len("[PAMSignal] "):]
    assert body[1] == "" and body[2:] == whole
    assert "more lines" not in mail.text
    # And as HTML, where the tables keep their columns in any mail reader.
    page = mail.message.get_body(preferencelist=("html",)).get_content()
    block = re.search(r"<pre>(.*)</pre>", page, re.S).group(1)
    assert html.unescape(block).split("\n") == whole


def test_hostile_names_stay_text_in_the_channels_markup(tmp_path, exports,
                                                       telegram):
    with receivers.HttpReceiver(default=receivers.discord_ok()) as discord:
        config = configure(tmp_path, telegram_channel(telegram) + (
            "[channel:chat]\ntype = discord\nurl = %s/api/webhooks/1/t\n"
            % discord.url))
        done = run(config, "--send", "ops,chat", exports["hostile"])
        assert done.returncode == 0, done.stderr
        assert done.stdout == "report to ops: sent\nreport to chat: sent\n"
        (posted,) = discord.requests
    (request,) = telegram.requests
    assert "<b>x</b>" not in request.json["text"]
    assert "&lt;b&gt;x&lt;/b&gt;" in request.json["text"]
    content = posted.json["content"]
    assert len(content) <= 2000
    # One code block: the name's backticks cannot close it.
    assert content.count("```") == 2
    assert content.index("```") < content.index("<b>x</b>\u02cb\u02cb\u02cb")


def test_an_outage_keeps_the_summary_for_the_next_run_which_sends_it_once(
        tmp_path, exports, telegram):
    config = configure(tmp_path, telegram_channel(telegram))
    spool = str(tmp_path / "state" / "report-spool" / "ops")
    telegram.down()
    done = run(config, "--send", "ops", exports["short"])
    assert done.returncode == 1
    assert done.stdout.startswith("report to ops: not delivered yet: cannot "
                                  "reach 127.0.0.1")
    assert "kept in %s" % spool in done.stdout
    assert len(glob.glob(os.path.join(spool, "*.alert"))) == 1

    telegram.up()
    done = run(config, "--send", "ops", exports["busy"])
    assert done.returncode == 0, done.stderr
    first, second = telegram.requests
    assert len(pre_lines(first.json["text"])) < len(pre_lines(
        second.json["text"]))  # the waiting (short) one went first
    assert glob.glob(os.path.join(spool, "*.alert")) == []

    done = run(config, "--send", "ops", exports["busy"])  # the same again
    assert done.returncode == 0, done.stderr
    assert done.stdout == "report to ops: already sent within the hour " \
        "(not again)\n"
    assert len(telegram.requests) == 2


def test_a_failure_is_retried_within_the_run(tmp_path, exports, telegram):
    config = configure(tmp_path, telegram_channel(telegram),
                       report="retry_for = 1m\n")
    telegram.script(receivers.Respond(502, b"bad gateway"))
    done = run(config, "--send", "ops", exports["short"])
    assert done.returncode == 0, done.stderr
    assert [request.response.status for request in telegram.requests] == [
        502, 200]
    assert done.stdout == "report to ops: sent\n"


def test_a_refused_summary_is_said_and_not_kept(tmp_path, exports, telegram):
    config = configure(tmp_path, telegram_channel(telegram))
    telegram.script(receivers.telegram_error())
    done = run(config, "--send", "ops", exports["short"])
    assert done.returncode == 1
    assert done.stdout.startswith("report to ops: refused: ")
    assert "chat not found" in done.stdout
    spool = str(tmp_path / "state" / "report-spool" / "ops")
    assert glob.glob(os.path.join(spool, "*.alert")) == []


def test_send_configured_uses_send_to_and_says_when_it_names_none(
        tmp_path, exports, telegram):
    config = configure(tmp_path, telegram_channel(telegram))
    done = run(config, "--send-configured", exports["short"])
    assert done.returncode == 78
    assert "[report] send_to: names no channel" in done.stderr
    assert "systemctl disable --now pamsignal-report.timer" in done.stderr
    assert telegram.requests == []

    config = configure(tmp_path, telegram_channel(telegram),
                       report="retry_for = off\nsend_to = ops\n")
    done = run(config, "--send-configured", exports["short"])
    assert done.returncode == 0, done.stderr
    assert done.stdout == "report to ops: sent\n"


@pytest.mark.parametrize("channels, wrong, expected", [
    ("", "nosuch", "no [channel:nosuch] is configured; configured: none"),
    ("[channel:con]\ntype = console\n", "con",
     "channel con is of type console, which a report cannot be sent to"),
    ("[channel:pd]\ntype = pagerduty\nrouting_key = %s\n" % ("a" * 32),
     "pd", "channel pd is of type pagerduty"),
])
def test_a_channel_that_cannot_take_a_summary_is_refused_before_reading(
        tmp_path, exports, channels, wrong, expected):
    config = configure(tmp_path, channels)
    done = run(config, "--send", wrong, exports["short"])
    assert done.returncode == 2
    assert expected in done.stderr
    config = configure(tmp_path, channels,
                       report="send_to = %s\n" % wrong)
    done = subprocess.run([sys.executable, PAMSIGNAL, "--config", config,
                           "check-config"], stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)
    assert done.returncode == 78
    assert "[report] send_to: " + expected in done.stderr


def test_without_send_the_report_is_printed_as_before(tmp_path, exports):
    config = configure(tmp_path, "")
    assert text_report(config, exports["short"])[0].startswith(HEAD)
    assert not os.path.exists(str(tmp_path / "state" / "report-spool"))


def test_the_summary_event_is_stamped_with_the_end_of_its_range():
    document = {"report": {"until": pamsignal.format_timestamp(
        (T0 + 3600) * 1000000), "entries": 0}, "sessions": [],
        "sessions_more": 0, "failures": {
            "total": 0, "by_source": [], "by_source_more": 0,
            "by_account": [], "by_account_more": 0, "per_hour": []},
        "detections": [], "detections_more": 0, "privileged": [],
        "privileged_more": 0}
    event = pamsignal.summary_event(document, "web1", 1)
    assert event.timestamp_us == (T0 + 3600) * 1000000
    assert event.action == "report_summary" and event.hostname == "web1"
    assert event.message.split("\n")[0].startswith(HEAD)
    again = pamsignal.summary_event(document, "web1", 2)
    assert pamsignal.alert_id(event) == pamsignal.alert_id(again)


def more_count(text):
    """N of the last line "... N more lines: ...", or None."""
    found = re.search(r"\n\.\.\. (\d+) more lines: pamsignal report on "
                      r"\S+ shows them all\Z", text)
    return int(found.group(1)) if found else None


def test_every_kind_of_chat_channel_gets_its_own_cut(tmp_path, exports):
    """Slack (3,000), ntfy (4,000) cut the text; Teams (20,000), Gotify
    (8,000) and the webhook (the event) carry it whole."""
    answers = {"slack": receivers.slack_ok(), "teams": receivers.teams_ok(),
               "ntfy": receivers.ntfy_ok(), "gotify": receivers.gotify_ok(),
               "webhook": receivers.Respond(200, b"ok")}
    found = {}
    running = [receivers.HttpReceiver(default=answer).__enter__()
               for answer in answers.values()]
    try:
        rx = dict(zip(answers, running))
        config = configure(tmp_path, (
            "[channel:sl]\ntype = slack\nurl = %s/s\n"
            "[channel:tm]\ntype = teams\nurl = %s/t\n"
            "[channel:nt]\ntype = ntfy\nurl = %s/daily\n"
            "[channel:go]\ntype = gotify\nurl = %s\ntoken = T\n"
            "[channel:wh]\ntype = webhook\nurl = %s/h\n" % tuple(
                rx[kind].url for kind in answers)))
        done = run(config, "--send", "sl,tm,nt", "--send", "go,wh",
                   exports["busy"])
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(": sent\n") == 5
        for kind in answers:
            (found[kind],) = [request.json for request in rx[kind].requests]
    finally:
        for receiver in running:
            receiver.__exit__(None, None, None)
    whole = text_report(config, exports["busy"])

    slack = found["slack"]["blocks"][0]["text"]["text"]
    assert len(slack) <= 3000 and slack.startswith("*Login report on ")
    block = slack.split("```\n", 1)[1].split("\n```", 1)[0]
    shown = html.unescape(block).split("\n")  # Slack reads &, < and >
    assert shown == whole[:len(shown)]
    assert more_count(slack) == len(whole) - len(shown)

    ntfy = found["ntfy"]
    assert ntfy["topic"] == "daily"
    assert ntfy["title"].startswith("Login report on ")
    assert len(ntfy["message"]) <= 4000
    shown = ntfy["message"].split("\n")[:-1]
    assert shown == whole[:len(shown)]
    assert more_count(ntfy["message"]) == len(whole) - len(shown)

    card = found["teams"]["attachments"][0]["content"]["body"]
    assert card[0]["text"].startswith("Login report on ")
    assert card[1]["fontType"] == "Monospace"
    # Teams' markdown has no escape: its marks (#, *, ...) as look-alikes.
    assert card[1]["text"] == pamsignal.escape_teams("\n".join(whole))

    assert found["gotify"]["message"].split("\n") == whole
    event = found["webhook"]
    assert event["event"]["action"] == "report_summary"
    assert event["message"].split("\n") == whole
    assert event["pamsignal"]["detail"] == whole[0][len(HEAD):]


def test_a_cut_summary_always_fits_and_counts_what_it_left_out():
    """For every limit: within it, the block closed, the lines shown a
    prefix of the report, the count right (9 more -> 10 more grows the
    line by a digit)."""
    lines = ["line %02d <&> %s" % (number, "x" * (number % 7))
             for number in range(40)]
    event = pamsignal.Event(action="report_summary", timestamp_us=0,
                            hostname="web1", detail="today",
                            message="\n".join(lines))
    markup = pamsignal.TelegramSink.MARKUP
    assert markup.heading == "<b>%s</b>"
    assert markup.escape is pamsignal.escape_telegram
    whole = pamsignal.summary_message(event, markup._replace(limit=None))
    for limit in range(120, len(whole) + 1):
        text = pamsignal.summary_message(event,
                                         markup._replace(limit=limit))
        assert len(text) <= limit
        assert text.count("<pre>") == text.count("</pre>") == 1
        inside = html.unescape(re.search(r"<pre>(.*)</pre>", text, re.S)
                               .group(1))
        shown = inside.split("\n") if inside else []
        assert shown == lines[:len(shown)]
        left = more_count(text)
        assert (left or 0) == len(lines) - len(shown)
    assert more_count(whole) is None and shown == lines


def test_root_becomes_the_owner_of_a_state_directory_it_does_not_own(
        tmp_path, exports, telegram):
    """As with the service's DynamicUser: run as root, --send writes the
    spool as the state directory's owner (here nobody), so a link that
    owner planted leads root nowhere; the way in (pytest's 0700 root
    directories, like /var/lib/private) is crossed before."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change users")
    # The system's python3: one that nobody may read (a pyenv build under
    # /root) could not load its codecs once it is nobody.
    python = "/usr/bin/python3"
    nobody = 65534
    state = tmp_path / "state"
    state.mkdir()
    os.chown(str(state), nobody, nobody)
    config = configure(tmp_path, telegram_channel(telegram))
    done = run(config, "--send", "ops", exports["short"], python=python)
    assert done.returncode == 0, done.stderr
    spool = state / "report-spool" / "ops"
    assert {os.lstat(str(path)).st_uid for path in [
        spool.parent, spool] + list(spool.iterdir())} == {nobody}

    # The owner swaps the spool for a link into a directory of root's.
    guarded = tmp_path / "roots"
    guarded.mkdir(mode=0o700)
    for path in spool.iterdir():
        path.unlink()
    spool.rmdir()
    os.symlink(str(guarded), str(spool))
    done = run(config, "--send", "ops", exports["busy"], python=python)
    assert done.returncode == 1
    assert done.stdout.startswith("report to ops: not delivered yet: %s: "
                                  % spool)
    assert list(guarded.iterdir()) == []


def test_whatsapp_gets_the_cut_text_the_api_accepts(tmp_path, exports):
    """WhatsApp's stand-in API refuses a text over 4,096 characters, as
    the Cloud API does: each recipient gets the cut summary, accepted."""
    api = receivers.WhatsAppAPI("wa-token", "106540352242922")
    with receivers.HttpReceiver(default=api) as rx:
        config = configure(tmp_path, (
            "[channel:wa]\ntype = whatsapp\ntoken = wa-token\n"
            "phone_number_id = 106540352242922\n"
            "recipients = 4915112345678, 15551234567\napi_url = %s\n"
            % rx.url))
        done = run(config, "--send", "wa", exports["busy"])
        assert done.returncode == 0, done.stderr + done.stdout
    assert api.refusals == []
    first, second = api.accepted
    assert [request.json["to"] for request in (first, second)] == [
        "4915112345678", "15551234567"]
    text = first.json["text"]["body"]
    assert text == second.json["text"]["body"] and len(text) <= 4096
    whole = text_report(config, exports["busy"])
    shown = text.split("\n")[1:-1]  # the title, then the lines
    assert shown == whole[:len(shown)]
    assert more_count(text) == len(whole) - len(shown)
