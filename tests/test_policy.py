"""Alert policy and throttling: which events a channel alerts on, cooldowns,
rate limits and the digests of what they held back. The clock is an
argument (microseconds), so nothing sleeps."""
import io
import ipaddress
import json

import pytest

from support import make_entry, pamsignal

SECOND = 1000000
MINUTE = 60 * SECOND


def policy(text=""):
    return pamsignal.parse_config("[alerts]\n" + text).alerts


def event(action="login_failure", ip="203.0.113.5", user="root", at=0,
          service="sshd", **fields):
    return pamsignal.Event(action=action, source_ip=ip, user=user,
                           service=service, hostname="web1",
                           timestamp_us=at, **fields)


def throttle(cooldown="10m", rate="20 in 1m", limit=None):
    config = policy("cooldown = %s\nrate_limit = %s\n" % (cooldown, rate))
    if limit is None:
        return pamsignal.Throttle(config.cooldown, config.rate_limit)
    return pamsignal.Throttle(config.cooldown, config.rate_limit, limit)


def actions(alerts):
    return [alert.action for alert in alerts]


def held_total(alerts):
    return sum(alert.held_back for alert in alerts
               if alert.action == "alert_digest")


# ------------------------------------------------------------- configuration


def test_defaults_fit_a_small_server():
    alerts = pamsignal.default_config().alerts
    assert alerts.events == set(pamsignal.ACTIONS) - {
        "login_failure", "session_opened", "session_closed", "ssh_probe",
        "source_throttled"}
    assert "success_after_failures" in alerts.events
    # A broken key login is the admin's own problem: it alerts.
    assert "key_file_refused" in alerts.events
    assert alerts.cooldown == 600 and alerts.rate_limit == (20, 60)
    assert alerts.min_severity == 0 and alerts.ignore_users == ()


def test_event_lists_read_left_to_right():
    assert policy("events = default, login_failure, -sudo_command\n"
                  ).events == (set(pamsignal.ACTIONS) - {
                      "session_opened", "session_closed", "sudo_command",
                      "ssh_probe", "source_throttled"})
    assert policy("events = *, -session_closed\n").events == \
        set(pamsignal.ACTIONS) - {"session_closed"}
    assert policy("events = login_success\n").events == {"login_success"}


@pytest.mark.parametrize("line, message", [
    ("min_severity = 11", "expected a severity from 0 to 10, got '11'"),
    ("min_severity = high", "expected a severity from 0 to 10, got 'high'"),
    ("ignore_sources = 10.0.0.0/33", "expected addresses or CIDR blocks "
     "such as 192.0.2.0/24 or 2001:db8::/32, got '10.0.0.0/33'"),
    ("ignore_users = alice, bob smith", "expected comma-separated names "
     "(patterns such as deploy-* allowed), got 'bob smith'"),
    ("cooldown = soon", "expected a duration such as 90s, 10m, 24h or 7d, "
     "got 'soon'"),
    ("rate_limit = 20/min", "expected 'N in DURATION' (N from 1 to 1000, "
     "such as 5 in 10m) or off, got '20/min'"),
    ("events = ", "expected *, default or a list of actions, got nothing"),
    ("cooldwn = 1m", "unknown key (did you mean 'cooldown'?)"),
])
def test_bad_values_are_named_with_their_line(line, message):
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.parse_config("[alerts]\n" + line + "\n", "/etc/p.conf")
    (problem,) = raised.value.problems
    key = line.split("=")[0].strip()
    assert str(problem) == "/etc/p.conf:2: [alerts] %s: %s" % (key, message)


def test_a_channel_overrides_only_what_it_sets():
    config = pamsignal.parse_config(
        "[alerts]\nmin_severity = 5\nignore_users = deploy\ncooldown = 1m\n"
        "[channel:pager]\ntype = console\nmin_severity = 8\n"
        "[channel:log]\ntype = console\nevents = *\ncooldown = off\n"
        "rate_limit = off\n")
    pager, log = config.channels
    assert pager.policy.min_severity == 8
    assert pager.policy.ignore_users == ("deploy",)
    assert pager.policy.cooldown == 60
    assert log.policy.min_severity == 5 and log.policy.cooldown == 0
    assert log.policy.rate_limit == (0, 0)
    assert log.policy.events == set(pamsignal.ACTIONS)


# -------------------------------------------------------------------- policy


def test_routine_events_are_counted_not_alerted():
    defaults = pamsignal.default_config().alerts
    assert not pamsignal.policy_admits(defaults, event("login_failure"))
    assert not pamsignal.policy_admits(defaults, event("session_opened"))
    for action in ("login_success", "sudo_command", "brute_force_detected",
                   "success_after_failures", "spoofed_entry", "new_source"):
        assert pamsignal.policy_admits(defaults, event(action)), action


def test_minimum_severity_uses_the_event_or_its_action_default():
    config = policy("min_severity = 6\n")
    assert not pamsignal.policy_admits(config, event("login_success"))
    assert pamsignal.policy_admits(config,
                                   event("login_success", severity=7))
    assert pamsignal.policy_admits(config, event("brute_force_detected"))


def test_ignored_users_groups_and_sources():
    config = policy("ignore_users = deploy-*, backup\n"
                    "ignore_groups = robots\n"
                    "ignore_sources = 10.0.0.0/8, 2001:db8::/32\n")
    groups = {"carol": ("staff", "robots")}.get
    admits = lambda e: pamsignal.policy_admits(  # noqa: E731
        config, e, lambda user: groups(user, ()))
    assert not admits(event("login_success", user="deploy-web"))
    assert not admits(event("login_success", user="backup"))
    assert admits(event("login_success", user="backups"))
    assert not admits(event("login_success", user="carol"))
    assert not admits(event("login_success", ip="10.1.2.3", user="alice"))
    assert not admits(event("login_success", ip="2001:db8::7", user="alice"))
    assert admits(event("login_success", ip="11.1.2.3", user="alice"))
    # A host name or a missing source never matches a block.
    assert admits(event("login_success", ip=None, user="alice",
                        source_domain="10.0.0.1.example"))


def test_always_wins_over_events_severity_and_ignore_lists():
    config = policy("events = login_success\nmin_severity = 9\n"
                    "ignore_sources = 198.51.100.0/24\n"
                    "always_sources = 198.51.100.7\n"
                    "always_users = root\nalways_groups = admins\n")
    groups = lambda user: ("admins",) if user == "dave" else ()  # noqa: E731
    assert pamsignal.policy_admits(config, event(ip="198.51.100.7",
                                                 user="x"), groups)
    assert not pamsignal.policy_admits(config, event(ip="198.51.100.8",
                                                     user="x"), groups)
    assert pamsignal.policy_admits(config, event(user="root"), groups)
    assert pamsignal.policy_admits(config, event(user="dave"), groups)
    assert not pamsignal.policy_admits(config, event(user="erin"), groups)


def test_group_directory_reads_the_real_account_database():
    directory = pamsignal.GroupDirectory()
    assert "root" in directory.groups_of("root")
    assert directory.groups_of("no-such-user-here") == ()


# ---------------------------------------------------------------- throttling


def test_cooldown_holds_repeats_and_digests_them_when_it_ends():
    gate = throttle(cooldown="10m", rate="off")
    sent = gate.admit(event(), 0)
    assert actions(sent) == ["login_failure"]
    for second in range(1, 40):
        assert gate.admit(event(user="u%d" % second), second * SECOND) == []
    assert gate.due(10 * MINUTE - 1) == []
    (digest,) = gate.due(10 * MINUTE)
    assert digest.action == "alert_digest" and digest.reason == "cooldown"
    assert digest.held_back == 39 and digest.detail == "39 login_failure"
    assert digest.sources == ("203.0.113.5",)
    assert digest.users_tried == tuple("u%d" % n for n in range(1, 11))
    assert digest.window_s == 599
    assert digest.timestamp_us == 10 * MINUTE
    assert "held back 39 alerts" in digest.message
    ecs = pamsignal.event_to_ecs(digest)
    assert ecs["pamsignal"]["held_back"] == 39
    assert ecs["event"]["severity"] == 3  # the worst it held


def test_cooldown_runs_again_while_repeats_come_then_lets_go():
    gate = throttle(cooldown="1m", rate="off")
    gate.admit(event(), 0)
    gate.admit(event(), 30 * SECOND)
    assert held_total(gate.due(MINUTE)) == 1
    # Still cooling: a repeat now is held for the next digest.
    assert gate.admit(event(), 90 * SECOND) == []
    assert held_total(gate.due(2 * MINUTE)) == 1
    # A quiet cooldown ends without a digest; the next one goes out.
    assert gate.due(3 * MINUTE) == []
    assert actions(gate.admit(event(), 3 * MINUTE + 1)) == ["login_failure"]


def test_keys_are_per_action_source_and_user():
    gate = throttle(cooldown="10m", rate="off")
    assert gate.admit(event(), 0)
    assert gate.admit(event(ip="198.51.100.1"), 1)
    assert gate.admit(event(user="admin"), 2) == []  # the same source
    assert gate.admit(event(ip=None, user="admin", service="sudo"), 2)
    assert gate.admit(event(ip=None, user="alice", service="sudo"), 2)
    assert gate.admit(event("brute_force_detected"), 3)
    # Forgeries are keyed by the forging UID (an int).
    forged = event("spoofed_entry", ip=None, user=None, writer_uid=1000)
    assert gate.admit(forged, 6)
    assert gate.admit(forged, 7) == []
    assert gate.admit(forged._replace(writer_uid=1001), 8)
    # One IPv6 /64 is one attacker.
    assert gate.admit(event(ip="2001:db8:1:2::1"), 4)
    assert gate.admit(event(ip="2001:db8:1:2::99"), 5) == []


def test_a_flood_of_failures_never_holds_back_a_successful_login():
    gate = throttle(cooldown="10m", rate="5 in 1m")
    sent = []
    for n in range(1000):
        sent += gate.admit(event("brute_force_detected",
                                 ip="198.51.%d.%d" % (n // 250, n % 250)),
                           n * 1000)
        if n == 500:
            success = gate.admit(event("login_success"), n * 1000)
            assert actions(success) == ["login_success"]
            after = gate.admit(event("success_after_failures"), n * 1000)
            assert actions(after) == ["success_after_failures"]
    assert actions(sent) == ["brute_force_detected"] * 5


def test_rate_limit_sends_one_digest_per_window_until_the_flood_stops():
    gate = throttle(cooldown="off", rate="3 in 1m")
    sent = []
    for n in range(300):  # 5 minutes, one a second
        sent += gate.admit(event(ip="192.0.2.%d" % (n % 200)), n * SECOND)
        sent += gate.due(n * SECOND)
    digests = [a for a in sent if a.action == "alert_digest"]
    assert actions(sent[:3]) == ["login_failure"] * 3
    assert len(digests) == 4  # at 63 s, 123 s, 183 s and 243 s
    assert all(d.reason == "rate_limit" for d in digests)
    assert [d.timestamp_us // SECOND for d in digests] == [63, 123, 183, 243]
    assert len(digests[0].sources) == pamsignal.MAX_DIGEST_NAMES
    rest = gate.due(400 * SECOND)
    assert held_total(rest) == 300 - 3 - held_total(digests)
    # The flood is over: the window after the last digest was quiet.
    assert gate.due(500 * SECOND) == []
    assert actions(gate.admit(event(), 500 * SECOND)) == ["login_failure"]


def test_nothing_held_is_lost_even_past_the_key_limit():
    gate = throttle(cooldown="10m", rate="off", limit=3)
    admitted = 0
    sent = []
    for n in range(50):
        for repeat in range(4):
            sent += gate.admit(event(ip="192.0.2.%d" % n), n * 10 + repeat)
            admitted += 1
    sent += gate.drain()
    assert len(gate.cooling) == 0
    individual = len([a for a in sent if a.action != "alert_digest"])
    assert individual + held_total(sent) == admitted


def test_drain_gives_every_pending_digest_at_once():
    gate = throttle(cooldown="10m", rate="2 in 1m")
    for n in range(10):
        gate.admit(event(ip="192.0.2.%d" % (n % 3)), n)
    pending = gate.drain()
    assert sorted(d.reason for d in pending) == [
        "cooldown", "cooldown", "rate_limit"]
    assert held_total(pending) == 8
    assert gate.drain() == []


def test_a_clock_going_backwards_does_not_reopen_a_cooldown():
    gate = throttle(cooldown="10m", rate="off")
    gate.admit(event(), 5 * MINUTE)
    assert gate.admit(event(), 1 * MINUTE) == []  # treated as 5 minutes
    assert held_total(gate.due(15 * MINUTE)) == 1


# ---------------------------------------------------------------- pipeline


def failed_entry(n, ip="203.0.113.9"):
    return make_entry("sshd", "Failed password for root from %s port %d "
                      "ssh2" % (ip, 40000 + n), pid=500 + n,
                      realtime_us=1700000000000000 + n * SECOND)


def test_pipeline_routes_each_channel_through_its_own_policy():
    clock = [1700000000.0]
    screen, pager = io.StringIO(), io.StringIO()
    config = pamsignal.parse_config(
        "[detection]\nbrute_force_fast = 3 in 10m\n"
        "[channel:screen]\ntype = console\nformat = json\nevents = *\n"
        "cooldown = off\nrate_limit = off\n"
        "[channel:pager]\ntype = console\nformat = json\n")
    channels = [
        pamsignal.Channel(pamsignal.ConsoleSink(c.name, c.options, stream),
                          pamsignal.ChannelGate(c.policy))
        for c, stream in zip(config.channels, (screen, pager))]
    pipeline = pamsignal.Pipeline(channels, config.detection,
                                  clock=lambda: clock[0])
    for n in range(8):
        pipeline.process_entry(pamsignal.decode_line(json.dumps(
            failed_entry(n)).encode()))
    seen = [json.loads(line)["event"]["action"]
            for line in screen.getvalue().splitlines()]
    paged = [json.loads(line) for line in pager.getvalue().splitlines()]
    assert seen.count("login_failure") == 8
    # One attack, one alert; failures are counted, not paged.
    assert [p["event"]["action"] for p in paged] == ["brute_force_detected"]
    clock[0] += 3600
    pipeline.tick()
    assert len(pager.getvalue().splitlines()) == 1  # nothing was held


def test_scan_prints_every_event_whatever_the_policy(tmp_path):
    conf = tmp_path / "p.conf"
    conf.write_text("[alerts]\nevents = login_success\nmin_severity = 10\n")
    export = tmp_path / "export.json"
    export.write_text("".join(json.dumps(failed_entry(n)) + "\n"
                              for n in range(2)))
    out = io.StringIO()
    assert pamsignal.main(["--config", str(conf), "scan", str(export)],
                          out) == 0
    assert out.getvalue().count("login_failure") == 2


def test_ignore_sources_written_as_mapped_ipv6_match_plain_ipv4():
    config = policy("ignore_sources = ::ffff:10.0.0.0/104\n")
    assert config.ignore_sources == (ipaddress.ip_network("10.0.0.0/8"),)
    assert not pamsignal.policy_admits(config, event("login_success",
                                                     ip="10.0.0.1"))


# ------------------------------------------------------ repeats of access


def sudo(command="/bin/true", user="mallory", at=0):
    return event("sudo_command", ip=None, user=user, service="sudo",
                 target_user="root", command_line=command, at=at)


def test_identical_access_repeats_fold_into_a_counted_digest():
    gate = pamsignal.Throttle(0, pamsignal.Threshold(0, 0),
                              repeats=pamsignal.Threshold(3, 60))
    sent = []
    for n in range(60):  # the red team's 60 `sudo -n /bin/true`
        sent += gate.admit(sudo(at=n * 100), n * 100)
    assert actions(sent) == ["sudo_command"] * 3
    assert [alert.repeat for alert in sent] == [None, 1, 2]
    (digest,) = gate.due(MINUTE)
    assert digest.action == "alert_digest" and digest.reason == "repeat"
    assert digest.held_back == 57 and digest.detail == "57 sudo_command"
    # It names what repeated.
    assert (digest.user, digest.target_user, digest.command_line) == (
        "mallory", "root", "/bin/true")
    assert "/bin/true" in pamsignal.render_text(digest)
    assert "57 sudo_command" in pamsignal.alert_text(digest).title or \
        "57 (57 sudo_command)" in dict(pamsignal.alert_text(digest).facts)[
            "Held back"]


def test_a_unique_access_is_never_folded_with_a_repeat_of_another():
    gate = pamsignal.Throttle(600, pamsignal.Threshold(20, 60),
                              repeats=pamsignal.Threshold(3, 600))
    for n in range(100):
        gate.admit(sudo(at=n), n)
    # Each differs in one field: command, user, target, source, outcome.
    unique = [sudo(command="/bin/sh"), sudo(user="alice"),
              sudo()._replace(target_user="postgres"),
              event("login_success", ip="198.51.100.7", user="mallory"),
              event("login_success", ip="198.51.100.8", user="mallory"),
              event("success_after_failures", user="root")]
    for alert in unique:
        assert gate.admit(alert, 200) == [alert]


def test_repeats_are_counted_again_after_a_quiet_window():
    gate = pamsignal.Throttle(0, pamsignal.Threshold(0, 0),
                              repeats=pamsignal.Threshold(1, 60))
    assert gate.admit(sudo(), 0)
    assert gate.admit(sudo(), SECOND) == []
    assert held_total(gate.due(MINUTE)) == 1
    assert gate.admit(sudo(), MINUTE + 1) == []  # the flood goes on
    assert held_total(gate.drain()) == 1
    gate = pamsignal.Throttle(0, pamsignal.Threshold(0, 0),
                              repeats=pamsignal.Threshold(1, 60))
    gate.admit(sudo(), 0)
    assert gate.due(MINUTE) == []  # nothing repeated: let go
    assert gate.admit(sudo(), MINUTE + 1)


def test_repeats_key_is_configured_and_validated():
    assert pamsignal.default_config().alerts.repeats == (3, 600)
    assert policy("repeats = off\n").repeats == (0, 0)
    assert policy("repeats = 5 in 1h\n").repeats == (5, 3600)
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.parse_config("[alerts]\nrepeats = many\n", "/etc/p.conf")
    assert str(raised.value.problems[0]) == (
        "/etc/p.conf:2: [alerts] repeats: expected 'N in DURATION' (N from "
        "1 to 1000, such as 5 in 10m) or off, got 'many'")
    (channel,) = pamsignal.parse_config(
        "[channel:c]\ntype = console\nrepeats = 1 in 1m\n").channels
    assert channel.policy.repeats == (1, 60)


def test_the_gate_folds_sudo_floods_by_default():
    gate = pamsignal.ChannelGate(pamsignal.default_config().alerts)
    sent = []
    for n in range(60):
        sent += gate.admit(sudo(at=n), n * SECOND)
    assert actions(sent) == ["sudo_command"] * 3
    assert held_total(gate.drain()) == 57


def test_no_repeat_is_lost_past_the_key_limit():
    gate = pamsignal.Throttle(0, pamsignal.Threshold(0, 0), limit=2,
                              repeats=pamsignal.Threshold(1, 600))
    sent, admitted = [], 0
    for n in range(20):
        for _ in range(3):
            sent += gate.admit(sudo(command="/bin/cmd%d" % n), n)
            admitted += 1
    sent += gate.drain()
    assert len(gate.repeating) == 0
    individual = [a for a in sent if a.action != "alert_digest"]
    assert len(individual) == 20  # every distinct command once
    assert len(individual) + held_total(sent) == admitted


@pytest.mark.parametrize("change", [
    {"events": pamsignal.SHOW_EVERYTHING.events - {"session_closed"}},
    {"min_severity": 1}, {"ignore_users": ("bob",)},
    {"ignore_groups": ("staff",)},
    {"ignore_sources": (ipaddress.ip_network("10.0.0.0/8"),)},
    {"cooldown": 60}, {"rate_limit": pamsignal.Threshold(5, 60)},
    {"repeats": pamsignal.Threshold(3, 60)}])
def test_only_a_policy_that_holds_nothing_lets_events_straight_through(
        change):
    # The gate skips its policy and throttle only when neither could
    # ever keep an event back; any restriction makes it weigh each one.
    assert pamsignal.passes_everything(pamsignal.SHOW_EVERYTHING)
    policy = pamsignal.SHOW_EVERYTHING._replace(**change)
    assert not pamsignal.passes_everything(policy)
    gate = pamsignal.ChannelGate(policy, groups_of=lambda user: ("staff",))
    events = [pamsignal.Event(action=("session_closed", "login_success")[
        n % 2], user="bob", source_ip="10.0.0.1", service="sshd",
        timestamp_us=1000000 * n, severity=0) for n in range(12)]
    admitted = [alert for number, event in enumerate(events)
                for alert in gate.admit(event, 1000000 * number)]
    assert admitted != events  # something was kept back or filtered
    straight = pamsignal.ChannelGate(pamsignal.SHOW_EVERYTHING)
    assert [alert for number, event in enumerate(events)
            for alert in straight.admit(event, 1000000 * number)] == events
