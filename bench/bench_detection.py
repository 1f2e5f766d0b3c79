#!/usr/bin/env python3
"""A brute force from many distinct addresses through the whole pipeline
(a benchmark, not a test): events per second and peak memory.

The events go through enrichment (no database, as by default) and one
channel with the default alert policy, to a sink that counts what the
cooldowns and rate limit let through.
Each entry is sshd's "Failed password" from a new address (IPv4 and IPv6
mixed, two per /64), with a pam_unix companion line for every attempt,
as a real attack looks in the journal. Memory must stay flat however many
addresses come: the detectors forget the least recently seen.
Usage: python3 bench/bench_detection.py [ADDRESSES [REPLAYS]]
(defaults 1000000 and 3; the median replay is reported)
"""
import json
import os
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import pamsignal  # noqa: E402
import stages  # noqa: E402


def attack_lines(count):
    """journalctl -o json lines (bytes) of `count` failed attempts."""
    base = {"_BOOT_ID": "0f6c6b5d", "_HOSTNAME": "web1", "_PID": "4242",
            "_UID": "0", "_COMM": "sshd", "_EXE": "/usr/sbin/sshd",
            "_TRANSPORT": "syslog", "SYSLOG_IDENTIFIER": "sshd"}
    for number in range(count):
        # Public addresses, as an attack has them: no special range, so
        # enrichment checks them all.
        if number % 2:
            address = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(
                socket.AF_INET6, "2a02:%x:%x:%x::%x" % (
                    1 + (number >> 32), number >> 16 & 0xffff,
                    number >> 2 & 0xffff, number & 3)))  # as sshd writes it
        else:
            address = "%d.%d.%d.%d" % (11 + (number >> 24) % 80, number >> 16
                                       & 255, number >> 8 & 255, number & 255)
        for offset, message in enumerate((
                "pam_unix(sshd:auth): authentication failure; logname= "
                "uid=0 euid=0 tty=ssh ruser= rhost=%s  user=root" % address,
                "Failed password for root from %s port %d ssh2"
                % (address, 1024 + number % 60000))):
            yield json.dumps(dict(
                base, MESSAGE=message,
                __CURSOR="s=1;i=%x" % (2 * number + offset),
                __REALTIME_TIMESTAMP=str(1795780000000000 + number * 1000
                                         + offset))).encode()


def peak_rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class CountingSink(pamsignal.Sink):
    """A channel that only counts what reaches it (the policy decides)."""

    def __init__(self):
        pamsignal.Sink.__init__(self, "counting")
        self.alerts = 0

    def send(self, event, delay_s=0):
        self.alerts += 1


def scan_pipeline(config, sink):
    """A pipeline as `scan` has it (every source labelled, no database
    configured), with one channel to `sink` behind the alert policy."""
    return pamsignal.Pipeline(
        [pamsignal.Channel(sink, pamsignal.ChannelGate(config.alerts))],
        config.detection,
        enricher=pamsignal.Enricher.from_config(config, False))


def replay(export, config):
    """One pass over the export through a fresh pipeline: (events,
    (counters, probation) kept, alerts that passed the policy, journal
    lines, seconds).
    The pipeline is gone after it, so peak RSS is that of one pass."""
    sink = CountingSink()
    pipeline = scan_pipeline(config, sink)
    export.seek(0)
    started = time.perf_counter()
    lines = 0
    for line in export:
        entry = pipeline.decode(line)
        if entry is not None:
            pipeline.process_entry(entry)
        lines += 1
    pipeline.drain()
    seconds = time.perf_counter() - started
    kept = (len(pipeline.detector.counters), len(pipeline.detector.probation))
    return pipeline.events, kept, sink.alerts, lines, seconds


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000000
    replays = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if count < 1 or replays < 1:
        raise SystemExit(__doc__)
    config = pamsignal.default_config()
    rates = []
    with tempfile.TemporaryFile() as export:
        for line in attack_lines(count):  # written first, not timed
            export.write(line + b"\n")
        for _ in range(replays):
            # A shared machine is noisy: the median of a few replays.
            events, kept, alerts, lines, seconds = replay(export, config)
            rates.append((events / seconds, lines / seconds))
    events_rate, lines_rate = sorted(rates)[(len(rates) - 1) // 2]
    print("addresses: %d, journal lines: %d, events: %d, Python %s" % (
        count, lines, events, sys.version.split()[0]))
    print("replays (events/s): %s" % ", ".join(
        "%.0f" % rate for rate, _ in rates))
    print("%-36s %10.0f" % ("journal lines per second (median)",
                            lines_rate))
    print("%-36s %10.0f" % ("events per second (median)", events_rate))
    print("%-36s %10s" % ("counters / probation kept (bounded)",
                          "%d / %d" % kept))
    print("%-36s %10d" % ("alerts after the default policy", alerts))
    print("%-36s %10.1f MiB" % ("peak RSS", peak_rss_mib()))
    stage_costs(min(count, 100000))


def stage_costs(count):
    """Microseconds per attempt each stage adds, streamed as in a replay
    of `count` attempts: decoding alone, then parsing on top, then the
    whole pipeline less the enrichment or the failure counters (best of
    3 each)."""
    config = pamsignal.default_config()
    lines = list(attack_lines(count))

    def best(step, change=None):
        return stages.best_us(lines, lambda: scan_pipeline(
            config, CountingSink()), step, change) * len(lines) / count

    def without_enrichment(pipeline):
        pipeline.enricher = None

    def without_counters(pipeline):
        pipeline.detector.observe = lambda event: []

    decoding, parsed, total = best(stages.decoding), \
        best(stages.parsing), best(stages.processing)
    print("per attempt, what each stage adds (best of 3 replays of %d):"
          % count)
    for name, cost in (
            ("decoding the two JSON lines", decoding),
            ("parsing them", parsed - decoding),
            ("enrichment (no database)",
             total - best(stages.processing, without_enrichment)),
            ("failure counters", total - best(stages.processing,
                                              without_counters)),
            ("whole pipeline", total)):
        print("  %-34s %8.1f us" % (name, cost))


if __name__ == "__main__":
    main()
