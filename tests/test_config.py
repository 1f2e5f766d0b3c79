"""Configuration: built-in defaults, validation with file/line/key, the
check-config command and the state directory."""
import io
import json
import os
import subprocess
import sys

import pytest

from support import PAMSIGNAL, pamsignal, write_config


def problems_of(text):
    with pytest.raises(pamsignal.ConfigError) as caught:
        pamsignal.parse_config(text, "/etc/p.conf")
    return [str(p) for p in caught.value.problems]


def test_empty_file_means_built_in_defaults():
    config = pamsignal.parse_config("")
    assert config.state_dir == "/var/lib/pamsignal"
    assert config.first_start == "now"
    assert config.channels == ()


def test_values_are_read_and_normalised():
    config = pamsignal.parse_config(
        "[pamsignal]\nstate_dir = /srv/ps/../state/   ; inline comment\n"
        "first_start = -2h\n\n[channel:screen]\ntype = console\n"
        "format = json\nevents = login_success, login_failure\n")
    assert config.state_dir == "/srv/state"
    assert config.first_start == "-2h"
    (channel,) = config.channels
    assert channel.name == "screen" and channel.options == {"format": "json"}
    assert channel.policy.events == {"login_success", "login_failure"}


def test_every_problem_is_reported_with_line_and_expectation():
    found = problems_of(
        "[pamsignal]\n"
        "state_dir = relative/path\n"
        "stat_dir = /x\n"
        "first_start = yesterday\n"
        "\n"
        "[channel:phone]\n"
        "type = pager\n"
        "[channel:screen]\n"
        "type = console\n"
        "format = xml\n"
        "events = login_success, logout\n"
        "[geoip2]\n")
    assert found == [
        "/etc/p.conf:2: [pamsignal] state_dir: expected an absolute path, "
        "got 'relative/path'",
        "/etc/p.conf:3: [pamsignal] stat_dir: unknown key (did you mean "
        "'state_dir'?)",
        "/etc/p.conf:4: [pamsignal] first_start: expected now, boot, all or "
        "a time back such as -1h (s, m, h or d), got 'yesterday'",
        "/etc/p.conf:7: [channel:phone] type: expected one of: console, "
        "discord, email, gotify, journal, ntfy, pagerduty, slack, syslog, "
        "teams, telegram, webhook, whatsapp; got 'pager'",
        "/etc/p.conf:10: [channel:screen] format: expected text or json, got"
        " 'xml'",
        "/etc/p.conf:11: [channel:screen] events: expected *, default or a "
        "comma-separated list of actions (-action leaves one out): %s; got "
        "'logout'" % ", ".join(sorted(pamsignal.ACTIONS)),
        "/etc/p.conf:12: [geoip2]: unknown section; expected [pamsignal], "
        "[detection], [alerts], [geoip], [audit], [report] or "
        "[channel:NAME]",
    ]


@pytest.mark.parametrize("text, expected", [
    ("state_dir = /x\n", "/etc/p.conf:1: expected a [section] header before "
     "'state_dir = /x'"),
    ("[pamsignal]\n[pamsignal]\n", "/etc/p.conf:2: [pamsignal]: section "
     "given twice"),
    ("[pamsignal]\nstate_dir = /a\nstate_dir = /b\n", "/etc/p.conf:3: "
     "[pamsignal] state_dir: key given twice"),
    ("[pamsignal]\njust words\n", "/etc/p.conf:2: expected 'key = value', "
     "got 'just words'"),
    ("[DEFAULT]\nstate_dir = /x\n", "/etc/p.conf:1: [DEFAULT]: unknown "
     "section; expected [pamsignal], [detection], [alerts], [geoip], "
     "[audit], [report] or [channel:NAME]"),
    ("[channel:x]\nformat = json\n", "/etc/p.conf:1: [channel:x] type: "
     "expected one of: console, discord, email, gotify, journal, ntfy, "
     "pagerduty, slack, syslog, teams, telegram, webhook, whatsapp; got "
     "''"),
])
def test_syntax_errors_point_at_the_line(text, expected):
    assert problems_of(text) == [expected]


def test_detection_thresholds_are_read_and_checked():
    config = pamsignal.parse_config(
        "[detection]\nbrute_force_fast = 3 in 90s\n"
        "brute_force_slow = off\n")
    assert config.detection.brute_force_fast == (3, 90)
    assert config.detection.brute_force_slow == (0, 0)
    assert config.detection.success_after_failures == (3, 3600)
    assert config.detection.user_enumeration == (10, 600)
    assert config.detection.distributed_attack == (10, 3600)
    assert problems_of("[detection]\nbrute_force_fast = 5 per hour\n"
                       "success_after_failures = 0 in 1h\n") == [
        "/etc/p.conf:2: [detection] brute_force_fast: expected 'N in "
        "DURATION' (N from 1 to 1000, such as 5 in 10m) or off, got "
        "'5 per hour'",
        "/etc/p.conf:3: [detection] success_after_failures: expected 'N in "
        "DURATION' (N from 1 to 1000, such as 5 in 10m) or off, got "
        "'0 in 1h'"]
    assert len(problems_of("[detection]\nuser_enumeration = 5 in 0s\n"
                           "distributed_attack = 1001 in 1h\n")) == 2


def test_percent_signs_are_not_interpolated():
    config = pamsignal.parse_config("[pamsignal]\nstate_dir = /var/%(x)s\n")
    assert config.state_dir == "/var/%(x)s"


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, PAMSIGNAL] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60, **kwargs)


def test_check_config_exits_78_and_names_each_problem(tmp_path):
    path = write_config(tmp_path / "p.conf",
                        "[pamsignal]\nfirst_start = soon\nbogus = 1\n")
    result = run_cli("--config", path, "check-config")
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "pamsignal: error: %s:2: [pamsignal] first_start: expected now, boot,"
        " all or a time back such as -1h (s, m, h or d), got 'soon'" % path,
        "pamsignal: error: %s:3: [pamsignal] bogus: unknown key" % path]


def test_check_config_reads_standard_input_as_stdin_with_lines():
    result = run_cli("--config", "-", "check-config",
                     input="[pamsignal]\nfirst_start = boot\nbogus = 1\n")
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "pamsignal: error: <stdin>:3: [pamsignal] bogus: unknown key"]
    result = run_cli("--config", "-", "check-config",
                     input="[pamsignal]\nfirst_start = boot\n")
    assert (result.returncode, result.stdout) == (0, "<stdin>: OK "
                                                  "(0 channels)\n")


def test_standard_input_has_no_owner_to_judge_but_what_it_names_has(
        tmp_path):
    """Ansible validates its temporary copy, in the login user's
    directory: from stdin only the text is judged, and, as root, every
    file it names."""
    text = b"[pamsignal]\nfirst_start = boot\n"
    config = pamsignal.load_config("-", environ={}, as_root=True,
                                   stdin=io.BytesIO(text))
    assert config.path == "<stdin>"
    program = tmp_path / "journalctl"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o777)
    with pytest.raises(pamsignal.ConfigError) as caught:
        pamsignal.load_config("-", environ={}, as_root=True, stdin=io.BytesIO(
            text + b"journalctl = %s\n" % str(program).encode()))
    (problem,) = caught.value.problems
    assert str(problem).startswith("<stdin>:3: [pamsignal] journalctl: ")
    assert "is writable by group and others" in str(problem)


def test_check_config_accepts_the_shipped_example():
    example = os.path.join(os.path.dirname(PAMSIGNAL),
                           "pamsignal.conf.example")
    result = run_cli("--config", example, "check-config")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK (1 channel)")


def test_named_config_that_does_not_exist_is_an_error(tmp_path):
    result = run_cli("--config", str(tmp_path / "none.conf"), "check-config")
    assert result.returncode == 78
    assert "none.conf: no such file" in result.stderr


def test_run_with_a_bad_config_exits_78_before_doing_anything(tmp_path):
    path = write_config(tmp_path / "p.conf", "[pamsignal]\nstate_dir = x\n")
    assert run_cli("--config", path, "run").returncode == 78


def test_state_directory_is_created_private(tmp_path):
    store = pamsignal.StateStore(str(tmp_path / "a" / "state"))
    store.prepare()
    assert oct(os.stat(store.state_dir).st_mode & 0o777) == "0o700"
    store.save({"cursor": "s=1"})
    assert oct(os.stat(store.path).st_mode & 0o777) == "0o600"
    assert store.load() == {"cursor": "s=1"}


def test_unwritable_state_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = write_config(tmp_path / "p.conf", "[pamsignal]\nstate_dir = %s\n"
                        % (blocker / "state"))
    result = run_cli("--config", path, "run")
    assert result.returncode == 1
    assert "cannot write the state directory %s" % (blocker / "state") \
        in result.stderr


def test_corrupt_state_resumes_a_minute_before_it_was_written(
        tmp_path, capsys):
    (tmp_path / "state.json").write_text("{not json")
    os.utime(str(tmp_path / "state.json"), (1795780000, 1795780000))
    (tmp_path / "detection.json").write_text("[1, 2")
    config = pamsignal.parse_config("[pamsignal]\nstate_dir = %s\n"
                                    % tmp_path)
    agent = pamsignal.Agent(config, [])
    agent.restore()
    assert agent.source.since_us == (1795780000 - 60) * 1000000
    assert agent.source.cursor is None
    assert len(agent.pipeline.detector.counters) == 0
    err = capsys.readouterr().err
    assert "ignoring unreadable state %s" % (tmp_path / "state.json") in err
    assert "ignoring unreadable state %s" % (tmp_path / "detection.json") \
        in err
    assert "resuming from a minute before it was written" in err


def test_an_oversized_state_file_is_damaged_not_read(tmp_path, capsys,
                                                     monkeypatch):
    # A state file past the bound is taken as damaged (planted, or a
    # disk error), whatever it holds, rather than read whole into memory.
    monkeypatch.setattr(pamsignal, "MAX_STATE_FILE_BYTES", 4096)
    (tmp_path / "state.json").write_text(json.dumps(
        {"cursor": "s=1;i=2", "padding": "x" * 5000}))
    os.utime(str(tmp_path / "state.json"), (1795780000, 1795780000))
    config = pamsignal.parse_config("[pamsignal]\nstate_dir = %s\n"
                                    % tmp_path)
    agent = pamsignal.Agent(config, [])
    agent.restore()
    assert agent.source.cursor is None
    assert agent.source.since_us == (1795780000 - 60) * 1000000
    assert "ignoring unreadable state %s: larger than 4096 bytes" % (
        tmp_path / "state.json") in capsys.readouterr().err


def test_version_and_usage_exit_codes():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "pamsignal %s" % pamsignal.__version__
    assert run_cli("frobnicate").returncode == 2
    assert pamsignal.main(["scan", "--nope"], stdout=io.StringIO()) == 2


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("run", "scan", "check-config"):
        assert command in result.stdout


def test_geoip_databases_are_absolute_paths_or_off():
    config = pamsignal.parse_config(
        "[geoip]\nasn_db = /var/lib/GeoIP/../GeoIP/GeoLite2-ASN.mmdb\n"
        "country_db =\n")
    assert config.geoip == (
        "/var/lib/GeoIP/GeoLite2-ASN.mmdb", None, None)
    assert pamsignal.parse_config("").geoip == (None, None, None)
    assert problems_of("[geoip]\ncity_db = GeoLite2-City.mmdb\n"
                       "asn = /x\n") == [
        "/etc/p.conf:2: [geoip] city_db: expected an absolute path, got "
        "'GeoLite2-City.mmdb'",
        "/etc/p.conf:3: [geoip] asn: unknown key (did you mean 'asn_db'?)"]


def test_host_provider_is_auto_none_or_a_name():
    assert pamsignal.parse_config("").host_provider == "auto"
    assert pamsignal.parse_config(
        "[pamsignal]\nhost_provider = None\n").host_provider == "none"
    assert pamsignal.parse_config(
        "[pamsignal]\nhost_provider = Home lab (rack 2)\n"
    ).host_provider == "Home lab (rack 2)"
    assert problems_of("[pamsignal]\nhost_provider = <b>x</b>\n") == [
        "/etc/p.conf:2: [pamsignal] host_provider: expected auto, none or a "
        "provider name (letters, digits, spaces, ._&/()-), got '<b>x</b>'"]


@pytest.mark.parametrize("kind, options", [
    ("syslog", "target = tcp://127.0.0.1:514\n"), ("journal", "")])
def test_log_like_channels_get_every_event_unless_they_say(kind, options):
    """A SIEM or a log pipeline wants every event at once: [alerts]'
    filters, cooldown, rate limit and repeat digests do not reach a
    syslog or journal channel, whose own keys still apply."""
    config = pamsignal.parse_config(
        "[alerts]\nevents = login_success\ncooldown = 5m\nrepeats = 5 in 1m\n"
        "rate_limit = 2 in 1m\n[channel:log]\ntype = %s\n%s"
        "[channel:tuned]\ntype = %s\n%srepeats = 2 in 1m\n"
        % (kind, options, kind, options))
    log, tuned = config.channels
    assert log.policy.events == frozenset(pamsignal.ACTIONS)
    assert (log.policy.cooldown, log.policy.rate_limit, log.policy.repeats) \
        == (0, pamsignal.NO_THRESHOLD, pamsignal.NO_THRESHOLD)
    assert tuned.policy.repeats == pamsignal.Threshold(2, 60)


@pytest.mark.parametrize("text, expected", [
    # configparser keeps the blanks of "[ pamsignal ]": its own section
    ("[ pamsignal ]\nstate_dir = /x\n", "/etc/p.conf:1: [ pamsignal ]: "
     "unknown section"),
    ("[pamsignal]\n\n[ detection ] ; note\nbogus = 1\n", "/etc/p.conf:3: "
     "[ detection ]: unknown section"),
    # lines end at \n only, as configparser splits them
    ("[pamsignal]\nhost_provider = a\x0cb\n\n[geoip2]\n", "/etc/p.conf:2: "
     "[pamsignal] host_provider: expected auto"),
    ("[pamsignal]\nhost_provider = a\x0cb\n\n[geoip2]\n", "/etc/p.conf:4: "
     "[geoip2]: unknown section"),
    # an indented first key is a key, not a continuation
    ("[pamsignal]\n  bogus = 1\n", "/etc/p.conf:2: [pamsignal] bogus: "
     "unknown key"),
])
def test_problems_find_their_line_as_configparser_reads_it(text, expected):
    assert any(found.startswith(expected) for found in problems_of(text)), \
        problems_of(text)


def test_credential_and_ca_file_problems_name_their_line(tmp_path):
    path = str(tmp_path / "p.conf")
    with open(path, "w") as handle:
        handle.write("[channel: bot ]\ntype = telegram\nchat_id = 1\n\n"
                     "bot_token = credential:tok\n[channel:hook]\n"
                     "type = webhook\nurl = https://a.example/\n"
                     "ca_file = %s\n" % (tmp_path / "none.pem"))
    os.chmod(path, 0o600)
    with pytest.raises(pamsignal.ConfigError) as caught:
        pamsignal.load_config(path, environ={}, as_root=False)
    assert [str(p) for p in caught.value.problems] == [
        "%s:9: [channel:hook] ca_file: cannot load %s: No such file or "
        "directory" % (path, tmp_path / "none.pem")]
    with open(path, "w") as handle:
        handle.write("[channel: bot ]\ntype = telegram\nchat_id = 1\n\n"
                     "bot_token = credential:tok\n")
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "tok").write_text("not a token\n")
    for environ, message in [
            ({}, "credential:tok, but no credentials were passed"),
            ({"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")},
             "credential tok: expected a secret without spaces")]:
        with pytest.raises(pamsignal.ConfigError) as caught:
            pamsignal.load_config(path, environ=environ, as_root=False)
        (problem,) = caught.value.problems
        assert str(problem).startswith(
            "%s:5: [channel:bot] bot_token: %s" % (path, message))


def test_a_channel_name_is_used_once():
    # [channel: tg] and [channel:tg ] are channel tg too: they would share
    # its spool, and one of them would never alert
    found = problems_of(
        "[channel:tg]\ntype = console\n\n[channel: tg]\ntype = webhook\n"
        "url = https://a.example/\n[channel:tg ]\ntype = console\n"
        "[channel:TG]\ntype = console\n")
    assert found == [
        "/etc/p.conf:4: [channel: tg]: channel tg is already [channel:tg] "
        "on line 1 (blanks around a name do not count); give each channel "
        "a name of its own",
        "/etc/p.conf:7: [channel:tg ]: channel tg is already [channel:tg] "
        "on line 1 (blanks around a name do not count); give each channel "
        "a name of its own"]
    assert [channel.name for channel in pamsignal.parse_config(
        "[channel:tg]\ntype = console\n[channel:TG]\ntype = console\n"
    ).channels] == ["tg", "TG"]


@pytest.mark.parametrize("text, expected", [
    ("[geoip]\nasn_db = /a.mmdb\n country_db = /b.mmdb\n",
     "/etc/p.conf:3: [geoip] asn_db: 'country_db = /b.mmdb' is indented, "
     "so it is not a key: an indented line continues the one above "
     "(asn_db); write it at the start of its line"),
    ("[pamsignal]\nstate_dir = /srv/x\n  continued\n",
     "/etc/p.conf:3: [pamsignal] state_dir: an indented line continues the "
     "one above, and state_dir takes one line: write 'continued' at the "
     "start of its line, or join it to the line above"),
    ("[audit]\nkey = /etc/k\n\tmore\n", "/etc/p.conf:3: [audit] key: an "
     "indented line continues the one above, and key takes one line"),
    ("[pamsignal]\njournalctl = journalctl\n  -x\n", "/etc/p.conf:3: "
     "[pamsignal] journalctl: an indented line continues"),
    ("[channel:t]\ntype = telegram\nbot_token = 1:A ; c\n  chat_id: 5\n",
     "/etc/p.conf:4: [channel:t] bot_token: 'chat_id: 5' is indented"),
    ("[alerts]\nignore_users = a,\n  always_users = root\n",
     "/etc/p.conf:3: [alerts] ignore_users: 'always_users = root' is "
     "indented"),
    ("[alerts]\nevents = login_success\n  sudo_command\n", "/etc/p.conf:3: "
     "[alerts] events: an indented line continues the one above, and a list"
     " goes on to the next line only after a comma"),
    ("[pamsignal]\nstate_dir = /srv/a\x0bb\n", "/etc/p.conf:2: [pamsignal] "
     "state_dir: expected an absolute path without control characters"),
    ("[pamsignal]\njournalctl = /bin/j\x01\n", "/etc/p.conf:2: [pamsignal] "
     "journalctl: expected a program name or an absolute path, without "
     "control characters"),
])
def test_an_indented_line_continuing_a_one_line_value_is_an_error(
        text, expected):
    found = problems_of(text)
    assert found[0].startswith(expected), found


def test_lists_and_headers_may_go_on_to_indented_lines():
    config = pamsignal.parse_config(
        "[alerts]\nevents =\n    login_success,\n    sudo_command\n"
        "ignore_sources = 10.0.0.0/8,\n  ::1, 2001:db8::/32\n\n"
        "[channel:hook]\ntype = webhook\nurl = https://a.example/\n"
        "headers = X-One: 1\n  X-Two: 2\n")
    assert config.alerts.events == {"login_success", "sudo_command"}
    assert [str(n) for n in config.alerts.ignore_sources] == [
        "10.0.0.0/8", "::1/128", "2001:db8::/32"]
    (channel,) = config.channels
    assert [h.name for h in channel.options["headers"]] == ["X-One", "X-Two"]


@pytest.mark.parametrize("section, key, value", [
    ("[channel:t]\ntype = telegram\nchat_id = 1\n", "bot_token",
     "credential:../../etc/shadow"),
    ("[channel:t]\ntype = telegram\nchat_id = 1\n", "bot_token",
     "credential:.."),
    ("[channel:t]\ntype = webhook\n", "url", "credential:../x"),
    ("[channel:t]\ntype = webhook\nurl = https://a.example/\n", "headers",
     "Authorization: Bearer credential:a/b"),
    ("[audit]\n", "key", "credential:"),
])
def test_a_bad_credential_name_is_an_error_not_a_secret(section, key,
                                                        value):
    found = problems_of("%s%s = %s\n" % (section, key, value))
    name = value.partition("credential:")[2]
    assert found[0].startswith(
        "/etc/p.conf:%d: " % (section.count("\n") + 1)), found
    assert "invalid credential name %r, expected credential:NAME" % name \
        in found[0], found
