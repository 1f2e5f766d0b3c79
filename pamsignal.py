#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""pamsignal - see who gets into this server, the moment they do.

Follows the systemd journal, recognises every SSH, sudo, su and console login
(and pkexec, doas, run0, Cockpit and gdm/lightdm/sddm logins) and every failed
attempt, and reports each as one event (Elastic Common Schema JSON, or a
readable line).

commands:
  run [--json]             follow the journal and report each event (default)
  scan [--json] [FILE|-]   read a `journalctl -o json` export (or stdin) and
                           print the events it holds; sends nothing
  report [--since WHEN] [--until WHEN] [--user U] [--source ADDR] [--json]
         [FILE|-]          who logged in, from where, for how long; failures,
                           detections, sudo and su (the journal, or an export)
  check-config             validate the configuration; exit 78 on problems
  test-alert [--channel NAME]
                           send a sample alert through each channel
  lookup [--json|--raw] [--db PATH] IP...|-
                           ASN, country and provider of addresses, from the
                           [geoip] databases or --db
  status [--json]          health and counters of the running service
  verify-log [--key-file F] [--head HASH | --journal] [FILE...]
                           verify the hash-chained audit log; exit 1 naming
                           the first changed, removed or reordered record
  install, uninstall       set this file up as a hardened systemd service
                           (--prefix, --root DIR; uninstall --purge)

examples:
  sudo python3 pamsignal.py
  sudo python3 pamsignal.py install
  journalctl -o json --since today | python3 pamsignal.py scan --json -
  sudo python3 pamsignal.py report --since=-7d

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
# The standard library only. What only some configurations or commands use
# is bound lazily (LazyModule): imported at its first use.
import argparse  # noqa: E402
import base64  # noqa: E402
import bisect  # noqa: E402
import collections  # noqa: E402
import configparser  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import fnmatch  # noqa: E402
import functools  # noqa: E402
import grp  # noqa: E402
import hashlib  # noqa: E402
import heapq  # noqa: E402
import hmac  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import marshal  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import pwd  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402


class LazyModule:
    """A standard module imported where it is first used. TLS, HTTP and
    e-mail cost about 10 MB resident that an agent without a network
    channel never needs; `urllib.request` and the like work as usual."""

    __slots__ = ("_name",)

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        module = importlib.import_module(self._name)
        try:
            return getattr(module, attribute)
        except AttributeError:  # a submodule not imported yet
            return importlib.import_module(self._name + "." + attribute)

    def __repr__(self):
        return "<lazy module %s>" % self._name


#: What sending through a channel imports (see enter_state_dir).
SENDING_MODULES = ("ssl", "http.client", "urllib.error", "urllib.parse",
                   "urllib.request", "smtplib", "email.errors",
                   "email.message", "email.utils")

#: Used by some configurations and commands only (see LazyModule).
calendar = LazyModule("calendar")
difflib = LazyModule("difflib")
email = LazyModule("email")
http = LazyModule("http")
smtplib = LazyModule("smtplib")
ssl = LazyModule("ssl")
textwrap = LazyModule("textwrap")
urllib = LazyModule("urllib")

# ---------------------------------------------------------------------------
# 2 constants
# ---------------------------------------------------------------------------
# Fixed facts the sections share: paths, exit codes, the journal fields
# read, limits and intervals. Constants of one section live in it.

#: Where the service looks for its configuration when --config is not given.
DEFAULT_CONFIG_PATH = "/etc/pamsignal/pamsignal.conf"

#: Exit codes of main(), as documented in the README and pamsignal(8).
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = 0, 1, 2, 78

#: What a channel's name is prefixed with, as a configuration section
#: ([channel:NAME]) and as a health component ("channel:NAME").
CHANNEL_PREFIX = "channel:"

#: Journal fields the parser reads; journalctl prints only these (plus cursor
#: and timestamps), which roughly doubles its throughput.
JOURNAL_FIELDS = ("MESSAGE", "SYSLOG_IDENTIFIER", "_PID", "_UID", "_COMM",
                  "_EXE", "_TRANSPORT", "_HOSTNAME", "_BOOT_ID",
                  "MESSAGE_ID", "N_DROPPED", "OBJECT_SYSTEMD_UNIT",
                  "_SYSTEMD_UNIT")

#: MESSAGE_ID of journald's own "Suppressed N messages from UNIT" entry,
#: written when a unit passed its rate limit and lines were dropped.
JOURNAL_DROPPED_MESSAGE_ID = "a596d6fe7bfa4994828e72309e95d61e"

#: Units whose lines carry logins (patterns): dropped lines of one of them
#: may be a login nobody saw. sshd (Debian, Fedora/EL, socket-activated),
#: sudo/su/doas in a login session's scope, consoles, logind, polkit,
#: Cockpit, display managers, run0's transient units.
LOGIN_UNITS = (
    "ssh.service", "sshd.service", "ssh@*.service", "sshd@*.service",
    "session-*.scope", "getty@*.service",
    "serial-getty@*.service", "console-getty.service",
    "container-getty@*.service", "systemd-logind.service",
    "polkit.service", "cockpit*.service", "gdm.service", "gdm3.service",
    "lightdm.service", "sddm.service", "run-p*-i*.service")

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

#: Networks, ASNs and countries remembered per user (the most recently
#: used kept).
MAX_NETWORKS_PER_USER = 32

#: Largest N of an "N in DURATION" threshold (each counter keeps N times).
MAX_THRESHOLD = 1000

#: Most user names remembered per counter for "which users were tried".
MAX_USERS_TRIED = 10

#: How often the detection state is saved when events came (and at
#: shutdown); a crash forgets at most this much counting.
DETECTION_FLUSH_S = 10.0

#: Keys (action, source, user) a channel remembers a cooldown for; past
#: this the soonest to end are let go, their held-back events kept.
MAX_COOLDOWN_KEYS = 10000

#: Sources and users a digest names; the rest are counted.
MAX_DIGEST_NAMES = 10

#: How long group memberships are trusted before the group database is
#: read again (for ignore_groups / always_groups).
GROUP_CACHE_S = 300.0

#: Units whose suppressions are counted by name in the metrics; the rest
#: (socket-activated sshd has one unit per connection) count as "other".
MAX_SUPPRESSED_UNITS = 64

#: Open sessions remembered for pairing; the oldest are forgotten first.
MAX_OPEN_SESSIONS = 10000

#: Transports through which the real services write (syslog(3), the native
#: journal API, or stdout of a unit); kernel and audit lines are never logins.
TRUSTED_TRANSPORTS = frozenset(("syslog", "journal", "stdout"))

#: ... and those trusted from a writer that is not root (the caller of a
#: setuid program): never stdout, which is a program's output, steered by
#: whoever started it (`systemd-cat sudo -p PROMPT` writes the prompt).
CALLER_TRANSPORTS = frozenset(("syslog", "journal"))

#: Directories a genuine service binary lives in; an unprivileged user cannot
#: put a program there, so `_EXE` in them cannot be faked.
TRUSTED_EXE_DIRS = frozenset((
    "/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin",
    "/usr/local/sbin", "/usr/lib/openssh", "/usr/libexec/openssh",
    "/usr/libexec", "/usr/lib/systemd", "/lib/systemd",
    # polkitd and its agent helper, Cockpit's session helper, sddm's
    # helper (Debian's multiarch directories).
    "/usr/lib/polkit-1", "/usr/libexec/polkit-1", "/usr/lib/policykit-1",
    "/usr/lib/cockpit",
    "/usr/libexec/cockpit", "/usr/lib/x86_64-linux-gnu/sddm",
    "/usr/lib/aarch64-linux-gnu/sddm"))

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

#: journald's native socket: without it no journald runs here, and
#: journalctl -f would wait for ever without a word.
JOURNAL_SOCKET = "/run/systemd/journal/socket"

#: What to do about it (%s: the socket's path).
JOURNALD_MISSING = ("no systemd-journald runs here (%s): start it "
                    "(systemctl start systemd-journald, or "
                    "/lib/systemd/systemd-journald in a container); waiting "
                    "for it")

#: Longest STATUS= text sent to systemd (it shows one line).
MAX_STATUS_CHARS = 240

#: Most of a metrics file `status` reads (the agent writes a few KiB).
MAX_METRICS_BYTES = 1024 * 1024

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
# One root, PamSignalError, whose exit_code main() returns; each kind of
# failure a subclass.


class PamSignalError(Exception):
    """Root of all errors the command line turns into an exit code."""
    exit_code = EXIT_FAILURE


class ConfigError(PamSignalError):
    """The configuration is unusable; carries every problem found."""
    exit_code = EXIT_CONFIG

    def __init__(self, problems):
        self.problems = list(problems)
        PamSignalError.__init__(self, "\n".join(str(p) for p in self.problems))


class DeliveryError(PamSignalError):
    """A channel did not take an alert. `permanent`: retrying cannot help
    (a bad token, a refused payload); `retry_after`: seconds the service
    asked to wait."""

    def __init__(self, reason, permanent=False, retry_after=None):
        PamSignalError.__init__(self, reason)
        self.permanent = permanent
        self.retry_after = retry_after


class UsageError(PamSignalError):
    exit_code = EXIT_USAGE


class SourceError(PamSignalError):
    """journalctl cannot be started at all."""


class StateError(PamSignalError):
    """The state directory cannot be created or written."""


class DatabaseError(PamSignalError):
    """A MaxMind DB file is unreadable, corrupt or hostile."""


# ---------------------------------------------------------------------------
# 4 small pure helpers
# ---------------------------------------------------------------------------
# Text made safe for terminals and JSON, times, IP addresses, journal
# values, channel names: small functions with no I/O that later sections
# use; and say(), the one helper that writes (a diagnostic on stderr).

#: Characters that must never reach a terminal raw: C0/C1 controls, DEL, and
#: Unicode format characters that reorder or hide text (bidi overrides, zero
#: width, line and paragraph separators, BOM).
_UNSAFE_CHARS = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e"
    "\u2060-\u206f\ufeff\ufff9-\ufffb]")


def channel_section(name):
    """A channel's name -> "channel:NAME" (its section, its component)."""
    return CHANNEL_PREFIX + name


def channel_named(section):
    """The NAME of "channel:NAME" (surrounding blanks dropped), or None
    when it names no channel."""
    if not section.startswith(CHANNEL_PREFIX):
        return None
    return section[len(CHANNEL_PREFIX):].strip() or None


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
#: The same escaping all but printable ASCII: its text is the same whenever
#: it has no \u escape (and looking for one is quicker than _UNSAFE_CHARS).
_JSON_ASCII_ENCODER = json.JSONEncoder(separators=(", ", ": "))
#: The two encoders' way with a single string (C functions).
_json_string = json.encoder.encode_basestring
_json_ascii_string = json.encoder.encode_basestring_ascii


def dumps_safe(obj):
    """JSON that is readable UTF-8 yet carries no raw control characters."""
    text = _JSON_ASCII_ENCODER.encode(obj)
    if "\\u" not in text:
        return text  # printable ASCII only: nothing to keep or to escape
    return _UNSAFE_CHARS.sub(_json_escape_char, _JSON_ENCODER.encode(obj))


#: Units of the durations in the configuration ("10m", "-1h", "7d").
_SECONDS_PER_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


#: The last moment RFC 3339 can write (9999-12-31T23:59:59.999999Z); a
#: journal entry claiming a later time is impossible (see parse_entry).
MAX_TIMESTAMP_US = 253402300799999999


def format_timestamp(timestamp_us):
    """Microseconds since the epoch -> RFC 3339 UTC with microseconds;
    a time outside 1970 to 9999 is shown as the nearest end."""
    seconds, micros = divmod(min(max(timestamp_us, 0), MAX_TIMESTAMP_US),
                             1000000)
    return "%s.%06dZ" % (_utc_second(seconds), micros)


@functools.lru_cache(maxsize=64)
def _utc_second(seconds):
    """YYYY-MM-DDTHH:MM:SS of a second: events come many to a second, and
    strftime costs more than the rest of an event's time."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


#: The last microsecond of the year 9999: the latest time read back from
#: a saved file (state, spool) may carry; it must still print as a date.
_LATEST_TIMESTAMP_US = 253402300799999999


def saved_time_us(value):
    """A time in microseconds read back from a saved file, or None when it
    is no whole number between 1970 and the year 9999."""
    return value if type(value) is int and \
        0 <= value <= _LATEST_TIMESTAMP_US else None


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
    if type(value) is str:  # nearly always: the quickest test first
        return value
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


# -- diagnostics: the one helper that writes (stderr, or the journal) ---------


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


# ---------------------------------------------------------------------------
# 5 model
# ---------------------------------------------------------------------------
# What flows through the pipeline: Event (immutable, every field named
# here), the actions there are (ACTIONS), and the event contract an event
# is rendered to (event_to_ecs).

#: Every field an event can carry. `context_key` and `pairing` are internal
#: and never rendered: the first ties lines of one process or session
#: together (boot, PID, service), the second says how an sshd line pairs
#: with the other lines of its connection (see SshAttempts).
EVENT_FIELDS = (
    "timestamp_us", "action", "reason", "severity", "user", "user_id",
    "target_user", "source_ip", "source_domain", "source_port",
    "destination_ip", "destination_port", "hostname", "service", "pid",
    "process_name", "process_executable", "command_line",
    "working_directory", "tty", "auth_method", "key", "certificate_id",
    "certificate_serial", "certificate_ca", "session_id",
    "session_duration_s", "attempts", "writer_uid", "claimed_action",
    "detail", "counted_by", "network", "window_s", "users_tried", "sources",
    "held_back", "repeat", "journal_time",
    "unit", "dropped", "login_record", "tty_kind",
    "source_as_number", "source_as_org", "source_country", "source_city",
    "source_network_type", "source_provider", "host_provider",
    "typed_lines", "typed_more",
    "cursor", "message", "context_key", "pairing")

_EventTuple = collections.namedtuple("Event", EVENT_FIELDS)
_EventTuple.__new__.__defaults__ = (None,) * len(EVENT_FIELDS)
#: Where each field is in an event.
_FIELD_INDEX = {name: index for index, name in enumerate(EVENT_FIELDS)}


class Event(_EventTuple):
    """One thing that happened, in the shape of the event contract.

    Immutable; stages add to it with `_replace`. Render with `event_to_ecs`.
    """
    __slots__ = ()

    def _replace(self, **changes):
        """The event with these fields changed: a copy and a few stores,
        where namedtuple's own maps every field through the changes (an
        event is changed at most stages, so this is paid many times)."""
        values = list(self)
        try:
            for name, value in changes.items():
                values[_FIELD_INDEX[name]] = value
        except KeyError as error:
            raise ValueError("an event has no field %s" % error) from None
        return tuple.__new__(Event, values)

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
    "ssh_probe": ("network", "connection", "unknown", 2),
    "source_throttled": ("network", "denied", "failure", 4),
    "key_file_refused": ("configuration", "info", "failure", 6),
    "alert_digest": ("intrusion_detection", "info", "unknown", 5),
    "alerts_dropped": ("intrusion_detection", "info", "failure", 6),
    "journal_suppressed": ("host", "info", "failure", 8),
    "unaccounted_session": ("session", "start", "unknown", 8),
    "config_reload_failed": ("configuration", "change", "failure", 6),
    "monitoring_degraded": ("process", "change", "failure", 7),
    "monitoring_restored": ("process", "change", "success", 3),
    "report_summary": ("host", "info", "success", 2),
}

#: What a small server does not alert on by default: it is counted (and
#: detected as brute force), not sent one by one.
ROUTINE_ACTIONS = frozenset(("login_failure", "session_opened",
                             "session_closed", "ssh_probe",
                             "source_throttled"))

#: The actions the parser gives; detection, policy and the runtime add
#: the others.
PARSED_ACTIONS = frozenset(("login_success", "login_failure",
                            "session_opened", "session_closed",
                            "sudo_command", "spoofed_entry", "ssh_probe",
                            "source_throttled", "key_file_refused",
                            "journal_suppressed"))

#: What the agent says about itself: its configuration and its own health.
AGENT_ACTIONS = frozenset(("config_reload_failed", "monitoring_degraded",
                           "monitoring_restored"))

#: Never held back by a cooldown or a rate limit: access that was granted,
#: so no flood of failures can delay the news that someone got in, and the
#: agent's rare word about its own health. A flood is exactly when logins
#: may go unseen, so what says so is never held back either.
NEVER_HELD_ACTIONS = frozenset(("login_success", "sudo_command",
                                "success_after_failures", "new_source",
                                "new_sudo_user", "journal_suppressed",
                                "unaccounted_session")) | AGENT_ACTIONS


#: Never folded into a digest of repeats, however alike: the agent's word
#: about itself, and what says logins went unseen (each names its own unit
#: or session).
NEVER_FOLDED = AGENT_ACTIONS | frozenset(("journal_suppressed",
                                          "unaccounted_session"))


#: (ECS path, Event field) in the order they are rendered.
_ECS_LAYOUT = (
    ("event.reason", "reason"),
    ("user.name", "user"), ("user.id", "user_id"),
    ("user.target.name", "target_user"),
    ("source.ip", "source_ip"), ("source.domain", "source_domain"),
    ("source.port", "source_port"),
    ("source.as.number", "source_as_number"),
    ("source.as.organization.name", "source_as_org"),
    ("source.geo.country_iso_code", "source_country"),
    ("source.geo.city_name", "source_city"),
    ("destination.ip", "destination_ip"),
    ("destination.port", "destination_port"),
    ("host.hostname", "hostname"), ("cloud.provider", "host_provider"),
    ("service.name", "service"),
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
    ("pamsignal.sources", "sources"), ("pamsignal.held_back", "held_back"),
    ("pamsignal.repeat", "repeat"),
    ("pamsignal.journal_time", "journal_time"),
    ("pamsignal.unit", "unit"), ("pamsignal.dropped", "dropped"),
    ("pamsignal.login_record", "login_record"),
    ("pamsignal.tty_kind", "tty_kind"),
    ("pamsignal.source_network_type", "source_network_type"),
    ("pamsignal.source_provider", "source_provider"),
    ("pamsignal.typed_lines", "typed_lines"),
    ("pamsignal.typed_more", "typed_more"),
    ("pamsignal.cursor", "cursor"),
)

#: The layout as (field index, parent objects, leaf name), computed once.
_ECS_PLAN = tuple((EVENT_FIELDS.index(field), tuple(path.split(".")[:-1]),
                   path.split(".")[-1]) for path, field in _ECS_LAYOUT)


def event_severity(event):
    """0 to 10: the event's own, or its action's default."""
    return ACTIONS[event.action][3] if event.severity is None \
        else event.severity


def event_to_ecs(event):
    """The event as the nested ECS object of the event contract (no nulls)."""
    category, kind, outcome, _ = ACTIONS[event.action]
    ecs = {"@timestamp": format_timestamp(event.timestamp_us),
           "event": {"action": event.action, "category": [category],
                     "type": [kind], "outcome": outcome,
                     "severity": event_severity(event)}}
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
# The option tables (one per section: key -> default, check, help), the
# checks they name, parse_config(text) -> Config, and what only a root
# run checks: files others could change, secrets others could read.

Config = collections.namedtuple(
    "Config", "path state_dir log_dir first_start journalctl host_provider "
    "spool_max_alerts spool_max_age metrics_file channels detection alerts "
    "geoip audit report")
Config.__doc__ = "The validated configuration; `channels` is a tuple."

ChannelConfig = collections.namedtuple("ChannelConfig",
                                       "name type policy options")

AlertPolicy = collections.namedtuple(
    "AlertPolicy", "events min_severity ignore_users ignore_groups "
    "ignore_sources always_users always_groups always_sources cooldown "
    "rate_limit repeats")
AlertPolicy.__doc__ = """Which events a channel alerts on and how often:
[alerts] gives the default, a channel's own keys override it."""

#: N failures within window_s seconds (window_s 0: the rule is off).
Threshold = collections.namedtuple("Threshold", "attempts window_s")

#: A rule that is off.
NO_THRESHOLD = Threshold(0, 0)

DetectionConfig = collections.namedtuple(
    "DetectionConfig", "brute_force_fast brute_force_slow user_enumeration "
    "distributed_attack success_after_failures learning_period "
    "login_records ssh_probes tty_audit")

#: The MaxMind DB files of [geoip]; None where a field is off.
GeoipConfig = collections.namedtuple("GeoipConfig",
                                     "asn_db country_db city_db")

#: [audit]: the hash-chained audit log (sizes in bytes, times in seconds;
#: 0 is off).
AuditConfig = collections.namedtuple(
    "AuditConfig", "enabled key rotate_size rotate_age retention "
    "anchor_every anchor_interval")

#: [report]: the channels `report --send-configured` (the daily timer)
#: sends the summary to.
ReportConfig = collections.namedtuple("ReportConfig", "send_to retry_for")

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


#: Control characters: never in a path, a program name or a line of text.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def _absolute_path(value):
    if not value.startswith("/"):
        raise ValueError("expected an absolute path, got %r" % value)
    if _CONTROL_CHARACTERS.search(value):
        raise ValueError("expected an absolute path without control "
                         "characters, got %r" % value)
    return os.path.normpath(value)


def _optional_path(value):
    return _absolute_path(value) if value else None


def _login_records(value):
    """auto, off, or the login records files (wtmp or wtmpdb) to read."""
    if value.lower() in ("auto", "off"):
        return "auto" if value.lower() == "auto" else ()
    paths = tuple(path.strip() for path in value.split(","))
    for path in paths:
        if not path.startswith("/") or _CONTROL_CHARACTERS.search(path):
            raise ValueError("expected auto, off or absolute paths of "
                             "wtmp or wtmpdb files, got %r" % path)
    return paths


_PROVIDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._&/()-]{0,63}\Z")


def _host_provider(value):
    """auto (from DMI), none, or the provider's name as it should show."""
    if value.lower() in ("auto", "none"):
        return value.lower()
    if not _PROVIDER_NAME.match(value):
        raise ValueError("expected auto, none or a provider name (letters, "
                         "digits, spaces, ._&/()-), got %r" % value)
    return value
def _metrics_file(value):
    """An absolute path, or empty for the default in the state directory."""
    return _absolute_path(value) if value else ""


def _program_path(value):
    if not value or _CONTROL_CHARACTERS.search(value) or (
            "/" in value and not value.startswith("/")):
        raise ValueError("expected a program name or an absolute path, "
                         "without control characters, got %r" % value)
    return value


_RELATIVE_START = re.compile(r"^-\d{1,6}[smhd]$")


def _first_start(value):
    value = value.strip().lower()
    if value in ("now", "boot", "all") or _RELATIVE_START.match(value):
        return value
    raise ValueError("expected now, boot, all or a time back such as -1h "
                     "(s, m, h or d), got %r" % value)


def _event_filter(value):
    """Actions, read left to right: `*` (all), `default` (all but the
    routine ones), a name to add, `-name` to take one away."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    chosen = set()
    for name in names:
        if name == "*":
            chosen |= set(ACTIONS)
        elif name == "default":
            chosen |= set(ACTIONS) - ROUTINE_ACTIONS
        elif name.lstrip("-") in ACTIONS:
            (chosen.discard if name[0] == "-" else chosen.add)(
                name.lstrip("-"))
        else:
            raise ValueError(
                "expected *, default or a comma-separated list of actions "
                "(-action leaves one out): %s; got %r"
                % (", ".join(sorted(ACTIONS)), name))
    if not names:
        raise ValueError("expected *, default or a list of actions, got "
                         "nothing")
    return frozenset(chosen)


def _severity(value):
    if not re.match(r"^\d{1,2}$", value) or int(value) > 10:
        raise ValueError("expected a severity from 0 to 10, got %r" % value)
    return int(value)


_ACCOUNT_PATTERN = re.compile(r"^[\w.*?\[\]$@-]+$")


def _names(value):
    """A comma-separated list of user or group names (shell patterns
    such as deploy-* allowed)."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    bad = [name for name in names if not _ACCOUNT_PATTERN.match(name)]
    if bad:
        raise ValueError("expected comma-separated names (patterns such as "
                         "deploy-* allowed), got %r" % bad[0])
    return names


def _networks(value):
    """A comma-separated list of addresses or CIDR blocks."""
    networks = []
    for text in (part.strip() for part in value.split(",")):
        if not text:
            continue
        try:
            network = ipaddress.ip_network(text, strict=False)
            mapped = getattr(network.network_address, "ipv4_mapped", None)
            if mapped is not None and network.prefixlen >= 96:
                # sources are normalised to plain IPv4: match them so
                network = ipaddress.ip_network(
                    "%s/%d" % (mapped, network.prefixlen - 96))
            networks.append(network)
        except ValueError:
            raise ValueError("expected addresses or CIDR blocks such as "
                             "192.0.2.0/24 or 2001:db8::/32, got %r"
                             % text) from None
    return tuple(networks)


def _cooldown(value):
    return 0 if value.strip().lower() == "off" else _duration_s(value)


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


class Secret:
    """A token, password or secret URL. Its repr never shows the value, so
    no log line or error can leak it; written as `credential:NAME` it is
    read from the systemd credential NAME when the config is loaded."""

    __slots__ = ("value", "credential")

    def __init__(self, value, credential=None):
        self.value = value
        self.credential = credential

    def __repr__(self):
        return "Secret(%s)" % ("credential:" + self.credential
                               if self.credential else "***")

    __str__ = __repr__


_CREDENTIAL = re.compile(r"^credential:(?!\.\.?$)([A-Za-z0-9_.@-]{1,128})$")


def _credential_name(value):
    """NAME of credential:NAME, or None for a value that is no credential;
    a bad NAME is an error, never a secret or path written as it is."""
    credential = _CREDENTIAL.match(value)
    if credential:
        return credential.group(1)
    if value.startswith("credential:"):
        raise ValueError("invalid credential name %r, expected "
                         "credential:NAME, NAME of 1 to 128 letters, digits "
                         "and _.@- (not . or ..)"
                         % value[len("credential:"):])
    return None


def _secret(value):
    """A secret written in the file, or credential:NAME."""
    credential = _credential_name(value)
    if credential:
        return Secret(None, credential)
    if not value or re.search(r"[\s\x00-\x1f\x7f]", value):
        raise ValueError("expected a secret without spaces, or "
                         "credential:NAME for a systemd credential")
    return Secret(value)


def is_loopback_host(host):
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url):
    """An http(s) URL a channel may post to: https, or http only to this
    host itself (loopback), so nothing leaves the host unencrypted."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        host, parts = None, None
    if parts is None or not host or re.search(r"[\s\x00-\x1f\x7f]", url):
        raise ValueError("expected an http(s) URL, got something else")
    if parts.scheme == "https" or (parts.scheme == "http" and
                                   is_loopback_host(host)):
        return url
    raise ValueError("expected an https:// URL (http:// only to a loopback "
                     "address), got a %s:// URL to %s" % (parts.scheme, host))


def _url(value):
    return check_url(value)


def _secret_url(value):
    """A URL that is itself the credential (Slack, Discord, Teams...)."""
    secret = _secret(value)
    if secret.value is not None:
        check_url(secret.value)
    return secret


def _timeout(value):
    seconds = _duration_s(value)
    if not 1 <= seconds <= 300:
        raise ValueError("expected a timeout from 1s to 300s, got %r"
                         % value)
    return seconds


def _template(value):
    """Alert text with {placeholders}; \\n writes a new line."""
    unknown = sorted(set(_PLACEHOLDER.findall(value)) -
                     set(TEMPLATE_FIELDS))
    if unknown:
        raise ValueError("unknown placeholder {%s}; expected some of: %s"
                         % (unknown[0], ", ".join(
                             "{%s}" % name for name in TEMPLATE_FIELDS)))
    return value.replace("\\n", "\n")


def _chat_id(value):
    if not re.match(r"^(?:-?\d{1,20}|@[A-Za-z][A-Za-z0-9_]{4,31})$", value):
        raise ValueError("expected a numeric chat id (such as -1001234567) "
                         "or @channelname, got %r" % value)
    return value


#: One extra HTTP header of a webhook: its name, the text before a
#: credential:NAME (such as "Bearer "), and its value as a Secret.
Header = collections.namedtuple("Header", "name prefix secret")

#: An HTTP header name (RFC 9110 token characters).
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")

#: Headers pamsignal sets itself: the body's framing, where it goes, who
#: sends it, and the Standard Webhooks signature, which no configured
#: header may replace.
RESERVED_HEADERS = frozenset((
    "host", "content-length", "content-type", "transfer-encoding",
    "connection", "user-agent", "webhook-id", "webhook-timestamp",
    "webhook-signature"))

_HEADER_CREDENTIAL = re.compile(r"^(.*?)(credential:\S*)$")


def _header_value(value):
    """A header value: printable ASCII, never a line break (which would
    start a header or a body of its own); http.client could not send
    other characters at all."""
    if not value or re.search(r"[^\t\x20-\x7e]", value):
        raise ValueError("expected a header value of printable ASCII, "
                         "without line breaks or control characters")
    return value


def _headers(value):
    """One `Name: value` a line (the next ones indented, as configparser
    continues a value). A value may end in credential:NAME (such as
    `Bearer credential:hook-token`); values count as secrets. Not `;`
    between them: " ;" starts a comment in this file."""
    headers, seen = [], set()
    for line in value.split("\n"):
        if not line.strip():
            continue
        name, colon, text = line.partition(":")
        name, text = name.strip(), text.strip(" \t")
        if not colon or not _HEADER_NAME.match(name):
            raise ValueError("expected one Name: value a line, with header "
                             "names of letters, digits and "
                             "!#$%%&'*+.^_`|~-, got %r" % name)
        if name.lower() in RESERVED_HEADERS or name.lower() in seen:
            raise ValueError("header %s is set by pamsignal itself or "
                             "given twice" % name)
        seen.add(name.lower())
        try:
            _header_value(text)
        except ValueError as error:
            raise ValueError("header %s: %s" % (name, error)) from None
        credential = _HEADER_CREDENTIAL.match(text)
        if credential:
            headers.append(Header(name, credential.group(1),
                                  _secret(credential.group(2))))
        else:
            headers.append(Header(name, "", Secret(text)))
    if not headers:
        raise ValueError("expected one Name: value a line")
    return tuple(headers)


def option_secrets(value):
    """The Secrets an option's value holds: itself, or its headers'."""
    if isinstance(value, Secret):
        return [value]
    if isinstance(value, tuple):
        return [part.secret for part in value if isinstance(part, Header)]
    return []


def _phone_numbers(value):
    """WhatsApp recipients: comma-separated E.164 numbers without the +."""
    numbers = tuple(part.strip() for part in value.split(",")
                    if part.strip())
    bad = [number for number in numbers
           if not re.match(r"^[1-9]\d{6,14}$", number)]
    if bad or not numbers:
        raise ValueError("expected phone numbers in E.164 without the + "
                         "(such as 4915112345678), comma-separated, got %r"
                         % (bad or [value])[0])
    return numbers


def _matching(pattern, expected):
    """A validator for a key whose whole value must match `pattern`."""
    def validate(value):
        if not re.match(pattern + r"\Z", value):
            raise ValueError("expected %s, got %r" % (expected, value))
        return value
    return validate


_phone_number_id = _matching(r"\d{1,20}", "the numeric phone number id of "
                             "the WhatsApp Business account")
_graph_version = _matching(r"v\d{1,3}\.\d{1,2}",
                           "a Graph API version such as v23.0")


def _routing_key(value):
    """A PagerDuty Events API v2 integration key: 32 characters."""
    secret = _secret(value)
    if secret.value is not None and not re.match(r"^[A-Za-z0-9]{32}$",
                                                 secret.value):
        raise ValueError("expected the 32-character integration key of a "
                         "PagerDuty Events API v2 integration, or "
                         "credential:NAME")
    return secret


_EMAIL_ADDRESS = re.compile(r"^[^@\s<>,;\"]{1,64}@[A-Za-z0-9.-]{1,253}$")


def _email_addresses(value):
    addresses = tuple(part.strip() for part in value.split(",")
                      if part.strip())
    bad = [a for a in addresses if not _EMAIL_ADDRESS.match(a)]
    if bad or not addresses:
        raise ValueError("expected comma-separated e-mail addresses such as "
                         "admin@example.com, got %r" % (bad or [value])[0])
    return addresses


def _email_address(value):
    (address,) = _email_addresses(value) if "," not in value else (None,)
    if address is None:
        raise ValueError("expected one e-mail address, got %r" % value)
    return address


def _host(value):
    if not _HOST_NAME.match(value) and not is_loopback_host(value):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError("expected a host name or address, got %r"
                             % value) from None
    return value


def _port(value):
    port = parse_port(value)
    if not port:
        raise ValueError("expected a port from 1 to 65535, got %r" % value)
    return port


def _smtp_security(value):
    if value not in ("starttls", "tls", "none"):
        raise ValueError("expected starttls, tls or none, got %r" % value)
    return value


#: A syslog collector: transport, host (name, IPv4, [IPv6]) and port.
SyslogTarget = collections.namedtuple("SyslogTarget", "transport host port")

_SYSLOG_TARGET = re.compile(r"^(udp|tcp|tls)://(?:\[([0-9A-Fa-f:.]+)\]|"
                            r"([^\s/:\[\]]+)):(\d{1,5})$")


def _syslog_target(value):
    match = _SYSLOG_TARGET.match(value)
    try:
        if not match:
            raise ValueError
        host = match.group(2) or match.group(3)
        if match.group(2):
            ipaddress.IPv6Address(host)
        return SyslogTarget(match.group(1), _host(host),
                            _port(match.group(4)))
    except ValueError:
        raise ValueError("expected udp://HOST:PORT, tcp://HOST:PORT or "
                         "tls://HOST:PORT (an IPv6 address in brackets), "
                         "got %r" % value) from None


def _one_of(*choices):
    """A validator for a key that takes one of a few words."""
    def validate(value):
        if value not in choices:
            raise ValueError("expected %s, got %r" % (
                " or ".join(choices), value))
        return value
    return validate


#: Syslog facilities by name (RFC 5424 numbers).
SYSLOG_FACILITIES = dict(
    [("user", 1), ("daemon", 3), ("auth", 4), ("authpriv", 10),
     ("audit", 13)] +
    [("local%d" % number, 16 + number) for number in range(8)])


def _facility(value):
    if value not in SYSLOG_FACILITIES:
        raise ValueError("expected one of %s, got %r" % (", ".join(sorted(
            SYSLOG_FACILITIES, key=SYSLOG_FACILITIES.get)), value))
    return SYSLOG_FACILITIES[value]


def _app_name(value):
    """An RFC 5424 APP-NAME that is also a valid RFC 3164 TAG."""
    if not re.match(r"^[A-Za-z0-9_.-]{1,32}$", value):
        raise ValueError("expected 1 to 32 letters, digits or _.-, got %r"
                         % value)
    return value


def _syslog_hostname(value):
    if not re.match(r"^[\x21-\x7e]{1,255}$", value):
        raise ValueError("expected a host name of printable ASCII without "
                         "spaces, got %r" % value)
    return value


def _yes_no(value):
    if value.lower() not in ("yes", "no"):
        raise ValueError("expected yes or no, got %r" % value)
    return value.lower() == "yes"


def _plain_text(value):
    if re.search(r"[\x00-\x1f\x7f]", value):
        raise ValueError("expected text without control characters")
    return value


def _spool_size(value):
    if not re.match(r"^\d{1,7}$", value) or not 1 <= int(value) <= 1000000:
        raise ValueError("expected a number of alerts from 1 to 1000000, "
                         "got %r" % value)
    return int(value)


#: One configuration key: its check (text -> value, or ValueError), its
#: default as written in the file, and its help. The example configuration
#: and the key sections of pamsignal.conf(5) are made from these
#: (CONFIG_SECTIONS; `make docs`). Help is plain text; a line that starts with
#: two spaces is kept as it is (a list).
Option = collections.namedtuple("Option", "check default help")

#: [pamsignal] keys.
GLOBAL_OPTIONS = collections.OrderedDict((
    ("state_dir", Option(
        _absolute_path, "/var/lib/pamsignal",
        "Where the journal cursor, open sessions, failure counters, each "
        "channel's spool and the metrics are kept; created with mode 0700 "
        "if missing. If it cannot be written at start the agent stops with "
        "a clear error; if it stops being writable later, the agent goes "
        "on, degraded.")),
    ("log_dir", Option(
        _absolute_path, "/var/log/pamsignal",
        "Where the audit log is kept (see [audit]).")),
    ("first_start", Option(
        _first_start, "now",
        "Where to begin when there is no saved cursor (the very first "
        "start):\n"
        "  now   only what happens from now on\n"
        "  boot  everything since this boot\n"
        "  all   everything the journal still holds\n"
        "  -1h   a time back: a number and s, m, h or d")),
    ("journalctl", Option(
        _program_path, "journalctl",
        "The journalctl program to run (a name on PATH, or an absolute "
        "path).")),
    ("spool_max_alerts", Option(
        _spool_size, "1000",
        "While a channel is unreachable its alerts wait in a spool under "
        "state_dir/spool/NAME/: at most this many (1 to 1000000). A full "
        "spool drops by value: repeats, digests and routine alerts first, "
        "a root login, a success after failures or a forgery last. What is "
        "dropped (which kinds, users and sources) is reported once delivery "
        "works again.")),
    ("spool_max_age", Option(
        _duration_s, "7d",
        "Alerts older than this are dropped from a spool, and reported.")),
    ("host_provider", Option(
        _host_provider, "auto",
        "This server's provider, shown as cloud.provider on each event:\n"
        "  auto  read from /sys/class/dmi/id (no network call)\n"
        "  none  leave it out\n"
        "  NAME  any name, e.g. \"Home lab\"\n"
        "auto knows AWS, Google Cloud, Azure, DigitalOcean, Hetzner, OVH and "
        "Vultr, among others.")),
    ("metrics_file", Option(
        _metrics_file, "",
        "Health metrics (Prometheus text format), rewritten every 10 "
        "seconds and read by `pamsignal status`; an absolute path. Empty: "
        "pamsignal.prom in state_dir.")),
))


def _switch(value):
    if value.lower() in ("yes", "on", "true", "1"):
        return True
    if value.lower() in ("no", "off", "false", "0"):
        return False
    raise ValueError("expected yes or no, got %r" % value)


_SIZE = re.compile(r"^(\d{1,9})([KMG]?)$")


def _size_bytes(value):
    match = _SIZE.match(value.strip().upper())
    if not match or not int(match.group(1)):
        raise ValueError("expected a size such as 500K, 10M or 1G, got %r"
                         % value)
    return int(match.group(1)) * 1024 ** " KMG".index(
        match.group(2) or " ")


def _audit_key(value):
    """Empty (no key), credential:NAME or an absolute path."""
    if not value or _credential_name(value):
        return value
    return _absolute_path(value)


def _record_count(value):
    if value.strip().lower() == "off":
        return 0
    if not re.match(r"^\d{1,7}$", value) or not int(value):
        raise ValueError("expected a number of records or off, got %r"
                         % value)
    return int(value)


#: [audit] keys. Retention 90 days: CIS Controls v8 8.10 asks for at
#: least 90 days of audit logs.
AUDIT_OPTIONS = collections.OrderedDict((
    ("enabled", Option(
        _switch, "yes",
        "Every event and every alert decision (sent, spooled, filtered or "
        "held back by which rule, failed) goes to log_dir/audit.jsonl, "
        "each record chained to the one before by SHA-256, so an edit, a "
        "removed, inserted or reordered record shows. Check it with "
        "`pamsignal verify-log --journal`. no keeps no audit log.")),
    ("key", Option(
        _audit_key, "",
        "An HMAC key makes the chain unforgeable by whoever can write the "
        "log but not read the key: credential:NAME (a systemd credential, "
        "LoadCredential= in the unit) or a root-owned 0600 regular file "
        "(not a symlink) outside log_dir, in directories only root can "
        "change, at least 16 bytes; never logged. Make one with:\n"
        "    head -c 32 /dev/urandom | base64 > /etc/pamsignal/audit.key\n"
        "Empty: plain SHA-256 (anchors still catch a rewritten or cut "
        "log).")),
    ("rotate_size", Option(
        _size_bytes, "10M",
        "A new file when this one reaches this size (K, M, G); each "
        "rotated file, audit-YYYYMMDDTHHMMSSZ-SEQ.jsonl, goes on from the "
        "last hash of the one before.")),
    ("rotate_age", Option(
        _cooldown, "1d",
        "A new file when this one is this old; off rotates by size only.")),
    ("retention", Option(
        _cooldown, "90d",
        "Rotated files older than this are removed, and the removal is "
        "recorded in the log (so verify-log accepts the gap). 90d is CIS "
        "Controls v8 safeguard 8.10's minimum; NIST SP 800-53 AU-11 leaves "
        "the period to the organisation; PCI DSS asks for 365d; off keeps "
        "them for ever.")),
    ("anchor_every", Option(
        _record_count, "100",
        "The head (last hash) is written to the journal (MESSAGE_ID "
        "c4e1a13543184b559638dfda03ddef47, PAMSIGNAL_AUDIT_SEQ, "
        "PAMSIGNAL_AUDIT_HEAD) every this many records (once they are on "
        "disk), and at stop; off: only at stop and by anchor_interval. "
        "Forward the journal off the host to keep the anchors out of an "
        "intruder's reach.")),
    ("anchor_interval", Option(
        _cooldown, "10m",
        "... and at least this often while records come. An anchor the "
        "journal refuses is tried again by the same two rules.")),
))

#: [geoip] keys; empty means off.
GEOIP_OPTIONS = collections.OrderedDict((
    ("asn_db", Option(
        _optional_path, "",
        "An ASN database (GeoLite2-ASN, DB-IP Lite ASN, IPinfo): "
        "source.as.number and source.as.organization.name, and so the "
        "provider (cloud or other).")),
    ("country_db", Option(
        _optional_path, "",
        "A country database (GeoLite2-Country, DB-IP Lite Country, "
        "IPinfo): source.geo.country_iso_code.")),
    ("city_db", Option(
        _optional_path, "",
        "A city database (GeoLite2-City): also source.geo.city_name, and "
        "the country.")),
))

def _channel_names(value):
    """A comma-separated list of [channel:NAME] names."""
    return tuple(name.strip() for name in value.split(",") if name.strip())


#: [report] keys.
REPORT_OPTIONS = collections.OrderedDict((
    ("send_to", Option(
        _channel_names, "",
        "The channels (names of [channel:NAME] sections, comma-separated) "
        "that the daily summary goes to: pamsignal-report.timer runs "
        "`pamsignal report --since yesterday --until today "
        "--send-configured` once enabled with `systemctl enable --now "
        "pamsignal-report.timer`. telegram, slack, discord, teams, ntfy, "
        "gotify, whatsapp and webhook get the text cut to their message "
        "limit; email gets it whole. Empty: the timer's run says so and "
        "fails.")),
    ("retry_for", Option(
        _cooldown, "10m",
        "A channel that fails is retried (as alerts are) for this long; "
        "then the summary waits in state_dir/report-spool and the next run "
        "sends it first. off: one attempt.")),
))

#: [detection] keys.
DETECTION_OPTIONS = collections.OrderedDict((
    ("brute_force_fast", Option(
        _threshold, "5 in 10m",
        "A brute force: this many failures from one source, /64 or account "
        "within this window.")),
    ("brute_force_slow", Option(
        _threshold, "20 in 24h",
        "The same over a long window, for slow and patient attacks.")),
    ("user_enumeration", Option(
        _threshold, "10 in 10m",
        "This many different invalid user names from one source or /64.")),
    ("distributed_attack", Option(
        _threshold, "10 in 1h",
        "One account failing from this many different sources.")),
    ("success_after_failures", Option(
        _threshold, "3 in 1h",
        "A successful login after this many recent failures from its "
        "source or for its account is alerted on its own "
        "(success_after_failures).")),
    ("learning_period", Option(
        _duration_s, "7d",
        "New networks per user (new_source) and first sudo users "
        "(new_sudo_user) are learned silently for this long after the "
        "first event seen.")),
    ("login_records", Option(
        _login_records, "auto",
        "The login records, a second witness: a session sshd or login "
        "recorded there with no login seen in the journal (lost to "
        "journald's rate limit during a flood, or removed) raises "
        "unaccounted_session. auto reads wtmpdb's /var/lib/wtmpdb/wtmp.db "
        "where it exists (Debian 13), else /var/log/wtmp; or name the "
        "files (absolute paths, comma-separated; the kind is told by the "
        "content); off reads none.")),
    ("ssh_probes", Option(
        _threshold, "off",
        "Pre-authentication probes (ssh_probe: no SSH banner, garbage, no "
        "common algorithm, timeout before login) from one source that make "
        "a brute_force_detected (reason repeated_probes): counted only when "
        "set, such as 20 in 10m; a scanner is no login attempt.")),
    ("tty_audit", Option(
        _switch, "no",
        "What root typed in its sessions, from the kernel's TTY audit "
        "records (pam_tty_audit; see the README): yes reads them from the "
        "journal and adds the command lines to each session_closed and to "
        "`report`; takes effect at the next start.")),
))

#: [alerts] keys, which a [channel:NAME] may override. The defaults fit a
#: small server: everything but the routine, one alert per attack and key
#: every 10 minutes, at most 20 a minute, and at most 3 identical accesses
#: (the same sudo command) per 10 minutes.
ALERT_OPTIONS = collections.OrderedDict((
    ("events", Option(
        _event_filter, "default",
        "Which actions alert, read left to right: * (all), default (all "
        "but the routine login_failure, session_opened, session_closed, "
        "ssh_probe and source_throttled), a name to add one, -name to "
        "leave one out. The actions: %s." % ", ".join(sorted(ACTIONS)))),
    ("min_severity", Option(
        _severity, "0",
        "Only events of at least this severity (0 to 10) alert.")),
    ("ignore_users", Option(
        _names, "",
        "Never alert on these users: the account logged into, or the "
        "person running sudo or su; comma-separated, shell patterns such "
        "as deploy-* work.")),
    ("ignore_groups", Option(
        _names, "",
        "Never alert on members of these groups (names or patterns).")),
    ("ignore_sources", Option(
        _networks, "",
        "Never alert on these source addresses and CIDR blocks (IPv4 and "
        "IPv6), comma-separated.")),
    ("always_users", Option(
        _names, "",
        "Always alert on these users, whatever the keys above say.")),
    ("always_groups", Option(
        _names, "",
        "Always alert on members of these groups, whatever the keys above "
        "say.")),
    ("always_sources", Option(
        _networks, "",
        "Always alert on these addresses and CIDR blocks, whatever the "
        "keys above say.")),
    ("cooldown", Option(
        _cooldown, "10m",
        "Repeats of one thing (the same action from the same source, or "
        "for the same account) are held back this long after the first is "
        "sent; then one alert_digest tells how many were held, from where. "
        "off sends each.")),
    ("rate_limit", Option(
        _threshold, "20 in 1m",
        "Most alerts a channel sends in a window; past it, one digest per "
        "window until the flood stops. Logins, sudo commands and "
        "suspicious successes are never held back by the cooldown or the "
        "rate limit. off for no limit.")),
    ("repeats", Option(
        _threshold, "3 in 10m",
        "Identical accesses (the same action, user, target, command or "
        "source, and outcome, such as one sudo command run in a loop): the "
        "first N in a window are sent, the rest of that window go out as "
        "one counted alert_digest that names what repeated, so a flood of "
        "one harmless access cannot crowd out another. off sends every "
        "one.")),
))

#: The sections of fixed keys, in the order the example configuration and
#: pamsignal.conf(5) show them: (name, keys, what the section is for).
CONFIG_SECTIONS = (
    ("pamsignal", GLOBAL_OPTIONS, "The agent itself."),
    ("detection", DETECTION_OPTIONS,
     "Failed attempts are counted per source address, per IPv6 /64 and "
     "per account, across sshd, sudo, su and login, with the events' own "
     "times. A threshold is \"N in DURATION\" (s, m, h, d) or off."),
    ("geoip", GEOIP_OPTIONS,
     "MaxMind DB files (absolute paths; empty = off) that give each source "
     "address its ASN, organisation, country and city, and so its "
     "provider. GeoLite2/GeoIP2, DB-IP Lite and IPinfo files all work; "
     "geoipupdate keeps them current, and a file replaced by rename is "
     "read again within seconds without a restart (a missing or broken "
     "one gives one warning and loses only its own fields). Private, "
     "loopback, CGNAT and documentation ranges are labelled without any "
     "database. Try one with `pamsignal lookup 8.8.8.8`."),
    ("audit", AUDIT_OPTIONS,
     "The hash-chained audit log, log_dir/audit.jsonl. A disk that "
     "refuses a record (full, read-only) degrades the audit_log "
     "component; the channels go on alerting, and a not_written record "
     "says how many were lost once writing works again."),
    ("report", REPORT_OPTIONS,
     "The daily summary (`pamsignal report --send-configured`, sent by "
     "pamsignal-report.timer once enabled)."),
    ("alerts", ALERT_OPTIONS,
     "The alert policy of every channel; a [channel:NAME] may set any of "
     "these keys for itself. With no channel configured, `run` prints "
     "every event on the console, with no policy: it is a log."),
)

#: The policy of the console when no channel is configured: it is a log,
#: so it shows every event at once.
SHOW_EVERYTHING = AlertPolicy(
    events=frozenset(ACTIONS), min_severity=0, ignore_users=(),
    ignore_groups=(), ignore_sources=(), always_users=(), always_groups=(),
    always_sources=(), cooldown=0, rate_limit=NO_THRESHOLD,
    repeats=NO_THRESHOLD)


#: What starts a comment, as _read_ini tells configparser: a whole line
#: whose first non-blank is one of these, or one after a blank.
_COMMENT_PREFIXES = (";", "#")


def _uncommented(line):
    """A line without its comment, cut as configparser cuts it."""
    if line.strip().startswith(_COMMENT_PREFIXES):
        return ""
    cut = len(line)
    for prefix in _COMMENT_PREFIXES:
        found = line.find(prefix)
        while found > 0 and not line[found - 1].isspace():
            found = line.find(prefix, found + 1)
        if found != -1:
            cut = min(cut, found)
    return line[:cut]


def _ini_lines(text):
    """(line number, section, key, continued, text) of each section header
    (key None), key and continuation line (text: without its comment),
    read as configparser reads them: its own patterns, lines split at \\n
    only, section names as written between the brackets, and a line
    indented deeper than the key above it (no blank line between)
    continuing that key's value."""
    section = key = indent = None
    for number, line in enumerate(io.StringIO(text), 1):
        value = _uncommented(line).strip()
        if not value:
            indent = None  # a blank line ends a value
            continue
        depth = len(line) - len(line.lstrip())
        if key is not None and indent is not None and depth > indent:
            yield number, section, key, True, value
            continue
        indent = depth
        header = configparser.ConfigParser.SECTCRE.match(value)
        if header:
            section, key = header.group("header"), None
            yield number, section, None, False, value
        elif section is not None:
            option = configparser.ConfigParser.OPTCRE.match(value)
            if option and option.group("option").rstrip():
                key = option.group("option").rstrip().lower()
                yield number, section, key, False, value


def _index_lines(text):
    """(section, key) -> line number, so problems can point at the file;
    (section, None) is the section's header. A channel's section is also
    found by its NAME without blanks, as the channel calls it."""
    index = {}
    for number, section, key, continued, _ in _ini_lines(text):
        if continued:
            continue
        index.setdefault((section, key), number)
        name = channel_named(section)
        if name is not None:
            index.setdefault((channel_section(name), key), number)
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
        comment_prefixes=_COMMENT_PREFIXES,
        inline_comment_prefixes=_COMMENT_PREFIXES, default_section="\0none")
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

    def problem(section, key, message, line=None):
        line = line or lines.get((section, key)) or lines.get((section, None))
        problems.append(ConfigProblem(path, line, section, key, message))

    _cut_continuations(parser, text, problem)
    settings = _plain_section(parser, "pamsignal", GLOBAL_OPTIONS, problem)
    detection = _plain_section(parser, "detection", DETECTION_OPTIONS,
                               problem)
    alerts = AlertPolicy(**_plain_section(parser, "alerts", ALERT_OPTIONS,
                                          problem))
    geoip = _plain_section(parser, "geoip", GEOIP_OPTIONS, problem)
    audit = _plain_section(parser, "audit", AUDIT_OPTIONS, problem)
    report = _plain_section(parser, "report", REPORT_OPTIONS, problem)
    channels, named = [], {}
    for section in parser.sections():
        values = parser[section]
        if section in ("pamsignal", "detection", "alerts", "geoip", "audit",
                       "report"):
            continue
        name = channel_named(section)
        if name in named:
            # One name is one spool directory, one component, one target
            # of send_to: a second channel of it would never alert.
            problem(section, None, "channel %s is already [%s] on line %s "
                    "(blanks around a name do not count); give each channel "
                    "a name of its own" % (name, named[name], lines.get(
                        (named[name], None), "?")))
        elif name:
            named[name] = section
            channel = _parse_channel(section, values, alerts, problem)
            if channel is not None:
                channels.append(channel)
        else:
            problem(section, None, "unknown section; expected [pamsignal], "
                    "[detection], [alerts], [geoip], [audit], [report] or "
                    "[channel:NAME]")
    for message in summary_channel_problems(report["send_to"], channels):
        problem("report", "send_to", message)
    if problems:
        raise ConfigError(problems)
    return Config(path=path, channels=tuple(channels),
                  detection=DetectionConfig(**detection), alerts=alerts,
                  geoip=GeoipConfig(**geoip), audit=AuditConfig(**audit),
                  report=ReportConfig(**report), **settings)


#: Checks of values that take several lines: one header a line.
_MULTI_LINE_CHECKS = frozenset((_headers,))

#: Checks of comma-separated lists, which may go on to an indented line
#: after a comma (or after `key =` with nothing on its line).
_LIST_CHECKS = frozenset((_event_filter, _names, _networks, _channel_names,
                          _login_records, _phone_numbers, _email_addresses))


def _options_of(parser, section):
    """The checks of a section's keys (a channel's by its type); None for
    a section that has none."""
    for name, options, _ in CONFIG_SECTIONS:
        if section == name:
            return {key: option.check for key, option in options.items()}
    if not channel_named(section):
        return None
    kind = CHANNEL_TYPES.get(parser[section].get("type", "").strip())
    return dict(((key, option.check) for key, option in
                 ALERT_OPTIONS.items()), type=_plain_text,
                **(kind.OPTIONS if kind else {}))


def _continuation_problem(key, value_lines, continued, checks):
    """Why the indented line that continues a value is wrong, or None:
    configparser joins it to the value of the key above, so an indented
    `key = value` would vanish into it."""
    check = checks.get(key) if checks else None
    if check in _MULTI_LINE_CHECKS:
        return None
    before = value_lines[-1]
    indented_key = re.match(r"^([A-Za-z0-9_.-]+)\s*(=|:(?!:))", continued)
    if indented_key and (indented_key.group(2) == "=" or (
            checks and indented_key.group(1).lower() in checks)):
        return ("%r is indented, so it is not a key: an indented line "
                "continues the one above (%s); write it at the start of its "
                "line" % (continued, key))
    if check in _LIST_CHECKS and (not before or before.endswith(",")):
        return None
    return ("an indented line continues the one above, and %s: write %r "
            "at the start of its line, or join it to the line above" % (
                "a list goes on to the next line only after a comma"
                if check in _LIST_CHECKS else key + " takes one line",
                continued))


def _cut_continuations(parser, text, problem):
    """A problem at each indented line that continues a value it should
    not, and that value cut to its first line (checked as usual)."""
    value_lines = {}
    for number, section, key, continued, value in _ini_lines(text):
        if key is None or not parser.has_option(section, key):
            continue
        if not continued:
            value_lines[section, key] = [configparser.ConfigParser.OPTCRE
                                         .match(value).group("value").strip()]
            continue
        message = _continuation_problem(
            key, value_lines[section, key], value,
            _options_of(parser, section))
        value_lines[section, key].append(value)
        if message:
            problem(section, key, message, number)
            parser.set(section, key, parser.get(section, key).split("\n")[0])


def _plain_section(parser, section, options, problem):
    """A section of fixed keys: their values (defaults where absent)."""
    values = {key: option.check(option.default)
              for key, option in options.items()}
    if not parser.has_section(section):
        return values
    for key, raw in parser[section].items():
        if key not in options:
            problem(section, key, "unknown key" + _suggest(key, options))
            continue
        try:
            values[key] = options[key].check(raw.strip())
        except ValueError as error:
            problem(section, key, str(error))
    return values


def _parse_channel(section, values, alerts, problem):
    """A [channel:NAME]: its type's own options, and the [alerts] policy
    with whatever the channel overrides."""
    kind = values.get("type", "").strip()
    if kind not in CHANNEL_TYPES:
        problem(section, "type", "expected one of: %s; got %r"
                % (", ".join(sorted(CHANNEL_TYPES)), kind))
        return None
    known = dict(((key, option.check) for key, option
                  in ALERT_OPTIONS.items()), **CHANNEL_TYPES[kind].OPTIONS)
    overrides, options = {}, {}
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
        (overrides if key in ALERT_OPTIONS else options)[key] = value
    for key in CHANNEL_TYPES[kind].REQUIRED:
        if key not in values:
            problem(section, None, "a %s channel needs %s" % (kind, key))
    check_options = getattr(CHANNEL_TYPES[kind], "check_options", None)
    for key, message in check_options(options) if check_options else ():
        problem(section, key, message)
    # A type may start from its own policy instead of [alerts] (a SIEM
    # wants every event); the channel's own keys override either.
    defaults = getattr(CHANNEL_TYPES[kind], "POLICY_DEFAULTS", {})
    policy = alerts._replace(**{key: ALERT_OPTIONS[key].check(text)
                                for key, text in defaults.items()})
    return ChannelConfig(channel_named(section), kind,
                         policy._replace(**overrides), options)


#: Channel types a report summary can go to: those that show text to a
#: person, and the webhook (the event with the text). Not the console or
#: journal (nothing is sent), syslog (one line) or PagerDuty (a summary
#: is no incident).
SUMMARY_CHANNEL_TYPES = frozenset((
    "telegram", "slack", "discord", "teams", "ntfy", "gotify", "email",
    "webhook", "whatsapp"))


def summary_channel_problems(names, channels):
    """Why, for each name that is no channel a summary can go to."""
    types = {channel.name: channel.type for channel in channels}
    problems = []
    for name in names:
        if name not in types:
            problems.append("no [channel:%s] is configured%s" % (
                name, _suggest(name, types) or "; configured: %s" % (
                    ", ".join(sorted(types)) or "none")))
        elif types[name] not in SUMMARY_CHANNEL_TYPES:
            problems.append("channel %s is of type %s, which a report "
                            "cannot be sent to (use one of: %s)" % (
                                name, types[name],
                                ", ".join(sorted(SUMMARY_CHANNEL_TYPES))))
    return problems


def default_config(path=DEFAULT_CONFIG_PATH):
    """What runs when there is no configuration file at all."""
    return parse_config("", path)


def inline_secrets(config):
    """(channel, key) of every secret written in the file itself."""
    return [(channel.name, key) for channel in config.channels
            for key, value in sorted(channel.options.items())
            if any(secret.credential is None
                   for secret in option_secrets(value))]


def _resolve_secret(value, validate, directory, where, problems):
    """A credential:NAME secret read and checked by `validate` (a problem
    noted, (section, key, message) with `where` the (section, key), when
    it cannot be); any other value as it is."""
    if value.credential is None:
        return value
    if not directory:
        problems.append(where + ("credential:%s, but no credentials were"
                                 " passed ($CREDENTIALS_DIRECTORY is unset; "
                                 "LoadCredential= in the unit)"
                                 % value.credential,))
        return value
    path = os.path.join(directory, value.credential)
    try:
        with open_regular(path, True, "utf-8") as handle:
            secret = handle.read(65536).strip()
        resolved = validate(secret)
    except (OSError, UnicodeDecodeError) as error:
        problems.append(where + ("cannot read credential %s: %s" % (
            value.credential, getattr(error, "strerror", None) or error),))
        return value
    except ValueError as error:
        problems.append(where + ("credential %s: %s" % (
            value.credential, error),))
        return value
    return Secret(resolved.value if isinstance(resolved, Secret)
                  else resolved)


def resolve_credentials(config, directory):
    """The config with each credential:NAME secret read from the systemd
    credentials directory ($CREDENTIALS_DIRECTORY)."""
    problems, channels = [], []
    for channel in config.channels:
        options = dict(channel.options)
        for key, value in sorted(options.items()):
            where = (channel_section(channel.name), key)
            if isinstance(value, Secret):
                options[key] = _resolve_secret(
                    value, CHANNEL_TYPES[channel.type].OPTIONS[key],
                    directory, where, problems)
            elif option_secrets(value):  # headers: each value on its own
                options[key] = tuple(header._replace(secret=_resolve_secret(
                    header.secret, _header_value, directory, where,
                    problems)) for header in value)
        channels.append(channel._replace(options=options))
    if problems:
        raise ConfigError([ConfigProblem(config.path, None, section, key,
                                         message)
                           for section, key, message in problems])
    return config._replace(channels=tuple(channels))


#: What the configuration read from standard input is called in problems.
STDIN_NAME = "<stdin>"


def load_config(path=None, environ=None, channels=True, as_root=None,
                stdin=None):
    """Read the configuration file; a missing default file means defaults,
    a missing explicitly named file is an error. A file holding secrets
    must not be readable by other users; run as root, no file it names
    may be changeable by anyone but root. Commands that send nothing
    (`channels=False`: status, lookup) do not read credentials or CA
    files, which only the service may have. Given `stdin` (a binary
    stream: check-config's), the path "-" reads the text from it as
    "<stdin>": a file not yet in place (as Ansible's validate checks),
    so its owner and mode are not judged; everything else is."""
    environ = os.environ if environ is None else environ
    as_root = os.geteuid() == 0 if as_root is None else as_root
    named = path is not None
    path = path or DEFAULT_CONFIG_PATH
    try:
        if stdin is not None and path == "-":
            path, status = STDIN_NAME, None
            text = stdin.read().decode("utf-8")
        else:
            with open_regular(path, True, "utf-8") as handle:
                text = handle.read()
                status = os.fstat(handle.fileno())
    except FileNotFoundError:
        if named:
            raise ConfigError([ConfigProblem(path, None, None, None,
                                             "no such file")]) from None
        text, status = "", None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([ConfigProblem(path, None, None, None,
                                         "cannot read: %s" % error)]) from None
    config = parse_config(text, path)
    if status is not None:
        refuse_exposed_secrets(config, path, status.st_mode)
    if as_root:
        config = refuse_untrusted_files(config, text, status, environ,
                                        credentials=channels)
    if not channels:
        return config
    try:
        check_ca_files(config)
        check_client_certificates(config)
        return resolve_credentials(config,
                                   environ.get("CREDENTIALS_DIRECTORY"))
    except ConfigError as error:
        raise ConfigError(_placed(error.problems, text)) from None


def _placed(problems, text):
    """Problems found after parsing, given the line of their key."""
    lines = _index_lines(text)
    return [problem._replace(line=lines.get((problem.section, problem.key))
                             or lines.get((problem.section, None)))
            if problem.line is None and problem.section else problem
            for problem in problems]


def _owner_name(uid):
    try:
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except KeyError:
        return "uid %d" % uid


def _writers(mode):
    return " and ".join(who for who, bit in (("group", 0o020),
                                             ("others", 0o002))
                        if mode & bit)


def trust_problem(path, status=None, stat_of=os.stat):
    """Why root must not trust the file at `path` (its `status` when it is
    already open), or None. As sshd's StrictModes: the file and every
    directory above it, as written and after symlinks, must be owned by
    root and writable by nobody else. A directory with the sticky bit (as
    /tmp) is accepted above a root-owned entry: others may not rename or
    delete what they do not own there. A file not there yet is judged by
    its deepest existing directory, which then nobody else may write at
    all (sticky or not), or anyone could create it."""
    absolute = os.path.normpath(os.path.abspath(path))
    try:
        found = status or stat_of(absolute)
    except (FileNotFoundError, NotADirectoryError):
        found = None
    except OSError as error:
        return "cannot check %s: %s" % (absolute, error.strerror or error)
    # (where, its stat, role): the target itself, the directory that would
    # create a missing target, or a directory above.
    judged = [(absolute, found, "target")] if found is not None else []
    directories = []
    for start in (absolute, os.path.realpath(absolute)):
        directory = os.path.dirname(start)
        while directory not in directories:
            directories.append(directory)
            if directory == "/":
                break
            directory = os.path.dirname(directory)
    role = "above" if found is not None else "creates"
    for directory in sorted(directories, key=len, reverse=True):
        try:
            judged.append((directory, stat_of(directory), role))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as error:
            return "cannot check %s: %s" % (directory,
                                            error.strerror or error)
        role = "above"  # only the deepest existing one creates it
    for where, info, role in judged:
        writers = _writers(info.st_mode)
        if role == "creates" and writers:
            return "%s does not exist, and %s, where anyone could create " \
                "it, is writable by %s: name a path in a directory only " \
                "root can write" % (absolute, where, writers)
        if role == "above" and info.st_mode & stat.S_ISVTX:
            writers = ""  # others cannot replace root's entry in it
        if info.st_uid != 0 or writers:
            what = "owned by %s" % _owner_name(info.st_uid) \
                if info.st_uid != 0 else ""
            if writers:
                what += "%swritable by %s" % (" and " if what else "",
                                              writers)
            return "%s is %s, so whoever can change it controls what root " \
                "runs or reads: run `chown root:root %s; chmod go-w %s`" % (
                    where, what, where, where)
    return None


def resolve_program(name, environ):
    """The real path of a program as it would be run (PATH searched for a
    bare name, symlinks resolved), or None when it is not found."""
    found = name if "/" in name else shutil.which(
        name, path=environ.get("PATH", os.defpath))
    return os.path.realpath(found) if found else None


def files_root_reads(config, environ, credentials=True):
    """(section, key, path) of every file the configuration makes the
    agent run or read: journalctl, the MaxMind databases, the audit key
    file, each channel's ca_file and (with `credentials`) each systemd
    credential."""
    files = [("pamsignal", "journalctl", config.journalctl)]
    files += [("geoip", role, path) for role, path in
              zip(GeoipConfig._fields, config.geoip) if path]
    if config.audit.key and not _CREDENTIAL.match(config.audit.key):
        # Else whoever owns its directory swaps in their key, or a FIFO.
        files.append(("audit", "key", config.audit.key))
    directory = environ.get("CREDENTIALS_DIRECTORY")
    for channel in config.channels:
        section = channel_section(channel.name)
        for key, value in sorted(channel.options.items()):
            if key == "ca_file":
                files.append((section, key, value))
            elif directory and credentials:
                files += [(section, key, os.path.join(
                    directory, secret.credential))
                    for secret in option_secrets(value) if secret.credential]
    return files


def refuse_untrusted_files(config, text, status, environ, credentials=True):
    """Run as root: a ConfigError naming each file (the configuration
    itself, and what it names) that another user could change, with the
    command that fixes it. Returns the configuration with journalctl as
    the real path that was checked, so that very file is what runs."""
    lines = _index_lines(text)
    problems = []
    if status is not None:
        reason = trust_problem(config.path, status)
        if reason:
            problems.append(ConfigProblem(config.path, None, None, None,
                                          reason))
    program = resolve_program(config.journalctl, environ)
    if program is not None:
        config = config._replace(journalctl=program)
    for section, key, path in files_root_reads(config, environ, credentials):
        reason = trust_problem(path)
        if reason:
            line = lines.get((section, key)) or lines.get((section, None))
            problems.append(ConfigProblem(config.path, line, section, key,
                                          reason))
    if problems:
        raise ConfigError(problems)
    return config


def check_ca_files(config):
    """Each channel's ca_file must load as certificates, or the channel
    could never connect (and a reload to it would be refused late)."""
    problems = []
    for channel in config.channels:
        ca_file = channel.options.get("ca_file")
        if ca_file is None:
            continue
        try:
            tls_context(ca_file)
        except (OSError, ssl.SSLError) as error:
            problems.append(ConfigProblem(
                config.path, None, channel_section(channel.name), "ca_file",
                "cannot load %s: %s" % (ca_file, getattr(
                    error, "strerror", None) or error)))
    if problems:
        raise ConfigError(problems)


#: Where systemd hands a unit its credentials (LoadCredential=): files it
#: makes readable by the unit's own user and group only (mode 0440).
SYSTEMD_CREDENTIALS_ROOT = "/run/credentials/"


def _readable_by_others(path, status):
    """Whether users other than the service may read a file: the world,
    or a group that is not the service's own (a systemd credential is
    group-readable by the unit's group, and that is not others)."""
    if status.st_mode & 0o004:
        return True
    return bool(status.st_mode & 0o040) and status.st_gid != os.getegid() \
        and not path.startswith(SYSTEMD_CREDENTIALS_ROOT)


def check_client_certificates(config):
    """A channel's client certificate must load with its key, and the key
    file (a secret) must not be readable by other users."""
    problems = []
    for channel in config.channels:
        cert_file = channel.options.get("cert_file")
        key_file = channel.options.get("key_file")
        if key_file is None:
            continue
        section = channel_section(channel.name)
        try:
            exposed = _readable_by_others(key_file, os.stat(key_file))
        except OSError as error:
            problems.append(ConfigProblem(config.path, None, section,
                                          "key_file", "cannot read %s: %s" % (
                                              key_file, error.strerror)))
            continue
        if exposed:
            problems.append(ConfigProblem(
                config.path, None, section, "key_file", "%s holds a private"
                " key but other users can read it (group or world); run: "
                "chmod 600 %s" % (key_file, key_file)))
            continue
        try:
            tls_context().load_cert_chain(cert_file, key_file,
                                          password=_no_passphrase)
        except (OSError, ssl.SSLError) as error:
            problems.append(ConfigProblem(
                config.path, None, section, "cert_file", "cannot load %s "
                "with %s: %s" % (cert_file, key_file, getattr(
                    error, "strerror", None) or error)))
    if problems:
        raise ConfigError(problems)


def refuse_exposed_secrets(config, path, mode):
    """A ConfigError if `config` (a Config, or the text of one) holds
    secrets while its file mode lets other users read it."""
    if not mode & 0o044:
        return
    if not isinstance(config, Config):
        try:
            config = parse_config(config, path)
        except ConfigError:
            return  # the agent reports these itself, with line numbers
    exposed = inline_secrets(config)
    if exposed:
        raise ConfigError([ConfigProblem(
            path, None, None, None, "holds secrets ([channel:%s] %s) but "
            "other users can read it (group or world); run: chmod 600 %s (or"
            " move secrets to credential:NAME)" % (exposed[0][0],
                                                   exposed[0][1], path))])


# ---------------------------------------------------------------------------
# 7 parsing
# ---------------------------------------------------------------------------
#
# parse_entry(entry) -> Event | None is pure: one journal entry in, at most
# one event out. RULES is the single table of what each service writes; the
# journalctl match arguments are derived from WATCHED_SERVICES.

Service = collections.namedtuple(
    "Service", "family name programs setuid account pam_services")
Service.__new__.__defaults__ = (None, None)
Service.__doc__ = """A watched journal identifier: which rules apply, the
service name to report, the program names its real writer runs as, and
whether it is setuid (logs with the caller's UID). `account`: a service
account whose UID counts as root's for it (polkitd); `pam_services`: the
only PAM services whose lines it reports (None: any)."""

_SSHD_PROGRAMS = frozenset(("sshd", "sshd-session", "sshd-auth"))

#: SYSLOG_IDENTIFIER -> Service. Only these cross the journalctl pipe.
WATCHED_SERVICES = {
    "sshd": Service("sshd", "sshd", _SSHD_PROGRAMS, False),
    "sshd-session": Service("sshd", "sshd", _SSHD_PROGRAMS, False),
    "sshd-auth": Service("sshd", "sshd", _SSHD_PROGRAMS, False),
    # sudo's PAM services are sudo and, for sudo -i, sudo-i (Debian, EL);
    # util-linux su's su and, for su -, su-l; shadow's su only su.
    "sudo": Service("sudo", "sudo", frozenset(("sudo",)), True,
                    pam_services=frozenset(("sudo", "sudo-i"))),
    "su": Service("su", "su", frozenset(("su",)), True,
                  pam_services=frozenset(("su", "su-l"))),
    "login": Service("login", "login", frozenset(("login",)), False),
    "systemd-logind": Service("logind", "systemd-logind",
                              frozenset(("systemd-logind",)), False),
    # The other doors in (section 7b): polkit and pkexec, doas, Cockpit,
    # display managers. _COMM is cut to 15 characters, so both spellings.
    "pkexec": Service("pkexec", "pkexec", frozenset(("pkexec",)), True,
                      pam_services=frozenset(("polkit-1",))),
    "polkit-agent-helper-1": Service(
        "door", "polkit-agent-helper-1",
        frozenset(("polkit-agent-helper-1", "polkit-agent-he")), True,
        pam_services=frozenset(("polkit-1",))),
    "polkitd": Service("polkitd", "polkit", frozenset(("polkitd",)), False,
                       account="polkitd", pam_services=frozenset()),
    "doas": Service("doas", "doas", frozenset(("doas",)), True,
                    pam_services=frozenset(("doas",))),
    "cockpit-session": Service("door", "cockpit-session",
                               frozenset(("cockpit-session",)), True,
                               pam_services=frozenset(("cockpit",))),
    "lightdm": Service("door", "lightdm", frozenset(("lightdm",)), False,
                       pam_services=frozenset(("lightdm",
                                               "lightdm-autologin"))),
    "sddm-helper": Service("door", "sddm-helper",
                           frozenset(("sddm-helper",)), False,
                           pam_services=frozenset(("sddm",
                                                   "sddm-autologin"))),
}
#: gdm's session worker calls itself "gdm-session-worker [pam/SERVICE]", so
#: syslog(3) names it "SERVICE]" (the greeter's gdm-launch-environment is
#: no login and not watched).
WATCHED_SERVICES.update(
    ("%s]" % pam_service, Service(
        "door", "gdm-session-worker",
        frozenset(("gdm-session-worker", "gdm-session-wor")), False,
        pam_services=frozenset((pam_service,))))
    for pam_service in ("gdm-password", "gdm-autologin", "gdm-fingerprint",
                        "gdm-smartcard"))

#: systemd-executor (systemd 255+) runs a unit's PAM stack under the name
#: of the command it starts, "(id)" or "(bash)", so it is asked for by its
#: program (journal_matches) and known by the parentheses; of its PAM
#: lines run0's and those of PAM service login (machinectl shell,
#: systemd-run -p PAMName=login) are doors in, not "(systemd)", a user's
#: own service manager.
EXECUTOR_SERVICE = Service("door", "systemd-executor",
                           frozenset(("systemd-executor",)), False,
                           pam_services=frozenset(("systemd-run0", "login")))
#: Where systemd-executor lives (systemd 255+).
EXECUTOR_EXE = "/usr/lib/systemd/systemd-executor"


#: PID 1 itself: the journal is asked only for "Starting UNIT -
#: DESCRIPTION..." lines (SD_MESSAGE_UNIT_STARTING; one match term, as
#: each AND-ed term slowed journalctl), and of those only run0's units are
#: read ("[run0] COMMAND"); a user's own manager writing one is not root.
PID1_SERVICE = Service("pid1", "run0", frozenset(("systemd",)), False,
                       pam_services=frozenset())
#: MESSAGE_ID of PID 1's "Starting UNIT - DESCRIPTION..." (systemd 209+).
UNIT_STARTING_MESSAGE_ID = "7d4958e842da4a758f6c1cdc7b36dcc5"


def unlisted_service(identifier):
    """A watched writer with no fixed identifier: EXECUTOR_SERVICE for
    "(NAME)", PID1_SERVICE for "systemd", else None."""
    if identifier and identifier[0] == "(" and identifier[-1] == ")":
        return EXECUTOR_SERVICE
    return PID1_SERVICE if identifier == "systemd" else None

#: PAM services that switch identity: their session's user is the target.
SWITCHING_PAM_SERVICES = frozenset(("sudo", "sudo-i", "su", "su-l",
                                    "runuser", "runuser-l", "doas",
                                    "polkit-1", "systemd-run0"))

#: sshd method -> reason of a failure with it.
_METHOD_REASONS = {"password": "bad_password",
                   "keyboard-interactive": "bad_password",
                   "publickey": "bad_key", "hostbased": "bad_key",
                   "none": "no_credentials"}

#: A key as sshd names it: type and fingerprint (before 6.8 a bare MD5;
#: "(null)" when the fingerprint could not be made).
_KEY = (r"[A-Za-z0-9@._-]+ (?:(?:SHA256|MD5):[A-Za-z0-9+/=:]+|"
        r"[0-9a-f]{2}(?::[0-9a-f]{2}){15}|\(null\))")
#: What sshd writes after "ssh2: " for a key (auth.c format_method_key):
#: the key, a certificate with its ID, then ", " and the method's own
#: text, e.g. hostbased's `client user "U", client host "H"`, both the
#: client's own words (quotes and all), or a FIDO key's signature count.
#: The ID and that text may hold anything, so they are matched loosely:
#: a stricter pattern would throw out the real reading (and keep a forged
#: one).
_KEY_INFO = re.compile(
    r"(?P<key>%s)(?: ID (?P<cert_id>.*) \(serial (?P<serial>\d+)\) "
    r"CA (?P<ca>%s))?(?:, (?P<client>.+))?\Z" % (_KEY, _KEY))
#: What sshd writes after the user name in an auth_log() line.
_SSHD_AUTH_TAIL = re.compile(r"(?P<addr>\S+) port (?P<port>\d+)"
                             r"(?: ssh[12](?:: (?P<info>.*))?)?\Z")
#: The same written by builds that leave out port and protocol: trusted
#: only when no reading with a port exists.
_SSHD_BARE_TAIL = re.compile(r"(?P<addr>\S+)\Z")
#: What sshd writes after the user name in its PAM error line.
_PAM_HOST_TAIL = re.compile(r"(?P<addr>\S+)(?: via \S+)?\Z")
_SSHD_ADDR_PORT_TAIL = re.compile(
    r"(?P<addr>\S+)(?: port (?P<port>\d+))?\Z")
_ADDR_ONLY_TAIL = re.compile(r"(?P<addr>\S+)\Z")

_LOG_PREFIXES = ("error: ", "fatal: ", "warning: ")


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

    One reading gives user and source. Several mean the user name (or the
    client's text after the address) imitates sshd's text. If the account
    exists (`account`), its name has no white space, which settles it: only
    the first " from " can end it. Otherwise `accept(tail)` may rule out
    readings, but only those sshd cannot have written: it must never say
    no to text that holds the client's words, or the forged reading is all
    that is left. When more than one is left, no side is picked and the
    event has neither user nor source, only the AMBIGUOUS detail. No
    reading at all gives (None, None).
    """
    readings = split_at_from(rest, tail_pattern)
    if account:
        readings = [(user, tail) for user, tail in readings
                    if not _WHITE_SPACE.search(user)] or readings
    if len(readings) > 1 and accept is not None:
        # If it says no to all of them the form is new: keep them all.
        readings = [(user, tail) for user, tail in readings
                    if accept(tail)] or readings
    if len(readings) > 1:
        return {"detail": AMBIGUOUS}, None
    if not readings:
        return None, None
    user, tail = readings[0]
    groups = tail.groupdict()
    fields = _source(groups["addr"], groups.get("port"))
    fields["user"] = user
    return fields, tail


#: Methods whose text after "ssh2: " is the client's (a Kerberos
#: principal) and may be anything; any reading may be sshd's.
_FREE_INFO_METHODS = ("gssapi",)


def _auth_info_check(method):
    """accept() for an auth_log() line of this method: says no only to a
    tail sshd cannot have written for it. publickey and hostbased write a
    key (the monitor records it before it logs), gssapi a principal
    (anything), the others nothing."""
    return None if method.startswith(_FREE_INFO_METHODS) else _known_key_info


def _known_key_info(tail):
    """The text after "ssh2: " is a key as sshd writes it (or absent)."""
    info = tail.groupdict().get("info")
    return info is None or _KEY_INFO.match(info) is not None


def _build_auth_log(match):
    """sshd auth_log(): Accepted/Failed METHOD for [invalid user ]U from ..."""
    verb, method = match.group("verb"), match.group("method")
    invalid, rest = _split_invalid(match.group("rest"))
    fields, tail = _user_and_source(rest, _SSHD_AUTH_TAIL,
                                    _auth_info_check(method),
                                    account=not invalid)
    if fields is None:
        fields, tail = _user_and_source(rest, _SSHD_BARE_TAIL,
                                        account=not invalid)
    if fields is None:
        return None
    if verb == "Failed" and invalid and method == "none":
        return None  # the probe the "Invalid user" line already reported
    fields["auth_method"] = method
    info = tail.groupdict().get("info") if tail is not None else None
    key_info = _KEY_INFO.match(info) if info else None
    if key_info is not None:
        fields.update(key=key_info.group("key"),
                      certificate_id=key_info.group("cert_id"),
                      certificate_serial=parse_int(key_info.group("serial")),
                      certificate_ca=key_info.group("ca"),
                      detail=key_info.group("client"))
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
    fields = {"action": "login_success" if service in DOOR_LOGIN_SERVICES
              else "session_opened", "service": service}
    if service in SWITCHING_PAM_SERVICES:
        # Who acted, by name and UID (the name is missing when PAM found
        # no login name: no terminal, no utmp entry; ActingUsers fills it).
        fields.update(target_user=user, user=by_name or None,
                      user_id=by_uid)
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


#: sudo's reasons for refusing (`reason` of a JSON reject, 1.9.4+) ->
#: event.reason; "N incorrect password attempt(s)" is matched apart.
_SUDO_REJECT_REASONS = {"user NOT in sudoers": "not_in_sudoers",
                        "user NOT authorized on host": "not_in_sudoers",
                        "command not allowed": "command_not_allowed",
                        "a password is required": "password_required"}
_SUDO_JSON_ATTEMPTS = re.compile(r"^(\d+) incorrect password attempts?\Z")


def _short_tty(tty):
    """A terminal as su and sudo's text lines name it: pts/0, not
    /dev/pts/0."""
    return tty[len("/dev/"):] if tty and tty.startswith("/dev/") else tty


def _json_text(record, key):
    """A string value of sudo's JSON record, or None."""
    value = record.get(key)
    return value if isinstance(value, str) and value else None


#: The start of sudo's JSON line, up to its record: `{"accept":{` (1.9.4,
#: 1.9.5) or `{"sudo":{"accept":{` (1.9.6+), after the `@cee:` prefix.
_SUDO_JSON_HEAD = re.compile(r'\{\s*(?:"sudo"\s*:\s*\{\s*)?"(?P<kind>accept|'
                             r'reject|alert|exit)"\s*:\s*\{')
#: One key of the record and its colon (the first one without a comma).
#: No two \s* side by side: they could split a run of white space in
#: every way, quadratic work on a long run.
_JSON_KEY = re.compile(r'\s*(?:,\s*)?"(?P<key>[a-z_]+)"\s*:\s*')
#: pamsignal.detail of a JSON line that ends before its record does.
SUDO_JSON_CUT = "sudo's JSON line is cut short"


#: What closes sudo's JSON line after its record.
_SUDO_JSON_END = re.compile(r"\}\s*(?:\}\s*)?\}\s*\Z")


def sudo_json_record(text):
    """(kind, record, whole) of sudo's JSON log line: kind `accept`,
    `reject`, `alert` or `exit` (None when it is not sudo's), the record's
    keys as far as they are whole, and whether the line was. sudo writes
    who and what first and the environment last, so a line cut short (a
    long environment, or the length read) still names who ran what."""
    head = _SUDO_JSON_HEAD.match(text)
    if head is None:
        return None, {}, False
    record, at = {}, head.end()
    key = _JSON_KEY.match(text, at)
    while key is not None:
        try:
            record[key.group("key")], at = _JSON_DECODER.raw_decode(
                text, key.end())
        except (ValueError, RecursionError):
            return head.group("kind"), record, False
        key = _JSON_KEY.match(text, at)
    return head.group("kind"), record, \
        _SUDO_JSON_END.match(text, at) is not None


def _build_sudo_json(match):
    """sudo 1.9.4+ with `Defaults log_format=json`: "accept" is a command
    run, "reject" a refusal; "alert" and "exit" are no login. The values
    are the caller's text in JSON strings, which cannot imitate the keys."""
    kind, record, whole = sudo_json_record(match.group("json"))
    user = _json_text(record, "submituser")
    if user is None or not whole and len(match.string) < MAX_MESSAGE_CHARS:
        # Not sudo's JSON, nor cut short by the length read: the text
        # form of a user whose name starts with "{".
        text_form = _SUDO_TEXT.match(match.string)
        return _build_sudo(text_form) if text_form else None
    if kind not in ("accept", "reject"):
        return None
    argv = record.get("runargv")
    command = _json_text(record, "command")
    if command and isinstance(argv, list) and all(
            isinstance(arg, str) for arg in argv):
        command = " ".join([command] + argv[1:])  # as COMMAND= writes it
    fields = {"user": user, "target_user": _json_text(record, "runuser"),
              "command_line": command,
              "working_directory": _json_text(record, "submitcwd") or
              _json_text(record, "runcwd"),
              "tty": _short_tty(_json_text(record, "ttyname")),
              "detail": None if whole else SUDO_JSON_CUT}
    if kind == "accept":
        return dict(fields, action="sudo_command")
    why = _json_text(record, "reason") or ""
    attempts = _SUDO_JSON_ATTEMPTS.match(why)
    if attempts:  # a total, as in the text form (SudoAttempts)
        return dict(fields, action="login_failure", reason="bad_password",
                    attempts=parse_int(attempts.group(1)))
    return dict(fields, action="login_failure",
                detail=fields["detail"] or why or None,
                reason=_SUDO_REJECT_REASONS.get(why, "command_not_allowed"))


def _build_su(match):
    failed = match.group("failed") or match.group("shadow_failed")
    tty = match.group("tty")
    fields = {"user": match.group("user") or match.group("shadow_user"),
              "target_user": match.group("target") or
              match.group("shadow_target"),
              "tty": None if tty == "none" else tty}  # util-linux: no tty
    if failed:
        fields.update(action="login_failure", reason="bad_password")
    else:
        fields["action"] = "login_success"
    return fields


#: Terminals on a serial line (or a hypervisor's console): a login there
#: comes through a cable, a BMC or a cloud's serial console, not a screen.
_SERIAL_TERMINAL = re.compile(
    r"^(?:/dev/)?(?:ttyS|ttyAMA|ttyUSB|ttyACM|hvc|ttysclp|sclp_line|"
    r"3270/tty|ttyPS|ttymxc|ttySAC|ttyO|ttyMSM|ttyLP|ttyGS|ttyTCU)\d")


def _console_fields(tty):
    """The terminal as the line names it, flagged when it is serial."""
    return {"tty": tty, "tty_kind": "serial"
            if tty and _SERIAL_TERMINAL.match(tty) else None}


def _build_login_success(match):
    fields = dict(_source(match.group("host")), action="login_success",
                  **_console_fields(match.group("tty")))
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
                else "bad_password", detail=why,
                user=None if user in ("UNKNOWN", "(unknown)") else user,
                **_console_fields(tty))


def _build_login_tries(match):
    place, tty = match.group("host"), match.group("tty")
    if place and _TERMINAL.match(place) and not tty:
        place, tty = None, place
    return dict(_source(place), action="login_failure",
                reason="max_attempts",
                attempts=parse_int(match.group("count")),
                user=match.group("user") or None, **_console_fields(tty))


def _build_logind_new(match):
    return {"action": "session_opened", "user": match.group("user"),
            "session_id": match.group("session")}


def _build_logind_removed(match):
    return {"action": "session_closed", "session_id": match.group("session")}


def _build_pam_message(match):
    """sshd's own report of a PAM failure (auth-pam.c, every version):
    `PAM: MESSAGE for [illegal user ]U from HOST[ via LOCAL]`. sshd writes
    it only in the keyboard-interactive conversation, so that is the
    method; the sshd line that may follow is the same attempt."""
    rest = match.group("rest")
    illegal = rest.startswith("illegal user ")
    if illegal:
        rest = rest[len("illegal user "):]
    fields, _ = _user_and_source(rest, _PAM_HOST_TAIL)
    if fields is None:
        return None
    why = match.group("why")
    unknown = illegal or why.startswith(("User not known", "unknown user"))
    return dict(fields, action="login_failure", pairing="pam",
                auth_method="keyboard-interactive/pam", detail="PAM: " + why,
                reason="invalid_user" if unknown else "bad_password")


#: The end of pam_unix's (and pam_sss's) failure line: `rhost=H  user=U`;
#: the user (an existing account, so without white space) is left out for
#: an unknown one.
_PAM_RHOST = re.compile(r"(?:^| )rhost=(?P<rhost>\S*)"
                        r"(?:\s+user=(?P<user>\S*))?\s*\Z")


def _build_pam_auth_failure(match):
    """A PAM module's own failure line. It counts for sudo, which writes no
    line per attempt itself; for sshd it is held and paired with sshd's
    line for the same attempt (SshAttempts); su and login write their own."""
    service = match.group("pam_service")
    pairs = match.group("pairs")
    if service in ("sudo", "sudo-i"):
        # No source: sudo sets PAM's rhost to this very host, if at all.
        found = dict(_PAM_PAIR.findall(pairs))
        return {"action": "login_failure", "reason": "bad_password",
                "service": "sudo", "tty": found.get("tty") or None,
                "user": found.get("ruser") or found.get("logname") or
                found.get("user") or None}
    if service in _PROGRAM_PAM_SERVICES:
        return _program_pam_failure(service, pairs, match.group("module"))
    if service in DOOR_AUTH_SERVICES:
        return _door_auth_failure(service, pairs)
    if service != "sshd":
        return None
    fields, user = _pam_source_and_user(pairs)
    return dict(fields, action="login_failure", reason="bad_password",
                pairing="pam", user=user,
                detail="%s: authentication failure" % match.group("module"))


def _pam_source_and_user(pairs):
    """(source fields, user) from the end of a PAM failure line."""
    at = pairs.rfind("rhost=")  # the last: the caller's, after the others
    tail = _PAM_RHOST.match(pairs, at - 1 if at > 0 else 0) \
        if at >= 0 else None
    fields = _source(tail.group("rhost")) if tail else {}
    user = tail.group("user") if tail else \
        dict(_PAM_PAIR.findall(pairs)).get("user")
    return fields, user or None


#: PAM services of programs that write their own line for each failed
#: attempt (su's FAILED SU, login's FAILED LOGIN): their pam_unix failure
#: is held until that line replaces it (ProgramAttempts).
_PROGRAM_PAM_SERVICES = frozenset(("su", "su-l", "login"))


def _program_pam_failure(service, pairs, module):
    """pam_unix's failure inside su or login: `... tty=T ruser=R rhost=H
    user=U`. For su, ruser is who acts and user the account wanted, and
    there is no remote host; login has one when `login -h` set it, right
    before the user, read from the right."""
    at = pairs.rfind("rhost=")
    tail = _PAM_RHOST.match(pairs, at - 1 if at > 0 else 0) \
        if at >= 0 else None
    head = dict(_PAM_PAIR.findall(pairs[:at] if at >= 0 else pairs))
    account = tail.group("user") if tail else None
    fields = _source(tail.group("rhost")) if tail and service == "login" \
        else {}
    fields.update(action="login_failure", reason="bad_password",
                  tty=_short_tty(head.get("tty") or None),
                  pairing="pam", detail="%s: authentication failure" % module)
    if service == "login":
        fields["user"] = account or None
    else:
        fields.update(user=head.get("ruser") or None,
                      target_user=account or None)
    return fields


def _build_pam_lockout(match):
    """pam_faillock / pam_tally2 refusing a locked account (sshd's Failed
    line for the same attempt follows)."""
    if match.group("pam_service") != "sshd":
        return None
    return {"action": "login_failure", "reason": "locked_out",
            "pairing": "pam",
            "user": match.group("user") or match.group("tally_user"),
            "detail": "%s: account locked" % match.group("module")}


def _build_connection_end(match):
    """The connection ended during authentication (`Connection closed by
    authenticating user U H port N` and its kin; 7.9+ name the user)."""
    groups = match.groupdict()
    who = groups.get("who")
    return dict(_source(groups["addr"], groups["port"]),
                action="login_failure", pairing="end",
                reason={"invalid": "invalid_user",
                        "authenticating": "key_probe"}.get(who),
                user=groups.get("user") or None, detail=groups.get("why"))


def _build_too_many(match):
    """The MaxAuthTries disconnect; before 7.9 it names no address, which
    then comes from the connection's earlier lines (SshAttempts)."""
    groups = match.groupdict()
    fields = _source(groups["addr"], groups["port"]) if groups["addr"] \
        else {}
    return dict(fields, action="login_failure", reason="max_attempts",
                pairing="restate",
                user=groups["user"] if groups["who"] else groups["old_user"])


_USER_CHANGE = ": Change of username or service not allowed: "
_CONNECTION_ID = re.compile(r"(?P<who>authenticating|invalid) user "
                            r"(?P<user>.*) (?P<addr>\S+) port (?P<port>\d+)\Z")


def _build_user_change(match):
    """A client that switched user or service in mid-authentication. Both
    the preamble's user and the names in the message are the client's
    text: a reading counts only if it is the only one."""
    body = match.group("body")
    if body is None:  # before 7.9: no preamble, the connection knows
        return {"action": "login_failure", "reason": "user_change",
                "pairing": "restate",
                "detail": match.group("change") or match.group("bare")}
    readings = []
    position = body.find(_USER_CHANGE)
    while position >= 0:
        connection = _CONNECTION_ID.match(body[:position])
        if connection is not None:
            readings.append((connection, body[position + 2:]))
        position = body.find(_USER_CHANGE, position + 1)
    if len(readings) != 1:
        return {"action": "login_failure", "reason": "user_change",
                "pairing": "restate", "detail": AMBIGUOUS}
    connection, change = readings[0]
    return dict(_source(connection.group("addr"), connection.group("port")),
                action="login_failure", reason="user_change",
                pairing="restate", user=connection.group("user"),
                detail=change)


def _build_tcp_wrappers(match):
    """libwrap's refusal: `refused connect from HOST (ADDR)` or ADDR alone."""
    addr = match.group("addr") or match.group("host")
    fields = _source(addr)
    if match.group("addr") and fields["source_domain"] is None:
        fields["source_domain"] = normalise_address(match.group("host"))[1]
    return dict(fields, action="login_failure", reason="not_allowed",
                detail="refused by tcp_wrappers (hosts.allow, hosts.deny)")


def _build_key_file_refused(match):
    return {"action": "key_file_refused", "user": match.group("user"),
            "detail": match.group("why")}


#: sshd's reason for dropping a connection -> event.reason: "past
#: MaxStartups" (7.4-9.7), "past Maxstartups" (9.8), "Maxstartups" (10.x);
#: "penalty: ..." or "too many penalised addresses" (9.8+).
_THROTTLE_REASONS = ((re.compile(r"^penalty: |^too many penalised"),
                      "penalty"),
                     (re.compile(r"(?i)^(?:past )?maxstartups\Z"),
                      "max_startups"))


def _build_throttled(match):
    why = match.group("why")
    return dict(_source(match.group("addr"), match.group("port")),
                action="source_throttled", detail=why,
                reason=next((reason for pattern, reason in _THROTTLE_REASONS
                             if pattern.search(why)), "other"),
                destination_ip=normalise_address(match.group("laddr"))[0],
                destination_port=parse_port(match.group("lport")))


def _probe(reason):
    """A builder of the pre-authentication probe `reason`."""
    def build(match):
        groups = match.groupdict()
        fields = _source(groups["addr"] or groups.get("conn_addr"),
                         groups.get("port"))
        return dict(fields, action="ssh_probe", reason=reason,
                    detail=groups.get("why"))
    return build


Rule = collections.namedtuple("Rule", "family name words pattern build")
Rule.__doc__ = """One message form: the family of identifiers it applies to
("pam" applies to all), a name, the first words its lines can start with
(None: any; only those rules are tried, for speed), an anchored regex and
the function that turns its match into event fields (None: recognised, but
not an event)."""

_PAM_HEAD = r"^pam_unix\((?P<pam_service>[^:()\s]+):"
#: sudo's own line in its text form: `USER : BODY`.
_SUDO_TEXT = re.compile(r"^\s*(?P<user>\S+) : (?P<body>.*)\Z")

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
    Rule("sshd", "too_many_failures", ("Disconnecting", "Disconnecting:"),
         re.compile(r"^Disconnecting(?: (?P<who>authenticating|invalid) user"
                    r" (?P<user>.*) (?P<addr>\S+) port (?P<port>\d+))?: Too "
                    r"many authentication failures(?: for (?P<old_user>.*))?"
                    r"\Z"), _build_too_many),
    Rule("sshd", "user_change", ("Disconnecting", "Disconnecting:",
                                 "Change"), re.compile(
        r"^(?:Disconnecting(?: (?P<body>.*: Change of username or service "
        r"not allowed: .*)|: (?P<change>Change of username"
        r" or service not allowed: .*))|(?P<bare>Change of username or "
        r"service not allowed: .*))\Z"), _build_user_change),
    Rule("sshd", "pam_message", ("PAM:",), re.compile(
        r"^PAM: (?P<why>[Aa]uthentication (?:failure|error)|User not"
        r" known to the underlying authentication module|unknown user|"
        r"Authentication service cannot retrieve authentication info|"
        r"Maximum number of tries exceeded) for (?P<rest>.*)\Z"),
        _build_pam_message),
    Rule("sshd", "pam_failure_summary", ("PAM",), re.compile(
        r"^PAM \d+ more authentication failures?"), _companion),
    Rule("sshd", "connection_end", ("Connection", "Disconnected"),
         re.compile(
             r"^(?:Connection (?:closed|reset) by|Disconnected from) "
             r"(?P<who>authenticating|invalid) user (?P<user>.*) "
             r"(?P<addr>\S+) port (?P<port>\d+)\Z"), _build_connection_end),
    Rule("sshd", "received_disconnect", ("Received",), re.compile(
        r"^Received disconnect from (?P<addr>\S+?)(?: port (?P<port>\d+))?"
        r": ?(?P<why>\d+: .*)\Z"), _build_connection_end),
    Rule("sshd", "received_auth_fail", ("Received",), re.compile(
        r"^Received disconnect from (?P<addr>\S+?)(?: port (?P<port>\d+))?"
        r": ?(?P<why>(?:3: .*Auth fail|14: No (?:supported )?authentication "
        r"methods available))\Z"), _build_connection_end),
    Rule("sshd", "closed_before_auth", ("Connection", "Disconnected"),
         re.compile(r"^(?:Connection (?:closed|reset) by|Disconnected from) "
                    r"(?P<addr>\S+)(?: port (?P<port>\d+))?\Z"),
         _build_connection_end),
    Rule("sshd", "closed_at_banner", ("Connection",), re.compile(
        r"^Connection (?P<why>closed|reset) by (?P<addr>\S+) port "
        r"(?P<port>\d+)\Z"), _probe("no_identification")),
    Rule("sshd", "no_identification", ("Did",), re.compile(
        r"^Did not receive identification string from (?P<addr>\S+)"
        r"(?: port (?P<port>\d+))?\Z"), _probe("no_identification")),
    Rule("sshd", "bad_banner", ("banner",), re.compile(
        r"^banner exchange: Connection from (?P<addr>\S+) port "
        r"(?P<port>\d+): (?P<why>.*)\Z"), _probe("bad_banner")),
    Rule("sshd", "bad_version", ("Bad",), re.compile(
        r"^Bad protocol version identification '(?P<why>.*)' from "
        r"(?P<addr>\S+)(?: port (?P<port>\d+))?\Z"), _probe("bad_banner")),
    Rule("sshd", "kex_identification", ("kex_exchange_identification:",),
         re.compile(r"^kex_exchange_identification: "), _companion),
    Rule("sshd", "no_matching_algorithm", ("Unable",), re.compile(
        r"^Unable to negotiate with (?P<addr>\S+) port (?P<port>\d+): "
        r"(?P<why>no matching .*)\Z"), _probe("no_matching_algorithm")),
    Rule("sshd", "auth_timeout", ("Timeout",), re.compile(
        r"^Timeout before authentication for (?:connection from "
        r"(?P<conn_addr>\S+) to \S+, pid = \d+(?: \(early\))?|(?P<addr>\S+)"
        r"(?: port (?P<port>\d+))?)\Z"), _probe("auth_timeout")),
    Rule("sshd", "throttled", ("drop",), re.compile(
        r"^drop connection #\d+ from \[(?P<addr>[^\]\s]+)\]:(?P<port>\d+) "
        r"on \[(?P<laddr>[^\]\s]+)\]:(?P<lport>\d+) (?P<why>.+)\Z"),
        _build_throttled),
    Rule("sshd", "tcp_wrappers", ("refused",), re.compile(
        r"^refused connect from (?P<host>[^\s()]+)"
        r"(?: \((?P<addr>[^\s()]+)\))?\Z"), _build_tcp_wrappers),
    Rule("sshd", "key_file_refused", ("Authentication",), re.compile(
        r"^Authentication refused(?: for (?P<user>\S+))?: (?P<why>bad "
        r"owner(?:ship)? or modes for .*)\Z"), _build_key_file_refused),
    Rule("sshd", "input_userauth_invalid", ("input_userauth_request:",),
         re.compile(r"^input_userauth_request: invalid user "), _companion),
    Rule("pam", "session_opened", ("pam_unix",), re.compile(
        _PAM_HEAD + r"session\): session opened for user (?P<user>\S+?)"
        r"(?:\(uid=\d+\))? by (?P<by>\S*?)(?:\(uid=(?P<by_uid>\d+)\))?\Z"),
        _build_session_opened),
    Rule("pam", "session_closed", ("pam_unix",), re.compile(
        _PAM_HEAD + r"session\): session closed for user (?P<user>\S+?)"
        r"(?:\(uid=\d+\))?\Z"), _build_session_closed),
    Rule("pam", "auth_failure", ("pam_unix", "pam_sss", "pam_ldap"),
         re.compile(r"^(?P<module>pam_unix|pam_sss|pam_ldap)\((?P<pam_service>"
                    r"[^:()\s]+):auth\): [Aa]uthentication failure; "
                    r"(?P<pairs>.*)\Z"), _build_pam_auth_failure),
    Rule("pam", "lockout", ("pam_faillock", "pam_tally"), re.compile(
        r"^(?P<module>pam_faillock|pam_tally2?)\((?P<pam_service>[^:()\s]+)"
        r":auth\): (?:Consecutive login failures for user (?P<user>\S+) "
        r"account temporarily locked|user (?P<tally_user>\S+) \(\d+\) "
        r"tally \d+, deny \d+)\Z"), _build_pam_lockout),
    Rule("pam", "check_pass", ("pam_unix",), re.compile(
        _PAM_HEAD + r"auth\): check pass; user unknown\Z"), _companion),
    # No password given (end of input, no terminal): no guess; sudo's own
    # total or refusal follows.
    Rule("pam", "no_password", ("pam_unix",), re.compile(
        _PAM_HEAD + r"auth\): (?:conversation failed|auth could not identify"
        r" password for \[.*\])\Z"), _companion),
    Rule("sudo", "json", ("",), re.compile(
        r"^(?:@cee:)?(?P<json>\{.*)\Z", re.DOTALL), _build_sudo_json),
    Rule("sudo", "continued", None, re.compile(
        r"^\s*\S+ : \(command continued\) "), _companion),
    Rule("sudo", "sudo", None, _SUDO_TEXT, _build_sudo),
    Rule("su", "su", ("", "FAILED", "Successful"), re.compile(
        r"^(?:(?P<failed>FAILED SU )?\(to (?P<target>\S+)\) (?P<user>\S+) "
        r"on (?P<tty>\S+)|(?:Successful|(?P<shadow_failed>FAILED)) su for "
        r"(?P<shadow_target>\S+) by (?P<shadow_user>\S+))\Z"), _build_su),
    Rule("su", "sulog", ("",), re.compile(r"^[+-] \S+ \S+:\S+\Z"), _companion),
    Rule("su", "pam_error", ("pam_authenticate:",), re.compile(
        r"^pam_authenticate: "), _companion),  # shadow's, before FAILED su
    Rule("login", "login", ("LOGIN",), re.compile(
        r"^LOGIN ON (?P<tty>\S+) BY (?P<user>\S+)(?: FROM (?P<host>\S+))?\Z"),
        _build_login_success),
    Rule("login", "root_login", ("ROOT",), re.compile(
        r"^ROOT LOGIN\s+(?:ON|on) '?(?P<tty>[^'\s]+)'?"
        r"(?: (?:FROM|from) '?(?P<host>[^'\s]+)'?)?\Z"),
        _build_login_success),
    Rule("login", "failed_login", ("FAILED",), re.compile(
        r"^FAILED LOGIN (?:SESSION|\(?\d+\)?)"
        r"(?: (?:ON|on) '?(?P<tty>[^'\s]+)'?)?"
        r"(?: (?:FROM|from) '?(?P<host>[^'\s]+)'?)? FOR '?(?P<user>.*?)'?, "
        r"(?P<why>[^,]*)\Z"), _build_login_failure),
    Rule("login", "shadow_login", ("",), re.compile(
        r"^'(?P<user>[^'\s]+)' logged in\s+on '(?P<tty>[^'\s]+)'"
        r"(?: from '(?P<host>[^'\s]+)')?\Z"), _build_login_success),
    Rule("login", "dialup", ("DIALUP",), re.compile(
        r"^DIALUP AT \S+ BY \S+\Z"), _companion),  # before LOGIN ON ttyS*
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

# ---------------------------------------------------------------------------
# 7b the other doors in: polkit and pkexec, doas, run0, Cockpit, gdm,
# lightdm, sddm
# ---------------------------------------------------------------------------
#
# They report as the same kinds as sshd, sudo and su, with the service
# named: a failed password is a login_failure, a command run as another
# user a sudo_command, a graphical or Cockpit session a login_success.
# The forms are those of polkit 0.105-127 (pkexec.c log_message(),
# polkitbackendinteractiveauthority.c), OpenDoas 6.6-6.8 (doas.c, pam.c,
# shadow.c), systemd 256-257 (run0) and Cockpit's session helper (PAM
# service "cockpit"); pamsignal(8), EVENTS, says which wrote what.

#: PAM services whose own failure line is the only word of a failed login
#: (the agent helper's is paired with polkitd's verdict: PolkitAttempts).
DOOR_AUTH_SERVICES = frozenset((
    "polkit-1", "cockpit", "gdm-password", "gdm-autologin",
    "gdm-fingerprint", "gdm-smartcard", "lightdm", "lightdm-autologin",
    "sddm", "sddm-autologin"))

#: PAM services whose session is a login: nothing else logs the success.
DOOR_LOGIN_SERVICES = DOOR_AUTH_SERVICES - frozenset(("polkit-1",))


def _door_auth_failure(service, pairs):
    """A failed password at a door whose PAM line is all there is: the
    address is PAM's rhost (Cockpit's web client), the terminal its tty."""
    fields, user = _pam_source_and_user(pairs)
    tty = dict(_PAM_PAIR.findall(pairs.split(" rhost=", 1)[0])).get("tty")
    return dict(fields, action="login_failure", reason="bad_password",
                service=service, user=user,
                tty=(tty or "")[len("/dev/"):] if (tty or "").startswith(
                    "/dev/") else tty or None)


#: pamsignal.detail of a pkexec or doas line whose directory or command
#: imitates the words around them (as SUDO_AMBIGUOUS).
DOOR_AMBIGUOUS = "ambiguous: the directory or command imitates the log text"

_PKEXEC_COMMAND = "] [COMMAND="


def _build_pkexec(match):
    """pkexec's log_message(): `U: WHAT [USER=T] [TTY=t] [CWD=d]
    [COMMAND=c]`. The directory and the command are the caller's text:
    the command is everything after the first "] [COMMAND=" (so the real
    one is in it), and an imitation is flagged."""
    rest = match.group("rest")
    at = rest.find(_PKEXEC_COMMAND)
    if at < 0:
        return None
    what, tty = match.group("what"), match.group("tty")
    fields = {"user": match.group("user"),
              "target_user": match.group("target"),
              "tty": None if tty == "unknown" else tty[len("/dev/"):]
              if tty.startswith("/dev/") else tty,
              "working_directory": rest[:at],
              "command_line": rest[at + len(_PKEXEC_COMMAND):],
              "detail": DOOR_AMBIGUOUS if rest.count(_PKEXEC_COMMAND) > 1
              else None}
    if what == "Executing command":
        fields["action"] = "sudo_command"
    else:
        fields.update(action="login_failure", detail=fields["detail"] or what,
                      reason="dismissed" if what.endswith("dismissed")
                      else "not_authorized")
    return fields


def _build_pkexec_environment(match):
    """pkexec refused a hostile environment (what PwnKit, CVE-2021-4034,
    leaves behind): not a guess, but worth an alert."""
    return {"action": "login_failure", "reason": "refused_environment",
            "severity": 8, "user": match.group("user"),
            "detail": match.group("why")}


def _build_polkit_verdict(match):
    """polkitd's verdict on an authentication. The user is the owner of
    the process that asked (a unix-user:NAME at the very end, after the
    process's command line, the caller's own text)."""
    identity = match.group("identity")
    fields = {"user": match.group("owner"),
              "command_line": match.group("cmdline"),
              "detail": match.group("action_id") if identity is None else
              "%s, authenticated as %s" % (match.group("action_id"),
                                           identity)}
    if identity is None:
        fields.update(action="login_failure", reason="bad_password")
    else:
        fields["action"] = "login_success"
    return fields


def _build_doas_failed(match):
    return {"action": "login_failure", "reason": "bad_password",
            "user": match.group("user")}


def _build_doas_refused(match):
    return {"action": "login_failure", "reason": "command_not_allowed",
            "user": match.group("user"),
            "command_line": match.group("command")}


_DOAS_AS = re.compile(r" as (\S+) from ")


def _build_doas_ran(match):
    """`U ran command CMD as T from CWD`: CMD and CWD are the caller's
    text. With more than one reading the target is root if any says so,
    the command runs to the last " as T from " (the real one is in it)."""
    rest = match.group("rest")
    readings = list(_DOAS_AS.finditer(rest))
    if not readings:
        return None
    last = readings[-1]
    target = next((r.group(1) for r in readings if r.group(1) == "root"),
                  readings[0].group(1))
    return {"action": "sudo_command", "user": match.group("user"),
            "target_user": target if len(readings) > 1 else last.group(1),
            "command_line": rest[:last.start()] if len(readings) > 1
            else rest[:readings[0].start()],
            "working_directory": None if len(readings) > 1
            else rest[readings[0].end():],
            "detail": DOOR_AMBIGUOUS if len(readings) > 1 else None}


def _build_run0_unit(match):
    """PID 1 starting run0's unit: the command, as its description says
    (Run0Commands adds who ran it from the unit's PAM session)."""
    return {"action": "sudo_command", "unit": match.group("unit"),
            "command_line": match.group("command")}


DOOR_RULES = (
    Rule("pkexec", "pkexec", None, re.compile(
        r"^(?P<user>[^\s:]+): (?P<what>Executing command|Error executing "
        r"command as another user: [^\[\]]*?) \[USER=(?P<target>[^\]\s]+)\] "
        r"\[TTY=(?P<tty>[^\]\s]*)\] \[CWD=(?P<rest>.*)\]\Z", re.S),
        _build_pkexec),
    Rule("pkexec", "pkexec_environment", None, re.compile(
        r"^(?P<user>[^\s:]+): (?P<why>The value for (?:the SHELL variable|"
        r"environment variable \S+) [^\[]*) \[USER=", re.S),
        _build_pkexec_environment),
    Rule("polkitd", "polkit_verdict", ("Operator",), re.compile(
        r"^Operator of \S+ (?:FAILED to authenticate|successfully "
        r"authenticated as unix-user:(?P<identity>\S+)) to gain (?:\S+ )?"
        r"authorization for action (?P<action_id>\S+) for \S+ "
        r"\[(?P<cmdline>.*)\] \(owned "
        r"by unix-user:(?P<owner>[^\s()]+)\)\Z", re.S),
        _build_polkit_verdict),
    Rule("doas", "doas_failed", ("failed",), re.compile(
        r"^failed auth for (?P<user>.+)\Z"), _build_doas_failed),
    Rule("doas", "doas_refused", ("command",), re.compile(
        r"^command not permitted for (?P<user>[^\s:]+): (?P<command>.*)\Z",
        re.S), _build_doas_refused),
    Rule("doas", "doas_ran", None, re.compile(
        r"^(?P<user>\S+) ran command (?P<rest>.*)\Z", re.S), _build_doas_ran),
    Rule("pid1", "run0_unit", ("Starting",), re.compile(
        r"^Starting (?P<unit>run-p\d+-i\d+\.service) - \[run0\] "
        r"(?P<command>.*)\.\.\.\Z", re.S), _build_run0_unit),
)

RULES = RULES + DOOR_RULES


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
    for family in set(service.family for service in list(
        WATCHED_SERVICES.values()) + [EXECUTOR_SERVICE, PID1_SERVICE])
}


#: Rules for lines that mean what they say only when sshd's monitor wrote
#: them for its pre-authentication child (" [preauth]"): after login, the
#: user's own sshd process writes the same words when the session ends.
_PREAUTH_ONLY = frozenset(("received_disconnect", "closed_before_auth"))
# (received_auth_fail: "Auth fail" can only come before login.)
#: ... and only without it: closed while the banners were exchanged.
_NOT_PREAUTH = frozenset(("closed_at_banner",))
#: Rules for lines that a logged-in user's own sshd process may write too
#: (OpenSSH before 7.9 ends a session with "Connection closed by H port
#: N"): from a writer that is not sshd they are ignored, not forgeries.
_USER_MAY_WRITE = frozenset(("closed_at_banner",))


def _without_log_prefix(message):
    """The message without sshd's `error: ` (or fatal, warning) prefix."""
    if message.startswith(_LOG_PREFIXES):
        return message[message.index(" ") + 1:]
    return message


def classify_message(family, message):
    """(rule, fields) for a message of a service family; fields is None for
    a recognised line that is not an event, rule is None when unknown."""
    message = _without_log_prefix(message)
    preauth = False
    if message.endswith("]"):
        preauth = message.endswith(" [preauth]")
        if preauth or message.endswith(" [postauth]"):
            message = message[:message.rindex(" [")]
    by_word, anywhere = _RULES_BY_FAMILY[family]
    for rule in by_word.get(_FIRST_WORD.match(message).group(0), anywhere):
        if (rule.name in _PREAUTH_ONLY and not preauth) or \
                (rule.name in _NOT_PREAUTH and preauth):
            continue
        match = rule.pattern.match(message)
        if match is not None:
            return rule, rule.build(match)
    return None, None


#: What the kernel appends to /proc/PID/exe when the file was replaced.
_DELETED = " (deleted)"


def writer_is_genuine(entry, service, accounts=None):
    """Whether the trusted journal fields show the real service wrote this.

    Anyone can `logger -t sshd`; only journald sets the underscore fields.
    `_EXE` is missing when the writer exited before journald looked; then
    the program name decides, but only for root writers: any process can
    name itself "sudo" (prctl) and exit, so a non-root writer (the caller
    of setuid sudo or su) must show the real executable. A service that
    runs as an account of its own (polkitd) is trusted as root only with
    that account's UID, from `accounts` (name -> UID text, see
    service_account_uids).
    """
    uid = journal_text(entry.get("_UID"))
    if service.account is not None and uid is not None and \
            uid == (accounts or {}).get(service.account):
        uid = "0"
    comm = journal_text(entry.get("_COMM"))
    if service is EXECUTOR_SERVICE:
        comm = None  # its name is the command's; its _EXE decides
    return _writer_verdict(journal_text(entry.get("_TRANSPORT")), uid,
                           journal_text(entry.get("_EXE")), comm, service)


@functools.lru_cache(maxsize=1024)
def _writer_verdict(transport, uid, exe, comm, service):
    """writer_is_genuine on the fields themselves (writers repeat)."""
    if transport not in TRUSTED_TRANSPORTS:
        return False
    if uid is None or (uid != "0" and not service.setuid):
        return False
    if uid != "0" and transport not in CALLER_TRANSPORTS:
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


#: Rules for lines whose writer, as root, executes the command it names
#: at once (doas's child, pkexec; and systemd-executor, whatever it
#: logs): journald may then see the command's program and executable.
#: Only root can write them, so root's UID is trusted for them whatever
#: the program (measured: doas's "ran command id" came with _COMM=id and
#: no _EXE).
_LOGGED_BEFORE_EXEC = frozenset(("doas_ran", "pkexec"))


def _logged_before_exec(entry, rule, service):
    return (rule.name in _LOGGED_BEFORE_EXEC or
            service is EXECUTOR_SERVICE) and _root_writer(entry)


def _root_writer(entry):
    """Root wrote it through a transport only journald fills in."""
    return journal_text(entry.get("_UID")) == "0" and \
        journal_text(entry.get("_TRANSPORT")) in TRUSTED_TRANSPORTS


#: Rules whose acting user a setuid program names from its real UID
#: (getpwuid(getuid())), the UID journald records: sudo's text and JSON
#: lines, doas's and pkexec's. (su's may name the terminal's login name,
#: and pam_unix's `by NAME` always does: their names are not tied.)
_CALLER_NAMED_RULES = frozenset(("sudo", "json", "doas_failed",
                                 "doas_refused", "pkexec",
                                 "pkexec_environment"))
#: The PAM service a PAM module's line names: `pam_unix(SERVICE:...)`.
_PAM_SERVICE = re.compile(r"^\w+\(([^:()\s]+):")


def pam_service_named(message):
    """The service a PAM module's line names (after any prefix the rules
    also read past), or None."""
    match = _PAM_SERVICE.match(_without_log_prefix(message))
    return match.group(1) if match is not None else None
#: pam_unix's `uid=N` in its failure line: getuid() of the writer.
_PAM_FAILURE_UID = re.compile(r"(?:; |\s)uid=(\d+)\s")


def untied_claim(entry, rule, fields, service, pam_service=None):
    """Why a line a setuid program's caller wrote (journald's `_UID` is
    not root) claims more than that caller can, or None.

    Such a writer's `_EXE` proves little: in a user and mount namespace of
    its own, a user can bind any program over /usr/bin/sudo and run it, and
    journald sees the user's own UID with sudo's path. So what the line
    says must be about that UID: the `by (uid=N)` of a session and the
    `uid=N` of a PAM failure are the writer's; a name the program takes
    from its real UID is not root's; a PAM service is the program's own;
    and no session it opens is a login (the doors in log those as root).
    Names of other accounts are compared by the running agent, which can
    read the account database (ActingUsers)."""
    uid = journal_text(entry.get("_UID"))
    if not service.setuid or uid == "0":
        return None
    if rule.family == "pam":
        if pam_service not in (service.pam_services or ()):
            return "a PAM line of service %s from %s's caller" % (
                pam_service, service.name)
        if fields.get("action") == "login_success":
            return "a login written by UID %s" % uid
        if rule.name == "session_opened" and fields.get("user_id") != uid:
            return "the session names UID %s, but UID %s wrote it" % (
                fields.get("user_id"), uid)
        if rule.name == "auth_failure":
            found = _PAM_FAILURE_UID.search(journal_text(entry.get(
                "MESSAGE")) or "")
            # (pam_ldap's failure names no UID: its user is then checked
            # by name, live, as sudo's are: ActingUsers)
            if found is not None and found.group(1) != uid:
                return "the failure names UID %s, but UID %s wrote it" % (
                    found.group(1), uid)
    if (rule.name in _CALLER_NAMED_RULES or rule.name == "auth_failure" and
            fields.get("service") == "sudo") and fields.get("user") == "root":
        return "the line names root, but UID %s wrote it" % uid
    return None


def _entry_timestamp(entry):
    """The entry's own time in microseconds, or None if it has none that
    can be: missing, not a number, or past MAX_TIMESTAMP_US."""
    timestamp_us = parse_int(journal_text(entry.get("__REALTIME_TIMESTAMP")))
    return timestamp_us if timestamp_us is not None and \
        timestamp_us <= MAX_TIMESTAMP_US else None


def _claimed_time(entry):
    """What an entry with an impossible time claimed, for the record."""
    claimed = journal_text(entry.get("__REALTIME_TIMESTAMP"))
    return "(none)" if claimed is None else claimed[:40]


def _context_key(entry, fields, service):
    boot = journal_text(entry.get("_BOOT_ID")) or ""
    if fields.get("session_id") is not None:
        return "%s/logind/%s" % (boot, fields["session_id"])
    return "%s/%s/%s" % (boot, journal_text(entry.get("_PID")),
                         fields.get("service") or service.name)


def parse_entry(entry, read_at_us=0, accounts=None):
    """One journal entry (dict as journalctl -o json gives it) -> Event|None.

    Pure: no clock, file or socket. Entries of unwatched identifiers, unknown
    messages and companion lines give None; an auth message written by a
    process that is not the real service gives a `spoofed_entry`. An entry
    whose own time is impossible keeps its event, stamped `read_at_us` (when
    it was read), with the claimed time in `journal_time`. `accounts` maps
    service accounts to their UIDs (see writer_is_genuine).
    """
    identifier = journal_text(entry.get("SYSLOG_IDENTIFIER"))
    service = WATCHED_SERVICES.get(identifier) or \
        unlisted_service(identifier)
    if service is None:
        return parse_suppression(entry)
    message = journal_text(entry.get("MESSAGE"))
    if not message:
        return None
    if len(message) > MAX_UNTRUSTED_MESSAGE_CHARS:
        # A forger's text only needs reading far enough to see its claim.
        # Root may be doas or pkexec logging just before it executes the
        # command, under the command's name: whether that is genuine is
        # known only from the rule (_logged_before_exec), so root's text
        # is read as far as a genuine writer's.
        whole = writer_is_genuine(entry, service, accounts) or \
            _root_writer(entry)
        message = message[:MAX_MESSAGE_CHARS if whole else
                          MAX_UNTRUSTED_MESSAGE_CHARS]
    rule, fields = classify_message(service.family, message)
    if fields is None:  # most lines: read no more of them
        return None
    pam_service = pam_service_named(message) if rule.family == "pam" \
        else None
    if rule.family == "pam" and service.pam_services is not None and \
            pam_service not in service.pam_services and \
            (not service.setuid or journal_text(entry.get("_UID")) == "0"):
        return None  # e.g. a greeter's session, a user's service manager
    timestamp_us = _entry_timestamp(entry)
    genuine = writer_is_genuine(entry, service, accounts) or \
        _logged_before_exec(entry, rule, service)
    untied = untied_claim(entry, rule, fields, service, pam_service) \
        if genuine else None
    common = {"timestamp_us": read_at_us if timestamp_us is None
              else timestamp_us,
              "journal_time": None if timestamp_us is not None
              else _claimed_time(entry),
              "hostname": journal_text(entry.get("_HOSTNAME")),
              "pid": parse_int(journal_text(entry.get("_PID"))),
              "cursor": journal_text(entry.get("__CURSOR")),
              "message": message.rstrip("\n")}
    if not genuine or untied:
        if rule.name in _USER_MAY_WRITE:
            return None
        return Event(action="spoofed_entry", service=service.name,
                     writer_uid=parse_int(journal_text(entry.get("_UID"))),
                     process_name=journal_text(entry.get("_COMM")),
                     process_executable=journal_text(entry.get("_EXE")),
                     claimed_action=fields["action"], detail=untied,
                     **common)
    fields.setdefault("service", service.name)
    if service is EXECUTOR_SERVICE:  # its unit ties it to run0's command
        fields["unit"] = journal_text(entry.get("_SYSTEMD_UNIT"))
    writer_uid = journal_text(entry.get("_UID"))
    if service.setuid and writer_uid != "0" and not fields.get("user_id"):
        fields["user_id"] = writer_uid  # the caller of setuid sudo or su
    fields["context_key"] = _context_key(entry, fields, service)
    if entry.get(SUDO_CUT_KEY) and rule.family == "sudo":
        # A joined line whose continuation was not read (SudoContinuations).
        fields["detail"] = "; ".join(filter(None, (fields.get("detail"),
                                                   SUDO_TEXT_CUT)))
    fields.update(common)
    return Event(**fields)


def is_login_unit(unit):
    """Whether a systemd unit is one whose lines carry logins."""
    return any(fnmatch.fnmatchcase(unit, pattern) for pattern in LOGIN_UNITS)


#: Who writes the suppression entry: journald itself, through its own
#: "driver" transport (a client cannot set underscore fields).
JOURNALD_IDENTIFIER = "systemd-journald"


def parse_suppression(entry):
    """journald's "Suppressed N messages from UNIT" -> journal_suppressed
    when UNIT carries logins (lines, maybe a login, were dropped); the same
    claim written by any other process -> spoofed_entry; else None."""
    if journal_text(entry.get("MESSAGE_ID")) != JOURNAL_DROPPED_MESSAGE_ID:
        return None
    unit = journal_text(entry.get("OBJECT_SYSTEMD_UNIT"))
    timestamp_us = _entry_timestamp(entry)
    if not unit or not is_login_unit(unit) or timestamp_us is None:
        return None
    identifier = journal_text(entry.get("SYSLOG_IDENTIFIER"))
    message = journal_text(entry.get("MESSAGE")) or ""
    common = {"timestamp_us": timestamp_us, "unit": unit,
              "hostname": journal_text(entry.get("_HOSTNAME")),
              "cursor": journal_text(entry.get("__CURSOR")),
              "message": message[:MAX_UNTRUSTED_MESSAGE_CHARS].rstrip("\n")}
    if journal_text(entry.get("_TRANSPORT")) != "driver" or \
            identifier != JOURNALD_IDENTIFIER:
        return Event(action="spoofed_entry", service=identifier,
                     writer_uid=parse_int(journal_text(entry.get("_UID"))),
                     pid=parse_int(journal_text(entry.get("_PID"))),
                     process_name=journal_text(entry.get("_COMM")),
                     process_executable=journal_text(entry.get("_EXE")),
                     claimed_action="journal_suppressed", **common)
    return Event(action="journal_suppressed", service=JOURNALD_IDENTIFIER,
                 dropped=parse_int(journal_text(entry.get("N_DROPPED"))),
                 **common)


def _quoted_names_pattern(names):
    """A bytes regex of any of the names as a JSON string; the lookahead on
    their first letters lets most of a line's quotes fail at once, where
    the alternation alone is tried name by name after each of them."""
    return re.compile(('"(?=[%s])(?:%s)"' % (
        "".join(sorted(set(re.escape(name[0]) for name in names))),
        "|".join(re.escape(name) for name in names))).encode())


#: '"sshd"', '"sudo"', ...: an entry lacking all of them cannot be watched
#: (journald's suppression entries are watched too).
_WATCHED_NAME_BYTES = _quoted_names_pattern(sorted(WATCHED_SERVICES) + [
    JOURNAL_DROPPED_MESSAGE_ID, EXECUTOR_EXE, UNIT_STARTING_MESSAGE_ID])


#: One decoder for every line: json.loads costs a third more per line.
_JSON_DECODER = json.JSONDecoder()
_JSON_WHITE_SPACE = " \t\n\r"


def decode_line(line):
    """One line of journalctl -o json output -> entry dict, or None (also
    for anything but white space after the object)."""
    text = (line.decode("utf-8", "replace") if isinstance(line, bytes)
            else line).lstrip(_JSON_WHITE_SPACE)
    try:
        entry, end = _JSON_DECODER.raw_decode(text)
        if "\\u" in text and ("\\ud" in text or "\\uD" in text):
            # An escape can make a lone surrogate, which no UTF-8 text can
            # carry (journalctl never writes one): U+FFFD instead, as for
            # any other bytes that are not UTF-8.
            entry = json.loads(json.dumps(entry, ensure_ascii=False).encode(
                "utf-8", "surrogatepass").decode("utf-8", "replace"))
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]]
        return None
    if not isinstance(entry, dict) or text[end:].strip(_JSON_WHITE_SPACE):
        return None
    return entry


# ---------------------------------------------------------------------------
# 7c privileged sessions: TTY audit records (pam_tty_audit)
# ---------------------------------------------------------------------------
#
# With pam_tty_audit in a session's PAM stack the kernel records what is
# typed on the session's terminal: TTY records (type 1319) hold the bytes
# the shell read, hex-encoded, and USER_TTY (1124) a line a shell pushed
# itself. journald stores each with _TRANSPORT=audit and the kernel's
# fields as trusted ones (_PID, _UID, _AUDIT_SESSION, _AUDIT_FIELD_DATA).
# Only that transport is read: no user can write it (a `logger -t audit`
# copy arrives as syslog), and the kernel log's copy of each record
# (_TRANSPORT=kernel, "audit: type=1319 ..."), written when no auditd runs,
# is never read, so a record never counts twice.
#
# decode_keystrokes() turns the bytes into command lines the way readline
# edits them; TypedInput (section 9) hands them to the session they were
# typed in. Everything here is pure.

#: _AUDIT_TYPE of the records read: the kernel's keystrokes (TTY), a line a
#: shell pushed (USER_TTY), and PAM's session start and end (USER_START,
#: USER_END), whose _PID and _AUDIT_SESSION tie a session's process to its
#: audit session.
AUDIT_TTY, AUDIT_USER_TTY = "1319", "1124"
AUDIT_USER_START, AUDIT_USER_END = "1105", "1106"

#: The record kinds read, in the order of journal_matches().
AUDIT_KINDS = (AUDIT_TTY, AUDIT_USER_TTY, AUDIT_USER_START, AUDIT_USER_END)

#: How long a session_closed waits for PAM's USER_END record of its
#: process: the kernel sends the audit records in order, so the shell's
#: last keystrokes come before it, though journald may store the sshd line
#: that closes the session first (another socket).
TTY_HOLD_US = 5 * 1000000

#: The audit session id of a process in no login session.
NO_AUDIT_SESSION = "4294967295"

#: Journal fields read besides JOURNAL_FIELDS when tty_audit is on.
TTY_AUDIT_FIELDS = ("_AUDIT_TYPE", "_AUDIT_SESSION", "_AUDIT_FIELD_DATA")

#: Longest data= field decoded (hex digits); the kernel's buffer is 4 KiB
#: (8 KiB of hex) and a USER_TTY message at most 8,970 bytes.
MAX_AUDIT_DATA_HEX = 32768

#: Longest line kept of what was typed; the rest is cut ("…").
MAX_TYPED_LINE_CHARS = 500

#: Lines and characters of typed input kept per session; further lines are
#: counted ("N more").
MAX_TYPED_LINES = 100
MAX_TYPED_CHARS = 16384

#: Sessions whose typed input is kept at once (the oldest go first).
MAX_TYPED_SESSIONS = 1000

AuditRecord = collections.namedtuple(
    "AuditRecord", "kind boot pid audit_session uid data")
AuditRecord.__doc__ = """A trusted audit record: `kind` one of AUDIT_KINDS;
the writer's boot, PID, audit session id and UID (text); `data` the typed
bytes (b"" for USER_START and USER_END)."""

_HEX_DATA = re.compile(r"\A(?:[0-9A-Fa-f]{2})+\Z")


def audit_data(value):
    """The bytes of an audit `data=` field: hex (TTY records, and USER_TTY
    text with spaces or controls) or a plain "quoted" string (USER_TTY
    text without); None when it is neither or too long."""
    if not value or len(value) > MAX_AUDIT_DATA_HEX:
        return None
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].encode("utf-8", "replace")
    return bytes.fromhex(value) if _HEX_DATA.match(value) else None


def audit_session_of(entry):
    """The entry's trusted _AUDIT_SESSION, or None outside a session."""
    session = journal_text(entry.get("_AUDIT_SESSION"))
    if not session or session == NO_AUDIT_SESSION or not session.isdigit():
        return None
    return session


def parse_audit_record(entry):
    """A TTY, USER_TTY, USER_START or USER_END record journald took from the
    kernel -> AuditRecord; None for anything else (every other transport,
    other types, records outside a login session, data that is not hex)."""
    if journal_text(entry.get("_TRANSPORT")) != "audit":
        return None
    kind = journal_text(entry.get("_AUDIT_TYPE"))
    if kind not in AUDIT_KINDS:
        return None
    session = audit_session_of(entry)
    pid = journal_text(entry.get("_PID"))
    if session is None or not pid:
        return None
    data = b""
    if kind in (AUDIT_TTY, AUDIT_USER_TTY):
        data = audit_data(journal_text(entry.get("_AUDIT_FIELD_DATA")))
        if data is None:
            return None
    return AuditRecord(kind, journal_text(entry.get("_BOOT_ID")) or "", pid,
                       session, journal_text(entry.get("_UID")), data)


# -- keystrokes -> command lines ----------------------------------------------
#
# readline's default (emacs) keys, applied to a model of the line: text
# and a cursor. Keys whose effect depends on text that is not in the data
# (tab completion, history, reverse search) leave a mark such as <tab> or
# <up> in the line; from then on the line is no longer known exactly, so
# further editing keys are shown as marks too (<bs>, <left>, ...) rather
# than applied to the wrong text.

#: Control bytes -> the editing they do (None: no effect on the line).
_CONTROL_KEYS = {
    0x01: "home", 0x02: "left", 0x03: "cancel", 0x04: "eof", 0x05: "end",
    0x06: "right", 0x07: None, 0x08: "backspace", 0x09: "<tab>",
    0x0a: "enter", 0x0b: "kill_end", 0x0c: None, 0x0d: "enter",
    0x0e: "<down>", 0x10: "<up>", 0x12: "<^R>", 0x13: "<^S>",
    0x15: "kill_start", 0x17: "kill_word", 0x19: "<^Y>", 0x1f: "<^_>",
    0x7f: "backspace"}

#: The tail of an escape sequence (after ESC [ or ESC O, or the byte after
#: a lone ESC) -> the editing it does.
_ESCAPE_KEYS = {
    "[A": "<up>", "[B": "<down>", "[C": "right", "[D": "left",
    "OA": "<up>", "OB": "<down>", "OC": "right", "OD": "left",
    "[H": "home", "[F": "end", "OH": "home", "OF": "end", "[1~": "home",
    "[7~": "home", "[4~": "end", "[8~": "end", "[3~": "delete",
    "[2~": None, "[200~": None, "[201~": None,  # insert, bracketed paste
    "[5~": "<pgup>", "[6~": "<pgdn>",
    "[1;5C": "word_right", "[1;5D": "word_left", "[1;3C": "word_right",
    "[1;3D": "word_left", "f": "word_right", "b": "word_left",
    "\x7f": "kill_alnum_word", "\x08": "kill_alnum_word"}

#: What an editing key shows as once the line is not known exactly.
_EDIT_MARKS = {
    "backspace": "<bs>", "delete": "<del>", "left": "<left>",
    "right": "<right>", "home": "<home>", "end": "<end>",
    "kill_start": "<^U>", "kill_end": "<^K>", "kill_word": "<^W>",
    "kill_alnum_word": "<M-bs>",
    "word_left": "<M-b>", "word_right": "<M-f>", "eof": "<^D>"}

#: One key: an escape sequence (whole, or cut off at the end of the data),
#: a control byte, or a run of text.
_KEY_TOKEN = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1bO[ -~]|\x1b\[[0-?]*[ -/]*\Z|\x1bO?\Z"
    rb"|\x1b[\x08\x20-\x7f]|[\x00-\x1f\x7f]|[\x20-\x7e\x80-\xff]+")

KeyCarry = collections.namedtuple("KeyCarry",
                                  "tokens cursor pending after_cr cut")
KeyCarry.__doc__ = """The line being typed when a record ended: its tokens
(characters and marks), the cursor, bytes of a key cut off, whether the
last key was a CR (a LF right after it ends no second line), and whether
the line was cut at MAX_TYPED_LINE_CHARS."""

#: Nothing typed yet.
NO_CARRY = KeyCarry((), 0, b"", False, False)


def _utf8_cut(run):
    """Where the run ends in a whole UTF-8 character: the bytes after it
    may be a character the next record completes."""
    for back in range(1, min(4, len(run)) + 1):
        byte = run[-back]
        if byte < 0x80:
            return len(run)
        if byte >= 0xc0:  # the lead byte: does its character fit?
            needed = 2 if byte < 0xe0 else 3 if byte < 0xf0 else 4
            return len(run) if back >= needed else len(run) - back
    return len(run)


class _LineEditor:
    """The line as readline would hold it (used by decode_keystrokes)."""

    def __init__(self, carry):
        self.tokens = list(carry.tokens)
        self.cursor = carry.cursor
        self.after_cr = carry.after_cr
        self.cut = carry.cut
        self.lines = []

    def exact(self):
        return not any(len(token) > 1 for token in self.tokens)

    def insert(self, token):
        if len(self.tokens) >= MAX_TYPED_LINE_CHARS:
            self.cut = True
            return
        self.tokens.insert(self.cursor, token)
        self.cursor += 1

    def end_line(self, mark=""):
        text = "".join(self.tokens) + ("\u2026" if self.cut else "") + mark
        if text:
            self.lines.append(text)
        self.tokens, self.cursor, self.cut = [], 0, False

    def key(self, action):
        """Apply one named key (or insert its mark)."""
        if action is None:
            return
        if action.startswith("<"):
            self.cursor = len(self.tokens)
            self.insert(action)
        elif action == "enter":
            self.end_line()
        elif action == "cancel":
            self.end_line("<^C>")
        elif action == "eof" and not self.tokens:
            self.lines.append("<^D>")
        elif not self.exact():
            self.key(_EDIT_MARKS[action])
        else:
            self._edit(action)

    def _edit(self, action):
        tokens, cursor = self.tokens, self.cursor
        if action == "backspace" and cursor:
            del tokens[cursor - 1]
            self.cursor -= 1
        elif action in ("delete", "eof"):
            del tokens[cursor:cursor + 1]
        elif action in ("left", "right"):
            self.cursor = max(0, min(len(tokens), cursor + (
                -1 if action == "left" else 1)))
        elif action in ("home", "kill_start"):
            if action == "kill_start":
                del tokens[:cursor]
            self.cursor = 0
        elif action == "end":
            self.cursor = len(tokens)
        elif action == "kill_end":
            del tokens[cursor:]
        elif action in ("kill_word", "kill_alnum_word"):
            # Ctrl-W: back to a blank; Alt-Backspace: to a non-alphanumeric
            start = self._word_start(cursor, str.isspace if
                                     action == "kill_word" else _not_word)
            del tokens[start:cursor]
            self.cursor = start
        elif action == "word_left":
            self.cursor = self._word_start(cursor, _not_word)
        elif action == "word_right":
            while cursor < len(tokens) and _not_word(tokens[cursor]):
                cursor += 1
            while cursor < len(tokens) and not _not_word(tokens[cursor]):
                cursor += 1
            self.cursor = cursor

    def _word_start(self, cursor, separates):
        while cursor and separates(self.tokens[cursor - 1]):
            cursor -= 1
        while cursor and not separates(self.tokens[cursor - 1]):
            cursor -= 1
        return cursor


def _not_word(character):
    return not character.isalnum()


def decode_keystrokes(data, carry=NO_CARRY):
    """Bytes a terminal's reader got (a TTY record's data) -> (the command
    lines they finished, the carry for the next record of that reader).

    Pure. CR or LF ends a line (CR LF ends one); Ctrl-C ends it with
    <^C> (typed, not run); Ctrl-D on an empty line is <^D>. Backspace, DEL,
    Delete, arrows, Home/End, Ctrl-A/E/B/F/K/U/W and Alt-B/F edit the line;
    tab, history and search keys leave a mark (<tab>, <up>, <^R>); other
    control bytes show as <^X>, other escape sequences as <esc>. Input
    that is not UTF-8 becomes U+FFFD. Empty lines are left out.
    """
    editor = _LineEditor(carry)
    data = carry.pending + data
    position = 0
    for match in _KEY_TOKEN.finditer(data):
        token = match.group(0)
        position = match.end()
        if token[0] == 0x1b and match.end() == len(data) and (
                len(token) == 1 or token[:2] in (b"\x1b[", b"\x1bO")) and \
                not (len(token) > 2 and 0x40 <= token[-1] <= 0x7e):
            position = match.start()  # cut off: the next record ends it
            break
        after_cr, editor.after_cr = editor.after_cr, token == b"\r"
        if token == b"\n" and after_cr:
            continue
        if token[0] == 0x1b:
            tail = token[1:].decode("ascii", "replace")
            editor.key(_ESCAPE_KEYS.get(tail, "<esc>" if tail[:1] in "[O"
                                        else "<M-%s>" % tail))
        elif len(token) == 1 and (token[0] < 0x20 or token[0] == 0x7f):
            editor.key(_CONTROL_KEYS.get(token[0], "<^%s>" % chr(
                token[0] + 0x40)))
        else:
            whole = _utf8_cut(token) if match.end() == len(data) \
                else len(token)
            for character in token[:whole].decode("utf-8", "replace"):
                editor.insert(character)
            position = match.start() + whole
    pending = data[position:]
    return editor.lines, KeyCarry(tuple(editor.tokens), editor.cursor,
                                  pending[-64:], editor.after_cr, editor.cut)


def unfinished_line(carry):
    """What was typed but never entered when the reader's session ended,
    marked <no enter>; None when nothing was."""
    if not carry.tokens:
        return None
    return "".join(carry.tokens) + ("\u2026" if carry.cut else "") + \
        "<no enter>"


# ---------------------------------------------------------------------------
# 8 enrichment
# ---------------------------------------------------------------------------
#
# Context for an event: who holds its source address (MaxMind DB files:
# ASN, country, city), which local address a session came in through
# (/proc/net/tcp*), and which provider runs this server (DMI). Every byte
# of a database is hostile: the reader bounds every read, nesting and size
# and says DatabaseError rather than crash, hang or fill the memory.


# -- the MaxMind DB reader ----------------------------------------------------


#: What precedes the metadata map of every MaxMind DB file.
MMDB_MARKER = b"\xab\xcd\xefMaxMind.com"

#: The metadata and its marker lie within this many bytes of the end.
MMDB_METADATA_MAX = 128 * 1024

#: Deepest nesting of maps and arrays accepted (libmaxminddb's limit).
MMDB_MAX_DEPTH = 512

#: Most values one record may decode to, pointers followed: bounds the
#: work a file of pointers to shared maps could ask for.
MMDB_MAX_VALUES = 65536

#: Most bytes of text and bytes one record may decode to.
MMDB_MAX_RECORD_BYTES = 2 * 1024 * 1024

#: Answers remembered per database, by address (where its record lies).
MMDB_CACHE_SIZE = 4096

#: Decoded records are remembered per database by where they lie, so the
#: addresses of one network share one copy, up to this much memory...
MMDB_RECORD_CACHE_BYTES = 16 * 1024 * 1024

#: ... counting each value as this many bytes and each byte of text as
#: four (more than Python takes: the bound holds whatever the file says).
MMDB_VALUE_BYTES = 128

#: Shared values (map keys, country maps: what pointers point at)
#: remembered per database, by offset...
MMDB_SHARED_CACHE_SIZE = 4096

#: ... when they are this small (in values, and bytes of text), so the
#: cache stays within a few MiB whatever the file holds.
MMDB_SHARED_MAX_VALUES, MMDB_SHARED_MAX_BYTES = 64, 512

#: Below this depth a shared value may come from the cache (its own
#: nesting cannot then reach MMDB_MAX_DEPTH).
_MMDB_SHARED_DEPTH = MMDB_MAX_DEPTH - MMDB_SHARED_MAX_VALUES

_MMDB_TYPE_NAMES = {1: "pointer", 2: "utf8_string", 3: "double",
                    4: "bytes", 5: "uint16", 6: "uint32", 7: "map",
                    8: "int32", 9: "uint64", 10: "uint128", 11: "array",
                    12: "data cache container", 13: "end marker",
                    14: "boolean", 15: "float"}

#: Largest payload of each integer type, in bytes.
_MMDB_INT_BYTES = {5: 2, 6: 4, 8: 4, 9: 8, 10: 16}

_DOUBLE = struct.Struct(">d")
_FLOAT = struct.Struct(">f")


class _Decoder:
    """Decodes data fields of one section of a MaxMind DB buffer: `base`
    is where its pointers count from, `end` where it stops."""

    def __init__(self, buffer, base, end):
        self.buffer = buffer
        self.base = base
        self.end = end
        self.shared = {}  # offset -> (value, values in it, bytes in it)

    def decode(self, offset):
        """The value at absolute `offset` (one whole record)."""
        return self.decode_sized(offset)[0]

    def decode_sized(self, offset):
        """(value at absolute `offset`, most bytes of memory it can take:
        MMDB_VALUE_BYTES a value, four a byte of text)."""
        budget = [MMDB_MAX_VALUES, MMDB_MAX_RECORD_BYTES]
        try:
            value = self._value(offset, 0, budget)[0]
        except RecursionError:  # a very deep stack at the caller already
            raise DatabaseError("data nested too deeply") from None
        return value, (MMDB_VALUE_BYTES * (MMDB_MAX_VALUES - budget[0]) +
                       4 * (MMDB_MAX_RECORD_BYTES - budget[1]))

    def _fail(self, offset, message):
        raise DatabaseError("corrupt data at byte %d: %s" % (offset, message))

    def _take(self, offset, size, what):
        if size > self.end - offset:
            self._fail(offset, "%s of %d bytes runs past the end of the "
                       "section" % (what, size))
        return self.buffer[offset:offset + size]

    def _value(self, offset, depth, budget):
        """(value, offset after it); one Python frame per nesting level."""
        buffer, end = self.buffer, self.end
        if not 0 <= offset < end:
            self._fail(offset, "offset outside the data section")
        budget[0] -= 1
        if budget[0] < 0:
            self._fail(offset, "more than %d values in one record"
                       % MMDB_MAX_VALUES)
        control = buffer[offset]
        resume = None
        if control >> 5 == 1:
            target, resume = self._pointer(control, offset)
            if not 0 <= target < end:
                self._fail(offset, "pointer to %d, outside the section"
                           % (target - self.base))
            control = buffer[target]
            if control >> 5 == 1:
                self._fail(offset, "pointer to a pointer")
            # Deep down, decode again: the depth limit must see it all.
            cached = self.shared.get(target) if depth < _MMDB_SHARED_DEPTH \
                else None
            if cached is not None:
                # Shared, but charged in full: a record stays as bounded
                # as if every pointer had been decoded again.
                budget[0] -= cached[1] - 1
                budget[1] -= cached[2]
                if budget[0] < 0 or budget[1] < 0:
                    self._fail(offset, "more than %d values or %d bytes in "
                               "one record" % (MMDB_MAX_VALUES,
                                               MMDB_MAX_RECORD_BYTES))
                return cached[0], resume
            before = (budget[0] + 1, budget[1])
            offset = target
        start = offset
        offset += 1
        kind = control >> 5
        if kind == 0:
            if offset >= end:
                self._fail(start, "extended type past the end")
            kind = buffer[offset] + 7
            offset += 1
            if not 8 <= kind <= 15:
                self._fail(start, "invalid extended type %d" % kind)
        size = control & 0x1F
        if size >= 29:
            extra = size - 28
            raw = self._take(offset, extra, "a size")
            offset += extra
            size = (29, 285, 65821)[extra - 1] + int.from_bytes(raw, "big")
        if kind == 7:  # maps and arrays here: one frame a level
            self._check_count(size, offset, depth, budget, start, 2)
            value = {}
            for _ in range(size):
                key_at = offset
                key, offset = self._value(offset, depth + 1, budget)
                if type(key) is not str:
                    self._fail(key_at, "map key is not a string")
                value[key], offset = self._value(offset, depth + 1, budget)
        elif kind == 11:
            self._check_count(size, offset, depth, budget, start, 1)
            value = []
            for _ in range(size):
                item, offset = self._value(offset, depth + 1, budget)
                value.append(item)
        else:
            value, offset = self._scalar(kind, size, offset, start, budget)
        if resume is None:
            return value, offset
        values, size = before[0] - budget[0], before[1] - budget[1]
        if values <= MMDB_SHARED_MAX_VALUES and size <= MMDB_SHARED_MAX_BYTES:
            if len(self.shared) >= MMDB_SHARED_CACHE_SIZE:
                self.shared.clear()
            self.shared[start] = (value, values, size)
        return value, resume

    def _scalar(self, kind, size, offset, start, budget):
        """(value, offset after it) of a field that holds no other."""
        if kind == 2 or kind == 4:
            budget[1] -= size
            if budget[1] < 0:
                self._fail(start, "record larger than %d bytes"
                           % MMDB_MAX_RECORD_BYTES)
            raw = self._take(offset, size, "a string" if kind == 2
                             else "bytes")
            return (raw.decode("utf-8", "replace") if kind == 2
                    else bytes(raw)), offset + size
        if kind in _MMDB_INT_BYTES:
            if size > _MMDB_INT_BYTES[kind]:
                self._fail(start, "%s of %d bytes"
                           % (_MMDB_TYPE_NAMES[kind], size))
            return int.from_bytes(self._take(offset, size, "an integer"),
                                  "big", signed=kind == 8 and size == 4), \
                offset + size
        if kind == 3 or kind == 15:
            width, layout = (8, _DOUBLE) if kind == 3 else (4, _FLOAT)
            if size != width:
                self._fail(start, "%s of %d bytes (must be %d)"
                           % (_MMDB_TYPE_NAMES[kind], size, width))
            return layout.unpack(self._take(offset, size, "a number"))[0], \
                offset + size
        if kind == 14:
            if size > 1:
                self._fail(start, "boolean of value %d" % size)
            return size == 1, offset
        self._fail(start, "unexpected %s" % _MMDB_TYPE_NAMES[kind])  # 12, 13

    def _pointer(self, control, offset):
        """(absolute target, offset after the pointer)."""
        length = ((control >> 3) & 3) + 1
        raw = self._take(offset + 1, length, "a pointer")
        if length == 4:
            target = int.from_bytes(raw, "big")
        else:
            target = ((control & 7) << (8 * length)) + int.from_bytes(
                raw, "big") + (0, 2048, 526336)[length - 1]
        return self.base + target, offset + 1 + length

    def _check_count(self, count, offset, depth, budget, start, per_item):
        if depth >= MMDB_MAX_DEPTH:
            self._fail(start, "maps and arrays nested deeper than %d"
                       % MMDB_MAX_DEPTH)
        if count > budget[0]:
            self._fail(start, "more than %d values in one record"
                       % MMDB_MAX_VALUES)
        if count * per_item > self.end - offset:
            self._fail(start, "%d items cannot fit" % count)


def _metadata_problem(metadata):
    """What is wrong with a decoded metadata map, or None."""
    if not isinstance(metadata, dict):
        return "the metadata is not a map"
    for key in ("node_count", "record_size", "ip_version",
                "binary_format_major_version"):
        if type(metadata.get(key)) is not int:
            return "the metadata lacks %s" % key
    if metadata["node_count"] < 0:
        return "a negative node count"
    if metadata["binary_format_major_version"] != 2:
        return "binary format version %d, not 2" % metadata[
            "binary_format_major_version"]
    if metadata["record_size"] not in (24, 28, 32):
        return "record size %d (must be 24, 28 or 32)" % metadata[
            "record_size"]
    if metadata["ip_version"] not in (4, 6):
        return "IP version %d (must be 4 or 6)" % metadata["ip_version"]
    return None


class MMDBReader:
    """A MaxMind DB (format 2) in a buffer: bytes, or a file mapped with
    `MMDBReader.open(path)`. `lookup(address)` gives the record of the
    network holding the address, or None; where the record lies is cached
    per address, and the record itself once per place, within
    MMDB_RECORD_CACHE_BYTES (records are shared: do not modify them)."""

    def __init__(self, buffer, name="<buffer>"):
        self.name = name
        self.buffer = buffer
        self._file = None  # set by open(): to notice a file cut short
        self._closers = ()
        size = len(buffer)
        marker = buffer.rfind(MMDB_MARKER, max(0, size - MMDB_METADATA_MAX))
        if marker < 0:
            raise DatabaseError("%s: not a MaxMind DB file (no metadata "
                                "marker)" % name)
        meta_start = marker + len(MMDB_MARKER)
        try:
            metadata = _Decoder(buffer, meta_start, size).decode(meta_start)
        except DatabaseError as error:
            raise DatabaseError("%s: unreadable metadata: %s"
                                % (name, error)) from None
        problem = _metadata_problem(metadata)
        if problem:
            raise DatabaseError("%s: %s" % (name, problem))
        self.metadata = metadata
        self.node_count = metadata["node_count"]
        self.record_size = metadata["record_size"]
        self.ip_version = metadata["ip_version"]
        self.node_bytes = self.record_size // 4
        tree_size = self.node_count * self.node_bytes
        if tree_size + 16 > marker:
            raise DatabaseError("%s: the search tree of %d nodes does not fit"
                                " in the file" % (name, self.node_count))
        if buffer[tree_size:tree_size + 16] != bytes(16):
            raise DatabaseError("%s: no data section separator after the "
                                "search tree" % name)
        self.data_start = tree_size + 16
        self.data_end = marker
        self.decoder = _Decoder(buffer, self.data_start, marker)
        self.cache = collections.OrderedDict()  # address: (offset, prefix)
        self.records = collections.OrderedDict()  # offset: (record, bytes)
        self.records_bytes = 0
        self.ipv4_start = 0
        if self.ip_version == 6:  # IPv4 lives at ::/96: 96 left turns
            self.ipv4_start = self._walk(0, 0, 96)[0]

    @classmethod
    def open(cls, path):
        """Map the file at `path` (read-only) and read it."""
        try:
            handle = open_regular(path, follow_links=True)
        except OSError as error:
            raise DatabaseError("cannot read %s: %s"
                                % (path, error.strerror or error)) from None
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:  # ValueError: an empty file
            handle.close()
            raise DatabaseError("cannot read %s: %s" % (
                path, getattr(error, "strerror", None) or error)) from None
        try:
            reader = cls(mapped, path)
        except DatabaseError:
            mapped.close()
            handle.close()
            raise
        reader._file = handle
        reader._closers = (mapped.close, handle.close)
        return reader

    def shrunk(self):
        """Whether the mapped file was cut short in place (`cp` over it):
        reading past its new end would kill the process (SIGBUS)."""
        try:
            return self._file is not None and \
                os.fstat(self._file.fileno()).st_size < len(self.buffer)
        except (OSError, ValueError):
            return True

    def close(self):
        for close in self._closers:
            close()
        self._closers = ()

    def lookup(self, address):
        """The record for an address (text or packed bytes), or None."""
        return self.lookup_prefix(address)[0]

    def lookup_prefix(self, address):
        """(record or None, prefix length of the network that answered;
        for IPv4 in an IPv6 tree counted from the IPv4 part)."""
        packed = address if isinstance(address, bytes) else \
            _packed_address(address)
        answer = self.cache.get(packed)
        if answer is None:
            answer = self._find(packed)
            if len(self.cache) >= MMDB_CACHE_SIZE:
                self.cache.popitem(last=False)
            self.cache[packed] = answer
        offset, prefix = answer
        return (None if offset is None else self._record(offset)), prefix

    def _record(self, offset):
        """The record at `offset`, decoded once while the cache keeps it:
        a crafted file may point every address at one record of 65,536
        values, and a copy per address would fill the memory."""
        kept = self.records.get(offset)
        if kept is not None:
            self.records.move_to_end(offset)
            return kept[0]
        try:
            record, size = self.decoder.decode_sized(offset)
        except DatabaseError as error:
            raise DatabaseError("%s: %s" % (self.name, error)) from None
        if size <= MMDB_RECORD_CACHE_BYTES:
            while self.records and \
                    self.records_bytes + size > MMDB_RECORD_CACHE_BYTES:
                self.records_bytes -= self.records.popitem(last=False)[1][1]
            self.records[offset] = (record, size)
            self.records_bytes += size
        return record

    def _find(self, packed):
        """(absolute offset of the record or None, prefix length)."""
        if len(packed) == 16 and self.ip_version == 4:
            raise ValueError("an IPv6 address cannot be looked up in the "
                             "IPv4-only %s" % self.name)
        bits = len(packed) * 8
        node, depth = self._walk(self.ipv4_start if bits == 32 else 0,
                                 int.from_bytes(packed, "big"), bits)
        node_count = self.node_count
        if node == node_count:
            return None, depth
        if node < node_count:
            raise DatabaseError("%s: corrupt search tree: %d address bits "
                                "end in node %d" % (self.name, bits, node))
        offset = node - node_count - 16 + self.data_start
        if not self.data_start <= offset < self.data_end:
            raise DatabaseError("%s: corrupt search tree: record %d points "
                                "outside the data section" % (self.name, node))
        return offset, depth

    def _walk(self, node, number, bits):
        """(record, bits used): follow the `bits` low bits of `number`,
        high first, from `node` until a record is no node."""
        node_count, buffer = self.node_count, self.buffer
        depth = 0
        # One loop per record size: the hot path of every lookup.
        if self.record_size == 24:
            while depth < bits and node < node_count:
                depth += 1
                at = node * 6 + 3 * (number >> (bits - depth) & 1)
                node = buffer[at] << 16 | buffer[at + 1] << 8 | buffer[at + 2]
        elif self.record_size == 28:
            while depth < bits and node < node_count:
                depth += 1
                at = node * 7
                if number >> (bits - depth) & 1:
                    node = ((buffer[at + 3] & 0x0F) << 24 | buffer[at + 4]
                            << 16 | buffer[at + 5] << 8 | buffer[at + 6])
                else:
                    node = ((buffer[at + 3] & 0xF0) << 20 | buffer[at] << 16
                            | buffer[at + 1] << 8 | buffer[at + 2])
        else:
            while depth < bits and node < node_count:
                depth += 1
                at = node * 8 + 4 * (number >> (bits - depth) & 1)
                node = (buffer[at] << 24 | buffer[at + 1] << 16
                        | buffer[at + 2] << 8 | buffer[at + 3])
        return node, depth


def _packed_address(text):
    """An address as 4 or 16 bytes (IPv4-mapped IPv6 as IPv4)."""
    try:
        if ":" not in text:
            return socket.inet_pton(socket.AF_INET, text)
        packed = socket.inet_pton(socket.AF_INET6, text.split("%", 1)[0])
    except (OSError, ValueError, TypeError):
        raise ValueError("not an IP address: %r" % (text,)) from None
    return packed[12:] if packed[:12] == _IPV4_MAPPED_PREFIX else packed


#: How often a database file is checked for replacement, in seconds.
GEOIP_RECHECK_S = 5.0


class GeoDatabase:
    """One configured database file. geoipupdate writes a new file and
    renames it over the old one: a changed inode, time or size is noticed
    within GEOIP_RECHECK_S and the new file read, without a restart. A
    missing or broken file disables it with one warning (per change)."""

    def __init__(self, path, role="database"):
        self.path = path
        self.role = role
        self.reader = None
        self.identity = None
        self.checked_at = None
        self.generation = 0
        self.problem = None  # why it is unusable, for the health report

    def current(self, now):
        """The reader for the file as it is now (None when unusable)."""
        if self.checked_at is None or not \
                0 <= now - self.checked_at < GEOIP_RECHECK_S or (
                    self.reader is not None and self.reader.shrunk()):
            self.checked_at = now
            self.refresh()
        return self.reader

    def refresh(self):
        try:
            status = os.stat(self.path)
            identity = (status.st_dev, status.st_ino, status.st_mtime_ns,
                        status.st_ctime_ns, status.st_size)
        except OSError as error:
            identity, problem = None, error.strerror or str(error)
        if identity == self.identity and self.checked_at is not None and \
                self.generation:
            return
        self.identity = identity
        self.generation += 1
        old, self.reader = self.reader, None
        if identity is not None:
            try:
                self.reader = MMDBReader.open(self.path)
            except DatabaseError as error:
                problem = str(error)
        if old is not None:
            old.close()
        self.problem = None if self.reader is not None else \
            "%s: %s" % (self.path, problem)
        if self.reader is None:
            say("warning", "%s %s unusable (%s): its fields are left out "
                "until the file is replaced" % (self.role, self.path,
                                                problem))

    def disable(self, problem):
        """Stop using a file found corrupt, until it is replaced."""
        say("warning", "%s: %s; not used until the file is replaced"
            % (self.role, problem))
        self.problem = "%s: %s" % (self.path, problem)
        self.close()

    def close(self):
        if self.reader is not None:
            self.reader.close()
            self.reader = None


# -- the source's context: address scope, ASN, provider -----------------------

#: Address ranges that need no lookup: (network, prefix length, label),
#: the more specific first.
SPECIAL_RANGES = tuple(
    (socket.inet_pton(socket.AF_INET6 if ":" in net else socket.AF_INET,
                      net), length, label)
    for net, length, label in (
        ("0.0.0.0", 8, "unspecified"),
        ("10.0.0.0", 8, "private"),
        ("100.64.0.0", 10, "cgnat"),
        ("127.0.0.0", 8, "loopback"),
        ("169.254.0.0", 16, "link_local"),
        ("172.16.0.0", 12, "private"),
        ("192.0.0.0", 24, "reserved"),
        ("192.0.2.0", 24, "documentation"),
        ("192.88.99.0", 24, "reserved"),
        ("192.168.0.0", 16, "private"),
        ("198.18.0.0", 15, "benchmarking"),
        ("198.51.100.0", 24, "documentation"),
        ("203.0.113.0", 24, "documentation"),
        ("224.0.0.0", 4, "multicast"),
        ("240.0.0.0", 4, "reserved"),
        ("::", 128, "unspecified"),
        ("::1", 128, "loopback"),
        ("100::", 64, "reserved"),
        ("2001:2::", 48, "benchmarking"),
        ("2001:db8::", 32, "documentation"),
        ("3fff::", 20, "documentation"),
        ("fc00::", 7, "private"),
        ("fe80::", 10, "link_local"),
        ("fec0::", 10, "private"),
        ("ff00::", 8, "multicast"),
    ))


@functools.lru_cache(maxsize=4096)
def address_scope(address):
    """"public", or what kind of special range holds the address
    (private, loopback, link_local, cgnat, documentation, ...); None for
    something that is not an address."""
    try:
        packed = _packed_address(address)
    except ValueError:
        return None
    ranges = _SPECIAL_MASKS[len(packed)].get(packed[0])
    if ranges is None:
        return "public"  # most attackers: no range starts with this byte
    value = int.from_bytes(packed, "big")
    for mask, network, label in ranges:
        if value & mask == network:
            return label
    return "public"


def _special_masks(size):
    """SPECIAL_RANGES of one address size as (mask, network, label)
    integers, so a check is one AND and one compare, indexed by the first
    bytes they can start with."""
    bits = size * 8
    by_first_byte = {}
    for network, length, label in SPECIAL_RANGES:
        if len(network) != size:
            continue
        span = 1 << max(0, 8 - length)  # a range shorter than /8 spans more
        for first in range(network[0], network[0] + span):
            by_first_byte.setdefault(first, []).append((
                ((1 << length) - 1) << (bits - length),
                int.from_bytes(network, "big"), label))
    return {first: tuple(ranges) for first, ranges in by_first_byte.items()}


#: address size in bytes -> {first byte: its special ranges as masks}.
_SPECIAL_MASKS = {4: _special_masks(4), 16: _special_masks(16)}


SourceContext = collections.namedtuple(
    "SourceContext", "as_number as_org country city network_type provider")
SourceContext.__doc__ = """What the databases say about a source address,
normalised across GeoLite2/GeoIP2, DB-IP and IPinfo."""


#: Longest organisation or city name an event takes from a database.
MAX_CONTEXT_TEXT = 256


def _text_at(record, *path):
    """record[path[0]][path[1]]... when it is non-empty text (cut to
    MAX_CONTEXT_TEXT), else None."""
    for key in path:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record[:MAX_CONTEXT_TEXT] if isinstance(record, str) and record \
        else None


def _as_number(value):
    """An AS number from 15169, "15169" or "AS15169" (IPinfo)."""
    if isinstance(value, str):
        value = value[2:] if value[:2].upper() == "AS" else value
        value = parse_int(value)
    if type(value) is int and 0 < value < 1 << 32:
        return value
    return None


_COUNTRY_CODE = re.compile(r"^[A-Z]{2}\Z")


def context_from_records(records):
    """SourceContext from database records (any vendor, any mix); the
    first record that has a field gives it."""
    found = {}
    for record in records:
        if not isinstance(record, dict):
            continue
        number = _as_number(record.get("autonomous_system_number"))
        if number is None:
            number = _as_number(record.get("asn"))
        candidates = {
            "as_number": number,
            "as_org": _text_at(record, "autonomous_system_organization")
            or _text_at(record, "as_name") or _text_at(record, "asn_name"),
            "country": _text_at(record, "country", "iso_code")
            or _text_at(record, "registered_country", "iso_code")
            or _text_at(record, "country_code")
            or _text_at(record, "country"),
            "city": _text_at(record, "city", "names", "en")
            or _text_at(record, "city")}
        if candidates["country"] is not None:
            candidates["country"] = candidates["country"].upper()
            if not _COUNTRY_CODE.match(candidates["country"]):
                candidates["country"] = None  # IPinfo's country *name*
        for key, value in candidates.items():
            if value is not None:
                found.setdefault(key, value)
    return SourceContext(found.get("as_number"), found.get("as_org"),
                         found.get("country"), found.get("city"), None, None)


#: Well-known cloud and hosting networks: AS number -> provider.
CLOUD_ASNS = {
    16509: "AWS", 14618: "AWS", 8987: "AWS",
    15169: "Google Cloud", 396982: "Google Cloud", 19527: "Google Cloud",
    8075: "Azure", 8068: "Azure", 12076: "Azure",
    14061: "DigitalOcean", 393406: "DigitalOcean", 200130: "DigitalOcean",
    24940: "Hetzner", 213230: "Hetzner", 212317: "Hetzner",
    16276: "OVH", 35540: "OVH",
    63949: "Linode/Akamai", 20473: "Vultr",
    31898: "Oracle Cloud", 45102: "Alibaba Cloud", 37963: "Alibaba Cloud",
    12876: "Scaleway", 51167: "Contabo", 40021: "Contabo",
    141995: "Contabo", 132203: "Tencent Cloud", 45090: "Tencent Cloud",
    36351: "IBM Cloud", 13335: "Cloudflare", 60781: "Leaseweb",
    28753: "Leaseweb", 47583: "Hostinger", 8560: "IONOS",
    197540: "netcup", 202053: "UpCloud", 9009: "M247", 54290: "Hostwinds",
    136907: "Huawei Cloud", 55990: "Huawei Cloud", 61317: "Hivelocity",
}

#: Organisation names of cloud and hosting networks not in CLOUD_ASNS.
CLOUD_ORG_PATTERNS = tuple((re.compile(pattern, re.IGNORECASE), name)
                           for pattern, name in (
    (r"\bamazon|\baws\b", "AWS"), (r"\bgoogle", "Google Cloud"),
    (r"microsoft|azure", "Azure"), (r"digitalocean", "DigitalOcean"),
    (r"hetzner", "Hetzner"), (r"\bovh", "OVH"),
    (r"linode|akamai", "Linode/Akamai"),
    (r"vultr|choopa|the constant company", "Vultr"),
    (r"oracle", "Oracle Cloud"), (r"alibaba|aliyun", "Alibaba Cloud"),
    (r"scaleway|online s\.a\.s", "Scaleway"), (r"contabo", "Contabo"),
    (r"tencent", "Tencent Cloud"), (r"leaseweb", "Leaseweb"),
    (r"hostinger", "Hostinger"), (r"ionos", "IONOS"),
    (r"netcup", "netcup"), (r"upcloud", "UpCloud"),
    (r"huawei cloud", "Huawei Cloud"), (r"\bm247\b", "M247"),
))


def source_provider(as_number, as_organization):
    """The cloud or hosting provider holding an AS, or None (an ISP, a
    company, an AS nobody listed)."""
    if as_number in CLOUD_ASNS:
        return CLOUD_ASNS[as_number]
    for pattern, name in CLOUD_ORG_PATTERNS if as_organization else ():
        if pattern.search(as_organization):
            return name
    return None


# -- this server's provider (DMI) ---------------------------------------------

#: Files of /sys/class/dmi/id that name the maker of a (virtual) machine.
DMI_FIELDS = ("sys_vendor", "product_name", "product_version", "bios_vendor",
              "bios_version", "board_vendor", "chassis_vendor",
              "chassis_asset_tag")

#: This server's provider from its DMI data ("field=value" lines, lower
#: case); the first match wins, generic OpenStack last.
HOST_PROVIDER_RULES = tuple((re.compile(pattern, re.MULTILINE), name)
                            for pattern, name in (
    (r"^(?:sys_vendor|bios_vendor)=amazon ec2$|^(?:bios|product)_version="
     r".*\bamazon$", "AWS"),
    (r"^(?:sys_vendor|bios_vendor)=google$|^product_name=google compute "
     r"engine$", "Google Cloud"),
    (r"^chassis_asset_tag=7783-7084-3265-9085-8269-3286-77$", "Azure"),
    (r"^sys_vendor=digitalocean$", "DigitalOcean"),
    (r"^sys_vendor=hetzner$", "Hetzner"),
    (r"^(?:sys|board|chassis)_vendor=ovh", "OVH"),
    (r"^sys_vendor=(?:linode|akamai)", "Linode/Akamai"),
    (r"^sys_vendor=vultr$", "Vultr"),
    (r"^chassis_asset_tag=oraclecloud\.com$", "Oracle Cloud"),
    (r"^(?:sys_vendor|product_name)=alibaba cloud", "Alibaba Cloud"),
    (r"^(?:sys_vendor|product_name)=scaleway", "Scaleway"),
    (r"^[a-z_]+=.*\bcontabo\b", "Contabo"),
    (r"^sys_vendor=tencent cloud$", "Tencent Cloud"),
    (r"^sys_vendor=upcloud$", "UpCloud"),
    (r"^sys_vendor=exoscale$", "Exoscale"),
    (r"^product_name=openstack (?:nova|compute)$", "OpenStack"),
))


def host_provider_from_dmi(values):
    """The provider named by DMI values ({field: text}), or None."""
    text = "\n".join("%s=%s" % (field, values[field].strip().lower())
                     for field in DMI_FIELDS if values.get(field))
    for pattern, name in HOST_PROVIDER_RULES:
        if pattern.search(text):
            return name
    return None


def read_dmi(root="/"):
    """The DMI fields this machine shows (unreadable ones left out)."""
    values = {}
    for field in DMI_FIELDS:
        try:
            with open(os.path.join(root, "sys/class/dmi/id", field),
                      encoding="utf-8", errors="replace") as handle:
                values[field] = handle.read(256)
        except OSError:
            continue  # absent, or root-only (chassis serials)
    return values


def detect_host_provider(setting, root="/"):
    """[pamsignal] host_provider: auto reads DMI (no network), none is
    off, anything else is the name to show."""
    if setting == "none":
        return None
    if setting == "auto":
        return host_provider_from_dmi(read_dmi(root))
    return setting


# -- local addresses and connections (/proc/net) ------------------------------


#: An address and a port as /proc/net/tcp* prints them: 1 or 4 words of
#: 8 hex digits, 4 hex digits (int() would also take "-1", "0x1", "1_0").
_PROC_ADDRESS = re.compile(r"\A[0-9A-Fa-f]{8}(?:[0-9A-Fa-f]{24})?\Z")
_PROC_PORT = re.compile(r"\A[0-9A-Fa-f]{4}\Z")


def _proc_address(hex_text, byteorder):
    """An address as /proc/net/tcp* prints it: 32-bit words in host order;
    ValueError for anything else."""
    if not _PROC_ADDRESS.match(hex_text):
        raise ValueError(hex_text)
    packed = b"".join(int(hex_text[at:at + 8], 16).to_bytes(4, byteorder)
                      for at in range(0, len(hex_text), 8))
    if packed[:12] == _IPV4_MAPPED_PREFIX:
        packed = packed[12:]
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, packed)


def parse_tcp_table(text, byteorder=sys.byteorder):
    """/proc/net/tcp or tcp6 -> {(remote ip, port): (local ip, port)} of
    the ESTABLISHED connections; malformed rows are skipped."""
    found = {}
    for line in text.splitlines()[1:]:
        columns = line.split()
        if len(columns) < 4 or columns[3] != "01":
            continue
        try:
            local_ip, local_port = columns[1].split(":")
            remote_ip, remote_port = columns[2].split(":")
            if not (_PROC_PORT.match(local_port) and
                    _PROC_PORT.match(remote_port)):
                continue
            found[(_proc_address(remote_ip, byteorder),
                   int(remote_port, 16))] = (
                _proc_address(local_ip, byteorder), int(local_port, 16))
        except ValueError:
            continue
    return found


def _read_text(path, limit=16 * 1024 * 1024):
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return ""  # no IPv6, or hidden (ProcSubset=pid)


def established_connections(root="/"):
    """Every ESTABLISHED TCP connection of this network namespace."""
    found = parse_tcp_table(_read_text(os.path.join(root, "proc/net/tcp")))
    found.update(parse_tcp_table(_read_text(
        os.path.join(root, "proc/net/tcp6"))))
    return found


#: A peer not in the last reading of /proc/net/tcp* is looked for again
#: only when that reading is older than this (a flood stays cheap).
CONNECTIONS_REREAD_S = 0.2

#: Nor sooner than this many times what the last reading took: under a
#: flood the tables are long and the machine busy, and a reading took
#: about a second (bench_flood.py): read every 0.2 s, the agent did
#: nothing else and fell behind the journal by 10 s. So readings are at
#: most a tenth of its time...
CONNECTIONS_REREAD_FACTOR = 10

#: ... but are never further apart than this (a reading that a paused
#: machine stretched to minutes must not stop the lookups for an hour).
CONNECTIONS_REREAD_MAX_S = 10.0


class ConnectionTable:
    """Finds which local address and port a TCP client is connected to."""

    def __init__(self, root="/", clock=time.monotonic):
        self.root = root
        self.clock = clock  # times the readings themselves
        self.peers = {}
        self.read_at = None
        self.reread_s = CONNECTIONS_REREAD_S

    def destination(self, ip, port, now, always=False):
        """(local ip, local port) of the connection from ip:port, or None.
        A missing peer is looked for again only once `reread_s` (at least
        CONNECTIONS_REREAD_S, more when reading is slow) passed since the
        last reading, unless `always` (a login: rare, and the one that
        matters; a second login within that time has a new port that the
        last reading cannot hold)."""
        found = self.peers.get((ip, port))
        if found is None and (always or self.read_at is None or not
                              0 <= now - self.read_at < self.reread_s):
            started = self.clock()
            self.peers = established_connections(self.root)
            self.reread_s = min(max(
                CONNECTIONS_REREAD_S,
                CONNECTIONS_REREAD_FACTOR * (self.clock() - started)),
                CONNECTIONS_REREAD_MAX_S)
            self.read_at = now
            found = self.peers.get((ip, port))
        return found


_FIB_ADDRESS = re.compile(r"^\s*\|-- (\S+)$")
_FIB_LOCAL = re.compile(r"^\s*/32 host LOCAL$")


def parse_fib_trie(text):
    """The local IPv4 addresses in /proc/net/fib_trie (words that are no
    IPv4 address are skipped)."""
    found, last = set(), None
    for line in text.splitlines():
        address = _FIB_ADDRESS.match(line)
        if address:
            try:
                last = socket.inet_ntop(socket.AF_INET, socket.inet_pton(
                    socket.AF_INET, address.group(1)))
            except (OSError, ValueError):
                last = None
        elif last and _FIB_LOCAL.match(line):
            found.add(last)
    return found


def parse_if_inet6(text):
    """The IPv6 addresses in /proc/net/if_inet6 (hex, network order)."""
    found = set()
    for line in text.splitlines():
        columns = line.split()
        if columns and len(columns[0]) == 32:
            try:
                found.add(socket.inet_ntop(socket.AF_INET6,
                                           bytes.fromhex(columns[0])))
            except ValueError:
                continue
    return found


def host_addresses(root="/"):
    """Every address of this host (IPv4 first), for alerts and status."""
    ipv4 = parse_fib_trie(_read_text(os.path.join(root, "proc/net/fib_trie")))
    ipv6 = parse_if_inet6(_read_text(os.path.join(root, "proc/net/if_inet6")))
    return sorted(ipv4, key=_packed_address) + sorted(ipv6,
                                                      key=_packed_address)


# -- the Enricher: context added to events ------------------------------------

#: Only events this recent are matched against the live connections.
LIVE_EVENT_S = 120

#: Source addresses whose context is remembered.
SOURCE_CONTEXT_CACHE = 4096

#: What an event gets from a SourceContext: (Event field index, part).
_CONTEXT_FIELDS = tuple((EVENT_FIELDS.index(field), part) for field, part in (
    ("source_as_number", "as_number"), ("source_as_org", "as_org"),
    ("source_country", "country"), ("source_city", "city"),
    ("source_network_type", "network_type"), ("source_provider", "provider")))
_HOST_PROVIDER_INDEX = EVENT_FIELDS.index("host_provider")
_DESTINATION_INDEXES = (EVENT_FIELDS.index("destination_ip"),
                        EVENT_FIELDS.index("destination_port"))


def _context_fields(context):
    """(context, [(Event field index, value)]) of the parts it has."""
    return context, tuple((index, getattr(context, part))
                          for index, part in _CONTEXT_FIELDS
                          if getattr(context, part) is not None)


#: What an address no database is asked about gets, by its scope: a
#: special range, public (with no database), or None (not an address).
_SCOPE_FIELDS = {
    scope: _context_fields(SourceContext(None, None, None, None, scope, None))
    for scope in set(label for _, _, label in SPECIAL_RANGES) |
    {"public", None}}


class Enricher:
    """Adds context to events: ASN, country, city and provider of the
    source (no lookup for private and other special ranges), this
    server's provider, and, for a live sshd login, the local address the
    client connected to. A failing database only loses its own fields."""

    def __init__(self, databases=(), host_provider=None, root="/"):
        self.databases = tuple(databases)
        self.host_provider = host_provider
        self.connections = ConnectionTable(root)
        self.contexts = collections.OrderedDict()
        self.generations = None

    @classmethod
    def from_config(cls, config, live, root="/"):
        """Databases from [geoip]; the host provider only when `live`
        (an export may come from another server)."""
        roles = zip(("asn_db", "country_db", "city_db"), config.geoip)
        return cls([GeoDatabase(path, role) for role, path in roles if path],
                   detect_host_provider(config.host_provider, root)
                   if live else None, root)

    def open(self, now):
        """Read the databases now, so a wrong path is said at start."""
        for database in self.databases:
            database.current(now)

    def close(self):
        for database in self.databases:
            database.close()

    def enrich(self, event, now_s=None):
        """The event with context added. `now_s` (wall clock) is given for
        live events only: without it nothing of this moment is added."""
        changes = []
        if event.source_ip:
            changes += self._source_fields(event.source_ip, now_s or 0.0)[1]
        live = now_s is not None and \
            event.timestamp_us >= (now_s - LIVE_EVENT_S) * 1e6
        if live and self.host_provider:
            changes.append((_HOST_PROVIDER_INDEX, self.host_provider))
        if live and event.service == "sshd" and event.source_ip and \
                event.source_port and event.destination_ip is None and \
                event.action in ("login_success", "login_failure"):
            found = self.connections.destination(
                event.source_ip, event.source_port, now_s,
                always=event.action == "login_success")
            if found is not None:
                changes += zip(_DESTINATION_INDEXES, found)
        if not changes:
            return event
        values = list(event)  # the changes come by field index
        for index, value in changes:
            values[index] = value
        return Event._make(values)

    def source_context(self, address, now):
        """SourceContext of an address, from the cache when it can be."""
        return self._source_fields(address, now)[0]

    def _source_fields(self, address, now):
        """(SourceContext, [(Event field index, value)]), cached."""
        if not self.databases:  # only the kind of range: nothing to cache
            return _SCOPE_FIELDS[address_scope(address)]
        readers = [database.current(now) for database in self.databases]
        generations = tuple(d.generation for d in self.databases)
        if generations != self.generations:
            self.generations = generations
            self.contexts.clear()  # a database was replaced
        cached = self.contexts.get(address)
        if cached is None:
            cached = _context_fields(self._look_up(address, readers))
            if len(self.contexts) >= SOURCE_CONTEXT_CACHE:
                self.contexts.popitem(last=False)
            self.contexts[address] = cached
        return cached

    def _look_up(self, address, readers):
        scope = address_scope(address)
        if scope != "public":
            return _SCOPE_FIELDS[scope][0]
        records = []
        for database, reader in zip(self.databases, readers):
            if reader is None:
                continue
            try:
                records.append(reader.lookup(address))
            except ValueError:
                continue  # IPv6 address, IPv4-only database
            except DatabaseError as error:
                database.disable(error)
        context = context_from_records(records)
        provider = source_provider(context.as_number, context.as_org)
        known = context.as_number is not None or context.as_org is not None
        return context._replace(
            provider=provider,
            network_type="cloud" if provider else "other" if known
            else "public")


# ---------------------------------------------------------------------------
# 9 detection
# ---------------------------------------------------------------------------
# Pure, time from the events: sessions and what was typed in them, lines
# that pair up into one event, failures and brute force, the baseline of
# what is new, and each channel's policy and throttle (ChannelGate).


# -- sessions and what was typed in them --------------------------------------


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
        if not isinstance(saved, dict) or \
                saved_time_us(saved.get("opened_us")) is None:
            return None
        # Each carried field in its event type, or left out.
        return dict({field: _record_value(field, saved.get(field))
                     for field in cls.CARRIED}, opened_us=saved["opened_us"])


class _Typed:
    """What was typed in one session: its lines (bounded) and the carry of
    each reader (a line goes on in the next record of the same PID)."""

    def __init__(self, where):
        self.where = where  # its key in TypedInput.open
        self.lines = []
        self.chars = 0
        self.more = 0
        self.carries = BoundedTable(16)  # reader PID -> KeyCarry

    def add(self, line):
        line = shorten(line, MAX_TYPED_LINE_CHARS)
        if len(self.lines) >= MAX_TYPED_LINES or \
                self.chars + len(line) > MAX_TYPED_CHARS:
            self.more += 1
            return
        self.lines.append(line)
        self.chars += len(line)


class TypedInput:
    """Hands the lines typed in a session (TTY audit records) to that
    session, and gives them to its session_closed event.

    A record names its audit session (`ses`) and the reader's UID; PAM's
    USER_START record names the session's process and its audit session,
    and that process writes the session_opened line. The lines go to the
    most recent session still open in that audit session whose account is
    root exactly when the reader is (su or sudo to root inside a user's
    login shares the user's audit session). A close waits for PAM's
    USER_END record of its process, after which no keystroke of the
    session can come: at most TTY_HOLD_US of the entries' time, and live
    also of the wall clock since it was held (a backlog read after a
    restart is old by the wall clock, yet its USER_END is on its way).
    Bounded:
    MAX_TYPED_SESSIONS sessions, MAX_TYPED_LINES lines and MAX_TYPED_CHARS
    characters each.
    """

    def __init__(self, limit=MAX_TYPED_SESSIONS):
        self.limit = limit
        self.audit_session_of = BoundedTable(MAX_OPEN_SESSIONS)  # boot/pid
        self.waiting = BoundedTable(MAX_OPEN_SESSIONS)  # boot/pid -> opened
        self.open = BoundedTable(MAX_OPEN_SESSIONS)  # boot/ses/root -> keys
        self.typed = BoundedTable(limit)  # context key -> _Typed
        # boot/pid -> (closed event, wall clock µs when held or None)
        self.closing = collections.OrderedDict()
        self.ended = BoundedTable(MAX_OPEN_SESSIONS)  # boot/pid: USER_END
        # boot/pid of each session's own process -> its audit session
        self.session_processes = BoundedTable(MAX_OPEN_SESSIONS)
        # TTY records: typed (in a session), unclaimed (no open session
        # known), relayed (sudo passing the user's terminal on)
        self.records = collections.Counter()

    def note(self, event, entry):
        """A session line's own _AUDIT_SESSION, where journald gave one (a
        fresh su or sudo process; sshd's is usually missing, as journald
        looked the process up before PAM set its session)."""
        session = audit_session_of(entry)
        if session is not None and event.context_key:
            self.audit_session_of.put(_process_key(event), session)

    def record(self, record):
        """Take one AuditRecord; returns the closed sessions it completes."""
        process = "%s/%s" % (record.boot, record.pid)
        if record.kind == AUDIT_USER_START:
            self.audit_session_of.put(process, record.audit_session)
            opened = self.waiting.pop(process, None)
            if opened is not None:
                self._register(opened, record.audit_session)
            return []
        if record.kind == AUDIT_USER_END:
            closed = self.closing.pop(process, None)
            if closed is None:  # before the close line (another socket)
                self.ended.put(process, True)
                return []
            return [self._release(closed[0])]
        if self.session_processes.get(process) == record.audit_session:
            # sudo (use_pty) reads the user's terminal and writes the keys
            # to its command's pty, whose reader is recorded too; its own
            # record comes when it exits, after its session's end.
            self.records["relayed"] += 1
            return []
        keys = self.open.get("%s/%s/%s" % (record.boot, record.audit_session,
                                           record.uid == "0"))
        typed = keys and self.typed.get(keys[-1])
        if not typed:
            self.records["unclaimed"] += 1
            return []
        self.records["typed"] += 1
        carry = typed.carries.pop(record.pid, NO_CARRY)
        data = record.data
        if record.kind == AUDIT_USER_TTY and not data.endswith(b"\n"):
            data += b"\n"  # a whole line the shell pushed
        lines, carry = decode_keystrokes(data, carry)
        for line in lines:
            typed.add(line)
        typed.carries.put(record.pid, carry)
        return []

    def observe(self, event, now_us=None):
        """The events to send now for this one: [event], or none while a
        session_closed of a session with TTY audit waits for its last
        keystrokes (then more may come from record(), due() or drain()).
        `now_us`: the wall clock, when the event is live."""
        if not event.context_key:
            return [event]
        process = _process_key(event)
        if event.action == "session_opened":
            self.ended.pop(process, None)
            session = self.audit_session_of.get(process)
            if session is None:
                self.waiting.put(process, event)
            else:
                self._register(event, session)
        elif event.action == "session_closed":
            self.waiting.pop(process, None)
            if self.ended.pop(process, None):
                return [self._release(event)]
            if event.context_key in self.typed:
                released = [self._release(self.closing.pop(process)[0])] \
                    if process in self.closing else []
                self.closing[process] = (event, now_us)
                while len(self.closing) > self.limit:
                    released.append(self._release(
                        self.closing.popitem(last=False)[1][0]))
                return released
        return [event]

    def due(self, entry_us=None, wall_us=None):
        """The held closes whose wait ended by the entries' time
        `entry_us`, or (live) by the wall clock `wall_us`."""
        over = [process for process, (event, held_us) in self.closing.items()
                if (entry_us is not None and
                    event.timestamp_us + TTY_HOLD_US <= entry_us) or
                (wall_us is not None and
                 (event.timestamp_us if held_us is None else held_us) +
                 TTY_HOLD_US <= wall_us)]
        return [self._release(self.closing.pop(process)[0])
                for process in over]

    def wait_again(self, now_us):
        """Every held close waits TTY_HOLD_US again from `now_us` (the
        journal is read again after a time it was not)."""
        for process, (event, _) in list(self.closing.items()):
            self.closing[process] = (event, now_us)

    def drain(self):
        """Every held close (the end of the input)."""
        return [self._release(self.closing.pop(key)[0])
                for key in list(self.closing)]

    def to_state(self):
        """The held closes with what was typed so far, for a restart."""
        return [[process, event_to_record(self._with_lines(event))]
                for process, (event, _) in self.closing.items()]

    def load_state(self, saved, now_us=None):
        """Held closes saved by to_state(); live, their wait starts again
        at `now_us`."""
        self.closing.clear()
        for item in saved if isinstance(saved, list) else ():
            event = event_from_record(item[1]) if isinstance(item, list) \
                and len(item) == 2 and isinstance(item[0], str) else None
            if event is not None and event.action == "session_closed":
                self.closing[item[0]] = (event, now_us)

    def _release(self, event):
        typed = self.typed.pop(event.context_key, None) \
            if event.context_key else None
        if typed is not None:
            self._unregister(typed.where, event.context_key)
        return self._with_lines(event, typed)

    def _with_lines(self, event, typed=None):
        """The close with what was typed (and never entered) added."""
        if typed is None:
            typed = self.typed.get(event.context_key) \
                if event.context_key else None
        if typed is None:
            return event
        whole = _Typed(typed.where)  # the session's own stays as it is
        whole.lines, whole.chars, whole.more = \
            list(typed.lines), typed.chars, typed.more
        for carry in typed.carries.values():
            line = unfinished_line(carry)
            if line is not None:
                whole.add(line)
        if not whole.lines and not whole.more:
            return event
        return event._replace(typed_lines=tuple(whole.lines),
                              typed_more=whole.more or None)

    def _register(self, opened, session):
        account = opened.target_user or opened.user
        where = "%s/%s/%s" % (boot_of(opened), session, account == "root")
        self._unregister(where, opened.context_key)
        self.open.put(where, self.open.get(where, []) + [opened.context_key])
        self.typed.put(opened.context_key, _Typed(where))
        self.session_processes.put(_process_key(opened), session)

    def _unregister(self, where, context_key):
        keys = [key for key in self.open.get(where, ()) if key != context_key]
        if keys:
            self.open.put(where, keys)
        else:
            self.open.pop(where, None)


def _process_key(event):
    """boot/PID of the process that wrote a session line."""
    return "%s/%s" % (boot_of(event), event.pid)


# -- lines that pair up into one event ----------------------------------------


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


# -- sudo's long lines, split by sudo itself ----------------------------------

#: A text-form sudo line at least this long (characters of MESSAGE) may
#: have been split (sudo breaks a line past MAXSYSLOGLEN, 960 bytes by
#: default, into continuation lines): it waits for them. Shorter lines,
#: nearly all, go on at once.
SUDO_SPLIT_CHARS = 800

#: sudo's MAXSYSLOGLEN (sudoers `syslog_maxlen`): a fragment exactly at
#: it was broken mid-word, and is joined to the next without a space.
SUDO_SYSLOG_MAXLEN = 960

#: sudo lines of processes held for their continuations at most; past it
#: the oldest is let go as it is (marked cut if more was due).
MAX_HELD_SUDO_LINES = 1000

#: pamsignal.detail of a sudo line whose continuation was not read (or
#: past MAX_MESSAGE_CHARS): its command is not the whole command.
SUDO_TEXT_CUT = "sudo's line is cut short: its continuation is missing"

#: A key journald cannot write (field names are A-Z, 0-9 and _): set on a
#: joined sudo entry whose command is not whole (parse_entry reads it).
SUDO_CUT_KEY = "pamsignal cut"

#: ... and whether the last fragment joined was at its limit.
_SUDO_AT_LIMIT_KEY = "pamsignal at limit"

#: The fields of a held sudo line: who wrote it (all must match for a
#: continuation to join), and what parse_entry reads of it.
_SUDO_WRITER_FIELDS = ("SYSLOG_IDENTIFIER", "_BOOT_ID", "_PID", "_UID",
                       "_COMM", "_EXE", "_TRANSPORT")
_SUDO_HELD_FIELDS = _SUDO_WRITER_FIELDS + (
    "MESSAGE", "__REALTIME_TIMESTAMP", "__CURSOR", "_HOSTNAME",
    SUDO_CUT_KEY, _SUDO_AT_LIMIT_KEY)

#: One of sudo's text lines, `%8s : %s` or `%8s : (command continued) %s`.
_SUDO_FRAGMENT = re.compile(
    r"^\s*(?P<user>\S+) : (?P<continued>\(command continued\) )?"
    r"(?P<rest>.*)\Z", re.DOTALL)


def _sudo_at_limit(user, rest, continued):
    """Whether sudo broke this fragment mid-word: it is exactly as long as
    do_syslog_sudo() allows (MAXSYSLOGLEN less its format and the user's
    name; a break at a space is shorter, the space dropped)."""
    overhead = 23 if continued else 3
    return len(rest.encode("utf-8", "replace")) == SUDO_SYSLOG_MAXLEN - \
        overhead - len(user.encode("utf-8", "replace"))


def _may_be_split(message):
    """A first sudo line that may have continuation lines: long enough,
    ending inside an argument sudo quoted (a break at the space before a
    word too long for the rest of the line leaves a short first line), or
    without its COMMAND= (no event alone: holding it delays nothing)."""
    return len(message) >= SUDO_SPLIT_CHARS or \
        message.count("'") % 2 == 1 or _SUDO_COMMAND not in message


class SudoContinuations:
    """Joins sudo's split text lines into one, before they are parsed.

    sudo (do_syslog_sudo in lib/eventlog/eventlog.c) breaks a log line
    longer than MAXSYSLOGLEN at the last space before it (dropping the
    spaces there), or mid-word when there is none, and writes the rest as
    `USER : (command continued) REST` lines; a long directory can push
    COMMAND= into one. A first line that may have been split
    (_may_be_split) is held per process (boot and PID) and the
    continuations of the same writer (every field of _SUDO_WRITER_FIELDS,
    and the user named, the same) are joined to it. It is let go, as one
    entry, when the process writes anything else, SSH_HOLD_US pass in the
    journal's time, or the input ends. Works on journal entries (dicts),
    so parse_entry reads the joined line as any other.
    """

    def __init__(self, limit=MAX_HELD_SUDO_LINES):
        self.held = BoundedTable(limit)  # boot/pid -> the entry so far

    @staticmethod
    def _key(entry):
        return "%s/%s" % (journal_text(entry.get("_BOOT_ID")),
                          journal_text(entry.get("_PID")))

    def observe(self, entry):
        """The entries to parse now for this one, in order (a list)."""
        if entry.get("SYSLOG_IDENTIFIER") != "sudo":
            return [entry]
        message = journal_text(entry.get("MESSAGE")) or ""
        fragment = _SUDO_FRAGMENT.match(message)
        key = self._key(entry)
        held = self.held.get(key) if self.held else None
        if held is not None and not self._same_writer(held, entry):
            return [entry]  # another writer: not the held line's process
        out = []
        if held is not None:
            del self.held[key]
            if fragment is not None and fragment.group("continued") and \
                    fragment.group("user") == _SUDO_FRAGMENT.match(
                        held["MESSAGE"]).group("user"):
                joined = self._joined(held, fragment)
                if joined.get(SUDO_CUT_KEY):
                    return [joined]
                self.held.put(key, joined)
                return []
            out.append(self._released(held))
        if fragment is None or fragment.group("continued") or \
                message.startswith(("{", "@cee:")) or \
                not _may_be_split(message) or \
                not writer_is_genuine(entry, WATCHED_SERVICES["sudo"]):
            return out + [entry]
        if len(self.held) >= self.held.limit:
            out.append(self._released(self.held.popitem(last=False)[1]))
        kept = {field: journal_text(entry.get(field))
                for field in _SUDO_HELD_FIELDS if field in entry}
        kept[_SUDO_AT_LIMIT_KEY] = "1" if _sudo_at_limit(
            fragment.group("user"), fragment.group("rest"), False) else ""
        self.held.put(key, kept)
        return out

    @staticmethod
    def _same_writer(held, entry):
        """The entry is the held line's writer's: the same process (boot,
        PID) and program, the same UID and transport."""
        return all(held.get(field) == journal_text(entry.get(field))
                   for field in _SUDO_WRITER_FIELDS)

    @staticmethod
    def _joined(held, fragment):
        """The held line with one more fragment: after a space, or without
        one after a fragment broken mid-word; cut at MAX_MESSAGE_CHARS."""
        rest = fragment.group("rest")
        message = held["MESSAGE"] + ("" if held.get(_SUDO_AT_LIMIT_KEY)
                                     else " ") + rest
        joined = dict(held, MESSAGE=message[:MAX_MESSAGE_CHARS])
        joined[_SUDO_AT_LIMIT_KEY] = "1" if _sudo_at_limit(
            fragment.group("user"), rest, True) else ""
        if len(message) > MAX_MESSAGE_CHARS:
            joined[SUDO_CUT_KEY] = "1"
        return joined

    @staticmethod
    def _released(held):
        """A held line let go: cut when its last fragment wanted more."""
        if held.get(_SUDO_AT_LIMIT_KEY):
            return dict(held, **{SUDO_CUT_KEY: "1"})
        return held

    def due(self, now_us):
        """Held lines older than SSH_HOLD_US at `now_us` (journal time)."""
        return [self._released(held) for held in expired(
            self.held, now_us, lambda held: _entry_timestamp(held) or 0)]

    def drain(self):
        """Every held line (the end of a scan)."""
        out = [self._released(held) for held in self.held.values()]
        self.held.clear()
        return out

    def to_state(self):
        return self.held.to_state()

    def load_state(self, saved):
        self.held.load_state(saved, _held_sudo_line)


def _held_sudo_line(saved):
    """A held sudo line from the state file, or None if malformed."""
    if not isinstance(saved, dict) or not all(
            field in _SUDO_HELD_FIELDS and isinstance(value, str)
            for field, value in saved.items()) or \
            _SUDO_FRAGMENT.match(saved.get("MESSAGE") or "") is None or \
            len(saved["MESSAGE"]) > MAX_MESSAGE_CHARS:
        return None
    return saved


class ProgramAttempts:
    """One attempt, one event, for su and login, which write a line of
    their own for each failed attempt (FAILED SU, FAILED LOGIN): pam_unix's
    failure line before it is held by the writing process (context_key)
    and replaced by that line. It is the event itself when the process
    writes anything else first (TOO MANY LOGIN TRIES restates, it is no
    guess), SSH_HOLD_US pass in the events' own time, or the input ends.
    """

    #: Services whose pam_unix failures are held (service.name as parsed).
    SERVICES = frozenset(("su", "login"))

    def __init__(self, limit=MAX_OPEN_SESSIONS):
        self.held = BoundedTable(limit)  # context_key -> Event

    def observe(self, event):
        """The events to send now for this one (a list)."""
        if event.service not in self.SERVICES or event.context_key is None:
            return [event]
        held = self.held.pop(event.context_key, None)
        out = []
        if held is not None:
            if event.action == "login_failure" and event.pairing is None \
                    and is_guess(event):
                # The program's own line for the attempt: it stays, with
                # the remote host only PAM named (login -h).
                event = event._replace(
                    source_ip=event.source_ip or held.source_ip,
                    source_domain=event.source_domain or held.source_domain)
            else:
                out.append(held._replace(pairing=None))
        if event.pairing == "pam":
            self.held.put(event.context_key, event)
        else:
            out.append(event)
        return out

    def due(self, now_us):
        """Held failures older than SSH_HOLD_US at `now_us` (event time)."""
        return [held._replace(pairing=None)
                for held in expired(self.held, now_us)]

    def drain(self):
        """Every held failure (the end of a scan)."""
        out = [held._replace(pairing=None) for held in self.held.values()]
        self.held.clear()
        return out

    def to_state(self):
        return [[key, _held_to_state(event)]
                for key, event in self.held.items()]

    def load_state(self, saved):
        self.held.load_state(saved, _held_from_state)


class ActingUsers:
    """Names who acted in su and sudo sessions, and as whom.

    pam_unix names the caller of su or sudo only when it finds a login
    name (`by alice(uid=1000)`); without a terminal or a utmp entry it
    writes `by (uid=1000)`, and its `session closed` names nobody. The
    su or sudo line of the same process (`(to root) alice on pts/0`,
    `alice : ... COMMAND=...`) comes before the session and names the
    caller: it is remembered per process (boot and PID) until the session
    closes. Failing that, live events ask the account database
    (`lookup(name, uid) -> (name, uid)`, the I/O at the edge) at event
    time; `scan` of an export from elsewhere does not.
    """

    def __init__(self, lookup=None, limit=MAX_OPEN_SESSIONS):
        self.callers = BoundedTable(limit)  # boot/pid -> [name, uid]
        self.lookup = lookup

    #: The services whose events say or need who acted.
    SERVICES = SWITCHING_PAM_SERVICES

    #: Services whose commands and failures name the caller by its real
    #: UID (getpwuid(getuid())), which is the event's user_id when the
    #: caller wrote the line.
    CALLER_NAMING = frozenset(("sudo", "doas", "pkexec"))

    def observe(self, event, live=False):
        """The event, a su or sudo session's completed with its caller."""
        if live and self.lookup is not None and \
                event.service in self.CALLER_NAMING and event.user and \
                event.user_id and event.action in ("sudo_command",
                                                   "login_failure"):
            named_uid = self.lookup(event.user, None)[1]
            owner = self.lookup(None, event.user_id)[0]
            if named_uid != event.user_id and (
                    named_uid is not None or
                    owner is not None and owner != event.user):
                return _not_the_writers(event, owner)
        if event.service not in self.SERVICES or event.context_key is None:
            return event  # sshd's, most of them: nothing to do
        process = event.context_key.rsplit("/", 1)[0]
        if event.action in ("sudo_command", "login_success") and \
                event.service in ("sudo", "su") and event.user:
            self.callers.put(process, [event.user, event.user_id])
            return event
        if event.action not in ("session_opened", "session_closed") or \
                event.service not in SWITCHING_PAM_SERVICES:
            return event
        caller = (self.callers.pop(process, None)
                  if event.action == "session_closed"
                  else self.callers.get(process)) or [None, None]
        user, user_id = event.user or caller[0], event.user_id or caller[1]
        if live and self.lookup is not None and (user is None or
                                                 user_id is None):
            user, user_id = self.lookup(user, user_id)
        return event._replace(user=user, user_id=user_id)


def _not_the_writers(event, owner):
    """A sudo, doas or pkexec line naming someone other than the account
    of the UID that wrote it. They write the caller's own name (getpwuid
    of its real UID), so this is what the trust rules cannot see: a user
    sends a forged line and at once execs the real sudo, so that journald
    finds its executable, or binds a program of their own over sudo's path
    in a mount namespace of their own."""
    return Event(action="spoofed_entry", service=event.service,
                 writer_uid=parse_int(event.user_id),
                 claimed_action=event.action,
                 detail="the line names %s, but UID %s that wrote it is %s"
                 % (event.user, event.user_id, owner or "no account"),
                 timestamp_us=event.timestamp_us,
                 journal_time=event.journal_time, hostname=event.hostname,
                 pid=event.pid, cursor=event.cursor, message=event.message)


def account_of(name, uid):
    """(name, uid) completed from the local account database, as it is
    now; either stays None when it knows no such account."""
    try:
        entry = pwd.getpwnam(name) if uid is None else pwd.getpwuid(int(uid))
    except (KeyError, ValueError, OverflowError, TypeError):
        return name, uid
    return name or entry.pw_name, uid or str(entry.pw_uid)


#: How long a PAM failure waits for sshd's own line of the same attempt
#: (pam_faildelay makes it about 2 s), in the events' own time.
SSH_HOLD_US = 10 * 1000000

#: Event fields a held event keeps across a restart.
_HELD_FIELDS = tuple(field for field in EVENT_FIELDS
                     if field not in ("users_tried", "sources"))


def _held_to_state(event):
    return {field: value for field, value in zip(EVENT_FIELDS, event)
            if value is not None and field in _HELD_FIELDS}


def _held_from_state(saved, action="login_failure"):
    if not isinstance(saved, dict) or type(saved.get("timestamp_us")) \
            is not int or saved.get("action") != action:
        return None
    fields = {field: value for field, value in saved.items()
              if field in _HELD_FIELDS and
              isinstance(value, (str, int, float)) and
              not isinstance(value, bool)}
    return Event(**fields)


def expired(table, now_us, time_of=lambda event: event.timestamp_us):
    """Take from a BoundedTable of held events (oldest first) those held
    SSH_HOLD_US by `now_us` (event time), oldest first."""
    out = []
    while table:
        key, held = next(iter(table.items()))
        if time_of(held) > now_us - SSH_HOLD_US:
            break
        out.append(table.pop(key))
    return out


class SshAttempts:
    """One attempt, one event, for sshd: pairs the lines of a connection
    (one sshd process, its context_key) by their `pairing`.

    - "pam": a PAM failure is held until sshd's own line for the attempt
      (Failed ..., maximum ..., not allowed ...) replaces it; it becomes
      the event itself when the connection ends first, another line of
      the connection comes, or SSH_HOLD_US pass. The keyboard-interactive
      PAM child logs under its own PID: a held failure of a PID that
      wrote nothing else is taken by sshd's own `PAM: ...` line for the
      same source and user (or no user).
    - "Invalid user X" is held too and merged into the first "Failed ...
      for invalid user X", so that an invalid user's guess is one event.
    - "end": the connection ended during authentication. Nothing when its
      attempts were reported; a `key_probe` when a user was being
      authenticated and no failure was logged (sshd logs every password
      failure, so only offered keys fail silently).
    - "restate": the MaxAuthTries disconnect (nothing after sshd's
      "maximum authentication attempts" line) and the change of user;
      the address comes from the connection when the line has none.
    """

    def __init__(self, limit=MAX_OPEN_SESSIONS):
        self.connections = BoundedTable(limit)  # key -> what it reported
        self.held = BoundedTable(limit)  # key -> Event, oldest first
        self.loose = BoundedTable(limit)  # source -> keys of lone PAM PIDs

    def observe(self, event):
        """The events to send now for this one (a list, often [event])."""
        if event.service != "sshd" or event.context_key is None or \
                event.action not in ("login_failure", "login_success"):
            return [event] if event.pairing is None else []
        key, pairing = event.context_key, event.pairing
        out = []
        if pairing == "pam":
            self._hold(key, self._merged_pam(key, event))
            return out
        held = self.held.pop(key, None)
        if event.reason == "invalid_user" and pairing is None and \
                event.auth_method is None:  # "Invalid user X from H"
            out += self._released([held])
            self.held.put(key, event)
            self._note(key, event, reported=False)
            return out
        if pairing == "end":
            return self._ended(key, event, held)
        connection = self.connections.get(key) or {}
        if pairing == "restate":
            out += self._released([held])
            if event.reason == "max_attempts" and connection.get("max"):
                return out
            event = self._completed(event, connection)
        elif event.action == "login_failure":
            if held is not None and (held.pairing == "pam" or
                                     event.reason == "invalid_user"):
                if held.reason == "locked_out":  # worth keeping
                    event = event._replace(detail=event.detail or
                                           held.detail)
                held = None
            out += self._released([held])
        else:  # a login: the connection's failures were all told
            out += self._released([held])
            self.connections.pop(key, None)
            return out + [event]
        self._note(key, event, reported=True)
        return out + [event]

    def _merged_pam(self, key, event):
        """A PAM failure, joined with what is held for the same attempt."""
        held = self.held.pop(key, None)
        if held is None and event.auth_method is not None:
            held = self._lone_pam(event)  # sshd's own PAM line
        if held is None:
            return event
        if held.pairing != "pam":  # the Invalid user line came first
            return event._replace(
                user=event.user or held.user, reason="invalid_user",
                source_port=event.source_port or held.source_port)
        first, second = (event, held) if event.auth_method else (held, event)
        return first._replace(
            user=first.user or second.user,
            source_ip=first.source_ip or second.source_ip,
            source_domain=first.source_domain or second.source_domain)

    def _lone_pam(self, event):
        """The held PAM failure of another PID that wrote nothing else, for
        the same source and user (or no user): the keyboard-interactive
        child's pam_unix line, which sshd's `PAM: ...` line repeats."""
        source = event.source_ip or event.source_domain
        keys = self.loose.get(source) or []
        for key in keys:
            held = self.held.get(key)
            if held is not None and held.user in (None, event.user):
                keys.remove(key)
                return self.held.pop(key)
        return None

    def _ended(self, key, event, held):
        # "Received disconnect" (it has the client's words as detail) is
        # followed by the connection's last line: remember it until then.
        last = event.detail is None
        connection = (self.connections.pop(key, None) if last else
                      self.connections.get(key)) or {}
        if held is not None:
            return self._released([held._replace(
                source_port=held.source_port or event.source_port)],
                note=not last)
        if connection.get("failures") or event.user is None and not (
                event.detail or "").startswith(("3: ", "14: ")):
            return []
        if event.reason == "invalid_user" and connection.get("invalid"):
            return []
        probe = event._replace(pairing=None,
                               reason=event.reason or "key_probe")
        if not last:
            self._note(key, probe, reported=True)
        return [probe]

    @staticmethod
    def _completed(event, connection):
        """A restating line, with the connection's source and user."""
        fields = {field: connection.get(field) for field in (
            "user", "source_ip", "source_domain", "source_port")
            if getattr(event, field) is None}
        return event._replace(pairing=None, **fields)

    def _note(self, key, event, reported):
        connection = self.connections.get(key) or {"failures": 0}
        for field in ("user", "source_ip", "source_domain", "source_port"):
            value = getattr(event, field)
            if value is not None:
                connection[field] = value
        if reported:
            connection["failures"] += 1
        connection["max"] = connection.get("max") or \
            event.reason == "max_attempts"
        connection["invalid"] = connection.get("invalid") or \
            event.reason == "invalid_user"
        self.connections.put(key, connection)

    def _hold(self, key, event):
        self.held.put(key, event)
        source = event.source_ip or event.source_domain
        if event.auth_method is None and source and \
                key not in self.connections:
            keys = [k for k in self.loose.get(source) or () if k in self.held]
            self.loose.put(source, keys[-7:] + [key])

    def _released(self, events, note=True):
        """Held events that become events of their own now."""
        out = []
        for held in events:
            if held is None:
                continue
            held = held._replace(pairing=None)
            if note:
                self._note(held.context_key, held,
                           reported=held.auth_method is not None or
                           held.reason != "invalid_user")
            out.append(held)
        return out

    def due(self, now_us):
        """Held events older than SSH_HOLD_US at `now_us` (event time)."""
        return self._released(expired(self.held, now_us))

    def drain(self):
        """Every held event (the end of a scan)."""
        held, self.held = list(self.held.values()), BoundedTable(
            self.held.limit)
        return self._released(held)

    def to_state(self):
        return {"held": [[key, _held_to_state(event)]
                         for key, event in self.held.items()],
                "connections": self.connections.to_state()}

    def load_state(self, saved):
        saved = saved if isinstance(saved, dict) else {}
        self.held.load_state(saved.get("held"), _held_from_state)
        self.connections.load_state(
            saved.get("connections"),
            lambda value: value if isinstance(value, dict) and
            type(value.get("failures")) is int else None)


class PolkitAttempts:
    """One attempt, one event, for polkit (pkexec, run0 as a user, ...).

    A wrong password gives three lines from three processes: the agent
    helper's `pam_unix(polkit-1:auth)` failure, polkitd's FAILED verdict
    and pkexec's "Not authorized". The helper's failure is held until
    polkitd's next verdict on that boot: a FAILED one takes it (the
    event, with polkitd's action and command line and the helper's user
    ID); a success releases it as a guess of its own, and so does
    SSH_HOLD_US without a verdict. pkexec's refusal for a user polkitd
    has just refused (within SSH_HOLD_US) adds nothing: polkitd names
    pkexec's parent process, not pkexec, so the user ties them.
    """

    def __init__(self, limit=MAX_OPEN_SESSIONS):
        self.held = BoundedTable(limit)  # boot -> helper failures
        self.refused = BoundedTable(limit)  # boot/user -> time of FAILED

    def observe(self, event):
        """The events to send now for this one (a list)."""
        key = event.context_key
        if key is None or event.service not in ("polkit-1", "polkit",
                                                "pkexec"):
            return [event]
        boot = key.split("/", 1)[0]
        if event.service == "polkit-1" and event.action == "login_failure":
            self.held.put(boot, (self.held.pop(boot, None) or []) + [event])
            return []
        if event.service == "pkexec" and event.action == "login_failure":
            refused_us = self.refused.pop("%s/%s" % (boot, event.user), None)
            told = refused_us is not None and \
                event.timestamp_us - refused_us <= SSH_HOLD_US
            return [] if told else [event]
        if event.service != "polkit":
            return [event]
        held = self.held.pop(boot, None) or []
        if event.action == "login_failure":
            self.refused.put("%s/%s" % (boot, event.user), event.timestamp_us)
            if held:
                event = event._replace(
                    user_id=held[-1].user_id,
                    attempts=len(held) if len(held) > 1 else None)
                held = []
        return held + [event]

    def due(self, now_us):
        """Held failures no verdict came for within SSH_HOLD_US."""
        return [event for held in expired(
            self.held, now_us, lambda held: held[-1].timestamp_us)
            for event in held]

    def to_state(self):
        return {"held": [[boot, [_held_to_state(event) for event in held]]
                         for boot, held in self.held.items()],
                "refused": self.refused.to_state()}

    def load_state(self, saved):
        saved = saved if isinstance(saved, dict) else {}
        self.held.load_state(saved.get("held"), lambda held: [
            event for event in map(_held_from_state, held) if event] or None
            if isinstance(held, list) else None)
        self.refused.load_state(saved.get("refused"), saved_time_us)

    def drain(self):
        """Every held failure (the end of a scan)."""
        out = [event for held in self.held.values() for event in held]
        self.held.clear()
        return out


class Run0Commands:
    """run0's command and who ran it are two lines: PID 1 starts the unit
    ("[run0] COMMAND" is its description), then the unit's PAM session
    names who became whom. The command waits for the session of its unit
    and becomes one sudo_command with both (the session is still told);
    alone after SSH_HOLD_US, or at the end of a scan, it goes out as it
    is."""

    def __init__(self, limit=MAX_OPEN_SESSIONS):
        self.held = BoundedTable(limit)  # boot/unit -> the command

    @staticmethod
    def _key(event):
        return "%s/%s" % ((event.context_key or "").split("/", 1)[0],
                          event.unit)

    def observe(self, event):
        """The events to send now for this one (a list)."""
        if event.unit is None:
            return [event]
        if event.service == "run0":
            self.held.put(self._key(event), event)
            return []
        command = self.held.pop(self._key(event), None) \
            if event.service == "systemd-run0" else None
        if command is None or event.action != "session_opened":
            return [event]
        return [command._replace(user=event.user, user_id=event.user_id,
                                 target_user=event.target_user), event]

    def due(self, now_us):
        """Commands no session came for within SSH_HOLD_US."""
        return expired(self.held, now_us)

    def to_state(self):
        return [[key, _held_to_state(event)]
                for key, event in self.held.items()]

    def load_state(self, saved):
        self.held.load_state(saved, lambda command: _held_from_state(
            command, "sudo_command"))

    def drain(self):
        """Every held command (the end of a scan)."""
        out = list(self.held.values())
        self.held.clear()
        return out


# -- failures and brute force -------------------------------------------------

#: The rules that remember when they last fired, per counter.
_RULE_NAMES = frozenset(("fast", "slow", "enumeration", "distributed",
                         "success", "probes"))

#: Failures that are no guess at a credential: the MaxAuthTries disconnect
#: and ROOT LOGIN REFUSED restate an attempt another line counts, a change
#: of user in mid-authentication is a protocol trick, and sudo's refusals
#: are policy, not a wrong password.
_NOT_GUESSES = frozenset(("max_attempts", "root_refused", "user_change",
                          "not_in_sudoers", "command_not_allowed",
                          # pkexec's refusals (see PolkitAttempts)
                          "not_authorized", "dismissed", "refused_environment",
                          "password_required"))

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


def _fired_within(record, rule, now, window_us):
    """Whether the rule already fired for this counter in the window."""
    fired = record["fired"].get(rule)
    return fired is not None and now - window_us < fired <= now


#: A failure record's distinct values, value -> time last seen.
_DISTINCT_FIELDS = ("invalid", "sources")


def _seen_within(seen, now, window_us):
    """The distinct values seen within the window before now."""
    return [value for value, at in seen.items() if now - window_us < at <= now]


def _saved_record(record):
    """A failure record as JSON keeps it: distinct values as [[v, t], ...]
    (a list, so that their order survives any JSON tool)."""
    saved = dict(record)
    for field in _DISTINCT_FIELDS:
        if field in record:
            saved[field] = [[value, at] for value, at in record[field].items()]
    return saved


def _full_record(value):
    """A failure counter's record from what probation may keep instead, a
    single guess as (time, user), or (time, user, True) when the user was
    an invalid one (the first name its source tried, for enumeration);
    None stays None."""
    if type(value) is tuple:
        time_us, user = value[:2]
        record = {"times": [time_us], "users": [user] if user else [],
                  "fired": {}}
        if value[2:]:
            record["invalid"] = {user: time_us}
        return record
    return value


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
        self.probes = settings.ssh_probes
        rules = [t for _, t in self.windows] + [self.success, self.probes]
        self.keep = max([t.attempts for t in rules] + [1])
        self.keep_distinct = max(self.enumeration.attempts,
                                 self.distributed.attempts, 1)
        self.horizon_us = max(t.window_s for t in rules + [
            self.enumeration, self.distributed]) * 1000000
        # One guess can cross a window only with a threshold of one.
        self.fires_at_once = any(t.attempts == 1 for _, t in self.windows)
        self.probation = BoundedTable(limit)
        self.counters = BoundedTable(limit)
        self.throttled = BoundedTable(limit)  # source -> (time, why)

    def observe(self, event):
        """Detections the event gives rise to (a list, often empty)."""
        if event.action == "login_failure":
            return self._with_throttling(event, self._failure(event))
        if event.action == "ssh_probe" and self.probes.attempts:
            return self._probe(event)
        if event.action == "source_throttled" and event.source_ip:
            self.throttled.put(event.source_ip, (event.timestamp_us,
                                                 event.detail))
        if event.action == "login_success" and self.success.attempts:
            return self._judge_success(event)
        return []

    def _lookup(self, key):
        record = self.counters.get(key)
        if record is None:
            record = self.probation.get(key)
            if type(record) is tuple:
                # Expanded in place: what the caller marks in it must stay.
                record = self.probation[key] = _full_record(record)
        return record

    def _failure(self, event):
        now, guess = event.timestamp_us, is_guess(event)
        touched = []
        user = event.user
        # An invalid user's name is the first its source tried: enumeration
        # remembers it, and can fire on it at once only with a threshold of
        # one.
        named = event.reason == "invalid_user" and bool(user) and \
            self.enumeration.attempts > 0
        plain = guess and (event.attempts or 1) == 1 and \
            not self.fires_at_once and not (
                named and self.enumeration.attempts == 1)
        for kind, value in failure_counters(event):
            key = kind + " " + value
            record, table = self.counters.get(key), None
            if record is not None:  # kept: now the most recently seen
                self.counters.move_to_end(key)
            else:  # promoted from probation when seen there before
                record, table = _full_record(self.probation.pop(key, None)), \
                    self.counters
            if record is None and plain and kind != "user":
                # The flood case, a first guess from somewhere: nothing can
                # fire yet, so probation keeps only (time, user[, named]).
                self.probation.put(key, (now, user, True) if named
                                   else (now, user))
                continue
            if record is None:  # seen once so far: on probation
                record, table = {"times": [], "users": [], "fired": {}}, \
                    self.probation
            if guess:
                self._add_times(record["times"], now, event.attempts or 1)
            users = record["users"]
            if user and (not users or users[-1] != user):
                if user in users:  # tried again: last, and only once
                    users.remove(user)  # (the list never holds it twice)
                users.append(user)
                del users[:-MAX_USERS_TRIED]
            if table is not None:
                table.put(key, record)
            touched.append((kind, value, record))
        found = []
        for name, threshold in self.windows if guess else ():
            window_us = threshold.window_s * 1000000
            candidates = [
                (kind, value, record, _times_between(
                    record["times"], now - window_us, now))
                for kind, value, record in touched
                if len(record["times"]) >= threshold.attempts and
                not _fired_within(record, name, now, window_us)]
            if candidates:
                found += self._fire_once(event, name, threshold, candidates,
                                         "repeated_failures")
        if event.reason == "invalid_user" and event.user and \
                self.enumeration.attempts:
            found += self._count_distinct(
                event, [counter for counter in touched if counter[0] !=
                        "user"], "invalid", event.user, "enumeration",
                self.enumeration, "user_enumeration")
        attacker = attacker_of(event)
        if guess and attacker and self.distributed.attempts:
            found += self._count_distinct(
                event, [counter for counter in touched if counter[0] ==
                        "user"], "sources", attacker, "distributed",
                self.distributed, "distributed_attack")
        return found

    def _count_distinct(self, event, counters, field, value, rule,
                        threshold, reason):
        """A rule on the distinct values counters saw (invalid names from
        a source, sources failing for an account): `value` noted in each
        record's `field`, then fired as _fire_once does."""
        now = event.timestamp_us
        window_us = threshold.window_s * 1000000
        candidates = []
        for kind, counted, record in counters:
            seen = self._remember(record, field, value, now)
            if self._may_fire(record, rule, seen, threshold, now):
                candidates.append((kind, counted, record,
                                   _seen_within(seen, now, window_us)))
        return self._fire_once(event, rule, threshold, candidates,
                               reason) if candidates else []

    @staticmethod
    def _may_fire(record, rule, seen, threshold, now):
        """Whether the rule can fire for this counter now: enough values
        seen at all (within the window or not), and not fired within it.
        Only then is it worth counting those within the window."""
        return len(seen) >= threshold.attempts and not _fired_within(
            record, rule, now, threshold.window_s * 1000000)

    def _with_throttling(self, event, found):
        """A brute force from a source sshd itself throttled (9.8+
        PerSourcePenalties, MaxStartups) says so in pamsignal.detail."""
        throttled = self.throttled.get(event.source_ip) if found else None
        if throttled is None or not _in_window(
                throttled[0], event.timestamp_us + 1, self.horizon_us):
            return found
        note = "sshd throttled this source: %s" % throttled[1]
        return [detection._replace(detail=note)
                if detection.counted_by in ("source", "network") else
                detection for detection in found]

    def _probe(self, event):
        """Pre-authentication probes from one source, when counted."""
        source = event.source_ip or event.source_domain
        if not source:
            return []
        now, key = event.timestamp_us, "probes " + source
        record = self.counters.pop(key, None) or _full_record(
            self.probation.pop(key, None)) or {"times": [], "users": [],
                                               "fired": {}}
        self._add_times(record["times"], now, 1)
        (self.counters if len(record["times"]) > 1 else
         self.probation).put(key, record)
        window_us = self.probes.window_s * 1000000
        seen = _times_between(record["times"], now - window_us, now)
        return self._fire_once(event, "probes", self.probes, [
            ("source", source, record, seen)], "repeated_probes")

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

    def _add_times(self, times, now, count):
        """Insert `count` guesses at `now`, in place; keep only times
        within the longest window, none from a clock that was far ahead,
        at most `keep` of them (the latest)."""
        if times and not (now - self.horizon_us < times[0] and
                          times[-1] <= now + _FUTURE_SLACK_US):
            times[:] = [t for t in times if now - self.horizon_us < t
                        <= now + _FUTURE_SLACK_US]
        if count == 1 and (not times or times[-1] <= now):
            times.append(now)  # the usual case: entries come in order
        else:
            for _ in range(min(count, self.keep)):
                bisect.insort(times, now)  # sorted, even if entries are late
        if len(times) > self.keep:
            del times[:-self.keep]

    def _remember(self, record, field, value, now):
        """Note `value` as seen now in the record's distinct values, a dict
        value -> time in the order last seen (CPython keeps insertion
        order, 3.6 included), at most `keep_distinct`, none from a clock
        that was far ahead; returns it."""
        seen = record.get(field)
        if seen is None:
            seen = record[field] = {}
        latest = now + _FUTURE_SLACK_US
        if seen and max(seen.values()) > latest:
            for stale in [item for item, at in seen.items() if at > latest]:
                del seen[stale]  # from a clock far ahead, as for times
        seen.pop(value, None)
        seen[value] = now
        if len(seen) > self.keep_distinct:
            del seen[next(iter(seen))]
        return seen

    @staticmethod
    def _brute_force(event, kind, value, seen, threshold, reason, users):
        where = {"source": "from %s" % value, "network": "from %s" % value,
                 "user": "for %s" % value}[kind]
        what = {"repeated_failures": "%d failed logins",
                "repeated_probes": "%d pre-authentication probes",
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
        return {"repeated": [[key, _saved_record(record)]
                             for key, record in self.counters.items()],
                "once": [[key, _saved_record(_full_record(value))]
                         for key, value in self.probation.items()]}

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
            "users": list(collections.OrderedDict.fromkeys(
                u for u in users if isinstance(u, str)))[-MAX_USERS_TRIED:],
            "fired": {k: v for k, v in fired.items() if k in _RULE_NAMES
                      and type(v) is int and v <= latest}}
        for field in _DISTINCT_FIELDS:
            seen = saved.get(field)
            if isinstance(seen, list):
                restored[field] = dict([
                    item for item in seen if isinstance(item, list) and
                    len(item) == 2 and isinstance(item[0], str) and
                    type(item[1]) is int and item[1] <= latest
                ][-self.keep_distinct:])
        return restored


# -- the baseline: what is new ------------------------------------------------


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
    (/24, /64 or host name), network operators (ASN) and countries each
    user logs in from, and who uses sudo. A login from something never seen
    for that user gives one `new_source` whose event.reason says the most
    telling novelty: new_country, new_asn or new_network. ASN and country
    count only once enrichment has given some for that user, so adding a
    database does not make every user new. A first sudo by a user gives
    `new_sudo_user`. Quiet during the learning period that starts with the
    first event it sees. Bounded per user and in users, and saved."""

    def __init__(self, learning_period_s, limit=MAX_BASELINE_USERS):
        self.learning_us = learning_period_s * 1000000
        self.started_us = None
        self.networks = BoundedTable(limit)
        self.asns = BoundedTable(limit)
        self.countries = BoundedTable(limit)
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

    @staticmethod
    def _remember(table, user, value):
        """Note `value` as the user's latest; whether it was new (None: the
        user had nothing in this table yet)."""
        known = table.get(user)
        table.put(user, ([v for v in known or () if v != value]
                         + [value])[-MAX_NETWORKS_PER_USER:])
        return None if known is None else value not in known

    def _login(self, event, quiet):
        network = network_of(event)
        if network is None:
            return []
        novelties = []
        for table, value, reason, what in (
                (self.countries, event.source_country, "new_country",
                 "country %s" % event.source_country),
                (self.asns, event.source_as_number, "new_asn",
                 "AS%s (%s)" % (event.source_as_number,
                                event.source_as_org or "?")),
                (self.networks, network, "new_network", network)):
            if value is None:
                continue
            new = self._remember(table, event.user, value)
            if new or (new is None and reason == "new_network"):
                novelties.append((reason, what))
        if not novelties or quiet:
            return []
        reason, what = novelties[0]
        return [event._replace(
            action="new_source", severity=None, network=network,
            reason=reason, context_key=None,
            message="%s logged in from %s, never seen for this user: %s"
            % (event.user, what, event.message))]

    def to_state(self):
        return {"started_us": self.started_us,
                "networks": self.networks.to_state(),
                "asns": self.asns.to_state(),
                "countries": self.countries.to_state(),
                "sudo_users": self.sudo_users.to_state()}

    def load_state(self, saved, now_us):
        """Restore from to_state() (older states lack asns and countries);
        a start dated after `now_us` (wall clock) would keep it learning
        for ever, so it is dropped too."""
        saved = saved if isinstance(saved, dict) else {}
        started = saved.get("started_us")
        self.started_us = started if type(started) is int and \
            started <= now_us + _FUTURE_SLACK_US else None
        for table, key, kind in ((self.networks, "networks", str),
                                 (self.asns, "asns", int),
                                 (self.countries, "countries", str)):
            table.load_state(saved.get(key), functools.partial(
                _restore_seen, kind))
        self.sudo_users.load_state(saved.get("sudo_users"), lambda seen:
                                   seen if type(seen) is int else None)


def _restore_seen(kind, seen):
    """A saved list of what a user was seen with: the values of `kind`."""
    if not isinstance(seen, list):
        return None
    return [value for value in seen if type(value) is kind][
        -MAX_NETWORKS_PER_USER:]


# -- policy and throttling: which events alert, and how often -----------------


def _matches_any(name, patterns):
    return name is not None and any(
        fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _in_networks(address, networks):
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks
               if network.version == ip.version)


def _named_in(policy_users, policy_groups, event, groups_of):
    if _matches_any(event.user, policy_users):
        return True
    return bool(policy_groups and event.user) and any(
        _matches_any(group, policy_groups) for group in groups_of(event.user))


def policy_admits(policy, event, groups_of=lambda user: ()):
    """Whether a channel with this policy alerts on the event at all.

    The always_* lists win over everything; then the action must be one the
    channel wants, of at least its minimum severity, and not from an
    ignored user (the account logged into, or the person running sudo/su),
    group or source. `groups_of(user)` names the user's groups."""
    if event.action == "alert_digest":
        return True  # it only ever holds what this channel admitted
    if (policy.always_sources or policy.always_users or
            policy.always_groups) and (
                _in_networks(event.source_ip, policy.always_sources) or
                _named_in(policy.always_users, policy.always_groups, event,
                          groups_of)):
        return True
    if event.action not in policy.events or \
            event_severity(event) < policy.min_severity:
        return False
    return not (_in_networks(event.source_ip, policy.ignore_sources) or
                _named_in(policy.ignore_users, policy.ignore_groups, event,
                          groups_of))


def throttle_key(event):
    """What repeats of one thing share: the action and who is behind it,
    the source (an IPv6 /64 as one, whatever accounts it tries) or, with no
    source, the account; for forgeries the forger's UID."""
    return "%s\0%s\0%s" % (event.action,
                           attacker_of(event) or event.user or "",
                           "" if event.writer_uid is None
                           else event.writer_uid)


def repeat_key(event):
    """What identical accesses share: the action, who (and as whom), the
    command or the source, and the outcome."""
    return "\0".join(str(part) for part in (
        event.action, event.user or event.user_id, event.target_user,
        event.command_line, event.source_ip or event.source_domain,
        event.reason, ACTIONS[event.action][2]))


#: The fields of an access a digest of its repeats names.
REPEAT_FIELDS = ("user", "user_id", "target_user", "command_line",
                 "source_ip", "source_domain", "service", "reason")


def _name_some(names, more):
    """Add to an ordered set of names, up to MAX_DIGEST_NAMES."""
    for name in more:
        if name is not None and len(names) < MAX_DIGEST_NAMES:
            names[name] = True


class HeldBack:
    """Events a channel held back: counted by action, with their sources and
    users named (up to MAX_DIGEST_NAMES), for one digest. For repeats of
    one access, `sample` is the first held: the digest names what it was."""

    def __init__(self, since_us, sample=None):
        self.since_us = since_us
        self.sample = sample
        self.count = 0
        self.actions = collections.Counter()
        self.sources = collections.OrderedDict()
        self.users = collections.OrderedDict()
        self.severity = 0
        self.hostname = None

    def add(self, event):
        self.count += 1
        self.actions[event.action] += 1
        self.severity = max(self.severity, event_severity(event))
        self.hostname = self.hostname or event.hostname
        _name_some(self.sources, (attacker_of(event),))
        _name_some(self.users, (event.user,))

    def merge(self, other):
        self.since_us = min(self.since_us, other.since_us)
        self.count += other.count
        self.actions.update(other.actions)
        self.severity = max(self.severity, other.severity)
        self.hostname = self.hostname or other.hostname
        _name_some(self.sources, other.sources)
        _name_some(self.users, other.users)

    def digest(self, now_us, reason):
        """One `alert_digest` event: how many of which kind, from where."""
        kinds = ", ".join("%d %s" % (count, action) for action, count
                          in sorted(self.actions.items(),
                                    key=lambda item: (-item[1], item[0])))
        sources = tuple(self.sources)
        window_s = max(0, (now_us - self.since_us) // 1000000)
        why = {"cooldown": "a cooldown", "rate_limit": "the rate limit",
               "repeat": "the repeat limit"}[reason]
        named = {} if self.sample is None else {
            field: getattr(self.sample, field) for field in REPEAT_FIELDS
            if field != "reason"}
        return Event(
            timestamp_us=now_us, action="alert_digest", reason=reason,
            severity=self.severity, held_back=self.count, detail=kinds,
            sources=sources or None, users_tried=tuple(self.users) or None,
            window_s=window_s, hostname=self.hostname,
            message="%s held back %d alert%s over %ds: %s%s%s" % (
                why, self.count, "" if self.count == 1 else "s", window_s,
                kinds, "; from " + ", ".join(sources) if sources else "",
                "" if self.sample is None else "; each the same as: %s"
                % event_text(self.sample)),
            **named)


class Throttle:
    """One channel's cooldowns and rate limit, on a clock given by the
    caller (microseconds).

    The first event of a key goes out and starts its cooldown; repeats
    during it are held back, and when it ends one digest says what was
    held (the cooldown then runs again while repeats keep coming). Past the
    rate limit the channel holds back everything but NEVER_HELD_ACTIONS
    and sends one digest per rate window until the flood stops. Those
    (access) are never held for another key, but identical repeats of one
    access (`repeats`: N in a window) past the first N are folded into one
    digest per window. Nothing held is lost: `drain()` gives what is
    pending (at shutdown)."""

    def __init__(self, cooldown_s, rate_limit, limit=MAX_COOLDOWN_KEYS,
                 repeats=NO_THRESHOLD):
        self.cooldown_us = cooldown_s * 1000000
        self.rate_count = rate_limit.attempts
        self.rate_window_us = rate_limit.window_s * 1000000
        self.repeat_count = repeats.attempts
        self.repeat_window_us = repeats.window_s * 1000000
        self.limit = limit
        self.cooling = collections.OrderedDict()  # key -> [until, HeldBack]
        # repeat_key -> [until, sent in this window, HeldBack]
        self.repeating = collections.OrderedDict()
        self.sent = collections.deque()  # times of recent sends
        self.flood_until = None
        self.overflow = None
        self.now_us = 0

    def admit(self, event, now_us):
        """The alerts to send now for this event: digests that came due,
        then the event itself unless it is held back."""
        out = self.due(now_us)
        now_us = self.now_us
        if event.action in NEVER_HELD_ACTIONS:
            if self.repeat_count and event.action not in NEVER_FOLDED:
                return out + self._repeat(event, now_us)
            self._count_send(now_us)
            return out + [event]
        if not (self.cooldown_us or self.rate_count) and \
                self.flood_until is None:
            return out + [event]  # nothing holds it (the console): no key
        key = throttle_key(event)
        cooling = self.cooling.get(key)
        if cooling is not None:
            cooling[1] = cooling[1] or HeldBack(now_us)
            cooling[1].add(event)
            return out
        if self.flood_until is not None or self._rate_full(now_us):
            self._hold_in_flood(now_us).add(event)
            return out
        self._count_send(now_us)
        self._cool(key, now_us)
        return out + [event]

    def due(self, now_us):
        """Digests whose time came (call about once a second)."""
        self.now_us = now_us = max(now_us, self.now_us)  # never backwards
        out = []
        while self.cooling:
            key, (until, held) = next(iter(self.cooling.items()))
            if until > now_us:
                break
            del self.cooling[key]
            if held is not None:
                digest = self._digest_or_flood(held, now_us)
                out.extend(digest)
                self._cool(key, now_us)  # repeats may still be coming
        while self.repeating:
            key, (until, _, held) = next(iter(self.repeating.items()))
            if until > now_us:
                break
            del self.repeating[key]
            if held is not None:  # access: never held by the rate limit
                out.append(held.digest(now_us, "repeat"))
                self._count_send(now_us)
                # Still repeating: fold the next window's repeats too.
                self.repeating[key] = [now_us + self.repeat_window_us,
                                       self.repeat_count, None]
        if self.flood_until is not None and self.flood_until <= now_us:
            if self.overflow is not None:
                out.append(self.overflow.digest(now_us, "rate_limit"))
                self._count_send(now_us)
                self.overflow = None
                self.flood_until = now_us + self.rate_window_us
            else:
                self.flood_until = None
        return out

    def drain(self):
        """Every digest still pending, now."""
        now_us = self.now_us
        held = [entry[1] for entry in self.cooling.values() if entry[1]]
        out = [each.digest(now_us, "cooldown") for each in held]
        out += [entry[2].digest(now_us, "repeat")
                for entry in self.repeating.values() if entry[2]]
        if self.overflow is not None:
            out.append(self.overflow.digest(now_us, "rate_limit"))
        self.cooling.clear()
        self.repeating.clear()
        self.overflow, self.flood_until = None, None
        return out

    def _repeat(self, event, now_us):
        """An access goes out unless it is one more identical repeat past
        the first `repeat_count` of its window."""
        key = repeat_key(event)
        entry = self.repeating.get(key)
        if entry is None:
            entry = self.repeating[key] = [
                now_us + self.repeat_window_us, 0, None]
            self._bound(self.repeating, 2, now_us)
        if entry[1] < self.repeat_count:
            entry[1] += 1
            self._count_send(now_us)
            return [event if entry[1] == 1 else
                    event._replace(repeat=entry[1] - 1)]
        entry[2] = entry[2] or HeldBack(now_us, sample=event)
        entry[2].add(event)
        return []

    def _cool(self, key, now_us):
        if not self.cooldown_us:
            return
        self.cooling[key] = [now_us + self.cooldown_us, None]
        self._bound(self.cooling, 1, now_us)

    def _bound(self, table, held_index, now_us):
        while len(table) > self.limit:
            _, entry = table.popitem(last=False)
            if entry[held_index] is not None:  # forgotten key, not events
                self._hold_in_flood(now_us, start=False).merge(
                    entry[held_index])

    def _digest_or_flood(self, held, now_us):
        if self.flood_until is None and not self._rate_full(now_us):
            self._count_send(now_us)
            return [held.digest(now_us, "cooldown")]
        self._hold_in_flood(now_us).merge(held)
        return []

    def _hold_in_flood(self, now_us, start=True):
        if self.overflow is None:
            self.overflow = HeldBack(now_us)
        if self.flood_until is None:
            self.flood_until = now_us + (self.rate_window_us if start else 0)
        return self.overflow

    def _rate_full(self, now_us):
        if not self.rate_count:
            return False
        while self.sent and self.sent[0] <= now_us - self.rate_window_us:
            self.sent.popleft()
        return len(self.sent) >= self.rate_count

    def _count_send(self, now_us):
        if self.rate_count:
            self.sent.append(now_us)
            if len(self.sent) > self.rate_count:
                self.sent.popleft()


class GroupDirectory:
    """Which groups a user is in (primary and supplementary), from the
    account databases, reread after GROUP_CACHE_S so a change is seen."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.members = None
        self.read_at = None

    def groups_of(self, user):
        now = self.clock()
        if self.members is None or now - self.read_at >= GROUP_CACHE_S:
            self.members, self.read_at = self._read(), now
        return self.members.get(user, ())

    @staticmethod
    def _read():
        by_gid, members = {}, collections.defaultdict(set)
        try:
            for group in grp.getgrall():
                by_gid[group.gr_gid] = group.gr_name
                for user in group.gr_mem:
                    members[user].add(group.gr_name)
            for account in pwd.getpwall():
                if account.pw_gid in by_gid:
                    members[account.pw_name].add(by_gid[account.pw_gid])
        except (OSError, KeyError) as error:
            say("warning", "cannot read the group database: %s" % error)
        return {user: tuple(sorted(groups))
                for user, groups in members.items()}


def passes_everything(policy):
    """Whether a policy lets every event through at once: every action, any
    severity, nobody ignored, nothing held back or folded."""
    return policy.events >= frozenset(ACTIONS) and \
        policy.min_severity <= 0 and not (
            policy.ignore_users or policy.ignore_groups or
            policy.ignore_sources or policy.cooldown or
            policy.rate_limit.attempts or policy.repeats.attempts)


class ChannelGate:
    """A channel's policy and throttle in front of its sink."""

    def __init__(self, policy, groups_of=lambda user: ()):
        self.policy = policy
        self.groups_of = groups_of
        self.throttle = Throttle(policy.cooldown, policy.rate_limit,
                                 repeats=policy.repeats)
        self.passes_all = passes_everything(policy)

    def admit(self, event, now_us):
        if self.passes_all:
            return [event]  # `scan`'s console: nothing to weigh per event
        try:
            if not policy_admits(self.policy, event, self.groups_of):
                return self.throttle.due(now_us)
            return self.throttle.admit(event, now_us)
        except Exception as error:  # a policy bug must not eat an alert
            say("error", "alert policy failed on %s (%r); sending it "
                "unfiltered" % (event.action, error))
            return [event]

    def due(self, now_us):
        return self.throttle.due(now_us)

    def drain(self):
        return self.throttle.drain()


# ---------------------------------------------------------------------------
# 10 rendering
# ---------------------------------------------------------------------------
# Pure: events as text, JSON, chat markup (Markup, compose) and SIEM
# records; every value escaped for where it goes.

#: What makes a key=value value quoted: space, quote, backslash, equals,
#: and anything beyond printable ASCII (U+2800 looks like a space and
#: U+FF1D like "=": a user "eve\u2800source\uff1d6.6.6.6" must not pass
#: for two pairs).
_NEEDS_QUOTES = re.compile(r'[\s"\\=]|[^!-~]')


#: Text that shows as itself in key=value output: printable ASCII with no
#: space, quote, backslash or equals sign (most values: the quick way).
_SHOWN_AS_IS = re.compile(r'[!#-<>-\[\]-~]+\Z')


def _text_value(value):
    """A value for key=value output: escaped, and quoted when it has spaces
    or anything but printable ASCII, so a hostile user name cannot pose as
    another field."""
    if type(value) is str and _SHOWN_AS_IS.match(value):
        return value
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
    seconds = min(max(event.timestamp_us, 0), MAX_TIMESTAMP_US) // 1000000
    return "%sZ %s" % (_text_second(seconds), event_text(event))


@functools.lru_cache(maxsize=64)
def _text_second(seconds):
    """YYYY-MM-DD HH:MM:SS of a second, as the text line shows it."""
    return _utc_second(seconds).replace("T", " ")


def _tty_text(tty, event):
    """The terminal as shown, saying so when it is a serial console."""
    return tty and tty + (" (serial console)"
                          if event.tty_kind == "serial" else "")


def _text_user(event):
    return event.user or (event.user_id and "uid " + event.user_id)


def _text_source(event):
    return _endpoint(event.source_ip, event.source_domain, event.source_port)


def _text_typed(event):
    return typed_summary(event.typed_lines, event.typed_more) \
        if event.typed_lines or event.typed_more else None


#: What event_text shows, in order: (key=, the Event field whose value it
#: is, how it is worked out from the event and that value, or None for
#: the value itself). A field that is unset (None or "") shows nothing
#: and costs no call; a pair of several fields is keyed on the action,
#: which every event has, and works itself out.
_TEXT_LAYOUT = (
    ("user", "action", lambda event, _: _text_user(event)),
    ("as", "target_user", None),
    ("source", "action", lambda event, _: _text_source(event)),
    ("asn", "source_as_number", lambda _, number: "AS%d" % number),
    ("org", "source_as_org", None), ("country", "source_country", None),
    ("city", "source_city", None),
    ("source_type", "source_network_type", None),
    ("provider", "source_provider", None),
    ("destination", "destination_ip", lambda event, ip: ip and _endpoint(
        ip, None, event.destination_port)),
    ("service", "service", None), ("method", "auth_method", None),
    ("reason", "reason", None), ("key", "key", None),
    ("tty", "tty", lambda event, tty: _tty_text(tty, event)),
    ("command", "command_line", None),
    ("duration", "session_duration_s", lambda _, seconds: "%gs" % seconds),
    ("typed", "action", lambda event, _: _text_typed(event)),
    ("counted_by", "counted_by", None), ("network", "network", None),
    ("attempts", "attempts", None),
    ("window", "window_s", lambda _, seconds: "%ds" % seconds),
    ("users_tried", "users_tried", lambda _, names: ",".join(names or ())),
    ("sources", "sources", lambda _, addresses: ",".join(addresses or ())),
    ("held_back", "held_back", None),
    ("kinds", "detail", lambda event, kinds: kinds if event.held_back
     else None),
    ("unit", "unit", None), ("dropped", "dropped", None),
    ("record", "login_record", None), ("repeat", "repeat", None),
    ("writer_uid", "writer_uid", None), ("program", "process_name", None),
    ("claimed", "claimed_action", None),
    ("detail", "detail", lambda event, detail: detail
     if event.action in DETAIL_SHOWN else None),
    ("host", "hostname", None), ("journal_time", "journal_time", None),
    ("host_provider", "host_provider", None),
    ("message", "message", lambda event, message: message
     if event.action == "spoofed_entry" or event.action in AGENT_ACTIONS
     else None))
_TEXT_PLAN = tuple((key + "=", _FIELD_INDEX[field], shown)
                   for key, field, shown in _TEXT_LAYOUT)


def event_text(event):
    """The action, then who/where/how as key=value (no time)."""
    shown = [event.action]
    for key, index, worked_out in _TEXT_PLAN:
        value = event[index]
        if value is None or value == "":
            continue
        if worked_out is not None:
            value = worked_out(event, value)
            if value is None or value == "":
                continue
        if type(value) is str and _SHOWN_AS_IS.match(value):
            shown.append(key + value)  # most values: no call
        else:
            shown.append(key + _text_value(value))
    return " ".join(shown)


#: Between the lines typed in a session, where they share one line.
TYPED_SEPARATOR = " \u23ce "


def typed_summary(lines, more=None, limit=None):
    """The lines typed in a session on one line ("ls ⏎ id"), as many as fit
    `limit` characters, then "(+N more)"; None when nothing was typed."""
    if not lines and not more:
        return None
    lines = list(lines or ())
    more = more or 0
    while True:
        text = TYPED_SEPARATOR.join(lines)
        tail = "%s(+%d more)" % (" " if text else "", more) if more else ""
        if limit is None or len(text) + len(tail) <= limit or not lines:
            return text + tail
        lines.pop()
        more += 1


def render_json(event):
    """The event contract, one line, safe for a terminal: the text of
    dumps_safe(event_to_ecs(event)), written straight from the event
    (every event `scan --json` and `run --json` print comes here, and
    building the object first costs as much again)."""
    category, kind, outcome, _ = ACTIONS[event.action]
    text = [_JSON_HEAD % (format_timestamp(event.timestamp_us),
                          event.action, category, kind, outcome,
                          event_severity(event))]
    opened = _JSON_EVENT_GROUP
    for index, group, member in _JSON_PLAN:
        value = event[index]
        if value is None or value == "":
            continue  # the contract has no nulls
        if group == opened:
            text.append(", ")
        else:  # close and open objects to reach the member's own
            text.append(_JSON_BETWEEN[opened][group])
            opened = group
        text.append(member)
        if type(value) is str:
            text.append(_safe_json_string(value))
        elif type(value) is int:
            text.append(str(value))
        else:
            text.append(dumps_safe(value))
    text.append(_JSON_BETWEEN[opened][_JSON_PAMSIGNAL_GROUP])
    text.append(_JSON_VERSION)
    if event.message:
        text.append('}, "message": ')
        text.append(_safe_json_string(event.message))
        text.append("}")
    else:
        text.append("}}")
    return "".join(text)


def _safe_json_string(text):
    """A JSON string as dumps_safe writes it."""
    quoted = _json_ascii_string(text)
    if "\\u" not in quoted:
        return quoted  # printable ASCII only, as in dumps_safe
    return _UNSAFE_CHARS.sub(_json_escape_char, _json_string(text))


def _json_writing_plan(layout, opened, comma=", ", colon=": "):
    """How to write an object of nested objects straight from an event:
    (row index, group, '"leaf": ') per (path, row index) of the layout, in
    its order, where a group numbers the nest of objects around a leaf
    (`opened`, where the writing starts, is group 0); the groups; and the
    text that goes from after one group's member to before another's."""
    groups = [opened]
    plan = []
    for path, index in layout:
        parents = tuple(path.split(".")[:-1])
        if parents not in groups:
            groups.append(parents)
        plan.append((index, groups.index(parents),
                     '"%s"%s' % (path.split(".")[-1], colon)))
    between = []
    for before in groups:
        row = []
        for after in groups:
            kept = 0
            while kept < min(len(before), len(after)) and \
                    before[kept] == after[kept]:
                kept += 1
            row.append("}" * (len(before) - kept) + comma + "".join(
                '"%s"%s{' % (name, colon) for name in after[kept:]))
        between.append(row)
    return tuple(plan), groups, between


#: See _json_writing_plan: the layout of the event contract, from inside
#: the event object (group 0), where _JSON_HEAD leaves off.
_JSON_PLAN, _JSON_GROUPS, _JSON_BETWEEN = _json_writing_plan(
    [(path, _FIELD_INDEX[field]) for path, field in _ECS_LAYOUT], ("event",))
_JSON_EVENT_GROUP = 0
_JSON_PAMSIGNAL_GROUP = _JSON_GROUPS.index(("pamsignal",))
#: The start of every event's JSON (actions and their ECS words need no
#: escaping), and the version that ends its pamsignal object.
_JSON_HEAD = ('{"@timestamp": "%s", "event": {"action": "%s", "category": '
              '["%s"], "type": ["%s"], "outcome": "%s", "severity": %d')
_JSON_VERSION = '"version": %s' % json.dumps(__version__)


# -- SIEM records (CEF, LEEF 2.0, ECS JSON) in syslog (RFC 5424, 3164) --------

#: Who CEF and LEEF name as the device vendor and product.
SIEM_VENDOR, SIEM_PRODUCT = "PAMSignal", "pamsignal"

#: Largest syslog message sent (header, structured data and record, without
#: the TCP framing): under rsyslog's default maxMessageSize (8096) and the
#: 8192 bytes RFC 5425 asks receivers to take. Longer values are cut ("…").
MAX_SYSLOG_BYTES = 8000

#: Value lengths tried, longest first, until a record fits MAX_SYSLOG_BYTES.
_VALUE_CAPS = (4000, 1023, 512, 255, 128, 64, 16)

#: RFC 5424 SD-ID of the structured data. 32473 is the Private Enterprise
#: Number RFC 5612 reserves for examples: PAMSignal has none of its own.
SD_ID = "pamsignal@32473"

#: Longest SD-PARAM value: the structured data is an index, the record
#: carries the whole value.
MAX_SD_VALUE_CHARS = 255

#: Syslog severity for the event's 0-10 (highest step first): critical,
#: warning, notice, informational.
SYSLOG_LEVELS = ((2, 9), (4, 7), (5, 4), (6, 0))

#: English month abbreviations (RFC 3164 and LEEF's devTime): strftime's %b
#: follows the locale.
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
           "Oct", "Nov", "Dec")

SyslogLayout = collections.namedtuple(
    "SyslogLayout", "format header facility app_name hostname bom")
SyslogLayout.__doc__ = """How a syslog channel writes each event: record
format (cef, leef, json), header (rfc5424, rfc3164), facility number,
APP-NAME, HOSTNAME (None: the event's), and whether MSG starts with a BOM."""


def _capped(value, cap):
    return shorten(str(value), cap) if cap else str(value)


#: CEF extension values: backslash, equals sign and line breaks escaped.
_CEF_VALUE_ESCAPES = {ord("\\"): "\\\\", ord("="): "\\=", ord("\n"): "\\n",
                      ord("\r"): "\\r"}


def cef_header_field(text):
    """A CEF header field: backslash and pipe escaped, on one line."""
    return re.sub(r"[\r\n]", " ", text.replace("\\", "\\\\").replace(
        "|", "\\|"))


def cef_value(text):
    """A CEF extension value: CEF's own escapes (`|` needs none there);
    what CEF has no escape for (NUL, ESC, other controls, hidden Unicode)
    is written as the text \\xNN, as on the console, its backslash
    escaped as CEF wants, so a strict reader still takes the record."""
    return _UNSAFE_CHARS.sub(_cef_escape_char,
                             text.translate(_CEF_VALUE_ESCAPES))


def _cef_escape_char(match):
    return "\\" + _escape_char(match)


def _cef_users(event):
    """(suser, duser): who acted and which account was used. A login's
    user is the account logged into; sudo's and su's the person acting."""
    if event.target_user:
        return event.user, event.target_user
    return None, event.user


def _address_keys(ip, v4_key, v6_key, label):
    """CEF keeps IPv4 in src/dst and IPv6 in c6a2/c6a3 with a label."""
    if ip is None:
        return []
    if ":" in ip:
        return [(v6_key, ip, 0), (v6_key + "Label", label, 0)]
    return [(v4_key, ip, 0)]


def _cef_pairs(event, event_id):
    """(key, value, longest) of a CEF extension, in the documented order;
    `longest` 0 means the value is short by nature."""
    category, _, outcome, _ = ACTIONS[event.action]
    suser, duser = _cef_users(event)
    pairs = [("rt", event.timestamp_us // 1000, 0), ("cat", category, 0),
             ("outcome", outcome, 0), ("externalId", event_id, 0)]
    pairs += _address_keys(event.source_ip, "src", "c6a2",
                           "Source IPv6 Address")
    pairs += [("shost", event.source_domain, 1023),
              ("spt", event.source_port, 0)]
    pairs += _address_keys(event.destination_ip, "dst", "c6a3",
                           "Destination IPv6 Address")
    pairs += [("dpt", event.destination_port, 0), ("suser", suser, 1023),
              ("duser", duser, 1023), ("dvchost", event.hostname, 100),
              ("dproc", event.service, 1023), ("dvcpid", event.pid, 0),
              ("reason", event.reason, 1023), ("cnt", event.attempts, 0)]
    custom = (("cs1", "authMethod", event.auth_method),
              ("cs2", "key", event.key),
              ("cs3", "command", event.command_line),
              ("cs4", "tty", event.tty),
              ("cs5", "sourceAsOrganization", event.source_as_org),
              ("cs6", "sourceCountry", event.source_country),
              ("cn1", "sourceAsNumber", event.source_as_number),
              ("cn2", "windowSeconds", event.window_s),
              ("cn3", "sessionDurationSeconds", None
               if event.session_duration_s is None
               else int(event.session_duration_s)))
    for key, label, value in custom:
        if value is not None and value != "":
            pairs += [(key, value, 4000 if key[1] == "s" else 0),
                      (key + "Label", label, 0)]
    pairs.append(("msg", event.message, 1023))
    return [(key, value, longest) for key, value, longest in pairs
            if value is not None and value != ""]


def render_cef(event, event_id, cap=None):
    """One CEF:0 record; values longer than their CEF maximum (or `cap`)
    are cut."""
    header = (SIEM_VENDOR, SIEM_PRODUCT, __version__, event.action,
              ALERT_HEADLINES.get(event.action, event.action),
              str(event_severity(event)))
    extension = " ".join("%s=%s" % (key, cef_value(_capped(
        value, min(filter(None, (longest, cap)), default=0))))
        for key, value, longest in _cef_pairs(event, event_id))
    return "CEF:0|%s|%s" % ("|".join(cef_header_field(field)
                                     for field in header), extension)


#: LEEF 2.0 attribute delimiter: `^` survives relays that rewrite a tab.
LEEF_DELIMITER = "^"

#: devTime's layout, in Java SimpleDateFormat as LEEF asks.
LEEF_TIME_FORMAT = "MMM dd yyyy HH:mm:ss.SSS z"


def leef_value(text):
    """LEEF has no escapes: the delimiter and characters unsafe in a record
    (controls, line breaks) are written as \\xNN, as on the console."""
    return escape_text(text).replace(LEEF_DELIMITER, "\\x%02x" % ord(
        LEEF_DELIMITER))


def leef_time(timestamp_us):
    """"Jan 18 2024 11:07:53.520 UTC" (LEEF_TIME_FORMAT), English months."""
    moment = time.gmtime(timestamp_us // 1000000)
    return "%s %02d %d %02d:%02d:%02d.%03d UTC" % (
        _MONTHS[moment.tm_mon - 1], moment.tm_mday, moment.tm_year,
        moment.tm_hour, moment.tm_min, moment.tm_sec,
        timestamp_us // 1000 % 1000)


def _leef_pairs(event, event_id):
    category, _, outcome, _ = ACTIONS[event.action]
    pairs = (
        ("cat", outcome), ("devTime", leef_time(event.timestamp_us)),
        ("devTimeFormat", LEEF_TIME_FORMAT),
        ("sev", max(1, event_severity(event))), ("externalId", event_id),
        ("category", category), ("src", event.source_ip),
        ("srcPort", event.source_port), ("srcDomain", event.source_domain),
        ("dst", event.destination_ip), ("dstPort", event.destination_port),
        ("usrName", event.user), ("targetUsrName", event.target_user),
        ("hostname", event.hostname), ("service", event.service),
        ("pid", event.pid), ("reason", event.reason),
        ("authMethod", event.auth_method), ("key", event.key),
        ("command", event.command_line), ("tty", event.tty),
        ("attempts", event.attempts), ("windowSeconds", event.window_s),
        ("srcAsNumber", event.source_as_number),
        ("srcAsOrganization", event.source_as_org),
        ("srcCountry", event.source_country), ("msg", event.message))
    return [(key, value) for key, value in pairs
            if value is not None and value != ""]


def render_leef(event, event_id, cap=None):
    """One LEEF:2.0 record, attributes separated by LEEF_DELIMITER."""
    return "LEEF:2.0|%s|%s|%s|%s|%s|%s" % (
        SIEM_VENDOR, SIEM_PRODUCT, __version__, event.action, LEEF_DELIMITER,
        LEEF_DELIMITER.join("%s=%s" % (key, leef_value(_capped(
            value, cap or 4000))) for key, value in _leef_pairs(
                event, event_id)))


def _capped_strings(node, cap):
    if isinstance(node, dict):
        return {key: _capped_strings(value, cap)
                for key, value in node.items()}
    if isinstance(node, list):
        return [_capped_strings(value, cap) for value in node]
    return shorten(node, cap) if isinstance(node, str) and cap else node


def render_siem_json(event, event_id, cap=None):
    """The event contract with its `event.id`, one line, no raw control
    characters or line breaks."""
    ecs = event_to_ecs(event)
    ecs["event"]["id"] = event_id
    return dumps_safe(_capped_strings(ecs, cap or 4000))


#: format option -> record renderer (event, event id, value cap) -> text.
SIEM_RENDERERS = {"cef": render_cef, "leef": render_leef,
                  "json": render_siem_json}


def _header_text(text, limit):
    """A syslog header field: printable ASCII without spaces, or `-`."""
    return re.sub(r"[^\x21-\x7e]", "_", text)[:limit] if text else "-"


def sd_value(text, cap=MAX_SD_VALUE_CHARS):
    """An RFC 5424 SD-PARAM value: `"`, `\\` and `]` escaped; control
    characters written as \\xNN (the format has no escape for them)."""
    return escape_text(shorten(text, cap)).replace(
        "\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def structured_data(event, event_id, cap=None):
    """[pamsignal@32473 ...]: the event's id, action and who/where, for
    collectors that filter without reading the record (values cut at
    `cap` too, when the record must be shorter)."""
    cap = min(cap or MAX_SD_VALUE_CHARS, MAX_SD_VALUE_CHARS)
    _, _, outcome, _ = ACTIONS[event.action]
    params = (("id", event_id), ("action", event.action),
              ("outcome", outcome), ("severity", event_severity(event)),
              ("user", event.user), ("targetUser", event.target_user),
              ("src", event.source_ip or event.source_domain),
              ("service", event.service))
    return "[%s %s]" % (SD_ID, " ".join(
        '%s="%s"' % (name, sd_value(str(value), cap)) for name, value in
        params if value is not None and value != ""))


def syslog_header(event, layout, event_id, cap=None):
    """The header before the record: RFC 5424 (with structured data) or
    RFC 3164 (in UTC: it has no time zone)."""
    priority = layout.facility * 8 + severity_level(event, SYSLOG_LEVELS)
    hostname = _header_text(layout.hostname or event.hostname, 255)
    if layout.header == "rfc3164":
        moment = time.gmtime(event.timestamp_us // 1000000)
        return "<%d>%s %2d %02d:%02d:%02d %s %s: " % (
            priority, _MONTHS[moment.tm_mon - 1], moment.tm_mday,
            moment.tm_hour, moment.tm_min, moment.tm_sec, hostname,
            layout.app_name)
    return "<%d>1 %s %s %s - %s %s %s" % (
        priority, format_timestamp(event.timestamp_us), hostname,
        layout.app_name, event.action, structured_data(event, event_id, cap),
        "\ufeff" if layout.bom else "")


def render_syslog(event, layout):
    """One syslog message as bytes (UTF-8, no framing), at most
    MAX_SYSLOG_BYTES: values are cut shorter until it fits."""
    event_id = alert_id(event)
    render = SIEM_RENDERERS[layout.format]
    for cap in (None,) + _VALUE_CAPS:
        message = (syslog_header(event, layout, event_id, cap) +
                   render(event, event_id, cap)).encode("utf-8")
        if len(message) <= MAX_SYSLOG_BYTES:
            return message
    # Hardly reached: at the shortest cap, every value with each character
    # escaped at its longest still fits. Cut, then, still valid UTF-8.
    return message[:MAX_SYSLOG_BYTES].decode("utf-8", "ignore").encode(
        "utf-8")


def frame_syslog(message, framing):
    """A message framed for a stream (RFC 6587): octet counting
    (`LEN SP MSG`) or a trailing LF; a datagram as is (None)."""
    if framing == "octet":
        return b"%d %s" % (len(message), message)
    return message + b"\n" if framing == "lf" else message


#: An alert's headline per action; other actions read as their name.
ALERT_HEADLINES = {
    "login_success": "Login", "login_failure": "Failed login",
    "session_opened": "Session opened", "session_closed": "Session closed",
    "sudo_command": "sudo", "brute_force_detected": "Brute force",
    "success_after_failures": "Login after failed attempts",
    "new_source": "Login from a new network",
    "new_sudo_user": "First sudo by this user",
    "spoofed_entry": "Forged log entry", "alert_digest": "Alerts held back",
    "alerts_dropped": "Alerts lost", "ssh_probe": "SSH probe",
    "source_throttled": "sshd throttled a source",
    "key_file_refused": "sshd refuses a key file",
    "journal_suppressed": "Login lines dropped by the journal",
    "unaccounted_session": "Session with no login in the journal",
    "report_summary": "Login report",
}

#: What an admin should do about the alerts that call for action.
ALERT_ADVICE = {
    "brute_force_detected": (
        "If this source has no business here, block it (firewall or "
        "fail2ban). Make sure SSH passwords are off (PasswordAuthentication "
        "no) or strong."),
    "success_after_failures": (
        "Confirm with the user that this login was theirs. If not, the "
        "password may have been guessed: lock the account (passwd -l), end "
        "its sessions (loginctl terminate-user) and check what it did."),
    "new_source": "Check with the user that this login was theirs.",
    "new_sudo_user": "Check that this user is meant to use sudo.",
    "spoofed_entry": (
        "A local process wrote a fake authentication message: find it by "
        "its program and UID above; it may be hiding an intrusion."),
    "alerts_dropped": (
        "The channel was unreachable for long: look at the journal of "
        "this host for what was lost."),
    "journal_suppressed": (
        "journald's rate limit dropped lines of this unit during a flood: "
        "a login in that time may have gone unseen. Check `last` or "
        "`wtmpdb last` for sessions, and lift the limit for sshd "
        "(pamsignal install writes the drop-in; see the README)."),
    "unaccounted_session": (
        "The login records show this session but the journal held no "
        "login for it (lines dropped or removed): confirm with the user, "
        "and check `last` and the sshd log around that time."),
    "key_file_refused": (
        "Key logins through this file fail (StrictModes): the home "
        "directory, ~/.ssh and the key file must belong to the user and "
        "not be writable by group or others (chmod go-w ~ ~/.ssh; "
        "chmod 600 ~/.ssh/authorized_keys)."),
}

#: Actions whose pamsignal.detail is the news itself (sshd's reason, the
#: refused file, or the throttling behind a brute force): shown.
DETAIL_SHOWN = frozenset(("ssh_probe", "source_throttled",
                          "key_file_refused", "brute_force_detected"))

#: Longest value shown in an alert (a hostile user name can be huge).
MAX_ALERT_VALUE_CHARS = 300

#: On reload, how long a courier's request in flight may take to finish
#: before a new courier takes its spool (the watchdog allows 60 s).
RELOAD_JOIN_S = 15.0

#: Alerts that waited longer than this say how late they are.
LATE_AFTER_S = 60

AlertText = collections.namedtuple("AlertText", "title facts advice")
AlertText.__doc__ = """An alert as plain text parts: a title, (label, value)
facts and advice (or None). Values are raw; each channel escapes them."""


def shorten(text, limit):
    """At most `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[:max(limit - 1, 0)] + "\u2026"


def _shown(value):
    """A value as an alert shows it: safe characters, bounded length."""
    return shorten(escape_text(str(value)), MAX_ALERT_VALUE_CHARS)


#: A name that reads as one word in a sentence; anything else is quoted.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9._@+$-]{1,64}\Z")


def quoted(value):
    """Attacker-chosen text as one unmistakable value: a plain name as it
    is, anything else in double quotes (quotes and backslashes inside
    escaped), so a user named `x from 6.6.6.6 port 22` cannot read as a
    source, nor `bob on web2` as another host."""
    if value is None:
        return None
    text = str(value)
    if _PLAIN_NAME.match(text):
        return text
    return '"%s"' % text.replace("\\", "\\\\").replace('"', '\\"')


def _who(event):
    if event.user and event.target_user and event.target_user != event.user:
        return "%s as %s" % (quoted(event.user), quoted(event.target_user))
    return quoted(event.user) or _endpoint(
        event.source_ip, event.source_domain, None) or event.network or (
        "uid %s" % event.writer_uid if event.writer_uid is not None
        else event.unit)


def _as_text(event):
    """"AS15169 GOOGLE": the source's network operator, as far as known."""
    parts = ["AS%d" % event.source_as_number] if \
        event.source_as_number is not None else []
    return " ".join(parts + [event.source_as_org or ""]).strip() or None


def _lateness(delay_s):
    if delay_s < 3600:
        return "%d min" % (delay_s // 60)
    return "%.1f h" % (delay_s / 3600.0)


def alert_text(event, delay_s=0):
    """The default layout of an alert: what happened, who, from where, on
    which host, when, and what to do. `delay_s`: how long it waited."""
    headline = ALERT_HEADLINES.get(event.action) or \
        event.action.replace("_", " ").capitalize()
    who = _who(event)
    title = headline + (": %s" % who if who else "") + (
        " on %s" % event.hostname if event.hostname else "")
    if event.action == "report_summary":
        title = summary_title(event)
    stamp = format_timestamp(event.timestamp_us)
    when = "%s %s UTC" % (stamp[:10], stamp[11:19])
    if delay_s >= LATE_AFTER_S:
        when += " (delivered %s late)" % _lateness(delay_s)
    method = " ".join(part for part in (event.service, event.auth_method and
                                        "(%s)" % event.auth_method) if part)
    window = None if event.window_s is None else "%d s" % event.window_s
    facts = [
        ("User", quoted(event.user) or (event.user_id and "uid " + str(
            event.user_id))),
        ("As", quoted(event.target_user)),
        ("From", _endpoint(event.source_ip, event.source_domain,
                           event.source_port)),
        ("AS", _as_text(event)),
        ("Country", event.source_country and event.source_country + (
            " (%s)" % event.source_city if event.source_city else "")),
        ("Source type", event.source_network_type and
         event.source_network_type + (": %s" % event.source_provider
                                      if event.source_provider else "")),
        ("To", _endpoint(event.destination_ip, None, event.destination_port)),
        ("Network", event.network), ("Service", method or None),
        ("TTY", _tty_text(quoted(event.tty), event)),
        ("Command", quoted(event.command_line)),
        ("Typed", typed_summary(event.typed_lines, event.typed_more,
                                MAX_ALERT_VALUE_CHARS)),
        ("Reason", event.reason), ("Counted by", event.counted_by),
        ("Attempts", event.attempts and "%d%s" % (
            event.attempts, " in %s" % window if window else "")),
        ("Users tried", ", ".join(quoted(name) for name in
                                  event.users_tried or ()) or None),
        ("Sources", ", ".join(event.sources or ()) or None),
        ("Held back", event.held_back and "%d (%s)%s" % (
            event.held_back, event.detail, " over " + window if window
            else "")),
        ("Repeat", event.repeat and "%d (the same alert again)"
         % event.repeat),
        ("Writer UID", event.writer_uid),
        ("Program", quoted(event.process_name)),
        ("Claimed", event.claimed_action), ("Unit", event.unit),
        ("Lines dropped", event.dropped),
        ("Login record", event.login_record),
        ("Detail", event.detail if event.action in DETAIL_SHOWN else None),
        ("Severity", "%d/10" % event_severity(event)),
        ("Host", event.hostname and event.hostname + (
            " (%s)" % event.host_provider if event.host_provider else "")),
        ("Time", when + (" (when read: the entry claimed the impossible "
                         "time %s)" % event.journal_time
                         if event.journal_time else "")),
        ("Log line", event.message if event.held_back is None else None),
    ]
    return AlertText(_shown(title), [(label, _shown(value))
                                     for label, value in facts
                                     if value is not None and value != ""],
                     ALERT_ADVICE.get(event.action))


#: Placeholders a channel template may use.
TEMPLATE_FIELDS = ("title", "facts", "advice", "action", "severity", "user",
                   "target_user", "source", "service", "reason", "host",
                   "time", "command", "attempts", "message", "asn",
                   "country", "source_type", "destination")

_PLACEHOLDER = re.compile(r"\{([A-Za-z_]+)\}")


def template_values(event, text):
    """Raw values of the template placeholders for one alert."""
    facts = dict(text.facts)
    return {
        "title": text.title, "advice": text.advice or "",
        "facts": "\n".join("%s: %s" % fact for fact in text.facts),
        "action": event.action, "severity": str(event_severity(event)),
        "user": facts.get("User", ""), "target_user": facts.get("As", ""),
        "source": facts.get("From", ""), "service": facts.get("Service", ""),
        "reason": facts.get("Reason", ""), "host": facts.get("Host", ""),
        "time": facts.get("Time", ""), "command": facts.get("Command", ""),
        "attempts": facts.get("Attempts", ""),
        "message": facts.get("Log line", ""), "asn": facts.get("AS", ""),
        "country": facts.get("Country", ""),
        "source_type": facts.get("Source type", ""),
        "destination": facts.get("To", "")}


def fill_template(template, values, escape):
    """The admin's template with each {placeholder} replaced by its value,
    escaped for the channel's markup (the template's own text is not)."""
    return _PLACEHOLDER.sub(lambda match: escape(values[match.group(1)]),
                            template)


def escape_html(text):
    """For Telegram's HTML parse mode: only &, < and > are special."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(
        ">", "&gt;")


def escape_telegram(text):
    """Telegram HTML, and @ broken with a word joiner: no name in an alert
    can mention (and notify) somebody."""
    return escape_html(text).replace("@", "@\u2060")


def escape_slack(text):
    """Slack mrkdwn: &, < and > (links, mentions) are the control
    characters; emphasis marks are neutralised so a name cannot restyle
    the alert."""
    return escape_html(text).translate(_SLACK_MARKS)


_SLACK_MARKS = {ord("*"): "\u2217", ord("_"): "\uff3f", ord("~"): "\u223c",
                ord("`"): "\u02cb"}

_MARKDOWN_SPECIAL = re.compile(r"([\\*_~`|>\[\]<])")


def escape_markdown(text):
    """Discord markdown: emphasis, code, quote, link and mention marks
    escaped, and @ broken with a word joiner so nothing can ping."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text).replace("@", "@\u2060")


#: Teams' Adaptive Card markdown has no escape: look-alikes instead.
_TEAMS_MARKS = dict(_SLACK_MARKS)
_TEAMS_MARKS.update({ord("["): "\uff3b", ord("]"): "\uff3d",
                     ord("#"): "\uff03"})


def escape_teams(text):
    return text.translate(_TEAMS_MARKS)


def escape_plain(text):
    return text


def fit_escaped(plain, limit, escape):
    """The longest cut of `plain` whose escaped form has at most `limit`
    characters (escaping lengthens text unevenly, so search for it)."""
    escaped = escape(plain)
    if len(escaped) <= limit:
        return escaped
    low, high = 0, min(len(plain), limit)
    best = escape(shorten("", 0))
    while low <= high:
        cut = (low + high) // 2
        candidate = escape(shorten(plain, cut)) if cut else ""
        if len(candidate) <= limit:
            best, low = candidate, cut + 1
        else:
            high = cut - 1
    return best


def _shortened_values(values, size):
    return {key: shorten(value, size) for key, value in values.items()}


Markup = collections.namedtuple("Markup", "line heading limit escape block")
Markup.__new__.__defaults__ = (None,)
Markup.__doc__ = """How a channel lays out an alert's text: `line` % (label,
value) for each fact, `heading` % title (None: no title line), at most
`limit` characters (None: any length), every value through `escape`; a
report summary's lines inside `block` (start, end, and the escape inside
it: a code block; None: plain lines)."""


def compose(text, markup, template=None, values=None):
    """A message in a channel's `markup`: the title as its heading, then one
    line per fact and the advice; facts from the end are dropped until it
    fits the limit, so markup is never cut in half. With a template, the
    admin's text with escaped values instead."""
    line, heading, limit, escape = markup[:4]
    if template is not None:
        body = fill_template(template, values, escape)
        if len(body) <= limit:
            return body
        # Shorten the values, not the admin's text, so its markup holds.
        low, high, best = 1, max(len(v) for v in values.values()), None
        while low <= high:
            size = (low + high) // 2
            body = fill_template(template, _shortened_values(values, size),
                                 escape)
            if len(body) <= limit:
                best, low = body, size + 1
            else:
                high = size - 1
        return best if best is not None else fit_escaped(
            fill_template(template, values, escape_plain), limit, escape)
    head = heading % escape(text.title) if heading else None
    tail = "\n\n" + escape(text.advice) if text.advice else ""
    lines = [line % (escape(label), escape(value))
             for label, value in text.facts]
    while lines and len(head or "") + len(tail) + sum(
            len(each) + 1 for each in lines) > limit:
        lines.pop()
    message = "\n".join(([head] if head else []) + lines) + tail
    return message if len(message) <= limit else fit_escaped(
        text.title, limit, escape)


# A report summary (`report --send`) is an event of its own kind: its
# message holds the report's text, which a channel shows as a block of
# fixed-width lines, cut to the channel's limit with a line that says how
# many more there were.

#: How many columns a sent report is laid out for (a phone shows less,
#: a code block scrolls).
SUMMARY_COLUMNS = 100

#: The longest report text a summary carries (a spooled event stays well
#: under MAX_SPOOL_FILE_BYTES even with every character \u-escaped).
MAX_SUMMARY_CHARS = 100000


def escape_code_block(text):
    """Inside a ``` code block nothing but the fence itself is markup:
    a backtick becomes a look-alike, so no name can close the block."""
    return text.replace("`", "\u02cb")


def escape_slack_code(text):
    """Slack's ``` block still reads &, < and > (links, mentions)."""
    return escape_code_block(escape_html(text))


def summary_title(event):
    """"Login report on web1, 2026-12-05 00:00 to 2026-12-06 00:00"."""
    return _shown(ALERT_HEADLINES["report_summary"] + (
        " on %s" % event.hostname if event.hostname else "") + (
        ", %s" % event.detail if event.detail else ""))


def _more_lines_text(count, hostname):
    return "... %d more line%s: pamsignal report on %s shows them all" % (
        count, "" if count == 1 else "s", hostname or "the server")


def summary_message(event, markup):
    """A report summary in a channel's `markup`: the title as its heading,
    the report's lines inside its block, as many as fit in its limit, then
    "... N more lines" for the rest. A block is never cut in half."""
    _, heading, limit, escape, block = markup
    start, end, inside = block or ("", "", escape)
    head = [heading % escape(summary_title(event))] if heading else []
    lines = [inside(line) for line in (event.message or "").split("\n")]

    def message(count):
        more = len(lines) - count
        body = start + "\n".join(lines[:count]) + end
        return "\n".join(head + [body] + (
            [escape(_more_lines_text(more, event.hostname))] if more
            else []))

    if limit is None or len(message(len(lines))) <= limit:
        return message(len(lines))
    count, size = 0, len(message(0))
    while count < len(lines) and size + len(lines[count]) + 1 <= limit:
        size += len(lines[count]) + 1
        count += 1
    text = message(count)
    while len(text) > limit and count:  # the "more" line grew a digit
        count -= 1
        text = message(count)
    return text if len(text) <= limit else fit_escaped(
        summary_title(event), limit, escape)


# ---------------------------------------------------------------------------
# 11 integrity log
# ---------------------------------------------------------------------------
# The audit log: every event and every alert decision as one JSON line in
# log_dir, chained by SHA-256 (or HMAC-SHA256 with a key) so that an edit
# breaks the chain; its head is anchored in the journal. Also the journal's
# native protocol, which the anchors and the `journal` channel write with.
#
# A record's line is its JSON with sorted keys, no spaces and ASCII only
# (json.dumps(record, sort_keys=True, separators=(",", ":"))), followed, just
# before the closing brace, by ,"hash":"HEX". The hashed bytes are that line
# without the ,"hash":"HEX" member and without the newline. Every record has
# seq (1, 2, ...), prev (the hash of the record before; 64 zeros for the
# first), time, alg (sha256 or hmac-sha256) and kind.

#: The `prev` of the first record of a chain.
GENESIS_HASH = "0" * 64

#: Records made but not yet written that are written at once (a batch of
#: journal entries is written at its end, or about every 80 records).
AUDIT_PENDING_BYTES = 65536

#: Longest line read back as a record: a longer one is damaged. No record
#: comes near it (an event's message is cut at MAX_MESSAGE_CHARS).
MAX_AUDIT_RECORD_BYTES = 4 * 1024 * 1024

#: The audit log being written, in log_dir.
AUDIT_LOG_NAME = "audit.jsonl"

#: A rotated audit log: when it was rotated (UTC) and its last seq; names
#: sort in chain order.
ROTATED_AUDIT = re.compile(r"^audit-(\d{8}T\d{6}Z)-(\d{12})\.jsonl$")

#: MESSAGE_ID of the journal entries that anchor the audit log's head.
AUDIT_ANCHOR_MESSAGE_ID = "c4e1a13543184b559638dfda03ddef47"

#: MESSAGE_ID of each event kind written by the `journal` channel: fixed
#: for ever, so `journalctl MESSAGE_ID=...` and filters can rely on them.
EVENT_MESSAGE_IDS = {
    "login_success": "9c0d0026f605475a8d21efd63ba28c47",
    "login_failure": "dd168121658e47d3a8e9a7e523e13f89",
    "session_opened": "b34d8773ee834095aa7120ed4b6d6a5f",
    "session_closed": "59d610073a8245efbd676756c2c2ab37",
    "sudo_command": "5b7bf6950be047d5974fdd5a5769f64a",
    "brute_force_detected": "7060c30ef4204b459b83f1dbc338d900",
    "success_after_failures": "6aa87abf83134bbe82e1e91e61852189",
    "new_source": "5213d0915c934deb8db204253c1e6dbe",
    "new_sudo_user": "16d131fd323841ef86c8f313ffad3f53",
    "spoofed_entry": "9ee87e3af53a491cb77d2993d8eaff65",
    "alert_digest": "d8a120c9fdf9496c992ce8da22775113",
    "alerts_dropped": "9f060931e37442488a97a0e57a8a3ac4",
    "config_reload_failed": "3fab7dcd86b647bdbeec0a6fd95a599e",
    "monitoring_degraded": "39abeee1b2ef4ed290e5c458726103a0",
    "monitoring_restored": "bcddd6f1ca794027b2ba9fd21360cf78",
    "journal_suppressed": "dfcf116fca1f41a88cd54657a299cc73",
    "unaccounted_session": "0cf9e754d5dd435bbb5d46e2f50941c7",
    "ssh_probe": "aa865113e2424f079e19ae26063cfbee",
    "source_throttled": "6b059555720b462087e61c0c7f253ddd",
    "key_file_refused": "960654756b5f4c7fa6f31c05fd55ba05",
    "report_summary": "4b1f0e6a1d9c4c3f8a52e7d1c06b93a2",
}

#: What the agent's own journal entries are written as (never watched).
JOURNAL_IDENTIFIER = "pamsignal"

#: Shortest key accepted for the keyed (HMAC) chain.
MIN_AUDIT_KEY_BYTES = 16

_HASH_TAIL = re.compile(br',"hash":"([0-9a-f]{64})"\}\n?\Z')
_JOURNAL_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}\Z")


#: The canonical form of the banner, built once (see _JSON_ENCODER).
_CHAIN_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=True)


def chain_bytes(record):
    """The bytes a record's hash is computed over (see the banner): its
    members in key order, each value in the canonical form (an event as
    its ECS object)."""
    return ("{%s}" % ",".join([
        "%s:%s" % (_json_ascii_string(key), _canonical(record[key]))
        for key in sorted(record)])).encode("ascii")


def _canonical(value):
    """One value as _CHAIN_ENCODER writes it, an Event as event_to_ecs's
    object; text and whole numbers at once (the encoder's own setup costs
    more than a small record)."""
    if type(value) is str:
        return _json_ascii_string(value)
    if type(value) is int:
        return str(value)
    if type(value) is Event:
        return canonical_ecs(value)
    if type(value) is CanonicalText:
        return value
    return _CHAIN_ENCODER.encode(value)


class CanonicalText(str):
    """A value written in the canonical form already: an event's ECS text,
    made once for both its id and its record."""
    __slots__ = ()


def canonical_ecs(event):
    """The text of _CHAIN_ENCODER.encode(event_to_ecs(event)), written
    straight from the event as render_json does (building the object and
    sorting it costs three times as much): the plan walks a row of the
    event's fields and the values of the event contract that are not
    fields, already written."""
    row = event + _CANONICAL_ACTIONS[event.action] + (
        _canonical(event_severity(event)), _CANONICAL_VERSION)
    text = ['{"@timestamp":"%s"' % format_timestamp(event.timestamp_us)]
    opened = 0  # the top level
    for index, group, member in _CANONICAL_PLAN:
        value = row[index]
        if value is None or value == "":
            continue  # the contract has no nulls
        if group == opened:
            text.append(",")
        else:
            text.append(_CANONICAL_BETWEEN[opened][group])
            opened = group
        text.append(member)
        if index >= _FIELD_COUNT:
            text.append(value)  # written already
        elif type(value) is str:
            text.append(_json_ascii_string(value))
        else:
            text.append(_canonical(value))
    text.append("}" * (len(_CANONICAL_GROUPS[opened]) + 1))
    return "".join(text)


_FIELD_COUNT = len(EVENT_FIELDS)
#: action -> its event.action, category, type and outcome, written.
_CANONICAL_ACTIONS = {
    action: ('"%s"' % action, '["%s"]' % category, '["%s"]' % kind,
             '"%s"' % outcome)
    for action, (category, kind, outcome, _) in ACTIONS.items()}
_CANONICAL_VERSION = _json_ascii_string(__version__)
#: The event contract in key order, each level sorted as sort_keys does
#: (paths sorted as tuples), row indexes past the fields for the values
#: canonical_ecs adds; @timestamp, first of all, is written before.
_CANONICAL_PLAN, _CANONICAL_GROUPS, _CANONICAL_BETWEEN = _json_writing_plan(
    sorted([(path, _FIELD_INDEX[field]) for path, field in
            _ECS_LAYOUT + (("message", "message"),)] + [
        (path, _FIELD_COUNT + number) for number, path in enumerate((
            "event.action", "event.category", "event.type", "event.outcome",
            "event.severity", "pamsignal.version"))],
        key=lambda leaf: leaf[0].split(".")), (), ",", ":")


def alert_id(event):
    """The same alert always gets the same name: in the spool, the audit
    log and what a SIEM is sent."""
    return canonical_id(canonical_ecs(event))


def canonical_id(ecs_text):
    """An alert's name, from its ECS object in the canonical form (the
    text the audit log hashes the event as, so it is written once)."""
    return hashlib.sha256(ecs_text.encode("ascii")).hexdigest()[:32]


def record_hash(data, key=None):
    """SHA-256 of the bytes, or HMAC-SHA256 with the key, in hex."""
    if key is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def chain_record(body, seq, prev, now_us, key=None):
    """(line with newline, its hash) of the record after `prev`."""
    record = dict(body, seq=seq, prev=prev, time=format_timestamp(now_us),
                  alg="hmac-sha256" if key is not None else "sha256")
    data = chain_bytes(record)
    digest = record_hash(data, key)
    return data[:-1] + b',"hash":"' + digest.encode("ascii") + b'"}\n', digest


def parse_record(line):
    """(record, hashed bytes, stored hash) of one line, or None when the
    line is not a record at all."""
    match = _HASH_TAIL.search(line)
    if match is None:
        return None
    data = line[:match.start()] + b"}"
    try:
        record = json.loads(data.decode("ascii"))
    except ValueError:
        return None
    if not isinstance(record, dict) or type(record.get("seq")) is not int \
            or not isinstance(record.get("prev"), str):
        return None
    return record, data, match.group(1).decode("ascii")


ChainVerdict = collections.namedtuple(
    "ChainVerdict", "records head head_seq problem first_seq")
ChainVerdict.__doc__ = """What verify_chain found: records checked, the
last record's hash and seq, the first problem as text (None: intact)."""


def _where(location):
    return "%s:%d" % location


def _chain_start_problem(seq, prev, removals):
    """Why the first retained record cannot start the chain, or None: the
    very first record, or one right after a recorded removal."""
    if seq == 1 and prev == GENESIS_HASH:
        return None
    if (seq - 1, prev) in removals:
        return None
    return ("records 1 to %d are missing (a deleted file or lines) and no "
            "removal record explains it" % (seq - 1))


def _link_problem(seq, prev, expected_seq, expected_prev, before, seen,
                  locations):
    """Why a record does not follow the one `before` it, or None."""
    if seq == expected_seq and prev == expected_prev:
        return None
    if seq == expected_seq:
        return ("the record before it (%s, seq %d) was changed: this one "
                "holds another hash for it" % (_where(before), seq - 1))
    if seq in seen:
        return "seq %d was already at %s: a record was inserted or copied" \
            % (seq, _where(seen[seq]))
    if seq > expected_seq:
        if expected_seq in locations:
            return ("records are out of order: seq %d expected, seq %d found"
                    " (seq %d is at %s)" % (expected_seq, seq, expected_seq,
                                            _where(locations[expected_seq])))
        return "records %s removed before it" % (
            "seq %d" % expected_seq if seq == expected_seq + 1 else
            "seq %d to %d" % (expected_seq, seq - 1))
    return "records are out of order: seq %d after seq %d" % (
        seq, expected_seq - 1)


def _record_problem(item, key):
    """Why a parsed line is not an intact record of this chain, or None."""
    if item is None:
        return "not an intact record (changed or damaged)"
    record, data, stored = item
    alg = "hmac-sha256" if key is not None else "sha256"
    if record.get("alg") != alg:
        if key is None and record.get("alg") == "hmac-sha256":
            return ("the log is keyed (HMAC): give its key (--key-file or "
                    "[audit] key)")
        return "changed: written as %r, expected %s" % (record.get("alg"),
                                                         alg)
    if record_hash(data, key) != stored:
        return "changed: its hash does not match its content"
    return None


def _removal(record):
    """The (seq, hash) a `removed` record says the chain went on from, or
    None for one whose values no agent writes (a list cannot be a key):
    it is not yet verified, and a forged one must not crash the check."""
    last_seq, last_hash = record.get("last_seq"), record.get("last_hash")
    if type(last_seq) is int and isinstance(last_hash, str):
        return last_seq, last_hash
    return None


def verify_chain(lines, key=None):
    """Check a chain given as (file, line number, bytes) in order: each
    record's hash, and that each follows the one before. Returns a
    ChainVerdict whose problem names the first record that was changed,
    removed, inserted or reordered, with its file and line."""
    locations, removals = {}, set()
    for file_name, number, line in lines:  # where each seq is, first
        item = parse_record(line)
        if item is not None:
            locations.setdefault(item[0]["seq"], (file_name, number))
            if item[0].get("kind") == "removed":
                removals.add(_removal(item[0]))
    head, head_seq, first_seq, seen, before = None, None, None, {}, None
    count = 0
    for count, (file_name, number, line) in enumerate(lines):
        location, item = (file_name, number), parse_record(line)
        problem = _record_problem(item, key)
        if isinstance(line, OverlongLine):
            problem = "longer than %d bytes: not a record (damaged)" % \
                MAX_AUDIT_RECORD_BYTES
        if problem is None:
            seq, prev = item[0]["seq"], item[0]["prev"]
            if head is None:
                problem = _chain_start_problem(seq, prev, removals)
                first_seq = seq
            else:
                problem = _link_problem(seq, prev, head_seq + 1, head,
                                        before, seen, locations)
        if problem:
            return ChainVerdict(count, head, head_seq, "%s: %s" % (
                _where(location), problem), first_seq)
        seen[seq], before = location, location
        head, head_seq = item[2], seq
        count += 1
    return ChainVerdict(count, head, head_seq, None, first_seq)


def head_position(lines, head):
    """seq of the record whose hash is `head`, or None when the chain does
    not reach it (records up to it were removed, or the log replaced)."""
    for _, _, line in lines:
        item = parse_record(line)
        if item is not None and item[2] == head:
            return item[0]["seq"]
    return None


def audit_files(directory):
    """The audit log's files in chain order: rotated ones, then the
    current one (those that exist)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    rotated = sorted(name for name in names
                     if rotated_time_s(name) is not None)
    if AUDIT_LOG_NAME in names:
        rotated.append(AUDIT_LOG_NAME)
    return [os.path.join(directory, name) for name in rotated]


class ChainLines:
    """(file, line number, bytes) of every line of the files, in order;
    read again at each pass, so a long log is never held in memory."""

    def __init__(self, paths):
        self.paths = list(paths)

    def __iter__(self):
        for path in self.paths:
            # never blocks on a FIFO, nor follows a planted link (root runs
            # this); a line longer than any record is not held whole
            with open_regular(path) as handle:
                number = 0
                while True:
                    line = handle.readline(MAX_AUDIT_RECORD_BYTES + 1)
                    if not line:
                        break
                    number += 1
                    if len(line) > MAX_AUDIT_RECORD_BYTES:
                        while line and not line.endswith(b"\n"):
                            line = handle.readline(65536)
                        line = OverlongLine()
                    yield path, number, line


class OverlongLine(bytes):
    """What ChainLines gives for a line longer than any record: damaged,
    and never read whole."""


def rotated_name(now_s, last_seq):
    return "audit-%s-%012d.jsonl" % (
        time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now_s)), last_seq)


def rotated_time_s(name):
    """When a rotated file was rotated, from its name; None when the name
    is not one of a rotated file (an impossible date is not ours)."""
    match = ROTATED_AUDIT.match(name)
    if match is None:
        return None
    try:
        return calendar.timegm(time.strptime(match.group(1),
                                             "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return None


def misnamed_files(names):
    """Names shaped as rotated files but with an impossible date."""
    return sorted(name for name in names if ROTATED_AUDIT.match(name) and
                  rotated_time_s(name) is None)


def expired_files(names, now_s, retention_s):
    """Rotated files older than the retention, oldest first."""
    if not retention_s:
        return []
    cutoff_s = now_s - retention_s
    return sorted(name for name in names if
                  (rotated_time_s(name) or cutoff_s) < cutoff_s)


def decision_record(channel, event_id, action, decision, detail=None):
    """An alert decision: which channel sent, spooled, held back (by which
    rule) or failed to take the event."""
    body = {"kind": "alert", "channel": channel, "id": event_id,
            "action": action, "decision": decision}
    if detail:
        body["detail"] = detail
    return body


def held_back_by(gate, event):
    """The rule of a channel that kept an event from becoming an alert:
    the policy key that filtered it, or the throttle that holds it."""
    policy = gate.policy
    if not policy_admits(policy, event, gate.groups_of):
        if event.action not in policy.events:
            return "events"
        if event_severity(event) < policy.min_severity:
            return "min_severity"
        if _in_networks(event.source_ip, policy.ignore_sources):
            return "ignore_sources"
        return "ignore_users" if _named_in(policy.ignore_users, (), event,
                                           gate.groups_of) \
            else "ignore_groups"
    return "cooldown" if throttle_key(event) in gate.throttle.cooling \
        else "rate_limit"


def skipped_decision(gate, event):
    """(decision, rule) for an event a channel did not alert on."""
    rule = held_back_by(gate, event)
    return ("held_back" if rule in ("cooldown", "rate_limit")
            else "filtered"), rule


# -- the journal's native protocol --------------------------------------------

def journal_field_name(path):
    """An ECS path as a journal field: the parts joined by _, upper case,
    other characters as _, no leading _ (@timestamp: TIMESTAMP)."""
    name = re.sub(r"[^A-Z0-9_]", "_", path.replace(".", "_").upper())
    return name.lstrip("_0123456789")[:64]


def flatten_ecs(node, prefix=""):
    """[(journal field, text)] of an ECS object's leaves; a list's items
    are joined with commas."""
    fields = []
    for key in sorted(node):
        value = node[key]
        path = prefix + key
        if isinstance(value, dict):
            fields += flatten_ecs(value, path + ".")
        elif isinstance(value, list):
            fields.append((journal_field_name(path),
                           ",".join(str(item) for item in value)))
        else:
            fields.append((journal_field_name(path), str(value)))
    return fields


def journal_priority(severity):
    """Event severity 0-10 -> syslog PRIORITY (2 crit ... 6 info)."""
    return 2 if severity >= 9 else 3 if severity >= 7 else \
        4 if severity >= 5 else 5 if severity >= 3 else 6


def event_message_id(action):
    """The MESSAGE_ID of an action: from the table; an action added
    without one (a test asks for it) still gets a fixed id of its own."""
    return EVENT_MESSAGE_IDS.get(action) or hashlib.sha256(
        ("pamsignal event " + action).encode("utf-8")).hexdigest()[:32]


def journal_message(event):
    """The readable line without its time: the journal has its own."""
    return render_text(event).split(" ", 2)[2]


def event_journal_fields(event, identifier=JOURNAL_IDENTIFIER):
    """[(NAME, text)] of one event for the journal: MESSAGE, PRIORITY,
    SYSLOG_IDENTIFIER, MESSAGE_ID of its kind, and the ECS fields
    flattened (event.action -> EVENT_ACTION, source.ip -> SOURCE_IP; the
    ECS `message`, the original log line, as EVENT_ORIGINAL)."""
    ecs = event_to_ecs(event)
    original = ecs.pop("message", None)
    fields = [("MESSAGE", journal_message(event)),
              ("PRIORITY", str(journal_priority(event_severity(event)))),
              ("SYSLOG_IDENTIFIER", identifier),
              ("MESSAGE_ID", event_message_id(event.action))]
    fields += flatten_ecs(ecs)
    if original:
        fields.append(("EVENT_ORIGINAL", original))
    return fields


def encode_journal_entry(fields):
    """[(NAME, text)] -> one native protocol datagram: NAME=value lines, a
    value with a newline as NAME, 64-bit little-endian length, value."""
    parts = []
    for name, value in fields:
        if not _JOURNAL_NAME.match(name):
            raise ValueError("not a journal field name: %r" % name)
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            parts.append(name.encode("ascii") + b"\n" +
                         struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode("ascii") + b"=" + data + b"\n")
    return b"".join(parts)


class JournalWriter:
    """Writes entries to journald's native socket; one too large for a
    datagram goes in an unlinked temporary file passed with SCM_RIGHTS."""

    def __init__(self, socket_path=JOURNAL_SOCKET):
        self.socket_path = socket_path
        self.sock = None

    def send(self, fields):
        """Write one entry; OSError when journald does not take it."""
        data = encode_journal_entry(fields)
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.sendto(data, self.socket_path)
        except OSError as error:
            if error.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_as_file(data)

    def _send_as_file(self, data):
        with tempfile.TemporaryFile(dir="/dev/shm") as spill:
            spill.write(data)
            spill.flush()
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                    struct.pack("i", spill.fileno()))],
                              0, self.socket_path)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def anchor_fields(seq, head, identifier=JOURNAL_IDENTIFIER):
    """The journal entry that anchors the audit log's head."""
    return [("MESSAGE", "audit log head: seq %d hash %s" % (seq, head)),
            ("PRIORITY", "6"), ("SYSLOG_IDENTIFIER", identifier),
            ("MESSAGE_ID", AUDIT_ANCHOR_MESSAGE_ID),
            ("PAMSIGNAL_AUDIT_SEQ", str(seq)),
            ("PAMSIGNAL_AUDIT_HEAD", head)]


# -- the audit log file -------------------------------------------------------

def _last_line_at(descriptor):
    """(start, size, line) of an open file's last line: its offset, the
    file's size, and its bytes (which may lack the newline), or None when
    the file is empty or the line is longer than MAX_AUDIT_RECORD_BYTES
    (then never read whole). Scanned backwards block by block: a huge
    line costs one pass, never a block's bytes more than once."""
    size = os.fstat(descriptor).st_size
    start = max(size - 1, 0)  # a final newline ends the line, not starts it
    while start > 0:
        step = min(start, 65536)
        found = os.pread(descriptor, step, start - step).rfind(b"\n")
        if found >= 0:
            start += found + 1 - step
            break
        start -= step
    if not size or size - start > MAX_AUDIT_RECORD_BYTES:
        return start, size, None
    return start, size, os.pread(descriptor, size - start, start)


def _last_line(path):
    """The last line of a rotated file, as _last_line_at. Read only from
    a regular file: a FIFO or link planted in log_dir is an error
    (NotRegularFile), never a read that blocks."""
    with open_regular(path) as handle:
        return _last_line_at(handle.fileno())[2]


def _first_record_s(descriptor):
    """When an open file's first record was written (its age for
    rotation), or None when it cannot be told."""
    blocks, length = [], 0
    while length <= MAX_AUDIT_RECORD_BYTES:
        block = os.pread(descriptor, 65536, length)
        end = block.find(b"\n") + 1
        blocks.append(block[:end] if end else block)
        if end or not block:
            break
        length += len(block)
    item = parse_record(b"".join(blocks))
    try:
        return calendar.timegm(time.strptime(item[0]["time"][:19],
                                             "%Y-%m-%dT%H:%M:%S"))
    except (TypeError, KeyError, ValueError):
        return None


def _open_log_file(path):
    """A descriptor on log_dir/audit.jsonl (created if missing) to read,
    cut and append to. O_NOFOLLOW and O_NONBLOCK, then fstat: a link or
    FIFO planted in a log_dir others can write must make the agent
    neither write to nor cut another file, nor block."""
    return regular_descriptor(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)


def load_audit_key(spec, log_dir, credentials_dir, euid=None):
    """The key bytes for [audit] key: empty (no key), credential:NAME
    (systemd credential) or an absolute path outside log_dir, which as
    root must be root's own and not readable by group or others. Either
    must be a regular file, not a symlink (load_config checks the
    directories above it)."""
    if not spec:
        return None
    credential = _CREDENTIAL.match(spec)
    if credential:
        if not credentials_dir:
            raise ConfigError(["[audit] key: %s, but no credentials were "
                               "passed ($CREDENTIALS_DIRECTORY is unset; "
                               "verify-log takes --key-file)" % spec])
        path = os.path.join(credentials_dir, credential.group(1))
    else:
        path = spec
        inside = os.path.join(os.path.realpath(log_dir), "")
        if os.path.realpath(path).startswith(inside):
            raise ConfigError(["[audit] key: %s is inside log_dir: whoever "
                               "can write the log could read it" % path])
    try:  # never a FIFO (it would hang the agent) nor a symlink
        with open_regular(path) as handle:
            status = os.fstat(handle.fileno())
            key = handle.read(4096).strip()
    except OSError as error:
        raise ConfigError(["[audit] key: cannot read %s: %s" % (
            path, error.strerror or error)]) from None
    euid = os.geteuid() if euid is None else euid
    if not credential and euid == 0 and (
            status.st_uid != 0 or status.st_mode & 0o077):
        raise ConfigError(["[audit] key: %s must be owned by root and not "
                           "readable by group or others (chown root: %s; "
                           "chmod 600 %s)" % (path, path, path)])
    if len(key) < MIN_AUDIT_KEY_BYTES:
        raise ConfigError(["[audit] key: %s holds %d bytes; at least %d "
                           "expected (head -c 32 /dev/urandom | base64)" % (
                               path, len(key), MIN_AUDIT_KEY_BYTES)])
    return key


class AuditLog:
    """The hash-chained audit log in log_dir, with rotation, retention and
    journal anchors. Never raises on a write: a full or read-only disk is
    counted (`unwritten`) and said (`error`), and the chain goes on from
    the last record written, with a record saying how many were lost.

    Records are gathered and written with one write(2) in append mode at
    flush() (after each batch, before the journal cursor moves), which
    then fsyncs as the spool does, or sooner when AUDIT_PENDING_BYTES are
    waiting: a crash loses at most records of the batch in hand, whose
    entries are read again (their cursor was not saved). While something
    is wrong (a write failed, lost records or a torn tail to say) each
    record is written at once, so the log says so without delay."""

    def __init__(self, settings, directory, key=None, journal=None,
                 clock=time.time):
        self.settings = settings
        self.directory = directory
        self.path = os.path.join(directory, AUDIT_LOG_NAME)
        self.key = key
        self.journal = journal
        self.clock = clock
        self.fd = None
        self.seq, self.head = 0, GENESIS_HASH  # of the last record made
        self.written = (0, GENESIS_HASH)  # seq and head of the last written
        self.pending = []  # lines made, not yet written
        self.pending_bytes = 0
        self.pending_counted = 0  # of them, those lost if not written
        self.file_started_s = None
        self.size = 0  # of the file as written
        self.records = 0
        self.unwritten = 0  # all told, for the metrics
        self.lost = 0  # not yet said in the log
        self.error = None
        self.dirty = False
        self.anchored_seq = 0
        self.anchor_tried = (0, clock())  # seq and time, anchored or not
        self.anchor_error = None
        self.retention_checked_s = None
        self.torn_bytes = 0  # of a record a crash cut short
        self.lock_fd = None
        self.misnamed = set()  # files not ours, already said

    # -- opening --------------------------------------------------------------

    def open(self):
        """Find where the chain stands and open the file; a failure leaves
        the log closed (retried at each record) and said in `error`."""
        self._retry_open()
        self.append({"kind": "agent_started", "version": __version__})

    def _resume(self):
        """Open the file and take the chain up from the last record of
        the newest file that holds one."""
        self.fd = _open_log_file(self.path)
        self._drop_torn_tail()
        self.size = os.fstat(self.fd).st_size
        for path in reversed(audit_files(self.directory)):
            if path == self.path:
                _, size, line = _last_line_at(self.fd)
            else:
                with open_regular(path) as handle:
                    _, size, line = _last_line_at(handle.fileno())
            if not size:
                continue  # just rotated: the chain ends in the file before
            item = parse_record(line) if line else None
            if item is None:
                # changed or damaged (a crash leaves no newline): going on
                # from an older record would fork the chain unseen
                raise OSError(errno.EINVAL, "the last line of %s is not an "
                              "intact record (changed or damaged): `pamsignal"
                              " verify-log` names it; move the audit*.jsonl "
                              "files aside to start a new chain" % path)
            if _record_problem(item, self.key):
                # another key (or none): going on would make a chain
                # that never verifies
                raise OSError(errno.EINVAL, "its last record was written"
                              " with another key or none; move the "
                              "audit*.jsonl files aside to start a new "
                              "chain")
            self.seq, self.head = item[0]["seq"], item[2]
            self.written = (self.seq, self.head)
            break
        self.file_started_s = _first_record_s(self.fd) if self.size \
            else None

    def _lock(self):
        """Hold log_dir/audit.lock: a second agent on the same log (one
        run by hand beside the service) would fork the chain, so it keeps
        no audit log instead."""
        if self.lock_fd is not None:
            return
        descriptor = os.open(os.path.join(self.directory, "audit.lock"),
                             os.O_RDWR | os.O_CREAT | os.O_CLOEXEC |
                             os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(descriptor)
            raise OSError(errno.EBUSY, "another pamsignal keeps this audit "
                          "log") from None
        self.lock_fd = descriptor

    def _drop_torn_tail(self):
        """A crash cut the last record short (no newline ends the file):
        it was never part of the chain, so its bytes go and a record says
        so. Cut on the descriptor opened without following links."""
        start, size, _ = _last_line_at(self.fd)
        if size and os.pread(self.fd, 1, size - 1) != b"\n":
            os.ftruncate(self.fd, start)
            self.torn_bytes = size - start

    # -- writing --------------------------------------------------------------

    def append(self, body):
        """Add a record; False when it could not be written (counted)."""
        now_s = self.clock()
        if self.fd is None and self.error is not None:
            self._retry_open()
        if self._rotation_due(now_s):
            self.rotate(now_s)
        # What the log says of itself is not counted as lost: it is said
        # again until it is written.
        if self.torn_bytes and self._write(
                {"kind": "repaired", "dropped_bytes": self.torn_bytes},
                now_s, counted=False):
            self.torn_bytes = 0
        if self.lost and self.fd is not None:
            if self._write({"kind": "not_written", "records": self.lost},
                           now_s, counted=False):
                self.lost = 0
        return self._write(body, now_s)

    def record_event(self, event):
        """Add the record of an event (its ECS object); the event's id,
        which the records of what the channels did with it name."""
        ecs_text = canonical_ecs(event)
        event_id = canonical_id(ecs_text)
        self.append({"kind": "event", "id": event_id,
                     "event": CanonicalText(ecs_text)})
        return event_id

    def _retry_open(self):
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            self._lock()
            self._resume()
        except OSError as error:
            self.error = "cannot open %s: %s" % (self.path,
                                                  error.strerror or error)
            self._close_fd()

    def _write(self, body, now_s, counted=True):
        """Make the record that follows the last one; False when it could
        not be written (then lost, if `counted`)."""
        if self.fd is None:
            self.lost += counted
            self.unwritten += counted
            return False
        line, digest = chain_record(body, self.seq + 1, self.head,
                                    int(now_s * 1e6), self.key)
        self.seq, self.head = self.seq + 1, digest
        self.pending.append(line)
        self.pending_bytes += len(line)
        self.pending_counted += counted
        if self.file_started_s is None:
            self.file_started_s = now_s
        if self.error is not None or self.lost or self.torn_bytes or \
                self.pending_bytes >= AUDIT_PENDING_BYTES:
            return self._write_out()
        return True

    def _write_out(self):
        """Write the records made so far with one write(2); if the disk
        refuses them, they are counted as lost and the chain goes on from
        the last record written. (Records are made only with the file
        open, and it is closed only with none pending: nothing is pending
        while it is closed.)"""
        if not self.pending:
            return True
        data, count = b"".join(self.pending), len(self.pending)
        lost = self.pending_counted
        self.pending, self.pending_bytes, self.pending_counted = [], 0, 0
        written = 0
        try:
            written = os.write(self.fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            self.error = "cannot write %s: %s" % (self.path,
                                                   error.strerror or error)
            if written:
                self._cut_to(self.size)  # no half record left behind
            self.seq, self.head = self.written
            self.lost += lost
            self.unwritten += lost
            if not self.size:
                self.file_started_s = None  # the file still holds none
            return False
        self.error = None
        self.written = (self.seq, self.head)
        self.size += len(data)
        self.records += count
        self.dirty = True
        return True

    def _rotation_due(self, now_s):
        """The current file is full or old: the next record starts a new
        one (so no empty file is left behind)."""
        settings = self.settings
        size = self.size + self.pending_bytes
        return self.fd is not None and size > 0 and (
            size >= settings.rotate_size or (
                settings.rotate_age and self.file_started_s is not None and
                now_s - self.file_started_s >= settings.rotate_age))

    def flush(self):
        """Write what was made and fsync it; anchor and apply retention
        when due."""
        now_s = self.clock()
        self._write_out()
        if self.dirty and self.fd is not None:
            try:
                os.fsync(self.fd)
                self.dirty = False
            except OSError as error:
                self.error = "cannot fsync %s: %s" % (
                    self.path, error.strerror or error)
        tried_seq, tried_s = self.anchor_tried
        if (self.settings.anchor_every and self.seq - tried_seq >=
                self.settings.anchor_every) or (
                    self.settings.anchor_interval and
                    self.seq > self.anchored_seq and
                    now_s - tried_s >= self.settings.anchor_interval):
            self.anchor(now_s)
        if self.retention_checked_s is None or \
                now_s - self.retention_checked_s >= 3600:
            self.apply_retention(now_s)

    def rotate(self, now_s):
        """Close the file under a name that sorts in chain order; the next
        record, in a new file, still follows the last one of this."""
        if self.fd is None or not self._write_out() or not self.size:
            return
        target = os.path.join(self.directory, rotated_name(now_s, self.seq))
        try:
            os.fsync(self.fd)
            os.rename(self.path, target)
            _fsync_directory(self.directory)
        except OSError as error:
            self.error = "cannot rotate %s: %s" % (self.path,
                                                    error.strerror or error)
            return
        self._close_fd()
        self._retry_open()
        self.apply_retention(now_s)

    def apply_retention(self, now_s):
        """Remove rotated files older than the retention, and record the
        removal so that verify-log knows the gap is explained."""
        self.retention_checked_s = now_s
        try:
            names = os.listdir(self.directory)
            for name in sorted(set(misnamed_files(names)) - self.misnamed):
                say("warning", "%s is not a rotated audit log (its name "
                    "holds an impossible date): ignored" % os.path.join(
                        self.directory, name))
                self.misnamed.add(name)
            expired = expired_files(names, now_s, self.settings.retention)
            if not expired:
                return
            last = parse_record(_last_line(os.path.join(
                self.directory, expired[-1])) or b"")
            for name in expired:
                os.unlink(os.path.join(self.directory, name))
        except OSError as error:
            self.error = "cannot apply retention in %s: %s" % (
                self.directory, error.strerror or error)
            return
        self.append({"kind": "removed", "files": expired,
                     "retention_s": self.settings.retention,
                     "last_seq": last[0]["seq"] if last else None,
                     "last_hash": last[2] if last else None})
        # The files are gone: what explains the gap cannot wait for the
        # batch (no journal entry read again would make it).
        self._write_out()

    def anchor(self, now_s):
        """Write the head to the journal (off this file's reach): only the
        last record written and synced (at a flush; a head anchored but
        lost in a power cut would read as records removed)."""
        seq, head = self.written
        if self.journal is None or self.dirty or self.pending or \
                seq == self.anchored_seq:
            return
        # A refused anchor is tried again after anchor_every more records
        # or anchor_interval, not at every batch.
        self.anchor_tried = (seq, now_s)
        try:
            self.journal.send(anchor_fields(seq, head))
            self.anchor_error = None
        except OSError as error:
            self.anchor_error = "cannot anchor in the journal: %s" % (
                error.strerror or error)
            return
        self.anchored_seq = seq

    def close(self):
        if self.fd is None and self.error is None:
            return
        self.append({"kind": "agent_stopped", "records": self.records +
                     len(self.pending), "not_written": self.unwritten})
        self.flush()
        self.anchor(self.clock())
        self._close_fd()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def _cut_to(self, size):
        try:
            os.ftruncate(self.fd, size)
        except OSError:
            pass  # verify-log then names the damaged line

    def _close_fd(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


# ---------------------------------------------------------------------------
# 12 sinks and state (I/O)
# ---------------------------------------------------------------------------
# Every channel is a Sink (one interface, CHANNEL_TYPES the registry);
# network channels sit behind a durable Spool that a Courier thread
# delivers. Also the state files and the safe way to read and write them.


# -- the sink contract, the console ------------------------------------------


class Sink:
    """The one interface of every channel (CHANNEL_TYPES holds them by
    type): its `name`, the options it takes (OPTIONS: key -> check) and
    needs (REQUIRED), whether a spool and its courier stand in front of it
    (SPOOLED), and how it lays out alert text (MARKUP, a Markup; None: no
    layout of its own). The constructor does no I/O, open() does; send()
    hands one alert over (or raises); flush() pushes out what was sent
    (after each batch); close() at the end."""

    OPTIONS = {}
    REQUIRED = ()
    SPOOLED = False
    MARKUP = None

    def __init__(self, name, options=None):
        self.name = name
        self.options = dict(options or {})

    def open(self):
        pass

    def secrets(self):
        """Secret values in the options, never to be shown in an error."""
        return []

    def send(self, event, delay_s=0):
        raise NotImplementedError

    def flush(self):
        pass

    def close(self):
        pass


class ConsoleSink(Sink):
    """Prints each event on standard output: a readable line or ECS JSON."""

    OPTIONS = {"format": _console_format}

    def __init__(self, name, options=None, stream=None):
        Sink.__init__(self, name, options)
        self.format = self.options.get("format", "text")
        self.stream = stream

    def open(self):
        if self.stream is None:
            self.stream = utf8_stdout()

    def send(self, event, delay_s=0):
        line = render_json(event) if self.format == "json" \
            else render_text(event)
        try:
            self.stream.write(line + "\n")
        except OSError as error:
            raise naming_file(error, "standard output") from None

    def flush(self):
        """Everything sent so far is out: called after each batch."""
        if self.stream is not None:
            try:
                self.stream.flush()
            except OSError as error:
                raise naming_file(error, "standard output") from None

    def close(self):
        self.flush()


# -- under the network channels: answers, TLS, deadlines, HTTP ----------------

#: The most of a service's answer read (error text, JSON status).
MAX_RESPONSE_BYTES = 65536

#: Longest wait a service may ask for with 429 before we retry anyway.
MAX_RETRY_AFTER_S = 3600

#: What the service is told it is talking to.
USER_AGENT = "pamsignal/%s" % __version__


def secret_forms(value):
    """The ways a service may echo a secret back: as sent, percent-encoded
    (a URL path or query) and JSON-escaped (PHP's also escapes "/")."""
    escaped = json.dumps(value)[1:-1]
    return {value, urllib.parse.quote(value, safe=""),
            urllib.parse.quote(value), urllib.parse.quote_plus(value),
            escaped, escaped.replace("/", "\\/"),
            json.dumps(value, ensure_ascii=False)[1:-1]}


def redact(text, secrets):
    """`text` with every secret value, in any form a service may echo it
    (secret_forms), replaced by ***. Longest first, so that no part of a
    longer one is left."""
    forms = {form for value in secrets if value
             for form in secret_forms(value)}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def answer_json(body):
    """A service's answer body as JSON, or None when it is not JSON (or too
    deeply nested to parse: "[[[[..." raises RecursionError)."""
    try:
        return json.loads(body.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return None


def _json_retry_after(answer):
    """The `retry_after` of a JSON answer: at its top (Discord) or in its
    `parameters` (Telegram); None when neither is a number."""
    if not isinstance(answer, dict):
        return None
    parameters = answer.get("parameters")
    for hint in (answer.get("retry_after"), parameters.get("retry_after")
                 if isinstance(parameters, dict) else None):
        if hint is None or isinstance(hint, bool):
            continue
        try:
            return float(hint)
        except (TypeError, ValueError, OverflowError):
            continue
    return None


def _retry_after_s(headers, body):
    """Seconds a service asked us to wait: the Retry-After header (seconds
    or an HTTP date), or Telegram's and Discord's JSON `retry_after`."""
    value = headers.get("Retry-After") if headers is not None else None
    seconds = None
    if value is not None:
        value = value.strip()
        if re.match(r"^\d{1,12}(?:\.\d{1,6})?$", value):
            seconds = float(value)
        else:
            try:
                seconds = email.utils.parsedate_to_datetime(
                    value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                seconds = None
    if seconds is None:
        seconds = _json_retry_after(answer_json(body))
    if seconds is None or seconds != seconds:  # absent, or NaN
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


#: Answers that say the channel's credentials or address are wrong
#: (unauthorised, forbidden, not found, gone), not this alert. So does any
#: 1xx or 3xx (channel_problem).
CHANNEL_PROBLEM_STATUSES = frozenset((401, 403, 404, 410))


def channel_problem(status):
    """Whether an answer is the channel's fault, not the alert's: the
    alerts wait in the spool, retried with backoff, until the admin fixes
    it. An interim answer with no final one (1xx) and every 3xx (a
    redirect, never followed; 300, 304, 305 from a proxy in the way) are
    too: none of them says the service looked at the alert."""
    return status < 200 or 300 <= status < 400 or \
        status in CHANNEL_PROBLEM_STATUSES


def _channel_problem_hint(status, headers):
    """What to look at, for an answer that is the channel's fault."""
    if status < 200:
        return "no final answer after an interim one"
    if status >= 400:
        return "check the channel's URL and credentials"
    moved = headers.get("Location") if headers is not None else None
    try:
        where = urllib.parse.urlsplit(moved).hostname if moved else None
    except ValueError:  # "http://[x": no host to name
        where = None
    return "the service moved%s; pamsignal does not follow redirects" % (
        " to " + escape_text(where) if where else "")


def judge_response(status, headers, body):
    """None when the service took the alert, else the DeliveryError: 429
    waits as asked; 408, 425, 5xx and a channel problem are retried; any
    other answer refuses this very alert, for good. `body` has had its
    secrets redacted (HttpSink.post), so a cut cannot leave part of one."""
    if 200 <= status < 300:
        return None
    text = escape_text(body[:200].decode("utf-8", "replace").strip())
    reason = "HTTP %d%s" % (status, ": " + text if text else "")
    if status == 429:
        return DeliveryError("rate limited, " + reason,
                             retry_after=_retry_after_s(headers, body))
    if channel_problem(status):
        return DeliveryError("%s (%s; alerts wait in the spool until it is "
                             "fixed)" % (reason, _channel_problem_hint(
                                 status, headers)))
    if status >= 500 or status in (408, 425):
        return DeliveryError(reason)
    return DeliveryError(reason, permanent=True)


def _network_reason(error):
    """What went wrong on the way, without the URL (it may hold a token)."""
    reason = getattr(error, "reason", None) or error
    if isinstance(reason, ssl.SSLError):
        detail = getattr(reason, "verify_message", None) or reason.reason
        if reason.reason == "CERTIFICATE_VERIFY_FAILED":
            return "TLS certificate not trusted: %s" % detail
        return "TLS failed: %s" % (detail or reason)
    if isinstance(reason, (socket.timeout, TimeoutError)) or isinstance(
            getattr(reason, "__context__", None), (socket.timeout,
                                                   TimeoutError)):
        return "timed out"  # smtplib says "Connection unexpectedly closed"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def tls_context(ca_file=None):
    """Certificates and host names always verified; `ca_file` to trust a
    private CA instead of the system's."""
    return ssl.create_default_context(cafile=ca_file)


def client_tls_context(options):
    """A channel's TLS context: its ca_file, and its client certificate
    (cert_file, key_file) when it has one."""
    context = tls_context(options.get("ca_file"))
    if options.get("cert_file"):
        context.load_cert_chain(options["cert_file"], options["key_file"],
                                password=_no_passphrase)
    return context


def client_cert_problems(options):
    """(key, problem) when only one of cert_file and key_file is set."""
    if ("cert_file" in options) != ("key_file" in options):
        return [("cert_file" if "key_file" in options else "key_file",
                 "cert_file and key_file go together (a client certificate "
                 "and its key)")]
    return []


class Deadline:
    """The time by which a whole request (connect, TLS, send, read) must
    be done: `left()` is what remains, or socket.timeout once it passed."""

    def __init__(self, seconds, clock=time.monotonic):
        self.clock = clock
        self.at = clock() + seconds

    def left(self):
        left = self.at - self.clock()
        if left <= 0:
            raise socket.timeout("timed out")
        return left


class _TooMuchRead(OSError):
    """A peer sent more than its _DeadlineSocket may read (an OSError, so
    that smtplib closes the session on it as on a broken connection)."""


class _DeadlineSocket:
    """A connected socket each send and read of which gets only what is
    left of the request's deadline. A socket timeout alone bounds one read,
    so a receiver dripping its answer a byte at a time would never time
    out. With `max_read`, reading more than that many bytes in all (`read`
    counts them, from `read`) raises _TooMuchRead. Closed for real once its
    reader (the response) is closed too."""

    def __init__(self, sock, deadline, max_read=None, read=0):
        self._sock = sock
        self._deadline = deadline
        self._readers = 0
        self._closed = False
        self.max_read = max_read
        self.read = read

    def sendall(self, *args):
        self._sock.settimeout(self._deadline.left())
        return self._sock.sendall(*args)

    def recv_into(self, *args):
        self._sock.settimeout(self._deadline.left())
        count = self._sock.recv_into(*args)
        self.read += count
        if self.max_read is not None and self.read > self.max_read:
            raise _TooMuchRead("more than %d bytes" % self.max_read)
        return count

    def makefile(self, mode="rb", *args, **kwargs):
        if mode != "rb":  # http.client only ever reads its answer
            raise ValueError("unsupported mode %r" % mode)
        self._readers += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"))

    def _decref_socketios(self):  # the reader was closed (socket.SocketIO)
        self._readers -= 1
        if self._closed and self._readers <= 0:
            self._sock.close()

    def close(self):
        self._closed = True
        if self._readers <= 0:
            self._sock.close()

    def __getattr__(self, name):
        return getattr(self._sock, name)


class _DeadlineConnection:
    """The TCP connect, a proxy tunnel, TLS, and every send and read after
    them share the connection's one `deadline`."""

    deadline = None

    def _open_socket(self, address, timeout=None, source_address=None):
        sock = socket.create_connection(address, self.deadline.left(),
                                        source_address)
        try:
            sock.settimeout(self.deadline.left())  # tunnel, TLS: what is left
        except socket.timeout:
            sock.close()
            raise
        return sock

    def _tunnel(self):
        # http.client reads the proxy's answer to CONNECT from the socket
        # itself, a timeout per read: a proxy dripping header lines would
        # hold the request for ever.
        sock = self.sock
        self.sock = _DeadlineSocket(sock, self.deadline)
        try:
            super()._tunnel()
        finally:
            if self.sock is not None:  # None: closed on a refusal
                self.sock = sock
        sock.settimeout(self.deadline.left())  # TLS: what is left

    def connect(self):
        self._create_connection = self._open_socket
        super().connect()
        self.sock = _DeadlineSocket(self.sock, self.deadline)


def _connection_factory(connection_class, deadline):
    def connection(host, **options):
        made = connection_class(host, **options)
        made.deadline = deadline
        return made
    return connection


@functools.lru_cache(maxsize=None)
def _http_handlers():
    """urllib handlers whose connections keep one deadline, and one that
    refuses redirects. They subclass http.client and urllib.request, which
    only an agent that posts imports: so they are made on first use."""

    class _FinalResponse(http.client.HTTPResponse):
        """Reads past every interim answer (103 Early Hints, ...), not
        only 100 Continue as http.client does, so that the final answer
        is the one judged."""

        def _read_status(self):
            while True:
                version, status, reason = super()._read_status()
                if not 100 <= status < 200 or status == 101:
                    return version, status, reason
                http.client.parse_headers(self.fp)  # the interim one's

    class _DeadlineHTTP(_DeadlineConnection, http.client.HTTPConnection):
        response_class = _FinalResponse

    class _DeadlineHTTPS(_DeadlineConnection, http.client.HTTPSConnection):
        response_class = _FinalResponse

    class _DeadlineHTTPHandler(urllib.request.HTTPHandler):
        def __init__(self, deadline):
            urllib.request.HTTPHandler.__init__(self)
            self.deadline = deadline

        def http_open(self, req):
            return self.do_open(_connection_factory(_DeadlineHTTP,
                                                    self.deadline), req)

    class _DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
        def __init__(self, deadline, context):
            urllib.request.HTTPSHandler.__init__(self, context=context)
            self.deadline = deadline

        def https_open(self, req):
            return self.do_open(_connection_factory(_DeadlineHTTPS,
                                                    self.deadline),
                                req, context=self._context)

    class _NoRedirects(urllib.request.HTTPRedirectHandler):
        """A redirect would resend the alert, and its token, to another
        place (as a GET, perhaps over plain http): never follow one."""

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None

    return _DeadlineHTTPHandler, _DeadlineHTTPSHandler, _NoRedirects


def http_post(url, body, headers, timeout, context):
    """POST and return (status, headers, body); network failures raise a
    retryable DeliveryError. `timeout` bounds the whole request, however
    slowly the service answers. Proxies come from the usual environment
    variables (https_proxy, no_proxy)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers=dict(headers, **{
                                         "User-Agent": USER_AGENT}))
    deadline = Deadline(timeout)
    http_handler, https_handler, no_redirects = _http_handlers()
    opener = urllib.request.build_opener(
        http_handler(deadline), https_handler(deadline, context),
        no_redirects())
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.headers, \
                response.read(MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as error:
        try:
            answer = error.read(MAX_RESPONSE_BYTES)
        except (OSError, http.client.HTTPException):
            answer = b""
        return error.code, error.headers, answer
    except (urllib.error.URLError, OSError, http.client.HTTPException,
            ValueError) as error:
        raise DeliveryError("cannot reach %s: %s" % (
            urllib.parse.urlsplit(url).hostname, _timed_out(
                _network_reason(error), timeout))) from None


def _json_body(payload):
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


# -- network channels ---------------------------------------------------------


class RemoteSink(Sink):
    """A channel that delivers over the network, behind the spool.

    Shared here: options, secrets (redacted from every error), TLS, the
    timeout and the text of an alert; a subclass says how it delivers
    (`deliver`) and which options it takes."""

    SPOOLED = True
    OPTIONS = {"timeout": _timeout, "ca_file": _absolute_path,
               "template": _template}

    def __init__(self, name, options=None):
        Sink.__init__(self, name, options)
        self.timeout = self.options.get("timeout", 10)
        self.template = self.options.get("template")
        self.context = None

    def open(self):
        if self.context is None:
            self.context = client_tls_context(self.options)

    def secret(self, key):
        value = self.options.get(key)
        return value.value if isinstance(value, Secret) else value

    def secrets(self):
        return [secret.value for value in self.options.values()
                for secret in option_secrets(value)]

    def text(self, event, delay_s, markup=None):
        """The alert in this channel's markup (MARKUP, unless `markup` is
        given): the default layout, or the admin's template. A report
        summary has a layout of its own."""
        markup = markup or self.MARKUP
        if event.action == "report_summary":
            return summary_message(event, markup)
        alert = alert_text(event, delay_s)
        values = template_values(event, alert) if self.template else None
        return compose(alert, markup, self.template, values)

    def send(self, event, delay_s=0):
        """Deliver one alert now or raise DeliveryError (secrets redacted).
        `delay_s`: how long it waited, which the alert then says."""
        self.open()
        try:
            self.deliver(event, delay_s)
        except DeliveryError as error:
            error.args = (redact(str(error), self.secrets()),)
            raise

    def deliver(self, event, delay_s):
        raise NotImplementedError


class HttpSink(RemoteSink):
    """A channel that POSTs each alert to a web service; a type says what
    its request looks like (`request`) and may judge the answer."""

    def request(self, event, delay_s):
        """(url, headers, body bytes) for one alert."""
        raise NotImplementedError

    def judge(self, status, headers, body):
        return judge_response(status, headers, body)

    def post(self, url, headers, body):
        """POST one request: (status, headers, answer body). The body comes
        with every secret redacted, before any part of it is cut out to be
        shown: a cut could leave a piece of one that redact misses."""
        status, answer_headers, answer = http_post(
            url, body, headers, self.timeout, self.context)
        return status, answer_headers, redact(
            answer.decode("utf-8", "replace"), self.secrets()).encode("utf-8")

    def deliver(self, event, delay_s):
        url, headers, body = self.request(event, delay_s)
        failure = self.judge(*self.post(url, headers, body))
        if failure is not None:
            raise failure


def header_text(text):
    """Text safe for a mail header: the email package decodes RFC 2047
    encoded-words (=?utf-8?q?...?=) when a header is set, which would turn
    a hostile name's =0D=0A back into a line break; so none may form."""
    return text.replace("=?", "=\u2060?")


def severity_level(event, levels):
    """The event's severity on a service's own scale: `levels` lists the
    lowest severity of each step, from the top."""
    severity = event_severity(event)
    for level, lowest in levels:
        if severity >= lowest:
            return level
    return levels[-1][0]


class TelegramSink(HttpSink):
    """Telegram Bot API sendMessage, HTML parse mode."""

    OPTIONS = dict(HttpSink.OPTIONS, bot_token=_secret, chat_id=_chat_id,
                   api_url=_url)
    REQUIRED = ("bot_token", "chat_id")
    MARKUP = Markup("<b>%s:</b> %s", "<b>%s</b>", 4096, escape_telegram,
                    ("<pre>", "</pre>", escape_telegram))

    def request(self, event, delay_s):
        api = self.options.get("api_url", "https://api.telegram.org")
        text = self.text(event, delay_s)
        return ("%s/bot%s/sendMessage" % (api.rstrip("/"),
                                          self.secret("bot_token")),
                {"Content-Type": "application/json"},
                _json_body({"chat_id": self.options["chat_id"], "text": text,
                            "parse_mode": "HTML",
                            "link_preview_options": {"is_disabled": True}}))

    def secrets(self):
        # A service may echo the token's secret part (after "id:") alone;
        # a real one is 35 characters, a short one (tests) would redact
        # common words.
        return [part for secret in HttpSink.secrets(self)
                for part in (secret, secret.partition(":")[2])
                if part == secret or len(part) >= 16]

    def judge(self, status, headers, body):
        failure = judge_response(status, headers, body)
        answer = answer_json(body) if failure is None else None
        if isinstance(answer, dict) and answer.get("ok") is False:
            return DeliveryError("Telegram refused the message: %s"
                                 % escape_text(body[:200].decode(
                                     "utf-8", "replace")), permanent=True)
        return failure


class SlackSink(HttpSink):
    """A Slack incoming webhook: mrkdwn in a section block."""

    OPTIONS = dict(HttpSink.OPTIONS, url=_secret_url)
    REQUIRED = ("url",)
    MARKUP = Markup("*%s:* %s", "*%s*", 3000, escape_slack,
                    ("```\n", "\n```", escape_slack_code))

    def request(self, event, delay_s):
        text = self.text(event, delay_s)
        return (self.secret("url"), {"Content-Type": "application/json"},
                _json_body({"text": escape_slack(alert_text(event).title),
                            "blocks": [{"type": "section", "text": {
                                "type": "mrkdwn", "text": text}}]}))


class DiscordSink(HttpSink):
    """A Discord webhook: markdown content, no mentions, no embeds."""

    OPTIONS = dict(HttpSink.OPTIONS, url=_secret_url)
    REQUIRED = ("url",)
    MARKUP = Markup("**%s:** %s", "**%s**", 2000, escape_markdown,
                    ("```\n", "\n```", escape_code_block))

    def request(self, event, delay_s):
        text = self.text(event, delay_s)
        return (self.secret("url"), {"Content-Type": "application/json"},
                _json_body({"content": text, "username": "PAMSignal",
                            "allowed_mentions": {"parse": []},
                            "flags": 4}))  # SUPPRESS_EMBEDS


class TeamsSink(HttpSink):
    """A Teams Workflows webhook: an Adaptive Card."""

    OPTIONS = dict(HttpSink.OPTIONS, url=_secret_url)
    REQUIRED = ("url",)
    MARKUP = Markup("%s: %s", None, 20000, escape_teams)

    def request(self, event, delay_s):
        alert = alert_text(event, delay_s)
        if event.action == "report_summary":
            body = [{"type": "TextBlock", "text": escape_teams(
                summary_title(event)), "weight": "Bolder", "wrap": True},
                {"type": "TextBlock", "fontType": "Monospace", "wrap": True,
                 "text": self.text(event, delay_s)}]
        elif self.template:
            body = [{"type": "TextBlock", "wrap": True,
                     "text": self.text(event, delay_s)}]
        else:
            body = [{"type": "TextBlock", "text": escape_teams(alert.title),
                     "weight": "Bolder", "size": "Medium", "wrap": True},
                    {"type": "FactSet", "facts": [
                        {"title": escape_teams(label),
                         "value": escape_teams(value)}
                        for label, value in alert.facts]}]
            if alert.advice:
                body.append({"type": "TextBlock", "wrap": True,
                             "text": escape_teams(alert.advice)})
        card = {"type": "AdaptiveCard", "version": "1.4", "body": body,
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json"}
        return (self.secret("url"), {"Content-Type": "application/json"},
                _json_body({"type": "message", "attachments": [{
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "content": card}]}))


class NtfySink(HttpSink):
    """ntfy: JSON publish to the server with the topic of the URL."""

    OPTIONS = dict(HttpSink.OPTIONS, url=_secret_url, token=_secret)
    REQUIRED = ("url",)
    MARKUP = Markup("%s: %s", None, 4000, escape_plain)

    def request(self, event, delay_s):
        parts = urllib.parse.urlsplit(self.secret("url"))
        server = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/",
                                          "", ""))
        alert = alert_text(event, delay_s)
        headers = {"Content-Type": "application/json"}
        if self.options.get("token"):
            headers["Authorization"] = "Bearer " + self.secret("token")
        return (server, headers, _json_body({
            "topic": parts.path.strip("/"), "title": alert.title,
            "message": self.text(event, delay_s),
            "priority": severity_level(event, ((5, 9), (4, 7), (3, 5),
                                               (2, 0))),
            "tags": ["rotating_light" if event_severity(event) >= 7
                     else "key"]}))


class GotifySink(HttpSink):
    """Gotify: POST /message with an application token."""

    OPTIONS = dict(HttpSink.OPTIONS, url=_url, token=_secret)
    REQUIRED = ("url", "token")
    MARKUP = Markup("%s: %s", None, 8000, escape_plain)

    def request(self, event, delay_s):
        alert = alert_text(event, delay_s)
        return (self.options["url"].rstrip("/") + "/message",
                {"Content-Type": "application/json",
                 "X-Gotify-Key": self.secret("token")},
                _json_body({"title": alert.title, "priority":
                            event_severity(event),
                            "message": self.text(event, delay_s)}))


def webhook_signature(key, message_id, timestamp, body):
    """Standard Webhooks: v1,base64(HMAC-SHA256(key, id.timestamp.body)).
    A `whsec_` key is base64 after the prefix; any other is used as is."""
    if key.startswith("whsec_"):
        try:
            key_bytes = base64.b64decode(key[6:], validate=True)
        except ValueError:
            key_bytes = key.encode("utf-8")
    else:
        key_bytes = key.encode("utf-8")
    signed = ("%s.%d." % (message_id, timestamp)).encode() + body
    return "v1," + base64.b64encode(hmac.new(
        key_bytes, signed, hashlib.sha256).digest()).decode()


class WebhookSink(HttpSink):
    """POSTs the ECS event itself; with a secret, signed the Standard
    Webhooks way (webhook-id, webhook-timestamp, webhook-signature); with
    `headers`, extra headers (an API key); with cert_file and key_file, a
    client certificate (mutual TLS)."""

    OPTIONS = {"timeout": _timeout, "ca_file": _absolute_path,
               "url": _secret_url, "secret": _secret, "headers": _headers,
               "cert_file": _absolute_path, "key_file": _absolute_path}
    REQUIRED = ("url",)

    check_options = staticmethod(client_cert_problems)

    def request(self, event, delay_s):
        body = _json_body(event_to_ecs(event))
        headers = {header.name: header.prefix + header.secret.value
                   for header in self.options.get("headers", ())}
        headers["Content-Type"] = "application/json"
        if self.options.get("secret"):
            message_id = "ps_" + hashlib.sha256(body).hexdigest()[:32]
            timestamp = int(time.time())
            headers.update({
                "webhook-id": message_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": webhook_signature(
                    self.secret("secret"), message_id, timestamp, body)})
        return self.secret("url"), headers, body


def graph_api_failure(status, headers, body):
    """A Graph API (WhatsApp Cloud API) error answer judged by its code:
    {"error": {"message", "type", "code", "error_data": {"details"},
    "fbtrace_id"}}, most of them with HTTP 400. Throughput limits wait and
    retry; a bad or expired token (code 190, HTTP 401) keeps the alerts
    in the spool until it is fixed; anything else refuses this alert."""
    try:
        error = answer_json(body)["error"]
        code = int(error.get("code"))
        text = "WhatsApp error %d: %s" % (code, escape_text(
            str(error.get("message", ""))[:200]))
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
            RecursionError):  # not Graph's form: 1e999, [[[...]]]
        return judge_response(status, headers, body)
    if code in WHATSAPP_RATE_LIMITS or status == 429:
        return DeliveryError("rate limited, " + text,
                             retry_after=_retry_after_s(headers, body))
    if code == 190 or channel_problem(status):
        return DeliveryError("%s (check the token and phone_number_id; "
                             "alerts wait in the spool until it is fixed)"
                             % text)
    if status >= 500:
        return DeliveryError(text)
    return DeliveryError(text, permanent=True)


#: Graph API error codes that mean "too many, try later": 4 (app calls),
#: 80007 (account limit), 130429 (throughput), 131048 (spam limit), 131056
#: (too many to one recipient).
WHATSAPP_RATE_LIMITS = frozenset((4, 80007, 130429, 131048, 131056))


class WhatsAppSink(HttpSink):
    """The WhatsApp Cloud API (Meta Graph API): one text message to each
    recipient.

        POST {api_url}/{api_version}/{phone_number_id}/messages
        Authorization: Bearer TOKEN
        {"messaging_product": "whatsapp", "recipient_type": "individual",
         "to": "4915112345678", "type": "text",
         "text": {"preview_url": false, "body": "..."}}   (body <= 4096)

    answered 200 {"messaging_product": "whatsapp", "contacts": [{"input",
    "wa_id"}], "messages": [{"id": "wamid..."}]}, or an error judged by
    graph_api_failure. A recipient already served is not sent the alert
    again when a later one fails and the alert is retried."""

    OPTIONS = dict(HttpSink.OPTIONS, token=_secret,
                   phone_number_id=_phone_number_id,
                   recipients=_phone_numbers, api_url=_url,
                   api_version=_graph_version)
    REQUIRED = ("token", "phone_number_id", "recipients")
    # Plain text: WhatsApp has no escape for its *bold* marks, and no
    # markup means none an attacker's name could use either.
    MARKUP = Markup("%s: %s", "%s", 4096, escape_plain)

    #: The Graph API version used unless api_version says otherwise.
    API_VERSION = "v23.0"

    def __init__(self, name, options=None):
        HttpSink.__init__(self, name, options)
        self.served = {}  # alert -> recipients that have it, until all do

    def request(self, event, delay_s, recipient=None):
        """(url, headers, body bytes) of the alert for one recipient (by
        default the first)."""
        api = self.options.get("api_url", "https://graph.facebook.com")
        text = self.text(event, delay_s)
        return ("%s/%s/%s/messages" % (
            api.rstrip("/"), self.options.get("api_version",
                                              self.API_VERSION),
            self.options["phone_number_id"]),
            {"Content-Type": "application/json",
             "Authorization": "Bearer " + self.secret("token")},
            _json_body({"messaging_product": "whatsapp",
                        "recipient_type": "individual",
                        "to": recipient or self.options["recipients"][0],
                        "type": "text", "text": {"preview_url": False,
                                                 "body": text}}))

    def judge(self, status, headers, body):
        if 200 <= status < 300:
            return None
        return graph_api_failure(status, headers, body)

    #: How many partly delivered alerts are remembered at most (one that
    #: the spool dropped after a partial delivery is forgotten in time).
    MAX_PARTLY_SERVED = 1000

    def deliver(self, event, delay_s):
        alert = hashlib.sha256(repr(tuple(event)).encode()).digest()
        if alert not in self.served and \
                len(self.served) >= self.MAX_PARTLY_SERVED:
            del self.served[next(iter(self.served))]
        served = self.served.setdefault(alert, set())
        for recipient in self.options["recipients"]:
            if recipient in served:
                continue
            url, headers, body = self.request(event, delay_s, recipient)
            failure = self.judge(*self.post(url, headers, body))
            if failure is not None:
                if failure.permanent:
                    del self.served[alert]
                raise failure
            served.add(recipient)
        del self.served[alert]


def pagerduty_severity(event):
    """PagerDuty's severity for the event's 0 to 10."""
    return severity_level(event, (("critical", 9), ("error", 7),
                                  ("warning", 4), ("info", 0)))


def pagerduty_dedup_key(event):
    """One incident per host and throttle key (the action and who is
    behind it: the source, or the account), so a repeat updates the open
    incident instead of paging again. Hashed: attacker text stays out."""
    return "pamsignal/%s/%s/%s" % (
        (event.hostname or "")[:64], event.action, hashlib.sha256(
            throttle_key(event).encode("utf-8", "replace")).hexdigest()[:32])


class PagerDutySink(HttpSink):
    """PagerDuty Events API v2: a trigger event per alert.

        POST https://events.pagerduty.com/v2/enqueue
        {"routing_key": "<32 chars>", "event_action": "trigger",
         "dedup_key": "<= 255 chars", "payload": {"summary": "<= 1024",
         "source", "severity": "critical|error|warning|info", "timestamp",
         "component", "group", "class", "custom_details"}}

    answered 202 {"status": "success", "message": "Event processed",
    "dedup_key"}; 400 {"status": "invalid event", "message": "Event object
    is invalid", "errors": [...]} refuses the alert, unless it is about
    the routing key (then alerts wait in the spool until it is fixed);
    429 and 5xx are retried."""

    OPTIONS = {"timeout": _timeout, "ca_file": _absolute_path,
               "routing_key": _routing_key, "api_url": _url}
    REQUIRED = ("routing_key",)

    def request(self, event, delay_s):
        alert = alert_text(event, delay_s)
        ecs = event_to_ecs(event)
        return (self.options.get("api_url",
                                 "https://events.pagerduty.com/v2/enqueue"),
                {"Content-Type": "application/json"},
                _json_body({
                    "routing_key": self.secret("routing_key"),
                    "event_action": "trigger",
                    "dedup_key": pagerduty_dedup_key(event),
                    "payload": {
                        "summary": shorten(escape_plain(alert.title), 1024),
                        "source": event.hostname or "pamsignal",
                        "severity": pagerduty_severity(event),
                        "timestamp": ecs["@timestamp"],
                        "component": event.service or "pamsignal",
                        "group": ecs["event"]["category"][0],
                        "class": event.action, "custom_details": ecs}}))

    def judge(self, status, headers, body):
        failure = judge_response(status, headers, body)
        if failure is not None and failure.permanent and \
                b"routing_key" in body.lower().replace(b" ", b"_"):
            return DeliveryError("%s (check routing_key; alerts wait in the"
                                 " spool until it is fixed)" % failure)
        return failure


# -- e-mail -------------------------------------------------------------------


#: The most an SMTP server may send in one session (its replies take a
#: few KiB; smtplib keeps every line of a multi-line reply, however many).
MAX_SMTP_SESSION_BYTES = 1024 * 1024


class _DeadlineSMTPConnection:
    """An SMTP session whose connect, TLS, and every command and reply
    share one `deadline` (smtplib's timeout is per read), and that reads
    at most MAX_SMTP_SESSION_BYTES."""

    def __init__(self, host, port, deadline, **options):
        self.deadline = deadline
        super().__init__(host, port, timeout=deadline.left(), **options)

    def _get_socket(self, host, port, timeout):
        sock = super()._get_socket(host, port, self.deadline.left())
        return _DeadlineSocket(sock, self.deadline, MAX_SMTP_SESSION_BYTES)

    def starttls(self, *args, **kwargs):
        self.sock.settimeout(self.deadline.left())  # the TLS handshake
        read = self.sock.read
        reply = super().starttls(*args, **kwargs)
        self.sock = _DeadlineSocket(self.sock, self.deadline,
                                    MAX_SMTP_SESSION_BYTES, read)
        return reply


@functools.lru_cache(maxsize=None)
def _smtp_classes():
    """smtplib's SMTP and SMTP_SSL with one deadline, made on first use
    (only an agent with an e-mail channel imports smtplib)."""

    class _DeadlineSMTP(_DeadlineSMTPConnection, smtplib.SMTP):
        pass

    class _DeadlineSMTPS(_DeadlineSMTPConnection, smtplib.SMTP_SSL):
        pass

    return _DeadlineSMTP, _DeadlineSMTPS


def _timed_out(reason, timeout):
    """A network reason, saying which timeout ran out when one did."""
    if reason.endswith("timed out"):
        return reason + " (no complete answer within the %d s timeout)" \
            % timeout
    return reason


def smtp_refused(error):
    """Whether an SMTP error refuses this message for good: a 5xx reply of
    the server. smtplib's own "500 Line too long." (its text a str, a
    server's is bytes) says only that a reply was too long to read: that
    is retried like a lost connection."""
    return 500 <= error.smtp_code < 600 and isinstance(error.smtp_error,
                                                       bytes)


class EmailSink(RemoteSink):
    """E-mail through an SMTP server: STARTTLS or TLS, login optional."""

    OPTIONS = {"timeout": _timeout, "ca_file": _absolute_path,
               "template": _template, "host": _host, "port": _port,
               "security": _smtp_security, "username": _plain_text,
               "password": _secret, "sender": _email_address,
               "recipients": _email_addresses}
    REQUIRED = ("host", "sender", "recipients")
    MARKUP = Markup("%s: %s", "%s\n", 100000, escape_plain)

    def message(self, event, delay_s):
        alert = alert_text(event, delay_s)
        message = email.message.EmailMessage()
        message["Subject"] = header_text(shorten("[PAMSignal] " + alert.title,
                                                 200))
        message["From"] = self.options["sender"]
        message["To"] = ", ".join(self.options["recipients"])
        message["Date"] = email.utils.formatdate(localtime=False)
        message["Message-ID"] = email.utils.make_msgid("pamsignal")
        # A report summary goes whole: mail has room for it.
        message.set_content(self.text(event, delay_s, self.MARKUP._replace(
            limit=None) if event.action == "report_summary" else None))
        if event.action == "report_summary":  # its tables need fixed width
            message.add_alternative(summary_message(event, Markup(
                None, "<p><b>%s</b></p>", None, html_text,
                ("<pre>", "</pre>", html_text))), subtype="html")
        return message

    def deliver(self, event, delay_s):
        self._submit(self.message(event, delay_s))

    def _submit(self, message):
        host = self.options["host"]
        security = self.options.get("security", "starttls")
        port = self.options.get("port", 465 if security == "tls" else 587)
        if security == "none" and not is_loopback_host(host):
            raise DeliveryError("security = none is only allowed to a "
                                "loopback SMTP server", permanent=True)
        try:
            deadline = Deadline(self.timeout)
            smtp, smtp_ssl = _smtp_classes()
            if security == "tls":
                server = smtp_ssl(host, port, deadline, context=self.context)
            else:
                server = smtp(host, port, deadline)
            with server:
                if security == "starttls":
                    server.starttls(context=self.context)
                if self.options.get("username"):
                    server.login(self.options["username"],
                                 self.secret("password") or "")
                server.send_message(message)
        except email.errors.MessageError as error:  # cannot be written
            raise DeliveryError("the message cannot be written: %s" % error,
                                permanent=True) from None
        except smtplib.SMTPRecipientsRefused as error:
            raise DeliveryError("recipients refused: %s" % ", ".join(
                sorted(error.recipients)), permanent=True) from None
        except smtplib.SMTPResponseException as error:
            text = escape_text(error.smtp_error.decode("utf-8", "replace")
                               if isinstance(error.smtp_error, bytes)
                               else str(error.smtp_error))
            raise DeliveryError("SMTP %d: %s" % (error.smtp_code, text),
                                permanent=smtp_refused(error)) from None
        except (smtplib.SMTPException, OSError) as error:
            if isinstance(error, _TooMuchRead) or isinstance(
                    error.__context__, _TooMuchRead):  # smtplib wraps it
                raise DeliveryError(
                    "%s sent more than %d bytes in one SMTP session (a "
                    "reply that never ends?)" % (
                        host, MAX_SMTP_SESSION_BYTES)) from None
            raise DeliveryError("cannot reach %s: %s" % (
                host, _timed_out(_network_reason(error), self.timeout))) \
                from None


# -- the journal and syslog (SIEM) channels -----------------------------------

#: The policy a log-like channel (syslog, journal) starts from: a SIEM or
#: a log pipeline wants every event at once, so no [alerts] filtering,
#: cooldown, rate limit or repeat digest unless the channel sets them.
EVERY_EVENT_POLICY = dict(((key, option.default) for key, option
                           in ALERT_OPTIONS.items()),
                          events="*", cooldown="off", rate_limit="off",
                          repeats="off")


def _journal_identifier(value):
    """A SYSLOG_IDENTIFIER the parser does not watch, so the agent never
    reads its own entries back as logins."""
    if not re.match(r"^[A-Za-z0-9_.-]{1,64}$", value) or \
            value in WATCHED_SERVICES:
        raise ValueError("expected a name of letters, digits, _.- that is "
                         "none of the watched services (%s), got %r" % (
                             ", ".join(sorted(WATCHED_SERVICES)), value))
    return value


class JournalSink(Sink):
    """Writes each event back to the journal (native protocol) with its
    own SYSLOG_IDENTIFIER, a MESSAGE_ID per kind and the ECS fields as
    journal fields, for Alloy, Vector, Promtail or fail2ban."""

    OPTIONS = {"identifier": _journal_identifier}
    POLICY_DEFAULTS = EVERY_EVENT_POLICY

    def __init__(self, name, options=None, writer=None):
        Sink.__init__(self, name, options)
        self.identifier = self.options.get("identifier", JOURNAL_IDENTIFIER)
        self.writer = writer or JournalWriter()

    def send(self, event, delay_s=0):
        self.writer.send(event_journal_fields(event, self.identifier))

    def close(self):
        self.writer.close()


def _no_passphrase():
    """A key file with a passphrase cannot be unlocked by a service: fail
    instead of prompting on a terminal."""
    return b""


def _tls_closed(error):
    """Whether a TLS error only says that the peer closed the connection
    cleanly (a FIN, not a reset) without sending close_notify. Python 3.6
    with OpenSSL 3 names it by a wrong code; its text says it."""
    return isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) \
        or "unexpected eof" in str(error).lower()


#: The most a syslog collector may send back on one connection (a
#: greeting, acknowledgements) while PAMSignal waits for it to close.
MAX_COLLECTOR_BYTES = 1024 * 1024


def _connection_reason(error):
    """_network_reason of an error a socket raised itself."""
    return _network_reason(urllib.error.URLError(error))


class SyslogSink(RemoteSink):
    """A SIEM's syslog collector: CEF, LEEF or ECS JSON records in RFC 5424
    or RFC 3164 messages over UDP, TCP or TLS (RFC 5425).

    Alerts come in batches from the courier. Over TCP and TLS a batch is
    delivered only once the collector has read it: PAMSignal sends the
    batch on a new connection, ends its side (TLS close_notify, then
    FIN), and counts it delivered when the collector closes in turn (a
    clean end of stream) and then still accepts a new connection (one
    that closed because it was stopping may have dropped what it had
    read). A reset, a timeout or a collector gone away sends the whole
    batch again, so a collector restart loses nothing and may repeat at
    most that batch (`externalId`, `event.id`, `id=` name each event).
    UDP is best effort: a datagram sent is counted delivered."""

    OPTIONS = {"target": _syslog_target,
               "format": _one_of("cef", "leef", "json"),
               "header": _one_of("rfc5424", "rfc3164"),
               "facility": _facility, "app_name": _app_name,
               "hostname": _syslog_hostname,
               "framing": _one_of("octet", "lf"), "bom": _yes_no,
               "timeout": _timeout, "ca_file": _absolute_path,
               "cert_file": _absolute_path, "key_file": _absolute_path}
    REQUIRED = ("target",)

    POLICY_DEFAULTS = EVERY_EVENT_POLICY

    #: Most alerts the courier hands over at once (one connection each).
    MAX_BATCH = 500

    #: What check-config and the start say about a UDP target.
    UDP_NOTE = ("udp:// is best effort: an alert lost on the way or while "
                "the collector is down goes unnoticed; use tcp:// or "
                "tls:// to have it kept until the collector read it")

    def __init__(self, name, options=None):
        RemoteSink.__init__(self, name, options)
        self.target = self.options.get("target")
        self.layout = SyslogLayout(
            format=self.options.get("format", "cef"),
            header=self.options.get("header", "rfc5424"),
            facility=self.options.get("facility",
                                      SYSLOG_FACILITIES["authpriv"]),
            app_name=self.options.get("app_name", "pamsignal"),
            hostname=self.options.get("hostname"), bom=self.options.get(
                "bom", False))
        self.framing = None if self.target.transport == "udp" else \
            self.options.get("framing", "octet")
        self.datagrams = None
        self.warned = False

    @staticmethod
    def check_options(options):
        """(key, problem) for options that do not go together."""
        transport = options["target"].transport \
            if "target" in options else None
        problems = []
        if transport != "tls":
            problems += [(key, "only for a tls:// target") for key in (
                "ca_file", "cert_file", "key_file") if key in options]
        if "framing" in options and transport != "tcp":
            problems.append(("framing", "only for a tcp:// target (TLS is "
                             "always octet-counted, UDP is one message per"
                             " datagram)"))
        problems += client_cert_problems(options)
        if options.get("bom") and options.get("header") == "rfc3164":
            problems.append(("bom", "only with header = rfc5424"))
        return problems

    @classmethod
    def config_notes(cls, options):
        """What check-config says about this channel."""
        return [cls.UDP_NOTE] if options["target"].transport == "udp" \
            else []

    #: What test-alert says of a datagram it sent.
    UNCONFIRMED = "UDP is best effort"

    @property
    def confirms(self):
        """Whether a delivery is confirmed by the collector (not UDP)."""
        return self.target.transport != "udp"

    def where(self):
        return "%s:%d" % (self.target.host, self.target.port)

    def open(self):
        if self.target.transport == "udp" and not self.warned:
            self.warned = True
            say("warning", "channel %s: %s" % (self.name, self.UDP_NOTE))
        if self.target.transport != "tls" or self.context is not None:
            return
        self.context = client_tls_context(self.options)

    def deliver(self, event, delay_s):
        self.send_batch([(event, delay_s)])

    def send_batch(self, alerts):
        """Deliver [(event, delay_s)] in order, or raise DeliveryError;
        its `delivered` says how many of the first were sent (UDP)."""
        self.open()
        messages = [render_syslog(event, self.layout) for event, _ in alerts]
        if self.framing is None:
            self._send_datagrams(messages)
        else:
            self._send_stream(b"".join(frame_syslog(message, self.framing)
                                       for message in messages),
                              len(messages))

    def _send_datagrams(self, messages):
        for index, message in enumerate(messages):
            try:
                if self.datagrams is None:
                    family, kind, proto, _, address = socket.getaddrinfo(
                        self.target.host, self.target.port,
                        type=socket.SOCK_DGRAM)[0]
                    self.datagrams = socket.socket(family, kind, proto)
                    self.datagrams.connect(address)
                self.datagrams.send(message)
            except OSError as error:  # refused: the collector is not there
                self.close()
                failure = DeliveryError("cannot send to %s: %s" % (
                    self.where(), _connection_reason(error)))
                failure.delivered = index
                raise failure from None

    def _send_stream(self, payload, count):
        alerts = "%d alert%s" % (count, "" if count == 1 else "s")
        connection = self._open_stream()
        try:
            connection.sendall(payload)
            self._wait_until_read(connection)
        except ConnectionResetError:
            raise DeliveryError("%s reset the connection before reading all"
                                " of %s; sending them again" % (
                                    self.where(), alerts)) from None
        except (socket.timeout, TimeoutError):
            raise DeliveryError(
                "%s did not confirm %s within %d s (no end of stream after "
                "ours); sending them again" % (self.where(), alerts,
                                               self.timeout)) from None
        except OSError as error:
            raise DeliveryError("%s: %s" % (
                self.where(), _connection_reason(error))) from None
        finally:
            connection.close()
        # A collector that closed because it was stopping may have dropped
        # what it had read but not yet handled (rsyslog does, over TLS):
        # the batch counts only if the collector still takes a client.
        try:
            probe = self._open_stream()
        except DeliveryError as error:
            raise DeliveryError("%s closed after %s but then %s: it may have"
                                " been stopping; sending them again" % (
                                    self.where(), alerts, error)) from None
        try:
            self._wait_until_read(probe)
        except (OSError, DeliveryError):
            pass  # the batch is confirmed; this was only a probe
        finally:
            probe.close()

    def _open_stream(self):
        """A connection the collector accepted (TLS verified), or a
        DeliveryError saying why not."""
        started = time.monotonic()
        try:
            connection = socket.create_connection(
                (self.target.host, self.target.port), timeout=self.timeout)
        except OSError as error:
            raise DeliveryError("cannot reach %s: %s" % (
                self.where(), _connection_reason(error))) from None
        try:
            if self.context is not None:
                connection = self.context.wrap_socket(
                    connection, server_hostname=self.target.host,
                    suppress_ragged_eofs=False)  # b"": a close_notify
            if not self._hung_up(connection, time.monotonic() - started):
                return connection
            failure = DeliveryError(
                "%s closed the connection before any alert was sent: it "
                "does not accept this client (its log says why: a client "
                "certificate, an address it does not allow?)" % self.where())
        except ssl.CertificateError as error:  # Python 3.6: a ValueError
            failure = DeliveryError("%s: TLS certificate not trusted: %s" % (
                self.where(), error))
        except OSError as error:
            failure = DeliveryError("%s: %s" % (
                self.where(), _connection_reason(error)))
        connection.close()
        raise failure

    def _hung_up(self, connection, setup_s):
        """Whether the collector hangs up at once (a client it refuses
        after the handshake, as rsyslog does): watched for as long as the
        connection took to set up (a round trip or more) before sending,
        so that no alert goes to a collector that would drop it."""
        connection.settimeout(min(max(setup_s, 0.01), self.timeout))
        try:
            if isinstance(connection, ssl.SSLSocket):
                return connection.recv(1) == b""  # session tickets pass
            return connection.recv(1, socket.MSG_PEEK) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        except ssl.SSLError as error:
            if _tls_closed(error):
                return True
            raise
        finally:
            connection.settimeout(self.timeout)

    def _wait_until_read(self, connection):
        """End our side and wait for the collector to end its own: it
        closes cleanly only once it has read everything we sent. What it
        sends meanwhile (a greeting, acknowledgements) is read and
        dropped, all within one timeout."""
        deadline = Deadline(self.timeout)
        received = [0]
        plain = connection
        if isinstance(connection, ssl.SSLSocket):
            plain = self._end_tls(connection, deadline, received)
            if plain is None:
                return  # closed without its close_notify, nothing unread
        try:
            plain.shutdown(socket.SHUT_WR)
            while self._read_some(plain, deadline.left(), received):
                pass
        finally:
            if plain is not connection:
                plain.close()

    def _end_tls(self, connection, deadline, received):
        """Send our close_notify and wait for the collector's: the plain
        socket under `connection`, or None if the collector closed without
        one. OpenSSL 3 refuses to close over data the collector sent and
        we did not read (APPLICATION_DATA_AFTER_CLOSE_NOTIFY): what has
        come is read first, our close_notify goes alone, and what comes
        after it is read until the collector's."""
        try:
            while True:
                try:
                    while self._read_some(connection, 0.0, received):
                        pass  # b"": its close_notify came before ours
                except ssl.SSLWantReadError:
                    pass  # nothing more has come
                try:
                    return connection.unwrap()  # theirs had come too
                except ssl.SSLWantReadError:
                    break  # ours went out, theirs is still to come
                except ssl.SSLWantWriteError:  # the batch is still queued
                    if select.select([connection], [connection], [],
                                     deadline.left()) == ([], [], []):
                        raise socket.timeout("timed out") from None
            while self._read_some(connection, deadline.left(), received):
                pass
        except ssl.SSLZeroReturnError:  # its close_notify, after ours
            pass
        except ssl.SSLError as error:
            if _tls_closed(error):
                return None
            if "application data after close notify" not in str(
                    error).lower():  # by its text: Python 3.6 misnames it
                raise
            # Data came just as our close_notify went out, and OpenSSL
            # will read no more: the rest of the stream is plain bytes.
            return socket.socket(connection.family, connection.type,
                                 connection.proto, connection.detach())
        connection.settimeout(deadline.left())
        return connection.unwrap()  # both close_notify are through

    def _read_some(self, connection, timeout, received):
        """Read what the collector sent and drop it, waiting at most
        `timeout` seconds (0: only what has come): False at the end of the
        stream. `received` ([bytes so far]) is bounded by
        MAX_COLLECTOR_BYTES."""
        connection.settimeout(timeout)
        chunk = connection.recv(4096)
        received[0] += len(chunk)
        if received[0] > MAX_COLLECTOR_BYTES:
            raise DeliveryError(
                "%s sent more than %d bytes while it should have been "
                "reading ours and closing; sending them again" % (
                    self.where(), MAX_COLLECTOR_BYTES))
        return bool(chunk)

    def close(self):
        if self.datagrams is not None:
            self.datagrams.close()
            self.datagrams = None


# -- the registry; delivery: spool and courier --------------------------------

#: channel type -> sink class; a new destination is one class here.
CHANNEL_TYPES = {"console": ConsoleSink, "telegram": TelegramSink,
                 "slack": SlackSink, "discord": DiscordSink,
                 "teams": TeamsSink, "ntfy": NtfySink, "gotify": GotifySink,
                 "email": EmailSink, "webhook": WebhookSink,
                 "journal": JournalSink, "syslog": SyslogSink,
                 "whatsapp": WhatsAppSink, "pagerduty": PagerDutySink}


#: Retry delays after a failed delivery grow from this (seconds)...
RETRY_FIRST_S = 2.0

#: ...doubling up to this, each with +-20% jitter so hosts spread out.
RETRY_MAX_S = 600.0

#: How long a delivered alert's tombstone is kept, so that entries read
#: again after a crash do not send it twice (and at most how many).
TOMBSTONE_KEEP_S = 3600
MAX_TOMBSTONES = 5000

#: Tombstones are pruned after this many deliveries (and at each start).
TOMBSTONE_PRUNE_EVERY = 100

#: An alert that makes its sink fail this many times in a row with an
#: unexpected error (not a delivery answer) is set aside as refused, so it
#: cannot hold up every alert behind it.
MAX_UNEXPECTED_FAILURES = 5

#: A delivery still waiting for its answer after this long marks its
#: channel degraded until it ends (it fails at the channel's timeout).
SLOW_REQUEST_S = 5.0

#: Largest spool file read back (an alert is a few KiB).
MAX_SPOOL_FILE_BYTES = 1024 * 1024
#: Largest state file read back: the bounded tables save a few MiB at
#: most; a bigger file is damaged (or planted), not read into memory.
MAX_STATE_FILE_BYTES = 64 * 1024 * 1024


def retry_delay_s(failures, jitter=random.random):
    """Exponential backoff with jitter: about 2, 4, 8 s ... 10 minutes."""
    base = min(RETRY_FIRST_S * 2 ** min(failures - 1, 20), RETRY_MAX_S)
    return base * (0.8 + 0.4 * jitter())


def retry_wait_s(failures, retry_after=None, jitter=random.random):
    """How long to wait before the next attempt: the backoff, or as long
    as a 429 asked, but never less than the backoff's first step: a
    "retry now" (Retry-After: 0, a date gone by) said again and again
    must not become a busy loop."""
    if retry_after is None:
        return retry_delay_s(failures, jitter)
    return max(retry_after, RETRY_FIRST_S)


def event_to_record(event):
    """An event as plain JSON data (no internal fields, no nulls)."""
    return {field: list(value) if type(value) is tuple else value
            for field, value in zip(EVENT_FIELDS, event)
            if value is not None and field != "context_key"}


#: Event fields that hold whole numbers, any finite number, or lists of
#: text; all others hold text. What a saved file gives back must match:
#: a wrong type would crash whatever renders the event.
_INT_FIELDS = frozenset((
    "timestamp_us", "severity", "source_port", "destination_port", "pid",
    "certificate_serial", "attempts", "writer_uid", "window_s", "held_back",
    "repeat", "dropped", "source_as_number", "typed_more"))
_NUMBER_FIELDS = frozenset(("session_duration_s",))
_LIST_FIELDS = frozenset(("users_tried", "sources", "typed_lines"))


def _is_text(value):
    """Text that UTF-8 can carry (JSON's "\\ud800" is text but cannot)."""
    if type(value) is not str:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: Fields that hold an address as the parser normalised it.
_ADDRESS_FIELDS = frozenset(("source_ip", "destination_ip"))


def _record_value(field, value):
    """A value read back from a saved file (an alert in the spool, an open
    session in the state) in its event field's type, or None. An address
    must read back as the parser wrote it: the detectors and the paging
    keys take it apart."""
    if field in _ADDRESS_FIELDS:
        return value if _is_text(value) and \
            normalise_address(value) == (value, None) else None
    if field in _LIST_FIELDS:
        return tuple(value) if type(value) is list and all(
            _is_text(item) for item in value) else None
    if field in _INT_FIELDS:
        return value if type(value) is int else None
    if field in _NUMBER_FIELDS:
        return value if type(value) in (int, float) and \
            value - value == 0 else None  # not NaN or infinite
    return value if _is_text(value) else None


def event_from_record(record):
    """The event back from event_to_record's data, or None when the data
    is not one (a damaged or foreign spool file)."""
    if not isinstance(record, dict) or type(record.get("action")) is not \
            str or record["action"] not in ACTIONS:  # a list is unhashable
        return None
    fields = {}
    for field, value in record.items():
        if field not in EVENT_FIELDS or field == "context_key":
            return None
        fields[field] = _record_value(field, value)
        if fields[field] is None:
            return None
    if saved_time_us(fields.get("timestamp_us")) is None or \
            not 0 <= fields.get("severity", 0) <= 10:
        return None
    return Event(**fields)


#: Alerts a full spool drops last: someone got into root, a guessed
#: password, a forgery, and the report of what was already lost.
_DROPPED_LAST = frozenset(("success_after_failures", "spoofed_entry",
                           "alerts_dropped", "journal_suppressed",
                           "unaccounted_session"))


def alert_value(event):
    """How much an alert matters when a full spool must drop one, lowest
    first: (tier, severity). Tier 0: repeats, digests and routine alerts;
    1: unique access and detections; 2: a root login, a success after
    failures, a forgery."""
    severity = event_severity(event)
    if event.action in _DROPPED_LAST or (
            event.action == "login_success" and "root" in (
                event.user, event.target_user)):
        return 2, severity
    if event.repeat is not None or event.action == "alert_digest" or \
            severity < ACTIONS["sudo_command"][3]:
        return 0, severity
    return 1, severity


#: The value of an alert that could not be read back: the first to go.
UNKNOWN_VALUE = (-1, -1)

#: What a spool remembers of each alert it holds, to choose which to drop
#: and to say what was lost: its value and who it was about.
SpoolItem = collections.namedtuple("SpoolItem",
                                   "value action user source held")


def spool_item(event):
    return SpoolItem(alert_value(event), event.action,
                     event.user or event.user_id,
                     event.source_ip or event.source_domain,
                     event.held_back if event.action == "alert_digest"
                     else 0)


def spool_directory_name(channel):
    """A file name for a channel name the admin chose."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", channel)[:64].lstrip(".")
    if safe == channel:
        return safe
    return "%s-%s" % (safe, hashlib.sha256(channel.encode()).hexdigest()[:8])


def _fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class LostAlerts:
    """What a spool dropped: counted by reason and by action, with the
    users and sources named (up to MAX_DIGEST_NAMES)."""

    def __init__(self):
        self.reasons = collections.Counter()
        self.actions = collections.Counter()
        self.users = collections.OrderedDict()
        self.sources = collections.OrderedDict()
        self.held = 0  # alerts that the lost digests stood for

    def add(self, reason, item):
        self.reasons[reason] += 1
        if item is not None:
            self.held += item.held or 0
            self.actions[item.action] += 1
            _name_some(self.users, (item.user,))
            _name_some(self.sources, (item.source,))

    def merge(self, other):
        self.reasons.update(other.reasons)
        self.actions.update(other.actions)
        self.held += other.held
        _name_some(self.users, other.users)
        _name_some(self.sources, other.sources)

    def to_json(self):
        if not self.reasons:
            return {}
        return {"reasons": dict(self.reasons), "actions": dict(self.actions),
                "users": list(self.users), "sources": list(self.sources),
                "held": self.held}

    @classmethod
    def from_json(cls, saved):
        """Back from to_json's data (or an older {reason: count}); what is
        not understood is left out."""
        lost = cls()
        if not isinstance(saved, dict):
            return lost
        counts = saved.get("reasons", saved)
        for target, source in ((lost.reasons, counts),
                               (lost.actions, saved.get("actions"))):
            target.update({key: count for key, count in (
                source.items() if isinstance(source, dict) else ())
                if isinstance(key, str) and type(count) is int
                and count > 0})
        held = saved.get("held")
        lost.held = held if type(held) is int and held > 0 else 0
        for target, names in ((lost.users, saved.get("users")),
                              (lost.sources, saved.get("sources"))):
            _name_some(target, [name for name in (
                names if isinstance(names, list) else ())
                if isinstance(name, str)])
        return lost

    def summary(self):
        """"3 spool full (2 sudo_command, 1 alert_digest of 40 held
        back)"."""
        kinds = ", ".join("%d %s%s" % (count, action, " of %d held back"
                                       % self.held if self.held and action
                                       == "alert_digest" else "")
                          for action, count in sorted(
                              self.actions.items(),
                              key=lambda item: (-item[1], item[0])))
        return ", ".join("%d %s" % (count, reason.replace("_", " "))
                         for reason, count in sorted(self.reasons.items())
                         ) + (" (%s)" % kinds if kinds else "")


class Spool:
    """A channel's durable queue: one file per alert in its directory.

    The reader puts alerts in and commits them (fsync) before the journal
    cursor moves past their entries; the courier thread takes the oldest,
    and it leaves only once delivered, as a tombstone that stops a second
    copy (from entries read again after a crash) for an hour. Bounded in
    number and age; what it drops is counted until reported."""

    def __init__(self, directory, max_alerts, max_age_s, clock=time.time):
        self.directory = directory
        self.max_alerts = max_alerts
        self.max_age_s = max_age_s
        self.clock = clock
        self.lock = threading.Condition()
        self.ready = collections.deque()  # (created, id), oldest first
        self.staged = []
        self.items = {}  # id -> SpoolItem
        self.dropped = LostAlerts()  # until reported
        self.lost = LostAlerts()  # since start, for the metrics
        self.in_memory = {}  # id -> event, when the disk refused it
        self.disk_error = None
        self.delivered_count = 0

    def _path(self, name):
        return os.path.join(self.directory, name)

    def open(self):
        """Create the directory; alerts left by a previous run come first."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        waiting, items = [], {}
        for name in os.listdir(self.directory):
            if name.endswith(".alert"):
                try:
                    found = os.lstat(self._path(name))
                except OSError:
                    continue
                if not stat.S_ISREG(found.st_mode):  # planted: never opened
                    set_aside(self._path(name), file_kind(found.st_mode))
                    continue
                waiting.append((found.st_mtime, name[:-6]))
                event = self._load(name[:-6], quiet=True)
                if event is not None:  # else dropped when taken
                    items[name[:-6]] = spool_item(event)
            elif name.startswith("."):  # replace_file's, left by a crash
                self._unlink(name)
        self.prune_tombstones()
        dropped = LostAlerts.from_json(self._read_json("dropped.json"))
        with self.lock:
            self.ready.extend(sorted(waiting))
            self.items.update(items)
            self.dropped.merge(dropped)
            self._enforce_bounds()

    def prune_tombstones(self):
        """Forget delivered alerts older than TOMBSTONE_KEEP_S, and all but
        the newest MAX_TOMBSTONES."""
        tombstones = []
        for name in os.listdir(self.directory):
            if name.endswith(".sent"):
                try:
                    tombstones.append((os.stat(self._path(name)).st_mtime,
                                       name))
                except OSError:
                    continue
        tombstones.sort()
        now = self.clock()
        for index, (mtime, name) in enumerate(tombstones):
            if now - mtime > TOMBSTONE_KEEP_S or \
                    len(tombstones) - index > MAX_TOMBSTONES:
                self._unlink(name)

    def adopt(self, old):
        """Take over the alerts an earlier spool of this directory kept in
        memory (the disk refused them), in their order."""
        if old is None or old is self:
            return
        with old.lock:
            names = [item for item in old.ready if item[1] in old.in_memory]
            names += [item for item in old.staged
                      if item[1] in old.in_memory]
            events = dict(old.in_memory)
        with self.lock:
            self.in_memory.update(events)
            self.items.update((name, spool_item(event))
                              for name, event in events.items())
            self.ready.extend(names)
            self.lock.notify_all()

    def put(self, event):
        """Write an alert (not yet durable); False if this very alert is
        already here or was delivered within the hour. If the disk refuses
        it (full, read-only), it is kept in memory and still delivered:
        only a crash before then can lose it."""
        name = alert_id(event)
        if os.path.exists(self._path(name + ".alert")) or \
                os.path.exists(self._path(name + ".sent")):
            return False
        try:
            try:
                self._write_alert(name, event)
            except FileNotFoundError:  # the directory went away: again
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                self._write_alert(name, event)
        except OSError as error:
            with self.lock:
                if self.disk_error is None:
                    say("error", "cannot write the spool file %s: %s; "
                        "keeping alerts in memory" % (
                            self._path(name + ".alert"),
                            error.strerror or error))
                self.disk_error = str(error.strerror or error)
                self.in_memory[name] = event
                self.items[name] = spool_item(event)
                self.staged.append((self.clock(), name))
            return True
        with self.lock:
            if self.disk_error is not None:
                say("info", "the spool %s is writable again"
                    % self.directory)
                self.disk_error = None
            self.items[name] = spool_item(event)
            self.staged.append((self.clock(), name))
        return True

    def _write_alert(self, name, event):
        replace_file(self._path(name + ".alert"), json.dumps(
            {"version": 1, "event": event_to_record(event)},
            separators=(",", ":")), durable=True)

    def flush(self):
        """Make what was put durable and hand it to the courier."""
        with self.lock:
            staged, self.staged = self.staged, []
        if not staged:
            return
        try:
            _fsync_directory(self.directory)
        except OSError:
            pass  # put() already said the disk is in trouble
        with self.lock:
            self.ready.extend(staged)
            self._enforce_bounds()
            self.lock.notify_all()

    def take(self, timeout):
        """The oldest alert waiting, as (name, event), without removing it;
        None when there is none within `timeout` seconds."""
        batch = self.take_batch(1, timeout)
        return batch[0] if batch else None

    def take_batch(self, limit, timeout):
        """Up to `limit` of the oldest alerts waiting, oldest first, as
        [(name, event)], without removing them; [] when there is none
        within `timeout` seconds."""
        batch = []
        with self.lock:
            if not self.ready:
                self.lock.wait(timeout)
            while len(batch) < min(limit, len(self.ready)):
                created, name = self.ready[len(batch)]
                if self.clock() - created > self.max_age_s:
                    self._drop_locked(name, "too_old")
                    continue
                if name not in self.in_memory and os.path.exists(
                        self._path(name + ".sent")):
                    self._forget(name)  # delivered by an earlier courier
                    continue
                event = self._load(name)
                if event is not None:
                    batch.append((name, event))
                    continue
                self._drop_locked(name, "unreadable")
        return batch

    def delivered(self, name):
        """The alert reached its channel: leave a tombstone."""
        if self.in_memory.pop(name, None) is not None:
            with self.lock:
                self._forget(name)
            return
        try:
            os.replace(self._path(name + ".alert"), self._path(name + ".sent"))
            os.truncate(self._path(name + ".sent"), 0)
        except OSError:
            pass
        with self.lock:
            self._forget(name)
            self.delivered_count += 1
            prune = self.delivered_count % TOMBSTONE_PRUNE_EVERY == 0
        if prune:
            try:
                self.prune_tombstones()
            except OSError:
                pass

    def refused(self, name):
        """The channel will never take this alert (it said why)."""
        with self.lock:
            self._drop_locked(name, "refused")

    def take_dropped(self):
        """What was dropped since last asked, as LostAlerts.to_json gives
        it ({} when nothing was)."""
        with self.lock:
            dropped, self.dropped = self.dropped, LostAlerts()
        if dropped.reasons:
            self._write_json("dropped.json", {})
        return dropped.to_json()

    def depth(self):
        with self.lock:
            return len(self.ready)

    def lost_since_start(self):
        """What this spool dropped since it was opened (a LostAlerts)."""
        with self.lock:
            lost = LostAlerts()
            lost.merge(self.lost)
        return lost

    def oldest_age_s(self):
        with self.lock:
            return self.clock() - self.ready[0][0] if self.ready else 0.0

    def _enforce_bounds(self):
        """Drop by value, not age: the least valuable (then the oldest)
        first, so a flood of repeats cannot push out a root login. All
        chosen in one pass, written once: an admin who lowers the bound
        after an outage must not wait on thousands of rescans."""
        excess = len(self.ready) - self.max_alerts
        if excess <= 0:
            return
        # Each dropped name takes at least one entry with it, so the
        # `excess` least valuable entries are all that can be chosen;
        # nsmallest keeps min()'s order among equals (first in `ready`).
        left, victims = len(self.ready), collections.OrderedDict()
        entries = collections.Counter(name for _, name in self.ready)
        for _, name in heapq.nsmallest(excess, self.ready, key=lambda item: (
                self._value(item[1]), item[0])):
            if left <= self.max_alerts:
                break
            if name not in victims:
                victims[name] = True
                left -= entries[name]
        self._drop_many_locked(victims, "spool_full")

    def _value(self, name):
        item = self.items.get(name)
        return item.value if item is not None else UNKNOWN_VALUE

    def _drop_locked(self, name, reason):
        self._drop_many_locked({name}, reason)

    def _drop_many_locked(self, names, reason):
        """Drop these alerts, each counted: `ready` rebuilt once and
        dropped.json written once, however many."""
        if not names:
            return
        for name in names:
            if self.in_memory.pop(name, None) is None:
                self._unlink(name + ".alert")
            item = self.items.pop(name, None)
            for lost in (self.dropped, self.lost):
                lost.add(reason, item)
        self.ready = collections.deque(
            item for item in self.ready if item[1] not in names)
        self._write_json("dropped.json", self.dropped.to_json())

    def _forget(self, name):
        self.items.pop(name, None)
        if self.ready and self.ready[0][1] == name:
            self.ready.popleft()
        else:
            self.ready = collections.deque(
                item for item in self.ready if item[1] != name)

    def _load(self, name, quiet=False):
        if name in self.in_memory:
            return self.in_memory[name]
        record = self._read_json(name + ".alert")
        if isinstance(record, dict) and record.get("version") == 1:
            event = event_from_record(record.get("event"))
            if event is not None:
                return event
        if not quiet:
            say("warning", "dropping unreadable spool file %s"
                % self._path(name + ".alert"))
        return None

    def _read_json(self, name):
        try:
            text = read_state_file(self._path(name), MAX_SPOOL_FILE_BYTES)
            return None if text is None else json.loads(text.decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            return None

    def _write_json(self, name, value):
        try:
            replace_file(self._path(name), json.dumps(value))
        except OSError as error:
            say("warning", "cannot write %s: %s" % (
                self._path(name), error.strerror or error))

    def _unlink(self, name):
        try:
            os.unlink(self._path(name))
        except OSError:
            pass


class Courier(threading.Thread):
    """Delivers a channel's spool in order, in the background, so sending
    never blocks the journal reader. Retries with backoff and jitter (or
    as long as a 429 asks), drops what the service refuses for good with
    the reason logged, and reports drops once delivery works again."""

    def __init__(self, sink, spool, clock=time.time):
        threading.Thread.__init__(self, name="courier-%s" % sink.name,
                                  daemon=True)
        self.sink = sink
        self.spool = spool
        self.clock = clock
        self.stopping = threading.Event()
        self.failures = 0
        self.delivered = 0
        self.failed = 0
        self.last_error = None
        self.last_wait_s = None
        self.unexpected = (None, 0)  # (alert, failures in a row)
        self.sending_since = None  # time.monotonic() of the request in flight
        #: Alerts handed over at once: more for a sink with send_batch.
        self.batch_limit = getattr(sink, "MAX_BATCH", 1)

    def slow_request(self, now=None):
        """Why the channel is slow, while a request runs long; else None."""
        since = self.sending_since
        now = time.monotonic() if now is None else now
        if since is None or now - since < SLOW_REQUEST_S:
            return None
        return "a delivery is waiting for an answer longer than %d s " \
            "(timeout %d s)" % (SLOW_REQUEST_S, getattr(self.sink, "timeout",
                                                        0))

    def stop(self, timeout=2.0):
        self.stopping.set()
        with self.spool.lock:
            self.spool.lock.notify_all()
        self.join(timeout)

    def run(self):
        while not self.stopping.is_set():
            if self.batch_limit > 1:
                batch = self.spool.take_batch(self.batch_limit, 1.0)
                if batch:
                    self.deliver_batch(batch)
                continue
            taken = self.spool.take(1.0)
            if taken is not None:
                self.deliver_one(*taken)

    def deliver_batch(self, batch):
        """One attempt at the oldest alerts, in one go (a sink with
        send_batch); the ones it confirms leave the spool, in order."""
        now = self.clock()
        self.sending_since = time.monotonic()
        try:
            self.sink.send_batch([
                (event, max(0.0, now - event.timestamp_us / 1e6))
                for _, event in batch])
        except DeliveryError as error:
            self.sending_since = None
            done = getattr(error, "delivered", 0)  # UDP: the first sent
            for name, _ in batch[:done]:
                self.spool.delivered(name)
            self.delivered += done
            self._failed(batch[done][0], batch[done][1], error)
            return
        except Exception:  # a sink bug: find its alert one at a time
            self.sending_since = None
            self.batch_limit = 1
            self.deliver_one(*batch[0])
            return
        self.sending_since = None
        for name, _ in batch:
            self.spool.delivered(name)
        self.delivered += len(batch)
        self._succeeded()

    def deliver_one(self, name, event):
        """One attempt at the oldest alert; waits out a failure."""
        delay_s = max(0.0, self.clock() - event.timestamp_us / 1e6)
        self.sending_since = time.monotonic()
        try:
            self.sink.send(event, delay_s)
        except DeliveryError as error:
            self.sending_since = None
            self._failed(name, event, error)
            return
        except Exception as error:  # a sink bug: keep the alert, retry
            self.sending_since = None
            same = self.unexpected[0] == name
            self.unexpected = (name, self.unexpected[1] + 1 if same else 1)
            self._failed(name, event, DeliveryError(
                "unexpected %s: %s" % (type(error).__name__, redact(
                    str(error), self.sink.secrets())),
                permanent=self.unexpected[1] >= MAX_UNEXPECTED_FAILURES))
            return
        self.sending_since = None
        self.spool.delivered(name)
        self.delivered += 1
        self.batch_limit = getattr(self.sink, "MAX_BATCH", 1)
        self._succeeded()

    def _succeeded(self):
        if self.failures:
            say("info", "channel %s: delivering again after %d failed "
                "attempt%s" % (self.sink.name, self.failures,
                               "" if self.failures == 1 else "s"))
        self.failures = 0
        self._report_drops()

    def _failed(self, name, event, error):
        self.failed += 1
        self.last_error = str(error)
        if error.permanent:
            say("error", "channel %s refused the %s alert of %s, dropped: %s"
                % (self.sink.name, event.action,
                   format_timestamp(event.timestamp_us), error))
            self.spool.refused(name)
            return
        self.failures += 1
        wait_s = retry_wait_s(self.failures, error.retry_after)
        self.last_wait_s = wait_s
        if self.failures == 1 or self.failures % 10 == 0:
            say("warning", "channel %s: %s; retrying in %.0f s (%d alert%s "
                "waiting)" % (self.sink.name, error, wait_s,
                              self.spool.depth(),
                              "" if self.spool.depth() == 1 else "s"))
        self.stopping.wait(wait_s)

    def _report_drops(self):
        dropped = LostAlerts.from_json(self.spool.take_dropped())
        if not dropped.reasons:
            return
        total = sum(dropped.reasons.values())
        detail = dropped.summary()
        named = "".join("; %s: %s" % (label, ", ".join(names)) for label,
                        names in (("users", dropped.users),
                                  ("sources", dropped.sources)) if names)
        say("warning", "channel %s lost %d alert%s: %s%s" % (
            self.sink.name, total, "" if total == 1 else "s", detail, named))
        self.spool.put(Event(
            action="alerts_dropped", timestamp_us=int(self.clock() * 1e6),
            held_back=total, detail=detail, hostname=socket.gethostname(),
            users_tried=tuple(dropped.users) or None,
            sources=tuple(dropped.sources) or None,
            message="%d alert%s could not be delivered to %s: %s%s" % (
                total, "" if total == 1 else "s", self.sink.name, detail,
                named)))
        self.spool.flush()


Channel = collections.namedtuple("Channel", "sink gate spool")
Channel.__new__.__defaults__ = (None,)
Channel.__doc__ = """A destination: its sink behind its policy gate, and
for network sinks the spool its courier delivers from."""


# -- state files --------------------------------------------------------------


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
            with tempfile.TemporaryFile(dir=self.state_dir) as probe:
                probe.write(b"ok")  # a random name: no planted link
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
            text = read_state_file(self.path, MAX_STATE_FILE_BYTES + 1)
            if text is None:
                return {}
            if len(text) > MAX_STATE_FILE_BYTES:
                raise ValueError("larger than %d bytes, not read" %
                                 MAX_STATE_FILE_BYTES)
            state = json.loads(text.decode("utf-8"))
            if isinstance(state, dict):
                return state
            problem = "not a JSON object"
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


def replace_file(path, text, durable=False, mode=0o600, owner=None):
    """Write `text` (str or bytes) to `path` atomically: readers see the
    old file or the new one, never half of it (a temporary file, then
    rename). `owner` is (uid, gid) to give the new file. Whatever was at
    `path` is never opened: a symlink or FIFO there is replaced, a
    directory set aside."""
    # A fresh random name (mkstemp: O_CREAT|O_EXCL|O_NOFOLLOW): a name
    # others can guess could be a symlink or FIFO planted in a shared
    # directory, followed or blocked on by root.
    descriptor, temporary = tempfile.mkstemp(
        dir=os.path.dirname(path) or ".",
        prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if owner is not None:
                os.fchown(handle.fileno(), owner[0], owner[1])
            os.fchmod(handle.fileno(), mode)  # whatever the umask
            handle.write(text if isinstance(text, bytes)
                         else text.encode("utf-8"))
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        try:
            os.replace(temporary, path)
        except IsADirectoryError:
            set_aside(path, "a directory")
            os.replace(temporary, path)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        if isinstance(error, OSError) and error.filename in (None,
                                                             temporary):
            raise naming_file(error, path) from None
        raise


class NotRegularFile(OSError):
    """A path that should be a plain file is a FIFO, device, directory or
    (where links are not followed) a symbolic link; `kind` says which."""

    def __init__(self, path, kind):
        OSError.__init__(self, errno.EINVAL, "is %s, not a regular file"
                         % kind, path)
        self.kind = kind


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
               (stat.S_ISLNK, "a symbolic link"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"))


def file_kind(mode):
    """What a st_mode is, in words ("a FIFO")."""
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, follow_links=False, encoding=None):
    """Open an existing file for reading (binary, or text in `encoding`)
    only if it is a regular file: never blocking on a FIFO or device
    (O_NONBLOCK, then fstat), and never through a symlink unless
    `follow_links`. Raises NotRegularFile (an OSError) naming what it
    found instead."""
    descriptor = regular_descriptor(path, os.O_RDONLY, follow_links)
    try:
        return os.fdopen(descriptor, "r" if encoding else "rb",
                         encoding=encoding)
    except BaseException:
        os.close(descriptor)
        raise


def regular_descriptor(path, flags, follow_links=False, mode=0o600):
    """os.open(path, flags) only if what it opens is a regular file (see
    open_regular), as a blocking descriptor; NotRegularFile otherwise."""
    flags |= os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        descriptor = os.open(path, flags, mode)
    except OSError as error:
        if error.errno == errno.ELOOP and not follow_links:
            raise NotRegularFile(path, "a symbolic link") from None
        raise
    try:
        kind = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(kind):
            raise NotRegularFile(path, file_kind(kind))
        os.set_blocking(descriptor, True)
        return descriptor
    except BaseException:
        os.close(descriptor)
        raise


def set_aside(path, what):
    """Rename what is at `path` out of the way (to PATH.not-a-file-XXXXXX),
    never opening it, and say so; the new name, or None if it could not
    be moved."""
    aside = "%s.not-a-file-%s" % (path, os.urandom(3).hex())
    try:
        os.rename(path, aside)
    except OSError as error:
        say("warning", "%s is %s, not a regular file, and cannot be moved "
            "aside (%s): ignored" % (path, what, error.strerror or error))
        return None
    say("warning", "%s was %s, not a regular file: moved aside to %s"
        % (path, what, aside))
    return aside


def read_state_file(path, limit=-1):
    """The bytes of a file the agent keeps (state, detection counters,
    spool), or None when there is none. Anything else found under that
    name (a FIFO, symlink or directory someone planted) is set aside and
    taken as no file, so it can neither hang the agent nor feed it
    another file."""
    try:
        with open_regular(path) as handle:
            if limit >= 0:  # read(n) sets n bytes aside before reading
                limit = min(limit, os.fstat(handle.fileno()).st_size + 1)
            return handle.read(limit)
    except FileNotFoundError:
        return None
    except NotRegularFile as error:
        set_aside(path, error.kind)
        return None


def naming_file(error, filename):
    """The same I/O error (of the same class: a BrokenPipeError stays
    one) naming `filename`: a write or fsync names no file by itself."""
    if error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, filename)


def io_error_text(error):
    """"FILE: what went wrong" for an I/O error, naming the file when the
    error knows it."""
    strerror = getattr(error, "strerror", None)
    if not strerror:
        return str(error)
    filename = getattr(error, "filename", None)
    return "%s: %s" % (filename, strerror) if filename is not None \
        else strerror


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
# journalctl -f -o json as a child process: its command line, its lines,
# its cursor, and restarting it when it exits or stops following.


def journal_matches(tty_audit=False):
    """journalctl match arguments: one field repeated means OR; `+` ORs
    the group of journald's suppression entries (any writer: the parser
    tells journald's own from a forgery), the other doors' lines that carry
    no identifier of theirs (systemd-executor's, PID 1's unit starts) and,
    with tty_audit, the group of the kernel's TTY, USER_TTY and USER_START
    records (audit transport only: never the kernel log's copies)."""
    matches = ["SYSLOG_IDENTIFIER=%s" % name for name in sorted(
        WATCHED_SERVICES)] + ["+", "MESSAGE_ID=" + JOURNAL_DROPPED_MESSAGE_ID,
                              "+", "_EXE=" + EXECUTOR_EXE,
                              "+", "MESSAGE_ID=" + UNIT_STARTING_MESSAGE_ID]
    if tty_audit:
        matches += ["+", "_TRANSPORT=audit"] + [
            "_AUDIT_TYPE=" + kind for kind in AUDIT_KINDS]
    return matches


def journal_fields(tty_audit=False):
    """The --output-fields= argument: the fields the parser reads."""
    return "--output-fields=" + ",".join(
        JOURNAL_FIELDS + (TTY_AUDIT_FIELDS if tty_audit else ()))


def first_start_time_us(first_start, now_s):
    """The absolute start of `now` or `-2h`; None for boot and all."""
    if first_start == "now":
        return int(now_s * 1e6)
    if first_start.startswith("-"):
        seconds = int(first_start[1:-1]) * _SECONDS_PER_UNIT[first_start[-1]]
        return int((now_s - seconds) * 1e6)
    return None


def follow_command(journalctl, position, tty_audit=False):
    """The journalctl command line that follows the watched services."""
    return ([journalctl, "--follow", "--output=json", "--no-pager",
             "--all", "--quiet", "--no-tail", journal_fields(tty_audit)]
            + position + journal_matches(tty_audit))


def journald_absence(socket_path):
    """Why no journald listens on `socket_path`, or None when one does.  The
    socket file outlives the journald that bound it (a container's journald
    killed, a machine restored from a snapshot): only a connect tells."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(socket_path)
    except FileNotFoundError:
        return "%s is missing" % socket_path
    except ConnectionRefusedError:
        return "nothing listens on %s" % socket_path
    except OSError:
        return None  # there but not ours to reach: not a missing journald
    finally:
        probe.close()
    return None


class JournalSource:
    """Runs `journalctl -f -o json` and hands out its lines.

    Restarts it with backoff when it exits, resumes after the last handled
    entry's cursor, and restarts it when it has silently stopped following
    (seen when inotify watches run out).
    """

    def __init__(self, journalctl, first_start, cursor=None,
                 last_realtime_us=None, socket_path=JOURNAL_SOCKET,
                 tty_audit=False):
        self.journalctl = journalctl
        self.tty_audit = tty_audit  # also read the TTY audit records
        self.socket_path = socket_path
        self.journald_was_missing = False
        self.unannounced_exit = None  # a signalled exit, said if restarted
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

    def to_state(self):
        """Where to resume (state.json)."""
        return {"cursor": self.cursor, "realtime_us": self.last_realtime_us,
                "since_us": self.since_us}

    def load_state(self, state):
        """Resume where to_state() said; a malformed cursor is ignored."""
        cursor = state.get("cursor")
        if cursor is not None and not valid_cursor(cursor):
            say("warning", "ignoring a malformed saved cursor")
            cursor = None
        since_us = saved_time_us(state.get("since_us"))
        self.advance(cursor, saved_time_us(state.get("realtime_us")))
        if since_us is not None:
            self.since_us = since_us

    def pin_first_start(self, now_s):
        """Fix `now` or `-1h` to an absolute time, once, so that a restart
        before any entry was handled does not skip what happened since."""
        if self.cursor is None and self.last_realtime_us is None and \
                self.since_us is None:
            self.since_us = first_start_time_us(self.first_start, now_s)

    def position(self, now_s):
        """journalctl arguments: after the last handled entry, else from its
        time (the cursor was refused), but never later than `now_s` (an
        entry stamped ahead, by a clock set back since, would skip all
        that comes until then), else from the first start."""
        if self.cursor is not None:
            return ["--after-cursor=%s" % self.cursor]
        if self.last_realtime_us is not None:
            return ["--since=@%.6f" % (min(self.last_realtime_us / 1e6,
                                           now_s))]
        if self.since_us is not None:
            return ["--since=@%.6f" % (self.since_us / 1e6)]
        return ["--boot"] if self.first_start == "boot" else []

    # -- process ----------------------------------------------------------

    def start(self, now):
        self.pin_first_start(time.time())
        command = follow_command(self.journalctl, self.position(time.time()),
                                 self.tty_audit)
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
        if code is not None and code < 0:
            # Killed by a signal: at a stop (systemctl stop signals the whole
            # control group) that is expected, so it is said only once the
            # agent goes on and restarts it.
            self.unannounced_exit = self.last_error
        else:
            say("warning", "%s; restarting in %ds" % (self.last_error, delay))

    def journald_missing(self):
        """Why no journald runs here, or None when one listens."""
        return journald_absence(self.socket_path)

    def supervise(self, now, probe=None):
        """Restart a dead follower when its backoff is over, and a silent
        one when the journal holds entries it should have delivered."""
        if self.process is None:
            if now >= self.restart_at:
                if self.unannounced_exit:
                    say("warning", "%s; restarting it" % self.unannounced_exit)
                    self.unannounced_exit = None
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
            self.position(time.time()) + journal_matches(self.tty_audit)
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
# 13b login records (a second witness)
# ---------------------------------------------------------------------------
# The login records (/var/log/wtmp, wtmpdb's SQLite file) are written by
# sshd and login themselves, not through the journal: a session recorded
# there with no login seen in the journal is one the journal lost (a flood
# past journald's rate limit) or had removed. Parsing and the decision are
# pure; LoginRecordFile does the reading.

#: glibc's struct utmp on x86-64 and the other 64-bit Linux ABIs: type,
#: padding, pid, line, id, user, host, exit (2 shorts), session, tv_sec,
#: tv_usec, addr_v6 (4 x int32), unused; 384 bytes.
UTMP_FORMAT = struct.Struct("<h2xi32s4s32s256shhiii4i20s")

#: ut_type of a user's login (USER_PROCESS) in utmp and in wtmpdb.
UTMP_USER_PROCESS, WTMPDB_USER_PROCESS = 7, 3

#: What `login_records = auto` reads: wtmpdb's file where it exists
#: (Debian 13 and later), else the classic wtmp.
WTMPDB_FILE, WTMP_FILE = "/var/lib/wtmpdb/wtmp.db", "/var/log/wtmp"

#: How SQLite files begin (wtmpdb's); anything else is read as utmp.
SQLITE_MAGIC = b"SQLite format 3\0"

#: A journal login this close to a record (either side) accounts for it.
ACCOUNT_WINDOW_US = 120 * 1000000

#: A record is judged once the journal was read this far past it...
ACCOUNT_GRACE_US = 10 * 1000000

#: ...or, the journal being quiet (nothing new to read), this long after
#: it by the wall clock.
QUIET_GRACE_US = 60 * 1000000

#: Journal logins remembered, and records waiting for a verdict, at most.
MAX_RECENT_LOGINS = 4096

#: Records read from a file per poll at most (a huge file is read in steps).
MAX_RECORDS_PER_READ = 1000

#: How often the login records are looked at (seconds).
LOGIN_RECORDS_POLL_S = 5.0

LoginRecord = collections.namedtuple(
    "LoginRecord", "time_us user source_ip source_domain tty pid service")
LoginRecord.__doc__ = """One session in the login records."""

#: A login the journal showed: (time_us, user, source_ip or None).
JournalLogin = collections.namedtuple("JournalLogin", "time_us user source_ip")


def _utmp_text(raw):
    """A fixed-size char array: up to the first NUL, never trusted."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def login_record(user, host, tty, time_us, pid=None, service=None):
    """A LoginRecord from text fields, or None when it names nobody."""
    user = (user or "").strip()
    if not user or type(time_us) is not int or time_us <= 0:
        return None
    ip, domain = normalise_address((host or "").strip())
    return LoginRecord(time_us, user[:MAX_UNTRUSTED_MESSAGE_CHARS], ip,
                       domain, (tty or "")[:64] or None, pid,
                       (service or "")[:64] or None)


def parse_utmp_record(raw):
    """384 bytes of wtmp -> LoginRecord of a USER_PROCESS, else None."""
    if len(raw) != UTMP_FORMAT.size:
        return None
    (kind, pid, line, _, user, host, _, _, _, seconds, micros, _, _, _, _,
     _) = UTMP_FORMAT.unpack(raw)
    if kind != UTMP_USER_PROCESS or not 0 <= micros < 1000000:
        return None
    return login_record(_utmp_text(user), _utmp_text(host),
                        _utmp_text(line), seconds * 1000000 + micros,
                        pid if pid > 0 else None)


def parse_utmp(buffer):
    """The user logins in whole 384-byte records of `buffer`."""
    size = UTMP_FORMAT.size
    found = (parse_utmp_record(buffer[start:start + size])
             for start in range(0, len(buffer) - size + 1, size))
    return [record for record in found if record is not None]


def wtmpdb_record(row):
    """(ID, Type, User, Login, TTY, RemoteHost, Service) -> LoginRecord."""
    _, kind, user, login_us, tty, host, service = row
    if kind != WTMPDB_USER_PROCESS or not isinstance(user, str):
        return None
    return login_record(user, host if isinstance(host, str) else None,
                        tty if isinstance(tty, str) else None,
                        login_us if type(login_us) is int else None,
                        service=service if isinstance(service, str) else None)


def journal_login(event):
    """The JournalLogin a login_success or session_opened gives, or None
    (sudo and su sessions are not logins into the host)."""
    if event.action not in ("login_success", "session_opened") or \
            not event.user or event.timestamp_us is None or \
            event.target_user is not None or \
            event.service in SWITCHING_PAM_SERVICES:
        return None
    return JournalLogin(event.timestamp_us, event.user, event.source_ip)


def is_accounted(record, logins, window_us=ACCOUNT_WINDOW_US):
    """Whether a journal login of the record's user (and address, when
    both have one) came within `window_us` of it; `logins` are that
    user's."""
    return any(
        abs(login.time_us - record.time_us) <= window_us and
        (login.source_ip is None or record.source_ip is None or
         login.source_ip == record.source_ip)
        for login in logins)


def judge_records(records, logins, read_until_us, quiet_now_us=None,
                  grace_us=ACCOUNT_GRACE_US, quiet_grace_us=QUIET_GRACE_US):
    """(unaccounted, waiting): records no journal login accounts for, once
    the journal was read to `read_until_us` (the newest entry's time) past
    the record plus a grace, or, `quiet_now_us` given (the journal had
    nothing more to read), the wall clock passed it plus a longer grace.
    Accounted records are dropped; the rest wait."""
    by_user = collections.defaultdict(list)
    for login in logins:
        by_user[login.user].append(login)
    unaccounted, waiting = [], []
    for record in records:
        if is_accounted(record, by_user.get(record.user, ())):
            continue
        if (read_until_us is not None and
                read_until_us >= record.time_us + grace_us) or (
                quiet_now_us is not None and
                quiet_now_us >= record.time_us + quiet_grace_us):
            unaccounted.append(record)
        else:
            waiting.append(record)
    return unaccounted, waiting


def unaccounted_event(record, path, hostname):
    return Event(action="unaccounted_session", timestamp_us=record.time_us,
                 user=record.user, source_ip=record.source_ip,
                 source_domain=record.source_domain, tty=record.tty,
                 pid=record.pid, service=record.service,
                 hostname=hostname, login_record=path)


def login_record_paths(setting, exists=os.path.lexists):
    """The files `login_records` names: auto picks one that exists (a
    symbolic link counts: Debian's wtmpdb link points to a file the first
    login creates)."""
    if setting != "auto":
        return tuple(setting)
    for path in (WTMPDB_FILE, WTMP_FILE):
        if exists(path):
            return (path,)
    return ()


def _utf8_or_replaced(data):
    return data.decode("utf-8", "replace")


class LoginRecordFile:
    """Follows one login records file from where it stood when opened:
    wtmp by byte offset like `tail -f` (a shorter or other file: rotated,
    read from its start), wtmpdb by row ID (read-only SQLite)."""

    def __init__(self, path):
        self.path = path
        self.kind = None  # "wtmp" or "wtmpdb", known once the file is seen
        self.identity = None  # (device, inode) of the wtmp read
        self.offset = 0
        self.last_id = None
        self.problem = None  # why it cannot be read, for the health

    def open(self):
        """Start at the end: what was there before is history."""
        self.read(skip=True)

    def read(self, skip=False):
        """New login records since the last read (a bounded batch)."""
        try:
            # a FIFO put there would block the whole agent: regular only
            with open_regular(self.path, True) as handle:
                magic = handle.read(len(SQLITE_MAGIC))
                self.kind = "wtmpdb" if magic == SQLITE_MAGIC else "wtmp"
                if self.kind == "wtmp":
                    records = self._read_wtmp(handle, skip)
            if self.kind == "wtmpdb":
                records = self._read_wtmpdb(skip)
        except FileNotFoundError:
            self.problem = None  # not written yet (no login since install)
            self.identity, self.offset, self.last_id = None, 0, 0
            return []
        except (OSError, ValueError) as error:
            self.problem = "cannot read %s: %s" % (
                self.path, getattr(error, "strerror", None) or error)
            return []
        self.problem = None
        return [] if skip else records

    def _read_wtmp(self, handle, skip):
        status = os.fstat(handle.fileno())
        identity = (status.st_dev, status.st_ino)
        if identity != self.identity or status.st_size < self.offset:
            # rotated or truncated: a new file is read from its start
            self.offset = 0 if self.identity is not None else self.offset
            self.identity = identity
        size = UTMP_FORMAT.size
        if skip:
            self.offset = status.st_size - status.st_size % size
            return []
        handle.seek(self.offset)
        buffer = handle.read(size * MAX_RECORDS_PER_READ)
        whole = len(buffer) - len(buffer) % size
        self.offset += whole
        return parse_utmp(buffer[:whole])

    def _read_wtmpdb(self, skip):
        import sqlite3  # only where wtmpdb is read
        try:
            connection = sqlite3.connect(
                "file:%s?mode=ro" % urllib.parse.quote(self.path),
                uri=True, timeout=2)
            # A name not in UTF-8 must not fail every read after it, and
            # only whole-number IDs order the rows (SQLite keeps any type).
            connection.text_factory = _utf8_or_replaced
            try:
                newest = connection.execute(
                    "SELECT max(ID) FROM wtmp WHERE typeof(ID) = 'integer'"
                ).fetchone()[0] or 0
                if skip or self.last_id is None:
                    self.last_id = newest
                    return []
                if newest < self.last_id:  # a new file: from its start
                    self.last_id = 0
                rows = connection.execute(
                    "SELECT ID, Type, User, Login, TTY, RemoteHost, Service "
                    "FROM wtmp WHERE typeof(ID) = 'integer' AND ID > ? "
                    "ORDER BY ID LIMIT ?",
                    (self.last_id, MAX_RECORDS_PER_READ)).fetchall()
            finally:
                connection.close()
        except sqlite3.Error as error:
            raise ValueError("not a wtmpdb file (%s)" % error) from None
        if rows:
            self.last_id = rows[-1][0]
        return [record for record in map(wtmpdb_record, rows)
                if record is not None]


class LoginWitness:
    """Holds the journal's recent logins and the records waiting for a
    verdict, both bounded; `check` says which records no login explains."""

    def __init__(self, files):
        self.files = files
        self.logins = collections.deque(maxlen=MAX_RECENT_LOGINS)
        self.waiting = collections.deque(maxlen=MAX_RECENT_LOGINS)
        self.since_us = None  # records before this are history
        self.verdicts = collections.Counter()  # accounted / unaccounted

    def observe(self, event):
        login = journal_login(event)
        if login is not None:
            self.logins.append(login)

    def open(self, now_us):
        self.since_us = now_us - ACCOUNT_WINDOW_US
        for records in self.files:
            records.open()

    def check(self, read_until_us, quiet_now_us):
        """[(record, path)] found unaccounted now."""
        for records in self.files:
            self.waiting.extend((record, records.path)
                                for record in records.read()
                                if record.time_us >= self.since_us)
        paths = dict((record, path) for record, path in self.waiting)
        unaccounted, waiting = judge_records(
            [record for record, _ in self.waiting], self.logins,
            read_until_us, quiet_now_us)
        self.verdicts["accounted"] += len(self.waiting) - len(
            unaccounted) - len(waiting)
        self.verdicts["unaccounted"] += len(unaccounted)
        self.waiting.clear()
        self.waiting.extend((record, paths[record]) for record in waiting)
        return [(record, paths[record]) for record in unaccounted]


# ---------------------------------------------------------------------------
# 14 runtime
# ---------------------------------------------------------------------------
# `run`: systemd notify and health, the metrics file, the Pipeline that
# takes each entry to the channels (shared with scan and report), the
# ChannelSet with its couriers, and the Agent that wires them.


# -- systemd notify and health ------------------------------------------------


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
                say("warning", "cannot notify systemd at %s: %s"
                    % (self.address, error.strerror or error))
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


# -- the metrics file ---------------------------------------------------------

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
    ("pamsignal_journal_suppressed_total",
     ("counter", "journald's rate limit suppressions of a login unit.")),
    ("pamsignal_journal_dropped_lines_total",
     ("counter", "Lines of a login unit that journald's rate limit dropped.")),
    ("pamsignal_login_records_total",
     ("counter", "Sessions in the login records, by verdict: accounted "
      "(the journal showed the login) or unaccounted.")),
    ("pamsignal_tty_records_total",
     ("counter", "TTY audit records read (tty_audit), by verdict: typed "
      "(in a session), unclaimed (no open session known) or relayed "
      "(sudo passing the terminal on).")),
    ("pamsignal_journal_last_suppression_time_seconds",
     ("gauge", "When journald last said it dropped lines of a login unit "
      "(Unix time; unit and dropped lines in the labels).")),
    ("pamsignal_events_total", ("counter", "Events reported, by action.")),
    ("pamsignal_audit_records_total",
     ("counter", "Records written to the audit log.")),
    ("pamsignal_audit_unwritten_total",
     ("counter", "Audit records the disk refused (full, read-only).")),
    ("pamsignal_alerts_sent_total",
     ("counter", "Alerts each channel took (network channels: delivered).")),
    ("pamsignal_alerts_failed_total",
     ("counter", "Failed sends, flushes or delivery attempts per channel.")),
    ("pamsignal_spool_alerts",
     ("gauge", "Alerts waiting in a network channel's spool.")),
    ("pamsignal_spool_oldest_age_seconds",
     ("gauge", "How long the oldest alert in the spool has waited.")),
    ("pamsignal_alerts_dropped_total",
     ("counter", "Alerts a channel's spool dropped (full, too old, refused, "
      "unreadable), by action.")),
    ("pamsignal_alerts_dropped_info",
     ("gauge", "Whose alerts a channel's spool dropped: users and sources "
      "(up to 10 each) in labels.")),
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


#: Values read back from the health file lie within this (a time of 1e15
#: s is still a date): the file is the sandboxed service's to write.
METRIC_VALUE_LIMIT = 1e15

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?')
_LABEL_ESCAPES = {"\\\\": "\\", "\\n": "\n", '\\"': '"'}


def parse_metrics(text):
    """Prometheus text -> {name: [(labels, value)]}; other lines skipped."""
    found = collections.OrderedDict()
    # Lines end in \n only: a label may hold \x85 or \u2028, which
    # splitlines() would take for line ends too.
    for line in text.split("\n"):
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
        if not -METRIC_VALUE_LIMIT < value < METRIC_VALUE_LIMIT:
            continue  # NaN, infinite, or no count, time or PID at all
        found.setdefault(match.group(1), []).append((labels, value))
    return found


def suppression_samples(pipeline):
    """The metrics of journald's suppressions of login units."""
    samples = []
    for unit in sorted(pipeline.suppressions):
        samples += [
            ("pamsignal_journal_suppressed_total", {"unit": unit},
             pipeline.suppressions[unit]),
            ("pamsignal_journal_dropped_lines_total", {"unit": unit},
             pipeline.dropped_lines[unit])]
    last = pipeline.last_suppression
    if last is not None:
        samples.append(("pamsignal_journal_last_suppression_time_seconds",
                        {"unit": last.unit, "dropped": last.dropped or 0},
                        last.timestamp_us / 1e6))
    return samples


# -- the pipeline -------------------------------------------------------------

#: The highest UID of a system account (login.defs SYS_UID_MAX): a
#: service account above it could be a person's.
SYSTEM_UID_MAX = 999


def service_account_uids(getpwnam=pwd.getpwnam):
    """Service account name -> UID (text) for the watched services that
    log as an account of their own (polkitd), looked up by name once at
    start. An account that is missing, root's, or not a system account
    (a UID people's accounts get) is left out: its lines are then
    trusted only from root."""
    uids = {}
    for service in WATCHED_SERVICES.values():
        if service.account is None:
            continue
        try:
            uid = getpwnam(service.account).pw_uid
        except KeyError:
            continue
        if 0 < uid <= SYSTEM_UID_MAX:
            uids[service.account] = str(uid)
    return uids


def agent_event(action, now_s, component=None, message=None):
    """An event about the agent itself (not from the journal)."""
    return Event(timestamp_us=int(now_s * 1e6), action=action,
                 hostname=socket.gethostname(), service="pamsignal",
                 pid=os.getpid(), detail=component, message=message)


class Pipeline:
    """Entry -> event -> sessions -> context -> detection -> channels
    (policy gate, then sink or spool), shared by `run` and `scan`.

    A failing sink is reported and never stops the others or the reader.
    `channels` are iterated for each alert (a list, or the agent's
    ChannelSet, which a reload refills); `clock` gives the wall time that
    cooldowns and rate limits run on; `accounts` the UIDs of service
    accounts (service_account_uids).
    """

    def __init__(self, channels, detection, skip_unwatched=False,
                 clock=time.time, enricher=None, accounts=None):
        self.channels = channels
        self.enricher = enricher
        self.sessions = SessionTracker()
        self.sudo_attempts = SudoAttempts()
        self.sudo_lines = SudoContinuations()
        self.ssh_attempts = SshAttempts()
        self.program_attempts = ProgramAttempts()
        self.acting_users = ActingUsers(account_of)
        #: Lines of the other doors in that pair up (section 7b).
        self.door_pairs = (PolkitAttempts(), Run0Commands())
        self.accounts = accounts
        self.detector = FailureDetector(detection)
        self.baseline = Baseline(detection.learning_period)
        self.skip_unwatched = skip_unwatched
        self.clock = clock
        self.entries = 0
        self.events = 0
        self.malformed = 0
        self.by_action = collections.Counter()
        self.suppressions = collections.Counter()  # unit -> entries
        self.dropped_lines = collections.Counter()  # unit -> lines
        self.last_suppression = None  # its event
        self.witness = None  # LoginWitness: logins the journal showed
        self.sent = collections.Counter()  # channel -> alerts handed over
        self.failed = collections.Counter()  # channel -> errors
        self.failing = {}  # channel -> its error, until it works again
        self.audit = None  # the AuditLog, when the agent keeps one
        # What was typed in sessions (TTY audit), when tty_audit is on.
        self.typing = TypedInput() if detection.tty_audit else None
        #: (own time in µs, wall clock in s) of the newest entry read live:
        #: the journal's time as far as the agent has read it.
        self.journal_read = None
        self.following = True  # journalctl is running (see journal_followed)

    # -- state --------------------------------------------------------------

    def to_state(self):
        """The open sessions and the lines held for pairing (state.json)."""
        return {"sessions": self.sessions.to_state(),
                "sudo_attempts": self.sudo_attempts.to_state(),
                "sudo_lines": self.sudo_lines.to_state(),
                "ssh_attempts": self.ssh_attempts.to_state(),
                "program_attempts": self.program_attempts.to_state(),
                "typed_closes": [] if self.typing is None
                else self.typing.to_state(),
                "door_pairs": [pairs.to_state() for pairs in
                               self.door_pairs]}

    def load_state(self, state, now_us):
        """What to_state() saved; what is malformed is left out."""
        self.sessions.load_state(state.get("sessions"))
        self.sudo_attempts.load_state(state.get("sudo_attempts"))
        self.sudo_lines.load_state(state.get("sudo_lines"))
        self.ssh_attempts.load_state(state.get("ssh_attempts"))
        self.program_attempts.load_state(state.get("program_attempts"))
        if self.typing is not None:
            self.typing.load_state(state.get("typed_closes"), now_us)
        door_pairs = state.get("door_pairs")
        for pairs, saved in zip(self.door_pairs, door_pairs if
                                isinstance(door_pairs, list) else ()):
            pairs.load_state(saved)

    def detection_state(self):
        """The detectors' counters and baseline (detection.json)."""
        return {"counters": self.detector.to_state(),
                "baseline": self.baseline.to_state()}

    def load_detection_state(self, state, now_us):
        self.detector.load_state(state.get("counters"), now_us)
        self.baseline.load_state(state.get("baseline"), now_us)

    def reconfigure(self, old, config, now_s):
        """A reloaded configuration's detection settings (counters and
        baseline carried over) and databases."""
        if config.detection != old.detection:
            now_us = int(now_s * 1e6)
            detector = FailureDetector(config.detection)
            detector.load_state(self.detector.to_state(), now_us)
            baseline = Baseline(config.detection.learning_period)
            baseline.load_state(self.baseline.to_state(), now_us)
            self.detector, self.baseline = detector, baseline
        if config.geoip != old.geoip or \
                config.host_provider != old.host_provider:
            self.enricher.close()
            self.enricher = Enricher.from_config(config, True)
            self.enricher.open(now_s)

    def forget_failures(self):
        """New channels (a reload): the old ones' failures are over."""
        self.failing.clear()

    def follow_witness(self, witness):
        """Check logins against these login records (at the start, and when
        a reload changed which); the logins seen so far carry over."""
        if self.witness is not None:
            witness.logins.extend(self.witness.logins)
        self.witness = witness

    # -- databases and closing ----------------------------------------------

    def open(self, now_s):
        """Read the databases now, so a wrong path is said at the start."""
        if self.enricher is not None:
            self.enricher.open(now_s)

    def host_provider(self):
        return None if self.enricher is None else self.enricher.host_provider

    def database_health(self, now_s):
        """("geoip:ROLE", its problem or None) of each configured database,
        looked at now (a replaced file is read again)."""
        for database in (self.enricher.databases if self.enricher is not None
                         else ()):
            database.current(now_s)
            yield "geoip:" + database.role, database.problem

    def close(self):
        """The audit log and the databases, at the stop."""
        if self.audit is not None:
            self.audit.close()
        if self.enricher is not None:
            self.enricher.close()

    # -- entries ------------------------------------------------------------

    def decode(self, line):
        """One journalctl output line -> entry dict, or None (counted, and
        complained about when it is not a journal JSON object).

        With skip_unwatched (scan of a whole export), an object line that
        does not even contain a watched identifier is counted unparsed:
        most of a full export is other programs.
        """
        if self.skip_unwatched and isinstance(line, bytes) and \
                _WATCHED_NAME_BYTES.search(line) is None and (
                    self.typing is None or b'"audit"' not in line):
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

    def process_entry(self, entry, now_s=None):
        """Parse one entry and send its event, then what it made the
        detector find; returns how many events were sent. `now_s` (wall
        clock) is given when the entry is live (`run`, not `scan`)."""
        if now_s is not None:
            self._note_read(entry, now_s)
        if self.typing is not None:
            record = parse_audit_record(entry)
            if record is not None:
                return sum(self._deliver(closed, now_s)
                           for closed in self.typing.record(record))
        sent = 0
        if self.sudo_lines.held:  # split sudo lines whose wait is over
            for released in self.sudo_lines.due(_entry_timestamp(entry) or 0):
                sent += self._parse(released, now_s)
        if entry.get("SYSLOG_IDENTIFIER") != "sudo":  # nearly every entry
            return sent + self._parse(entry, now_s, True)
        ready = self.sudo_lines.observe(entry)
        if ready and ready[-1] is entry:
            ready.pop()
            for released in ready:
                sent += self._parse(released, now_s)
            return sent + self._parse(entry, now_s, True)
        return sent + sum(self._parse(released, now_s) for released in ready)

    def _parse(self, entry, now_s, due=False):
        """Parse one entry (or sudo's joined lines) and send its event and
        what it made the detector find; with `due`, the held failures
        whose wait the entry's time ended first. Returns how many events
        were sent."""
        event = parse_entry(entry, int((self.clock() if now_s is None
                                        else now_s) * 1000000), self.accounts)
        if event is not None:
            if self.typing is not None and event.action == "session_opened":
                self.typing.note(event, entry)
            event = self.sudo_attempts.observe(event)
        attempts, programs = self.ssh_attempts, self.program_attempts
        sent = 0
        # Held failures whose wait is over (by the time of a read entry).
        if due and (attempts.held or programs.held):
            entry_us = _entry_timestamp(entry) or 0
            for released in attempts.due(entry_us) + programs.due(entry_us):
                sent += self._process(released, now_s)
        for pairs in self.door_pairs if due else ():
            if pairs.held:
                for released in pairs.due(_entry_timestamp(entry) or 0):
                    sent += self._process(released, now_s)
        if due and self.typing is not None and self.typing.closing:
            for closed in self.typing.due(_entry_timestamp(entry) or 0):
                sent += self._deliver(closed, now_s)
        if event is not None:
            for program_event in programs.observe(event):
                for paired in attempts.observe(program_event):
                    for told in self._door_paired(paired):
                        sent += self._process(told, now_s)
        return sent

    def _note_read(self, entry, now_s):
        entry_us = _entry_timestamp(entry)
        if entry_us is not None and (self.journal_read is None or
                                     entry_us >= self.journal_read[0]):
            self.journal_read = (entry_us, now_s)

    def resume_journal_time(self, entry_us, now_s):
        """After a restart: the journal's time is that of the last entry
        handled (`entry_us`, when known), read `now_s`."""
        if entry_us is not None and self.journal_read is None:
            self.journal_read = (entry_us, now_s)

    def journal_followed(self, following, now_s):
        """Whether journalctl is running, live. The time it is not (dead,
        waiting to be restarted) is not waited: the journal's time stands
        still, and a close held for its last keystrokes waits again from
        the restart, so neither lets go of a line whose rest journalctl
        has still to give."""
        if following == self.following:
            return
        if self.journal_read is not None:
            reached_us = self.journal_now_us(now_s) if self.following \
                else self.journal_read[0]  # it stood still since
            self.journal_read = (reached_us, now_s)
        if following and self.typing is not None:
            self.typing.wait_again(int(now_s * 1000000))
        self.following = following

    def journal_now_us(self, now_s):
        """The journal's time now, as far as the agent has read it: the
        newest entry's own time, plus what the clock says passed since it
        was read (the clock itself before any). A held failure waits
        SSH_HOLD_US of this time: an agent catching up on a backlog
        (after a restart, behind a flood) has the rest of an attempt's
        lines still to read, and the wall clock alone would let it go
        first and make two events of it."""
        if self.journal_read is None:
            return int(now_s * 1000000)
        entry_us, read_s = self.journal_read
        if now_s < read_s:  # the clock was set back: count from now
            self.journal_read = (entry_us, now_s)
            return entry_us
        return entry_us + int((now_s - read_s) * 1000000)

    def _door_paired(self, event):
        """The events to send for one, through each pairing of doors."""
        events = [event]
        for pairs in self.door_pairs:
            paired = []
            for one in events:  # nearly always one: no comprehension
                paired += pairs.observe(one)
            events = paired
        return events

    def _process(self, event, now_s):
        """Send one event and what it made the detectors find; returns how
        many events were sent."""
        event = self.sessions.observe(
            self.acting_users.observe(event, live=now_s is not None))
        if self.typing is None:
            return self._deliver(event, now_s)
        # A close of a session with TTY audit waits for its last keystrokes.
        live_us = None if now_s is None else int(now_s * 1000000)
        return sum(self._deliver(ready, now_s)
                   for ready in self.typing.observe(event, live_us))

    def _deliver(self, event, now_s):
        """Send an event the sessions are done with, and what it made the
        detectors find; returns how many events were sent."""
        event = self._enriched(privileged_severity(event), now_s)
        self._send(event)
        try:
            found = self.detector.observe(event) + \
                self.baseline.observe(event)
        except Exception as error:  # a detector bug must not stop reading
            say("error", "detection failed on %s: %r" % (event.action, error))
            found = []
        for detection in found:
            # A brute force names its source afresh: context again (cached).
            self._send(self._enriched(detection, now_s))
        return 1 + len(found)

    def _enriched(self, event, now_s):
        if self.enricher is None:
            return event
        try:
            return self.enricher.enrich(event, now_s)
        except Exception as error:  # context must not cost the event
            say("error", "enrichment failed on %s: %r" % (event.action,
                                                          error))
            return event

    def _send(self, event):
        self.events += 1
        self.by_action[event.action] += 1
        if self.witness is not None:
            self.witness.observe(event)
        if event.action == "journal_suppressed":
            unit = event.unit if event.unit in self.suppressions or len(
                self.suppressions) < MAX_SUPPRESSED_UNITS else "other"
            self.suppressions[unit] += 1
            self.dropped_lines[unit] += event.dropped or 0
            self.last_suppression = event
        now_us = int(self.clock() * 1000000)
        event_id = None
        if self.audit is not None:
            event_id = self.audit.record_event(event)
        self._each_channel(lambda gate: gate.admit(event, now_us), event,
                           event_id)

    def witnessed(self, event, now_s):
        """Send an event the login records gave, with its context."""
        self._send(self._enriched(event, now_s))

    def announce(self, event):
        """Send an event of the agent's own, at once."""
        self._send(event)
        self.flush()

    def tick(self, now_s=None):
        """Send the digests whose cooldown or rate window ended, and the
        held failures whose wait ended by `now_s` (live, wall clock: in the
        journal's time, see journal_now_us); returns how many of those
        were sent."""
        sent = 0
        if now_s is not None and self.following:
            journal_us = self.journal_now_us(now_s)
            sent = sum(self._parse(entry, now_s) for entry in
                       self.sudo_lines.due(journal_us))
            sent += sum(self._process(event, now_s) for event in
                        self.ssh_attempts.due(journal_us) +
                        self.program_attempts.due(journal_us) +
                        [released for pairs in self.door_pairs
                         for released in pairs.due(journal_us)])
            now_us = int(now_s * 1000000)  # a close waits from its holding
            if self.typing is not None:
                sent += sum(self._deliver(event, now_s) for event in
                            self.typing.due(wall_us=now_us))
        now_us = int(self.clock() * 1000000)
        self._each_channel(lambda gate: gate.due(now_us))
        return sent

    def finish(self):
        """The end of the input (scan): the held sshd failures are events
        of their own, and sudo's held lines are read as they are."""
        sent = sum(self._parse(entry, None)
                   for entry in self.sudo_lines.drain())
        sent += sum(self._process(event, None)
                    for event in self.ssh_attempts.drain() +
                    self.program_attempts.drain() +
                    [held for pairs in self.door_pairs
                     for held in pairs.drain()])
        return sent + sum(self._deliver(event, None) for event in (
            self.typing.drain() if self.typing is not None else ()))

    def drain(self):
        """Send every digest still held (before stopping)."""
        self._each_channel(lambda gate: gate.drain())

    def flush(self):
        """Push out what the sinks hold, and make spooled alerts and the
        audit log durable (after each batch, before the cursor is saved)."""
        self._each_channel(None)
        if self.audit is not None:
            self.audit.flush()

    def _each_channel(self, alerts_of, event=None, event_id=None):
        """For each channel, send or spool what `alerts_of(gate)` gives
        (flush when None), containing each channel's failure to itself.
        With an audit log, each decision about `event` is recorded."""
        for channel in self.channels:
            name = channel.sink.name
            alert = None
            try:
                if alerts_of is None:
                    (channel.spool or channel.sink).flush()
                    continue
                alerts = alerts_of(channel.gate)
                if self.audit is not None and event is not None and \
                        event not in alerts:
                    self._decided(name, event, event_id, *skipped_decision(
                        channel.gate, event))
                for alert in alerts:
                    if channel.spool is not None:
                        channel.spool.put(alert)
                    else:
                        channel.sink.send(alert)
                    if self.audit is not None:
                        self._decided(name, alert, event_id if alert is
                                      event else None, "spooled" if
                                      channel.spool is not None else "sent")
                    self.sent[name] += 1
                    self.failing.pop(name, None)
            except BrokenPipeError:
                raise  # our own output is gone: the caller decides
            except Exception as error:  # a sink must not stop the others
                if alert is not None:
                    self._decided(name, alert, event_id if alert is event
                                  else None, "failed", str(error))
                self.failed[name] += 1
                if name not in self.failing:  # once, not per event
                    say("error", "channel %s failed: %s" % (name, error))
                self.failing[name] = str(error) or repr(error)


    def _decided(self, channel, alert, known_id, decision, detail=None):
        """Record what a channel did with an alert (its id computed once
        per event, `known_id`, when it is the event itself)."""
        if self.audit is not None:
            self.audit.append(decision_record(
                channel, known_id or alert_id(alert), alert.action,
                decision, detail))


# -- the channel set and the agent --------------------------------------------


def _uses_groups(policy):
    return bool(policy.ignore_groups or policy.always_groups)


def build_channels(config, json_output=False):
    """The configured channels, or the console showing every event when
    none is configured."""
    configured = config.channels or (
        ChannelConfig("console", "console", SHOW_EVERYTHING, {}),)
    directory = GroupDirectory() if any(
        _uses_groups(channel.policy) for channel in configured) else None
    channels = []
    for channel in configured:
        options = dict(channel.options)
        if json_output and channel.type == "console":
            options["format"] = "json"
        gate = ChannelGate(channel.policy, directory.groups_of
                           if _uses_groups(channel.policy) else
                           lambda user: ())
        sink = CHANNEL_TYPES[channel.type](channel.name, options)
        spool = Spool(os.path.join(config.state_dir, "spool",
                                   spool_directory_name(channel.name)),
                      config.spool_max_alerts, config.spool_max_age) \
            if sink.SPOOLED else None
        channels.append(Channel(sink, gate, spool))
    return channels


class ChannelSet:
    """The channels of a running agent with the couriers that deliver their
    spools: opened at the start, checked each round, replaced by a reload,
    closed at the stop. The pipeline sends through it (it iterates as its
    channels); delivery counts outlive the couriers a reload replaces.
    `monotonic` is the clock the stop's deadline runs on."""

    def __init__(self, channels, monotonic=time.monotonic):
        self.channels = list(channels)
        self.monotonic = monotonic
        self.couriers = []
        self.delivered = collections.Counter()  # of couriers now stopped
        self.undelivered = collections.Counter()

    def __iter__(self):
        return iter(self.channels)

    def names(self):
        return set(channel.sink.name for channel in self.channels)

    def open(self, impair):
        """Open every sink and spool, and start a courier for each spooled
        one. A sink that cannot open yet is told to `impair(component,
        reason)` (it is retried on each send); a spool that cannot be
        opened degrades its channel (alerts then wait in memory)."""
        couriers = []
        for channel in self.channels:
            try:
                channel.sink.open()
            except (OSError, ssl.SSLError) as error:  # retried on each send
                impair(channel_section(channel.sink.name), str(error))
            if channel.spool is not None:
                try:
                    channel.spool.open()
                except OSError as error:  # alerts wait in memory meanwhile
                    channel.spool.disk_error = "cannot open %s: %s" % (
                        channel.spool.directory, error.strerror or error)
                couriers.append(Courier(channel.sink, channel.spool))
        for courier in couriers:
            courier.start()
        self.couriers = couriers

    def close(self, reloading=False):
        """Stop the couriers (what they did not deliver stays in the spool)
        and close the sinks. Returns, per spool directory, the alerts kept
        in memory because the disk refused them: a reload hands them on, a
        stop says they are lost."""
        # All told at once, then joined against one deadline; on reload a
        # new courier takes each spool, so a request in flight may finish
        # (or be sent twice).
        for courier in self.couriers:
            courier.stop(0)
        deadline = self.monotonic() + (RELOAD_JOIN_S if reloading else 2.0)
        for courier in self.couriers:
            courier.join(max(0.0, deadline - self.monotonic()))
            self.delivered[courier.sink.name] += courier.delivered
            self.undelivered[courier.sink.name] += courier.failed
        self.couriers = []
        held = {}
        for channel in self.channels:
            _close_sink(channel.sink)
            if channel.spool is not None and channel.spool.in_memory:
                held[channel.spool.directory] = channel.spool
                if not reloading:
                    say("error", "channel %s: %d alert%s the disk refused "
                        "could not be delivered before stopping and are lost"
                        % (channel.sink.name, len(channel.spool.in_memory),
                           "" if len(channel.spool.in_memory) == 1 else "s"))
        return held

    def replace(self, channels, held, impair):
        """A reload's channels take over, with the alerts the closed ones
        kept in memory (`held`, from close()), and are opened."""
        self.channels = list(channels)
        for channel in self.channels:  # alerts the disk refused go on waiting
            if channel.spool is not None:
                channel.spool.adopt(held.get(channel.spool.directory))
        self.open(impair)

    def failing(self, in_reader):
        """channel -> error: `in_reader` (sinks that failed in the reader),
        couriers whose last delivery attempt failed or whose request runs
        long, and spools the disk refuses."""
        failing = dict(in_reader)
        for courier in self.couriers:
            if courier.failures:
                failing.setdefault(courier.sink.name, courier.last_error)
            slow = courier.slow_request()
            if slow is not None:
                failing.setdefault(courier.sink.name, slow)
        for channel in self.channels:
            if channel.spool is not None and channel.spool.disk_error:
                failing.setdefault(channel.sink.name, "its spool: %s"
                                   % channel.spool.disk_error)
        return failing

    def counts(self, sent, failed):
        """(sent, failed) Counters per channel: the reader's counts, except
        that network channels count deliveries (of earlier couriers too,
        as a reload replaces them), not hand-overs to their spool."""
        sent, failed = collections.Counter(sent), collections.Counter(failed)
        for name in set(self.delivered) | set(
                courier.sink.name for courier in self.couriers):
            sent[name] = self.delivered[name]
        failed.update(self.undelivered)
        for courier in self.couriers:
            sent[courier.sink.name] += courier.delivered
            failed[courier.sink.name] += courier.failed
        return sent, failed


def _close_sink(sink):
    try:
        sink.close()
    except Exception as error:  # closing must not stop the others
        say("error", "channel %s failed to close: %s" % (sink.name, error))


def gather_metrics(now_s, health, pipeline, source, channels, running=True):
    """The health of a running agent as (name, labels, value) for
    render_metrics. Every channel it names becomes a known component of
    `health` (so a degraded one reads 0 once it recovers)."""
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
         max(0, source.starts - 1))]
    if pipeline.audit is not None:
        samples += [("pamsignal_audit_records_total", {},
                     pipeline.audit.records),
                    ("pamsignal_audit_unwritten_total", {},
                     pipeline.audit.unwritten)]
    if source.last_realtime_us is not None:
        samples.append(("pamsignal_journal_lag_seconds", {}, max(
            0.0, now_s - source.last_realtime_us / 1e6)))
    samples += [("pamsignal_events_total", {"action": action}, count)
                for action, count in sorted(pipeline.by_action.items())]
    samples += suppression_samples(pipeline)
    if pipeline.witness is not None:
        samples += [("pamsignal_login_records_total", {"verdict": verdict},
                     pipeline.witness.verdicts[verdict])
                    for verdict in ("accounted", "unaccounted")]
    if pipeline.typing is not None:
        samples += [("pamsignal_tty_records_total", {"verdict": verdict},
                     pipeline.typing.records[verdict])
                    for verdict in ("typed", "unclaimed", "relayed")]
    sent, failed = channels.counts(pipeline.sent, pipeline.failed)
    names = sorted(channels.names() | set(sent) | set(failed))
    samples += channel_samples(channels, names, sent, failed)
    samples += [("pamsignal_config_reloads_total", {"result": result},
                 health.reloads[result]) for result in ("ok", "failed")]
    health.known.update(channel_section(name) for name in names)
    samples += [("pamsignal_degraded", {"component": component},
                 int(component in health.impaired))
                for component in sorted(health.known)]
    if health.last_error is not None:
        samples += [
            ("pamsignal_last_error_time_seconds", {}, health.last_error_s),
            ("pamsignal_last_error_info", {"message": health.last_error},
             1)]
    return samples


def channel_samples(channels, names, sent, failed):
    """The metrics of the channels `names` and of each channel's spool."""
    samples = [("pamsignal_alerts_sent_total", {"channel": name},
                sent[name]) for name in names]
    samples += [("pamsignal_alerts_failed_total", {"channel": name},
                 failed[name]) for name in names]
    for channel in channels:
        if channel.spool is None:
            continue
        labels = {"channel": channel.sink.name}
        samples += [
            ("pamsignal_spool_alerts", labels, channel.spool.depth()),
            ("pamsignal_spool_oldest_age_seconds", labels,
             channel.spool.oldest_age_s())]
        lost = channel.spool.lost_since_start()
        samples += [("pamsignal_alerts_dropped_total", dict(
            labels, action=action), count) for action, count
            in sorted(lost.actions.items())]
        if lost.reasons:
            samples.append(("pamsignal_alerts_dropped_info", dict(
                labels, users=",".join(lost.users),
                sources=",".join(lost.sources)), 1))
    return samples


class Agent:
    """The `run` command: follows the journal until told to stop.

    It only wires: the journal source reads, the pipeline handles entries
    (and saves, loads and reconfigures itself), the channel set opens,
    checks, replaces and closes the channels, the health keeps what is
    impaired. The agent starts them, runs the loop, reloads and stops.
    Under systemd it reports through sd_notify (READY, STATUS, WATCHDOG,
    RELOADING, STOPPING); SIGHUP reloads the configuration; its health goes
    to a Prometheus textfile that `status` reads. `clock` is the wall
    clock, `monotonic` the one its intervals run on.
    """

    def __init__(self, config, channels, config_path=None, json_output=False,
                 environ=None, clock=time.time, monotonic=time.monotonic):
        self.config = config
        self.config_path = config_path  # as given: None means the default
        self.json_output = json_output
        self.clock = clock
        self.monotonic = monotonic
        self.store = StateStore(config.state_dir)
        self.detection_store = StateStore(config.state_dir, "detection.json")
        self.last_detection_save = 0.0
        self.events_at_detection_save = 0
        self.channels = ChannelSet(channels, monotonic)
        self.pipeline = Pipeline(self.channels, config.detection, clock=clock,
                                 enricher=Enricher.from_config(config, True),
                                 accounts=service_account_uids())
        self.source = JournalSource(config.journalctl, config.first_start,
                                    tty_audit=config.detection.tty_audit)
        self.notifier = Notifier(environ)
        self.health = Health(clock())
        self.stopping = False
        self.reload_requested = False
        self.last_save = 0.0
        self.last_metrics = None
        self.unsaved = False
        self.witness_setting = None  # login_records the witness follows
        self.last_witness_check = 0.0
        self.environ = os.environ if environ is None else environ

    def open_audit_log(self):
        """The audit log, when [audit] keeps one: its key is read now (a
        bad key is a configuration error), a disk that refuses it only
        degrades it."""
        settings = self.config.audit
        if not settings.enabled:
            return
        key = load_audit_key(settings.key, self.config.log_dir,
                             self.environ.get("CREDENTIALS_DIRECTORY"))
        audit = AuditLog(settings, self.config.log_dir, key, JournalWriter())
        audit.open()
        self.pipeline.audit = audit
        self.health.known.update(("audit_log", "audit_anchor"))

    def check_audit_log(self):
        """The audit log is impaired while it cannot write (or anchor)."""
        audit = self.pipeline.audit
        if audit is None:
            return
        for component, error in (("audit_log", audit.error),
                                 ("audit_anchor", audit.anchor_error)):
            if error:
                self.impair(component, error)
            else:
                self.restore_component(component)

    def request_stop(self, signum=None, frame=None):
        self.stopping = True

    def request_reload(self, signum=None, frame=None):
        self.reload_requested = True

    def restore(self):
        """Where to resume, the sessions and held lines, and the detection
        counters, from the state files."""
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
        now_us = int(self.clock() * 1e6)
        self.pipeline.load_detection_state(detection, now_us)
        self.source.load_state(state)
        self.pipeline.load_state(state, now_us)

    # -- saving -------------------------------------------------------------

    def save(self, now, durable=True):
        """Save cursor and sessions; a failure degrades, never stops, the
        agent (it keeps the state in memory and tries again)."""
        if self._guarded("state", lambda: self.store.save(
                self._state(), durable)):
            self.unsaved = False
        if durable:
            self.last_save = now

    def _state(self):
        state = {"version": 1}
        state.update(self.source.to_state())
        state.update(self.pipeline.to_state())
        return state

    def save_detection(self, now):
        """Save counters and baseline if any event came since last time."""
        self.last_detection_save = now
        if self.pipeline.events == self.events_at_detection_save:
            return
        state = {"version": 1}
        state.update(self.pipeline.detection_state())
        if self._guarded("detection_state",
                         lambda: self.detection_store.save(state)):
            self.events_at_detection_save = self.pipeline.events

    def write_metrics(self, now, running=True):
        self.last_metrics = now
        text = render_metrics(self.metric_samples(self.clock(), running))
        self._guarded("metrics", lambda: replace_file(
            metrics_path(self.config), text, mode=0o644))

    def metric_samples(self, now_s, running=True):
        """The health as (name, labels, value) for render_metrics."""
        return gather_metrics(now_s, self.health, self.pipeline, self.source,
                              self.channels, running)

    def _guarded(self, component, write):
        """Run a write; True if it worked. Its failure impairs the
        component, its next success restores it."""
        try:
            write()
        except (OSError, StateError) as error:
            self.impair(component, io_error_text(error))
            return False
        self.restore_component(component)
        return True

    # -- health -------------------------------------------------------------

    def impair(self, component, reason):
        """Something the monitoring needs broke: say so once (log, event,
        STATUS=), however often it is retried."""
        now_s = self.clock()
        if self.health.impair(component, reason, now_s):
            say("error", "monitoring degraded: %s: %s" % (component, reason))
            self.pipeline.announce(agent_event(
                "monitoring_degraded", now_s, component, reason))
        self.update_status()  # sent only if the reason changed

    def restore_component(self, component):
        if self.health.restore(component):
            say("info", "monitoring restored: %s" % component)
            self.pipeline.announce(agent_event(
                "monitoring_restored", self.clock(), component,
                "%s works again" % component))
            self.update_status()

    def check_journal(self, now):
        """journald should be there and journalctl run; kept running a
        while, it is back. A journald that appears is followed at once."""
        source = self.source
        absence = source.journald_missing()
        if absence:
            source.journald_was_missing = True
            self.impair("journal", JOURNALD_MISSING % absence)
            return
        if source.journald_was_missing:
            source.journald_was_missing = False
            say("info", "systemd-journald is there now; following it")
            source.stop()  # started before the journal existed: start over
            source.restart_at = now
            return
        if source.process is None:
            self.impair("journal", source.last_error or
                        "journalctl is not running")
        elif now - source.started_at >= JOURNAL_RECOVERED_S:
            self.restore_component("journal")

    def check_databases(self, now_s):
        """A configured [geoip] file that is missing or broken is impaired
        until a usable file replaces it (looked at every few seconds)."""
        configured = set()
        for component, problem in self.pipeline.database_health(now_s):
            configured.add(component)
            if problem is not None:
                self.impair(component, problem)
            else:
                self.restore_component(component)
        for component in list(self.health.impaired):
            if component.startswith("geoip:") and component not in configured:
                self.restore_component(component)  # no longer configured

    def failing_channels(self):
        """channel -> error, in the reader or in delivery."""
        return self.channels.failing(self.pipeline.failing)

    def check_channels(self):
        """A channel that failed is impaired until it works again."""
        names = self.channels.names()
        failing = self.failing_channels()
        for name, error in sorted(failing.items()):
            self.impair(channel_section(name), error)
        for component in list(self.health.impaired):
            name = channel_named(component)
            if name is not None and (name not in failing or
                                     name not in names):
                self.restore_component(component)

    def check_login_records(self, now):
        """Every few seconds: login records no journal login accounts for
        become unaccounted_session events. The journal counts as read past
        a record by its newest entry's time, or, when journalctl has been
        quiet a while (all delivered), by the wall clock."""
        setting = self.config.detection.login_records
        if setting != self.witness_setting:  # first run, or a reload
            self.witness_setting = setting
            witness = LoginWitness([LoginRecordFile(path) for path in
                                    login_record_paths(setting)])
            witness.open(int(self.clock() * 1e6))
            self.pipeline.follow_witness(witness)
            say("info", "login records: %s" % (", ".join(
                records.path for records in witness.files) or "off"))
        if now - self.last_witness_check < LOGIN_RECORDS_POLL_S:
            return
        self.last_witness_check = now
        witness = self.pipeline.witness
        quiet = self.source.process is not None and \
            now - self.source.last_activity >= LOGIN_RECORDS_POLL_S
        now_s = self.clock()
        found = witness.check(self.source.last_realtime_us,
                              int(now_s * 1e6) if quiet else None)
        hostname = socket.gethostname()
        for record, path in found:
            self.pipeline.witnessed(unaccounted_event(record, path, hostname),
                                    now_s)
        if found:
            self.pipeline.flush()
        problems = [records.problem for records in witness.files
                    if records.problem]
        if problems:
            self.impair("login_records", "; ".join(problems))
        else:
            self.restore_component("login_records")

    def update_status(self, *fields):
        self.notifier.set_status(self.health.summary(
            self.pipeline.entries, self.pipeline.events), *fields)

    # -- channels -------------------------------------------------------------

    def open_channels(self):
        """Open the channels; one whose sink cannot open yet is impaired."""
        self.channels.open(self.impair)

    def close_channels(self, reloading=False):
        """Send held digests, make spools durable, then close the channels
        (ChannelSet.close: what the disk refused, per spool directory)."""
        self.pipeline.drain()
        self.pipeline.flush()
        return self.channels.close(reloading)

    # -- reloading ------------------------------------------------------------

    def reload(self):
        """SIGHUP: a valid configuration replaces channels and detection
        settings (counters kept); an invalid one is reported and the agent
        goes on with the one it has."""
        self.reload_requested = False
        self.notifier.notify("RELOADING=1", "MONOTONIC_USEC=%d"
                             % monotonic_usec(),
                             "STATUS=Reloading the configuration")
        try:
            config = self._restart_only_kept(load_config(self.config_path))
            channels = build_channels(config, self.json_output)
            for channel in channels:
                channel.sink.open()  # a TLS context that cannot load: now
        except (ConfigError, OSError, ssl.SSLError) as error:
            self._reload_failed(getattr(error, "problems", None) or [
                "cannot open a channel: %s" % error])
        else:
            self._apply(config, channels)
        self.update_status("READY=1")

    def _reload_failed(self, problems):
        now_s = self.clock()
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

    def _restart_only_kept(self, config):
        """The new configuration with the keys that only a restart can
        change (where state and spools live, what to run) kept as they
        are."""
        for key in ("state_dir", "log_dir", "first_start", "journalctl",
                    "audit"):
            if getattr(config, key) != getattr(self.config, key):
                say("warning", "%s changed: takes effect at the next start"
                    % key)
                config = config._replace(**{key: getattr(self.config, key)})
        if config.detection.tty_audit != self.config.detection.tty_audit:
            say("warning", "tty_audit changed: takes effect at the next "
                "start")
            config = config._replace(detection=config.detection._replace(
                tty_audit=self.config.detection.tty_audit))
        return config

    def _apply(self, config, channels):
        held = self.close_channels(reloading=True)
        self.pipeline.forget_failures()
        self.channels.replace(channels, held, self.impair)
        self.pipeline.reconfigure(self.config, config, self.clock())
        self.config = config
        self.health.reloads["ok"] += 1
        self.health.reload_problem = None
        say("info", "configuration reloaded from %s (%d channel%s)" % (
            config.path, len(channels), "" if len(channels) == 1 else "s"))
        self.check_channels()

    # -- running --------------------------------------------------------------

    def follow_lines(self, lines, now):
        produced = 0
        for line in lines:
            entry = self.pipeline.decode(line)
            if entry is None:
                continue
            cursor = journal_text(entry.get("__CURSOR"))
            if cursor is not None and cursor in (self.source.skip_cursor,
                                                 self.source.cursor):
                # the last entry before a refused cursor, again, or the one
                # handled last given back (a journalctl that is not right)
                continue
            produced += self.pipeline.process_entry(entry, self.clock())
            if cursor is not None and valid_cursor(cursor):
                self.source.advance(cursor, _entry_timestamp(entry))
                self.unsaved = True
        if produced:
            self.pipeline.flush()
            # Saved as soon as the batch is out (spooled alerts are on disk
            # by now), so a restart after a crash does not report it again;
            # fsync follows within STATE_FLUSH_S.
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
        self.open_audit_log()
        self.open_channels()
        self.pipeline.open(self.clock())
        # The held lines restored wait on from where the journal was left,
        # not from today: the rest of their attempts may be in the backlog.
        self.pipeline.resume_journal_time(self.source.last_realtime_us,
                                          self.clock())
        now = self.monotonic()
        self.source.start(now)
        self.save(now)  # the start position, should it stop before any entry
        say("info", "pamsignal %s following the journal (%s)" % (
            __version__, "resuming after the saved cursor"
            if self.source.cursor else "first start: %s"
            % self.config.first_start))
        addresses = host_addresses()
        say("info", "this host: %s; addresses %s" % (
            self.pipeline.host_provider() or "provider unknown",
            ", ".join(addresses[:16]) or "unknown"))
        self.update_status("READY=1")
        # Wake up often enough to ping the watchdog in time.
        wait_s = min(1.0, self.notifier.watchdog_s or 1.0)
        try:
            while not self.stopping:
                self.notifier.ping(now)
                lines = self.source.read(wait_s)
                now = self.monotonic()
                self.pipeline.journal_followed(
                    self.source.process is not None, self.clock())
                self.follow_lines(lines, now)
                if self.pipeline.tick(self.clock()):
                    self.unsaved = True
                self.pipeline.flush()
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
                self.check_audit_log()
                self.check_databases(self.clock())
                self.check_login_records(now)
                if self.last_metrics is None or \
                        now - self.last_metrics >= METRICS_FLUSH_S:
                    self.write_metrics(now)
                    self.update_status()
        finally:
            self.notifier.notify("STOPPING=1", "STATUS=Stopping")
            now = self.monotonic()
            self.pipeline.drain()
            self.pipeline.flush()
            if self.unsaved:
                self.save(now)
            self.save_detection(now)
            self.source.stop()
            self.write_metrics(now, running=False)
            self.close_channels()
            self.pipeline.close()
        say("info", "stopped after %d entries, %d events"
            % (self.pipeline.entries, self.pipeline.events))
        return EXIT_OK


# ---------------------------------------------------------------------------
# 14b report
# ---------------------------------------------------------------------------
# `pamsignal report`: what happened over a range, from the same Pipeline
# as `run` (so a report and the live alerts never disagree). The Pipeline's
# events go to a ReportBuilder (pure: events in, one JSON-ready document
# out; sessions and counters are kept, never entries, each bounded); the
# renderers turn that document into text; command_report (15) does the I/O.

#: The most sessions a report lists: the latest are kept, earlier counted.
MAX_REPORT_SESSIONS = 5000

#: The most distinct sources, accounts or privileged users a report counts
#: one by one; failures and commands past it are counted as "more".
MAX_REPORT_KEYS = 1000

#: The most distinct commands kept per user, and names kept per group.
MAX_REPORT_NAMES = 50

#: The most detections a report lists (the latest kept).
MAX_REPORT_DETECTIONS = 1000

#: What a report highlights among the failures.
REPORT_DETECTIONS = frozenset((
    "brute_force_detected", "success_after_failures", "spoofed_entry",
    "new_source", "new_sudo_user", "journal_suppressed",
    "unaccounted_session"))

#: PAM services whose sessions are privilege use (reported with the sudo
#: commands; doas's, pkexec's and run0's commands count as sudo's), not
#: logins.
SUDO_PAM_SERVICES = frozenset(("sudo", "sudo-i", "doas", "polkit-1",
                               "systemd-run0"))

#: `--since` / `--until` words journalctl also knows, as days from today.
_DAY_WORDS = {"today": 0, "yesterday": -1, "tomorrow": 1}

_WHEN_RELATIVE = re.compile(r"^([-+])?(\d{1,9})([smhd])(?: ago)?\Z")
_WHEN_ABSOLUTE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)(?:[ T](\d\d):(\d\d)(?::(\d\d))?)?\Z")


#: The latest time a --since/--until may name, 9999-12-31 23:59:59 UTC:
#: journalctl refuses years past 9999 and times before 1970.
LATEST_WHEN_S = 253402300799


def parse_when(text, now_s, localtime=time.localtime, mktime=time.mktime,
               option="--since"):
    """A --since/--until value -> microseconds since the epoch.

    The forms journalctl reads the same way (local time): now, today,
    yesterday, tomorrow, YYYY-MM-DD[ HH:MM[:SS]], @EPOCH, -2h, 2h ago.
    A date that does not exist (2025-02-31) or a time outside 1970..9999
    is a UsageError naming `option`, never an argument journalctl refuses."""
    text = text.strip()
    seconds = _when_seconds(text, now_s, localtime, mktime, option)
    if not 0 <= seconds <= LATEST_WHEN_S:
        raise UsageError("%s %s lies outside the times a journal can hold"
                         " (1970-01-01 to 9999-12-31 UTC)" % (option, text))
    return int(seconds * 1e6)


def _when_seconds(text, now_s, localtime, mktime, option):
    if text == "now":
        return now_s
    if text in _DAY_WORDS:
        day = localtime(now_s)
        return mktime((day.tm_year, day.tm_mon, day.tm_mday
                       + _DAY_WORDS[text], 0, 0, 0, 0, 0, -1))
    if re.match(r"^@\d{1,12}\Z", text):
        return int(text[1:])
    relative = _WHEN_RELATIVE.match(text)
    if relative and (relative.group(1) or text.endswith(" ago")):
        seconds = int(relative.group(2)) * \
            _SECONDS_PER_UNIT[relative.group(3)]
        sign = 1 if relative.group(1) == "+" else -1
        return now_s + sign * seconds
    absolute = _WHEN_ABSOLUTE.match(text)
    if absolute:
        parts = [int(part or 0) for part in absolute.groups()]
        if 1 <= parts[1] <= 12 and 1 <= parts[2] <= 31 and parts[3] < 24 \
                and parts[4] < 60 and parts[5] < 60:
            try:
                seconds = mktime(tuple(parts) + (0, 0, -1))
                day = localtime(seconds)
            except (OverflowError, ValueError, OSError):
                seconds = day = None  # far outside what time_t holds
            if day is not None and (day.tm_year, day.tm_mon,
                                    day.tm_mday) != tuple(parts[:3]):
                raise UsageError("%s %s: there is no such day"
                                 % (option, text))
            if seconds is not None:
                return seconds
            raise UsageError("%s %s lies outside the times a journal can"
                             " hold (1970-01-01 to 9999-12-31 UTC)"
                             % (option, text))
    raise UsageError("%s: cannot read the time %r: use YYYY-MM-DD"
                     " [HH:MM[:SS]], today, yesterday, now, @EPOCH or -2h /"
                     " 2h ago" % (option, text))


def boot_of(event):
    """The boot an event happened in (its context key starts with it)."""
    return event.context_key.split("/", 1)[0] if event.context_key else None


def _source_text(event):
    return event.source_ip or event.source_domain


def _event_names(event, user):
    """Whether the event is about account `user` (acting or becoming)."""
    return user in (event.user, event.target_user) or \
        user in (event.users_tried or ())


def _event_from(event, source):
    return source in (event.source_ip, event.source_domain) or \
        source in (event.sources or ())


def _session_record(event, login):
    """A session as the report shows it, from its open (or its close when
    the open lies before the range) and the login that started it."""
    origin = login or event
    record = {"user": event.user, "target_user": event.target_user,
              "service": event.service, "tty": event.tty or origin.tty,
              "source": _source_text(origin),
              "source_port": origin.source_port,
              "as_number": origin.source_as_number,
              "as_org": origin.source_as_org,
              "country": origin.source_country,
              "method": origin.auth_method, "key": origin.key,
              "hostname": event.hostname}
    return {name: value for name, value in record.items()
            if value is not None and value != ""}


class _Tally:
    """Counts of one group (a source, an account, a user's commands):
    count, first and last time, and a bounded set of names with it."""

    def __init__(self):
        self.count = 0
        self.first_us = self.last_us = None
        self.names = collections.Counter()
        self.names_more = 0
        self.reasons = collections.Counter()
        self.detected = set()  # actions of the detections about it
        self.targets = set()  # accounts become (sudo, su)

    def add(self, timestamp_us, name=None, reason=None, target=None):
        self.count += 1
        self.first_us = timestamp_us if self.first_us is None \
            else min(self.first_us, timestamp_us)
        self.last_us = timestamp_us if self.last_us is None \
            else max(self.last_us, timestamp_us)
        if reason:
            self.reasons[reason] += 1
        if target and len(self.targets) < MAX_REPORT_NAMES:
            self.targets.add(target)
        if name is None:
            return
        if name in self.names or len(self.names) < MAX_REPORT_NAMES:
            self.names[name] += 1
        else:
            self.names_more += 1


class _Groups:
    """Tallies by key, at most MAX_REPORT_KEYS of them; what falls past is
    counted in `more`."""

    def __init__(self, limit=MAX_REPORT_KEYS):
        self.tallies = {}
        self.limit = limit
        self.more = 0

    def tally(self, key):
        """The key's tally, or None when the table is full."""
        if key not in self.tallies:
            if len(self.tallies) >= self.limit:
                self.more += 1
                return None
            self.tallies[key] = _Tally()
        return self.tallies[key]


class ReportBuilder:
    """Events (from the Pipeline) in, the report document out.

    Sessions are paired by context key: a close whose open lies before the
    range is kept as "started before the range", an open still open at the
    end is "open", or "ended_by_reboot" once another boot has begun. A
    login (sshd's "Accepted ...") gives its session source, method and key.
    """

    def __init__(self, user=None, source=None):
        self.user = user
        self.source = source
        self.logins = BoundedTable(MAX_OPEN_SESSIONS)  # boot/pid -> event
        self.open_sessions = BoundedTable(MAX_OPEN_SESSIONS)
        # sudo's sessions, listed only when something was typed in them
        self.sudo_opens = BoundedTable(MAX_OPEN_SESSIONS)
        self.sessions = collections.deque(maxlen=MAX_REPORT_SESSIONS)
        self.sessions_seen = 0
        self.failures = 0
        self.by_source = _Groups()
        self.by_account = _Groups()
        self.per_hour = collections.Counter()  # hour since epoch -> count
        self.privileged = _Groups()
        self.detections = collections.deque(maxlen=MAX_REPORT_DETECTIONS)
        self.detections_seen = 0
        self.boot = None
        self.first_us = self.last_us = None

    def add(self, event):
        """Take one event the Pipeline sent."""
        if event.action in AGENT_ACTIONS:
            return
        self._new_boot(boot_of(event))
        self.first_us = event.timestamp_us if self.first_us is None \
            else self.first_us
        self.last_us = event.timestamp_us
        if event.action == "login_success" and event.context_key:
            self.logins.put(event.context_key.rsplit("/", 1)[0], event)
        elif event.action == "session_opened" and event.user is None:
            event = self._acting_user(event)
        if event.session_id is not None:
            pass  # logind repeats the PAM session
        elif event.service in SUDO_PAM_SERVICES:
            self._sudo_session(event)  # a command, unless typed into
        elif event.action == "session_opened" and event.context_key:
            self._opened(event)
        elif event.action == "session_closed":
            self._closed(event)
        if event.action == "session_opened" and event.service in (
                "su", "su-l") and self._shown(event):
            self._privileged(event, "su", None)
        elif event.action == "sudo_command" and self._shown(event):
            self._privileged(event, "sudo", event.command_line)
        elif event.action == "login_failure" and self._shown(event):
            self._failure(event)
        elif event.action in REPORT_DETECTIONS and self._shown(event):
            self.detections_seen += 1
            self.detections.append(event_to_ecs(event))
            self._mark_failures(event)

    def _sudo_session(self, event):
        """A sudo session is a row only when TTY audit recorded typing in
        it (a root shell); it is named after the sudo command's user."""
        if not event.context_key:
            return
        if event.action == "sudo_command":
            self.sudo_opens.put(event.context_key, event)
        elif event.action == "session_opened":
            command = self.sudo_opens.pop(event.context_key, None)
            self.sudo_opens.put(event.context_key, event._replace(
                user=event.user or (command and command.user)))
        elif event.action == "session_closed":
            opened = self.sudo_opens.pop(event.context_key, None)
            if not (event.typed_lines or event.typed_more):
                return
            if opened is not None and opened.action == "session_opened":
                self._opened(opened)
            self._closed(event._replace(user=event.user or (
                opened and opened.user)))

    def _mark_failures(self, event):
        """Flag the failure rows a brute force or a success after
        failures is about."""
        for groups, key in ((self.by_source, _source_text(event)),
                            (self.by_account, event.user)):
            tally = groups.tallies.get(key)
            if tally is not None and event.action in (
                    "brute_force_detected", "success_after_failures"):
                tally.detected.add(event.action)

    def _acting_user(self, event):
        """su's session line may name the caller by uid only; its login
        line ("(to root) alice on pts/0") names them."""
        login = self.logins.get((event.context_key or "").rsplit("/", 1)[0])
        return event if login is None or not login.user else \
            event._replace(user=login.user)

    def _shown(self, event):
        """Whether --user and --source let the event into the report."""
        return (self.user is None or _event_names(event, self.user)) and \
            (self.source is None or _event_from(event, self.source))

    def _new_boot(self, boot):
        """A new boot ends the sessions the old one left open."""
        if not boot or boot == self.boot:
            return
        if self.boot is not None:
            for key in [key for key in self.open_sessions
                        if not key.startswith(boot + "/")]:
                self._finish(self.open_sessions.pop(key), "ended_by_reboot")
        self.boot = boot

    def _opened(self, event):
        login = self.logins.pop(event.context_key.rsplit("/", 1)[0], None)
        record = _session_record(event, login)
        record["start_us"] = event.timestamp_us
        self.open_sessions.put(event.context_key, (event, record))

    def _closed(self, event):
        opened = self.open_sessions.pop(event.context_key, None) \
            if event.context_key else None
        if opened is None:
            record = _session_record(event, None)
            record["started_before_range"] = True
            opened = (event, record)
        opened[1]["end_us"] = event.timestamp_us
        if event.session_duration_s is not None:
            opened[1]["duration_s"] = event.session_duration_s
        if event.typed_lines or event.typed_more:
            opened[1]["typed"] = list(event.typed_lines or ())
            opened[1]["typed_more"] = event.typed_more
        self._finish(opened, "closed")

    def _finish(self, opened, state):
        event, record = opened
        record["state"] = state
        if self._shown(event._replace(source_ip=record.get("source"))):
            self.sessions_seen += 1
            self.sessions.append(record)

    def _failure(self, event):
        self.failures += 1
        self.per_hour[event.timestamp_us // 3600000000] += 1
        source = _source_text(event) or "(local)"
        for groups, key, name in ((self.by_source, source, event.user),
                                  (self.by_account, event.user or "(none)",
                                   source)):
            tally = groups.tally(key)
            if tally is not None:
                tally.add(event.timestamp_us, name, event.reason)

    def _privileged(self, event, kind, command):
        tally = self.privileged.tally(event.user or "(uid %s)" % (
            event.user_id or "?"))
        if tally is None:
            return
        tally.add(event.timestamp_us, command, kind, event.target_user)

    def document(self, since_us=None, until_us=None, entries=0):
        """The report as one JSON-ready object (times RFC 3339 UTC)."""
        sessions = list(self.sessions) + [
            dict(record, state="open") for event, record in
            self.open_sessions.values() if self._shown(
                event._replace(source_ip=record.get("source")))]
        return _without_none({
            "report": {"since": since_us, "until": until_us,
                       "first_event": self.first_us,
                       "last_event": self.last_us, "entries": entries,
                       "user": self.user, "source": self.source},
            "sessions": [_timed(record) for record in sorted(
                sessions, key=lambda record: record.get("start_us", -1))],
            "sessions_more": self.sessions_seen - len(self.sessions),
            "failures": {
                "total": self.failures,
                "by_source": _tally_rows(self.by_source, "source", "users"),
                "by_source_more": self.by_source.more,
                "by_account": _tally_rows(self.by_account, "user",
                                          "sources"),
                "by_account_more": self.by_account.more,
                "per_hour": [{"hour": hour * 3600000000, "count": count}
                             for hour, count in sorted(
                                 self.per_hour.items())]},
            "detections": list(self.detections),
            "detections_more": self.detections_seen - len(self.detections),
            "privileged": _privileged_rows(self.privileged),
            "privileged_more": self.privileged.more})


#: Keys of the document that hold microseconds, written as RFC 3339.
_TIME_KEYS = frozenset(("since", "until", "first_event", "last_event",
                        "start", "end", "first", "last", "hour"))


def _timed(record):
    """`start_us` -> `start` (RFC 3339) and so on."""
    return {(key[:-3] if key.endswith("_us") else key): value
            for key, value in record.items()}


def _without_none(value):
    """The document with no nulls (like the event contract), times as
    RFC 3339."""
    if isinstance(value, dict):
        return {key: (format_timestamp(item) if key in _TIME_KEYS
                      else _without_none(item))
                for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def _ranked(counter):
    """Most first, then by name: the same input gives the same order."""
    return sorted(counter.items(), key=lambda item: (-item[1], item[0]))


def _tally_rows(groups, key_name, names_name):
    rows = []
    for key, tally in _ranked({key: tally.count for key, tally in
                               groups.tallies.items()}):
        tally = groups.tallies[key]
        rows.append({key_name: key, "count": tally.count,
                     "first": tally.first_us, "last": tally.last_us,
                     "reasons": dict(tally.reasons),
                     "detected": sorted(tally.detected),
                     names_name: [name for name, _ in _ranked(tally.names)],
                     names_name + "_more": tally.names_more})
    return rows


def _privileged_rows(groups):
    rows = []
    for user, tally in sorted(groups.tallies.items()):
        rows.append({"user": user, "sudo": tally.reasons["sudo"],
                     "su": tally.reasons["su"],
                     "targets": sorted(tally.targets),
                     "first": tally.first_us, "last": tally.last_us,
                     "commands": [{"command": command, "count": count}
                                  for command, count in _ranked(tally.names)],
                     "commands_more": tally.names_more})
    return rows


class PassGate:
    """A channel gate that lets every event through at once: a report
    counts everything, whatever the alert policy."""

    def admit(self, event, now_us):
        return [event]

    def due(self, now_us):
        return []

    def drain(self):
        return []


class ReportSink(Sink):
    """The Pipeline's channel for a report: each event to the builder."""

    def __init__(self, builder):
        Sink.__init__(self, "report")
        self.builder = builder

    def send(self, event, delay_s=0):
        self.builder.add(event)


# Rendering: the document as text for a terminal or a file.

#: The widest bar of the failures chart, and its mark.
CHART_WIDTH = 50
CHART_MARK = "#"

#: The most rows the chart shows; longer ranges put more hours in a row.
CHART_ROWS = 48


def column_widths(headers, rows, width, fixed=()):
    """Each column's width so the table fits `width` (columns two spaces
    apart): the widest columns not in `fixed` give way first, down to 4;
    then the fixed ones (times, counts) if it must be."""
    widths = [max([len(header)] + [len(row[index]) for row in rows])
              for index, header in enumerate(headers)]
    columns = range(len(widths))
    for shrinking in ([index for index in columns if index not in fixed],
                      columns):
        while sum(widths) + 2 * (len(widths) - 1) > width:
            candidates = [(widths[index], index) for index in shrinking
                          if widths[index] > 4]
            if not candidates:
                break
            widths[max(candidates)[1]] -= 1
    return widths


def render_table(headers, rows, width, fixed=()):
    """An aligned table in `width` columns; values made safe to print,
    long ones cut with an ellipsis, columns empty in every row left out.
    Rows are tuples of strings; `fixed` names the columns that give way
    last."""
    rows = [[_shown(value) for value in row] for row in rows]
    kept = [index for index in range(len(headers))
            if any(row[index] for row in rows)]
    headers = [headers[index] for index in kept]
    rows = [[row[index] for index in kept] for row in rows]
    fixed = [kept.index(index) for index in fixed if index in kept]
    widths = column_widths(headers, rows, width, fixed)
    lines = []
    for row in [headers] + rows:
        cells = [shorten(value, size).ljust(size)
                 for value, size in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


#: How times read in a report: the year is left out on a narrow terminal.
REPORT_TIME_FORMAT = "%Y-%m-%d %H:%M"
NARROW_TIME_FORMAT = "%m-%d %H:%M"

#: Narrower than this, a report uses NARROW_TIME_FORMAT.
NARROW_COLUMNS = 120


def _local_time(text, time_format=REPORT_TIME_FORMAT):
    """RFC 3339 UTC -> local time (like `last`); "?" when unknown."""
    if not text:
        return "?"
    seconds = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    return time.strftime(time_format, time.localtime(seconds))


#: How a session's end reads when it has none.
_SESSION_STATES = {"open": "still open", "ended_by_reboot": "reboot/crash"}


def _as_network_text(session):
    if session.get("as_number") is None:
        return session.get("as_org", "")
    return ("AS%d %s" % (session["as_number"],
                         session.get("as_org", ""))).strip()


def _session_row(session, time_format):
    who = session.get("user", "?")
    if session.get("target_user"):
        who = "%s>%s" % (who, session["target_user"])
    method = " ".join(part for part in (session.get("method"),
                                        session.get("key")) if part)
    start = _local_time(session["start"], time_format) \
        if "start" in session else "before range"
    end = _local_time(session["end"], time_format) if "end" in session \
        else _SESSION_STATES.get(session["state"], session["state"])
    duration = _duration_text(session["duration_s"]) \
        if "duration_s" in session else ""
    return (who, session.get("service", ""),
            session.get("source") or session.get("tty", ""),
            _as_network_text(session), session.get("country", ""), method,
            start, end, duration)


def chart_rows(per_hour):
    """(hours per row, [(first hour since the epoch, failures)]): one row
    per hour, or per few hours so a long range has at most CHART_ROWS."""
    hours = {calendar.timegm(time.strptime(row["hour"][:19],
                                           "%Y-%m-%dT%H:%M:%S")) // 3600:
             row["count"] for row in per_hour}
    first, last = min(hours), max(hours)
    step = -(-(last - first + 1) // CHART_ROWS)  # hours per row, rounded up
    # Each hour into its row: the work follows the rows, not the span (a
    # failure in 1970 and one in 9999 are 70 million hours apart).
    counts = [0] * (-(-(last - first + 1) // step))
    for hour, count in hours.items():
        counts[(hour - first) // step] += count
    return step, [(first + row * step, count)
                  for row, count in enumerate(counts)]


#: How a chart row is labelled (local time).
CHART_LABEL_FORMAT = "%Y-%m-%d %H:00"


def failures_chart(per_hour, width):
    """The failures per hour as text bars: one row per hour (or per few
    hours when the range is long), the count at the end."""
    if not per_hour:
        return []
    step, rows = chart_rows(per_hour)
    label = CHART_LABEL_FORMAT
    most = max(count for _, count in rows)
    bar_room = max(1, min(CHART_WIDTH, width - 16 - 2 - len(str(most)) - 1))
    lines = ["Failures per %s" % ("hour" if step == 1 else "%d hours" % step)]
    for start, count in rows:
        bar = CHART_MARK * (-(-count * bar_room // most))
        lines.append("%s  %s %d" % (time.strftime(label, time.localtime(
            start * 3600)), bar, count) if count else
            "%s  %d" % (time.strftime(label, time.localtime(start * 3600)),
                        count))
    return lines


def _more_line(count, what):
    return ["... and %d more %s" % (count, what)] if count else []


def report_range_text(head):
    """"2026-12-05 00:00 to 2026-12-06 00:00 (UTC)", in local time."""
    return "%s to %s (%s)" % (
        _local_time(head.get("since") or head.get("first_event")),
        _local_time(head.get("until") or head.get("last_event")),
        time.strftime("%Z"))


def render_report(document, width):
    """The report as lines of text for `width` columns."""
    time_format = REPORT_TIME_FORMAT if width >= NARROW_COLUMNS \
        else NARROW_TIME_FORMAT
    head = document["report"]
    lines = ["PAMSignal report: " + report_range_text(head),
             "%d journal entries read" % head.get("entries", 0)]
    lines += ["only %s %s" % (name, escape_text(head[name]))
              for name in ("user", "source") if name in head]
    lines += _sessions_part(document, width, time_format)
    lines += _failures_part(document["failures"], width, time_format)
    detections = document["detections"]
    lines += ["", "Detections (%d)" % (len(detections) +
                                       document["detections_more"])]
    lines += ["%s  %s" % (_local_time(ecs["@timestamp"], time_format),
                          event_text(_event_of_ecs(ecs)))
              for ecs in detections] or ["  none"]
    lines += _more_line(document["detections_more"], "earlier detections")
    lines += _privileged_part(document)
    return [shorten(line, width) for line in lines]


#: The columns of the sessions table.
SESSION_HEADERS = ("USER", "SERVICE", "FROM", "NETWORK", "CC", "METHOD",
                   "START", "END", "DURATION")


def _sessions_part(document, width, time_format):
    sessions = document["sessions"]
    lines = ["", "Sessions (%d)" % (len(sessions) +
                                    document["sessions_more"])]
    lines += render_table(SESSION_HEADERS,
                          [_session_row(session, time_format)
                           for session in sessions],
                          width, fixed=(0, 2, 6, 7, 8)) if sessions \
        else ["  none"]
    return lines + _more_line(document["sessions_more"],
                              "earlier sessions") + _typed_part(
                                  sessions, time_format)


def _typed_part(sessions, time_format):
    """What was typed in each session that has TTY audit records."""
    typed = [session for session in sessions
             if session.get("typed") or session.get("typed_more")]
    lines = ["", "Typed in sessions (%d)" % len(typed)] if typed else []
    for session in typed:
        who, service, source, _, _, _, start, _, _ = _session_row(
            session, time_format)
        lines.append(escape_text("  ".join(
            part for part in (who, service, source, start) if part)))
        lines += ["  " + escape_text(line) for line in session["typed"]]
        lines += ["  " + more for more in _more_line(
            session.get("typed_more"), "lines")]
    return lines


#: How a failure row names the detections about it.
_DETECTED_WORDS = {"brute_force_detected": "brute force",
                   "success_after_failures": "then logged in"}


#: The two failure tables: (row key, document group, names column).
FAILURE_TABLES = (("source", "by_source", "users"),
                  ("user", "by_account", "sources"))


def failure_rows(failures, key, group, names, time_format):
    """One failures table as rows of text cells."""
    return [(row[key], str(row["count"]),
             _local_time(row["first"], time_format),
             _local_time(row["last"], time_format),
             ", ".join(_DETECTED_WORDS[action]
                       for action in row["detected"]),
             ", ".join(row[names]) + (" +%d" % row[names + "_more"]
                                      if row[names + "_more"] else ""))
            for row in failures[group]]


def _failures_part(failures, width, time_format):
    lines = ["", "Failures (%d)" % failures["total"]]
    for key, group, names in FAILURE_TABLES:
        rows = failure_rows(failures, key, group, names, time_format)
        if rows:
            lines += [""] + render_table(
                (key.upper(), "COUNT", "FIRST", "LAST", "DETECTED",
                 names.upper()), rows, width, fixed=(0, 1, 2, 3, 4))
        lines += _more_line(failures[group + "_more"],
                            "failures from further %ss" % key)
    chart = failures_chart(failures["per_hour"], width)
    return lines + ([""] + chart if chart else [])


def _privileged_part(document):
    privileged = document["privileged"]
    lines = ["", "sudo and su, by user (%d)" % len(privileged)]
    for row in privileged:
        lines.append("%s: sudo %d, su %d, as %s" % (
            escape_text(row["user"]), row["sudo"], row["su"],
            escape_text(", ".join(row["targets"])) or "?"))
        lines += ["  %5d  %s" % (item["count"], escape_text(item["command"]))
                  for item in row["commands"]]
        lines += _more_line(row["commands_more"], "commands")
    lines += _more_line(document["privileged_more"], "uses by further users")
    return lines if privileged else lines + ["  none"]


def _event_of_ecs(ecs):
    """An ECS object back to an Event, for its one-line text."""
    flat = {}
    for path, field in _ECS_LAYOUT:
        node = ecs
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            flat[field] = tuple(node) if isinstance(node, list) else node
    return Event(action=ecs["event"]["action"], timestamp_us=0, **flat)


# Colour, on a terminal only (https://no-color.org: NO_COLOR set and not
# empty turns it off). Whole lines are painted after they are cut to the
# width, so escapes never count against it.

#: SGR sequences: section headings bold, detections red, table heads dim.
COLOUR_HEADING, COLOUR_DETECTION, COLOUR_TABLE_HEAD, COLOUR_OFF = \
    "\033[1m", "\033[31m", "\033[2m", "\033[0m"

_REPORT_HEADING = re.compile(
    r"^(PAMSignal report: |(Sessions|Failures|Detections|sudo and su, by "
    r"user) \(\d+\)$|Failures per )")
_TABLE_HEAD = re.compile(r"^(USER|SOURCE) {2,}")


def wants_colour(stream, environ):
    """Colour only on a terminal, and never with NO_COLOR set."""
    return not environ.get("NO_COLOR") and stream.isatty()


def paint_report(lines):
    """The text report's lines with headings, table heads and detections
    coloured."""
    painted, in_detections = [], False
    for line in lines:
        colour = None
        if _REPORT_HEADING.match(line):
            colour = COLOUR_HEADING
            in_detections = line.startswith("Detections (")
        elif _TABLE_HEAD.match(line):
            colour = COLOUR_TABLE_HEAD
        elif in_detections and line and not line.startswith(("  none",
                                                              "... ")):
            colour = COLOUR_DETECTION
        elif not line:
            in_detections = False
        painted.append(colour + line + COLOUR_OFF if colour else line)
    return painted


class Progress:
    """Entries read and the rate, on a terminal's stderr only, at most
    once a second; cleared at the end."""

    def __init__(self, stream, clock=time.monotonic):
        self.stream = stream if stream is not None and stream.isatty() \
            else None
        self.clock = clock
        self.started = self.shown = clock()

    def update(self, entries):
        if self.stream is None or entries % 1024:
            return
        now = self.clock()
        if now - self.shown >= 1:
            self.shown = now
            self.stream.write("\rread %d entries (%d/s)  " % (
                entries, entries / max(now - self.started, 1e-6)))
            self.stream.flush()

    def done(self):
        if self.stream is not None and self.shown != self.started:
            self.stream.write("\r\033[K")
            self.stream.flush()


# ---------------------------------------------------------------------------
# 14c the report as an HTML page
# ---------------------------------------------------------------------------
# `report --html FILE`: the text report's content as one self-contained
# page: inline CSS, the chart as inline SVG, no script and nothing fetched
# (its Content-Security-Policy forbids both). Every value is attacker text
# until escaped: user names, commands and log lines go through html_text.

#: The page's policy: nothing loads, nothing runs; only its own styles.
HTML_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"

HTML_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2329}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
th,td{padding:.2em .7em;text-align:left;border-bottom:1px solid #dde}
th{background:#f2f4f7}td{font-family:ui-monospace,monospace}
.note{color:#5a6570}.bar{fill:#c0392b}svg text{font:11px sans-serif}
"""

#: The chart's size in SVG units: a label column, then the bars.
SVG_LABEL_WIDTH, SVG_BAR_WIDTH, SVG_ROW_HEIGHT = 120, 400, 16


def html_text(value):
    """Text for HTML content or a quoted attribute: control characters
    escaped as in the text report, then &, <, >, " and '."""
    return escape_html(escape_text(str(value))).replace(
        '"', "&quot;").replace("'", "&#39;")


def html_table(kind, headers, rows):
    """A table (class `kind`) of text cells; columns empty in every row
    are left out, as in the text report."""
    kept = [index for index in range(len(headers))
            if any(row[index] for row in rows)]
    head = "".join("<th>%s</th>" % html_text(headers[index])
                   for index in kept)
    body = "".join("<tr>%s</tr>" % "".join(
        "<td>%s</td>" % html_text(row[index]) for index in kept)
        for row in rows)
    return '<table class="%s"><tr>%s</tr>%s</table>' % (kind, head, body)


def failures_svg(per_hour):
    """The failures per hour as an inline SVG bar chart (or "")."""
    if not per_hour:
        return ""
    step, rows = chart_rows(per_hour)
    most = max(count for _, count in rows)
    height = SVG_ROW_HEIGHT * len(rows)
    parts = []
    for index, (start, count) in enumerate(rows):
        y = index * SVG_ROW_HEIGHT
        width = count * SVG_BAR_WIDTH // most
        parts.append(
            '<text x="0" y="%d">%s</text><rect class="bar" x="%d" y="%d" '
            'width="%d" height="%d"/><text x="%d" y="%d">%d</text>' % (
                y + 12, html_text(time.strftime(
                    CHART_LABEL_FORMAT, time.localtime(start * 3600))),
                SVG_LABEL_WIDTH, y + 2, width, SVG_ROW_HEIGHT - 4,
                SVG_LABEL_WIDTH + width + 4, y + 12, count))
    return ('<h3>Failures per %s</h3><svg xmlns="http://www.w3.org/2000/svg"'
            ' role="img" width="%d" height="%d" viewBox="0 0 %d %d">%s</svg>'
            % ("hour" if step == 1 else "%d hours" % step,
               SVG_LABEL_WIDTH + SVG_BAR_WIDTH + 60, height,
               SVG_LABEL_WIDTH + SVG_BAR_WIDTH + 60, height, "".join(parts)))


def _html_more(count, what):
    return "".join('<p class="note">%s</p>' % html_text(line)
                   for line in _more_line(count, what))


def render_report_html(document):
    """The report as one HTML page (str)."""
    head = document["report"]
    title = "PAMSignal report: " + report_range_text(head)
    parts = ["<h1>%s</h1>" % html_text(title),
             '<p class="note">%d journal entries read%s</p>' % (
                 head.get("entries", 0), "".join(
                     ", only %s %s" % (name, html_text(head[name]))
                     for name in ("user", "source") if name in head))]
    sessions = document["sessions"]
    parts.append("<h2>Sessions (%d)</h2>" % (len(sessions) +
                                              document["sessions_more"]))
    parts.append(html_table("sessions", SESSION_HEADERS, [
        _session_row(session, REPORT_TIME_FORMAT) for session in sessions])
        if sessions else '<p class="note">none</p>')
    parts.append(_html_more(document["sessions_more"], "earlier sessions"))
    failures = document["failures"]
    parts.append("<h2>Failures (%d)</h2>" % failures["total"])
    for key, group, names in FAILURE_TABLES:
        rows = failure_rows(failures, key, group, names, REPORT_TIME_FORMAT)
        if rows:
            parts.append(html_table(group, (key.upper(), "COUNT", "FIRST",
                                            "LAST", "DETECTED",
                                            names.upper()), rows))
        parts.append(_html_more(failures[group + "_more"],
                                "failures from further %ss" % key))
    parts.append(failures_svg(failures["per_hour"]))
    detections = document["detections"]
    parts.append("<h2>Detections (%d)</h2>" % (
        len(detections) + document["detections_more"]))
    parts.append("<ul>%s</ul>" % "".join("<li><code>%s  %s</code></li>" % (
        html_text(_local_time(ecs["@timestamp"])),
        html_text(event_text(_event_of_ecs(ecs)))) for ecs in detections)
        if detections else '<p class="note">none</p>')
    parts.append(_html_more(document["detections_more"],
                            "earlier detections"))
    parts.append(_privileged_html(document))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta http-equiv="Content-Security-Policy" content="%s">'
            "<title>%s</title><style>%s</style></head><body>\n%s\n"
            "</body></html>\n" % (HTML_CSP, html_text(title), HTML_STYLE,
                                   "\n".join(part for part in parts
                                             if part)))


def _privileged_html(document):
    privileged = document["privileged"]
    parts = ["<h2>sudo and su, by user (%d)</h2>" % len(privileged)]
    for row in privileged:
        parts.append("<h3>%s: sudo %d, su %d, as %s</h3>" % (
            html_text(row["user"]), row["sudo"], row["su"],
            html_text(", ".join(row["targets"]) or "?")))
        if row["commands"]:
            parts.append(html_table("commands", ("COUNT", "COMMAND"), [
                (str(item["count"]), item["command"])
                for item in row["commands"]]))
        parts.append(_html_more(row["commands_more"], "commands"))
    parts.append(_html_more(document["privileged_more"],
                            "uses by further users"))
    return "".join(parts) if privileged else \
        parts[0] + '<p class="note">none</p>'


def write_report_html(path, document):
    """Write the page to `path` (replaced atomically, mode 0644: a report
    is meant to be read)."""
    try:
        replace_file(path, render_report_html(document), mode=0o644)
    except OSError as error:
        raise PamSignalError("cannot write %s: %s" % (
            path, io_error_text(error))) from None


# ---------------------------------------------------------------------------
# 14d sending a report
# ---------------------------------------------------------------------------
# `report --send CHANNEL`: the report's text as one `report_summary` event
# (no policy: it is asked for, never filtered, held back or folded), put
# in a spool of the channel's own under state_dir/report-spool (the
# running service never reads it, so the two never send one thing twice)
# and delivered from there by a Courier, retried as alerts are for up to
# [report] retry_for. What is still undelivered stays, and the next
# `report --send` to that channel delivers it first.

#: Where report summaries wait, below state_dir (one directory a channel).
REPORT_SPOOL_DIR = "report-spool"


def summary_text(document, hostname=None):
    """The report as a summary carries it: SUMMARY_COLUMNS wide, at most
    MAX_SUMMARY_CHARS, cut at a line with "... N more lines"."""
    lines = render_report(document, SUMMARY_COLUMNS)
    size, kept = 0, 0
    for line in lines:
        if size + len(line) + 1 > MAX_SUMMARY_CHARS - 100:
            break
        size += len(line) + 1
        kept += 1
    more = lines[kept:]
    return "\n".join(lines[:kept] + (
        [_more_lines_text(len(more), hostname)] if more else []))


def summary_event(document, hostname, now_us):
    """The report_summary event of a report document: stamped with the
    end of its range, or its last event (so the same report gives the same
    event, which the spool sends once)."""
    head = document["report"]
    until = head.get("until") or head.get("last_event")
    timestamp_us = now_us if until is None else calendar.timegm(
        time.strptime(until[:19], "%Y-%m-%dT%H:%M:%S")) * 1000000 + int(
        until[20:26])
    return Event(action="report_summary", timestamp_us=timestamp_us,
                 hostname=hostname, detail=report_range_text(head),
                 message=summary_text(document, hostname))


def summary_targets(names, config):
    """The channels a summary goes to, by name (commas allowed), checked;
    UsageError naming each that cannot take one."""
    wanted = []
    for name in names:
        wanted += [part for part in _channel_names(name) if part not in
                   wanted]
    problems = summary_channel_problems(wanted, config.channels)
    if problems:
        raise UsageError("; ".join(problems))
    return [channel for name in wanted for channel in config.channels
            if channel.name == name]


def enter_state_dir(state_dir):
    """Where the report spools are reached from. Run as root with a state
    directory another user owns (the service's DynamicUser), the process
    moves into it and becomes that user: root then follows no path that
    user could have changed, and what it writes stays that user's, for
    the timer's run to go on with. The way in, /var/lib/private, only root
    may cross, so it is crossed before, and the directory is then named by
    the process's own working directory link (tempfile makes every name
    absolute). Returns that name, or state_dir."""
    if os.geteuid() != 0:
        return state_dir
    try:
        directory = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return state_dir  # not there yet: root's, until the service runs
    try:
        owner = os.fstat(directory)
        if owner.st_uid == 0:
            return state_dir
        os.fchdir(directory)
    finally:
        os.close(directory)
    # What the sinks import on first use is imported now, as root: the
    # user may not be able to read the interpreter's library (a Python
    # installed under /root).
    for name in SENDING_MODULES:
        importlib.import_module(name)
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)
    return "/proc/self/cwd"


class SummaryDelivery:
    """One channel's report spool and its courier, for one run of
    `report --send`: put the summary, deliver what the spool holds (older
    summaries first), and say what became of this one."""

    def __init__(self, channel, config):
        self.sink = CHANNEL_TYPES[channel.type](channel.name,
                                                dict(channel.options))
        self.name = os.path.join(REPORT_SPOOL_DIR,
                                 spool_directory_name(channel.name))
        #: As it is named to the admin.
        self.shown = os.path.join(config.state_dir, self.name)
        self.retry_for_s = config.report.retry_for
        self.directory = self.spool = None

    def enter(self, base, config):
        """Its spool below `base` (see enter_state_dir)."""
        self.directory = os.path.join(base, self.name)
        self.spool = Spool(self.directory, config.spool_max_alerts,
                           config.spool_max_age)

    def send(self, event, clock=time.monotonic):
        """(outcome, detail): "sent", "sent before" (within the hour),
        "waiting" (kept for the next run) or "refused"."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        # One sender a spool: a second run waits rather than send twice.
        lock = os.open(os.path.join(self.directory, "send.lock"),
                       os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._send_locked(event, clock)
        finally:
            os.close(lock)

    def _send_locked(self, event, clock):
        self.spool.open()
        name = alert_id(event)
        sent_before = os.path.exists(os.path.join(self.directory,
                                                  name + ".sent"))
        self.spool.put(event)
        self.spool.flush()
        courier = Courier(self.sink, self.spool)
        courier.start()
        deadline = clock() + self.retry_for_s
        try:  # at least one attempt, then retries until the deadline
            while self.spool.depth() and (clock() < deadline or not (
                    courier.delivered or courier.failed)):
                time.sleep(0.1)
        finally:
            courier.stop(timeout=self.sink.timeout + 2)
            self.sink.close()
        if os.path.exists(os.path.join(self.directory, name + ".alert")):
            return "waiting", "%s; kept in %s, the next report --send to " \
                "this channel delivers it" % (courier.last_error, self.shown)
        if os.path.exists(os.path.join(self.directory, name + ".sent")):
            return ("sent before" if sent_before else "sent"), None
        return "refused", courier.last_error


#: What `report --send` prints for each outcome.
_SUMMARY_OUTCOMES = {"sent": "sent", "sent before": "already sent within "
                     "the hour (not again)", "waiting": "not delivered yet",
                     "refused": "refused", "unready": "not sent"}


def send_summary(channels, config, event, stdout):
    """Send the summary to each channel; a line per channel on stdout.
    True when every channel has it."""
    deliveries, unready = [], {}
    for channel in channels:
        delivery = SummaryDelivery(channel, config)
        try:  # TLS files only root may read: before becoming the owner
            delivery.sink.open()
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            unready[channel.name] = "cannot set up TLS: %s" % error
        deliveries.append(delivery)
    base = enter_state_dir(config.state_dir)
    every = True
    for channel, delivery in zip(channels, deliveries):
        if channel.name in unready:
            outcome, detail = "unready", unready[channel.name]
        else:
            delivery.enter(base, config)
            try:
                outcome, detail = delivery.send(event)
            except OSError as error:  # named as the admin knows it
                outcome, detail = "waiting", io_error_text(error).replace(
                    base, config.state_dir)
        every = every and outcome in ("sent", "sent before")
        stdout.write("report to %s: %s%s\n" % (
            channel.name, _SUMMARY_OUTCOMES[outcome],
            ": %s" % detail if detail else ""))
    return every


# ---------------------------------------------------------------------------
# 15 CLI
# ---------------------------------------------------------------------------
# build_parser() and main(argv): each command a command_NAME(args, stdout)
# function; the errors of section 3 become exit codes here.


def build_parser():
    doc_body = __doc__.split("\n\n", 2)
    parser = argparse.ArgumentParser(
        prog="pamsignal", description="\n\n".join(doc_body[:2]),
        epilog=doc_body[2] if len(doc_body) > 2 else None,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file (default %s); "
                        "check-config reads - as standard input"
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
    report = commands.add_parser(
        "report", help="who logged in, from where, for how long; failures,"
        " detections, sudo and su over a range")
    report.add_argument("--since", metavar="WHEN",
                        help="from this time (YYYY-MM-DD [HH:MM[:SS]], "
                        "today, yesterday, @EPOCH, 2h ago, --since=-2h; "
                        "local time)")
    report.add_argument("--until", metavar="WHEN",
                        help="up to this time (same forms)")
    report.add_argument("--user", metavar="USER",
                        help="only what concerns this account")
    report.add_argument("--source", metavar="ADDR",
                        help="only what came from this address or host")
    output = report.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="print the report as one JSON document")
    output.add_argument("--html", metavar="FILE",
                        help="write the report as one self-contained HTML "
                        "page to FILE")
    report.add_argument("--send", metavar="CHANNEL", action="append",
                        help="send the summary through this channel and "
                        "its spool instead of printing it (repeatable, "
                        "or comma-separated)")
    report.add_argument("--send-configured", action="store_true",
                        help="send it to the channels of [report] send_to "
                        "(what pamsignal-report.timer runs)")
    report.add_argument("file", nargs="?", metavar="FILE|-",
                        help="a journalctl -o json export (- reads standard"
                        " input); without it, the journal")
    commands.add_parser("check-config", help="validate the configuration")
    test_alert = commands.add_parser(
        "test-alert", help="send a sample alert through each channel")
    test_alert.add_argument("--channel", metavar="NAME", action="append",
                            help="only this channel (may be repeated)")
    lookup = commands.add_parser(
        "lookup", help="ASN, country and provider of addresses")
    output = lookup.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="print the event's source object per address")
    output.add_argument("--raw", action="store_true",
                        help="print each database's own record as JSON")
    lookup.add_argument("--db", action="append", metavar="PATH",
                        help="a MaxMind DB file to use instead of [geoip] "
                        "(repeatable)")
    lookup.add_argument("addresses", nargs="+", metavar="IP|-",
                        help="addresses; - reads them from standard input, "
                        "one a line")
    status = commands.add_parser(
        "status", help="health and counters of the running service")
    status.add_argument("--json", action="store_true",
                        help="print the health as one JSON object")
    verify = commands.add_parser(
        "verify-log", help="verify the hash-chained audit log")
    verify.add_argument("--key-file", metavar="FILE",
                        help="the HMAC key of a keyed log (default: [audit] "
                        "key)")
    anchor = verify.add_mutually_exclusive_group()
    anchor.add_argument("--head", metavar="HASH",
                        help="a head hash kept elsewhere: the log must "
                        "still reach it")
    anchor.add_argument("--journal", action="store_true",
                        help="check against the last head anchored in the "
                        "journal")
    verify.add_argument("files", nargs="*", metavar="FILE",
                        help="the log's files in order (default: the "
                        "audit log in log_dir with its rotated files)")
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


#: How much of an over-long export line is read at a time while it is
#: skipped.
SKIP_CHUNK_BYTES = 65536


def export_lines(stream, warn=say):
    """The lines of a `journalctl -o json` export (a file, stdin or
    journalctl's output), for scan and report. A line longer than
    MAX_LINE_BYTES (the live source's cap) is read past in chunks, never
    held whole, and counted in a warning; the lines after it follow."""
    skipped = 0
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        if len(line) <= MAX_LINE_BYTES or line.endswith(b"\n"):
            yield line
            continue
        while line and not line.endswith(b"\n"):
            line = stream.readline(SKIP_CHUNK_BYTES)
        skipped += 1
        if skipped <= 5 or skipped % 1000 == 0:
            warn("warning", "skipped a line longer than %d bytes (%d so "
                 "far)" % (MAX_LINE_BYTES, skipped))


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
    pipeline = Pipeline([Channel(sink, ChannelGate(SHOW_EVERYTHING))],
                        config.detection, skip_unwatched=True,
                        enricher=Enricher.from_config(config, False),
                        accounts=service_account_uids())
    with stream:
        for line in export_lines(stream):
            entry = None if line.isspace() else pipeline.decode(line)
            if entry is not None:
                pipeline.process_entry(entry)
    pipeline.finish()
    sink.close()
    if pipeline.malformed and not pipeline.entries:
        raise PamSignalError("no journal entries found; export them with "
                             "`journalctl -o json`")
    return EXIT_OK


def report_command(journalctl, since_us, until_us, tty_audit=False):
    """The journalctl command line a report reads: the range (as @EPOCH,
    read the same way by every journalctl) and the matches `run` uses."""
    bounds = ["--since=@%d" % (since_us // 1000000)] \
        if since_us is not None else []
    if until_us is not None:
        bounds.append("--until=@%d" % -(-until_us // 1000000))
    return ([journalctl, "--output=json", "--no-pager", "--all", "--quiet",
             journal_fields(tty_audit)] + bounds + journal_matches(tty_audit))


def in_range(entry, since_us, until_us):
    """Whether an export's entry lies in --since/--until (entries with no
    readable time are kept: the parser stamps and flags them)."""
    if since_us is None and until_us is None:
        return True
    timestamp_us = _entry_timestamp(entry)
    return timestamp_us is None or (
        (since_us is None or timestamp_us >= since_us) and
        (until_us is None or timestamp_us <= until_us))


def _report_lines(args, config):
    """The journal, or the export args.file names, as lines; and the
    journalctl process when there is one."""
    if args.file == "-":
        return sys.stdin.buffer, None
    if args.file is not None:
        try:
            return open(args.file, "rb"), None
        except OSError as error:
            raise PamSignalError("cannot read %s: %s" % (
                args.file, error.strerror or error)) from None
    command = report_command(config.journalctl, args.since_us, args.until_us,
                             config.detection.tty_audit)
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE)
    except OSError as error:
        raise SourceError("cannot run %s: %s" % (
            config.journalctl, error.strerror or error)) from None
    return process.stdout, process


def command_report(args, stdout):
    now_s = time.time()
    args.since_us = None if args.since is None \
        else parse_when(args.since, now_s, option="--since")
    args.until_us = None if args.until is None \
        else parse_when(args.until, now_s, option="--until")
    config = load_config(args.config)
    targets = _summary_targets_of(args, config)
    source = None if args.source is None else \
        next((part for part in normalise_address(args.source) if part),
             args.source)
    builder = ReportBuilder(user=args.user, source=source)
    pipeline = Pipeline([Channel(ReportSink(builder), PassGate())],
                        config.detection, skip_unwatched=True,
                        enricher=Enricher.from_config(config, False),
                        accounts=service_account_uids())
    stream, process = _report_lines(args, config)
    progress = Progress(sys.stderr)
    try:
        with stream:  # closing it ends a journalctl cut short
            for line in export_lines(stream):
                entry = None if line.isspace() else pipeline.decode(line)
                if entry is not None and in_range(entry, args.since_us,
                                                  args.until_us):
                    pipeline.process_entry(entry)
                progress.update(pipeline.entries)
    finally:
        progress.done()
        returncode = process and process.wait()
    if returncode:
        raise SourceError("%s failed (exit %d); the report would be "
                          "incomplete" % (config.journalctl, returncode))
    if args.file is not None and pipeline.malformed and \
            not pipeline.entries:
        raise PamSignalError("no journal entries found; export them with "
                             "`journalctl -o json`")
    pipeline.finish()  # what waits for more input is all there is
    document = builder.document(args.since_us, args.until_us,
                                pipeline.entries)
    if args.html:
        write_report_html(args.html, document)
    if targets:
        event = summary_event(document, socket.gethostname(),
                              int(now_s * 1e6))
        return EXIT_OK if send_summary(targets, config, event, stdout) \
            else EXIT_FAILURE
    if args.html:
        return EXIT_OK
    if args.json:
        stdout.write(dumps_safe(document) + "\n")
    else:
        width = shutil.get_terminal_size().columns
        lines = render_report(document, width)
        if wants_colour(stdout, os.environ):
            lines = paint_report(lines)
        stdout.write("\n".join(lines) + "\n")
    return EXIT_OK


def _summary_targets_of(args, config):
    """The channels --send and --send-configured name (checked before the
    journal is read, so a wrong name fails at once)."""
    names = list(args.send or ())
    if args.send_configured:
        if not config.report.send_to:
            raise ConfigError([ConfigProblem(
                config.path, None, "report", "send_to",
                "names no channel, so there is nothing to send the report"
                " to: set send_to = CHANNEL, or stop the timer with "
                "`systemctl disable --now pamsignal-report.timer`")])
        names += config.report.send_to
    return summary_targets(names, config) if names else []


def command_check_config(args, stdout):
    config = load_config(args.config, stdin=sys.stdin.buffer
                         if args.config == "-" else None)
    if config.audit.enabled:  # a key the service could not read: now
        load_audit_key(config.audit.key, config.log_dir,
                       os.environ.get("CREDENTIALS_DIRECTORY"))
    if args.config is None and not os.path.exists(config.path):
        stdout.write("%s: no such file; built-in defaults apply\n"
                     % config.path)
    else:
        stdout.write("%s: OK (%d channel%s)\n" % (
            config.path, len(config.channels),
            "" if len(config.channels) == 1 else "s"))
    for channel in config.channels:
        notes = getattr(CHANNEL_TYPES[channel.type], "config_notes", None)
        for note in notes(channel.options) if notes else ():
            stdout.write("[channel:%s] %s\n" % (channel.name, note))
    for role, path in zip(GeoipConfig._fields, config.geoip):
        if path:
            stdout.write("[geoip] %s %s: %s\n" % (role, path,
                                                  describe_database(path)))
    return EXIT_OK


def sample_alert(now_s):
    """What test-alert sends: a realistic login, marked as a test."""
    hostname = socket.gethostname()
    return Event(
        action="login_success", timestamp_us=int(now_s * 1e6),
        user="alice", source_ip="203.0.113.5", source_port=51234,
        service="sshd", auth_method="publickey", hostname=hostname,
        reason="test", detail="a test alert from pamsignal test-alert",
        message="test alert: Accepted publickey for alice from 203.0.113.5 "
        "port 51234 ssh2")


def no_channel_message(path, exists):
    """Why test-alert has nothing to test, and what to do about it."""
    if not exists:
        return ("there is no configuration file %s: create it with `pamsignal "
                "install` or from pamsignal.conf.example, then add a "
                "[channel:NAME] section (see pamsignal.conf(5))" % path)
    return ("no channel is configured in %s: add a [channel:NAME] section "
            "(see pamsignal.conf(5))" % path)


def command_test_alert(args, stdout):
    config = load_config(args.config)
    channels = build_channels(config)
    if not config.channels:
        raise UsageError(no_channel_message(config.path,
                                            os.path.exists(config.path)))
    names = [channel.sink.name for channel in channels]
    unknown = [name for name in args.channel or () if name not in names]
    if unknown:
        raise UsageError("no channel %r; configured: %s"
                         % (unknown[0], ", ".join(names)))
    failed = 0
    for channel in channels:
        if args.channel and channel.sink.name not in args.channel:
            continue
        try:
            channel.sink.open()
            channel.sink.send(sample_alert(time.time()))
            channel.sink.flush()
            outcome = "delivered" if getattr(channel.sink, "confirms", True) \
                else "sent (not confirmed: %s)" % channel.sink.UNCONFIRMED
        except (DeliveryError, OSError, ssl.SSLError) as error:
            failed += 1
            outcome = "NOT delivered: %s" % escape_text(str(error))
        stdout.write("%s (%s): %s\n" % (channel.sink.name,
                                         type(channel.sink).__name__[:-4]
                                         .lower(), outcome))
    stdout.flush()
    return EXIT_FAILURE if failed else EXIT_OK


def describe_database(path):
    """One line on a database file: its type and age, or why it is unusable
    (a warning only: geoipupdate may bring the file later)."""
    try:
        reader = MMDBReader.open(path)
    except DatabaseError as error:
        return "not usable yet (%s)" % error
    metadata = reader.metadata
    reader.close()
    built = metadata.get("build_epoch")
    return "%s, IPv%d, built %s" % (
        escape_text(str(metadata.get("database_type") or "MaxMind DB")),
        metadata["ip_version"], time.strftime(
            "%Y-%m-%d", time.gmtime(built)) if type(built) is int and
        0 <= built < 1 << 40 else "at an unknown time")


def _lookup_addresses(arguments, stdin):
    """The command line's addresses, with `-` standing for stdin's lines."""
    for argument in arguments:
        if argument != "-":
            yield argument
            continue
        for line in stdin:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _plain_json(value):
    """A database value as JSON can hold it: bytes as lowercase hex, a
    float that is not finite as text."""
    if isinstance(value, dict):
        return {key: _plain_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain_json(item) for item in value]
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and value - value != 0:
        return repr(value)
    return value


def _network_text(address, prefix_length):
    packed = _packed_address(address)
    bits = len(packed) * 8
    number = int.from_bytes(packed, "big") >> (bits - prefix_length) << (
        bits - prefix_length)
    family = socket.AF_INET if bits == 32 else socket.AF_INET6
    return "%s/%d" % (socket.inet_ntop(family, number.to_bytes(
        len(packed), "big")), prefix_length)


def lookup_line(address, databases, enricher, raw, as_json):
    """What `lookup` prints for one normalised address."""
    if raw:
        lines = []
        for database in databases:
            reader = database.current(0.0)
            if reader is None:
                continue
            try:
                record, prefix = reader.lookup_prefix(address)
            except ValueError:
                continue  # IPv6 address, IPv4-only database
            lines.append(dumps_safe({
                "ip": address, "database": database.path,
                "network": _network_text(address, prefix),
                "record": _plain_json(record)}))
        return "\n".join(lines)
    event = enricher.enrich(Event(action="login_success", timestamp_us=0,
                                  source_ip=address))
    if as_json:
        ecs = event_to_ecs(event)
        source = ecs["source"]
        for key in ("network_type", "provider"):
            value = ecs.get("pamsignal", {}).get("source_" + key)
            if value is not None:
                source[key] = value
        return dumps_safe(source)
    return " ".join([address] + ["%s=%s" % (name, _text_value(value))
                                 for name, value in (
        ("asn", None if event.source_as_number is None
         else "AS%d" % event.source_as_number),
        ("org", event.source_as_org), ("country", event.source_country),
        ("city", event.source_city),
        ("source_type", event.source_network_type),
        ("provider", event.source_provider)) if value is not None])


def command_lookup(args, stdout):
    if args.db:
        databases = [GeoDatabase(os.path.abspath(path), "database")
                     for path in args.db]
        for database in databases:
            database.refresh()
            if database.reader is None:
                raise PamSignalError("cannot use %s" % database.path)
    else:
        config = load_config(args.config, channels=False)
        databases = list(Enricher.from_config(config, False).databases)
        if not databases:
            say("warning", "no databases: set [geoip] in %s or give --db; "
                "only special ranges are named" % config.path)
    enricher = Enricher(databases)
    failed = False
    for text in _lookup_addresses(args.addresses, sys.stdin):
        address, _ = normalise_address(text)
        if address is None:
            say("error", "not an IP address: %r" % text)
            failed = True
            continue
        try:
            line = lookup_line(address, databases, enricher, args.raw,
                               args.json)
        except DatabaseError as error:
            say("error", "%s: %s" % (address, error))
            failed = True
            continue
        if line:
            stdout.write(line + "\n")
    enricher.close()
    return EXIT_FAILURE if failed else EXIT_OK


def command_run(args, stdout):
    config = load_config(args.config)
    if os.geteuid() == 0:
        # Root reads its cursor, counters and spooled alerts back from
        # here: whoever could change them could silence or forge alerts.
        # (The service's own user owns its state directory; it is not root.
        # log_dir is not judged so: Ubuntu's /var/log is writable by the
        # syslog group, and the audit log opens, reads and cuts only
        # regular files it reached without following a link.)
        reason = trust_problem(config.state_dir)
        if reason:
            raise ConfigError([ConfigProblem(config.path, None, "pamsignal",
                                             "state_dir", reason)])
    return Agent(config, build_channels(config, args.json), args.config,
                 args.json).run()


def pid_alive(pid):
    """Whether a process with this PID exists (any owner)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # Overflow: no PID so high
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
    waiting = by_label("pamsignal_spool_alerts", "channel")
    oldest = by_label("pamsignal_spool_oldest_age_seconds", "channel")
    dropped = collections.defaultdict(collections.OrderedDict)
    for labels, number in metrics.get("pamsignal_alerts_dropped_total", ()):
        dropped[labels.get("channel", "")][labels.get("action", "")] = \
            int(number)
    whose = {labels.get("channel", ""): labels for labels, _ in
             metrics.get("pamsignal_alerts_dropped_info", ())}
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
            (name, _channel_report(name, sent, failed, waiting, oldest,
                                   dropped.get(name), whose.get(name)))
            for name in sorted(set(sent) | set(failed)))),
        ("degraded", [component for component, flag in by_label(
            "pamsignal_degraded", "component").items() if flag]),
        ("reloads", by_label("pamsignal_config_reloads_total", "result")),
        ("suppressed", by_label("pamsignal_journal_suppressed_total",
                                "unit")),
        ("dropped_lines", by_label("pamsignal_journal_dropped_lines_total",
                                   "unit")),
        ("last_suppression", _last_suppression(metrics.get(
            "pamsignal_journal_last_suppression_time_seconds"))),
        ("login_records", by_label("pamsignal_login_records_total",
                                   "verdict")),
        ("audit", None if "pamsignal_audit_records_total" not in metrics
         else collections.OrderedDict((
             ("records", int(value("pamsignal_audit_records_total"))),
             ("not_written",
              int(value("pamsignal_audit_unwritten_total")))))),
        ("last_error", error[0][0].get("message") if error else None),
        ("last_error_time", format_timestamp(int(value(
            "pamsignal_last_error_time_seconds") * 1e6)) if error else None),
    ))
    return report


def _last_suppression(samples):
    if not samples:
        return None
    labels, when_s = samples[0]
    return collections.OrderedDict((
        ("unit", labels.get("unit")),
        ("dropped", parse_int(labels.get("dropped"))),
        ("time", format_timestamp(int(when_s * 1e6)))))


def _channel_report(name, sent, failed, waiting, oldest, dropped=None,
                    whose=None):
    """A channel's counts for `status`; network channels add their spool
    and what it dropped (by action, and whose)."""
    counts = {"sent": int(sent.get(name, 0)),
              "failed": int(failed.get(name, 0))}
    if name in waiting:
        counts["waiting"] = int(waiting[name])
        counts["oldest_s"] = round(oldest.get(name, 0.0), 1)
    if dropped:
        counts["dropped"] = dict(dropped)
        for key in ("users", "sources"):
            names = (whose or {}).get(key)
            counts["dropped_" + key] = names.split(",") if names else []
    return counts


def _dropped_text(counts):
    """", 3 dropped (2 sudo_command, 1 alert_digest; users: mallory)"."""
    if not counts.get("dropped"):
        return ""
    kinds = sorted(counts["dropped"].items(),
                   key=lambda item: (-item[1], item[0]))
    named = "".join("; %s: %s" % (key, ",".join(counts["dropped_" + key]))
                    for key in ("users", "sources")
                    if counts.get("dropped_" + key))
    return ", %d dropped (%s%s)" % (
        sum(counts["dropped"].values()),
        ", ".join("%d %s" % (count, action) for action, count in kinds),
        named)


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
        "%s %d sent %d failed%s%s" % (
            name, counts["sent"], counts["failed"],
            "" if "waiting" not in counts else ", %d waiting%s" % (
                counts["waiting"], " (oldest %s)" % _duration_text(
                    counts["oldest_s"]) if counts["waiting"] else ""),
            _dropped_text(counts))
        for name, counts in report["channels"].items()) or "none"))
    lines.append("degraded:   " + (", ".join(report["degraded"]) or "no"))
    lines.append("suppressed: " + (", ".join(
        "%s %d times (%d lines)" % (unit, count, report["dropped_lines"].get(
            unit, 0)) for unit, count in report["suppressed"].items())
        or "no login lines dropped by journald"))
    last = report["last_suppression"]
    if last:
        lines.append("            last: %s %d lines of %s dropped" % (
            last["time"], last["dropped"] or 0, last["unit"]))
    if report["login_records"]:
        lines.append("records:    %d sessions accounted for, %d unaccounted"
                     % (report["login_records"].get("accounted", 0),
                        report["login_records"].get("unaccounted", 0)))
    if "ssh_ratelimit" in report:
        lines.append("ssh limit:  " + report["ssh_ratelimit"])
    if report.get("audit"):
        lines.append("audit log:  %d records written, %d not written" % (
            report["audit"]["records"], report["audit"]["not_written"]))
    lines.append("reloads:    %d ok, %d failed" % (
        report["reloads"].get("ok", 0), report["reloads"].get("failed", 0)))
    if report["last_error"]:
        lines.append("last error: %s %s" % (report["last_error_time"],
                                            report["last_error"]))
    host = report.get("host")
    if host:
        lines.append("host:       %s; %s" % (
            host["provider"] or "provider unknown",
            ", ".join(host["addresses"]) or "no addresses seen"))
    return "\n".join(escape_text(line) for line in lines) + "\n"


def _show_blocks(text):
    """`systemctl show` of several units -> one {property: value} each."""
    blocks, block = [], {}
    for line in text.splitlines() + [""]:
        name, equals, value = line.partition("=")
        if equals:
            block[name] = value
        elif block:
            blocks.append(block)
            block = {}
    return blocks


#: What `status` asks systemctl about each of SSH_UNITS.
RATELIMIT_PROPERTIES = ("Id", "LoadState", "LogRateLimitIntervalUSec",
                        "LogRateLimitBurst", "ActiveEnterTimestamp",
                        "DropInPaths")


def _changed_since_start(block, mtime):
    """Whether a drop-in of the unit changed after it started (then
    journald still applies the limit the unit started with)."""
    started = block.get("ActiveEnterTimestamp", "")
    if not started.startswith("@") or parse_int(started[1:]) is None:
        return False  # not running, or a systemctl too old to say
    for path in block.get("DropInPaths", "").split():
        try:
            if mtime(path) > int(started[1:]):
                return True
        except OSError:
            continue
    return False


def ratelimit_verdict(show_text, mtime=os.path.getmtime):
    """Whether journald's rate limit is lifted for sshd, from `systemctl
    show --timestamp=unix` of RATELIMIT_PROPERTIES for SSH_UNITS (an alias
    shows its unit again)."""
    verdicts = collections.OrderedDict()
    for block in _show_blocks(show_text):
        unit = block.get("Id")
        if not unit or block.get("LoadState") != "loaded":
            continue
        burst = parse_int(block.get("LogRateLimitBurst"))
        if block.get("LogRateLimitIntervalUSec", "0") != "0" and \
                burst is not None and burst >= LIFTED_RATELIMIT_BURST:
            verdicts[unit] = "lifted for %s (%d lines per %s)%s" % (
                unit, burst, block["LogRateLimitIntervalUSec"],
                "; in effect once it restarts (systemctl restart %s)" % unit
                if _changed_since_start(block, mtime) else "")
        else:
            verdicts[unit] = ("not lifted for %s: a flood can make journald "
                              "drop a login (`pamsignal install` writes the "
                              "drop-in)" % unit)
    return "; ".join(verdicts.values()) or "unknown (no sshd unit)"


def ssh_ratelimit_state():
    """ratelimit_verdict of this host; 'unknown' without systemd."""
    if not systemd_is_running():
        return "unknown (systemd is not running)"
    properties = ["--property=" + name for name in RATELIMIT_PROPERTIES]

    def show(options):
        return subprocess.run(
            ["systemctl", "show"] + options + properties + list(SSH_UNITS),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, timeout=30, universal_newlines=True)
    try:
        result = show(["--timestamp=unix"])
        if result.returncode != 0:  # --timestamp= came in systemd 248
            result = show([])
    except (OSError, subprocess.SubprocessError):
        return "unknown (systemctl failed)"
    return ratelimit_verdict(result.stdout)


def command_status(args, stdout):
    config = load_config(args.config, channels=False)
    path = metrics_path(config)
    try:
        # Root may run this on a file the service's user can replace: no
        # link followed, no FIFO waited on, a bounded read.
        with open_regular(path, encoding="utf-8") as handle:
            text = handle.read(MAX_METRICS_BYTES)
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
    report["host"] = {"provider": detect_host_provider(config.host_provider),
                      "addresses": host_addresses()}
    report["ssh_ratelimit"] = ssh_ratelimit_state()
    if args.json:
        stdout.write(dumps_safe(dict(report, file=path)) + "\n")
    else:
        stdout.write(render_status(report, path))
    healthy = report["state"] == "running" and not report["degraded"]
    return EXIT_OK if healthy else EXIT_FAILURE


def read_key_file(path):
    """The key verify-log was given (a link the admin named is followed;
    a FIFO put there must not hang the check)."""
    try:
        with open_regular(path, True) as handle:
            return handle.read(4096).strip()
    except OSError as error:
        raise UsageError("--key-file %s: %s" % (
            path, error.strerror or error)) from None


def last_anchor(journalctl, owner_uid):
    """(seq, head) of the newest anchor in the journal written by root or
    by the log's owner (no other user can pose as the agent), or None."""
    command = [journalctl, "-o", "json", "--no-pager", "-n", "1",
               "MESSAGE_ID=" + AUDIT_ANCHOR_MESSAGE_ID,
               "SYSLOG_IDENTIFIER=" + JOURNAL_IDENTIFIER, "_UID=0"]
    if owner_uid:
        command.append("_UID=%d" % owner_uid)
    try:
        output = subprocess.run(command, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, timeout=60,
                                check=False).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise PamSignalError("cannot run %s: %s" % (journalctl, error)) \
            from None
    for line in reversed(output.splitlines()):
        entry = decode_line(line)
        if entry is None:
            continue
        head = journal_text(entry.get("PAMSIGNAL_AUDIT_HEAD"))
        seq = parse_int(journal_text(entry.get("PAMSIGNAL_AUDIT_SEQ")))
        if head and re.match(r"^[0-9a-f]{64}$", head) and seq:
            return seq, head
    return None


def command_verify_log(args, stdout):
    """Check the audit log's chain (and that it reaches a kept head)."""
    config = load_config(args.config, channels=False)
    if args.key_file:
        key = read_key_file(args.key_file)
    else:
        key = load_audit_key(config.audit.key, config.log_dir,
                             os.environ.get("CREDENTIALS_DIRECTORY"))
    paths = args.files or audit_files(config.log_dir)
    if not paths:
        raise PamSignalError("no audit log in %s" % config.log_dir)
    lines = ChainLines(paths)
    try:
        verdict = verify_chain(lines, key)
    except OSError as error:
        raise PamSignalError("cannot read %s: %s" % (
            error.filename, error.strerror)) from None
    if verdict.problem:
        stdout.write("audit log NOT intact: %s\n(%d records verified "
                     "before it)\n" % (escape_text(verdict.problem),
                                       verdict.records))
        return EXIT_FAILURE
    stdout.write("%d records verified (seq %s to %s), head %s\n" % (
        verdict.records, verdict.first_seq, verdict.head_seq, verdict.head))
    head = args.head
    if args.journal:
        anchor = last_anchor(config.journalctl, os.stat(paths[-1]).st_uid)
        if anchor is None:
            stdout.write("no anchor of the audit log in the journal\n")
            return EXIT_FAILURE
        head = anchor[1]
        stdout.write("journal anchor: seq %d head %s\n" % anchor)
    if head is None:
        return EXIT_OK
    seq = head_position(lines, head.strip().lower())
    if seq is None:
        stdout.write("audit log NOT intact: it does not reach head %s: the "
                     "records up to it were removed, or the log was "
                     "replaced\n" % escape_text(head))
        return EXIT_FAILURE
    stdout.write("head %s reached: seq %d, %d records written since\n" % (
        head, seq, verdict.head_seq - seq))
    return EXIT_OK


def command_stage_config(args, stdout):
    """Copy the configuration for the unit's sandboxed user (ExecStartPre=+
    and ExecReload=+ run this as root): DynamicUser cannot read a 0600
    root-owned file, so the copy goes into its own 0700 runtime directory,
    owned by it. A missing default file gives an empty copy (defaults).

    That directory belongs to the service's user, so root opens nothing
    there by a name it could have planted: the copy is written under a
    fresh O_EXCL name and renamed over DEST, whatever DEST is."""
    source = args.config or DEFAULT_CONFIG_PATH
    try:
        with open_regular(source, follow_links=True) as handle:
            text = handle.read()
            status = os.fstat(handle.fileno())
    except FileNotFoundError:
        if args.config is not None:
            raise PamSignalError("%s: no such file" % source) from None
        text, status = b"", None
    except OSError as error:
        raise PamSignalError("cannot read %s: %s" % (
            source, error.strerror or error)) from None
    if status is not None:
        refuse_exposed_secrets(text.decode("utf-8", "replace"), source,
                               status.st_mode)
    if os.geteuid() == 0:
        refuse_untrusted_staging(text, source, status)
    directory = os.path.dirname(os.path.abspath(args.destination))
    try:
        owner = os.stat(directory)
        replace_file(args.destination, text, mode=0o600,
                     owner=(owner.st_uid, owner.st_gid))
    except OSError as error:
        raise PamSignalError("cannot write %s: %s" % (
            args.destination, error.strerror or error)) from None
    return EXIT_OK


def refuse_untrusted_staging(text, source, status):
    """What root copies for the service: the file and what it names must
    be root's, as for `run`. A file that does not parse is copied as it
    is (the agent reports its problems with line numbers); only its own
    ownership is checked then."""
    text = text.decode("utf-8", "replace")
    try:
        config = parse_config(text, source)
    except ConfigError:
        reason = status and trust_problem(source, status)
        if reason:
            raise ConfigError([ConfigProblem(source, None, None, None,
                                             reason)]) from None
        return
    refuse_untrusted_files(config, text, status, os.environ,
                           credentials=False)


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

#: pamsignal-report.service and pamsignal-report.timer, as `install`
#: writes them (the files at the top of the source tree are these texts; a
#: test keeps them the same). Off until the admin enables the timer.
REPORT_SERVICE_UNIT = """\
# PAMSignal's daily summary (`pamsignal install` writes this file), run by
# pamsignal-report.timer: yesterday's report to the channels named in
# [report] send_to. Off until: systemctl enable --now pamsignal-report.timer
# Sandboxed as pamsignal.service and as the same (dynamic) user, whose
# state directory holds the summaries' spool: it reads the journal and the
# configuration, writes /var/lib/pamsignal/report-spool and reaches the
# network, nothing else.
[Unit]
Description=PAMSignal daily login report
Documentation=man:pamsignal(8)
After=systemd-journald.service network-online.target
Wants=network-online.target

[Service]
Type=oneshot
ExecStartPre=+/usr/bin/pamsignal stage-config \\
    /run/pamsignal-report/pamsignal.conf
ExecStart=/usr/bin/pamsignal --config /run/pamsignal-report/pamsignal.conf \\
    report --since yesterday --until today --send-configured
# Reading a day of the journal, then [report] retry_for (10m) per channel.
TimeoutStartSec=1h

DynamicUser=yes
User=pamsignal
SupplementaryGroups=systemd-journal
StateDirectory=pamsignal
StateDirectoryMode=0700
# Its own runtime directory: pamsignal.service's goes when that stops.
RuntimeDirectory=pamsignal-report
RuntimeDirectoryMode=0700
UMask=0077

# Channels need the network: no PrivateNetwork= or IPAddressDeny=.
""" + SERVICE_UNIT[SERVICE_UNIT.index("NoNewPrivileges="):SERVICE_UNIT.index(
    "\n[Install]") + 1]  # the agent's sandbox, word for word

REPORT_TIMER_UNIT = """\
# PAMSignal's daily summary: starts pamsignal-report.service shortly after
# midnight (`pamsignal install` writes this file). Off until enabled:
#     systemctl enable --now pamsignal-report.timer
[Unit]
Description=PAMSignal daily login report
Documentation=man:pamsignal(8)

[Timer]
OnCalendar=*-*-* 00:10:00
RandomizedDelaySec=10m
# A day the machine was off at that time is sent when it next boots.
Persistent=true

[Install]
WantedBy=timers.target
"""

#: The daily summary's units by file name, in the order they are written.
REPORT_UNITS = collections.OrderedDict((
    ("pamsignal-report.service", REPORT_SERVICE_UNIT),
    ("pamsignal-report.timer", REPORT_TIMER_UNIT)))

#: What install says about the daily summary (it leaves the timer off).
REPORT_TIMER_HINT = (
    "the daily report is off: set [report] send_to in the configuration, "
    "then `systemctl enable --now pamsignal-report.timer`\n")

#: The program's path in SERVICE_UNIT; `install --prefix` replaces it.
UNIT_PROGRAM = DEFAULT_PREFIX + "/bin/pamsignal"

#: The drop-in that lifts journald's per-unit rate limit for sshd, as every
#: install path writes it for ssh.service and sshd.service (the shipped
#: contrib/systemd/pamsignal-ratelimit.conf is this text; a test keeps the
#: two the same).
SSH_RATELIMIT_DROPIN = """\
# PAMSignal: lift journald's per-unit rate limit for sshd.
#
# Why: past journald's limit (RateLimitBurst= lines per RateLimitIntervalSec=
# in journald.conf, per unit) every further line of the unit is dropped
# until the interval ends, and a flood of failed logins can be made to
# pass it on purpose: the "Accepted" line of a real login made meanwhile is
# then lost and no login monitor reading the journal can see it.
# "LogRateLimitIntervalSec=0" does not help: systemd reads 0 as "unset"
# and journald's limit applies; a burst no flood reaches does.
#
# Cost: a flood is then kept whole, so the journal fills faster during
# one. journald's SystemMaxUse= (journald.conf) still caps the disk it
# uses; older entries rotate out sooner.
#
# Takes effect when the unit next starts (systemd hands the limit to
# journald when it sets up the unit's cgroup; measured on systemd 257):
# `systemctl daemon-reload; systemctl restart ssh` (sshd.service on
# Fedora/EL). Open sessions survive it (the unit has KillMode=process).
# Check: pamsignal status, or
#   systemctl show -p LogRateLimitIntervalUSec -p LogRateLimitBurst ssh
[Service]
LogRateLimitIntervalSec=30s
LogRateLimitBurst=1000000
"""

#: sshd's unit on Debian/Ubuntu and on Fedora/EL: the drop-in goes to both.
SSH_UNITS = ("ssh.service", "sshd.service")

#: The drop-in's file name in each SSH_UNITS directory.
RATELIMIT_DROPIN_NAME = "pamsignal-ratelimit.conf"

#: A per-unit burst at least this large (with an interval set) counts as
#: lifted: more lines per interval than a flood at full speed gives.
LIFTED_RATELIMIT_BURST = 100000


#: The example configuration's opening comment (example_config()).
EXAMPLE_HEADER = r"""# PAMSignal configuration: /etc/pamsignal/pamsignal.conf
#
# Without this file PAMSignal runs on the defaults shown here and prints
# every event on the console. Check a changed file with:
#     pamsignal check-config
# An unknown section or key, or a bad value, is an error that names the
# line (exit code 78).

"""

#: The example configuration's channels: the console as with no file at
#: all, and every other type as a commented example.
EXAMPLE_CHANNELS = r"""
# Each [channel:NAME] section is one destination. Without any, every event
# goes to the console.
[channel:console]
type = console
# text: one readable line per event; json: the ECS event, one per line.
format = text
# The console here is a log: every event, nothing held back.
events = *
cooldown = off
rate_limit = off
repeats = off

# Network channels (uncomment and fill in one or more). Each sends through
# a durable spool with retries, and takes timeout (10s), ca_file (trust a
# private CA) and, except webhook and pagerduty, template, plus any
# [alerts] key. URLs must be https:// (http:// only to a loopback
# address). A secret may be written here (then keep this file mode 0600)
# or as credential:NAME to read the systemd credential NAME
# (LoadCredential= in the unit).
# Try them with: pamsignal test-alert
#
#[channel:phone]
#type = telegram
#bot_token = 123456:ABC-DEF...
#chat_id = -1001234567
# Only the alerts that matter most on the phone:
#min_severity = 6
#
#[channel:team]
#type = slack
#url = https://hooks.slack.com/services/T000/B000/XXXX
#
#[channel:discord]
#type = discord
#url = https://discord.com/api/v10/webhooks/ID/TOKEN
#
#[channel:teams]
#type = teams
#url = https://prod-00.westeurope.logic.azure.com/workflows/...
#
#[channel:push]
#type = ntfy
#url = https://ntfy.sh/my-secret-topic
#token = credential:ntfy-token
#
#[channel:gotify]
#type = gotify
#url = https://gotify.example.com
#token = AbCdEf123
#
#[channel:mail]
#type = email
#host = smtp.example.com
# starttls (port 587), tls (port 465), or none (a loopback relay only)
#security = starttls
#username = pamsignal@example.com
#password = credential:smtp-password
#sender = pamsignal@example.com
#recipients = admin@example.com, oncall@example.com
# A template replaces the text; placeholders: {title} {facts} {advice}
# {action} {severity} {user} {target_user} {source} {service} {reason}
# {host} {time} {command} {attempts} {message} {asn} {country}
# {source_type} {destination}; \n is a new line.
#template = {title}\n\n{facts}\n\n{advice}
#
#[channel:siem-hook]
#type = webhook
#url = https://collector.example.com/pamsignal
# Signs each request (Standard Webhooks: webhook-id, webhook-timestamp,
# webhook-signature = v1,base64 HMAC-SHA256 of "id.timestamp.body").
#secret = whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw
# Extra headers, one "Name: value" a line, the next ones indented (values
# are secrets; one may end in credential:NAME), and a client certificate
# for mutual TLS (the key file mode 0600, or a systemd credential). The
# service cannot read /etc/pamsignal/ (root's, mode 0700): keep the
# certificate where all may read it.
#headers = Authorization: Bearer credential:hook-token
#    X-Team: ops
#cert_file = /etc/ssl/pamsignal/client.pem
#key_file = /run/credentials/pamsignal.service/hook-key
#events = *
#cooldown = off
#rate_limit = off
#
# WhatsApp Cloud API: one message to each recipient (E.164, no +).
#[channel:whatsapp]
#type = whatsapp
#token = credential:whatsapp-token
#phone_number_id = 106540352242922
#recipients = 4915112345678, 15551234567
#api_version = v23.0
#min_severity = 6
#
# PagerDuty Events API v2: repeats of one incident (same host, action and
# source or account) update it instead of paging again.
#[channel:pagerduty]
#type = pagerduty
#routing_key = credential:pagerduty-key
#min_severity = 7
#
# Each event back into the journal with SYSLOG_IDENTIFIER=pamsignal, a
# MESSAGE_ID per action and the ECS fields as journal fields (EVENT_ACTION,
# SOURCE_IP, USER_NAME, ...), for Alloy, Vector, Promtail or fail2ban
# (contrib/fail2ban). A log: every event, nothing held back.
#[channel:journal]
#type = journal
#identifier = pamsignal
#events = *
#cooldown = off
#rate_limit = off
#
# A SIEM's syslog collector (Graylog, Wazuh, Splunk, QRadar, ArcSight,
# Elastic, Sentinel, rsyslog, syslog-ng). It gets every event at once
# (events = *, no cooldown, rate limit or digest; [alerts] does not apply
# unless set here). udp:// is best effort; over tcp:// and tls:// an
# alert leaves the spool once the collector has read it.
#[channel:siem]
#type = syslog
#target = tls://siem.example.com:6514
# cef (ArcSight), leef (QRadar, LEEF 2.0) or json (the ECS event)
#format = cef
# rfc5424 (with structured data) or rfc3164 (legacy BSD syslog)
#header = rfc5424
#facility = authpriv
#app_name = pamsignal
# tcp:// only: octet (RFC 6587 octet counting) or lf (newline framing)
#framing = octet
# tls:// only: trust a private CA; a client certificate and its key (the
# key file mode 0600). The service cannot read /etc/pamsignal/: keep the
# certificates where all may read them, and pass the key with
# LoadCredential=siem-key:/etc/pamsignal/client.key in a drop-in.
#ca_file = /etc/ssl/pamsignal/siem-ca.pem
#cert_file = /etc/ssl/pamsignal/client.pem
#key_file = /run/credentials/pamsignal.service/siem-key
"""

#: Width of the example configuration's comments.
EXAMPLE_WIDTH = 76


def help_blocks(text):
    """An option's help as ("text", paragraph) and ("verbatim", line)
    blocks: a line that starts with two spaces is kept as it is."""
    return [("verbatim" if line.startswith("  ") else "text", line)
            for line in text.split("\n")]


def _example_comment(text):
    lines = []
    for kind, block in help_blocks(text):
        if kind == "verbatim":
            lines.append("# " + block)
        else:
            lines += textwrap.wrap(block, EXAMPLE_WIDTH - 2)
            lines = [line if line.startswith("# ") else "# " + line
                     for line in lines]
    return "".join(line.rstrip() + "\n" for line in lines)


def example_config():
    """The configuration every install path writes when there is none
    (`install`, install.sh, make install, the packages, and
    pamsignal.conf.example beside this file): every key of
    CONFIG_SECTIONS with its default and help, and the channels."""
    parts = [EXAMPLE_HEADER]
    for name, options, about in CONFIG_SECTIONS:
        parts.append("[%s]\n%s\n" % (name, _example_comment(about)))
        for key, option in options.items():
            parts.append("%s%s\n\n" % (_example_comment(option.help), (
                "%s = %s" % (key, option.default)).rstrip()))
    return "".join(parts) + EXAMPLE_CHANNELS.lstrip("\n")


def systemd_is_running():
    """Whether systemd is PID 1 here (what sd_booted(3) checks)."""
    return os.path.isdir("/run/systemd/system")


def install_paths(root, prefix):
    """Where install puts each file, below `root` (like DESTDIR)."""
    def under(path):
        return os.path.join(root, path.lstrip("/"))
    return {"program": under(prefix + "/bin/pamsignal"),
            "unit": under(SYSTEMD_UNIT_DIR + "/pamsignal.service"),
            "report_units": [under(SYSTEMD_UNIT_DIR + "/" + name)
                             for name in REPORT_UNITS],
            "config_dir": under(os.path.dirname(DEFAULT_CONFIG_PATH)),
            "config": under(DEFAULT_CONFIG_PATH),
            "ratelimit": [under("%s/%s.d/%s" % (
                SYSTEMD_UNIT_DIR, unit, RATELIMIT_DROPIN_NAME))
                for unit in SSH_UNITS],
            "purge": [under(path) for path in (
                os.path.dirname(DEFAULT_CONFIG_PATH), "/var/lib/pamsignal",
                "/var/lib/private/pamsignal", "/var/log/pamsignal",
                "/var/log/private/pamsignal")]}


#: Each package manager: its name, its database below the root it acts
#: on, how it names the package owning a file there (reading only that
#: database, so an unprivileged --root works too), and the commands that
#: upgrade and remove the package instead.
PACKAGE_MANAGERS = (
    ("dpkg", ("var/lib/dpkg",),
     lambda root, path: ["dpkg-query", "--admindir=%s/var/lib/dpkg" % (
         root.rstrip("/")), "-S", path],
     "apt install pamsignal", "apt remove pamsignal (apt purge pamsignal: "
     "its configuration too)"),
    ("rpm", ("var/lib/rpm", "usr/lib/sysimage/rpm"),
     lambda root, path: ["rpm", "--root", root, "-qf", "--queryformat",
                         "%{NAME}\\n", path],
     "dnf upgrade pamsignal", "dnf remove pamsignal"))


def package_owner(root, paths):
    """(the package, the file, its manager's entry in PACKAGE_MANAGERS)
    when a .deb or .rpm installed below `root` owns one of `paths` (as
    seen on that system), else None. No package manager (its tool, or its
    database below `root`, missing) means no package."""
    for manager in PACKAGE_MANAGERS:
        if not any(os.path.isdir(os.path.join(root, database))
                   for database in manager[1]):
            continue
        for path in paths:
            try:
                result = subprocess.run(
                    manager[2](root, path), stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    universal_newlines=True, timeout=60)
            except (OSError, subprocess.SubprocessError):
                break  # the tool is not installed (or hangs): no package
            owner = result.stdout.strip().splitlines()[:1]
            if result.returncode == 0 and owner:
                # dpkg-query says "package: /path", rpm the name
                return owner[0].split(": ")[0], path, manager
    return None


def refuse_packaged(root, prefix, command):
    """Refuse to install over, or remove, what a package owns: uninstall
    would delete the package's program and conffile, and install's unit
    in /etc/systemd/system would override the package's."""
    # The programs only: dpkg still names the conffile of a package
    # removed but not purged (its `rc` state), when nothing is installed.
    owned = package_owner(root, tuple(sorted({prefix + "/bin/pamsignal",
                                              "/usr/bin/pamsignal"})))
    if owned is None:
        return
    package, path, manager = owned
    raise PamSignalError(
        "%s belongs to the installed package %s (%s): use the package "
        "manager, not `pamsignal %s`: %s" % (
            path, package, manager[0], command,
            manager[3] if command == "install" else manager[4]))


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
    # Every directory made below (and the ones above it makedirs adds)
    # gets 0755, or 0700 where asked, whatever the caller's umask: under
    # umask 000 sshd.service.d would be 0777, and anyone could add an
    # ExecStartPre= that systemd runs as root.
    umask = os.umask(0o022)
    try:
        return _install(args, stdout)
    finally:
        os.umask(umask)


def _install(args, stdout):
    root = os.path.abspath(args.root or "/")
    refuse_packaged(root, args.prefix, "install")
    paths = install_paths(root, args.prefix)
    program = args.prefix + "/bin/pamsignal"
    try:
        with open(os.path.abspath(__file__), "rb") as handle:
            source = handle.read()
        os.makedirs(os.path.dirname(paths["program"]), mode=0o755,
                    exist_ok=True)
        replace_file(paths["program"], source.decode("utf-8"), mode=0o755)
        os.makedirs(os.path.dirname(paths["unit"]), mode=0o755,
                    exist_ok=True)
        replace_file(paths["unit"], SERVICE_UNIT.replace(UNIT_PROGRAM,
                                                         program), mode=0o644)
        for path, text in zip(paths["report_units"], REPORT_UNITS.values()):
            replace_file(path, text.replace(UNIT_PROGRAM, program),
                         mode=0o644)
        os.makedirs(paths["config_dir"], mode=0o700, exist_ok=True)
        if os.path.lexists(paths["config"]):
            stdout.write("kept %s\n" % paths["config"])
        else:
            replace_file(paths["config"], example_config(), mode=0o600)
            stdout.write("wrote %s\n" % paths["config"])
        for dropin in paths["ratelimit"]:
            os.makedirs(os.path.dirname(dropin), mode=0o755, exist_ok=True)
            replace_file(dropin, SSH_RATELIMIT_DROPIN, mode=0o644)
            stdout.write("wrote %s (journald's rate limit lifted for sshd: "
                         "a flood cannot hide a login)\n" % dropin)
        stdout.write("the lifted limit takes effect when sshd's unit next "
                     "starts; not restarted for you: run `systemctl restart "
                     "ssh` (sshd on Fedora/EL) when it suits you (open "
                     "sessions survive it)\n")
    except OSError as error:
        raise PamSignalError("install failed: %s" % io_error_text(
            error)) from None
    stdout.write("installed %s and %s\n" % (paths["program"], paths["unit"]))
    if root == "/" and systemd_is_running():
        _systemctl(stdout, "daemon-reload")
        _systemctl(stdout, "enable", "pamsignal.service")
        # restart, not start: an upgrade must run the program just written
        _systemctl(stdout, "restart", "pamsignal.service")
        stdout.write("pamsignal is running: `pamsignal status`, "
                     "`journalctl -u pamsignal -f`\n")
        stdout.write(REPORT_TIMER_HINT)
    else:
        stdout.write("systemd is not managing %s: on the target system run\n"
                     "  systemctl daemon-reload\n"
                     "  systemctl enable --now pamsignal.service\n" % root)
        stdout.write(REPORT_TIMER_HINT)
    return EXIT_OK


def command_uninstall(args, stdout):
    root = os.path.abspath(args.root or "/")
    refuse_packaged(root, args.prefix, "uninstall")
    paths = install_paths(root, args.prefix)
    managed = root == "/" and systemd_is_running()
    if managed and os.path.exists(paths["report_units"][1]):
        _systemctl(stdout, "disable", "--now", "pamsignal-report.timer")
    if managed and os.path.exists(paths["unit"]):
        _systemctl(stdout, "disable", "--now", "pamsignal.service")
    removed = []
    try:
        for path in [paths["unit"]] + paths["report_units"] + [
                paths["program"]] + paths["ratelimit"]:
            if os.path.lexists(path):
                os.unlink(path)
                removed.append(path)
        for dropin in paths["ratelimit"]:  # the directory, if it was ours
            try:
                os.rmdir(os.path.dirname(dropin))
            except OSError:
                pass  # other drop-ins (the admin's) are in it, or it is gone
        if args.purge:
            for path in paths["purge"]:
                if os.path.islink(path):
                    os.unlink(path)
                    removed.append(path)
                elif os.path.isdir(path):
                    shutil.rmtree(path)
                    removed.append(path)
    except OSError as error:
        raise PamSignalError("uninstall failed: %s" % io_error_text(
            error)) from None
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
            "report": command_report,
            "check-config": command_check_config,
            "test-alert": command_test_alert, "lookup": command_lookup,
            "status": command_status, "stage-config": command_stage_config,
            "verify-log": command_verify_log,
            "install": command_install, "uninstall": command_uninstall}


def utf8_stdout():
    """Standard output as UTF-8 whatever the locale: under LANG=C (the
    default of Python 3.6 without a UTF-8 locale) a user name such as
    "josé" must not make the console channel fail and lose the event."""
    return open(sys.stdout.fileno(), "w", encoding="utf-8",
                errors="backslashreplace", closefd=False)


#: How `run` starts over lighter (rerun_lighter), on one line for ps: the
#: import system loads the compiled file, as it loads any .pyc, from file
#: descriptor argv[1] as module pamsignal, with sys.path[0] as for a script
#: (never the current directory, where anyone may have put a json.py).
RERUN_PROGRAM = (
    "import importlib.machinery as m, importlib.util as u, os, sys; "
    "path = sys.argv[2]; "
    "sys.path[:1] = [os.path.dirname(path) if entry == '' else entry "
    "for entry in sys.path[:1]]; "
    "loader = m.SourcelessFileLoader('pamsignal', "
    "'/proc/self/fd/' + sys.argv[1]); "
    "module = u.module_from_spec(u.spec_from_loader('pamsignal', loader)); "
    "module.__file__ = path; sys.modules['pamsignal'] = module; "
    "loader.exec_module(module); "
    "sys.exit(module.main(sys.argv[3:]))")


def compiled_file(code):
    """`code` as a .pyc file holds it: the interpreter's magic number, a
    header of zeros (no source to compare with), the marshalled code."""
    padding = 12 if sys.version_info >= (3, 7) else 8  # flags from 3.7
    return importlib.util.MAGIC_NUMBER + bytes(padding) + marshal.dumps(code)


#: The commands that may run long or read much (the service, a month's
#: export): they start over lighter, without the script's syntax tree.
LONG_COMMANDS = frozenset(("run", "scan", "report"))


def rerun_lighter(argv, code):
    """Replace this process (same PID, so systemd's MAINPID holds) with one
    that runs main(argv) from `code`, this script's compiled module, handed
    over in an unlinked temporary file. Python keeps the syntax tree of the
    script it runs until the script ends (for this file about 20 MB, for
    the agent's whole life), and compiling again would leave ~4 MB of
    scattered garbage. Returns only if that cannot be done."""
    if not sys.executable or code.co_name != "<module>":
        return
    try:
        handoff = tempfile.TemporaryFile()
        if not os.path.exists("/proc/self/fd/%d" % handoff.fileno()):
            return  # no /proc (a bare chroot): the rerun could not read it
        handoff.write(compiled_file(code))
        handoff.flush()
        os.set_inheritable(handoff.fileno(), True)
        os.execv(sys.executable, [sys.executable] +
                 subprocess._args_from_interpreter_flags() +
                 ["-c", RERUN_PROGRAM, str(handoff.fileno()),
                  os.path.abspath(__file__)] + list(argv))
    except (OSError, ValueError):
        pass  # go on as the script: heavier, but it runs


def main(argv=None, stdout=None):
    """The command line; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code
    if args.command is None:
        args.command, args.json = "run", False
    if args.command in LONG_COMMANDS and __name__ == "__main__":
        # the caller is the script's module code: what the rerun runs
        rerun_lighter(sys.argv[1:] if argv is None else argv,
                      sys._getframe(1).f_code)
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
