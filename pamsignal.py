#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""pamsignal - see who gets into this server, the moment they do.

Follows the systemd journal, recognises every SSH, sudo, su and console login
and every failed attempt, and reports each as one event (Elastic Common Schema
JSON, or a readable line).

commands:
  run [--json]             follow the journal and report each event (default)
  scan [--json] [FILE|-]   read a `journalctl -o json` export (or stdin) and
                           print the events it holds; sends nothing
  check-config             validate the configuration; exit 78 on problems
  status [--json]          health and counters of the running service
  install, uninstall       set this file up as a hardened systemd service
                           (--prefix, --root DIR; uninstall --purge)

examples:
  sudo python3 pamsignal.py
  sudo python3 pamsignal.py install
  journalctl -o json --since today | python3 pamsignal.py scan --json -

Exit codes: 0 ok, 1 runtime failure, 2 usage, 78 configuration error.
Configuration: /etc/pamsignal/pamsignal.conf (INI); without it, built-in
defaults apply and events are printed on the console.
"""

# ---------------------------------------------------------------------------
# 0 header: version gate
# ---------------------------------------------------------------------------
import sys

__version__ = "0.1.0"

if sys.version_info < (3, 6):  # pragma: no cover - needs an old interpreter
    sys.exit("pamsignal needs Python 3.6 or newer")

# ---------------------------------------------------------------------------
# 1 imports
# ---------------------------------------------------------------------------
import argparse  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import configparser  # noqa: E402
import difflib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

# ---------------------------------------------------------------------------
# 2 constants
# ---------------------------------------------------------------------------

#: Where the service looks for its configuration when --config is not given.
DEFAULT_CONFIG_PATH = "/etc/pamsignal/pamsignal.conf"

#: Exit codes of main(), as documented in the README and DESIGN.md.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78

#: Journal fields the parser reads; journalctl prints only these (plus cursor
#: and timestamps), which roughly doubles its throughput.
JOURNAL_FIELDS = ("MESSAGE", "SYSLOG_IDENTIFIER", "_PID", "_UID", "_COMM",
                  "_EXE", "_TRANSPORT", "_HOSTNAME", "_BOOT_ID")

#: Longest MESSAGE the parser looks at; real auth lines are far shorter and
#: the cap keeps a hostile megabyte line cheap.
MAX_MESSAGE_CHARS = 8192

#: How much of a forged entry's MESSAGE is read to name what it claims.
MAX_UNTRUSTED_MESSAGE_CHARS = 1024

#: Longest journalctl output line kept; a longer one is dropped whole.
MAX_LINE_BYTES = 4 * 1024 * 1024

#: Failure counters (per address, /64 or account) kept at most; the least
#: recently seen are forgotten first, so memory stays flat under attack.
MAX_FAILURE_KEYS = 20000

#: Users whose usual networks and sudo use are remembered.
MAX_BASELINE_USERS = 10000

#: Networks remembered per user (the most recently used kept).
MAX_NETWORKS_PER_USER = 32

#: Largest N of an "N in DURATION" threshold (each counter keeps N times).
MAX_THRESHOLD = 1000

#: Most user names remembered per counter for "which users were tried".
MAX_USERS_TRIED = 10

#: How often the detection state is saved when events came (and at
#: shutdown); a crash forgets at most this much counting.
DETECTION_FLUSH_S = 10.0

#: Open sessions remembered for pairing; the oldest are forgotten first.
MAX_OPEN_SESSIONS = 10000

#: Transports through which the real services write (syslog(3), the native
#: journal API, or stdout of a unit); kernel and audit lines are never logins.
TRUSTED_TRANSPORTS = frozenset(("syslog", "journal", "stdout"))

#: Directories a genuine service binary lives in; an unprivileged user cannot
#: put a program there, so `_EXE` in them cannot be faked.
TRUSTED_EXE_DIRS = frozenset((
    "/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin",
    "/usr/local/sbin", "/usr/lib/openssh", "/usr/libexec/openssh",
    "/usr/libexec", "/usr/lib/systemd", "/lib/systemd"))

#: Restart delays for journalctl, in seconds; the last one repeats.
RESTART_BACKOFF_S = (1, 2, 5, 10, 30)

#: A journalctl that ran this long is considered healthy again.
HEALTHY_RUN_S = 60.0

#: After this long without a line, ask the journal whether we fell behind.
STALL_CHECK_S = 300.0

#: How often the cursor of entries that produced nothing is saved.
STATE_FLUSH_S = 2.0

#: How often the health metrics file is rewritten (and STATUS= refreshed).
METRICS_FLUSH_S = 10.0

#: Metrics of a running agent older than this mean it is hung or was killed.
METRICS_STALE_S = 3 * METRICS_FLUSH_S

#: The metrics file in the state directory unless metrics_file names one.
METRICS_FILE_NAME = "pamsignal.prom"

#: A restarted journalctl that kept running this long is following again.
JOURNAL_RECOVERED_S = 10.0

#: Longest STATUS= text sent to systemd (it shows one line).
MAX_STATUS_CHARS = 240

#: Longest metrics label value written (an error message can be long).
MAX_LABEL_CHARS = 500

#: `install` puts the program in PREFIX/bin, unless told otherwise.
DEFAULT_PREFIX = "/usr"

#: Where `install` writes pamsignal.service (the admin's units, not a
#: package's).
SYSTEMD_UNIT_DIR = "/etc/systemd/system"

# ---------------------------------------------------------------------------
# 3 errors
# ---------------------------------------------------------------------------


class PamSignalError(Exception):
    """Root of all errors the command line turns into an exit code."""
    exit_code = EXIT_FAILURE


class ConfigError(PamSignalError):
    """The configuration is unusable; carries every problem found."""
    exit_code = EXIT_CONFIG

    def __init__(self, problems):
        self.problems = list(problems)
        PamSignalError.__init__(self, "\n".join(str(p) for p in self.problems))


class UsageError(PamSignalError):
    exit_code = EXIT_USAGE


class SourceError(PamSignalError):
    """journalctl cannot be started at all."""


class StateError(PamSignalError):
    """The state directory cannot be created or written."""


# ---------------------------------------------------------------------------
# 4 small pure helpers
# ---------------------------------------------------------------------------

#: Characters that must never reach a terminal raw: C0/C1 controls, DEL, and
#: Unicode format characters that reorder or hide text (bidi overrides, zero
#: width, line and paragraph separators, BOM).
_UNSAFE_CHARS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb]")


def _escape_char(match):
    code = ord(match.group(0))
    return "\\x%02x" % code if code < 0x100 else "\\u%04x" % code


def escape_text(text):
    """Make attacker-chosen text safe to print: unsafe characters as \\xNN."""
    return _UNSAFE_CHARS.sub(_escape_char, text)


def _json_escape_char(match):
    return "\\u%04x" % ord(match.group(0))


#: Built once: json.dumps() with options makes a new encoder every call.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": "))


def dumps_safe(obj):
    """JSON that is readable UTF-8 yet carries no raw control characters."""
    return _UNSAFE_CHARS.sub(_json_escape_char, _JSON_ENCODER.encode(obj))


#: Units of the durations in the configuration ("10m", "-1h", "7d").
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def format_timestamp(timestamp_us):
    """Microseconds since the epoch -> RFC 3339 UTC with microseconds."""
    seconds, micros = divmod(timestamp_us, 1000000)
    return "%s.%06dZ" % (time.strftime("%Y-%m-%dT%H:%M:%S",
                                       time.gmtime(seconds)), micros)


#: A dotted quad as sshd prints it (no leading zeros): already normal.
_PLAIN_IPV4 = re.compile(
    r"^(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}"
    r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\Z")


@functools.lru_cache(maxsize=4096)
def normalise_address(text):
    """Split a peer as sshd or PAM wrote it into (ip, domain).

    IPv4-mapped IPv6 becomes plain IPv4; a host name is returned as the domain
    and never resolved; anything else is (None, None).
    """
    if not text or text == "UNKNOWN":  # sshd's word for a peer it lost
        return None, None
    if _PLAIN_IPV4.match(text):
        return text, None  # the common case, already normal
    candidate = text[1:-1] if text.startswith("[") and text.endswith("]") \
        else text
    candidate = candidate.split("%", 1)[0]  # drop an IPv6 zone index
    if ":" in candidate:
        try:
            packed = socket.inet_pton(socket.AF_INET6, candidate)
        except (OSError, ValueError):
            return None, None  # no host name has a colon
        if packed[:12] == _IPV4_MAPPED_PREFIX:
            return socket.inet_ntop(socket.AF_INET, packed[12:]), None
        return socket.inet_ntop(socket.AF_INET6, packed), None
    if _HOST_NAME.match(text) and not text.replace(".", "").isdigit():
        return None, text.lower()
    return None, None


_IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"

_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*"
                        r"[A-Za-z0-9_])?$")


def parse_port(text):
    """A TCP port number, or None for anything that is not one."""
    port = parse_int(text)
    return port if port is not None and port <= 65535 else None


def journal_text(value):
    """One journal field as text, whatever shape journalctl gave it.

    journalctl prints non-UTF-8 values as arrays of byte values and repeated
    fields as arrays; the first value of a repeated field is used.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        if all(isinstance(b, int) and 0 <= b <= 255 for b in value):
            return bytes(value).decode("utf-8", "replace")
        return journal_text(value[0])
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def parse_int(text):
    """A non-negative decimal integer field, or None."""
    if text is None or len(text) > 19 or not text.isdigit():
        return None
    try:
        return int(text)
    except ValueError:  # isdigit() also accepts "²", which int() does not
        return None


def split_at_from(text, tail_pattern, accept=None, marker=" from "):
    """Every reading of `USER from TAIL` as [(user, tail_match)].

    USER is attacker-chosen text and may itself contain " from 10.0.0.1
    port 22". A reading counts when the whole remainder matches the strict
    grammar of what the service writes after the user name (and passes
    `accept(tail)`).
    """
    found = []
    position = text.find(marker)
    while position >= 0:
        tail = tail_pattern.match(text, position + len(marker))
        if tail is not None and (accept is None or accept(tail)):
            found.append((text[:position], tail))
        position = text.find(marker, position + 1)
    return found


# ---------------------------------------------------------------------------
# 5 model
# ---------------------------------------------------------------------------

#: Every field an event can carry. `context_key` is internal (ties lines of
#: one process or session together: boot, PID, service) and never rendered.
EVENT_FIELDS = (
    "timestamp_us", "action", "reason", "severity", "user", "user_id",
    "target_user", "source_ip", "source_domain", "source_port",
    "destination_ip", "destination_port", "hostname", "service", "pid",
    "process_name", "process_executable", "command_line",
    "working_directory", "tty", "auth_method", "key", "certificate_id",
    "certificate_serial", "certificate_ca", "session_id",
    "session_duration_s", "attempts", "writer_uid", "claimed_action",
    "detail", "counted_by", "network", "window_s", "users_tried", "sources",
    "cursor", "message", "context_key")

Event = collections.namedtuple("Event", EVENT_FIELDS)
Event.__new__.__defaults__ = (None,) * len(EVENT_FIELDS)
Event.__doc__ = """One thing that happened, in the shape of the event contract.

Immutable; stages add to it with `_replace`. Render with `event_to_ecs`."""

#: action -> (ECS category, ECS type, outcome, default severity 0-10).
ACTIONS = {
    "login_success": ("authentication", "start", "success", 5),
    "login_failure": ("authentication", "start", "failure", 3),
    "session_opened": ("session", "start", "success", 2),
    "session_closed": ("session", "end", "success", 1),
    "sudo_command": ("process", "start", "success", 4),
    "brute_force_detected": ("intrusion_detection", "info", "unknown", 8),
    "success_after_failures": ("intrusion_detection", "info", "success", 9),
    "new_source": ("intrusion_detection", "info", "success", 6),
    "new_sudo_user": ("intrusion_detection", "info", "success", 7),
    "spoofed_entry": ("intrusion_detection", "info", "unknown", 8),
    "config_reload_failed": ("configuration", "change", "failure", 6),
    "monitoring_degraded": ("process", "change", "failure", 7),
    "monitoring_restored": ("process", "change", "success", 3),
}

#: The actions the detection stage adds; the parser gives all the others.
DETECTION_ACTIONS = frozenset(("brute_force_detected",
                               "success_after_failures", "new_source",
                               "new_sudo_user"))

#: What the agent says about itself: its configuration and its own health.
AGENT_ACTIONS = frozenset(("config_reload_failed", "monitoring_degraded",
                           "monitoring_restored"))


#: (ECS path, Event field) in the order they are rendered.
_ECS_LAYOUT = (
    ("event.reason", "reason"),
    ("user.name", "user"), ("user.id", "user_id"),
    ("user.target.name", "target_user"),
    ("source.ip", "source_ip"), ("source.domain", "source_domain"),
    ("source.port", "source_port"),
    ("destination.ip", "destination_ip"),
    ("destination.port", "destination_port"),
    ("host.hostname", "hostname"), ("service.name", "service"),
    ("process.pid", "pid"), ("process.name", "process_name"),
    ("process.executable", "process_executable"),
    ("process.command_line", "command_line"),
    ("process.working_directory", "working_directory"),
    ("pamsignal.auth_method", "auth_method"), ("pamsignal.key", "key"),
    ("pamsignal.certificate.id", "certificate_id"),
    ("pamsignal.certificate.serial", "certificate_serial"),
    ("pamsignal.certificate.ca", "certificate_ca"),
    ("pamsignal.tty", "tty"), ("pamsignal.session_id", "session_id"),
    ("pamsignal.session_duration_s", "session_duration_s"),
    ("pamsignal.attempts", "attempts"),
    ("pamsignal.writer_uid", "writer_uid"),
    ("pamsignal.claimed_action", "claimed_action"),
    ("pamsignal.detail", "detail"), ("pamsignal.counted_by", "counted_by"),
    ("pamsignal.network", "network"), ("pamsignal.window_s", "window_s"),
    ("pamsignal.users_tried", "users_tried"),
    ("pamsignal.sources", "sources"), ("pamsignal.cursor", "cursor"),
)

#: The layout as (field index, parent objects, leaf name), computed once.
_ECS_PLAN = tuple((EVENT_FIELDS.index(field), tuple(path.split(".")[:-1]),
                   path.split(".")[-1]) for path, field in _ECS_LAYOUT)


def event_to_ecs(event):
    """The event as the nested ECS object of the event contract (no nulls)."""
    category, kind, outcome, default_severity = ACTIONS[event.action]
    ecs = {"@timestamp": format_timestamp(event.timestamp_us),
           "event": {"action": event.action, "category": [category],
                     "type": [kind], "outcome": outcome,
                     "severity": (default_severity if event.severity is None
                                  else event.severity)}}
    for index, parents, leaf in _ECS_PLAN:
        value = event[index]
        if value is None or value == "":
            continue  # the contract has no nulls
        node = ecs
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if type(value) is tuple else value
    ecs.setdefault("pamsignal", {})["version"] = __version__
    if event.message:
        ecs["message"] = event.message
    return ecs


# ---------------------------------------------------------------------------
# 6 config
# ---------------------------------------------------------------------------

Config = collections.namedtuple(
    "Config", "path state_dir log_dir first_start journalctl metrics_file "
    "channels detection")
Config.__doc__ = "The validated configuration; `channels` is a tuple."

ChannelConfig = collections.namedtuple("ChannelConfig",
                                       "name type events options")

#: N failures within window_s seconds (window_s 0: the rule is off).
Threshold = collections.namedtuple("Threshold", "attempts window_s")

DetectionConfig = collections.namedtuple(
    "DetectionConfig", "brute_force_fast brute_force_slow user_enumeration "
    "distributed_attack success_after_failures learning_period")

ConfigProblem = collections.namedtuple("ConfigProblem",
                                       "path line section key message")


def _problem_text(problem):
    where = problem.path if problem.line is None \
        else "%s:%d" % (problem.path, problem.line)
    what = "[%s]" % problem.section if problem.section else ""
    if problem.key:
        what += " %s" % problem.key
    return "%s: %s%s" % (where, what + ": " if what else "", problem.message)


ConfigProblem.__str__ = _problem_text


def _absolute_path(value):
    if not value.startswith("/") or "\0" in value:
        raise ValueError("expected an absolute path, got %r" % value)
    return os.path.normpath(value)


def _metrics_file(value):
    """An absolute path, or empty for the default in the state directory."""
    return _absolute_path(value) if value else ""


def _program_path(value):
    if not value or "\0" in value or (
            "/" in value and not value.startswith("/")):
        raise ValueError("expected a program name or an absolute path, "
                         "got %r" % value)
    return value


_RELATIVE_START = re.compile(r"^-\d{1,6}[smhd]$")


def _first_start(value):
    value = value.strip().lower()
    if value in ("now", "boot", "all") or _RELATIVE_START.match(value):
        return value
    raise ValueError("expected now, boot, all or a time back such as -1h "
                     "(s, m, h or d), got %r" % value)


def _event_filter(value):
    names = [name.strip() for name in value.split(",") if name.strip()]
    if names == ["*"]:
        return frozenset(ACTIONS)
    unknown = [name for name in names if name not in ACTIONS]
    if unknown or not names:
        raise ValueError("expected * or a comma-separated list of: %s; got %r"
                         % (", ".join(sorted(ACTIONS)), value))
    return frozenset(names)


_DURATION = re.compile(r"^(\d{1,7})([smhd])$")
_THRESHOLD = re.compile(r"^(\d{1,6})\s+in\s+(\S+)$")


def _duration_s(text):
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ValueError("expected a duration such as 90s, 10m, 24h or 7d, "
                         "got %r" % text)
    return int(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]


def _threshold(value):
    """"5 in 10m" -> Threshold(5, 600); "off" -> Threshold(0, 0)."""
    if value.strip().lower() == "off":
        return Threshold(0, 0)
    match = _THRESHOLD.match(value.strip())
    try:
        if not match or not 1 <= int(match.group(1)) <= MAX_THRESHOLD:
            raise ValueError
        window_s = _duration_s(match.group(2))
        if window_s < 1:
            raise ValueError
        return Threshold(int(match.group(1)), window_s)
    except ValueError:
        raise ValueError("expected 'N in DURATION' (N from 1 to %d, such as "
                         "5 in 10m) or off, got %r"
                         % (MAX_THRESHOLD, value)) from None


def _console_format(value):
    if value not in ("text", "json"):
        raise ValueError("expected text or json, got %r" % value)
    return value


#: [pamsignal] keys: key -> (validator, default).
GLOBAL_OPTIONS = collections.OrderedDict((
    ("state_dir", (_absolute_path, "/var/lib/pamsignal")),
    ("log_dir", (_absolute_path, "/var/log/pamsignal")),
    ("first_start", (_first_start, "now")),
    ("journalctl", (_program_path, "journalctl")),
    ("metrics_file", (_metrics_file, "")),
))

#: [detection] keys: key -> (validator, default).
DETECTION_OPTIONS = collections.OrderedDict((
    ("brute_force_fast", (_threshold, "5 in 10m")),
    ("brute_force_slow", (_threshold, "20 in 24h")),
    ("user_enumeration", (_threshold, "10 in 10m")),
    ("distributed_attack", (_threshold, "10 in 1h")),
    ("success_after_failures", (_threshold, "3 in 1h")),
    ("learning_period", (_duration_s, "7d")),
))

#: Keys every [channel:NAME] section takes, whatever its type.
CHANNEL_COMMON_OPTIONS = {"type": None, "events": _event_filter}


def _index_lines(text):
    """(section, key) -> line number, so problems can point at the file."""
    index = {}
    section = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        header = re.match(r"^\[([^\]]*)\]", stripped)
        if header:
            section = header.group(1).strip()
            index.setdefault((section, None), number)
        elif line[:1] not in " \t":
            key = re.split(r"\s*[=:]", stripped, maxsplit=1)[0].strip().lower()
            index.setdefault((section, key), number)
    return index


def _ini_syntax_problems(error, path, text):
    """configparser's own complaint, as problems with line numbers."""
    if isinstance(error, configparser.DuplicateSectionError):
        return [ConfigProblem(path, error.lineno, error.section, None,
                              "section given twice")]
    if isinstance(error, configparser.DuplicateOptionError):
        return [ConfigProblem(path, error.lineno, error.section,
                              error.option, "key given twice")]
    if isinstance(error, configparser.MissingSectionHeaderError):
        return [ConfigProblem(path, error.lineno, None, None,
                              "expected a [section] header before %r"
                              % error.line.strip())]
    lines = text.splitlines()
    return [ConfigProblem(path, lineno, None, None,
                          "expected 'key = value', got %r"
                          % lines[lineno - 1].strip())
            for lineno, _ in getattr(error, "errors", ())
            if 0 < lineno <= len(lines)] or [
        ConfigProblem(path, None, None, None, str(error))]


def _read_ini(text, path):
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, empty_lines_in_values=False,
        inline_comment_prefixes=(";", "#"), default_section="\0none")
    try:
        parser.read_string(text, source=path)
    except configparser.Error as error:
        problems = _ini_syntax_problems(error, path, text)
    else:
        return parser
    raise ConfigError(problems)


def _suggest(name, choices):
    close = difflib.get_close_matches(name, list(choices), n=1)
    return " (did you mean %r?)" % close[0] if close else ""


def parse_config(text, path="<config>"):
    """Validate INI text into a Config, or raise ConfigError with every
    problem found (file, line, section, key, what was expected)."""
    parser = _read_ini(text, path)
    lines = _index_lines(text)
    problems = []

    def problem(section, key, message):
        line = lines.get((section, key)) or lines.get((section, None))
        problems.append(ConfigProblem(path, line, section, key, message))

    settings = _plain_section(parser, "pamsignal", GLOBAL_OPTIONS, problem)
    detection = _plain_section(parser, "detection", DETECTION_OPTIONS,
                               problem)
    channels = []
    for section in parser.sections():
        values = parser[section]
        if section in ("pamsignal", "detection"):
            continue
        if section.startswith("channel:") and section[8:].strip():
            channel = _parse_channel(section, values, problem)
            if channel is not None:
                channels.append(channel)
        else:
            problem(section, None, "unknown section; expected [pamsignal], "
                    "[detection] or [channel:NAME]")
    if problems:
        raise ConfigError(problems)
    return Config(path=path, channels=tuple(channels),
                  detection=DetectionConfig(**detection), **settings)


def _plain_section(parser, section, options, problem):
    """A section of fixed keys: their values (defaults where absent)."""
    values = {key: validate(default)
              for key, (validate, default) in options.items()}
    if not parser.has_section(section):
        return values
    for key, raw in parser[section].items():
        if key not in options:
            problem(section, key, "unknown key" + _suggest(key, options))
            continue
        try:
            values[key] = options[key][0](raw.strip())
        except ValueError as error:
            problem(section, key, str(error))
    return values


def _parse_channel(section, values, problem):
    kind = values.get("type", "").strip()
    if kind not in CHANNEL_TYPES:
        problem(section, "type", "expected one of: %s; got %r"
                % (", ".join(sorted(CHANNEL_TYPES)), kind))
        return None
    known = dict(CHANNEL_COMMON_OPTIONS, **CHANNEL_TYPES[kind].OPTIONS)
    events = frozenset(ACTIONS)
    options = {}
    for key, raw in values.items():
        if key == "type":
            continue
        if key not in known:
            problem(section, key, "unknown key for a %s channel%s"
                    % (kind, _suggest(key, known)))
            continue
        try:
            value = known[key](raw.strip())
        except ValueError as error:
            problem(section, key, str(error))
            continue
        if key == "events":
            events = value
        else:
            options[key] = value
    return ChannelConfig(section[8:].strip(), kind, events, options)


def default_config(path=DEFAULT_CONFIG_PATH):
    """What runs when there is no configuration file at all."""
    return parse_config("", path)


def load_config(path=None):
    """Read the configuration file; a missing default file means defaults,
    a missing explicitly named file is an error."""
    named = path is not None
    path = path or DEFAULT_CONFIG_PATH
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        if named:
            raise ConfigError([ConfigProblem(path, None, None, None,
                                             "no such file")]) from None
        return default_config(path)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([ConfigProblem(path, None, None, None,
                                         "cannot read: %s" % error)]) from None
    return parse_config(text, path)


# ---------------------------------------------------------------------------
# 7 parsing
# ---------------------------------------------------------------------------
#
# parse_entry(entry) -> Event | None is pure: one journal entry in, at most
# one event out. RULES is the single table of what each service writes; the
# journalctl match arguments are derived from WATCHED_SERVICES.

Service = collections.namedtuple("Service", "family name programs setuid")
Service.__doc__ = """A watched journal identifier: which rules apply, the
service name to report, the program names its real writer runs as, and
whether it is setuid (logs with the caller's UID)."""

_SSHD_PROGRAMS = frozenset(("sshd", "sshd-session", "sshd-auth"))

#: SYSLOG_IDENTIFIER -> Service. Only these cross the journalctl pipe.
WATCHED_SERVICES = {
    "sshd": Service("sshd", "sshd", _SSHD_PROGRAMS, False),
    "sshd-session": Service("sshd", "sshd", _SSHD_PROGRAMS, False),
    "sshd-auth": Service("sshd", "sshd", _SSHD_PROGRAMS, False),
    "sudo": Service("sudo", "sudo", frozenset(("sudo",)), True),
    "su": Service("su", "su", frozenset(("su",)), True),
    "login": Service("login", "login", frozenset(("login",)), False),
    "systemd-logind": Service("logind", "systemd-logind",
                              frozenset(("systemd-logind",)), False),
}

#: PAM services that switch identity: their session's user is the target.
SWITCHING_PAM_SERVICES = frozenset(("sudo", "sudo-i", "su", "su-l",
                                    "runuser", "runuser-l"))

#: sshd method -> reason of a failure with it.
_METHOD_REASONS = {"password": "bad_password",
                   "keyboard-interactive": "bad_password",
                   "publickey": "bad_key", "hostbased": "bad_key",
                   "none": "no_credentials"}

_KEY = r"[A-Za-z0-9@._-]+ (?:SHA256|MD5):[A-Za-z0-9+/=:]+"
#: What sshd writes after "ssh2: ": a key, a certificate with its ID, or
#: (hostbased) a key with the client's claimed user and host.
_KEY_INFO = re.compile(
    r"(?P<key>%s)(?: ID (?P<cert_id>.*) \(serial (?P<serial>\d+)\) "
    r"CA (?P<ca>%s)|(?P<client>, client user \"[^\"]*\", "
    r"client host \"[^\"]*\"))?\Z" % (_KEY, _KEY))
#: What sshd writes after the user name in an auth_log() line.
_SSHD_AUTH_TAIL = re.compile(r"(?P<addr>\S+) port (?P<port>\d+) ssh2"
                             r"(?:: (?P<info>.*))?\Z")
_SSHD_ADDR_PORT_TAIL = re.compile(
    r"(?P<addr>\S+)(?: port (?P<port>\d+))?\Z")
_ADDR_ONLY_TAIL = re.compile(r"(?P<addr>\S+)\Z")

_LOG_PREFIXES = ("error: ", "fatal: ", "warning: ")
_LOG_PREFIX = re.compile(r"^(?:error|fatal|warning): ")
_LOG_SUFFIX = re.compile(r" \[(?:preauth|postauth)\]\Z")


def _source(addr, port=None):
    ip, domain = normalise_address(addr)
    return {"source_ip": ip, "source_domain": domain,
            "source_port": parse_port(port)}


def _split_invalid(rest):
    if rest.startswith("invalid user "):
        return True, rest[len("invalid user "):]
    return False, rest


_WHITE_SPACE = re.compile(r"\s")

#: pamsignal.detail of an event whose user name imitates sshd's own text
#: so that more than one reading fits: no user or source is reported.
AMBIGUOUS = "ambiguous: the user name imitates the address text"


def _user_and_source(rest, tail_pattern, accept=None, account=False):
    """(fields, tail) for `USER from TAIL`.

    One reading gives user and source. Several mean the user name imitates
    sshd's text: if the account exists (`account`), its name has no white
    space, which settles it; otherwise no side is picked and the event has
    neither user nor source, only the AMBIGUOUS detail. No reading at all
    gives (None, None).
    """
    readings = split_at_from(rest, tail_pattern, accept)
    if len(readings) > 1 and account:
        readings = [(user, tail) for user, tail in readings
                    if not _WHITE_SPACE.search(user)] or readings
    if len(readings) > 1:
        return {"detail": AMBIGUOUS}, None
    if not readings:
        return None, None
    user, tail = readings[0]
    groups = tail.groupdict()
    return dict(_source(groups["addr"], groups.get("port")), user=user), tail


def _known_key_info(tail):
    """The text after "ssh2: " is a key sshd writes (or absent)."""
    info = tail.group("info")
    return info is None or _KEY_INFO.match(info) is not None


def _build_auth_log(match):
    """sshd auth_log(): Accepted/Failed METHOD for [invalid user ]U from ..."""
    verb, method = match.group("verb"), match.group("method")
    invalid, rest = _split_invalid(match.group("rest"))
    fields, tail = _user_and_source(rest, _SSHD_AUTH_TAIL, _known_key_info,
                                    account=not invalid)
    if fields is None:
        # Key text of a form this version does not know.
        fields, tail = _user_and_source(rest, _SSHD_AUTH_TAIL,
                                        account=not invalid)
    if fields is None:
        return None
    if verb == "Failed" and invalid and method == "none":
        return None  # the probe the "Invalid user" line already reported
    fields["auth_method"] = method
    info = tail.group("info") if tail is not None else None
    key_info = _KEY_INFO.match(info or "")
    if key_info is not None:
        fields.update(key=key_info.group("key"),
                      certificate_id=key_info.group("cert_id"),
                      certificate_serial=parse_int(key_info.group("serial")),
                      certificate_ca=key_info.group("ca"),
                      detail=(key_info.group("client") or "")[2:] or None)
    elif info:
        fields["detail"] = info  # e.g. a Kerberos principal
    if verb == "Accepted":
        fields["action"] = "login_success"
    else:
        fields["action"] = "login_failure"
        fields["reason"] = "invalid_user" if invalid else _METHOD_REASONS.get(
            method.split("/", 1)[0], "bad_credentials")
    return fields


def _build_invalid_user(match):
    fields, _ = _user_and_source(match.group("rest"), _SSHD_ADDR_PORT_TAIL)
    if fields is None:
        return None
    return dict(fields, action="login_failure", reason="invalid_user")


def _build_not_allowed(match):
    """Checks on the account itself (locked, no shell) name no source."""
    fields, _ = _user_and_source(match.group("rest"), _ADDR_ONLY_TAIL)
    if fields is None:
        fields = {"user": match.group("rest")}
    return dict(fields, action="login_failure", reason="not_allowed",
                detail=fields.get("detail") or match.group("why"))


def _build_root_refused(match):
    return dict(_source(match.group("addr"), match.group("port")),
                action="login_failure", reason="root_refused", user="root")


def _build_max_attempts(match):
    invalid, rest = _split_invalid(match.group("rest"))
    fields, _ = _user_and_source(rest, _SSHD_AUTH_TAIL,
                                 lambda tail: tail.group("info") is None,
                                 account=not invalid)
    if fields is None:
        return None
    return dict(fields, action="login_failure", reason="max_attempts")


def _companion(match):
    """Recognised, but another line reports the same attempt."""
    return None


def _build_session_opened(match):
    service, user = match.group("pam_service"), match.group("user")
    by_name, by_uid = match.group("by"), match.group("by_uid")
    fields = {"action": "session_opened", "service": service}
    if service in SWITCHING_PAM_SERVICES:
        fields.update(target_user=user, user=by_name or None,
                      user_id=None if by_name else by_uid)
    else:
        fields["user"] = user
    return fields


def _build_session_closed(match):
    service, user = match.group("pam_service"), match.group("user")
    fields = {"action": "session_closed", "service": service}
    fields["target_user" if service in SWITCHING_PAM_SERVICES
           else "user"] = user
    return fields


_PAM_PAIR = re.compile(r"(\w+)=(\S*)")


def _build_pam_auth_failure(match):
    """pam_unix's own failure line counts only where the service writes no
    line per attempt itself (sudo); sshd, su and login do."""
    if match.group("pam_service") not in ("sudo", "sudo-i"):
        return None
    # No source: sudo sets PAM's rhost to this very host, if at all.
    pairs = dict(_PAM_PAIR.findall(match.group("pairs")))
    return {"action": "login_failure", "reason": "bad_password",
            "service": "sudo", "tty": pairs.get("tty") or None,
            "user": pairs.get("ruser") or pairs.get("logname") or
            pairs.get("user") or None}


_SUDO_FAILURES = (
    (re.compile(r"^(?P<attempts>\d+) incorrect password attempts? ; "),
     "bad_password"),
    (re.compile(r"^user NOT in sudoers ; "), "not_in_sudoers"),
    (re.compile(r"^user NOT authorized on host ; "), "not_in_sudoers"),
    (re.compile(r"^command not allowed ; "), "command_not_allowed"),
    (re.compile(r"^a password is required ; "), "password_required"),
)
_SUDO_USER = re.compile(r"(?:^| ; )USER=(\S+) ; ")
_SUDO_COMMAND = " ; COMMAND="


#: pamsignal.detail of a sudo line whose directory or command imitates
#: its keys: the target shown is root if any reading says so, and the
#: command is everything that could be it.
SUDO_AMBIGUOUS = "ambiguous: the directory or command imitates sudo's keys"


def _sudo_fields(body):
    """TTY=t ; PWD=d ; USER=r [; KEY=v ...] ; COMMAND=c, where the directory
    and the command are the user's own text and may imitate the keys."""
    readings = []
    for user_match in _SUDO_USER.finditer(body):
        command_at = body.find(_SUDO_COMMAND, user_match.end(1))
        if command_at >= 0:
            readings.append((user_match, command_at))
    if not readings:
        return None
    first_user, first_command_at = readings[0]
    # Louder, never quieter: root if any reading says root; the command
    # from the first COMMAND=, whose text holds the real one whatever came.
    user_match = next((r[0] for r in readings if r[0].group(1) == "root"),
                      first_user)
    head = body[:first_user.start()]
    tty = re.match(r"^TTY=(\S*?)(?: ; |\Z)", head)
    pwd_at = head.find("PWD=")
    return {"target_user": user_match.group(1),
            "command_line": body[first_command_at + len(_SUDO_COMMAND):],
            "working_directory": head[pwd_at + 4:] if pwd_at >= 0 else None,
            "tty": tty.group(1) if tty and tty.group(1) != "unknown"
            else None,
            "detail": SUDO_AMBIGUOUS if len(readings) > 1 else None}


def _build_sudo(match):
    body, action, reason = match.group("body"), "sudo_command", None
    prefix = None
    for failure, failure_reason in _SUDO_FAILURES:
        prefix = failure.match(body)
        if prefix:
            body = body[prefix.end():]
            action, reason = "login_failure", failure_reason
            break
    fields = _sudo_fields(body)
    if fields is None:
        return None
    fields.update(action=action, reason=reason, user=match.group("user"))
    if prefix and "attempts" in prefix.groupdict():
        # A total for the whole sudo run; SudoAttempts subtracts the ones
        # pam_unix already reported one by one.
        fields["attempts"] = parse_int(prefix.group("attempts"))
    return fields


def _build_su(match):
    failed = match.group("failed") or match.group("shadow_failed")
    fields = {"user": match.group("user") or match.group("shadow_user"),
              "target_user": match.group("target") or
              match.group("shadow_target"),
              "tty": match.group("tty")}
    if failed:
        fields.update(action="login_failure", reason="bad_password")
    else:
        fields["action"] = "login_success"
    return fields


def _build_login_success(match):
    fields = dict(_source(match.group("host")), action="login_success",
                  tty=match.group("tty"))
    fields["user"] = match.groupdict().get("user") or "root"
    return fields


_TERMINAL = re.compile(r"^(?:/dev/)?(?:tty|pts/|console|hvc|vc/|ttyS|:)")


def _build_login_failure(match):
    """util-linux writes FROM the host, or FROM the tty when local; both
    hide a mistyped name as UNKNOWN or (unknown)."""
    user, why = match.group("user"), match.group("why")
    place, tty = match.group("host"), match.group("tty")
    if place and _TERMINAL.match(place) and not tty:
        place, tty = None, place
    return dict(_source(place), action="login_failure",
                reason="invalid_user" if why.startswith("User not known")
                else "bad_password", detail=why, tty=tty,
                user=None if user in ("UNKNOWN", "(unknown)") else user)


def _build_login_tries(match):
    place, tty = match.group("host"), match.group("tty")
    if place and _TERMINAL.match(place) and not tty:
        place, tty = None, place
    return dict(_source(place), action="login_failure",
                reason="max_attempts", tty=tty,
                attempts=parse_int(match.group("count")),
                user=match.group("user") or None)


def _build_logind_new(match):
    return {"action": "session_opened", "user": match.group("user"),
            "session_id": match.group("session")}


def _build_logind_removed(match):
    return {"action": "session_closed", "session_id": match.group("session")}


Rule = collections.namedtuple("Rule", "family name words pattern build")
Rule.__doc__ = """One message form: the family of identifiers it applies to
("pam" applies to all), a name, the first words its lines can start with
(None: any; only those rules are tried, for speed), an anchored regex and
the function that turns its match into event fields (None: recognised, but
not an event)."""

_PAM_HEAD = r"^pam_unix\((?P<pam_service>[^:()\s]+):"

#: Every message form the parser knows, in the order they are tried.
RULES = (
    Rule("sshd", "auth_log", ("Accepted", "Failed"), re.compile(
        r"^(?P<verb>Accepted|Failed) (?P<method>\S+) for (?P<rest>.*)\Z"),
        _build_auth_log),
    Rule("sshd", "invalid_user", ("Invalid",), re.compile(
        r"^Invalid user (?P<rest>.*)\Z"), _build_invalid_user),
    Rule("sshd", "not_allowed", ("User",), re.compile(
        r"^User (?P<rest>.+) not allowed because (?P<why>.+)\Z"),
        _build_not_allowed),
    Rule("sshd", "root_refused", ("ROOT",), re.compile(
        r"^ROOT LOGIN REFUSED FROM (?P<addr>\S+)(?: port (?P<port>\d+))?\Z"),
        _build_root_refused),
    Rule("sshd", "max_attempts", ("maximum",), re.compile(
        r"^maximum authentication attempts exceeded for (?P<rest>.*)\Z"),
        _build_max_attempts),
    Rule("sshd", "too_many_failures", ("Disconnecting",), re.compile(
        r"^Disconnecting\b.*: Too many authentication failures"),
        _companion),
    Rule("sshd", "pam_failure_summary", ("PAM", "PAM:"), re.compile(
        r"^PAM(?::)? (?:Authentication failure for |\d+ more authentication"
        r" failures?)"), _companion),
    Rule("sshd", "input_userauth_invalid", ("input_userauth_request:",),
         re.compile(r"^input_userauth_request: invalid user "), _companion),
    Rule("pam", "session_opened", ("pam_unix",), re.compile(
        _PAM_HEAD + r"session\): session opened for user (?P<user>\S+?)"
        r"(?:\(uid=\d+\))? by (?P<by>\S*?)(?:\(uid=(?P<by_uid>\d+)\))?\Z"),
        _build_session_opened),
    Rule("pam", "session_closed", ("pam_unix",), re.compile(
        _PAM_HEAD + r"session\): session closed for user (?P<user>\S+?)"
        r"(?:\(uid=\d+\))?\Z"), _build_session_closed),
    Rule("pam", "auth_failure", ("pam_unix",), re.compile(
        _PAM_HEAD + r"auth\): authentication failure; (?P<pairs>.*)\Z"),
        _build_pam_auth_failure),
    Rule("pam", "check_pass", ("pam_unix",), re.compile(
        _PAM_HEAD + r"auth\): check pass; user unknown\Z"), _companion),
    Rule("sudo", "continued", None, re.compile(
        r"^\s*\S+ : \(command continued\) "), _companion),
    Rule("sudo", "sudo", None, re.compile(
        r"^\s*(?P<user>\S+) : (?P<body>.*)\Z"), _build_sudo),
    Rule("su", "su", ("", "FAILED", "Successful"), re.compile(
        r"^(?:(?P<failed>FAILED SU )?\(to (?P<target>\S+)\) (?P<user>\S+) "
        r"on (?P<tty>\S+)|(?:Successful|(?P<shadow_failed>FAILED)) su for "
        r"(?P<shadow_target>\S+) by (?P<shadow_user>\S+))\Z"), _build_su),
    Rule("su", "sulog", ("",), re.compile(r"^[+-] \S+ \S+:\S+\Z"), _companion),
    Rule("login", "login", ("LOGIN",), re.compile(
        r"^LOGIN ON (?P<tty>\S+) BY (?P<user>\S+)(?: FROM (?P<host>\S+))?\Z"),
        _build_login_success),
    Rule("login", "root_login", ("ROOT",), re.compile(
        r"^ROOT LOGIN\s+(?:ON|on) '?(?P<tty>[^'\s]+)'?"
        r"(?: (?:FROM|from) '?(?P<host>[^'\s]+)'?)?\Z"),
        _build_login_success),
    Rule("login", "failed_login", ("FAILED",), re.compile(
        r"^FAILED LOGIN \(?\d+\)?(?: (?:ON|on) '?(?P<tty>[^'\s]+)'?)?"
        r"(?: (?:FROM|from) '?(?P<host>[^'\s]+)'?)? FOR '?(?P<user>.*?)'?, "
        r"(?P<why>[^,]*)\Z"), _build_login_failure),
    Rule("login", "too_many_tries", ("TOO",), re.compile(
        r"^TOO MANY LOGIN TRIES \((?P<count>\d+)\)(?: (?:ON|on) "
        r"'?(?P<tty>[^'\s]+)'?)?(?: (?:FROM|from) '?(?P<host>[^'\s]+)'?)?"
        r"(?: FOR '?(?P<user>[^',\s]*)'?)?(?:, [^\n]*)?\Z"),
        _build_login_tries),
    Rule("logind", "new_session", ("New",), re.compile(
        r"^New session '?(?P<session>[^'\s]+?)'? of user "
        r"'?(?P<user>[^'\s]+?)'?(?: with class .*)?\.?\Z"),
        _build_logind_new),
    Rule("logind", "removed_session", ("Removed",), re.compile(
        r"^Removed session '?(?P<session>[^'\s]+?)'?\.?\Z"),
        _build_logind_removed),
)

#: The leading word a rule's `words` name: letters, "_" and ":" only, so
#: "pam_unix(sshd:auth)" gives "pam_unix" and "(to root)" gives "".
_FIRST_WORD = re.compile(r"[A-Za-z_:]*")


def _rule_index(family):
    """first word -> the rules worth trying, in table order (a rule with
    no `words` is tried whatever the word)."""
    rules = [rule for rule in RULES if rule.family in (family, "pam")]
    words = set(word for rule in rules for word in rule.words or ())
    anywhere = tuple(rule for rule in rules if rule.words is None)
    return ({word: tuple(rule for rule in rules if rule.words is None or
                         word in rule.words) for word in words}, anywhere)


_RULES_BY_FAMILY = {
    family: _rule_index(family)
    for family in set(service.family for service in WATCHED_SERVICES.values())
}


def classify_message(family, message):
    """(rule, fields) for a message of a service family; fields is None for
    a recognised line that is not an event, rule is None when unknown."""
    if message.startswith(_LOG_PREFIXES):
        message = _LOG_PREFIX.sub("", message, 1)
    if message.endswith("]"):
        message = _LOG_SUFFIX.sub("", message, 1)
    by_word, anywhere = _RULES_BY_FAMILY[family]
    for rule in by_word.get(_FIRST_WORD.match(message).group(0), anywhere):
        match = rule.pattern.match(message)
        if match is not None:
            return rule, rule.build(match)
    return None, None


#: What the kernel appends to /proc/PID/exe when the file was replaced.
_DELETED = " (deleted)"


def writer_is_genuine(entry, service):
    """Whether the trusted journal fields show the real service wrote this.

    Anyone can `logger -t sshd`; only journald sets the underscore fields.
    `_EXE` is missing when the writer exited before journald looked; then
    the program name decides, but only for root writers: any process can
    name itself "sudo" (prctl) and exit, so a non-root writer (the caller
    of setuid sudo or su) must show the real executable.
    """
    return _writer_verdict(journal_text(entry.get("_TRANSPORT")),
                           journal_text(entry.get("_UID")),
                           journal_text(entry.get("_EXE")),
                           journal_text(entry.get("_COMM")), service)


@functools.lru_cache(maxsize=1024)
def _writer_verdict(transport, uid, exe, comm, service):
    """writer_is_genuine on the fields themselves (writers repeat)."""
    if transport not in TRUSTED_TRANSPORTS:
        return False
    if uid is None or (uid != "0" and not service.setuid):
        return False
    if exe is not None:
        if exe.endswith(_DELETED):  # the binary was upgraded while running
            exe = exe[:-len(_DELETED)]
        directory, _, program = exe.rpartition("/")
        return directory in TRUSTED_EXE_DIRS and program in service.programs \
            and (comm is None or comm in service.programs)
    if uid != "0":
        return False
    return comm is None or comm in service.programs


def _entry_timestamp(entry):
    return parse_int(journal_text(entry.get("__REALTIME_TIMESTAMP")))


def _context_key(entry, fields, service):
    boot = journal_text(entry.get("_BOOT_ID")) or ""
    if fields.get("session_id") is not None:
        return "%s/logind/%s" % (boot, fields["session_id"])
    return "%s/%s/%s" % (boot, journal_text(entry.get("_PID")),
                         fields.get("service") or service.name)


def parse_entry(entry):
    """One journal entry (dict as journalctl -o json gives it) -> Event|None.

    Pure: no clock, file or socket. Entries of unwatched identifiers, unknown
    messages and companion lines give None; an auth message written by a
    process that is not the real service gives a `spoofed_entry`.
    """
    service = WATCHED_SERVICES.get(
        journal_text(entry.get("SYSLOG_IDENTIFIER")))
    if service is None:
        return None
    message = journal_text(entry.get("MESSAGE"))
    timestamp_us = _entry_timestamp(entry)
    if not message or timestamp_us is None:
        return None
    genuine = None
    if len(message) > MAX_UNTRUSTED_MESSAGE_CHARS:
        # A forger's text only needs reading far enough to see its claim.
        genuine = writer_is_genuine(entry, service)
        message = message[:MAX_MESSAGE_CHARS if genuine else
                          MAX_UNTRUSTED_MESSAGE_CHARS]
    rule, fields = classify_message(service.family, message)
    if fields is None:
        return None
    if genuine is None:
        genuine = writer_is_genuine(entry, service)
    common = {"timestamp_us": timestamp_us,
              "hostname": journal_text(entry.get("_HOSTNAME")),
              "pid": parse_int(journal_text(entry.get("_PID"))),
              "cursor": journal_text(entry.get("__CURSOR")),
              "message": message.rstrip("\n")}
    if not genuine:
        return Event(action="spoofed_entry", service=service.name,
                     writer_uid=parse_int(journal_text(entry.get("_UID"))),
                     process_name=journal_text(entry.get("_COMM")),
                     process_executable=journal_text(entry.get("_EXE")),
                     claimed_action=fields["action"], **common)
    fields.setdefault("service", service.name)
    writer_uid = journal_text(entry.get("_UID"))
    if service.setuid and writer_uid != "0" and not fields.get("user_id"):
        fields["user_id"] = writer_uid  # the caller of setuid sudo or su
    fields["context_key"] = _context_key(entry, fields, service)
    fields.update(common)
    return Event(**fields)


#: '"sshd"', '"sudo"', ...: an entry lacking all of them cannot be watched.
_WATCHED_NAME_BYTES = re.compile(("\"(?:%s)\"" % "|".join(
    re.escape(name) for name in sorted(WATCHED_SERVICES))).encode())


def decode_line(line):
    """One line of journalctl -o json output -> entry dict, or None."""
    try:
        entry = json.loads(line.decode("utf-8", "replace")
                           if isinstance(line, bytes) else line)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]]
        return None
    return entry if isinstance(entry, dict) else None


# ---------------------------------------------------------------------------
# 9 detection
# ---------------------------------------------------------------------------


class BoundedTable(collections.OrderedDict):
    """A map that forgets its oldest keys past `limit`; saved as
    [[key, value], ...] and restored skipping whatever is malformed."""

    def __init__(self, limit):
        collections.OrderedDict.__init__(self)
        self.limit = limit

    def put(self, key, value):
        """Store as the most recently seen, forgetting the least."""
        if key in self:
            self.move_to_end(key)
        self[key] = value
        while len(self) > self.limit:
            self.popitem(last=False)

    def to_state(self):
        return [[key, value] for key, value in self.items()]

    def load_state(self, saved, restore):
        """`restore(value)` gives the value to keep, or None to skip it."""
        self.clear()
        for item in saved if isinstance(saved, list) else ():
            if isinstance(item, list) and len(item) == 2 and \
                    isinstance(item[0], str):
                value = restore(item[1])
                if value is not None:
                    self.put(item[0], value)


class SessionTracker:
    """Pairs session_closed with its session_opened and adds the duration.

    Time is the events' own; the table is bounded (oldest forgotten first)
    and can be saved and restored with the journal cursor.
    """

    #: Fields a close takes from its open when the close line lacks them.
    CARRIED = ("user", "user_id", "target_user", "source_ip",
               "source_domain", "source_port", "tty")

    def __init__(self, limit=MAX_OPEN_SESSIONS):
        self.open_sessions = BoundedTable(limit)

    def observe(self, event):
        """Return the event, a closed one completed from its open."""
        if event.action == "session_opened" and event.context_key:
            self.open_sessions.put(event.context_key, dict(
                {field: getattr(event, field) for field in self.CARRIED},
                opened_us=event.timestamp_us))
        elif event.action == "session_closed" and event.context_key:
            opened = self.open_sessions.pop(event.context_key, None)
            if opened is not None:
                carried = {field: opened[field] for field in self.CARRIED
                           if getattr(event, field) is None}
                duration_us = max(0, event.timestamp_us - opened["opened_us"])
                event = event._replace(
                    session_duration_s=round(duration_us / 1e6, 3), **carried)
        return event

    def to_state(self):
        return self.open_sessions.to_state()

    def load_state(self, saved):
        self.open_sessions.load_state(saved, self._restore)

    @classmethod
    def _restore(cls, saved):
        if not isinstance(saved, dict) or type(saved.get("opened_us")) \
                is not int:
            return None
        return dict({field: saved.get(field) for field in cls.CARRIED},
                    opened_us=saved["opened_us"])


class SudoAttempts:
    """Makes each failed sudo password count once.

    pam_unix reports some failed attempts one by one as they happen; sudo
    then totals the whole run ("3 incorrect password attempts"). The total
    is reduced by what the same process already reported, and dropped when
    nothing is left.
    """

    def __init__(self, limit=MAX_OPEN_SESSIONS):
        self.reported = BoundedTable(limit)

    def observe(self, event):
        """The event, a sudo total reduced to the unreported rest, or None."""
        if event.service != "sudo" or event.action != "login_failure" \
                or event.reason != "bad_password":
            return event
        key = event.context_key
        if event.attempts is None:
            self.reported.put(key, self.reported.get(key, 0) + 1)
            return event
        remaining = event.attempts - self.reported.pop(key, 0)
        return event._replace(attempts=remaining) if remaining > 0 else None

    def to_state(self):
        return self.reported.to_state()

    def load_state(self, saved):
        self.reported.load_state(
            saved, lambda count: count if type(count) is int else None)


#: The rules that remember when they last fired, per counter.
_RULE_NAMES = frozenset(("fast", "slow", "enumeration", "distributed",
                         "success"))

#: Failures that are no guess at a credential: the MaxAuthTries disconnect
#: and ROOT LOGIN REFUSED restate an attempt another line counts, and
#: sudo's refusals are policy, not a wrong password.
_NOT_GUESSES = frozenset(("max_attempts", "root_refused", "not_in_sudoers",
                          "command_not_allowed", "password_required"))

#: Times further ahead than this are a clock that was wrong: dropped.
_FUTURE_SLACK_US = 86400 * 1000000


def is_guess(event):
    """A failed attempt at a credential. sshd's "Invalid user" and "not
    allowed" lines announce a connection whose attempts follow as "Failed
    ... for invalid user" lines; they count as names tried, not guesses."""
    if event.reason in _NOT_GUESSES:
        return False
    return not (event.service == "sshd" and event.auth_method is None and
                event.reason in ("invalid_user", "not_allowed"))


@functools.lru_cache(maxsize=4096)
def ipv6_network_64(address):
    """The /64 a (normalised) IPv6 address belongs to, "2001:db8:1:2::/64"."""
    packed = socket.inet_pton(socket.AF_INET6, address)
    return "%s/64" % socket.inet_ntop(socket.AF_INET6,
                                      packed[:8] + bytes(8))


def attacker_of(event):
    """Who tried, for counting distinct sources: the address, but a whole
    IPv6 /64 as one (one attacker holds it), or the host name."""
    if event.source_ip and ":" in event.source_ip:
        return ipv6_network_64(event.source_ip)
    return event.source_ip or event.source_domain


def failure_counters(event):
    """The counters a failed attempt adds to, most specific first, as
    (kind, value): its source address, the /64 of an IPv6 source, and the
    account it tried (for su, the account switched to; sudo asks for the
    caller's own password)."""
    counters = []
    source = event.source_ip or event.source_domain
    if source:
        counters.append(("source", source))
    if event.source_ip and ":" in event.source_ip:
        counters.append(("network", ipv6_network_64(event.source_ip)))
    account = event.target_user if event.service in ("su", "su-l") \
        else event.user
    if account:
        counters.append(("user", account))
    return counters


def _in_window(at, now, window_us):
    return now - window_us < at <= now


def _times_between(times, since, now):
    """The sorted times t with since < t <= now."""
    return times[bisect.bisect_right(times, since):
                 bisect.bisect_right(times, now)]


class FailureDetector:
    """Brute force and success after failures, from the events' own times.

    Each counter (source, IPv6 /64, account) keeps the times of its recent
    guesses whatever the service, the invalid user names its source tried
    and the sources that tried its account. Crossing a threshold gives one
    `brute_force_detected` per event and rule (event.reason:
    repeated_failures, user_enumeration or distributed_attack), from the
    most specific counter that crossed; each rule fires at most once a
    window per counter. A success whose source or account has enough recent
    failures gives `success_after_failures`.

    Memory stays flat under attack: a counter seen once waits on probation
    (bounded), so a flood of new addresses cannot push out the counters
    that keep failing (bounded too), and each list in a counter is capped.
    """

    def __init__(self, settings, limit=MAX_FAILURE_KEYS):
        self.windows = [(name, threshold) for name, threshold in (
            ("fast", settings.brute_force_fast),
            ("slow", settings.brute_force_slow)) if threshold.attempts]
        self.enumeration = settings.user_enumeration
        self.distributed = settings.distributed_attack
        self.success = settings.success_after_failures
        rules = [t for _, t in self.windows] + [self.success]
        self.keep = max([t.attempts for t in rules] + [1])
        self.keep_distinct = max(self.enumeration.attempts,
                                 self.distributed.attempts, 1)
        self.horizon_us = max(t.window_s for t in rules + [
            self.enumeration, self.distributed]) * 1000000
        self.probation = BoundedTable(limit)
        self.counters = BoundedTable(limit)

    def observe(self, event):
        """Detections the event gives rise to (a list, often empty)."""
        if event.action == "login_failure":
            return self._failure(event)
        if event.action == "login_success" and self.success.attempts:
            return self._judge_success(event)
        return []

    def _lookup(self, key):
        return self.counters.get(key) or self.probation.get(key)

    def _failure(self, event):
        now, guess = event.timestamp_us, is_guess(event)
        touched = []
        for kind, value in failure_counters(event):
            key = "%s %s" % (kind, value)
            record = self.counters.pop(key, None) or self.probation.pop(
                key, None)
            again = record is not None
            record = record or {"times": [], "users": [], "fired": {}}
            if guess:
                self._add_times(record, now, event.attempts or 1)
            users = record["users"]
            if event.user and (not users or users[-1] != event.user):
                record["users"] = ([u for u in users if u != event.user]
                                   + [event.user])[-MAX_USERS_TRIED:]
            (self.counters if again else self.probation).put(key, record)
            touched.append((kind, value, record))
        found = []
        for name, threshold in self.windows if guess else ():
            found += self._fire_once(event, name, threshold, [
                (kind, value, record, _times_between(
                    record["times"], now - threshold.window_s * 1000000, now))
                for kind, value, record in touched
                if len(record["times"]) >= threshold.attempts],
                "repeated_failures")
        if event.reason == "invalid_user" and event.user and \
                self.enumeration.attempts:
            found += self._fire_once(event, "enumeration", self.enumeration, [
                (kind, value, record, self._remember(
                    record, "invalid", event.user, now, self.enumeration))
                for kind, value, record in touched if kind != "user"],
                "user_enumeration")
        attacker = attacker_of(event)
        if guess and attacker and self.distributed.attempts:
            found += self._fire_once(event, "distributed", self.distributed, [
                (kind, value, record, self._remember(
                    record, "sources", attacker, now, self.distributed))
                for kind, value, record in touched if kind == "user"],
                "distributed_attack")
        return found

    def _fire_once(self, event, rule, threshold, candidates, reason):
        """One detection from the most specific counter that crossed; all
        that crossed with it are marked, so one attack is one alert."""
        now, window_us = event.timestamp_us, threshold.window_s * 1000000
        crossed = [c for c in candidates if len(c[3]) >= threshold.attempts
                   and not _in_window(c[2]["fired"].get(rule, now + 1), now,
                                      window_us)]
        for _, _, record, _ in crossed:
            record["fired"][rule] = now
        if not crossed:
            return []
        kind, value, record, seen = crossed[0]
        return [self._brute_force(event, kind, value, seen, threshold,
                                  reason, record["users"])]

    def _add_times(self, record, now, count):
        """Insert `count` guesses at `now`; keep only times within the
        longest window, none from a clock that was far ahead, at most
        `keep` of them (the latest)."""
        times = record["times"]
        if times and not (now - self.horizon_us < times[0] and
                          times[-1] <= now + _FUTURE_SLACK_US):
            times = [t for t in times if now - self.horizon_us < t
                     <= now + _FUTURE_SLACK_US]
        for _ in range(min(count, self.keep)):
            bisect.insort(times, now)  # sorted, even if entries arrive late
        record["times"] = times[-self.keep:]

    def _remember(self, record, field, value, now, threshold):
        """Note `value` as seen now in the record's distinct list; the
        values seen within the threshold's window."""
        latest = now + _FUTURE_SLACK_US
        seen = [item for item in record.get(field, ()) if item[0] != value
                and item[1] <= latest]
        seen.append([value, now])
        record[field] = seen = seen[-self.keep_distinct:]
        earliest = now - threshold.window_s * 1000000
        return [v for v, at in seen if earliest < at <= now]

    @staticmethod
    def _brute_force(event, kind, value, seen, threshold, reason, users):
        where = {"source": "from %s" % value, "network": "from %s" % value,
                 "user": "for %s" % value}[kind]
        what = {"repeated_failures": "%d failed logins",
                "user_enumeration": "%d invalid user names tried",
                "distributed_attack": "%d sources failed to log in"}[reason]
        names = seen if reason == "user_enumeration" else users
        return Event(
            action="brute_force_detected", reason=reason,
            timestamp_us=event.timestamp_us, counted_by=kind,
            attempts=len(seen), window_s=threshold.window_s,
            users_tried=tuple(names) if names and kind != "user" else None,
            sources=tuple(seen) if reason == "distributed_attack" else None,
            user=value if kind == "user" else None,
            source_ip=event.source_ip if kind == "source" else None,
            source_domain=event.source_domain if kind == "source" else None,
            network=value if kind == "network" else None,
            service=event.service, hostname=event.hostname,
            cursor=event.cursor, message="%s in %d s %s" % (
                what % len(seen), threshold.window_s, where))

    def _judge_success(self, event):
        """The counter with the most guesses within the window, if it has
        enough; guesses counted for one success are not counted again."""
        now = event.timestamp_us
        window_us = self.success.window_s * 1000000
        worst = None
        for kind, value in failure_counters(event):
            record = self._lookup("%s %s" % (kind, value))
            if record is None:
                continue
            last = record["fired"].get("success")
            since = last if last is not None and _in_window(
                last, now, window_us) else now - window_us
            failures = len(_times_between(record["times"], since, now))
            if failures >= self.success.attempts and (
                    worst is None or failures > worst[0]):
                worst = (failures, kind, value)
            record["fired"]["success"] = now
        if worst is None:
            return []
        failures, kind, value = worst
        return [event._replace(
            action="success_after_failures", severity=None, reason=None,
            counted_by=kind, attempts=failures,
            window_s=self.success.window_s, context_key=None,
            message="login of %s after %d failed attempts %s within %d s: %s"
            % (event.user, failures, "from " + value if kind != "user"
               else "for the account", self.success.window_s,
               event.message))]

    def to_state(self):
        return {"repeated": self.counters.to_state(),
                "once": self.probation.to_state()}

    def load_state(self, saved, now_us):
        """Restore from to_state(); anything malformed, or dated more than
        a day after `now_us` (wall clock), is skipped."""
        saved = saved if isinstance(saved, dict) else {}
        latest = now_us + _FUTURE_SLACK_US

        def restore(record):
            return self._restore(record, latest)
        self.counters.load_state(saved.get("repeated"), restore)
        self.probation.load_state(saved.get("once"), restore)

    def _restore(self, saved, latest):
        if not isinstance(saved, dict):
            return None
        times, users, fired = (saved.get("times"), saved.get("users"),
                               saved.get("fired"))
        if not (isinstance(times, list) and isinstance(users, list) and
                isinstance(fired, dict)):
            return None
        restored = {
            "times": sorted(t for t in times if type(t) is int and
                            t <= latest)[-self.keep:],
            "users": [u for u in users if isinstance(u, str)]
            [-MAX_USERS_TRIED:],
            "fired": {k: v for k, v in fired.items() if k in _RULE_NAMES
                      and type(v) is int and v <= latest}}
        for field in ("invalid", "sources"):
            seen = saved.get(field)
            if isinstance(seen, list):
                restored[field] = [
                    item for item in seen if isinstance(item, list) and
                    len(item) == 2 and isinstance(item[0], str) and
                    type(item[1]) is int and item[1] <= latest
                ][-self.keep_distinct:]
        return restored


def network_of(event):
    """The network a login came from, as the baseline remembers it: the
    /24 of an IPv4 source, the /64 of an IPv6 one, or the host name."""
    if event.source_ip and ":" in event.source_ip:
        return ipv6_network_64(event.source_ip)
    if event.source_ip:
        return "%s.0/24" % event.source_ip.rsplit(".", 1)[0]
    return event.source_domain


def privileged_severity(event):
    """Root access weighs more: a login as root 7, su to root 6, a sudo
    command as root 5 (the defaults are 5, 5 and 4)."""
    if event.severity is not None:
        return event
    if event.action == "login_success":
        if event.service in ("su", "su-l") and event.target_user == "root":
            return event._replace(severity=6)
        if event.user == "root" and event.service not in ("su", "su-l"):
            return event._replace(severity=7)
    if event.action == "sudo_command" and event.target_user == "root":
        return event._replace(severity=5)
    return event


class Baseline:
    """What is usual here, learned from the events themselves: the networks
    each user logs in from, and who uses sudo. A login from a network never
    seen for that user gives `new_source`; a first sudo by a user,
    `new_sudo_user`. Quiet during the learning period that starts with the
    first event it sees. Bounded per user and in users, and saved."""

    def __init__(self, learning_period_s, limit=MAX_BASELINE_USERS):
        self.learning_us = learning_period_s * 1000000
        self.started_us = None
        self.networks = BoundedTable(limit)
        self.sudo_users = BoundedTable(limit)

    def observe(self, event):
        """Detections the event gives rise to (a list, often empty)."""
        if self.started_us is None:
            self.started_us = event.timestamp_us
        quiet = event.timestamp_us < self.started_us + self.learning_us
        if event.action == "login_success" and event.user:
            return self._login(event, quiet)
        if event.action == "sudo_command" and event.user:
            known = event.user in self.sudo_users
            self.sudo_users.put(event.user, event.timestamp_us)
            if known or quiet:
                return []
            return [event._replace(
                action="new_sudo_user", severity=None, context_key=None,
                message="first sudo by %s seen here: %s"
                % (event.user, event.message))]
        return []

    def _login(self, event, quiet):
        network = network_of(event)
        if network is None:
            return []
        known = self.networks.get(event.user, [])
        self.networks.put(event.user, ([n for n in known if n != network]
                                       + [network])[-MAX_NETWORKS_PER_USER:])
        if network in known or quiet:
            return []
        return [event._replace(
            action="new_source", severity=None, network=network,
            context_key=None, message="%s logged in from %s, never seen for "
            "this user: %s" % (event.user, network, event.message))]

    def to_state(self):
        return {"started_us": self.started_us,
                "networks": self.networks.to_state(),
                "sudo_users": self.sudo_users.to_state()}

    def load_state(self, saved, now_us):
        """Restore from to_state(); a start dated after `now_us` (wall
        clock) would keep it learning for ever, so it is dropped too."""
        saved = saved if isinstance(saved, dict) else {}
        started = saved.get("started_us")
        self.started_us = started if type(started) is int and \
            started <= now_us + _FUTURE_SLACK_US else None
        self.networks.load_state(saved.get("networks"), lambda networks: [
            n for n in networks if isinstance(n, str)][
                -MAX_NETWORKS_PER_USER:] if isinstance(networks, list)
            else None)
        self.sudo_users.load_state(saved.get("sudo_users"), lambda seen:
                                   seen if type(seen) is int else None)


# ---------------------------------------------------------------------------
# 10 rendering
# ---------------------------------------------------------------------------

_NEEDS_QUOTES = re.compile(r'[\s"\\=]')


def _text_value(value):
    """A value for key=value output: escaped, and quoted when it has spaces,
    so a hostile user name cannot pose as another field."""
    text = escape_text(str(value).replace("\\", "\\\\"))
    if not text or _NEEDS_QUOTES.search(text):
        return '"%s"' % text.replace('"', '\\"')
    return text


def _endpoint(ip, domain, port):
    host = ip or domain
    if host is None:
        return None
    if port is None:
        return host
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def render_text(event):
    """One readable line: time, action, then who/where/how as key=value."""
    pairs = [
        ("user", event.user or (event.user_id and "uid " + event.user_id)),
        ("as", event.target_user),
        ("source", _endpoint(event.source_ip, event.source_domain,
                             event.source_port)),
        ("service", event.service), ("method", event.auth_method),
        ("reason", event.reason), ("key", event.key),
        ("tty", event.tty), ("command", event.command_line),
        ("duration", None if event.session_duration_s is None
         else "%gs" % event.session_duration_s),
        ("counted_by", event.counted_by), ("network", event.network),
        ("attempts", event.attempts),
        ("window", None if event.window_s is None
         else "%ds" % event.window_s),
        ("users_tried", ",".join(event.users_tried or ()) or None),
        ("sources", ",".join(event.sources or ()) or None),
        ("writer_uid", event.writer_uid), ("program", event.process_name),
        ("claimed", event.claimed_action), ("host", event.hostname),
    ]
    if event.action == "spoofed_entry" or event.action in AGENT_ACTIONS:
        pairs.append(("message", event.message))
    stamp = format_timestamp(event.timestamp_us)
    return "%sZ %s %s" % (stamp[:19].replace("T", " "), event.action, " ".join(
        "%s=%s" % (name, _text_value(value)) for name, value in pairs
        if value is not None and value != ""))


def render_json(event):
    """The event contract, one line, safe for a terminal."""
    return dumps_safe(event_to_ecs(event))


# ---------------------------------------------------------------------------
# 12 sinks and state (I/O)
# ---------------------------------------------------------------------------


def say(level, message, stream=None):
    """A diagnostic on stderr; under systemd with the journal's priority."""
    stream = stream or sys.stderr
    if os.environ.get("JOURNAL_STREAM"):
        prefix = {"error": "<3>", "warning": "<4>", "info": "<6>"}[level]
    else:
        prefix = "pamsignal: " if level == "info" else \
            "pamsignal: %s: " % level
    text = prefix + escape_text(message) + "\n"
    try:
        try:
            stream.write(text)
        except UnicodeEncodeError:  # an ASCII locale (Python 3.6, LANG=C)
            stream.write(text.encode("ascii", "backslashreplace").decode())
        stream.flush()
    except (OSError, ValueError):
        pass  # nowhere left to complain to


class ConsoleSink:
    """Prints each event on standard output: a readable line or ECS JSON."""

    OPTIONS = {"format": _console_format}

    def __init__(self, name, events=frozenset(ACTIONS), options=None,
                 stream=None):
        self.name = name
        self.events = events
        self.format = (options or {}).get("format", "text")
        self.stream = stream

    def open(self):
        if self.stream is None:
            self.stream = utf8_stdout()

    def send(self, event):
        line = render_json(event) if self.format == "json" \
            else render_text(event)
        self.stream.write(line + "\n")

    def flush(self):
        """Everything sent so far is out: called after each batch."""
        if self.stream is not None:
            self.stream.flush()

    def close(self):
        self.flush()


#: channel type -> sink class; a new destination is one class here.
CHANNEL_TYPES = {"console": ConsoleSink}


def build_sinks(config, json_output=False):
    """The configured channels, or the console when none is configured."""
    channels = config.channels or (
        ChannelConfig("console", "console", frozenset(ACTIONS), {}),)
    sinks = []
    for channel in channels:
        options = dict(channel.options)
        if json_output and channel.type == "console":
            options["format"] = "json"
        sinks.append(CHANNEL_TYPES[channel.type](channel.name, channel.events,
                                                 options))
    return sinks


class StateStore:
    """A JSON file in the state directory, replaced atomically: the journal
    cursor with open sessions (state.json), or the detectors' counters
    (detection.json)."""

    def __init__(self, state_dir, file_name="state.json"):
        self.state_dir = state_dir
        self.path = os.path.join(state_dir, file_name)
        self.damaged_at = None

    def prepare(self):
        """Create the directory if missing and prove it can be written."""
        try:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            probe = os.path.join(self.state_dir, ".write-test")
            with open(probe, "w") as handle:
                handle.write("ok")
            os.unlink(probe)
        except OSError as error:
            raise StateError(
                "cannot write the state directory %s: %s (run as root, or set"
                " state_dir in [pamsignal] of the configuration)"
                % (self.state_dir, error.strerror or error)) from None

    def load(self):
        """The saved state; {} when there is none or it is damaged (then
        with a warning, and `damaged_at` is when the file was written)."""
        self.damaged_at = None
        try:
            with open(self.path, encoding="utf-8") as handle:
                state = json.load(handle)
            if isinstance(state, dict):
                return state
            problem = "not a JSON object"
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as error:
            problem = str(error)
        try:
            self.damaged_at = os.stat(self.path).st_mtime
        except OSError:
            pass
        say("warning", "ignoring unreadable state %s: %s"
            % (self.path, problem))
        return {}

    def save(self, state, durable=True):
        """Replace the state atomically; `durable` also survives a power
        cut (fsync), while a plain save already survives a crash."""
        try:
            replace_file(self.path, json.dumps(state, separators=(",", ":")),
                         durable)
        except OSError as error:
            raise StateError("cannot save state to %s: %s"
                             % (self.path, error.strerror or error)) from None


def replace_file(path, text, durable=False, mode=0o600):
    """Write `text` to `path` atomically: readers see the old file or the
    new one, never half of it (a temporary file, then rename)."""
    temporary = path + ".tmp"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         mode)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), mode)  # whatever the umask
        handle.write(text)
        handle.flush()
        if durable:
            os.fsync(handle.fileno())
    os.replace(temporary, path)


def metrics_path(config):
    """Where the running agent writes its health for `status` and
    Prometheus' textfile collector."""
    return config.metrics_file or os.path.join(config.state_dir,
                                               METRICS_FILE_NAME)


_CURSOR_SHAPE = re.compile(r"^[A-Za-z0-9=;_-]{1,512}$")


def valid_cursor(cursor):
    """Cursors are opaque, but a saved one must at least look like one."""
    return isinstance(cursor, str) and bool(_CURSOR_SHAPE.match(cursor))


# ---------------------------------------------------------------------------
# 13 journal source (I/O)
# ---------------------------------------------------------------------------


def journal_matches():
    """journalctl match arguments: one field repeated means OR."""
    return ["SYSLOG_IDENTIFIER=%s" % name for name in sorted(WATCHED_SERVICES)]


def first_start_time_us(first_start, now_s):
    """The absolute start of `now` or `-2h`; None for boot and all."""
    if first_start == "now":
        return int(now_s * 1e6)
    if first_start.startswith("-"):
        seconds = int(first_start[1:-1]) * _SECONDS_PER_UNIT[first_start[-1]]
        return int((now_s - seconds) * 1e6)
    return None


def follow_command(journalctl, position):
    """The journalctl command line that follows the watched services."""
    return ([journalctl, "--follow", "--output=json", "--no-pager",
             "--all", "--quiet", "--no-tail",
             "--output-fields=" + ",".join(JOURNAL_FIELDS)]
            + position + journal_matches())


class JournalSource:
    """Runs `journalctl -f -o json` and hands out its lines.

    Restarts it with backoff when it exits, resumes after the last handled
    entry's cursor, and restarts it when it has silently stopped following
    (seen when inotify watches run out).
    """

    def __init__(self, journalctl, first_start, cursor=None,
                 last_realtime_us=None):
        self.journalctl = journalctl
        self.first_start = first_start
        self.cursor = cursor
        self.last_realtime_us = last_realtime_us
        self.since_us = None  # the first start as an absolute time
        self.skip_cursor = None  # handled already; seen again after fallback
        self.process = None
        self.errors_open = False
        self.pending = b""
        self.discarding = False
        self.errors = b""
        self.failures = 0
        self.cursor_rejections = 0
        self.restart_at = 0.0
        self.started_at = 0.0
        self.last_activity = 0.0
        self.starts = 0  # for the health metrics: restarts = starts - 1
        self.last_error = None  # why the follower last stopped

    # -- position ---------------------------------------------------------

    def advance(self, cursor, realtime_us):
        """Record the last fully handled entry."""
        self.cursor = cursor
        self.cursor_rejections = 0  # journalctl took the cursor it was given
        if realtime_us is not None:
            self.last_realtime_us = realtime_us

    def pin_first_start(self, now_s):
        """Fix `now` or `-1h` to an absolute time, once, so that a restart
        before any entry was handled does not skip what happened since."""
        if self.cursor is None and self.last_realtime_us is None and \
                self.since_us is None:
            self.since_us = first_start_time_us(self.first_start, now_s)

    def position(self):
        """journalctl arguments: after the last handled entry, else from its
        time (the cursor was refused), else from the first start."""
        if self.cursor is not None:
            return ["--after-cursor=%s" % self.cursor]
        if self.last_realtime_us is not None:
            return ["--since=@%.6f" % (self.last_realtime_us / 1e6)]
        if self.since_us is not None:
            return ["--since=@%.6f" % (self.since_us / 1e6)]
        return ["--boot"] if self.first_start == "boot" else []

    # -- process ----------------------------------------------------------

    def start(self, now):
        self.pin_first_start(time.time())
        command = follow_command(self.journalctl, self.position())
        try:
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, close_fds=True)
        except OSError as error:
            self.process = None
            raise SourceError("cannot start %s: %s" % (
                self.journalctl, error.strerror or error)) from None
        os.set_blocking(self.process.stderr.fileno(), False)
        self.starts += 1
        self.errors_open = True
        self.pending, self.discarding, self.errors = b"", False, b""
        self.started_at = self.last_activity = now

    def stop(self):
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
        process.stderr.close()

    def read(self, timeout, now_fn=time.monotonic):
        """Complete lines available within `timeout` seconds (maybe none)."""
        if self.process is None:
            wait = max(0.0, min(timeout, self.restart_at - now_fn()))
            time.sleep(wait)
            return []
        streams = [self.process.stdout]
        if self.errors_open:
            streams.append(self.process.stderr)
        readable, _, _ = select.select(streams, [], [], timeout)
        lines = []
        if self.process.stderr in readable:
            self._drain_errors()
        if self.process.stdout in readable:
            chunk = os.read(self.process.stdout.fileno(), 262144)
            if not chunk:
                self._exited(now_fn())
            else:
                self.last_activity = now_fn()
                lines = self._split(chunk)
        return lines

    def _drain_errors(self):
        """Keep the tail of journalctl's complaints without ever blocking."""
        while self.errors_open:
            try:
                chunk = os.read(self.process.stderr.fileno(), 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.errors_open = False  # closed; select must not spin
            self.errors = (self.errors + chunk)[-4096:]

    def _split(self, chunk):
        if self.discarding:
            newline = chunk.find(b"\n")
            if newline < 0:
                return []
            chunk, self.discarding = chunk[newline + 1:], False
        parts = (self.pending + chunk).split(b"\n")
        self.pending = parts.pop()
        if len(self.pending) > MAX_LINE_BYTES:
            self.pending, self.discarding = b"", True
            say("warning", "dropped a journal line longer than %d bytes"
                % MAX_LINE_BYTES)
        return parts

    def _schedule_restart(self, now):
        delay = RESTART_BACKOFF_S[min(self.failures,
                                      len(RESTART_BACKOFF_S) - 1)]
        self.restart_at = now + delay
        return delay

    def _exited(self, now):
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass  # closed its output but lingers: stop() ends it
        self._drain_errors()
        code = self.process.returncode
        self.stop()
        detail = self.errors.decode("utf-8", "replace").strip()
        ran_for = now - self.started_at
        if ran_for >= HEALTHY_RUN_S:
            self.failures = self.cursor_rejections = 0
        else:
            self.failures += 1
        if code != 0 and ran_for < 5 and self.cursor is not None:
            self.cursor_rejections += 1
            if self.cursor_rejections >= 3:
                say("warning", "journalctl keeps refusing the saved cursor; "
                    "resuming from the time of the last handled entry")
                self.skip_cursor, self.cursor = self.cursor, None
                self.cursor_rejections = 0
        delay = self._schedule_restart(now)
        self.last_error = "journalctl exited with status %s%s" % (
            code, ": " + detail.splitlines()[-1] if detail else "")
        say("warning", "%s; restarting in %ds" % (self.last_error, delay))

    def supervise(self, now, probe=None):
        """Restart a dead follower when its backoff is over, and a silent
        one when the journal holds entries it should have delivered."""
        if self.process is None:
            if now >= self.restart_at:
                try:
                    self.start(now)
                except SourceError as error:
                    self.failures += 1
                    delay = self._schedule_restart(now)
                    self.last_error = str(error)
                    say("error", "%s; retrying in %ds" % (error, delay))
            return
        if now - self.last_activity >= STALL_CHECK_S:
            self.last_activity = now
            if (probe or self.missed_entries)():
                self.last_error = "journalctl stopped delivering entries"
                say("warning", "%s; restarting it" % self.last_error)
                self.stop()
                self.restart_at = now

    def missed_entries(self):
        """Whether the journal has a watched entry older than 30 s that the
        follower has not delivered."""
        command = [self.journalctl, "--output=json", "--no-pager", "--quiet",
                   "--lines=1", "--output-fields=MESSAGE"] + \
            self.position() + journal_matches()
        try:
            result = subprocess.run(command, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return False
        entry = decode_line(result.stdout.strip().split(b"\n")[-1])
        realtime_us = entry and _entry_timestamp(entry)
        return bool(realtime_us) and realtime_us < (time.time() - 30) * 1e6


# ---------------------------------------------------------------------------
# 14 runtime
# ---------------------------------------------------------------------------


def notify_address(environ):
    """The $NOTIFY_SOCKET to connect to, or None: a path, or an abstract
    socket written with a leading '@' (vsock: is not supported)."""
    address = environ.get("NOTIFY_SOCKET") or ""
    if address.startswith("@"):
        return "\0" + address[1:]
    return address if address.startswith("/") else None


def watchdog_interval_s(environ, pid):
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None
    when systemd watches no process or another one (WATCHDOG_PID)."""
    usec = parse_int(environ.get("WATCHDOG_USEC"))
    watched = environ.get("WATCHDOG_PID")
    if not usec or (watched is not None and watched != str(pid)):
        return None
    return usec / 2e6


def status_text(text):
    """One short line for STATUS=: no newlines or control characters."""
    return " ".join(escape_text(text).split())[:MAX_STATUS_CHARS]


class Notifier:
    """sd_notify(3) with the standard library: each message is one
    datagram to $NOTIFY_SOCKET; without it (not under systemd) nothing."""

    def __init__(self, environ=None, pid=None):
        environ = os.environ if environ is None else environ
        self.address = notify_address(environ)
        self.watchdog_s = watchdog_interval_s(
            environ, os.getpid() if pid is None else pid)
        self.last_ping = None
        self.status = None
        self.complained = False

    def notify(self, *fields):
        """Send KEY=VALUE fields in one message; False if not delivered."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(fields).encode("utf-8"))
        except OSError as error:
            if not self.complained:  # once: it would repeat every ping
                say("warning", "cannot notify systemd: %s"
                    % (error.strerror or error))
                self.complained = True
            return False
        return True

    def set_status(self, text, *fields):
        """STATUS= (with other fields), sent when anything changed."""
        text = status_text(text)
        if text != self.status or fields:
            self.status = text
            self.notify(*(fields + ("STATUS=" + text,)))

    def ping(self, now):
        """WATCHDOG=1 when half the watchdog timeout has passed."""
        if self.watchdog_s is not None and (
                self.last_ping is None or
                now - self.last_ping >= self.watchdog_s):
            self.last_ping = now
            self.notify("WATCHDOG=1")


def monotonic_usec():
    """CLOCK_MONOTONIC in microseconds, as systemd wants it on reload."""
    return int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)


class Health:
    """Counters and what is impaired, for the metrics file, STATUS= and
    `status`. Bookkeeping only: times are arguments."""

    def __init__(self, started_s):
        self.started_s = started_s
        self.reloads = collections.Counter()  # "ok" / "failed"
        self.impaired = collections.OrderedDict()  # component -> reason
        self.known = set(("journal", "state", "detection_state", "metrics"))
        self.reload_problem = None
        self.last_error = None
        self.last_error_s = None

    def impair(self, component, reason, now_s):
        """Record what is wrong; True only when it just went wrong."""
        self.known.add(component)
        self.error("%s: %s" % (component, reason), now_s)
        is_new = component not in self.impaired
        self.impaired[component] = reason
        return is_new

    def restore(self, component):
        """True when the component was impaired until now."""
        return self.impaired.pop(component, None) is not None

    def error(self, message, now_s):
        self.last_error, self.last_error_s = message, now_s

    def summary(self, entries, events):
        """What the agent is doing, for STATUS= and the logs."""
        parts = []
        if self.impaired:
            parts.append("Degraded: %s" % "; ".join(
                "%s: %s" % item for item in self.impaired.items()))
        else:
            parts.append("Following the journal")
        parts.append("%d entries read, %d events" % (entries, events))
        if self.reload_problem:
            parts.append("configuration reload failed, running on the "
                         "previous one: %s" % self.reload_problem)
        return "; ".join(parts)


#: Metric name -> (type, help), in the order they are written.
METRICS = collections.OrderedDict((
    ("pamsignal_info", ("gauge", "Version of the running agent.")),
    ("pamsignal_running",
     ("gauge", "1 while the agent runs, 0 once it stopped cleanly.")),
    ("pamsignal_pid", ("gauge", "Process ID of the agent.")),
    ("pamsignal_start_time_seconds",
     ("gauge", "When the agent started (Unix time).")),
    ("pamsignal_uptime_seconds",
     ("gauge", "Seconds since the agent started.")),
    ("pamsignal_metrics_time_seconds",
     ("gauge", "When this file was written (Unix time).")),
    ("pamsignal_journal_entries_total",
     ("counter", "Journal entries read.")),
    ("pamsignal_journal_malformed_lines_total",
     ("counter", "journalctl output lines that were not journal entries.")),
    ("pamsignal_journal_lag_seconds",
     ("gauge", "Now minus the time of the newest journal entry handled.")),
    ("pamsignal_journalctl_restarts_total",
     ("counter", "Times journalctl was started again.")),
    ("pamsignal_events_total", ("counter", "Events reported, by action.")),
    ("pamsignal_alerts_sent_total",
     ("counter", "Events handed to each channel.")),
    ("pamsignal_alerts_failed_total",
     ("counter", "Send or flush failures of each channel.")),
    ("pamsignal_config_reloads_total",
     ("counter", "Configuration reloads (SIGHUP), by result.")),
    ("pamsignal_degraded",
     ("gauge", "1 while a part of the monitoring is impaired.")),
    ("pamsignal_last_error_time_seconds",
     ("gauge", "When the last error happened (Unix time).")),
    ("pamsignal_last_error_info",
     ("gauge", "The last error, in the message label.")),
))


def prometheus_label(value):
    """A label value for the Prometheus text format: valid UTF-8 (an odd
    file name in an error must not stop the write), escaped, capped."""
    text = str(value)[:MAX_LABEL_CHARS].encode(
        "utf-8", "backslashreplace").decode("utf-8")
    return text.replace("\\", "\\\\").replace("\n", "\\n") \
        .replace('"', '\\"')


def render_metrics(samples):
    """[(name, {label: value}, number)] -> Prometheus text exposition
    format, each family under its HELP and TYPE lines."""
    by_name = collections.OrderedDict((name, []) for name in METRICS)
    for name, labels, value in samples:
        by_name[name].append((labels, value))
    lines = []
    for name, found in by_name.items():
        if not found:
            continue
        kind, text = METRICS[name]
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for labels, value in found:
            label_text = ",".join('%s="%s"' % (key, prometheus_label(
                labels[key])) for key in sorted(labels))
            lines.append("%s%s %s" % (name, "{%s}" % label_text
                                      if label_text else "", _number(value)))
    return "\n".join(lines) + "\n"


def _number(value):
    if isinstance(value, float) and not value.is_integer():
        return "%.3f" % value
    return "%d" % value


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')
_LABEL_ESCAPES = {"\\\\": "\\", "\\n": "\n", '\\"': '"'}


def parse_metrics(text):
    """Prometheus text -> {name: [(labels, value)]}; other lines skipped."""
    found = collections.OrderedDict()
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if not match or line.startswith("#"):
            continue
        labels = {key: re.sub(r"\\[\\n\"]", lambda m: _LABEL_ESCAPES[
            m.group(0)], raw) for key, raw in _LABEL.findall(
                match.group(2) or "")}
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        found.setdefault(match.group(1), []).append((labels, value))
    return found


def agent_event(action, now_s, component=None, message=None):
    """An event about the agent itself (not from the journal)."""
    return Event(timestamp_us=int(now_s * 1e6), action=action,
                 hostname=socket.gethostname(), service="pamsignal",
                 pid=os.getpid(), detail=component, message=message)


class Pipeline:
    """Entry -> event -> sessions -> sinks, shared by `run` and `scan`.

    A failing sink is reported and never stops the others or the reader.
    """

    def __init__(self, sinks, detection, skip_unwatched=False):
        self.sinks = sinks
        self.sessions = SessionTracker()
        self.sudo_attempts = SudoAttempts()
        self.detector = FailureDetector(detection)
        self.baseline = Baseline(detection.learning_period)
        self.skip_unwatched = skip_unwatched
        self.entries = 0
        self.events = 0
        self.malformed = 0
        self.by_action = collections.Counter()
        self.sent = collections.Counter()  # channel -> events handed over
        self.failed = collections.Counter()  # channel -> errors
        self.failing = {}  # channel -> its error, until it works again

    def decode(self, line):
        """One journalctl output line -> entry dict, or None (counted, and
        complained about when it is not a journal JSON object).

        With skip_unwatched (scan of a whole export), an object line that
        does not even contain a watched identifier is counted unparsed:
        most of a full export is other programs.
        """
        if self.skip_unwatched and isinstance(line, bytes) and \
                _WATCHED_NAME_BYTES.search(line) is None:
            if line.lstrip().startswith(b"{") and \
                    line.rstrip().endswith(b"}"):
                self.entries += 1
                return None
        entry = decode_line(line)
        if entry is None:
            self.malformed += 1
            if self.malformed <= 5 or self.malformed % 1000 == 0:
                say("warning", "skipped a line that is not a journal JSON "
                    "object (%d so far): %.80r" % (self.malformed, line))
            return None
        self.entries += 1
        return entry

    def report(self, entry):
        """Parse one entry and send its event, then what it made the
        detector find; returns how many events were sent."""
        event = parse_entry(entry)
        if event is not None:
            event = self.sudo_attempts.observe(event)
        if event is None:
            return 0
        event = privileged_severity(self.sessions.observe(event))
        self._send(event)
        try:
            found = self.detector.observe(event) + \
                self.baseline.observe(event)
        except Exception as error:  # a detector bug must not stop reading
            say("error", "detection failed on %s: %r" % (event.action, error))
            found = []
        for detection in found:
            self._send(detection)
        return 1 + len(found)

    def _send(self, event):
        self.events += 1
        self.by_action[event.action] += 1
        self._each_sink(lambda sink: sink.send(event), [
            sink for sink in self.sinks if event.action in sink.events], True)

    def announce(self, event):
        """Send an event of the agent's own, at once."""
        self._send(event)
        self.flush()

    def flush(self):
        """Push out what the sinks hold (after each batch)."""
        self._each_sink(lambda sink: sink.flush(), self.sinks, False)

    def _each_sink(self, call, sinks, counted):
        for sink in sinks:
            try:
                call(sink)
            except BrokenPipeError:
                raise  # our own output is gone: the caller decides
            except Exception as error:  # a sink must not stop the others
                self.failed[sink.name] += 1
                if sink.name not in self.failing:  # once, not per event
                    say("error", "channel %s failed: %s" % (sink.name, error))
                self.failing[sink.name] = str(error) or repr(error)
            else:
                if counted:  # a flush proves nothing: it may hold nothing
                    self.sent[sink.name] += 1
                    self.failing.pop(sink.name, None)


class Agent:
    """The `run` command: follows the journal until told to stop.

    Under systemd it reports through sd_notify (READY, STATUS, WATCHDOG,
    RELOADING, STOPPING); SIGHUP reloads the configuration; its health goes
    to a Prometheus textfile that `status` reads.
    """

    def __init__(self, config, sinks, config_path=None, json_output=False,
                 environ=None):
        self.config = config
        self.config_path = config_path  # as given: None means the default
        self.json_output = json_output
        self.store = StateStore(config.state_dir)
        self.detection_store = StateStore(config.state_dir, "detection.json")
        self.last_detection_save = 0.0
        self.events_at_detection_save = 0
        self.pipeline = Pipeline(sinks, config.detection)
        self.source = JournalSource(config.journalctl, config.first_start)
        self.notifier = Notifier(environ)
        self.health = Health(time.time())
        self.stopping = False
        self.reload_requested = False
        self.last_save = 0.0
        self.last_metrics = None
        self.unsaved = False

    def request_stop(self, signum=None, frame=None):
        self.stopping = True

    def request_reload(self, signum=None, frame=None):
        self.reload_requested = True

    def restore(self):
        state = self.store.load()
        if self.store.damaged_at is not None:
            # Some repeats, never lost logins: from before its last write.
            say("warning", "resuming from a minute before it was written")
            state = {"since_us": int((self.store.damaged_at - 60) * 1e6)}
        detection = self.detection_store.load()
        if detection and detection.get("version") != 1:
            say("warning", "ignoring %s of another version"
                % self.detection_store.path)
            detection = {}
        now_us = int(time.time() * 1e6)
        self.pipeline.detector.load_state(detection.get("counters"), now_us)
        self.pipeline.baseline.load_state(detection.get("baseline"), now_us)
        cursor = state.get("cursor")
        if cursor is not None and not valid_cursor(cursor):
            say("warning", "ignoring a malformed saved cursor")
            cursor = None
        realtime_us, since_us = state.get("realtime_us"), state.get("since_us")
        self.source.advance(cursor, realtime_us
                            if type(realtime_us) is int else None)
        if type(since_us) is int:
            self.source.since_us = since_us
        self.pipeline.sessions.load_state(state.get("sessions"))
        self.pipeline.sudo_attempts.load_state(state.get("sudo_attempts"))

    # -- saving -------------------------------------------------------------

    def save(self, now, durable=True):
        """Save cursor and sessions; a failure degrades, never stops, the
        agent (it keeps the state in memory and tries again)."""
        if self._guarded("state", lambda: self.store.save({
                "version": 1, "cursor": self.source.cursor,
                "realtime_us": self.source.last_realtime_us,
                "since_us": self.source.since_us,
                "sessions": self.pipeline.sessions.to_state(),
                "sudo_attempts": self.pipeline.sudo_attempts.to_state()},
                durable)):
            self.unsaved = False
        if durable:
            self.last_save = now

    def save_detection(self, now):
        """Save counters and baseline if any event came since last time."""
        self.last_detection_save = now
        if self.pipeline.events == self.events_at_detection_save:
            return
        if self._guarded("detection_state", lambda: self.detection_store.save({
                "version": 1, "counters": self.pipeline.detector.to_state(),
                "baseline": self.pipeline.baseline.to_state()})):
            self.events_at_detection_save = self.pipeline.events

    def write_metrics(self, now, running=True):
        self.last_metrics = now
        text = render_metrics(self.metric_samples(time.time(), running))
        self._guarded("metrics", lambda: replace_file(
            metrics_path(self.config), text, mode=0o644))

    def _guarded(self, component, write):
        """Run a write; True if it worked. Its failure impairs the
        component, its next success restores it."""
        try:
            write()
        except (OSError, StateError) as error:
            self.impair(component, getattr(error, "strerror", None) and
                        "%s: %s" % (error.filename, error.strerror)
                        or str(error))
            return False
        self.restore_component(component)
        return True

    # -- health -------------------------------------------------------------

    def impair(self, component, reason):
        """Something the monitoring needs broke: say so once (log, event,
        STATUS=), however often it is retried."""
        now_s = time.time()
        if self.health.impair(component, reason, now_s):
            say("error", "monitoring degraded: %s: %s" % (component, reason))
            self.pipeline.announce(agent_event(
                "monitoring_degraded", now_s, component, reason))
        self.update_status()  # sent only if the reason changed

    def restore_component(self, component):
        if self.health.restore(component):
            say("info", "monitoring restored: %s" % component)
            self.pipeline.announce(agent_event(
                "monitoring_restored", time.time(), component,
                "%s works again" % component))
            self.update_status()

    def check_journal(self, now):
        """journalctl should run; kept running a while, it is back."""
        source = self.source
        if source.process is None:
            self.impair("journal", source.last_error or
                        "journalctl is not running")
        elif now - source.started_at >= JOURNAL_RECOVERED_S:
            self.restore_component("journal")

    def check_channels(self):
        """A channel that failed is impaired until it works again."""
        names = set(sink.name for sink in self.pipeline.sinks)
        for name, error in list(self.pipeline.failing.items()):
            self.impair("channel:" + name, error)
        for component in list(self.health.impaired):
            if component.startswith("channel:") and (
                    component[8:] not in self.pipeline.failing or
                    component[8:] not in names):
                self.restore_component(component)

    def update_status(self, *fields):
        self.notifier.set_status(self.health.summary(
            self.pipeline.entries, self.pipeline.events), *fields)

    def metric_samples(self, now_s, running=True):
        """The health as (name, labels, value) for render_metrics."""
        health, pipeline = self.health, self.pipeline
        samples = [
            ("pamsignal_info", {"version": __version__}, 1),
            ("pamsignal_running", {}, 1 if running else 0),
            ("pamsignal_pid", {}, os.getpid()),
            ("pamsignal_start_time_seconds", {}, health.started_s),
            ("pamsignal_uptime_seconds", {}, now_s - health.started_s),
            ("pamsignal_metrics_time_seconds", {}, now_s),
            ("pamsignal_journal_entries_total", {}, pipeline.entries),
            ("pamsignal_journal_malformed_lines_total", {},
             pipeline.malformed),
            ("pamsignal_journalctl_restarts_total", {},
             max(0, self.source.starts - 1))]
        if self.source.last_realtime_us is not None:
            samples.append(("pamsignal_journal_lag_seconds", {}, max(
                0.0, now_s - self.source.last_realtime_us / 1e6)))
        samples += [("pamsignal_events_total", {"action": action}, count)
                    for action, count in sorted(pipeline.by_action.items())]
        channels = sorted(set(sink.name for sink in pipeline.sinks) |
                          set(pipeline.sent) | set(pipeline.failed))
        samples += [("pamsignal_alerts_sent_total", {"channel": name},
                     pipeline.sent[name]) for name in channels]
        samples += [("pamsignal_alerts_failed_total", {"channel": name},
                     pipeline.failed[name]) for name in channels]
        samples += [("pamsignal_config_reloads_total", {"result": result},
                     health.reloads[result]) for result in ("ok", "failed")]
        health.known.update("channel:" + name for name in channels)
        samples += [("pamsignal_degraded", {"component": component},
                     int(component in health.impaired))
                    for component in sorted(health.known)]
        if health.last_error is not None:
            samples += [
                ("pamsignal_last_error_time_seconds", {}, health.last_error_s),
                ("pamsignal_last_error_info", {"message": health.last_error},
                 1)]
        return samples

    # -- reloading ------------------------------------------------------------

    def reload(self):
        """SIGHUP: a valid configuration replaces channels and detection
        settings (counters kept); an invalid one is reported and the agent
        goes on with the one it has."""
        self.reload_requested = False
        self.notifier.notify("RELOADING=1", "MONOTONIC_USEC=%d"
                             % monotonic_usec(),
                             "STATUS=Reloading the configuration")
        sinks = []
        try:
            config = load_config(self.config_path)
            sinks = build_sinks(config, self.json_output)
            for sink in sinks:
                sink.open()
        except (ConfigError, OSError) as error:
            for sink in sinks:
                self._close_sink(sink)
            self._reload_failed(getattr(error, "problems", None) or [
                "cannot open a channel: %s" % error])
        else:
            self._apply(config, sinks)
        self.update_status("READY=1")

    def _reload_failed(self, problems):
        now_s = time.time()
        self.health.reloads["failed"] += 1
        self.health.reload_problem = "%s%s" % (problems[0], "" if len(
            problems) == 1 else " (and %d more)" % (len(problems) - 1))
        self.health.error("configuration reload failed: %s"
                          % self.health.reload_problem, now_s)
        say("error", "configuration reload failed; still running on the "
            "previous configuration:")
        for problem in problems:
            say("error", str(problem))
        self.pipeline.announce(agent_event(
            "config_reload_failed", now_s, self.config.path,
            "; ".join(str(problem) for problem in problems)))

    def _apply(self, config, sinks):
        old, pipeline = self.config, self.pipeline
        for sink in pipeline.sinks:
            self._close_sink(sink)
        pipeline.sinks = sinks
        pipeline.failing.clear()
        if config.detection != old.detection:
            now_us = int(time.time() * 1e6)
            detector = FailureDetector(config.detection)
            detector.load_state(pipeline.detector.to_state(), now_us)
            baseline = Baseline(config.detection.learning_period)
            baseline.load_state(pipeline.baseline.to_state(), now_us)
            pipeline.detector, pipeline.baseline = detector, baseline
        for key in ("state_dir", "log_dir", "first_start", "journalctl"):
            if getattr(config, key) != getattr(old, key):
                say("warning", "%s changed: takes effect at the next start"
                    % key)
                config = config._replace(**{key: getattr(old, key)})
        self.config = config
        self.health.reloads["ok"] += 1
        self.health.reload_problem = None
        say("info", "configuration reloaded from %s (%d channel%s)" % (
            config.path, len(sinks), "" if len(sinks) == 1 else "s"))
        self.check_channels()

    @staticmethod
    def _close_sink(sink):
        try:
            sink.close()
        except Exception as error:  # closing must not stop the others
            say("error", "channel %s failed to close: %s" % (sink.name, error))

    # -- running --------------------------------------------------------------

    def follow_lines(self, lines, now):
        produced = 0
        for line in lines:
            entry = self.pipeline.decode(line)
            if entry is None:
                continue
            cursor = journal_text(entry.get("__CURSOR"))
            if cursor is not None and cursor == self.source.skip_cursor:
                continue  # the last entry before a refused cursor, again
            produced += self.pipeline.report(entry)
            if cursor is not None and valid_cursor(cursor):
                self.source.advance(cursor, _entry_timestamp(entry))
                self.unsaved = True
        if produced:
            self.pipeline.flush()
            # Saved as soon as the batch is out, so a restart after a crash
            # does not report it again; fsync follows within STATE_FLUSH_S.
            self.save(now, durable=False)
            self.unsaved = True

    def run(self):
        # Handlers first: SIGHUP's default would end the agent.
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)
        self.notifier.set_status("Starting")
        self.store.prepare()
        self.restore()
        for sink in self.pipeline.sinks:
            sink.open()
        now = time.monotonic()
        self.source.start(now)
        self.save(now)  # the start position, should it stop before any entry
        say("info", "pamsignal %s following the journal (%s)" % (
            __version__, "resuming after the saved cursor"
            if self.source.cursor else "first start: %s"
            % self.config.first_start))
        self.update_status("READY=1")
        # Wake up often enough to ping the watchdog in time.
        wait_s = min(1.0, self.notifier.watchdog_s or 1.0)
        try:
            while not self.stopping:
                self.notifier.ping(now)
                lines = self.source.read(wait_s)
                now = time.monotonic()
                self.follow_lines(lines, now)
                if self.reload_requested and not self.stopping:
                    self.reload()
                if self.unsaved and now - self.last_save >= STATE_FLUSH_S:
                    self.save(now)
                if now - self.last_detection_save >= DETECTION_FLUSH_S:
                    self.save_detection(now)
                if not self.stopping:
                    self.source.supervise(now)
                    self.check_journal(now)
                self.check_channels()
                if self.last_metrics is None or \
                        now - self.last_metrics >= METRICS_FLUSH_S:
                    self.write_metrics(now)
                    self.update_status()
        finally:
            self.notifier.notify("STOPPING=1", "STATUS=Stopping")
            now = time.monotonic()
            if self.unsaved:
                self.save(now)
            self.save_detection(now)
            self.source.stop()
            self.write_metrics(now, running=False)
            for sink in self.pipeline.sinks:
                self._close_sink(sink)
        say("info", "stopped after %d entries, %d events"
            % (self.pipeline.entries, self.pipeline.events))
        return EXIT_OK


# ---------------------------------------------------------------------------
# 15 CLI
# ---------------------------------------------------------------------------


def build_parser():
    doc_body = __doc__.split("\n\n", 2)
    parser = argparse.ArgumentParser(
        prog="pamsignal", description="\n\n".join(doc_body[:2]),
        epilog=doc_body[2] if len(doc_body) > 2 else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default %s)"
                        % DEFAULT_CONFIG_PATH)
    parser.add_argument("--version", action="version",
                        version="pamsignal %s" % __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="follow the journal and report")
    run.add_argument("--json", action="store_true",
                     help="print ECS JSON, one object per line")
    scan = commands.add_parser(
        "scan", help="print the events in a journalctl -o json export")
    scan.add_argument("--json", action="store_true",
                      help="print ECS JSON, one object per line")
    scan.add_argument("file", nargs="?", metavar="FILE|-",
                      help="the export; - or nothing reads standard input")
    commands.add_parser("check-config", help="validate the configuration")
    status = commands.add_parser(
        "status", help="health and counters of the running service")
    status.add_argument("--json", action="store_true",
                        help="print the health as one JSON object")
    stage = commands.add_parser(
        "stage-config", help="copy the configuration where the service's "
        "own user can read it (used by pamsignal.service)")
    stage.add_argument("destination", metavar="DEST",
                       help="the copy, e.g. /run/pamsignal/pamsignal.conf")
    for name, text in (("install", "set this file up as a hardened systemd "
                        "service"),
                       ("uninstall", "remove the service (keeps "
                        "configuration, state and logs)")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--prefix", default=DEFAULT_PREFIX,
                             help="the program goes to PREFIX/bin "
                             "(default %s)" % DEFAULT_PREFIX)
        command.add_argument("--root", metavar="DIR",
                             help="act below DIR instead of / (like DESTDIR)"
                             "; systemctl is not run")
    command.add_argument("--purge", action="store_true",
                         help="also remove configuration, state and logs")
    return parser


def command_scan(args, stdout):
    if args.file in (None, "-"):
        if args.file is None and sys.stdin.isatty():
            raise UsageError("scan reads a `journalctl -o json` export: give"
                             " a FILE, or - to read standard input")
        stream = sys.stdin.buffer
    else:
        try:
            stream = open(args.file, "rb")
        except OSError as error:
            message = "cannot read %s: %s" % (args.file,
                                              error.strerror or error)
            raise PamSignalError(message) from None
    config = load_config(args.config)
    sink = ConsoleSink("console", options={
        "format": "json" if args.json else "text"}, stream=stdout)
    pipeline = Pipeline([sink], config.detection, skip_unwatched=True)
    with stream:
        for line in stream:
            entry = None if line.isspace() else pipeline.decode(line)
            if entry is not None:
                pipeline.report(entry)
    sink.close()
    if pipeline.malformed and not pipeline.entries:
        raise PamSignalError("no journal entries found; export them with "
                             "`journalctl -o json`")
    return EXIT_OK


def command_check_config(args, stdout):
    config = load_config(args.config)
    if args.config is None and not os.path.exists(config.path):
        stdout.write("%s: no such file; built-in defaults apply\n"
                     % config.path)
    else:
        stdout.write("%s: OK (%d channel%s)\n" % (
            config.path, len(config.channels),
            "" if len(config.channels) == 1 else "s"))
    return EXIT_OK


def command_run(args, stdout):
    config = load_config(args.config)
    return Agent(config, build_sinks(config, args.json), args.config,
                 args.json).run()


def pid_alive(pid):
    """Whether a process with this PID exists (any owner)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def health_report(metrics, now_s, alive=pid_alive):
    """What `status` says, from the parsed metrics file: state is running,
    stopped (cleanly), gone (killed or crashed) or stale (hung)."""
    def value(name, default=0.0):
        samples = metrics.get(name)
        return samples[0][1] if samples else default

    def by_label(name, label):
        return collections.OrderedDict(
            (labels.get(label, ""), int(number))
            for labels, number in metrics.get(name, ()))

    written_s = value("pamsignal_metrics_time_seconds")
    pid = int(value("pamsignal_pid"))
    if value("pamsignal_running") != 1:
        state = "stopped"
    elif not alive(pid):
        state = "gone"
    elif now_s - written_s > METRICS_STALE_S:
        state = "stale"
    else:
        state = "running"
    info = metrics.get("pamsignal_info") or [({}, 0)]
    error = metrics.get("pamsignal_last_error_info")
    sent = by_label("pamsignal_alerts_sent_total", "channel")
    failed = by_label("pamsignal_alerts_failed_total", "channel")
    report = collections.OrderedDict((
        ("state", state), ("version", info[0][0].get("version")),
        ("pid", pid), ("written_s_ago", round(now_s - written_s, 1)),
        ("uptime_s", round(value("pamsignal_uptime_seconds"), 1)),
        ("entries", int(value("pamsignal_journal_entries_total"))),
        ("journal_lag_s", None if "pamsignal_journal_lag_seconds" not in
         metrics else round(value("pamsignal_journal_lag_seconds"), 1)),
        ("journalctl_restarts",
         int(value("pamsignal_journalctl_restarts_total"))),
        ("events", by_label("pamsignal_events_total", "action")),
        ("channels", collections.OrderedDict(
            (name, {"sent": sent.get(name, 0), "failed": failed.get(name, 0)})
            for name in sorted(set(sent) | set(failed)))),
        ("degraded", [component for component, flag in by_label(
            "pamsignal_degraded", "component").items() if flag]),
        ("reloads", by_label("pamsignal_config_reloads_total", "result")),
        ("last_error", error[0][0].get("message") if error else None),
        ("last_error_time", format_timestamp(int(value(
            "pamsignal_last_error_time_seconds") * 1e6)) if error else None),
    ))
    return report


_STATE_TEXT = {
    "running": "is running",
    "stopped": "is not running: it stopped cleanly",
    "gone": "is not running: it ended without stopping cleanly (killed or "
            "crashed)",
    "stale": "is not responding: its health was last written %s ago (hung?)",
}


def _duration_text(seconds):
    seconds = int(seconds)
    parts = [(seconds // 86400, "d"), (seconds // 3600 % 24, "h"),
             (seconds // 60 % 60, "m"), (seconds % 60, "s")]
    shown = [("%d%s" % part) for part in parts if part[0]]
    return " ".join(shown[:2]) or "0s"


def render_status(report, path):
    """`status` as text: one line per part, the state first."""
    state = _STATE_TEXT[report["state"]]
    if report["state"] == "stale":
        state %= _duration_text(report["written_s_ago"])
    lines = ["pamsignal %s %s (pid %d, up %s; health from %s, written %s ago)"
             % (report["version"], state, report["pid"],
                _duration_text(report["uptime_s"]), path,
                _duration_text(report["written_s_ago"]))]
    journal = "%d entries read" % report["entries"]
    if report["journal_lag_s"] is not None:
        journal += ", newest %s old" % _duration_text(report["journal_lag_s"])
    journal += ", journalctl restarted %d times" % report[
        "journalctl_restarts"]
    lines.append("journal:    " + journal)
    lines.append("events:     " + (", ".join(
        "%s %d" % item for item in report["events"].items()) or "none"))
    lines.append("channels:   " + (", ".join(
        "%s %d sent %d failed" % (name, counts["sent"], counts["failed"])
        for name, counts in report["channels"].items()) or "none"))
    lines.append("degraded:   " + (", ".join(report["degraded"]) or "no"))
    lines.append("reloads:    %d ok, %d failed" % (
        report["reloads"].get("ok", 0), report["reloads"].get("failed", 0)))
    if report["last_error"]:
        lines.append("last error: %s %s" % (report["last_error_time"],
                                            report["last_error"]))
    return "\n".join(escape_text(line) for line in lines) + "\n"


def command_status(args, stdout):
    config = load_config(args.config)
    path = metrics_path(config)
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        if args.json:
            stdout.write(dumps_safe({"state": "absent", "file": path}) + "\n")
        else:
            stdout.write("pamsignal is not running: no health file %s (has "
                         "the service run with this configuration?)\n" % path)
        return EXIT_FAILURE
    except (OSError, UnicodeDecodeError) as error:
        raise PamSignalError("cannot read %s: %s (the service's state is "
                             "readable by root)" % (
                                 path, getattr(error, "strerror", None) or
                                 error)) from None
    report = health_report(parse_metrics(text), time.time())
    if args.json:
        stdout.write(dumps_safe(dict(report, file=path)) + "\n")
    else:
        stdout.write(render_status(report, path))
    healthy = report["state"] == "running" and not report["degraded"]
    return EXIT_OK if healthy else EXIT_FAILURE


def command_stage_config(args, stdout):
    """Copy the configuration for the unit's sandboxed user (ExecStartPre=+
    and ExecReload=+ run this as root): DynamicUser cannot read a 0600
    root-owned file, so the copy goes into its own 0700 runtime directory,
    owned by it. A missing default file gives an empty copy (defaults)."""
    source = args.config or DEFAULT_CONFIG_PATH
    try:
        with open(source, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        if args.config is not None:
            raise PamSignalError("%s: no such file" % source) from None
        text = b""
    except OSError as error:
        raise PamSignalError("cannot read %s: %s" % (
            source, error.strerror or error)) from None
    directory = os.path.dirname(os.path.abspath(args.destination))
    try:
        owner = os.stat(directory)
        temporary = args.destination + ".tmp"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT |
                             os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            os.fchown(handle.fileno(), owner.st_uid, owner.st_gid)
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
        os.replace(temporary, args.destination)
    except OSError as error:
        raise PamSignalError("cannot write %s: %s" % (
            args.destination, error.strerror or error)) from None
    return EXIT_OK


#: pamsignal.service, as `install` writes it (the file at the top of the
#: source tree is this text; a test keeps the two the same).
SERVICE_UNIT = """\
# PAMSignal as a hardened service (`pamsignal install` writes this file).
# The configuration stays root's (/etc/pamsignal/pamsignal.conf, 0600): the
# "+" commands copy it, as root, into the service's own runtime directory,
# where its transient user can read it, at start and at each reload.
[Unit]
Description=PAMSignal login monitor
Documentation=man:pamsignal(8)
After=systemd-journald.service network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStartPre=+/usr/bin/pamsignal stage-config /run/pamsignal/pamsignal.conf
ExecStart=/usr/bin/pamsignal --config /run/pamsignal/pamsignal.conf run
ExecReload=+/usr/bin/pamsignal stage-config /run/pamsignal/pamsignal.conf
ExecReload=/bin/kill -HUP $MAINPID
WatchdogSec=60s
Restart=on-failure
RestartSec=5s
# A configuration error (exit 78) does not mend itself by restarting.
RestartPreventExitStatus=78
TimeoutStopSec=30s

DynamicUser=yes
SupplementaryGroups=systemd-journal
StateDirectory=pamsignal
StateDirectoryMode=0700
LogsDirectory=pamsignal
LogsDirectoryMode=0700
ConfigurationDirectory=pamsignal
ConfigurationDirectoryMode=0700
RuntimeDirectory=pamsignal
RuntimeDirectoryMode=0700
UMask=0077

# Channels need the network and /proc/net must stay readable: no
# PrivateNetwork=, IPAddressDeny= or ProcSubset=pid.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateIPC=yes
PrivateMounts=yes
PrivateUsers=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectClock=yes
ProtectHostname=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
DevicePolicy=closed
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6

[Install]
WantedBy=multi-user.target
"""

#: The program's path in SERVICE_UNIT; `install --prefix` replaces it.
UNIT_PROGRAM = DEFAULT_PREFIX + "/bin/pamsignal"


def example_config():
    """The configuration `install` writes when there is none: every key
    with its default, commented out, so it behaves like no file at all."""
    lines = ["# PAMSignal configuration, written by `pamsignal install`.",
             "# Every key is shown with its default. Check a change with",
             "# `pamsignal check-config`, apply it with",
             "# `systemctl reload pamsignal`. See pamsignal(8).", ""]
    for section, options in (("pamsignal", GLOBAL_OPTIONS),
                             ("detection", DETECTION_OPTIONS)):
        lines.append("[%s]" % section)
        lines += ["# %s = %s" % (key, default)
                  for key, (_, default) in options.items()]
        lines.append("")
    lines += ["# Without a [channel:NAME] section, events go to the console",
              "# (the service's journal):", "# [channel:console]",
              "# type = console", "# format = text", "# events = *"]
    return "\n".join(lines) + "\n"


def systemd_is_running():
    """Whether systemd is PID 1 here (what sd_booted(3) checks)."""
    return os.path.isdir("/run/systemd/system")


def install_paths(root, prefix):
    """Where install puts each file, below `root` (like DESTDIR)."""
    def under(path):
        return os.path.join(root, path.lstrip("/"))
    return {"program": under(prefix + "/bin/pamsignal"),
            "unit": under(SYSTEMD_UNIT_DIR + "/pamsignal.service"),
            "config_dir": under(os.path.dirname(DEFAULT_CONFIG_PATH)),
            "config": under(DEFAULT_CONFIG_PATH),
            "purge": [under(path) for path in (
                os.path.dirname(DEFAULT_CONFIG_PATH), "/var/lib/pamsignal",
                "/var/lib/private/pamsignal", "/var/log/pamsignal",
                "/var/log/private/pamsignal")]}


def _systemctl(stdout, *arguments):
    command = ["systemctl"] + list(arguments)
    stdout.write("running: %s\n" % " ".join(command))
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL,
                                timeout=120)
    except (OSError, subprocess.SubprocessError) as error:
        raise PamSignalError("%s failed: %s" % (" ".join(command),
                                                error)) from None
    if result.returncode != 0:
        raise PamSignalError("%s failed with status %d (see `journalctl -u "
                             "pamsignal`)" % (" ".join(command),
                                              result.returncode))


def command_install(args, stdout):
    root = os.path.abspath(args.root or "/")
    paths = install_paths(root, args.prefix)
    program = args.prefix + "/bin/pamsignal"
    try:
        with open(os.path.abspath(__file__), "rb") as handle:
            source = handle.read()
        os.makedirs(os.path.dirname(paths["program"]), exist_ok=True)
        replace_file(paths["program"], source.decode("utf-8"), mode=0o755)
        os.makedirs(os.path.dirname(paths["unit"]), exist_ok=True)
        replace_file(paths["unit"], SERVICE_UNIT.replace(UNIT_PROGRAM,
                                                         program), mode=0o644)
        os.makedirs(paths["config_dir"], mode=0o700, exist_ok=True)
        if os.path.lexists(paths["config"]):
            stdout.write("kept %s\n" % paths["config"])
        else:
            replace_file(paths["config"], example_config(), mode=0o600)
            stdout.write("wrote %s\n" % paths["config"])
    except OSError as error:
        raise PamSignalError("install failed: %s: %s" % (
            error.filename, error.strerror or error)) from None
    stdout.write("installed %s and %s\n" % (paths["program"], paths["unit"]))
    if root == "/" and systemd_is_running():
        _systemctl(stdout, "daemon-reload")
        _systemctl(stdout, "enable", "--now", "pamsignal.service")
        stdout.write("pamsignal is running: `pamsignal status`, "
                     "`journalctl -u pamsignal -f`\n")
    else:
        stdout.write("systemd is not managing %s: on the target system run\n"
                     "  systemctl daemon-reload\n"
                     "  systemctl enable --now pamsignal.service\n" % root)
    return EXIT_OK


def command_uninstall(args, stdout):
    root = os.path.abspath(args.root or "/")
    paths = install_paths(root, args.prefix)
    managed = root == "/" and systemd_is_running()
    if managed and os.path.exists(paths["unit"]):
        _systemctl(stdout, "disable", "--now", "pamsignal.service")
    removed = []
    try:
        for path in (paths["unit"], paths["program"]):
            if os.path.lexists(path):
                os.unlink(path)
                removed.append(path)
        if args.purge:
            for path in paths["purge"]:
                if os.path.islink(path):
                    os.unlink(path)
                    removed.append(path)
                elif os.path.isdir(path):
                    shutil.rmtree(path)
                    removed.append(path)
    except OSError as error:
        raise PamSignalError("uninstall failed: %s: %s" % (
            error.filename, error.strerror or error)) from None
    if managed:
        _systemctl(stdout, "daemon-reload")
    for path in removed:
        stdout.write("removed %s\n" % path)
    if not args.purge:
        kept = [path for path in paths["purge"] if os.path.lexists(path)]
        stdout.write("kept the configuration, state and logs (%s); "
                     "--purge removes them\n" % (", ".join(kept) or "none"))
    return EXIT_OK


COMMANDS = {"run": command_run, "scan": command_scan,
            "check-config": command_check_config, "status": command_status,
            "stage-config": command_stage_config,
            "install": command_install, "uninstall": command_uninstall}


def utf8_stdout():
    """Standard output as UTF-8 whatever the locale: under LANG=C (the
    default of Python 3.6 without a UTF-8 locale) a user name such as
    "josé" must not make the console channel fail and lose the event."""
    return open(sys.stdout.fileno(), "w", encoding="utf-8",
                errors="backslashreplace", closefd=False)


def main(argv=None, stdout=None):
    """The command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code
    if args.command is None:
        args.command, args.json = "run", False
    if stdout is None:
        stdout = utf8_stdout()
    try:
        return COMMANDS[args.command](args, stdout)
    except ConfigError as error:
        for problem in error.problems:
            say("error", str(problem))
        return error.exit_code
    except PamSignalError as error:
        say("error", str(error))
        return error.exit_code
    except BrokenPipeError:
        if args.command != "run":
            return EXIT_OK  # the reader went away: fine for `scan | head`
        say("error", "standard output was closed")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        try:
            stdout.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: nothing left to flush to


if __name__ == "__main__":
    sys.exit(main())
