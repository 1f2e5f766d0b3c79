"""parse_entry against one fixture line per message form (real wording of
OpenSSH, sudo, su, login, PAM and logind; see tests/fixtures/messages.json)."""
import datetime
import io
import json
import os
import re
import time

import pytest

from support import flatten, make_entry, pamsignal, parse_flat

#: One case per message form: messages.json for every service, and
#: sshd_forms.json for each form of a failed, refused, abandoned or
#: probing sshd connection, with the OpenSSH versions that write it;
#: sudosu_forms.json for the sudo (text and JSON), su and console login
#: forms, with the sudo, util-linux or shadow release that writes each.
FIXTURES = [os.path.join(os.path.dirname(__file__), "fixtures", name)
            for name in ("messages.json", "sshd_forms.json",
                         "sudosu_forms.json", "doors_forms.json")]

CASES = []
for _path in FIXTURES:
    with open(_path, encoding="utf-8") as _handle:
        CASES += json.load(_handle)


def entry_of(case):
    fields = dict(case["entry"])
    identifier = fields.pop("SYSLOG_IDENTIFIER")
    message = fields.pop("MESSAGE")
    return make_entry(identifier, message, **fields)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_fixture(case):
    got = parse_flat(entry_of(case))
    if case["expect"] is None:
        assert got is None
        return
    assert got is not None, "no event for %r" % case["entry"]["MESSAGE"]
    for key, value in case["expect"].items():
        assert got.get(key) == value, key
    for key in case.get("absent", ()):
        assert key not in got
    assert got["message"] == case["entry"]["MESSAGE"]
    assert got["@timestamp"].endswith("Z")
    # How the pipeline pairs it with the other lines of its connection.
    assert pamsignal.parse_entry(entry_of(case)).pairing == \
        case.get("pairing")


def test_fixtures_cover_every_rule_and_action():
    rules = set()
    for case in CASES:
        entry = entry_of(case)
        service = pamsignal.WATCHED_SERVICES.get(
            entry["SYSLOG_IDENTIFIER"]) or pamsignal.unlisted_service(
                entry["SYSLOG_IDENTIFIER"])
        if service is not None:
            rule, _ = pamsignal.classify_message(service.family,
                                                 entry["MESSAGE"])
            if rule is not None:
                rules.add(rule.name)
    assert rules == set(rule.name for rule in pamsignal.RULES)
    actions = set(case["expect"]["event.action"] for case in CASES
                  if case["expect"])
    assert actions == pamsignal.PARSED_ACTIONS


def test_common_fields_come_from_trusted_journal_fields():
    got = parse_flat(make_entry(
        "sshd", "Accepted password for alice from 203.0.113.5 port 2 ssh2",
        _PID="77", _HOSTNAME="db2", __REALTIME_TIMESTAMP="1795787242706862"))
    assert got["process.pid"] == 77
    assert got["host.hostname"] == "db2"
    assert got["@timestamp"] == "2026-11-27T13:47:22.706862Z"
    assert got["pamsignal.cursor"].startswith("s=0123456789abcdef")
    assert got["pamsignal.version"] == pamsignal.__version__


def test_ecs_has_no_nulls_or_empty_values():
    event = pamsignal.parse_entry(make_entry(
        "sshd", "Invalid user  from 203.0.113.5 port 2"))
    flat = flatten(pamsignal.event_to_ecs(event))
    assert "user.name" not in flat
    assert all(value not in (None, "", [], {}) for value in flat.values())


@pytest.mark.parametrize("missing", ["MESSAGE", "SYSLOG_IDENTIFIER"])
def test_entry_without_essential_field_gives_nothing(missing):
    entry = make_entry(
        "sshd", "Accepted password for alice from 203.0.113.5 port 2 ssh2")
    del entry[missing]
    assert pamsignal.parse_entry(entry) is None


@pytest.mark.parametrize("value", [None, 12, {"a": 1}, [], ["x", "y"],
                                   [300, 1]])
def test_odd_message_shapes_never_raise(value):
    entry = make_entry("sshd", "x")
    entry["MESSAGE"] = value
    event = pamsignal.parse_entry(entry)
    assert event is None


def test_message_as_byte_array_is_decoded():
    message = "Failed password for b\xe9a from 203.0.113.5 port 9 ssh2"
    entry = make_entry("sshd", "x")
    entry["MESSAGE"] = list(message.encode("latin-1"))
    assert parse_flat(entry)["user.name"] == "b\ufffda"


def test_repeated_field_uses_first_value():
    entry = make_entry("sshd", "x")
    entry["MESSAGE"] = [
        "Accepted password for alice from 203.0.113.5 port 2 ssh2", "y"]
    assert parse_flat(entry)["user.name"] == "alice"


def test_huge_message_is_cut_before_matching():
    entry = make_entry("sshd", "Failed password for " + "a" * 500000 +
                       " from 203.0.113.5 port 2 ssh2")
    assert pamsignal.parse_entry(entry) is None


@pytest.mark.parametrize("overrides", [
    {"_UID": "1000", "_COMM": "sshd", "_EXE": "/usr/sbin/sshd"},
    {"_EXE": "/tmp/sshd", "_COMM": "sshd"},
    {"_EXE": "/home/eve/bin/sshd", "_COMM": "sshd", "_UID": "0"},
    {"_EXE": "/usr/bin/logger", "_COMM": "logger"},
    {"_TRANSPORT": "kernel"},
    {"_TRANSPORT": None},
    {"_UID": None},
    {"_EXE": None, "_COMM": "logger"},
    {"_EXE": None, "_COMM": None, "_UID": "1000"},
    {"_EXE": "/usr/sbin/sshd (deleted)", "_COMM": "sshd", "_UID": "1000"},
])
def test_untrusted_writer_gives_spoofed_entry(overrides):
    got = parse_flat(make_entry(
        "sshd", "Accepted password for root from 6.6.6.6 port 1 ssh2",
        **overrides))
    assert got["event.action"] == "spoofed_entry"
    assert got["pamsignal.claimed_action"] == "login_success"
    assert "source.ip" not in got and "user.name" not in got


@pytest.mark.parametrize("identifier, overrides", [
    ("sshd", {"_EXE": None}),
    ("sshd", {"_EXE": None, "_COMM": None}),
    ("sshd-session", {}),
    ("sudo", {"_TRANSPORT": "journal"}),
])
def test_genuine_writers_are_trusted(identifier, overrides):
    message = "Accepted password for root from 6.6.6.6 port 1 ssh2" \
        if identifier.startswith("sshd") else \
        "alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; COMMAND=/bin/id"
    got = parse_flat(make_entry(identifier, message, **overrides))
    assert got["event.action"] in ("login_success", "sudo_command")


def test_non_root_writer_without_executable_is_not_trusted():
    """A process can name itself "sudo" (prctl) and exit before journald
    reads /proc/PID/exe; only the setuid binary's own _EXE proves it."""
    got = parse_flat(make_entry(
        "sudo", "mallory : PWD=/ ; USER=root ; COMMAND=/bin/forged",
        _UID="65534", _EXE=None, _COMM="sudo"))
    assert got["event.action"] == "spoofed_entry"
    assert got["pamsignal.writer_uid"] == 65534


def test_upgraded_binary_is_still_genuine():
    got = parse_flat(make_entry(
        "login", "LOGIN ON tty1 BY alice", _EXE="/usr/bin/login (deleted)"))
    assert got["event.action"] == "login_success"


def test_setuid_callers_uid_is_the_acting_user_id():
    got = parse_flat(make_entry(
        "su", "(to root) alice on pts/0", _UID="1000"))
    assert got["user.name"] == "alice" and got["user.id"] == "1000"
    assert "user.id" not in parse_flat(make_entry(
        "su", "(to alice) root on pts/0", _UID="0"))


def test_forged_text_is_read_only_as_far_as_its_claim():
    long_name = "a" * 2000
    got = parse_flat(make_entry(
        "sshd", "Accepted password for %s from 6.6.6.6 port 1 ssh2"
        % long_name, _UID="65534", _EXE="/usr/bin/logger", _COMM="logger"))
    assert got is None, "past 1024 characters a forgery claims nothing"
    genuine = parse_flat(make_entry(
        "sshd", "Invalid user %s from 203.0.113.5 port 1" % long_name))
    assert genuine["user.name"] == long_name


@pytest.mark.parametrize("identifier, message", [
    ("doas", "alice ran command /usr/bin/id %s as root from /home/alice"),
    ("pkexec", "alice: Executing command [USER=root] [TTY=/dev/pts/1] "
               "[CWD=/home/alice] [COMMAND=/usr/bin/id %s]"),
])
@pytest.mark.parametrize("length", [10, 1100, 4000])
def test_a_long_command_logged_just_before_exec_is_read(identifier, message,
                                                        length):
    """doas's child and pkexec log as root just before they execute the
    command, so journald names the command (_COMM=id, no _EXE): a line
    past 1024 characters is as genuine as a short one."""
    arguments = "A" * length
    got = parse_flat(make_entry(identifier, message % arguments,
                                _COMM="id", _EXE=None, _UID="0"))
    assert got["event.action"] == "sudo_command"
    assert got["user.name"] == "alice"
    assert got["user.target.name"] == "root"
    assert got["process.command_line"] == "/usr/bin/id " + arguments
    forged = parse_flat(make_entry(identifier, message % arguments,
                                   _COMM="id", _EXE=None, _UID="1000"))
    assert forged is None or forged["event.action"] == "spoofed_entry"


def _white_space_runs_split(parsed):
    r"""Places in a parsed pattern where two \s* meet with nothing but
    optional items between: both can take any share of one run of white
    space, so a long run that fails to match costs quadratic work."""
    try:
        from re import _constants as codes, _parser as parser  # 3.11+
    except ImportError:
        import sre_constants as codes
        import sre_parse as parser  # noqa: F401

    def white_star(item):
        op, av = item
        return op in (codes.MAX_REPEAT, codes.MIN_REPEAT) and \
            av[0] == 0 and av[1] == codes.MAXREPEAT and \
            [(o, a) for o, a in av[2]] == [
                (codes.IN, [(codes.CATEGORY, codes.CATEGORY_SPACE)])]

    def optional(item):
        return item[0] in (codes.MAX_REPEAT, codes.MIN_REPEAT) and \
            item[1][0] == 0

    found, items = [], list(parsed)
    for at, (op, av) in enumerate(items):
        if white_star(items[at]):
            after = at + 1
            while after < len(items) and optional(items[after]) and \
                    not white_star(items[after]):
                after += 1
            if after < len(items) and white_star(items[after]):
                found.append(at)
        if op == codes.SUBPATTERN:
            found += _white_space_runs_split(av[-1])
        elif op == codes.BRANCH:
            for branch in av[1]:
                found += _white_space_runs_split(branch)
        elif op in (codes.MAX_REPEAT, codes.MIN_REPEAT):
            found += _white_space_runs_split(av[2])
    return found


def test_no_pattern_splits_a_run_of_white_space_two_ways():
    r"""Linear work on long white space, checked on the patterns themselves
    (no timing): `\s*,?\s*"` tried every split of an 8000-space run."""
    try:
        from re import _parser as parser
    except ImportError:
        import sre_parse as parser
    pattern_type = type(re.compile(""))
    patterns = [(name, value) for name, value in vars(pamsignal).items()
                if isinstance(value, pattern_type)]
    patterns += [(rule.name, rule.pattern) for rule in pamsignal.RULES]
    assert ("_JSON_KEY", pamsignal._JSON_KEY) in patterns
    quadratic = [name for name, pattern in patterns
                 if isinstance(pattern.pattern, str) and
                 _white_space_runs_split(parser.parse(pattern.pattern,
                                                      pattern.flags))]
    assert quadratic == []
    assert _white_space_runs_split(parser.parse(r'\s*,?\s*"'))


@pytest.mark.parametrize("text, record, whole", [
    ('{"accept":{"submituser":"alice","command":"/bin/id"}}',
     {"submituser": "alice", "command": "/bin/id"}, True),
    ('{"sudo":{"accept":{"submituser":"alice","command":"/bin/id"}}}',
     {"submituser": "alice", "command": "/bin/id"}, True),
    ('{ "sudo" : { "accept" : {\n  "submituser" : "alice" ,\n'
     '  "command" : "/bin/id"}\n }\n}\n',
     {"submituser": "alice", "command": "/bin/id"}, True),
    ('{"sudo":{"accept":{"submituser":"alice",%s"command":"/bin/id"}%s}%s}'
     '%s' % ((" " * 8000,) * 4),
     {"submituser": "alice", "command": "/bin/id"}, True),
    ('{"accept":{"submituser":"alice"%s,%s"command":"/bin/id"}}'
     % (" " * 8000, "\t" * 8000),
     {"submituser": "alice", "command": "/bin/id"}, True),
    # A long run that ends in no key, or in no end, is read no further.
    ('{"accept":{"submituser":"alice",%sx' % (" " * 8000),
     {"submituser": "alice"}, False),
    ('{"accept":{"submituser":"alice"}%sx' % (" " * 8000),
     {"submituser": "alice"}, False),
    ('{"accept":{"submituser":"alice",,"command":"/bin/id"}}',
     {"submituser": "alice"}, False),
])
def test_sudo_json_record_reads_white_space_around_its_keys(text, record,
                                                            whole):
    assert pamsignal.sudo_json_record(text) == ("accept", record, whole)


def test_forged_line_that_claims_nothing_is_ignored():
    assert pamsignal.parse_entry(make_entry(
        "sshd", "hello", _UID="65534", _EXE="/usr/bin/logger",
        _COMM="logger")) is None


@pytest.mark.parametrize("claimed", ["9999999999999999999",
                                     "253402300800000000", "-1", "soon",
                                     None])
def test_an_impossible_entry_time_keeps_its_event_at_the_time_read(
        tmp_path, claimed):
    """A crafted __REALTIME_TIMESTAMP (past 9999-12-31, not a number, or
    none) must not print as the year 318857 nor lose the login: the event
    is kept, stamped with the time it was read, and says what the entry
    claimed."""
    entry = make_entry(
        "sshd", "Accepted password for alice from 203.0.113.5 port 2 ssh2",
        __REALTIME_TIMESTAMP=claimed)
    export = tmp_path / "export.json"
    export.write_text(json.dumps(entry) + "\n")
    out = io.StringIO()
    before = time.time()
    assert pamsignal.main(["scan", "--json", str(export)], out) == 0
    after = time.time()
    (event,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert event["event"]["action"] == "login_success"
    stamp = datetime.datetime.strptime(event["@timestamp"],
                                       "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    assert int(before) <= stamp <= after
    assert event["pamsignal"]["journal_time"] == (
        claimed if claimed is not None else "(none)")
    text = io.StringIO()
    pamsignal.main(["scan", str(export)], text)
    assert "318857" not in text.getvalue()
    assert "journal_time=" in text.getvalue()


def test_times_too_large_to_show_are_clamped_not_raised():
    assert pamsignal.format_timestamp(10 ** 19) == \
        "9999-12-31T23:59:59.999999Z"
    assert pamsignal.format_timestamp(-5) == "1970-01-01T00:00:00.000000Z"
