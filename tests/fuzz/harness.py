"""What the fuzz targets in this folder share.

Each target, `fuzz_NAME.py`, puts one input through one reader of bytes
that an attacker (or a broken disk) may control and raises only when a
property fails: `check(data)`. `seeds()` gives the inputs it starts from,
made from the test fixtures. The properties are the same everywhere:

- no exception but the reader's documented ones;
- no hang: libFuzzer's -timeout under atheris, `bounded()` elsewhere;
- bounded memory: an address-space limit under atheris (an input that
  makes a reader allocate without end ends as a MemoryError, which the
  fuzzer reports as a crash), a traced peak in `bounded()`;
- what comes out obeys the event contract and renders in every format.

Run a target under atheris (what `make fuzz` does for each one):

    python3 tests/fuzz/fuzz_journal.py -max_total_time=300 [CORPUS_DIR]

With no directory it learns into CORPUS_ROOT/NAME. Given files instead of
directories, it replays just those inputs. tests/test_fuzz.py replays
tests/fuzz/regressions/NAME/ without atheris and runs each target briefly.
"""

import contextlib
import ipaddress
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import tracemalloc

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
for _path in (REPO, TESTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

#: Where each target keeps what it learned, between runs and machines'
#: sessions (`make fuzz`; CI reads it too).
CORPUS_ROOT = os.environ.get("PAMSIGNAL_FUZZ_CORPUS",
                             "/var/cache/pamsignal-tests/fuzz-corpus")

#: Regression inputs, one folder per target, replayed by tests/test_fuzz.py.
REGRESSIONS = os.path.join(HERE, "regressions")

#: A fuzzing process may map no more than this. Python with atheris and
#: pamsignal maps about 90 MiB before the first input.
ADDRESS_SPACE_LIMIT = 1 << 30

#: libFuzzer's own limits: resident memory, and seconds for one input
#: (inputs take milliseconds; far longer is a hang).
RSS_LIMIT_MB = 1024
INPUT_TIMEOUT_S = 10

#: `bounded()`: the most memory one input may allocate (Python's own
#: allocations, traced), and the seconds it may take.
PEAK_LIMIT = 64 << 20
HANG_S = 10


class Hang(BaseException):
    """An input ran past HANG_S. A BaseException, so that no `except
    Exception` in the code under test can swallow it."""


def target_name(path):
    """fuzz_journal.py -> journal."""
    return os.path.splitext(os.path.basename(path))[0][len("fuzz_"):]


def _fuzzing():
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.basename(main).startswith("fuzz_")


def instrumented():
    """Context for importing pamsignal: instrumented for coverage when this
    process is an atheris target, plain otherwise (pytest replays)."""
    if not _fuzzing():
        return contextlib.ExitStack()
    import atheris
    return atheris.instrument_imports(include=["pamsignal"])


with instrumented():
    import pamsignal

# ----------------------------------------------------------- the properties


@contextlib.contextmanager
def bounded(hang_s=HANG_S, peak_limit=PEAK_LIMIT):
    """Fail the block when it runs longer than `hang_s` seconds or
    allocates more than `peak_limit` bytes at its peak."""
    def hang(signum, frame):
        raise Hang("input still running after %s s" % hang_s)
    previous = signal.signal(signal.SIGALRM, hang)
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.clear_traces()
    signal.setitimer(signal.ITIMER_REAL, hang_s)
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
        assert peak <= peak_limit, "one input allocated %d bytes" % peak
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if not tracing:
            tracemalloc.stop()


#: What each field of an event holds (the event contract), as the spool
#: checks it when it reads an alert back; the other fields hold text.
INT_FIELDS = pamsignal._INT_FIELDS
NUMBER_FIELDS = pamsignal._NUMBER_FIELDS
LIST_FIELDS = pamsignal._LIST_FIELDS


def is_normal_address(text):
    """A valid IP address, written the way normalise_address writes it."""
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        return False
    return str(address) == text or (
        # inet_ntop and ipaddress write ::a.b.c.d forms differently
        address.version == 6 and
        ipaddress.ip_address(text).packed == address.packed and
        ":" in text and text == text.lower())


def check_event(event, parsed=True):
    """The event obeys the contract's shapes: known action, typed fields,
    and, for an event the agent made itself (`parsed`), normalised
    addresses and ports."""
    assert event.action in pamsignal.ACTIONS, event.action
    for field, value in zip(pamsignal.EVENT_FIELDS, event):
        if value is None or field == "context_key":
            continue
        if field in INT_FIELDS:
            ok = type(value) is int
        elif field in NUMBER_FIELDS:
            ok = type(value) in (int, float) and value - value == 0
        elif field in LIST_FIELDS:
            ok = type(value) is tuple and all(
                type(item) is str for item in value)
        else:
            ok = type(value) is str
        assert ok, "%s holds %r" % (field, value)
        if type(value) is str:
            value.encode("utf-8")  # no lone surrogate
    assert 0 <= pamsignal.event_severity(event) <= 10, event.severity
    if not parsed:
        return
    for field in ("source_ip", "destination_ip"):
        value = getattr(event, field)
        assert value is None or is_normal_address(value), (field, value)
    for field in ("source_port", "destination_port"):
        value = getattr(event, field)
        assert value is None or 0 <= value <= 65535, (field, value)


#: One channel of each network type (the admin's template on one more).
CHANNELS = """
[channel:telegram]
type = telegram
bot_token = 1:abc
chat_id = -100
[channel:slack]
type = slack
url = https://hooks.example.com/slack
[channel:discord]
type = discord
url = https://hooks.example.com/discord
[channel:teams]
type = teams
url = https://hooks.example.com/teams
[channel:teams-template]
type = teams
url = https://hooks.example.com/teams
template = {title}: {user} from {source}
[channel:ntfy]
type = ntfy
url = https://ntfy.example.com/topic
token = tk
[channel:gotify]
type = gotify
url = https://gotify.example.com
token = tk
[channel:webhook]
type = webhook
url = https://hooks.example.com/webhook
secret = whsec_c2VjcmV0
headers = Authorization: Bearer tk
[channel:whatsapp]
type = whatsapp
token = tk
phone_number_id = 1065
recipients = 15551234567
[channel:pagerduty]
type = pagerduty
routing_key = R0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5
[channel:email]
type = email
host = 127.0.0.1
sender = ps@example.com
recipients = admin@example.com
"""


def every_sink():
    """The sinks of CHANNELS, built as the agent builds them; nothing is
    sent, only their requests are made."""
    return [pamsignal.CHANNEL_TYPES[channel.type](channel.name,
                                                 channel.options)
            for channel in pamsignal.parse_config(CHANNELS).channels]


SINKS = every_sink()


def not_json(constant):
    raise AssertionError("%s is not JSON" % constant)


#: Two sinks that stand for all (JSON of the ECS event; chat markup with
#: a template), for targets whose inputs change few fields of an event.
SOME_SINKS = [sink for sink in SINKS if sink.name in ("webhook",
                                                     "teams-template")]


def render_everywhere(event, delay_s=0, parsed=True, sinks=SINKS):
    """Render the event in every format and each channel's request; the
    JSON forms must read back, with no raw control character."""
    check_event(event, parsed)
    text = pamsignal.render_text(event)
    assert "\n" not in text and not pamsignal._UNSAFE_CHARS.search(text)
    line = pamsignal.render_json(event)
    assert not pamsignal._UNSAFE_CHARS.search(line)
    ecs = json.loads(line, parse_constant=not_json)
    assert ecs["event"]["action"] == event.action
    source_ip = ecs.get("source", {}).get("ip")
    assert source_ip is None or not parsed or is_normal_address(source_ip)
    alert = pamsignal.alert_text(event, delay_s)
    assert alert.title
    for sink in sinks:
        if isinstance(sink, pamsignal.EmailSink):
            sink.message(event, delay_s).as_bytes()
        else:
            url, headers, body = sink.request(event, delay_s)
            json.loads(body.decode("utf-8"), parse_constant=not_json)


# ---------------------------------------------------------------- running


def write_seeds(seeds, directory):
    for number, seed in enumerate(seeds):
        with open(os.path.join(directory, "seed-%04d" % number), "wb") as f:
            f.write(seed)


def dictionary_entry(token):
    """A token as a line of a libFuzzer dictionary."""
    data = token.encode("utf-8") if isinstance(token, str) else token
    return '"%s"' % "".join(
        chr(b) if 32 <= b < 127 and b not in b'"\\' else "\\x%02x" % b
        for b in data)


def fuzz(check, seeds, dictionary=(), argv=None):
    """Run `check` under atheris: the main of every target. Options and
    paths in `argv` go to libFuzzer; its limits, the target's dictionary
    (words of its grammar the mutator then inserts whole) and the corpus
    folder are added where not given."""
    import atheris
    argv = list(sys.argv if argv is None else argv)
    name = target_name(argv[0])
    options = [a for a in argv[1:] if a.startswith("-")]
    paths = [a for a in argv[1:] if not a.startswith("-")]
    for option, value in (("-rss_limit_mb", RSS_LIMIT_MB),
                          ("-timeout", INPUT_TIMEOUT_S)):
        if not any(o.startswith(option + "=") for o in options):
            options.append("%s=%s" % (option, value))
    # A fixed place, rewritten each run: libFuzzer ends the process
    # itself, so nothing could remove a fresh temporary folder.
    seed_dir = os.path.join(tempfile.gettempdir(),
                            "pamsignal-fuzz-seeds-" + name)
    if not paths or all(os.path.isdir(p) for p in paths):
        if not paths:
            paths = [os.path.join(CORPUS_ROOT, name)]
            os.makedirs(paths[0], exist_ok=True)
        shutil.rmtree(seed_dir, ignore_errors=True)
        os.makedirs(seed_dir)
        write_seeds(seeds(), seed_dir)
        paths.append(seed_dir)  # read only: new inputs go to the first
    if dictionary and not any(o.startswith("-dict=") for o in options):
        words = seed_dir + ".dict"
        with open(words, "w") as f:
            f.write("".join(dictionary_entry(token) + "\n"
                            for token in sorted(set(dictionary))))
        options.append("-dict=" + words)
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT,) * 2)
    atheris.Setup([argv[0]] + options + paths, check)
    atheris.Fuzz()


def regression_inputs(name):
    """(file name, bytes) of every regression input of a target."""
    directory = os.path.join(REGRESSIONS, name)
    if not os.path.isdir(directory):
        return []
    found = []
    for file_name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, file_name), "rb") as f:
            found.append((file_name, f.read()))
    return found
