"""The failure detector, driven by events with their own times (no sleeps):
brute force per source, IPv6 /64 and account, and success after failures."""
import json

from support import make_entry, pamsignal

MINUTE = 60 * 1000000


def detector(**settings):
    detection = pamsignal.default_config().detection._replace(**{
        key: pamsignal._threshold(value) for key, value in settings.items()})
    return pamsignal.FailureDetector(detection)


def failure(at_minute, ip="203.0.113.5", user="root", service="sshd",
            reason="bad_password", **fields):
    return pamsignal.Event(
        action="login_failure", reason=reason, service=service,
        timestamp_us=int(at_minute * MINUTE), source_ip=ip, user=user,
        hostname="web1", **fields)


def success(at_minute, ip="203.0.113.5", user="root"):
    return pamsignal.Event(
        action="login_success", service="sshd", auth_method="password",
        timestamp_us=int(at_minute * MINUTE), source_ip=ip, user=user,
        hostname="web1", message="Accepted password for %s" % user)


def feed(found, events):
    results = []
    for event in events:
        results.extend(found.observe(event))
    return results


def by(results, kind):
    return [e for e in results if e.counted_by == kind]


def test_fast_window_fires_once_at_the_threshold():
    found = feed(detector(), [failure(minute, user="u%d" % minute)
                              for minute in range(8)])
    (fired,) = by(found, "source")
    assert fired.action == "brute_force_detected"
    assert fired.timestamp_us == 4 * MINUTE
    assert (fired.attempts, fired.window_s) == (5, 600)
    assert fired.users_tried == ("u0", "u1", "u2", "u3", "u4")
    assert fired.source_ip == "203.0.113.5" and fired.user is None
    assert fired.reason == "repeated_failures"
    ecs = pamsignal.event_to_ecs(fired)
    assert ecs["event"]["severity"] == 8
    assert ecs["pamsignal"]["users_tried"] == ["u0", "u1", "u2", "u3", "u4"]


def test_window_boundary_is_exclusive():
    spread = [0, 2.5, 5, 7.5, 10]  # the fifth exactly 10 minutes on
    assert by(feed(detector(), [failure(m, user="u%s" % m)
                                for m in spread]), "source") == []
    spread[-1] = 9.99
    assert len(by(feed(detector(), [failure(m, user="u%s" % m)
                                    for m in spread]), "source")) == 1


def test_fires_again_only_after_a_window():
    found = feed(detector(), [failure(m * 0.5) for m in range(40)])
    assert [(e.timestamp_us / MINUTE, e.window_s)
            for e in by(found, "source")] == [
        (2.0, 600), (9.5, 86400), (12.0, 600)]


def test_ipv6_sources_add_up_per_64():
    found = feed(detector(), [failure(m, ip="2001:db8:1:2::%x" % m,
                                      user="u%d" % m) for m in range(5)])
    (network,) = by(found, "network")
    assert network.network == "2001:db8:1:2::/64"
    assert network.source_ip is None
    assert by(found, "source") == []
    other = feed(detector(), [failure(m, ip="2001:db8:1:%x::1" % m,
                                      user="u%d" % m) for m in range(5)])
    assert by(other, "network") == []


def test_one_account_counts_across_services_and_sources():
    events = [failure(0, ip="198.51.100.1", user="alice"),
              failure(1, ip=None, user="alice", service="sudo"),
              failure(2, ip=None, user="bob", target_user="alice",
                      service="su"),
              failure(3, ip="198.51.100.2", user="alice"),
              failure(4, ip="2001:db8::7", user="alice")]
    (account,) = by(feed(detector(), events), "user")
    assert account.user == "alice" and account.attempts == 5
    assert "for alice" in account.message


def test_slow_window_catches_what_the_fast_one_misses():
    found = feed(detector(), [failure(m * 30, user="u%d" % m)
                              for m in range(21)])
    assert [(e.window_s, e.attempts) for e in by(found, "source")] == [
        (86400, 20)]


def test_restated_failures_are_not_counted():
    found = feed(detector(), [failure(m, reason=reason) for m, reason in
                              enumerate(["max_attempts", "root_refused"] * 5)])
    assert found == []


def test_sudo_total_counts_its_attempts():
    (fired,) = by(feed(detector(), [
        failure(0, ip=None, user="alice", service="sudo", attempts=3),
        failure(1, ip=None, user="alice", service="sudo", attempts=2)]),
        "user")
    assert fired.attempts == 5


def test_success_after_failures_from_the_same_source():
    found = feed(detector(), [failure(0, user="admin"), failure(1),
                              failure(2), success(3)])
    (alert,) = [e for e in found if e.action == "success_after_failures"]
    assert (alert.counted_by, alert.attempts, alert.window_s) == (
        "source", 3, 3600)
    assert alert.user == "root" and alert.source_ip == "203.0.113.5"
    ecs = pamsignal.event_to_ecs(alert)
    assert ecs["event"]["severity"] == 9
    assert ecs["event"]["outcome"] == "success"
    assert "after 3 failed attempts from 203.0.113.5" in ecs["message"]


def test_success_after_failures_for_the_account_from_elsewhere():
    found = feed(detector(), [
        failure(0, ip=None, user="bob", target_user="root", service="su"),
        failure(1, ip="198.51.100.9"), failure(2, ip="198.51.100.10"),
        success(3, ip="192.0.2.1")])
    (alert,) = [e for e in found if e.action == "success_after_failures"]
    assert alert.counted_by == "user" and alert.attempts == 3


def test_a_typo_or_old_failures_do_not_alert():
    assert feed(detector(), [failure(0), failure(1), success(2)]) == []
    assert feed(detector(), [failure(0), failure(1), failure(2),
                             success(63)]) == []


def test_failures_lead_to_one_alert_not_one_per_success():
    found = feed(detector(), [failure(0), failure(1), failure(2),
                              success(3), success(4), failure(5),
                              success(6)])
    assert len([e for e in found
                if e.action == "success_after_failures"]) == 1


def test_thresholds_are_configurable_and_can_be_off():
    found = feed(detector(brute_force_fast="2 in 1m", brute_force_slow="off",
                          success_after_failures="off"),
                 [failure(0), failure(0.5), success(0.7)])
    # One attack, one alert: the source and the account crossed together.
    assert [(e.action, e.counted_by, e.attempts, e.window_s)
            for e in found] == [("brute_force_detected", "source", 2, 60)]


def test_a_restart_in_the_middle_of_a_window_keeps_counting():
    before = detector()
    assert feed(before, [failure(m, user="u%d" % m) for m in range(3)]) == []
    saved = json.loads(json.dumps(before.to_state()))
    after = detector()
    after.load_state(saved, now_us=5 * MINUTE)
    (fired,) = by(feed(after, [failure(m, user="u%d" % m)
                               for m in (3, 4)]), "source")
    assert fired.attempts == 5
    assert fired.users_tried == ("u0", "u1", "u2", "u3", "u4")


def test_a_first_guess_kept_lightly_still_counts_everywhere():
    # Probation keeps a first guess as (time, user): it must count on
    # after a restart, for success after failures, and mark what it fired.
    before = detector()
    assert feed(before, [failure(0, user="u0")]) == []
    saved = json.loads(json.dumps(before.to_state()))
    assert ["source 203.0.113.5", {"times": [0], "users": ["u0"],
                                   "fired": {}}] in saved["once"]
    after = detector()
    after.load_state(saved, now_us=5 * MINUTE)
    (fired,) = by(feed(after, [failure(m, user="u%d" % m)
                               for m in (1, 2, 3, 4)]), "source")
    assert (fired.attempts, fired.users_tried) == (
        5, ("u0", "u1", "u2", "u3", "u4"))
    once = detector(success_after_failures="1 in 1h")
    found = feed(once, [failure(0, user="u0"), success(1, user="admin"),
                        success(2, user="admin")])
    assert [(e.action, e.counted_by, e.attempts) for e in found] == [
        ("success_after_failures", "source", 1)]


def test_a_threshold_of_one_fires_on_the_first_guess():
    found = feed(detector(brute_force_fast="1 in 1m"), [failure(0)])
    assert [(e.counted_by, e.attempts) for e in found] == [("source", 1)]


def test_foreign_or_corrupt_state_is_skipped():
    found = detector()
    found.load_state({"repeated": [
        ["source 1.2.3.4", {"times": "x"}], "junk",
        ["source 5.6.7.8", {"times": [1, "2", None, 10 ** 30],
                            "users": [1, "a"],
                            "fired": {"fast": "x", "slow": 10 ** 30}}], 7],
        "once": "junk"}, now_us=MINUTE)
    assert dict(found.counters) == {"source 5.6.7.8": {
        "times": [1], "users": ["a"], "fired": {}}}
    found.load_state([["not", "a dict"]], now_us=MINUTE)
    assert len(found.counters) == 0 and len(found.probation) == 0


def test_a_saved_name_repeated_is_restored_once_and_tried_again_last():
    # A record's users tried never holds a name twice (the counters rely
    # on it); a state file written otherwise is read that way.
    found = detector()
    found.load_state({"repeated": [
        ["source 203.0.113.5", {"times": [1, 2, 3], "users": [
            "a", "b", "a", "c"], "fired": {}}]]}, now_us=MINUTE)
    assert found.counters["source 203.0.113.5"]["users"] == ["a", "b", "c"]
    (fired,) = by(feed(found, [failure(0.5, user="a"),
                               failure(0.6, user="d")]), "source")
    assert fired.users_tried == ("b", "c", "a", "d")


def test_counters_are_bounded_and_a_flood_cannot_evict_repeat_offenders():
    found = pamsignal.FailureDetector(
        pamsignal.default_config().detection, limit=100)
    feed(found, [failure(m * 0.01) for m in range(4)])  # root, 4 guesses
    feed(found, [failure(1 + n * 0.001, ip="10.0.%d.%d" % (n // 250,
                                                          n % 250),
                         user="n%d" % n) for n in range(1000)])
    assert len(found.probation) == 100 and len(found.counters) == 2
    assert "source 10.0.3.249" in found.probation
    (fired,) = by(feed(found, [failure(2)]), "source")
    assert fired.attempts == 5, "the flood did not wipe the 4 guesses"


def test_scan_finds_the_attack_in_an_old_export(tmp_path):
    import io
    export = tmp_path / "old.json"
    lines = [make_entry("sshd", "Failed password for root from 203.0.113.5 "
                        "port %d ssh2" % (4000 + n), sequence=n)
             for n in range(5)]
    lines.append(make_entry("sshd", "Accepted password for root from "
                            "203.0.113.5 port 4100 ssh2", sequence=9))
    export.write_text("".join(json.dumps(e) + "\n" for e in lines))
    out = io.StringIO()
    assert pamsignal.main(["--config", str(tmp_path / "none.conf"), "scan",
                           "--json", str(export)], stdout=out) == 78
    assert pamsignal.main(["scan", "--json", str(export)], stdout=out) == 0
    actions = [json.loads(line)["event"]["action"]
               for line in out.getvalue().splitlines()]
    assert actions.count("brute_force_detected") == 1  # one attack
    assert actions[-2:] == ["login_success", "success_after_failures"]


def test_many_invalid_user_names_from_one_source_are_enumeration():
    names = ["admin", "oracle", "test", "admin", "ubuntu", "pi", "git",
             "ftp", "www", "guest", "postgres"]
    found = feed(detector(brute_force_fast="off", brute_force_slow="off"), [
        failure(m * 0.5, user=name, reason="invalid_user")
        for m, name in enumerate(names)])
    (enumeration,) = [e for e in found if e.reason == "user_enumeration"]
    assert enumeration.counted_by == "source"
    assert enumeration.attempts == 10  # distinct names; "admin" twice
    assert enumeration.timestamp_us == 10 * 0.5 * MINUTE
    assert sorted(enumeration.users_tried) == sorted(set(names))
    ecs = pamsignal.event_to_ecs(enumeration)
    assert ecs["event"]["reason"] == "user_enumeration"
    assert "10 invalid user names tried in 600 s from 203.0.113.5" \
        == ecs["message"]


def test_wrong_passwords_of_real_accounts_are_not_enumeration():
    found = feed(detector(brute_force_fast="off", brute_force_slow="off"), [
        failure(m, user="u%d" % m) for m in range(12)])
    assert found == []


def test_one_account_from_many_sources_is_a_distributed_attack():
    found = feed(detector(brute_force_fast="off", brute_force_slow="off"), [
        failure(m * 5, ip="198.51.100.%d" % m, user="alice")
        for m in range(11)])
    (attack,) = [e for e in found if e.reason == "distributed_attack"]
    assert attack.counted_by == "user" and attack.user == "alice"
    assert attack.attempts == 10 and attack.window_s == 3600
    assert attack.sources == tuple("198.51.100.%d" % m for m in range(10))
    assert pamsignal.event_to_ecs(attack)["pamsignal"]["sources"][0] == \
        "198.51.100.0"
    spread = feed(detector(brute_force_fast="off", brute_force_slow="off"), [
        failure(m * 7, ip="198.51.100.%d" % m, user="alice")
        for m in range(11)])
    assert spread == [], "10 sources over more than an hour"


def test_enumeration_and_sources_survive_a_restart():
    before = detector()
    feed(before, [failure(m, user="n%d" % m, reason="invalid_user",
                          ip="203.0.113.9") for m in range(6)])
    after = detector()
    saved = json.loads(json.dumps(before.to_state()))
    saved["repeated"].append(
        ["source 9.9.9.9", {"times": [], "users": [], "fired": {},
                            "invalid": [["x", "late"], "junk"]}])
    after.load_state(saved, now_us=6 * MINUTE)
    assert after.counters["source 9.9.9.9"]["invalid"] == {}
    found = feed(after, [failure(6 + m, user="m%d" % m, reason="invalid_user",
                                 ip="203.0.113.9") for m in range(4)])
    assert [e.attempts for e in found if e.reason == "user_enumeration"] == [
        10]


DAY = 24 * 60 * MINUTE


def sudo(at_minute, user="alice", target="root"):
    return pamsignal.Event(
        action="sudo_command", service="sudo", user=user, target_user=target,
        command_line="/usr/bin/id", timestamp_us=int(at_minute * MINUTE),
        message="%s : USER=%s ; COMMAND=/usr/bin/id" % (user, target))


def baseline_feed(baseline, events):
    return [(e.action, e.user, e.network) for e in feed(baseline, events)]


def test_new_network_for_a_user_alerts_after_learning():
    baseline = pamsignal.Baseline(learning_period_s=7 * 86400)
    assert baseline_feed(baseline, [
        success(0, ip="203.0.113.5", user="alice"),
        success(1, ip="2001:db8:1:2::9", user="alice")]) == []  # learning
    week = 7 * DAY / MINUTE
    assert baseline_feed(baseline, [
        success(week + 1, ip="203.0.113.77", user="alice"),  # same /24
        success(week + 2, ip="2001:db8:1:2::1", user="alice"),  # same /64
        success(week + 3, ip="198.51.100.7", user="alice"),
        success(week + 4, ip="198.51.100.8", user="alice"),
        success(week + 5, ip="198.51.100.7", user="bob"),
    ]) == [("new_source", "alice", "198.51.100.0/24"),
           ("new_source", "bob", "198.51.100.0/24")]


def test_new_source_event_carries_the_login():
    baseline = pamsignal.Baseline(learning_period_s=0)
    (alert,) = feed(baseline, [success(5, ip="192.0.2.44", user="carol")])
    ecs = pamsignal.event_to_ecs(alert)
    assert ecs["event"]["action"] == "new_source"
    assert ecs["event"]["severity"] == 6
    assert ecs["source"]["ip"] == "192.0.2.44"
    assert ecs["pamsignal"]["network"] == "192.0.2.0/24"
    assert ecs["event"]["reason"] == "new_network"
    assert ecs["message"].startswith("carol logged in from 192.0.2.0/24")


def located(at_minute, ip, asn=None, country=None, user="alice"):
    """A login as the enrichment stage leaves it."""
    return success(at_minute, ip=ip, user=user)._replace(
        source_as_number=asn, source_country=country,
        source_as_org=None if asn is None else "ORG-%d" % asn)


def test_new_asn_and_new_country_are_noticed_once_enriched():
    baseline = pamsignal.Baseline(learning_period_s=0)
    found = feed(baseline, [
        located(0, "203.0.113.5"),                           # first ever
        located(1, "203.0.113.6", 64500, "VN"),   # first with context
        located(2, "203.0.114.6", 64500, "VN"),   # other /24, same AS
        located(3, "203.0.113.7", 64501, "VN"),   # known /24, other AS
        located(4, "198.51.100.1", 64502, "DE"),  # all new: country wins
        located(5, "198.51.100.2", 64502, "DE"),  # nothing new
        located(6, "192.0.2.1", 64500, "VN"),     # a /24 never seen
    ])
    assert [(e.action, e.reason, e.network) for e in found] == [
        ("new_source", "new_network", "203.0.113.0/24"),
        ("new_source", "new_network", "203.0.114.0/24"),
        ("new_source", "new_asn", "203.0.113.0/24"),
        ("new_source", "new_country", "198.51.100.0/24"),
        ("new_source", "new_network", "192.0.2.0/24")]
    assert found[2].message.startswith(
        "alice logged in from AS64501 (ORG-64501), never seen")
    assert found[3].message.startswith(
        "alice logged in from country DE, never seen")
    ecs = pamsignal.event_to_ecs(found[3])
    assert ecs["event"]["reason"] == "new_country"
    assert ecs["source"]["geo"] == {"country_iso_code": "DE"}
    assert baseline.asns["alice"] == [64501, 64502, 64500]  # latest last
    assert baseline.countries["alice"] == ["DE", "VN"]


def test_new_asn_and_country_are_learned_quietly_too():
    baseline = pamsignal.Baseline(learning_period_s=DAY // 1000000)
    assert feed(baseline, [located(0, "203.0.113.5", 64500, "VN"),
                           located(1, "198.51.100.1", 64501, "DE")]) == []
    later = 24 * 60 + 1
    assert [e.reason for e in feed(baseline, [
        located(later, "198.51.100.9", 64501, "DE"),
        located(later + 1, "198.51.100.10", 64502, "DE"),
        located(later + 2, "198.51.100.11", 64502, "FR")])] == [
        "new_asn", "new_country"]


def test_a_baseline_saved_before_enrichment_still_loads():
    old = {"started_us": 0, "networks": [["alice", ["203.0.113.0/24"]]],
           "sudo_users": [["alice", 5]]}
    baseline = pamsignal.Baseline(learning_period_s=0)
    baseline.load_state(json.loads(json.dumps(old)), now_us=MINUTE)
    assert baseline.networks["alice"] == ["203.0.113.0/24"]
    assert len(baseline.asns) == 0 and len(baseline.countries) == 0
    assert feed(baseline, [located(1, "203.0.113.9", 64500, "VN")]) == []
    saved = json.loads(json.dumps(baseline.to_state()))
    assert saved["asns"] == [["alice", [64500]]]
    saved["asns"].append(["bob", [1, "two", None, 3]])
    saved["countries"] = "junk"
    restored = pamsignal.Baseline(learning_period_s=0)
    restored.load_state(saved, now_us=MINUTE)
    assert restored.asns["bob"] == [1, 3] and len(restored.countries) == 0


def test_first_sudo_by_a_user_alerts_once():
    baseline = pamsignal.Baseline(learning_period_s=DAY // 1000000)
    assert feed(baseline, [sudo(0, user="alice")]) == []
    found = feed(baseline, [sudo(24 * 60 + 1, user="alice"),
                            sudo(24 * 60 + 2, user="mallory"),
                            sudo(24 * 60 + 3, user="mallory")])
    assert [(e.action, e.user, pamsignal.event_to_ecs(e)["event"]
             ["severity"]) for e in found] == [
        ("new_sudo_user", "mallory", 7)]


def test_baseline_survives_a_restart_and_skips_damage():
    before = pamsignal.Baseline(learning_period_s=0)
    feed(before, [success(0, ip="203.0.113.5", user="alice"),
                  sudo(1, user="alice")])
    after = pamsignal.Baseline(learning_period_s=0)
    saved = json.loads(json.dumps(before.to_state()))
    saved["networks"].append(["bob", "not a list"])
    after.load_state(saved, now_us=MINUTE)
    assert after.started_us == 0
    assert feed(after, [success(2, ip="203.0.113.9", user="alice"),
                        sudo(3, user="alice")]) == []
    assert "bob" not in after.networks
    after.load_state("junk", now_us=MINUTE)
    assert after.started_us is None and len(after.networks) == 0
    after.load_state({"started_us": 10 ** 18}, now_us=MINUTE)
    assert after.started_us is None, "a start far ahead: learning for ever"


def test_baseline_is_bounded():
    baseline = pamsignal.Baseline(learning_period_s=0, limit=50)
    feed(baseline, [success(n, ip="10.%d.0.1" % (n % 250), user="u%d" % n)
                    for n in range(500)])
    assert len(baseline.networks) == 50
    feed(baseline, [success(600 + n, ip="10.9.%d.1" % n, user="u499")
                    for n in range(100)])
    assert len(baseline.networks["u499"]) == pamsignal.MAX_NETWORKS_PER_USER


def test_root_access_weighs_more():
    def severity(event):
        return pamsignal.event_to_ecs(
            pamsignal.privileged_severity(event))["event"]["severity"]
    assert severity(success(0, user="root")) == 7
    assert severity(success(0, user="alice")) == 5
    su_root = success(0, user="alice")._replace(service="su",
                                                target_user="root")
    assert severity(su_root) == 6
    assert severity(sudo(0, target="root")) == 5
    assert severity(sudo(0, target="www-data")) == 4


def test_a_clock_set_back_does_not_inflate_the_count():
    found = feed(detector(), [failure(60 + m * 0.1, user="u%d" % m)
                              for m in range(4)] + [failure(1, user="x")])
    assert by(found, "source") == []


def test_times_from_a_clock_far_ahead_are_dropped():
    ahead = 30 * DAY / MINUTE
    events = [failure(ahead + m, user="u%d" % m) for m in range(20)]
    events += [failure(m * 0.1, user="v%d" % m) for m in range(5)]
    found = feed(detector(brute_force_slow="off"), events)
    assert [e.timestamp_us for e in by(found, "source")] == [
        int((ahead + 4) * MINUTE), int((ahead + 14) * MINUTE),
        int(0.4 * MINUTE)]


def test_names_and_sources_from_a_clock_far_ahead_are_dropped():
    # Seen at a time a day or more ahead, then the clock is set back: once
    # it catches up, the stale entry must not count again.
    names = feed(detector(user_enumeration="2 in 10m"), [
        failure(m, user=name, reason="invalid_user")
        for m, name in ((3 * DAY / MINUTE, "a"), (0, "c"),
                        (3 * DAY / MINUTE + 1, "b"))])
    assert [e for e in names if e.reason == "user_enumeration"] == []
    sources = feed(detector(brute_force_fast="off", brute_force_slow="off",
                            distributed_attack="2 in 10m"), [
        failure(m, ip=ip, user="alice")
        for m, ip in ((3 * DAY / MINUTE, "198.51.100.1"),
                      (0, "198.51.100.2"),
                      (3 * DAY / MINUTE + 1, "198.51.100.3"))])
    assert [e for e in sources if e.reason == "distributed_attack"] == []


def test_invalid_user_announcements_are_names_not_guesses():
    events = []
    for n in range(5):
        events.append(failure(n, user="bot%d" % n, reason="invalid_user"))
        events.append(failure(n + 0.5, user="bot%d" % n,
                              reason="invalid_user", auth_method="password"))
    found = feed(detector(), events)
    (fired,) = by(found, "source")
    assert fired.attempts == 5 and fired.timestamp_us == 4.5 * MINUTE


def test_sudo_refusals_are_not_guesses():
    events = [failure(m, ip=None, user="alice", service="sudo",
                      reason="password_required") for m in range(6)]
    events.append(pamsignal.Event(
        action="login_success", service="sshd", user="alice",
        source_ip="192.0.2.1", timestamp_us=7 * MINUTE))
    assert feed(detector(), events) == []


def test_a_distributed_attack_counts_an_ipv6_64_as_one_source():
    found = feed(detector(brute_force_fast="off", brute_force_slow="off"), [
        failure(m, ip="2001:db8:7:7::%x" % m, user="alice")
        for m in range(12)])
    assert [e for e in found if e.reason == "distributed_attack"] == []
