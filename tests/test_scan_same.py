"""`scan` prints exactly what it printed before the hot path was made
faster (issue 19): the same bytes, JSON and text, for every fixture
export and for larger mixes of real sshd, sudo and noise lines.

The "before" outputs were captured from pamsignal.py as it was before
any speed-up, into tests/fixtures/scan_before.json (inputs of the
fixture exports included, so fixtures added later do not change what is
compared; the version number is left out). A change that alters an
event on purpose re-captures them: `python3 tests/test_scan_same.py
--capture [PAMSIGNAL.PY]`, and the diff shows what changed.

What the hot path writes itself instead of building objects for json
(render_json, the audit log's canonical records) is held to json's text
for any value by property tests here (hypothesis is not installed for
the other Pythons of .ci/pythons).
"""
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

import hypothesis
import hypothesis.strategies as st
import pytest

from support import PAMSIGNAL, make_entry, pamsignal

HERE = os.path.dirname(os.path.abspath(__file__))
BEFORE = os.path.join(HERE, "fixtures", "scan_before.json")
FIXTURE_FILES = ("messages.json", "sshd_forms.json")


def fixture_export(name):
    """All entries of one fixture file, in order, as a journal export."""
    with open(os.path.join(HERE, "fixtures", name)) as handle:
        fixtures = json.load(handle)
    lines = []
    for sequence, fixture in enumerate(fixtures, 1):
        entry = dict(fixture["entry"])
        lines.append(json.dumps(make_entry(
            entry.pop("SYSLOG_IDENTIFIER"), entry.pop("MESSAGE"), sequence,
            **entry)))
    return "\n".join(lines) + "\n"


#: (identifier, uid, message) of a busy server, cycled: brute force from
#: IPv4 and IPv6 sources with pam_unix companions, logins, sessions
#: opening and closing, sudo, and lines of programs nobody watches.
_MIX = (
    ("sshd", "0", "pam_unix(sshd:auth): authentication failure; logname= "
     "uid=0 euid=0 tty=ssh ruser= rhost={ip}  user=root"),
    ("sshd", "0", "Failed password for root from {ip} port {port} ssh2"),
    ("sshd", "0", "Failed password for invalid user admin{n} from {ip} "
     "port {port} ssh2"),
    ("sshd", "0", "Invalid user admin{n} from {ip} port {port}"),
    ("sshd", "0", "Connection closed by authenticating user root {ip} "
     "port {port} [preauth]"),
    ("CRON", "0", "pam_unix(cron:session): session opened for user "
     "root(uid=0) by (uid=0)"),
    ("sshd-session", "0", "Accepted publickey for alice from {ip} port "
     "{port} ssh2: ED25519 SHA256:Yx1c0FfZ4u3q0Wm1bqjz0Wj2n7I1s5r7m3x2kP4"),
    ("sshd-session", "0", "pam_unix(sshd:session): session opened for user"
     " alice(uid=1000) by alice(uid=0)"),
    ("sudo", "1000", "   alice : TTY=pts/{n} ; PWD=/home/alice ; USER=root"
     " ; COMMAND=/usr/bin/systemctl restart app{n}"),
    ("sshd", "1000", "Accepted password for root from {ip} port {port} "
     "ssh2"),  # forged: written by a user, not by sshd
    ("sshd-session", "0", "pam_unix(sshd:session): session closed for user"
     " alice"),
    ("kernel", "0", "audit: type=1400 apparmor=\"DENIED\" pid={port}"),
)


def mix_export(count):
    """`count` entries cycling through _MIX, sources spread so that some
    repeat (brute force) and most do not."""
    lines = []
    for number in range(count):
        identifier, uid, template = _MIX[number % len(_MIX)]
        source = number // 3 % 40
        ip = ("2001:db8:%x::%x" % (source, number % 5) if source % 4 == 0
              else "198.51.100.%d" % source if source % 2 else
              "203.0.113.%d" % (source % 7))
        lines.append(json.dumps(make_entry(
            identifier, template.format(ip=ip, port=1024 + number, n=number
                                        % 9), number + 1, _UID=uid,
            _PID=str(4000 + number // 6)), sort_keys=True))
    return "\n".join(lines) + "\n"


def scan(export, *flags, program=PAMSIGNAL):
    """What `scan` prints, the program's version in it as VERSION (a new
    release number is no change of output)."""
    with tempfile.NamedTemporaryFile(suffix=".conf") as config:  # defaults
        result = subprocess.run(
            [sys.executable, program, "--config", config.name, "scan"]
            + list(flags) + ["-"], input=export.encode(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=dict(os.environ, TZ="UTC"),
            timeout=300)
    assert result.returncode == 0, result.stderr
    version = subprocess.run([sys.executable, program, "--version"],
                             stdout=subprocess.PIPE, universal_newlines=True,
                             check=True).stdout.split()[-1]
    return result.stdout.decode().replace(
        '"version": "%s"' % version, '"version": "VERSION"')


def digest(text):
    return hashlib.sha256(text.encode()).hexdigest()


def capture(program):
    """What `scan` of `program` prints, per export (the fixture exports
    in full, the mixes by digest: they are large)."""
    before = {}
    for name in FIXTURE_FILES:
        export = fixture_export(name)
        before[name] = {"export": export,
                        "json": scan(export, "--json", program=program),
                        "text": scan(export, program=program)}
    for count in (600, 6000):
        export = mix_export(count)
        before["mix%d" % count] = {
            "json_sha256": digest(scan(export, "--json", program=program)),
            "text_sha256": digest(scan(export, program=program))}
    return before


@pytest.fixture(scope="module")
def before():
    with open(BEFORE) as handle:
        return json.load(handle)


@pytest.mark.parametrize("name", FIXTURE_FILES)
@pytest.mark.parametrize("flags", [("--json",), ()])
def test_a_fixture_export_scans_to_the_same_bytes(before, name, flags):
    expected = before[name]
    assert expected["json"].count("\n") > 50  # the capture holds events
    assert scan(expected["export"], *flags) == \
        expected["json" if flags else "text"]


@pytest.mark.parametrize("count", [600, 6000])
def test_a_mix_of_many_entries_scans_to_the_same_bytes(before, count):
    expected = before["mix%d" % count]
    export = mix_export(count)
    printed = scan(export, "--json")
    actions = {json.loads(line)["event"]["action"]
               for line in printed.splitlines()}
    assert {"login_failure", "login_success", "session_opened",
            "session_closed", "sudo_command", "brute_force_detected",
            "spoofed_entry"} <= actions
    assert digest(printed) == expected["json_sha256"]
    assert digest(scan(export)) == expected["text_sha256"]


if __name__ == "__main__":
    if sys.argv[1:2] != ["--capture"] or len(sys.argv) > 3:
        sys.exit("usage: python3 tests/test_scan_same.py --capture "
                 "[PAMSIGNAL.PY]")
    with open(BEFORE, "w") as handle:
        json.dump(capture(sys.argv[2] if len(sys.argv) == 3 else PAMSIGNAL),
                  handle, indent=1, sort_keys=True)
        handle.write("\n")


# ------------------------------------------- fast paths, same text as before

def plain_dumps_safe(obj):
    """dumps_safe as it was: the readable encoder, then every unsafe
    character escaped."""
    return pamsignal._UNSAFE_CHARS.sub(
        pamsignal._json_escape_char, pamsignal._JSON_ENCODER.encode(obj))


@pytest.mark.parametrize("text", [
    "plain", "caf\u00e9", "\x7f", "a\\u0041", "\u2028", "\x1b[31m", "\t\n",
    "\ud800", "\U0001f600", "\u00ad", "\\", '"'])
def test_json_of_any_text_is_what_it_was(text):
    obj = {"message": text, "user": {"name": text}, "list": [text, 1]}
    assert pamsignal.dumps_safe(obj) == plain_dumps_safe(obj)


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) |
    st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8))
def test_json_of_anything_is_what_it_was(obj):
    assert pamsignal.dumps_safe(obj) == plain_dumps_safe(obj)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.integers(min_value=-2 ** 63, max_value=2 ** 63))
def test_a_time_formats_as_it_did(timestamp_us):
    seconds, micros = divmod(min(max(timestamp_us, 0),
                                 pamsignal.MAX_TIMESTAMP_US), 1000000)
    assert pamsignal.format_timestamp(timestamp_us) == "%s.%06dZ" % (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)), micros)


#: Any value an event field may hold: text of any kind, numbers, lists.
_FIELD_VALUES = st.none() | st.just("") | st.text(max_size=12) | \
    st.integers(min_value=0, max_value=2 ** 40) | \
    st.floats(allow_nan=False, allow_infinity=False) | \
    st.tuples(st.text(max_size=5), st.text(max_size=5))


def _event(action, severity, time_us, fields, message):
    return pamsignal.Event(action=action, severity=severity,
                           timestamp_us=time_us, message=message, **fields)


#: Any event: any action and severity, any time, any of the fields the
#: event contract shows holding any value, any message.
ANY_EVENT = st.builds(
    _event, st.sampled_from(sorted(pamsignal.ACTIONS)),
    st.one_of(st.none(), st.integers(0, 10)), st.integers(-2 ** 40, 2 ** 60),
    st.dictionaries(st.sampled_from(pamsignal.EVENT_FIELDS[4:-3]),
                    _FIELD_VALUES), st.none() | st.text(max_size=12))


@hypothesis.settings(max_examples=800, deadline=None)
@hypothesis.given(ANY_EVENT)
def test_an_event_is_written_as_its_object_encodes(event):
    # render_json writes the text itself: it must be the contract's
    # object as dumps_safe encodes it, member for member, whatever fields
    # are present, nested or not, and whatever text they hold.
    assert pamsignal.render_json(event) == \
        pamsignal.dumps_safe(pamsignal.event_to_ecs(event))


def canonical(record):
    """The banner's canonical bytes, by the json module itself."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True).encode("ascii")


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(st.dictionaries(st.text(max_size=6), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() |
    st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=3) |
    st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8),
    max_size=8))
def test_any_record_is_hashed_over_its_canonical_bytes(record):
    # chain_bytes writes text and numbers itself: whatever the keys and
    # values, the bytes must be json's, key for key.
    assert pamsignal.chain_bytes(record) == canonical(record)


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(ANY_EVENT)
def test_an_event_record_holds_the_event_contract(event):
    # The pipeline hands the event itself; the record must be the one of
    # its ECS object, in the canonical form, for any event.
    body = {"kind": "event", "id": "1f" * 16, "seq": 3}
    assert pamsignal.chain_bytes(dict(body, event=event)) == canonical(
        dict(body, event=pamsignal.event_to_ecs(event)))


@hypothesis.settings(max_examples=400, deadline=None)
@hypothesis.given(ANY_EVENT)
def test_an_event_is_named_by_its_canonical_ecs_text(event):
    # The pipeline writes an event's ECS text once, for its id and its
    # record: both must be what the event contract's object gives.
    ecs = canonical(pamsignal.event_to_ecs(event))
    text = pamsignal.CanonicalText(pamsignal.canonical_ecs(event))
    assert pamsignal.alert_id(event) == hashlib.sha256(ecs).hexdigest()[:32]
    assert pamsignal.chain_bytes({"kind": "event", "event": text}) == \
        canonical({"kind": "event", "event": pamsignal.event_to_ecs(event)})


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.dictionaries(st.sampled_from(pamsignal.EVENT_FIELDS),
                                  _FIELD_VALUES, max_size=4),
                  st.dictionaries(st.sampled_from(pamsignal.EVENT_FIELDS),
                                  _FIELD_VALUES, max_size=4))
def test_an_event_changes_as_a_namedtuple_would(fields, changes):
    event = pamsignal.Event(**fields)
    changed = event._replace(**changes)
    assert type(changed) is pamsignal.Event
    assert tuple(changed) == tuple(
        pamsignal._EventTuple._replace(event, **changes))
    assert tuple(event) == tuple(pamsignal.Event(**fields))  # untouched


def test_an_event_has_no_field_it_was_not_given():
    with pytest.raises(ValueError, match="colour"):
        pamsignal.Event(action="login_success")._replace(colour="red")


def plain_event_text(event):
    """event_text as it was: every pair worked out, the empty ones left."""
    shown = [event.action] + [
        "%s=%s" % (name, pamsignal._text_value(value)) for name, value in [
            ("user", event.user or (event.user_id and
                                    "uid " + event.user_id)),
            ("as", event.target_user),
            ("source", pamsignal._endpoint(event.source_ip,
                                           event.source_domain,
                                           event.source_port)),
            ("asn", None if event.source_as_number is None
             else "AS%d" % event.source_as_number),
            ("org", event.source_as_org), ("country", event.source_country),
            ("city", event.source_city),
            ("source_type", event.source_network_type),
            ("provider", event.source_provider),
            ("destination", event.destination_ip and pamsignal._endpoint(
                event.destination_ip, None, event.destination_port)),
            ("service", event.service), ("method", event.auth_method),
            ("reason", event.reason), ("key", event.key),
            ("tty", event.tty and pamsignal._tty_text(event.tty, event)),
            ("command", event.command_line),
            ("duration", None if event.session_duration_s is None
             else "%gs" % event.session_duration_s),
            ("typed", pamsignal.typed_summary(event.typed_lines,
                                              event.typed_more)
             if event.typed_lines or event.typed_more else None),
            ("counted_by", event.counted_by), ("network", event.network),
            ("attempts", event.attempts),
            ("window", None if event.window_s is None
             else "%ds" % event.window_s),
            ("users_tried", ",".join(event.users_tried or ()) or None),
            ("sources", ",".join(event.sources or ()) or None),
            ("held_back", event.held_back),
            ("kinds", event.detail if event.held_back else None),
            ("unit", event.unit), ("dropped", event.dropped),
            ("record", event.login_record), ("repeat", event.repeat),
            ("writer_uid", event.writer_uid),
            ("program", event.process_name),
            ("claimed", event.claimed_action),
            ("detail", event.detail
             if event.action in pamsignal.DETAIL_SHOWN else None),
            ("host", event.hostname), ("journal_time", event.journal_time),
            ("host_provider", event.host_provider),
            ("message", event.message if event.action == "spoofed_entry" or
             event.action in pamsignal.AGENT_ACTIONS else None)]
        if value is not None and value != ""]
    return " ".join(shown)


def plain_render_text(event):
    """render_text as it was: the time cut from the JSON time."""
    stamp = pamsignal.format_timestamp(event.timestamp_us)
    return "%sZ %s" % (stamp[:19].replace("T", " "), plain_event_text(event))


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(st.sampled_from(sorted(pamsignal.ACTIONS)),
                  st.integers(-2 ** 40, 2 ** 60),
                  st.dictionaries(st.sampled_from(
                      pamsignal.EVENT_FIELDS[4:-3]), _FIELD_VALUES,
                      max_size=6))
def test_an_event_is_shown_as_before(action, time_us, fields):
    event = pamsignal.Event(action=action, timestamp_us=time_us, **fields)
    try:
        before = plain_render_text(event)
    except (TypeError, ValueError):  # a value no event can hold
        hypothesis.reject()
    assert pamsignal.render_text(event) == before


@hypothesis.settings(max_examples=800, deadline=None)
@hypothesis.given(ANY_EVENT)
def test_an_event_shows_each_part_it_holds_in_order(event):
    # event_text skips an unset field before working its part out: any
    # event, whatever it holds, must show exactly the parts it did.
    try:
        before = plain_event_text(event)
    except (TypeError, ValueError):  # a value no event can hold
        hypothesis.reject()
    assert pamsignal.event_text(event) == before


@pytest.mark.parametrize("fields, shown", [
    ({"typed_more": 0}, "session_closed host=web1"),
    ({"typed_lines": (), "tty": ""}, "session_closed host=web1"),
    ({"typed_lines": ("id",), "typed_more": 2},
     "session_closed typed=\"id (+2 more)\" host=web1"),
    ({"destination_ip": "", "destination_port": 22},
     "session_closed host=web1"),
    ({"destination_ip": "192.0.2.1", "destination_port": 22},
     "session_closed destination=192.0.2.1:22 host=web1"),
    ({"tty": "ttyS0", "tty_kind": "serial"},
     "session_closed tty=\"ttyS0 (serial console)\" host=web1")])
def test_only_what_an_event_holds_is_shown(fields, shown):
    # The line skips the parts an event lacks before working them out: a
    # part that is empty, zero or absent shows nothing, as it did.
    event = pamsignal.Event(action="session_closed", hostname="web1",
                            **fields)
    assert pamsignal.event_text(event) == shown
