"""Fuzz target: a channel's spool directory as the courier finds it.

An input is one file of the spool: an alert file (first byte even) or
dropped.json (first byte odd), the rest its bytes. The spool must open;
an alert must come out as an event that renders everywhere (or be dropped
as unreadable) and be delivered by a courier; dropped counts must give an
`alerts_dropped` alert that renders everywhere too.
"""

import atexit
import io
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import fuzz_journal  # noqa: E402

pamsignal = harness.pamsignal

NOW_S = 1795780000.0
ALERT_NAME = "0123456789abcdef0123456789abcdef"
SPOOL_DIR = os.path.join(tempfile.gettempdir(),
                         "pamsignal-fuzz-spool-%d" % os.getpid())
atexit.register(shutil.rmtree, SPOOL_DIR, ignore_errors=True)


def fresh_spool():
    shutil.rmtree(SPOOL_DIR, ignore_errors=True)
    os.makedirs(SPOOL_DIR)
    return pamsignal.Spool(SPOOL_DIR, 1000, 10 ** 9, clock=lambda: NOW_S)


def deliver(spool):
    """Take the oldest alert and deliver it as a courier does (to a
    console); the event it was, or None."""
    taken = spool.take(0)
    if taken is None:
        return None
    name, event = taken
    # The agent wrote it from an event it had checked; read back, only
    # the shapes of the fields are (addresses are not parsed again).
    harness.render_everywhere(event, parsed=False)
    sink = pamsignal.ConsoleSink("fuzz", stream=io.StringIO())
    courier = pamsignal.Courier(sink, spool, clock=lambda: NOW_S)
    courier.deliver_one(name, event)
    assert courier.delivered == 1 and sink.stream.getvalue()
    return event


def check(data):
    if not data:
        return
    spool = fresh_spool()
    file_name = "dropped.json" if data[0] % 2 else ALERT_NAME + ".alert"
    with open(os.path.join(SPOOL_DIR, file_name), "wb") as f:
        f.write(data[1:])
    spool.open()
    if data[0] % 2:
        # What a courier does once delivery works again.
        courier = pamsignal.Courier(pamsignal.ConsoleSink("fuzz"), spool,
                                    clock=lambda: NOW_S)
        courier._report_drops()
        event = deliver(spool)
        assert event is None or event.action == "alerts_dropped", event
    else:
        deliver(spool)


def alert_file(event):
    return json.dumps({"version": 1, "event": pamsignal.event_to_record(
        event)}, separators=(",", ":")).encode("utf-8")


def seeds():
    """Alert files of every fixture's event and of a detection, digest and
    drop report; a dropped.json."""
    events = []
    for seed in fuzz_journal.seeds():
        entry = fuzz_journal.entries_of(seed)
        event = entry and pamsignal.parse_entry(entry)
        if event is not None and seed[0] == 0:
            events.append(event)
    events += [
        pamsignal.Event(
            action="brute_force_detected", timestamp_us=1795780000000000,
            source_ip="203.0.113.9", attempts=5, window_s=600,
            counted_by="source", users_tried=("root", "admin"),
            network="203.0.113.0/24", sources=("203.0.113.9",)),
        pamsignal.Event(
            action="alert_digest", timestamp_us=1795780000000000,
            reason="cooldown", held_back=12, detail="login_failure 12",
            severity=8, session_duration_s=1.5, source_as_number=64500),
        pamsignal.Event(action="alerts_dropped", held_back=3,
                        timestamp_us=1795780000000000, detail="3 too old")]
    return [b"\0" + alert_file(event) for event in events] + [
        b"\1" + json.dumps({"spool_full": 3, "too_old": 1}).encode()]


DICTIONARY = ['"version":1', '"event":', '"timestamp_us":', '"action":',
              "-1", "1e308", "9" * 30, "null", "true", "[]", "{}",
              '"\\ud800"'] + ['"%s":' % field
                              for field in pamsignal.EVENT_FIELDS] + [
    '"%s"' % action for action in pamsignal.ACTIONS]

if __name__ == "__main__":
    harness.fuzz(check, seeds, DICTIONARY)
