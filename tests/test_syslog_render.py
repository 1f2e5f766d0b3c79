"""The syslog channel without the network: its configuration, and the
records it writes (CEF, LEEF 2.0, ECS JSON in RFC 5424 / RFC 3164
messages), golden-tested and read back with the specifications' own
rules (tests/siem_formats.py), hostile names included."""
import json
import os

import pytest

import siem_formats
from support import REPO, pamsignal

GOLDEN_DIR = os.path.join(REPO, "tests", "fixtures", "syslog")

#: Names an attacker can choose (an "Invalid user" name, a key comment...).
HOSTILE_NAMES = [
    "a|b|c", "x=y z=w", "back\\slash\\", "two\nlines\r\nCEF:0|fake|",
    "[brackets] ]]", 'quo"tes\' "', "ünïcödé 用户 🙂", "caret^tab\tend",
    "msg=forged suser=root", "\\=\\|\\n", "<13>1 2026 fake - - - -",
]

#: The hostile names that LEEF carries as they are (it has no escapes:
#: control characters and its delimiter become \xNN).
LEEF_EXACT = [name for name in HOSTILE_NAMES
              if not any(c in name for c in "\t\r\n^")]

LAYOUT = pamsignal.SyslogLayout(format="cef", header="rfc5424",
                                facility=10, app_name="pamsignal",
                                hostname=None, bom=False)


def event(**fields):
    values = dict(
        action="login_success", timestamp_us=1795780000123456,
        user="alice", source_ip="203.0.113.5", source_port=51234,
        destination_ip="198.51.100.7", destination_port=22, hostname="web1",
        service="sshd", pid=4242, auth_method="publickey",
        key="ED25519 SHA256:abc=", source_as_number=64500,
        source_as_org="EXAMPLE-NET", source_country="VN",
        cursor="s=1;i=2", message="Accepted publickey for alice from "
        "203.0.113.5 port 51234 ssh2: ED25519 SHA256:abc=")
    values.update(fields)
    return pamsignal.Event(**values)


#: One event of each shape the formats map differently.
GOLDEN_EVENTS = {
    "login": event(),
    "sudo": event(action="sudo_command", user="bob", target_user="root",
                  source_ip=None, source_port=None, destination_ip=None,
                  destination_port=None, auth_method=None, key=None,
                  source_as_number=None, source_as_org=None,
                  source_country=None, service="sudo", tty="pts/0",
                  command_line="/usr/bin/id -u",
                  message="bob : TTY=pts/0 ; PWD=/home/bob ; USER=root ; "
                  "COMMAND=/usr/bin/id -u"),
    "brute_force": event(action="brute_force_detected", user=None,
                         source_ip="2001:db8::5", source_port=None,
                         destination_ip="2001:db8::1", auth_method=None,
                         key=None, attempts=12, window_s=600,
                         reason="bad_password", message=None),
}


def render(evt, **layout):
    return pamsignal.render_syslog(evt, LAYOUT._replace(**layout))


def record_of(message, header="rfc5424"):
    parsed = (siem_formats.parse_rfc5424 if header == "rfc5424"
              else siem_formats.parse_rfc3164)(message)
    return parsed, parsed["msg"]


@pytest.mark.parametrize("name", sorted(GOLDEN_EVENTS))
@pytest.mark.parametrize("fmt", ["cef", "leef", "json"])
@pytest.mark.parametrize("header", ["rfc5424", "rfc3164"])
def test_records_match_their_golden_files(name, fmt, header):
    path = os.path.join(GOLDEN_DIR, "%s-%s-%s.txt" % (name, fmt, header))
    with open(path, "rb") as golden:  # the version changes, the rest not
        expected = golden.read().replace(
            b"@VERSION@", pamsignal.__version__.encode())
    # the id hashes the version too (tested with the ECS text it hashes)
    expected = expected.replace(b"@ID@", pamsignal.alert_id(
        GOLDEN_EVENTS[name]).encode())
    assert render(GOLDEN_EVENTS[name], format=fmt, header=header) + b"\n" \
        == expected


def test_cef_maps_the_standard_keys():
    evt = GOLDEN_EVENTS["login"]
    parsed, msg = record_of(render(evt))
    header, ext = siem_formats.parse_cef(msg)
    assert header == ["0", "PAMSignal", "pamsignal",
                      pamsignal.__version__, "login_success", "Login", "5"]
    assert ext["rt"] == "1795780000123"
    assert (ext["src"], ext["spt"], ext["dst"], ext["dpt"]) == (
        "203.0.113.5", "51234", "198.51.100.7", "22")
    assert ext["duser"] == "alice" and "suser" not in ext
    assert ext["outcome"] == "success" and ext["cat"] == "authentication"
    assert ext["dvchost"] == "web1" and ext["dproc"] == "sshd"
    assert ext["externalId"] == pamsignal.alert_id(evt)
    assert ext["msg"] == evt.message
    assert (ext["cs2Label"], ext["cs2"]) == ("key", "ED25519 SHA256:abc=")
    assert (ext["cn1Label"], ext["cn1"]) == ("sourceAsNumber", "64500")
    sudo = siem_formats.parse_cef(record_of(render(
        GOLDEN_EVENTS["sudo"]))[1])[1]
    assert (sudo["suser"], sudo["duser"]) == ("bob", "root")
    brute = siem_formats.parse_cef(record_of(render(
        GOLDEN_EVENTS["brute_force"]))[1])
    assert brute[0][6] == "8" and brute[1]["cnt"] == "12"
    assert (brute[1]["c6a2"], brute[1]["c6a3"]) == ("2001:db8::5",
                                                    "2001:db8::1")
    assert "src" not in brute[1] and "dst" not in brute[1]


def test_leef_maps_the_standard_keys():
    evt = GOLDEN_EVENTS["login"]
    header, attrs = siem_formats.parse_leef(record_of(render(
        evt, format="leef"))[1])
    assert header == ["PAMSignal", "pamsignal", pamsignal.__version__,
                      "login_success"]
    assert attrs["devTime"] == "Nov 27 2026 11:46:40.123 UTC"
    assert attrs["devTimeFormat"] == "MMM dd yyyy HH:mm:ss.SSS z"
    assert (attrs["src"], attrs["srcPort"], attrs["dst"],
            attrs["dstPort"], attrs["usrName"]) == (
        "203.0.113.5", "51234", "198.51.100.7", "22", "alice")
    assert attrs["cat"] == "success" and attrs["sev"] == "5"
    assert attrs["externalId"] == pamsignal.alert_id(evt)


def test_json_is_the_event_contract_with_its_id():
    evt = GOLDEN_EVENTS["login"]
    ecs = json.loads(record_of(render(evt, format="json"))[1])
    expected = pamsignal.event_to_ecs(evt)
    expected["event"]["id"] = pamsignal.alert_id(evt)
    assert ecs == expected


def test_the_rfc5424_header_and_structured_data():
    evt = GOLDEN_EVENTS["brute_force"]
    parsed, _ = record_of(render(evt, facility=4, app_name="ps",
                                 hostname="siem-name"))
    assert parsed["pri"] == 4 * 8 + 4  # auth, warning (severity 8)
    assert parsed["timestamp"] == "2026-11-27T11:46:40.123456Z"
    assert (parsed["hostname"], parsed["app_name"], parsed["procid"],
            parsed["msgid"]) == ("siem-name", "ps", "-",
                                 "brute_force_detected")
    assert parsed["sd"] == {"pamsignal@32473": {
        "id": pamsignal.alert_id(evt), "action": "brute_force_detected",
        "outcome": "unknown", "severity": "8", "src": "2001:db8::5",
        "service": "sshd"}}
    assert not parsed["bom"]
    assert record_of(render(evt, bom=True))[0]["bom"]


@pytest.mark.parametrize("severity, level", [(10, 2), (9, 2), (8, 4),
                                             (7, 4), (6, 5), (4, 5),
                                             (3, 6), (0, 6)])
def test_syslog_severity_follows_the_events(severity, level):
    parsed = siem_formats.parse_rfc3164(render(
        event(severity=severity), header="rfc3164", facility=16))
    assert parsed["pri"] == 16 * 8 + level


def test_the_rfc3164_header_pads_the_day_and_uses_english_months():
    evt = event(timestamp_us=1767580000000000)  # 2026-01-05 02:26:40 UTC
    parsed = siem_formats.parse_rfc3164(render(evt, header="rfc3164"))
    assert parsed["timestamp"] == "Jan  5 02:26:40"
    assert (parsed["hostname"], parsed["tag"]) == ("web1", "pamsignal")


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("header", ["rfc5424", "rfc3164"])
def test_hostile_names_come_back_exactly(name, header):
    evt = event(user=name, target_user=name + "2", source_domain=name,
                command_line=name, message="x " + name, source_ip=None)
    for fmt in ("cef", "leef", "json"):
        message = render(evt, format=fmt, header=header)
        assert b"\n" not in message and b"\r" not in message
        _, msg = record_of(message, header)
        if fmt == "cef":
            _, ext = siem_formats.parse_cef(msg)
            carried = cef_carried(name)
            assert (ext["suser"], ext["duser"], ext["shost"], ext["cs3"],
                    ext["msg"]) == (carried, carried + "2", carried, carried,
                                    "x " + carried)
        elif fmt == "leef":
            _, attrs = siem_formats.parse_leef(msg)
            if name in LEEF_EXACT:
                assert (attrs["usrName"], attrs["targetUsrName"],
                        attrs["msg"]) == (name, name + "2", "x " + name)
            else:
                assert attrs["usrName"] == pamsignal.escape_text(
                    name).replace("^", "\\x5e")
        else:
            ecs = json.loads(msg)
            assert (ecs["user"]["name"], ecs["user"]["target"]["name"],
                    ecs["source"]["domain"], ecs["message"]) == (
                name, name + "2", name, "x " + name)


def cef_carried(text):
    """What a CEF reader gets back for `text`: line breaks through CEF's
    own escapes, every other unsafe character as \\xNN."""
    return "".join(char if char in "\r\n" else pamsignal.escape_text(char)
                   for char in text)


@pytest.mark.parametrize("header", ["rfc5424", "rfc3164"])
def test_cef_carries_no_raw_control_character(header):
    # CEF has no escape of its own for NUL, ESC or hidden Unicode: raw,
    # a NUL ends the record early for some receivers and ESC reaches the
    # analyst's console.
    name = "ro\x00ot\x1b[2J\x07\x85\u2028\u202e"
    message = render(event(user=name, message="Accepted for " + name),
                     format="cef", header=header)
    text = message.decode("utf-8")
    assert not pamsignal._UNSAFE_CHARS.search(text), repr(text)
    _, msg = record_of(message, header)
    _, ext = siem_formats.parse_cef(msg)
    assert ext["duser"] == "ro\\x00ot\\x1b[2J\\x07\\x85\\u2028\\u202e"
    assert ext["msg"] == "Accepted for " + ext["duser"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_structured_data_carries_hostile_names_by_its_rules(name):
    parsed, _ = record_of(render(event(user=name)))
    assert parsed["sd"]["pamsignal@32473"]["user"] == \
        pamsignal.escape_text(name)


def test_a_10_kb_name_is_cut_and_the_record_stays_whole():
    name = "A" * 10240
    evt = event(user=name, target_user="root", command_line=name,
                message=name)
    for fmt in ("cef", "leef", "json"):
        message = render(evt, format=fmt)
        assert len(message) <= pamsignal.MAX_SYSLOG_BYTES
        _, msg = record_of(message)
        if fmt == "cef":
            values = siem_formats.parse_cef(msg)[1]
            user = values["suser"]
            assert values["duser"] == "root"
        elif fmt == "leef":
            values = siem_formats.parse_leef(msg)[1]
            user = values["usrName"]
            assert values["targetUsrName"] == "root"
        else:
            user = json.loads(msg)["user"]["name"]
        assert user.startswith("AAAA") and user.endswith("\u2026")
        assert len(user) < len(name)


@pytest.mark.parametrize("huge", [
    "\u00e9\n" * 6000,
    # hidden characters, each escaped at its longest (\u200b: 6 bytes),
    # in the structured data too: the smaller caps must cut those as well
    "\u200b" * 300])
@pytest.mark.parametrize("header", ["rfc5424", "rfc3164"])
def test_many_huge_fields_still_fit_whole(huge, header):
    evt = event(**{field: huge for field in (
        "user", "target_user", "source_domain", "command_line", "key",
        "tty", "service", "reason", "message", "source_as_org",
        "process_name", "process_executable", "detail", "auth_method")},
        users_tried=(huge,) * 20)
    for fmt in ("cef", "leef", "json"):
        message = render(evt, format=fmt, header=header)
        assert len(message) <= pamsignal.MAX_SYSLOG_BYTES
        _, msg = record_of(message, header)
        if fmt == "json":
            json.loads(msg)
        elif fmt == "cef":
            siem_formats.parse_cef(msg)
        else:
            siem_formats.parse_leef(msg)


def test_framing():
    assert pamsignal.frame_syslog(b"<13>1 abc \xc3\xa9", "octet") == \
        b"12 <13>1 abc \xc3\xa9"
    assert pamsignal.frame_syslog(b"abc", "lf") == b"abc\n"
    assert pamsignal.frame_syslog(b"abc", None) == b"abc"
    stream = b"".join(pamsignal.frame_syslog(render(event(user=name)),
                                             "octet")
                      for name in HOSTILE_NAMES)
    frames = siem_formats.octet_frames(stream)
    assert [siem_formats.parse_cef(record_of(frame)[1])[1]["duser"]
            for frame in frames] == [cef_carried(name)
                                     for name in HOSTILE_NAMES]


# ------------------------------------------------------------ configuration


def channel(text):
    (configured,) = pamsignal.parse_config(
        "[channel:siem]\ntype = syslog\n" + text, "/etc/p.conf").channels
    return configured


def problems_of(text):
    with pytest.raises(pamsignal.ConfigError) as raised:
        pamsignal.parse_config("[channel:siem]\ntype = syslog\n" + text,
                               "/etc/p.conf")
    return [str(problem) for problem in raised.value.problems]


def test_defaults_and_every_key():
    sink = pamsignal.SyslogSink("siem", channel(
        "target = tls://[2001:db8::9]:6514\n").options)
    assert sink.target == ("tls", "2001:db8::9", 6514)
    assert sink.layout == LAYOUT and sink.framing == "octet"
    configured = channel(
        "target = tcp://siem.example.com:514\nformat = leef\n"
        "header = rfc3164\nfacility = local4\napp_name = ps-1\n"
        "hostname = bastion\nframing = lf\ntimeout = 5s\n")
    sink = pamsignal.SyslogSink("siem", configured.options)
    assert sink.layout == pamsignal.SyslogLayout(
        "leef", "rfc3164", 20, "ps-1", "bastion", False)
    assert (sink.framing, sink.timeout) == ("lf", 5)


def test_a_syslog_channel_gets_every_event_without_throttling():
    text = ("[alerts]\nevents = login_success\ncooldown = 1h\n"
            "ignore_users = deploy\n[channel:siem]\ntype = syslog\n"
            "target = udp://127.0.0.1:514\n[channel:chat]\ntype = webhook\n"
            "url = http://127.0.0.1/x\n")
    siem, chat = pamsignal.parse_config(text).channels
    assert siem.policy.events == frozenset(pamsignal.ACTIONS)
    assert (siem.policy.cooldown, siem.policy.rate_limit) == (
        0, pamsignal.Threshold(0, 0))
    assert siem.policy.ignore_users == ()
    assert chat.policy.events == frozenset(["login_success"])
    assert chat.policy.cooldown == 3600
    own = channel("target = udp://127.0.0.1:514\nevents = default\n"
                  "cooldown = 5m\n")
    assert own.policy.cooldown == 300
    assert "session_opened" not in own.policy.events


@pytest.mark.parametrize("text, message", [
    ("format = cef\n", "/etc/p.conf:1: [channel:siem]: a syslog channel "
     "needs target"),
    ("target = http://x:1\n", "/etc/p.conf:3: [channel:siem] target: "
     "expected udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT (an "
     "IPv6 address in brackets), got 'http://x:1'"),
    ("target = tcp://x:0\n", "/etc/p.conf:3: [channel:siem] target: "
     "expected udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT (an "
     "IPv6 address in brackets), got 'tcp://x:0'"),
    ("target = tcp://[nothex]:514\n", "/etc/p.conf:3: [channel:siem] "
     "target: expected udp://HOST:PORT, tcp://HOST:PORT or tls://HOST:PORT"
     " (an IPv6 address in brackets), got 'tcp://[nothex]:514'"),
    ("target = tcp://h:1\nformat = xml\n", "/etc/p.conf:4: [channel:siem] "
     "format: expected cef or leef or json, got 'xml'"),
    ("target = tcp://h:1\nheader = rfc5425\n", "/etc/p.conf:4: "
     "[channel:siem] header: expected rfc5424 or rfc3164, got 'rfc5425'"),
    ("target = tcp://h:1\nfacility = kern\n", "/etc/p.conf:4: "
     "[channel:siem] facility: expected one of user, daemon, auth, "
     "authpriv, audit, local0, local1, local2, local3, local4, local5, "
     "local6, local7, got 'kern'"),
    ("target = tcp://h:1\napp_name = pam signal\n", "/etc/p.conf:4: "
     "[channel:siem] app_name: expected 1 to 32 letters, digits or _.-, "
     "got 'pam signal'"),
    ("target = tcp://h:1\nhostname = a b\n", "/etc/p.conf:4: "
     "[channel:siem] hostname: expected a host name of printable ASCII "
     "without spaces, got 'a b'"),
    ("target = udp://h:1\nframing = lf\n", "/etc/p.conf:4: [channel:siem] "
     "framing: only for a tcp:// target (TLS is always octet-counted, UDP "
     "is one message per datagram)"),
    ("target = tls://h:1\nframing = lf\n", "/etc/p.conf:4: [channel:siem] "
     "framing: only for a tcp:// target (TLS is always octet-counted, UDP "
     "is one message per datagram)"),
    ("target = tcp://h:1\nca_file = /etc/ca.pem\n", "/etc/p.conf:4: "
     "[channel:siem] ca_file: only for a tls:// target"),
    ("target = tls://h:1\ncert_file = /etc/c.pem\n", "/etc/p.conf:1: "
     "[channel:siem] key_file: cert_file and key_file go together (a "
     "client certificate and its key)"),
    ("target = tls://h:1\nkey_file = relative.key\n", "/etc/p.conf:4: "
     "[channel:siem] key_file: expected an absolute path, got "
     "'relative.key'"),
    ("target = tcp://h:1\nheader = rfc3164\nbom = yes\n", "/etc/p.conf:5: "
     "[channel:siem] bom: only with header = rfc5424"),
    ("target = tcp://h:1\nbom = maybe\n", "/etc/p.conf:4: [channel:siem] "
     "bom: expected yes or no, got 'maybe'"),
    ("target = tcp://h:1\ntemplate = {title}\n", "/etc/p.conf:4: "
     "[channel:siem] template: unknown key for a syslog channel"),
])
def test_bad_settings_are_named_with_file_line_and_key(text, message):
    assert problems_of(text) == [message]
