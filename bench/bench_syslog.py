#!/usr/bin/env python3
"""The syslog channel (a benchmark, not a test): how fast events are
rendered (CEF, LEEF, JSON in RFC 5424), how fast the sink delivers
batches to a real rsyslogd on loopback over UDP, TCP and TLS (each
batch confirmed by the collector closing after reading it), and how fast
a burst goes through the durable spool and the courier to the collector.
Uses the collector of tests/syslog_collector.py (rsyslog, rsyslog-gnutls)
and the certificates of tests/receivers.py.

Usage: python3 bench/bench_syslog.py [EVENTS]   (default 20000)
"""
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import pamsignal  # noqa: E402
import receivers  # noqa: E402
import syslog_collector  # noqa: E402
from needs import program  # noqa: E402


def event(number):
    return pamsignal.Event(
        action="login_failure", user="user%d" % number, reason="bad_password",
        source_ip="203.0.113.%d" % (number % 250), source_port=40000 + number,
        service="sshd", hostname="web1", pid=4242,
        timestamp_us=1795780000000000 + number, cursor="s=1;i=%x" % number,
        message="Failed password for user%d from 203.0.113.%d port %d ssh2"
        % (number, number % 250, 40000 + number))


def sink(collector, transport, ca_file, fmt="cef"):
    text = ("[channel:siem]\ntype = syslog\ntarget = %s://127.0.0.1:%d\n"
            "format = %s\n" % (transport, collector.port, fmt))
    if ca_file:
        text += "ca_file = %s\n" % ca_file
    (channel,) = pamsignal.parse_config(text).channels
    return pamsignal.SyslogSink(channel.name, channel.options)


def rendering(count):
    events = [event(n) for n in range(count)]
    for fmt in ("cef", "leef", "json"):
        layout = pamsignal.SyslogLayout(fmt, "rfc5424", 10, "pamsignal",
                                        None, False)
        started = time.perf_counter()
        for evt in events:
            pamsignal.render_syslog(evt, layout)
        print("render %-4s in RFC 5424: %8.0f events/s" % (
            fmt, count / (time.perf_counter() - started)))


def settled(collector, count):
    """The collector's messages once it has `count` of them, or once it
    wrote nothing new for two seconds (UDP loses some: best effort)."""
    seen, quiet_since = -1, time.monotonic()
    while True:
        found = collector.messages()
        if len(found) >= count:
            return found
        if len(found) != seen:
            seen, quiet_since = len(found), time.monotonic()
        elif time.monotonic() - quiet_since > 2:
            return found
        time.sleep(0.05)


def batches(collector, transport, ca_file, count):
    """The sink alone: MAX_BATCH events per send_batch, until the
    collector has written all of them."""
    channel = sink(collector, transport, ca_file)
    events = [(event(n), 0) for n in range(count)]
    before = len(collector.messages())
    started = time.perf_counter()
    size = pamsignal.SyslogSink.MAX_BATCH
    for first in range(0, count, size):
        channel.send_batch(events[first:first + size])
    sent = time.perf_counter() - started
    got = len(settled(collector, before + count)) - before
    written = time.perf_counter() - started
    channel.close()
    print("sink %-3s batches of %d: %8.0f events/s sent, %s written by "
          "rsyslog (%d of %d)" % (
              transport, size, count / sent, "%8.0f events/s" % (
                  got / written) if got == count else "some", got, count))
    return got


def through_spool(collector, transport, ca_file, count, directory):
    """A burst put in the spool (each alert fsynced), delivered by the
    courier in batches."""
    channel = sink(collector, transport, ca_file)
    spool = pamsignal.Spool(directory, count + 1, 86400)
    spool.open()
    started = time.perf_counter()
    for n in range(count):
        spool.put(event(n))
    spool.flush()
    spooled = time.perf_counter() - started
    courier = pamsignal.Courier(channel, spool)
    before = len(collector.messages())
    started = time.perf_counter()
    courier.start()
    while courier.delivered < count:
        time.sleep(0.01)
    delivered = time.perf_counter() - started
    courier.stop()
    got = len(collector.wait_for(before + count, timeout=120)) - before
    print("spool + courier %-3s: %8.0f alerts/s into the spool, %8.0f "
          "alerts/s delivered (%d written by rsyslog)" % (
              transport, count / spooled, count / delivered, got))


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    program(syslog_collector.RSYSLOGD, "rsyslog")
    program("openssl", "openssl")
    if not os.path.exists(syslog_collector.GTLS_DRIVER):
        sys.exit("%s is missing: apt-get install -y rsyslog-gnutls"
                 % syslog_collector.GTLS_DRIVER)
    print("%d events, Python %s" % (count, sys.version.split()[0]))
    rendering(count)
    with tempfile.TemporaryDirectory(prefix="pamsignal-bench-") as work:
        certs = receivers.make_cert(os.path.join(work, "certs"))
        for transport in ("udp", "tcp", "tls"):
            with syslog_collector.Collector(work, transport,
                                            certs=certs) as collector:
                ca_file = certs.ca_file if transport == "tls" else None
                batches(collector, transport, ca_file, count)
                if transport != "udp":
                    through_spool(collector, transport, ca_file,
                                  min(count, 5000),
                                  os.path.join(work, "spool-" + transport))


if __name__ == "__main__":
    main()
