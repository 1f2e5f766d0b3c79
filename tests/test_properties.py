"""Property-based tests (hypothesis) of every reader of untrusted bytes,
seeded from the fixtures: structured inputs the byte fuzzers of
tests/fuzz/ rarely build, put through the same checks, plus round trips
that only structure can state (a record written is the record read).

Example counts are bounded so the file runs in well under a minute;
PAMSIGNAL_PROPERTY_EXAMPLES=2000 searches longer.
"""

import ipaddress
import json
import os
import sys
import tempfile

import pytest

import realsys

try:
    import hypothesis
except ImportError:
    if realsys.in_ci():  # nothing may skip there
        raise
    pytest.skip("pip install hypothesis (tests/check.sh does)",
                allow_module_level=True)
from hypothesis import (  # noqa: E402
    example, given, settings, strategies as st)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "fuzz"))
import fuzz_config  # noqa: E402
import fuzz_http  # noqa: E402
import fuzz_journal  # noqa: E402
import fuzz_metrics  # noqa: E402
import fuzz_mmdb  # noqa: E402
import fuzz_spool  # noqa: E402
import fuzz_state  # noqa: E402
import harness  # noqa: E402
from mmdb_writer import MMDBWriter  # noqa: E402

pamsignal = harness.pamsignal

#: Examples per property: 60 in CI; more by hand to search longer.
EXAMPLES = int(os.environ.get("PAMSIGNAL_PROPERTY_EXAMPLES", "60"))

PROPERTIES = settings(max_examples=EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(hypothesis.HealthCheck))


def holds(check, data):
    with harness.bounded():
        check(data)


# ------------------------------------------------------------- journal lines

with open(fuzz_journal.FIXTURES, encoding="utf-8") as _f:
    FIXTURES = [f["entry"] for f in json.load(_f)
                if isinstance(f["entry"].get("MESSAGE"), str)]

#: Text an attacker puts in a user name or a command: spaces, quotes, the
#: words of the grammar, controls, bidi overrides, other scripts.
HOSTILE_TEXT = st.text(st.one_of(
    st.sampled_from(list(" :[]()=;'\"\\\x00\x1b\n\u202e\u2028\ufeffé\u4e2d")),
    st.characters(blacklist_categories=("Cs",))), max_size=12) | \
    st.sampled_from(
    [" from 10.0.0.1 port 22 ssh2", " for invalid user ", " port ",
     " ssh2: RSA SHA256:x", " [preauth]", "::ffff:", "%eth0", "(uid=0)"])


@st.composite
def edited_messages(draw):
    """A fixture message with hostile text put in at word boundaries and
    some of its words dropped."""
    entry = draw(st.sampled_from(FIXTURES))
    words = entry["MESSAGE"].split(" ")
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(words)))
        if draw(st.booleans()) and at < len(words):
            del words[at]
        else:
            words.insert(at, draw(HOSTILE_TEXT))
    return entry, " ".join(words)


@PROPERTIES
@given(edited_messages(), st.integers(0, len(fuzz_journal.WRITERS) - 1))
def test_an_edited_message_parses_to_nothing_or_a_sound_event(edited,
                                                              writer):
    entry, message = edited
    identifier = entry["SYSLOG_IDENTIFIER"]
    if identifier not in fuzz_journal.IDENTIFIERS:
        identifier = "sshd"
    holds(fuzz_journal.check, bytes([
        1, fuzz_journal.IDENTIFIERS.index(identifier), writer]) +
        message.encode("utf-8"))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=8)


@PROPERTIES
@given(st.sampled_from(FIXTURES), st.dictionaries(st.sampled_from(
    ["SYSLOG_IDENTIFIER", "MESSAGE", "_UID", "_EXE", "_COMM", "_PID",
     "_TRANSPORT", "__REALTIME_TIMESTAMP", "_HOSTNAME", "__CURSOR",
     "_BOOT_ID"]), JSON_VALUES, max_size=3))
def test_a_line_with_fields_of_any_shape_is_read_safely(entry, changes):
    line = json.dumps(dict(entry, **changes))
    holds(fuzz_journal.check, b"\0" + line.encode("utf-8"))


@PROPERTIES
@given(st.sampled_from([e for e in FIXTURES if " from " in e["MESSAGE"]]),
       st.sampled_from(["::ffff:", "::FFFF:", "[", "%lo"]))
def test_an_ipv4_source_is_the_same_however_written(entry, form):
    """sshd may log an IPv4 peer mapped into IPv6, or bracketed; the event
    says the plain address either way."""
    event = pamsignal.parse_entry(dict(
        entry, __REALTIME_TIMESTAMP="1795780000123456"))
    if event is None or not event.source_ip or ":" in event.source_ip or \
            event.source_ip not in entry["MESSAGE"]:
        return
    written = {"::ffff:": "::ffff:%s", "::FFFF:": "::FFFF:%s",
               "[": "[::ffff:%s]", "%lo": "::ffff:%s%%lo"}[form] \
        % event.source_ip
    message = entry["MESSAGE"].replace(event.source_ip, written, 1)
    again = pamsignal.parse_entry(dict(
        entry, MESSAGE=message, __REALTIME_TIMESTAMP="1795780000123456"))
    assert again is not None and again.source_ip == event.source_ip, \
        (message, again)


# --------------------------------------------------------------------- MMDB

MMDB_VALUES = st.recursive(
    st.text(max_size=20) | st.binary(max_size=10) | st.booleans() |
    st.integers(0, (1 << 128) - 1) | st.integers(-(1 << 31), -1) |
    st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=8), inner, max_size=4), max_leaves=12)


@PROPERTIES
@given(st.dictionaries(st.text(max_size=8), MMDB_VALUES, max_size=5),
       st.sampled_from([24, 28, 32]), st.sampled_from([4, 6]),
       st.booleans(), st.integers(8, 32))
def test_a_record_written_is_the_record_read(record, record_size,
                                             ip_version, share, prefix):
    writer = MMDBWriter(ip_version=ip_version, record_size=record_size,
                        share=share)
    network = ipaddress.ip_network("1.2.3.4/%d" % prefix, strict=False)
    writer.insert(str(network), record)
    data = writer.to_bytes()
    reader = pamsignal.MMDBReader(data)
    assert reader.lookup_prefix("1.2.3.4") == (record, prefix)
    holds(fuzz_mmdb.check, data)


@PROPERTIES
@given(st.sampled_from(fuzz_mmdb.seeds()[:12]), st.data())
def test_a_damaged_database_reads_or_says_so(database, data):
    damaged = bytearray(database)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(damaged) - 1))
        damaged[at] = data.draw(st.integers(0, 255))
    holds(fuzz_mmdb.check, bytes(damaged))


def answers(reader):
    found = []
    for address in fuzz_mmdb.ADDRESSES:
        try:
            found.append(reader.lookup_prefix(address))
        except (pamsignal.DatabaseError, ValueError) as error:
            found.append(type(error).__name__)
    return found


@PROPERTIES
@given(st.sampled_from(fuzz_mmdb.seeds()[:12]), st.integers(0, 10 ** 6),
       st.integers(0, 255))
def test_a_mapped_file_answers_as_its_bytes(database, at, value):
    """`MMDBReader.open` maps the file (what the agent does); it must read
    a damaged file exactly as the bytes in memory are read."""
    damaged = bytearray(database)
    damaged[at % len(damaged)] = value
    with tempfile.NamedTemporaryFile(suffix=".mmdb") as handle:
        handle.write(damaged)
        handle.flush()
        try:
            in_memory = answers(pamsignal.MMDBReader(bytes(damaged)))
        except pamsignal.DatabaseError:
            with pytest.raises(pamsignal.DatabaseError):
                pamsignal.MMDBReader.open(handle.name)
            return
        mapped = pamsignal.MMDBReader.open(handle.name)
        try:
            assert answers(mapped) == in_memory
        finally:
            mapped.close()


# ------------------------------------------------------------ configuration

SECTIONS = ["pamsignal", "detection", "alerts", "geoip", "channel:ops",
            "channel:x y"]
KEYS = sorted(set(fuzz_config.dictionary()) - {"\n", "\t", " = "})


@PROPERTIES
@given(st.lists(st.tuples(
    st.sampled_from(SECTIONS), st.lists(st.tuples(
        st.sampled_from(KEYS), st.sampled_from(KEYS) | HOSTILE_TEXT),
        max_size=5)), max_size=4))
def test_any_mix_of_known_keys_is_a_config_or_its_problems(sections):
    text = "".join("[%s]\n%s" % (section, "".join(
        "%s = %s\n" % item for item in items)) for section, items in sections)
    holds(fuzz_config.check, text.encode("utf-8"))


# ------------------------------------------------------------------ metrics

LABEL_TEXT = st.text(st.characters(blacklist_categories=("Cs",)),
                     max_size=40)


@PROPERTIES
@given(st.lists(st.tuples(
    st.sampled_from(list(pamsignal.METRICS)),
    st.dictionaries(st.sampled_from(["channel", "action", "message"]),
                    LABEL_TEXT, max_size=2),
    st.integers(0, 10 ** 12)), max_size=12))
# Found by this test: \x85 and \u2028 ended a line for splitlines().
@example([("pamsignal_alerts_sent_total", {"channel": "ops\x85"}, 3),
          ("pamsignal_last_error_info", {"message": "a\u2028b"}, 1)])
def test_labels_and_counts_written_are_read_back(samples):
    text = pamsignal.render_metrics(samples)
    read = pamsignal.parse_metrics(text)
    assert sorted((name, sorted(labels.items()), value)
                  for name, found in read.items()
                  for labels, value in found) == \
        sorted((name, sorted(labels.items()), value)
               for name, labels, value in samples)
    holds(fuzz_metrics.check, text.encode("utf-8"))


# --------------------------------------------------------------------- HTTP

RETRY_AFTER = st.one_of(
    st.integers(-10, 10 ** 15).map(str), st.floats().map(repr),
    st.datetimes().map(lambda when: when.strftime(
        "%a, %d %b %Y %H:%M:%S GMT")), HOSTILE_TEXT)
RETRY_JSON = st.one_of(st.integers(), st.floats(), st.text(max_size=5),
                       st.none(), st.booleans())


@PROPERTIES
@given(st.integers(100, 999), st.lists(st.tuples(
    st.sampled_from(["Retry-After", "Location", "Content-Type", "X-Any"]),
    RETRY_AFTER), max_size=3), st.one_of(
        st.binary(max_size=40),
        st.builds(lambda hint, nested: json.dumps(
            {"parameters": {"retry_after": hint}} if nested
            else {"ok": False, "retry_after": hint}).encode(),
            RETRY_JSON, st.booleans())))
def test_any_answer_is_judged(status, headers, body):
    headers = [(name, value.replace("\r", "").replace("\n", ""))
               for name, value in headers]
    holds(fuzz_http.check, fuzz_http.response(
        "HTTP/1.1 %d Whatever" % status, headers, body))


@PROPERTIES
@given(st.integers(0, pamsignal.MAX_RETRY_AFTER_S))
def test_a_rate_limit_waits_as_long_as_asked(seconds):
    answer = fuzz_http.read_answer(fuzz_http.response(
        "HTTP/1.1 429 Too Many Requests", [("Retry-After", str(seconds))]))
    failure = pamsignal.judge_response(*answer)
    assert failure.retry_after == seconds and not failure.permanent


# ------------------------------------------------------------- spool, state

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


#: Addresses as the parser writes them (normalised, never mapped).
ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(
        lambda a: pamsignal.normalise_address(str(a))[0]))


def field_values(field):
    if field in pamsignal._ADDRESS_FIELDS:
        return ADDRESSES
    if field in harness.INT_FIELDS:
        return st.integers(0, 2 ** 40)
    if field in harness.NUMBER_FIELDS:
        return st.floats(0, 1e9)
    if field in harness.LIST_FIELDS:
        return st.lists(TEXT, max_size=3).map(tuple)
    return TEXT


EVENTS = st.builds(
    lambda action, timestamp, fields: pamsignal.Event(
        action=action, timestamp_us=timestamp, **fields),
    st.sampled_from(sorted(pamsignal.ACTIONS)),
    st.integers(0, 253402300799999999),
    st.fixed_dictionaries({}, optional={
        field: field_values(field) for field in pamsignal.EVENT_FIELDS
        if field not in ("action", "timestamp_us", "context_key",
                         "severity")}))


@PROPERTIES
@given(EVENTS)
def test_an_alert_spooled_is_the_alert_delivered(event):
    record = json.loads(json.dumps(pamsignal.event_to_record(event)))
    assert pamsignal.event_from_record(record) == event
    holds(fuzz_spool.check, b"\0" + fuzz_spool.alert_file(event))


@PROPERTIES
@given(st.dictionaries(st.sampled_from(
    list(pamsignal.EVENT_FIELDS) + ["version"]), JSON_VALUES, max_size=6))
def test_a_spool_file_of_any_shape_is_delivered_or_dropped(record):
    base = {"action": "login_failure", "timestamp_us": 1795780000000000}
    holds(fuzz_spool.check, b"\0" + json.dumps(
        {"version": 1, "event": dict(base, **record)}).encode())


@PROPERTIES
@given(st.sampled_from(fuzz_state.seeds()), st.data())
def test_a_state_with_values_of_any_shape_restores(seed, data):
    """Each value of a saved state, replaced by one of any shape."""
    state = json.loads(seed[1:])
    paths = []

    def walk(node, path):
        items = node.items() if isinstance(node, dict) else \
            enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            paths.append(path + [key])
            walk(value, path + [key])
    walk(state, [])
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        node = state
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = data.draw(JSON_VALUES | st.integers(
                -(10 ** 400), 10 ** 400))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed this path
    holds(fuzz_state.check, seed[:1] + json.dumps(state).encode())
