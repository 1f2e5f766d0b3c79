#!/usr/bin/env python3
"""Alert delivery (a benchmark, not a test): how fast alerts are written
to a channel's durable spool (each one fsynced) and how fast the courier
delivers them to a local webhook receiver, over HTTP and over HTTPS with
a private CA. Uses the test receivers of tests/receivers.py.

Usage: python3 bench/bench_delivery.py [ALERTS]   (default 2000)
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
from needs import program  # noqa: E402


def alert(number):
    return pamsignal.Event(
        action="login_success", user="user%d" % number,
        source_ip="203.0.113.%d" % (number % 250), source_port=40000 + number,
        service="sshd", auth_method="publickey", hostname="web1",
        timestamp_us=1795780000000000 + number, cursor="s=1;i=%x" % number,
        message="Accepted publickey for user%d from 203.0.113.%d port %d "
        "ssh2" % (number, number % 250, 40000 + number))


def run(count, receiver, ca_file, directory):
    config = pamsignal.parse_config(
        "[channel:hook]\ntype = webhook\nurl = %s/hook\n%s" % (
            receiver.localhost_url,
            "ca_file = %s\n" % ca_file if ca_file else ""))
    (channel,) = config.channels
    sink = pamsignal.WebhookSink(channel.name, channel.options)
    spool = pamsignal.Spool(directory, count + 1, 86400)
    spool.open()
    started = time.perf_counter()
    for number in range(count):
        spool.put(alert(number))
    spool.flush()
    spooled = time.perf_counter() - started
    courier = pamsignal.Courier(sink, spool)
    started = time.perf_counter()
    courier.start()
    receiver.wait_for(count, timeout=600)
    while courier.delivered < count:
        time.sleep(0.01)
    delivered = time.perf_counter() - started
    courier.stop()
    return count / spooled, count / delivered


def main():
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    program("openssl", "openssl")
    work = tempfile.mkdtemp(prefix="pamsignal-bench-")
    certs = receivers.make_cert(os.path.join(work, "certs"))
    print("alerts: %d, Python %s" % (count, sys.version.split()[0]))
    for label, tls in (("http", None), ("https", certs)):
        with receivers.HttpReceiver(tls=tls) as receiver:
            put_rate, deliver_rate = run(
                count, receiver, tls and certs.ca_file,
                os.path.join(work, "spool-" + label))
        print("%-36s %10.0f" % ("spooled (fsync each) per second",
                                put_rate))
        print("%-36s %10.0f" % ("delivered over %s per second" % label,
                                deliver_rate))


if __name__ == "__main__":
    main()
