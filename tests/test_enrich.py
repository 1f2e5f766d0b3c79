"""Enrichment: source ASN/country/provider from MaxMind DB files, the
destination of a live SSH session from /proc/net/tcp*, the host's
addresses and provider (fixture trees under tests/fixtures), the
`lookup` command, and the stage in the pipeline."""
import io
import json
import os
import shutil
import sys
import tracemalloc

import pytest

from mmdb_writer import MMDBWriter, Typed, heavy_records_database
from support import make_entry, pamsignal, write_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "fixtures")
NET_ROOT = os.path.join(FIXTURES, "netroot")

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little",
    reason="the /proc/net fixtures were written on a little-endian host")


def write_database(path, networks, ip_version=6, **options):
    writer = MMDBWriter(ip_version=ip_version, **options)
    for network, record in networks:
        writer.insert(network, record)
    with open(str(path), "wb") as handle:
        handle.write(writer.to_bytes())
    return str(path)


ASN_NETWORKS = [
    ("8.8.8.0/24", {"autonomous_system_number": Typed("uint32", 15169),
                    "autonomous_system_organization": "GOOGLE"}),
    ("31.13.64.0/18", {"autonomous_system_number": Typed("uint32", 64500),
                       "autonomous_system_organization": "Viettel Home"}),
    ("10.0.0.0/8", {"autonomous_system_number": Typed("uint32", 1),
                    "autonomous_system_organization": "MUST NOT BE USED"}),
    ("2a01:4f8::/32", {"autonomous_system_number": Typed("uint32", 24940),
                       "autonomous_system_organization":
                       "Hetzner Online GmbH"}),
]
COUNTRY_NETWORKS = [
    ("8.8.8.0/24", {"country": {"iso_code": "US", "names": {"en": "USA"}}}),
    ("31.13.64.0/18", {"country": {"iso_code": "VN"}}),
    ("2a01:4f8::/32", {"country": {"iso_code": "DE"}}),
]


@pytest.fixture
def databases(tmp_path):
    asn = write_database(tmp_path / "asn.mmdb", ASN_NETWORKS,
                         database_type="GeoLite2-ASN")
    country = write_database(tmp_path / "country.mmdb", COUNTRY_NETWORKS,
                             record_size=24,
                             database_type="GeoLite2-Country")
    return asn, country


def enricher_for(paths, **options):
    return pamsignal.Enricher([pamsignal.GeoDatabase(path, role)
                               for role, path in zip(("asn_db", "country_db",
                                                      "city_db"), paths)],
                              **options)


def login(ip="8.8.8.8", port=51234, action="login_success", at_s=1000,
          **fields):
    return pamsignal.Event(action=action, timestamp_us=at_s * 1000000,
                           user="alice", service="sshd", source_ip=ip,
                           source_port=port, **fields)


# ---------------------------------------------------------------- sources


def test_a_public_source_gets_asn_country_and_provider(databases):
    enricher = enricher_for(databases)
    event = enricher.enrich(login("8.8.8.8"))
    ecs = pamsignal.event_to_ecs(event)
    assert ecs["source"] == {
        "ip": "8.8.8.8", "port": 51234,
        "as": {"number": 15169, "organization": {"name": "GOOGLE"}},
        "geo": {"country_iso_code": "US"}}
    assert ecs["pamsignal"]["source_provider"] == "Google Cloud"
    assert ecs["pamsignal"]["source_network_type"] == "cloud"
    home = enricher.enrich(login("31.13.70.1"))
    assert (home.source_as_number, home.source_country, home.source_provider,
            home.source_network_type) == (64500, "VN", None, "other")
    six = enricher.enrich(login("2a01:4f8:c17:1::2"))
    assert (six.source_as_org, six.source_country, six.source_provider) == (
        "Hetzner Online GmbH", "DE", "Hetzner")


def test_special_ranges_are_labelled_without_a_lookup(databases):
    enricher = enricher_for(databases)
    event = enricher.enrich(login("10.1.2.3"))
    assert event.source_network_type == "private"
    assert event.source_as_number is None  # the database says AS1
    assert enricher.enrich(login("100.64.1.1")).source_network_type == "cgnat"
    assert enricher.enrich(login("::1")).source_network_type == "loopback"


def test_unknown_public_sources_and_no_databases():
    assert enricher_for([]).enrich(login("9.9.9.9")).source_network_type \
        == "public"
    event = pamsignal.Event(action="sudo_command", timestamp_us=1, user="a")
    assert enricher_for([]).enrich(event) is event


def test_results_are_cached_until_a_database_is_replaced(databases,
                                                         tmp_path):
    asn_path, _ = databases
    enricher = enricher_for([asn_path])
    assert enricher.enrich(login("31.13.70.1"), 1000.0).source_as_number \
        == 64500
    assert list(enricher.contexts) == ["31.13.70.1"]
    write_database(tmp_path / "new.mmdb", [(
        "31.13.64.0/18", {"autonomous_system_number": 64501})])
    os.replace(str(tmp_path / "new.mmdb"), asn_path)
    assert enricher.enrich(login("31.13.70.1"), 1001.0).source_as_number \
        == 64500  # not checked again yet
    assert enricher.enrich(login("31.13.70.1"), 1010.0).source_as_number \
        == 64501


def test_a_broken_record_loses_only_its_own_fields(tmp_path, capsys):
    asn = write_database(tmp_path / "asn.mmdb", ASN_NETWORKS)
    data = bytearray(open(asn, "rb").read())
    organisation = data.find(b"GOOGLE")
    data[organisation - 1] = 0x5F  # a string "as long as" the rest
    with open(asn, "wb") as handle:
        handle.write(bytes(data))
    country = write_database(tmp_path / "c.mmdb", COUNTRY_NETWORKS)
    enricher = enricher_for([asn, country])
    for _ in range(3):
        event = enricher.enrich(login("8.8.8.8", port=None))
        enricher.contexts.clear()
    assert event.source_country == "US" and event.source_as_number is None
    warnings = capsys.readouterr().err
    assert warnings.count("asn_db: %s: corrupt data" % asn) == 1
    assert "not used until the file is replaced" in warnings
    # A corrupt file is not read again (every lookup could cost the whole
    # record budget) until a new one takes its place.
    assert enricher.enrich(login("31.13.70.1"), 100.0).source_as_number \
        is None
    write_database(tmp_path / "new.mmdb", ASN_NETWORKS)
    os.replace(str(tmp_path / "new.mmdb"), asn)
    assert enricher.enrich(login("31.13.70.1"), 200.0).source_as_number \
        == 64500


def test_a_missing_database_is_one_warning(tmp_path, capsys):
    enricher = enricher_for([str(tmp_path / "absent.mmdb")])
    for now in (1.0, 10.0, 20.0):
        assert enricher.enrich(login(), now).source_as_number is None
    assert capsys.readouterr().err.count("unusable") == 1


# ---------------------------------------------------------------- network


@little_endian_only
def test_established_connections_from_proc_net_tcp():
    assert pamsignal.established_connections(NET_ROOT) == {
        ("203.0.113.5", 51234): ("198.51.100.7", 22),
        ("127.0.0.1", 40001): ("127.0.0.2", 2222),
        ("192.0.2.33", 60000): ("198.51.100.7", 443),
        ("2001:db8:5::1", 40022): ("2001:db8::7", 22),
        ("203.0.113.77", 45678): ("198.51.100.8", 22),  # ::ffff: mapped
    }


def test_tcp_rows_are_words_in_host_order():
    row = ("  sl  local rem st\n   0: %s %s 01 0\n")
    assert pamsignal.parse_tcp_table(
        row % ("0100007F:0016", "0200007F:C822"), "little") == {
            ("127.0.0.2", 51234): ("127.0.0.1", 22)}
    assert pamsignal.parse_tcp_table(
        row % ("7F000001:0016", "7F000002:C822"), "big") == {
            ("127.0.0.2", 51234): ("127.0.0.1", 22)}
    assert pamsignal.parse_tcp_table(
        row % ("0100007F:0016", "0200007F") + "  1: x y 01\n", "little") \
        == {}


@little_endian_only
def test_live_sshd_logins_get_their_destination(tmp_path):
    enricher = enricher_for([], root=NET_ROOT)
    now = 1000.0
    event = enricher.enrich(login("203.0.113.5", 51234, at_s=990), now)
    assert (event.destination_ip, event.destination_port) == (
        "198.51.100.7", 22)
    failure = enricher.enrich(login("203.0.113.77", 45678, at_s=999,
                                    action="login_failure"), now)
    assert failure.destination_ip == "198.51.100.8"
    # not live (scan), too old, another service, no port, another action
    for event, now_s in ((login("203.0.113.5", 51234), None),
                         (login("203.0.113.5", 51234, at_s=800), now),
                         (login("203.0.113.5", 51234)._replace(
                             service="login"), now),
                         (login("203.0.113.5", None), now),
                         (login("203.0.113.5", 51234)._replace(
                             action="session_opened"), now)):
        assert enricher.enrich(event, now_s).destination_ip is None
    # TIME_WAIT is no session
    assert enricher.enrich(login("203.0.113.9", 50000), now).destination_ip \
        is None


@little_endian_only
def test_rows_not_in_the_exact_hex_form_are_skipped(tmp_path):
    # int(text, 16) takes "-100007F" (to_bytes: OverflowError), "0x..",
    # "+..", "1_0" and spaces: only 8 or 32 hex digits and 4 for a port.
    net = tmp_path / "root" / "proc" / "net"
    net.mkdir(parents=True)
    good = "   9: 076433C6:0016 057100CB:C822 01 00000000:00000000\n"
    bad = ["-100007F:0016 057100CB:C823", "076433C6:0016 -57100CB:C824",
           "+76433C6:0016 057100CB:C825", "0x6433C6:0016 057100CB:C826",
           "076433C6:-016 057100CB:C827", "076433C6:0016 057100CB:+827",
           "076433C6:0016 057100CB:0x28", "0_6433C6:0016 057100CB:C829",
           "076433C6:0016 057100CB:C82A0", "076433C6:16 057100CB:C82B",
           "0000000000000000FFFF0000-100007F:0016 057100CB:C82C",
           "076433C6:0016 0000000000000000FFFF0000057100C:C82D"]
    (net / "tcp").write_text("  sl  local_address rem_address   st\n" +
                             "".join("   %d: %s 01 0\n" % (n, row)
                                     for n, row in enumerate(bad)) + good)
    (net / "tcp6").write_text("  sl  local_address rem_address   st\n"
                              "   0: %s:0016 %s:C822 01 0\n"
                              % ("-" + "0" * 31, "0" * 32))
    assert pamsignal.established_connections(str(tmp_path / "root")) == {
        ("203.0.113.5", 51234): ("198.51.100.7", 22)}
    enricher = enricher_for([], root=str(tmp_path / "root"))
    event = enricher.enrich(login("203.0.113.5", 51234, at_s=990), 1000.0)
    assert (event.destination_ip, event.destination_port) == (
        "198.51.100.7", 22)
    for port in range(0xC823, 0xC82E):
        assert enricher.enrich(login("203.0.113.5", port, at_s=990),
                               1000.0).destination_ip is None


@little_endian_only
def test_connections_are_read_again_only_when_a_peer_is_missing(tmp_path):
    root = str(tmp_path / "root")
    shutil.copytree(NET_ROOT, root)
    table = pamsignal.ConnectionTable(root)
    assert table.destination("203.0.113.5", 51234, 100.0) == (
        "198.51.100.7", 22)
    os.unlink(os.path.join(root, "proc/net/tcp"))
    # Known peers come from the last reading; a missing one is looked for
    # again only after CONNECTIONS_REREAD_S.
    assert table.destination("203.0.113.5", 51234, 100.0) is not None
    assert table.destination("192.0.2.99", 1, 100.1) is None
    assert table.destination("203.0.113.5", 51234, 100.1) is not None
    assert table.destination("192.0.2.99", 1, 100.3) is None
    assert table.destination("203.0.113.5", 51234, 100.3) is None
    assert table.destination("203.0.113.77", 45678, 100.3) == (
        "198.51.100.8", 22)


@little_endian_only
def test_a_slow_reading_of_the_connections_is_repeated_less_often(tmp_path):
    """Under a flood /proc/net/tcp is long and the machine busy: a reading
    that took a second is not repeated for ten (the agent would do nothing
    else), one that took a millisecond after CONNECTIONS_REREAD_S."""
    root = str(tmp_path / "root")
    shutil.copytree(NET_ROOT, root)
    took = [1.0]
    readings = []

    def clock():  # each reading takes took[0] seconds
        readings.append(len(readings))
        return len(readings) // 2 * took[0]

    table = pamsignal.ConnectionTable(root, clock=clock)
    assert table.destination("203.0.113.5", 51234, 100.0) is not None
    os.unlink(os.path.join(root, "proc/net/tcp"))  # a new reading: empty
    for now in (100.3, 105.0, 109.9):
        assert table.destination("192.0.2.99", 1, now) is None
        assert table.destination("203.0.113.5", 51234, now) is not None
    took[0] = 0.001
    assert table.destination("192.0.2.99", 1, 110.1) is None  # read again
    assert table.destination("203.0.113.5", 51234, 110.1) is None
    shutil.copy(os.path.join(NET_ROOT, "proc/net/tcp"),
                os.path.join(root, "proc/net/tcp"))
    assert table.destination("203.0.113.5", 51234, 110.2) is None
    assert table.destination("203.0.113.5", 51234, 110.35) == (
        "198.51.100.7", 22)
    assert len(readings) == 6  # three readings, timed at both ends


@little_endian_only
def test_a_second_login_within_the_reread_time_gets_its_destination(
        tmp_path):
    """Two logins from one client in quick succession: the second came on
    a new connection, after the last reading of /proc/net/tcp."""
    root = str(tmp_path / "root")
    shutil.copytree(NET_ROOT, root)
    tcp = os.path.join(root, "proc/net/tcp")
    with open(tcp) as handle:
        rows = handle.read().splitlines(True)
    peer_51234 = [row for row in rows if ":C822 " in row]  # port 51234
    with open(tcp, "w") as handle:
        handle.writelines(row for row in rows if row not in peer_51234)
    enricher = pamsignal.Enricher(root=root)
    now = 1000.0
    failure = enricher.enrich(login("203.0.113.5", 51234, at_s=now,
                                    action="login_failure"), now)
    assert failure.destination_ip is None  # not connected yet: read once
    with open(tcp, "w") as handle:
        handle.writelines(rows)  # the new connection, 0.05 s later
    success = enricher.enrich(login("203.0.113.5", 51234, at_s=now), now +
                              0.05)
    assert (success.destination_ip, success.destination_port) == (
        "198.51.100.7", 22)


def test_host_addresses_from_fib_trie_and_if_inet6():
    assert pamsignal.host_addresses(NET_ROOT) == [
        "127.0.0.1", "198.51.100.7", "198.51.100.8", "::1", "2001:db8::7",
        "fe80::1"]
    assert pamsignal.host_addresses(os.path.join(FIXTURES, "dmi")) == []


def test_fib_trie_words_that_are_no_ipv4_address_are_skipped(tmp_path):
    net = tmp_path / "proc" / "net"
    net.mkdir(parents=True)
    (net / "fib_trie").write_text(
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n" + "".join(
            "     |-- %s\n        /32 host LOCAL\n" % word
            for word in ("bogus", "10.0.0.1", "2001:db8::1", "10.0.0.256",
                         "1.2.3", "-1.2.3.4", "10.0.0.2x", "\u00e9.1.1.1",
                         "10.0.0.3")))
    assert pamsignal.parse_fib_trie((net / "fib_trie").read_text()) == {
        "10.0.0.1", "10.0.0.3"}
    assert pamsignal.host_addresses(str(tmp_path)) == ["10.0.0.1",
                                                      "10.0.0.3"]


def test_this_hosts_addresses_include_loopback():
    addresses = pamsignal.host_addresses("/")
    if not os.path.exists("/proc/net/fib_trie"):
        pytest.skip("no /proc/net/fib_trie here")
    assert "127.0.0.1" in addresses


# ---------------------------------------------------------------- providers


@pytest.mark.parametrize("tree, provider", [
    ("aws", "AWS"), ("aws-xen", "AWS"), ("azure", "Azure"),
    ("hyperv", None), ("gce", "Google Cloud"),
    ("digitalocean", "DigitalOcean"), ("hetzner", "Hetzner"),
    ("oracle", "Oracle Cloud"), ("qemu", None), ("netroot", None),
])
def test_host_provider_from_dmi(tree, provider):
    root = os.path.join(FIXTURES, "dmi", tree)
    assert pamsignal.detect_host_provider("auto", root) == provider


def test_host_provider_setting_overrides_dmi():
    aws = os.path.join(FIXTURES, "dmi", "aws")
    assert pamsignal.detect_host_provider("none", aws) is None
    assert pamsignal.detect_host_provider("Home lab", aws) == "Home lab"


@pytest.mark.parametrize("vendor, provider", [
    ("Vultr", "Vultr"), ("Linode", "Linode/Akamai"),
    ("Alibaba Cloud", "Alibaba Cloud"), ("Scaleway", "Scaleway"),
    ("OVH SAS", "OVH"), ("Tencent Cloud", "Tencent Cloud"),
    ("Dell Inc.", None),
])
def test_more_host_providers(vendor, provider):
    assert pamsignal.host_provider_from_dmi({"sys_vendor": vendor + "\n"}) \
        == provider
    assert pamsignal.host_provider_from_dmi(
        {"board_vendor": "Contabo GmbH"}) == "Contabo"


@pytest.mark.parametrize("number, organisation, provider", [
    (16509, "AMAZON-02", "AWS"), (14061, "DIGITALOCEAN-ASN", "DigitalOcean"),
    (24940, None, "Hetzner"), (64512, "Amazon Data Services NoVa", "AWS"),
    (64513, "OVH SAS", "OVH"), (64514, "Choopa, LLC", "Vultr"),
    (64515, "Viettel Group", None), (None, None, None),
    (7922, "COMCAST-7922", None),
])
def test_source_provider_from_asn_and_organisation(number, organisation,
                                                   provider):
    assert pamsignal.source_provider(number, organisation) == provider


def test_host_provider_only_on_live_events():
    aws = os.path.join(FIXTURES, "dmi", "aws")
    config = pamsignal.parse_config("")
    live = pamsignal.Enricher.from_config(config, True, root=aws)
    assert live.host_provider == "AWS"
    event = live.enrich(login(at_s=1000), 1000.0)
    assert pamsignal.event_to_ecs(event)["cloud"] == {"provider": "AWS"}
    assert "host_provider=AWS" in pamsignal.render_text(event)
    assert live.enrich(login(at_s=1000)).host_provider is None
    assert pamsignal.Enricher.from_config(config, False,
                                          root=aws).host_provider is None


# ---------------------------------------------------------------- pipeline


class Collect(pamsignal.Sink):
    events = frozenset(pamsignal.ACTIONS)

    def __init__(self):
        pamsignal.Sink.__init__(self, "collect")
        self.sent = []

    def send(self, event, delay_s=0):
        self.sent.append(event)


def everything_to(sink):
    """The sink as a channel that is shown every event, as `scan` does."""
    return [pamsignal.Channel(sink, pamsignal.ChannelGate(
        pamsignal.SHOW_EVERYTHING))]


def test_the_pipeline_enriches_before_detection(databases):
    sink = Collect()
    pipeline = pamsignal.Pipeline(
        everything_to(sink), pamsignal.parse_config(
            "[detection]\nlearning_period = 0s\n").detection,
        enricher=enricher_for(databases))
    pipeline.process_entry(make_entry(
        "sshd", "Accepted password for alice from 8.8.8.8 port 4242 ssh2"))
    login_event, new_source = sink.sent
    assert login_event.source_as_number == 15169
    assert new_source.action == "new_source"
    assert new_source.source_country == "US"
    text = pamsignal.render_text(login_event)
    assert 'asn=AS15169 org=GOOGLE country=US source_type=cloud ' \
           'provider="Google Cloud"' in text


def test_a_brute_force_alert_carries_its_sources_context(databases):
    sink = Collect()
    pipeline = pamsignal.Pipeline(everything_to(sink),
                                  pamsignal.default_config().detection,
                                  enricher=enricher_for(databases))
    for sequence in range(1, 6):
        pipeline.process_entry(make_entry(
            "sshd", "Failed password for root from 31.13.64.7 port %d ssh2"
            % (4000 + sequence), sequence=sequence))
    (alert,) = [e for e in sink.sent if e.action == "brute_force_detected"]
    assert (alert.source_ip, alert.source_as_number, alert.source_country,
            alert.source_network_type) == ("31.13.64.7", 64500, "VN",
                                           "other")


def test_a_failing_enricher_never_costs_the_event(capsys):
    class Failing(pamsignal.Enricher):
        def enrich(self, event, now_s=None):
            raise RuntimeError("boom")

    sink = Collect()
    pipeline = pamsignal.Pipeline(everything_to(sink),
                                  pamsignal.default_config().detection,
                                  enricher=Failing())
    assert pipeline.process_entry(make_entry(
        "sshd", "Accepted password for bob from 8.8.8.8 port 1 ssh2")) >= 1
    assert sink.sent[0].user == "bob"
    assert "enrichment failed on login_success" in capsys.readouterr().err


def test_scan_enriches_from_the_configured_databases(databases, tmp_path,
                                                     capsys):
    asn, country = databases
    config = write_config(tmp_path / "p.conf", "[geoip]\nasn_db = %s\n"
                          "country_db = %s\n" % (asn, country))
    export = tmp_path / "export.json"
    export.write_text(json.dumps(make_entry(
        "sshd", "Accepted password for alice from 31.13.64.9 port 4242 "
        "ssh2")) + "\n")
    out = io.StringIO()
    assert pamsignal.main(["--config", config, "scan", "--json",
                           str(export)], out) == 0
    event = json.loads(out.getvalue().splitlines()[0])
    assert event["source"]["as"]["number"] == 64500
    assert event["source"]["geo"] == {"country_iso_code": "VN"}
    assert "destination" not in event and "cloud" not in event


# ---------------------------------------------------------------- lookup


def lookup(*argv, stdin=None):
    out = io.StringIO()
    if stdin is not None:
        saved, sys.stdin = sys.stdin, io.StringIO(stdin)
    try:
        code = pamsignal.main(["lookup"] + list(argv), out)
    finally:
        if stdin is not None:
            sys.stdin = saved
    return code, out.getvalue().splitlines()


def test_lookup_prints_one_line_per_address(databases):
    asn, country = databases
    code, lines = lookup("--db", asn, "--db", country, "8.8.8.8",
                         "::ffff:31.13.64.1", "10.0.0.1", "9.9.9.9")
    assert code == 0
    assert lines == [
        '8.8.8.8 asn=AS15169 org=GOOGLE country=US source_type=cloud '
        'provider="Google Cloud"',
        '31.13.64.1 asn=AS64500 org="Viettel Home" country=VN '
        'source_type=other',
        "10.0.0.1 source_type=private",
        "9.9.9.9 source_type=public"]


def test_lookup_json_is_the_source_object(databases):
    code, lines = lookup("--json", "--db", databases[0], "--db",
                         databases[1], "2a01:4f8::1")
    assert code == 0
    assert json.loads(lines[0]) == {
        "ip": "2a01:4f8::1",
        "as": {"number": 24940,
               "organization": {"name": "Hetzner Online GmbH"}},
        "geo": {"country_iso_code": "DE"},
        "network_type": "cloud", "provider": "Hetzner"}


def test_lookup_raw_is_the_record_itself(tmp_path):
    path = write_database(tmp_path / "raw.mmdb", [
        ("192.0.2.0/25", {"hash": b"\x00\xab", "n": Typed("uint16", 7),
                          "list": [1.5, True]})], ip_version=4)
    code, lines = lookup("--raw", "--db", path, "192.0.2.9", "192.0.2.200")
    assert code == 0
    assert [json.loads(line) for line in lines] == [
        {"ip": "192.0.2.9", "database": path, "network": "192.0.2.0/25",
         "record": {"hash": "00ab", "n": 7, "list": [1.5, True]}},
        {"ip": "192.0.2.200", "database": path, "network": "192.0.2.128/25",
         "record": None}]


def test_lookup_reads_stdin_and_reports_bad_lines(databases, capsys):
    code, lines = lookup("--db", databases[0], "-", "8.8.4.4",
                         stdin="8.8.8.8\n\n# comment\nnot-an-ip\n10.9.9.9\n")
    assert code == 1
    assert [line.split()[0] for line in lines] == ["8.8.8.8", "10.9.9.9",
                                                   "8.8.4.4"]
    assert "not an IP address: 'not-an-ip'" in capsys.readouterr().err


def test_lookup_uses_the_configured_databases(databases, tmp_path):
    config = write_config(tmp_path / "p.conf", "[geoip]\nasn_db = %s\n"
                          % databases[0])
    out = io.StringIO()
    assert pamsignal.main(["--config", config, "lookup", "8.8.8.8"],
                          out) == 0
    assert "asn=AS15169" in out.getvalue()


def test_lookup_exit_codes(tmp_path, capsys):
    assert lookup("--db", str(tmp_path / "none.mmdb"), "8.8.8.8")[0] == 1
    assert "cannot use" in capsys.readouterr().err
    assert pamsignal.main(["lookup"], io.StringIO()) == 2
    bad = write_config(tmp_path / "bad.conf", "[geoip]\nasn_db = x\n")
    assert pamsignal.main(["--config", bad, "lookup", "8.8.8.8"],
                          io.StringIO()) == 78


def test_check_config_describes_each_database(databases, tmp_path):
    config = write_config(tmp_path / "p.conf", "[geoip]\nasn_db = %s\n"
                          "city_db = %s\n" % (databases[0],
                                              tmp_path / "later.mmdb"))
    out = io.StringIO()
    assert pamsignal.main(["--config", config, "check-config"], out) == 0
    lines = out.getvalue().splitlines()
    assert lines[1:] == [
        "[geoip] asn_db %s: GeoLite2-ASN, IPv6, built 2026-11-27"
        % databases[0],
        "[geoip] city_db %s: not usable yet (cannot read %s: No such file "
        "or directory)" % (tmp_path / "later.mmdb", tmp_path / "later.mmdb")]


def test_the_alert_says_who_is_behind_the_source(databases):
    enricher = enricher_for(databases, root=NET_ROOT)
    enricher.host_provider = "Hetzner"
    event = enricher.enrich(login("8.8.8.8", 4242, at_s=1000), 1000.0)
    event = event._replace(hostname="web1", destination_ip="198.51.100.7",
                           destination_port=22)
    text = pamsignal.alert_text(event)
    facts = dict(text.facts)
    assert facts["AS"] == "AS15169 GOOGLE"
    assert facts["Country"] == "US"
    assert facts["Source type"] == "cloud: Google Cloud"
    assert facts["To"] == "198.51.100.7:22"
    assert facts["Host"] == "web1 (Hetzner)"
    values = pamsignal.template_values(event, text)
    assert (values["asn"], values["country"], values["source_type"],
            values["destination"]) == ("AS15169 GOOGLE", "US",
                                       "cloud: Google Cloud",
                                       "198.51.100.7:22")
    private = dict(pamsignal.alert_text(enricher.enrich(login(
        "10.0.0.9"))).facts)
    assert private["Source type"] == "private" and "AS" not in private


def test_status_names_this_hosts_provider_and_addresses(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path / "p.conf", "[pamsignal]\nstate_dir = %s\n"
                          "host_provider = Home lab\n" % state)
    with open(pamsignal.metrics_path(pamsignal.load_config(config)),
              "w") as handle:
        handle.write(pamsignal.render_metrics([
            ("pamsignal_running", {}, 0), ("pamsignal_pid", {}, 1),
            ("pamsignal_metrics_time_seconds", {}, 1.0)]))
    out = io.StringIO()
    pamsignal.main(["--config", config, "status", "--json"], out)
    host = json.loads(out.getvalue())["host"]
    assert host["provider"] == "Home lab"
    assert host["addresses"] == pamsignal.host_addresses()
    out = io.StringIO()
    pamsignal.main(["--config", config, "status"], out)
    assert "\nhost:       Home lab; " in out.getvalue()


def test_a_missing_database_is_one_degraded_then_one_restored(tmp_path):
    path = tmp_path / "asn.mmdb"
    config = pamsignal.parse_config(
        "[pamsignal]\nstate_dir = %s\n[geoip]\nasn_db = %s\n"
        % (tmp_path / "state", path))
    sink = pamsignal.ConsoleSink("log", {"format": "json"}, io.StringIO())
    agent = pamsignal.Agent(config, [pamsignal.Channel(
        sink, pamsignal.ChannelGate(pamsignal.SHOW_EVERYTHING))])
    for now in (1000.0, 1001.0, 1100.0):
        agent.check_databases(now)
    assert "geoip:asn_db" in agent.health.impaired
    write_database(path, ASN_NETWORKS)
    agent.check_databases(2000.0)
    agent.check_databases(2100.0)
    said = [json.loads(line) for line in sink.stream.getvalue().splitlines()]
    assert [(e["event"]["action"], e["pamsignal"]["detail"]) for e in said] \
        == [("monitoring_degraded", "geoip:asn_db"),
            ("monitoring_restored", "geoip:asn_db")]
    assert "No such file or directory" in said[0]["message"]


def test_a_database_dropped_from_the_config_is_no_longer_degraded(tmp_path):
    config = pamsignal.parse_config(
        "[pamsignal]\nstate_dir = %s\n[geoip]\nasn_db = %s\n"
        % (tmp_path / "state", tmp_path / "missing.mmdb"))
    sink = pamsignal.ConsoleSink("log", {"format": "json"}, io.StringIO())
    agent = pamsignal.Agent(config, [pamsignal.Channel(
        sink, pamsignal.ChannelGate(pamsignal.SHOW_EVERYTHING))])
    agent.check_databases(1000.0)
    assert "geoip:asn_db" in agent.health.impaired
    agent.pipeline.enricher = pamsignal.Enricher()  # reloaded: no [geoip]
    agent.check_databases(1001.0)
    assert agent.health.impaired == {}


def test_status_and_lookup_need_no_credentials(tmp_path):
    path = tmp_path / "p.conf"
    path.write_text("[pamsignal]\nstate_dir = %s\n[channel:tg]\n"
                    "type = telegram\nbot_token = credential:tg\n"
                    "chat_id = 5\n" % tmp_path)
    out = io.StringIO()
    assert pamsignal.main(["--config", str(path), "lookup", "10.0.0.1"],
                          out) == 0
    assert "private" in out.getvalue()
    assert pamsignal.main(["--config", str(path), "status"], out) == 1
    assert "no health file" in out.getvalue()


def test_many_sources_of_one_heavy_record_stay_small(tmp_path):
    # A crafted database answering every address with one record of
    # ~90 KB in memory: the enricher keeps the record once, and a small
    # context per source (an attacker's many addresses).
    path = tmp_path / "heavy.mmdb"
    path.write_bytes(heavy_records_database(1))
    enricher = enricher_for([str(path)])
    enricher.enrich(login(ip="8.8.8.8"))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(300):
            event = enricher.enrich(login(ip="8.8.%d.%d" % (n >> 8,
                                                           n & 255)))
            assert event.source_network_type == "public"
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 2 * 1024 * 1024  # the old cache: 27 MB
