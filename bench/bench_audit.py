#!/usr/bin/env python3
"""The audit log (a benchmark, not a test): records appended per second
(an event with its ECS object, as the pipeline writes it) with the fsync
policy the agent uses (one fsync per batch of journal entries) and with an
fsync after every record, keyed and not; `verify-log` speed; and what it
adds per event to the pipeline (two console channels, so an event record
and two decisions, flushed every 100 events).

Usage: python3 bench/bench_audit.py [RECORDS]   (default 20000)
Set TMPDIR to measure another disk (the default is often a tmpfs).
"""
import io
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pamsignal  # noqa: E402
from bench_delivery import alert  # noqa: E402  (the same sample event)


def record(number):
    """An event record as the pipeline hands it over (the event itself,
    written as its ECS object)."""
    event = alert(number)
    return {"kind": "event", "id": pamsignal.alert_id(event), "event": event}


def append_rate(count, batch, key):
    """Records a second, fsynced every `batch` records."""
    settings = pamsignal.parse_config(
        "[audit]\nrotate_size = 1G\nanchor_every = off\n"
        "anchor_interval = off\n").audit
    bodies = [record(number) for number in range(count)]
    with tempfile.TemporaryDirectory() as directory:
        log = pamsignal.AuditLog(settings, directory, key)
        log.open()
        started = time.perf_counter()
        for number, body in enumerate(bodies, 1):
            log.append(body)
            if number % batch == 0:
                log.flush()
        log.flush()
        elapsed = time.perf_counter() - started
        lines = pamsignal.ChainLines(pamsignal.audit_files(directory))
        started = time.perf_counter()
        verdict = pamsignal.verify_chain(lines, key)
        verified = time.perf_counter() - started
        assert verdict.problem is None, verdict.problem
        size = os.path.getsize(os.path.join(directory, "audit.jsonl"))
        log.close()
    return count / elapsed, verdict.records / verified, size / verdict.records


def pipeline_cost(count, audit):
    """Microseconds per event through Pipeline._send, with or without
    the audit log."""
    config = pamsignal.parse_config(
        "[channel:all]\ntype = console\nevents = *\ncooldown = off\n"
        "rate_limit = off\n[channel:default]\ntype = console\n")
    channels = pamsignal.build_channels(config)
    for channel in channels:
        channel.sink.stream = io.StringIO()
    pipeline = pamsignal.Pipeline(channels, config.detection,
                                  clock=lambda: 1795780000.0)
    events = [alert(number)._replace(action="login_failure",
                                     reason="bad_password")
              for number in range(count)]
    with tempfile.TemporaryDirectory() as directory:
        if audit:
            pipeline.audit = pamsignal.AuditLog(config.audit, directory)
            pipeline.audit.open()
        started = time.perf_counter()
        for number, event in enumerate(events, 1):
            pipeline._send(event)
            if number % 100 == 0:
                pipeline.flush()
        pipeline.flush()
        elapsed = time.perf_counter() - started
        if audit:
            pipeline.audit.close()
    return elapsed / count * 1e6


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    print("audit log, %d event records, in %s" % (count,
                                                  tempfile.gettempdir()))
    for label, batch, key in (
            ("fsync per 100 records (a busy batch)", 100, None),
            ("fsync per 10 records", 10, None),
            ("fsync per record (a quiet server)", 1, None),
            ("fsync per 100 records, HMAC key", 100, b"k" * 32)):
        rate, verify_rate, size = append_rate(
            count if batch > 1 else min(count, 2000), batch, key)
        print("  %-40s %8.0f records/s; verify %8.0f records/s; "
              "%.0f bytes/record" % (label, rate, verify_rate, size))
    print("pipeline, per event: %.0f us without the audit log, %.0f us with"
          " it" % (pipeline_cost(min(count, 10000), False),
                   pipeline_cost(min(count, 10000), True)))


if __name__ == "__main__":
    main()
