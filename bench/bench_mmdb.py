"""Lookups per second: pamsignal's MaxMind DB reader against the official
`maxminddb` package in its pure-Python mode (MODE_MMAP; MODE_MMAP_EXT is
its C extension, shown for scale when it is built).

A generated IPv6 database (record size 28) holds NETWORKS networks (IPv4
/24s and IPv6 /48s) with ASN+country records in the GeoLite2 shape, about
2,000 distinct organisations; LOOKUPS random addresses are looked up once
each ("no cache": every address new) and then a working set of 1,000
addresses is looked up over and over ("repeat": the cache answers).

    pip install maxminddb            # only for this comparison
    python3 bench/bench_mmdb.py [NETWORKS] [LOOKUPS]

Run on demand; never a timed assertion.
"""
import os
import random
import socket
import struct
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, ".."))

import pamsignal  # noqa: E402
from mmdb_writer import MMDBWriter, Typed  # noqa: E402

COUNTRIES = ("US", "DE", "VN", "FR", "GB", "NL", "JP", "BR", "IN", "SG")


def network_of(n):
    """The n-th network of the database: three IPv4 /24s to an IPv6 /48."""
    if n % 4:
        return "%d.%d.%d.0/24" % (1 + n % 222, (n >> 8) & 255, n & 255)
    return "2001:%x:%x::/48" % (n >> 16, n & 0xFFFF)


def build(networks, rng):
    writer = MMDBWriter(ip_version=6, record_size=28,
                        database_type="GeoLite2-ASN-Country-Bench")
    for n in range(networks):
        asn = 1000 + rng.randrange(2000)
        record = {
            "autonomous_system_number": Typed("uint32", asn),
            "autonomous_system_organization": "ORG-%d Networks" % asn,
            "country": {"iso_code": COUNTRIES[asn % len(COUNTRIES)],
                        "geoname_id": Typed("uint32", 6252001 + asn % 10),
                        "names": {"en": "Country %d" % (asn % 10)}},
        }
        writer.insert(network_of(n), record)
    return writer.to_bytes()


def addresses(count, networks, rng):
    """Random hosts: nine in ten inside a network of the database, the
    rest anywhere in the IPv4 space (mostly not found)."""
    found = []
    for _ in range(count):
        if rng.random() < 0.1:
            found.append(socket.inet_ntoa(struct.pack(
                ">I", rng.randrange(1 << 24, 224 << 24))))
            continue
        network = network_of(rng.randrange(networks))
        if ":" in network:
            found.append(network.replace("::/48", ":%x::%x" % (
                rng.randrange(65536), rng.randrange(1, 65536))))
        else:
            found.append(network.replace(".0/24", ".%d" % rng.randrange(
                1, 255)))
    return found


def rate(lookup, targets):
    started = time.perf_counter()
    for address in targets:
        lookup(address)
    return len(targets) / (time.perf_counter() - started)


def main(argv):
    networks = int(argv[1]) if len(argv) > 1 else 100000
    lookups = int(argv[2]) if len(argv) > 2 else 50000
    rng = random.Random(5)
    started = time.perf_counter()
    database = build(networks, rng)
    built_s = time.perf_counter() - started
    fresh = addresses(lookups, networks, rng)
    working = addresses(1000, networks, rng)
    repeat = [working[rng.randrange(len(working))] for _ in range(lookups)]
    handle = tempfile.NamedTemporaryFile(suffix=".mmdb", delete=False)
    with handle:
        handle.write(database)
    print("command: python3 bench/bench_mmdb.py %d %d" % (networks, lookups))
    print("Python %s; database: %d networks, %d bytes (built in %.1f s)"
          % (sys.version.split()[0], networks, len(database), built_s))
    rows = []
    try:
        ours = pamsignal.MMDBReader.open(handle.name)
        ours_nocache = pamsignal.MMDBReader.open(handle.name)
        ours_nocache.cache = _NoCache()
        ours_nocache.records = _NoCache()
        rows.append(("pamsignal MMDBReader", rate(ours_nocache.lookup, fresh),
                     rate(ours.lookup, repeat)))
        try:
            import maxminddb
        except ImportError:
            print("maxminddb is not installed: pip install maxminddb")
        else:
            theirs = maxminddb.open_database(handle.name, maxminddb.MODE_MMAP)
            rows.append(("maxminddb %s MODE_MMAP (pure Python)"
                         % maxminddb.__version__, rate(theirs.get, fresh),
                         rate(theirs.get, repeat)))
            try:
                ext = maxminddb.open_database(handle.name,
                                              maxminddb.MODE_MMAP_EXT)
            except (ImportError, ValueError):
                pass
            else:
                rows.append(("maxminddb MODE_MMAP_EXT (C)", rate(
                    ext.get, fresh), rate(ext.get, repeat)))
        for check in fresh[:2000]:
            if rows[1:] and ours.lookup(check) != theirs.get(check):
                raise SystemExit("readers disagree on %s" % check)
    finally:
        os.unlink(handle.name)
    print("%-42s %14s %14s" % ("reader", "no cache /s", "repeat /s"))
    for name, cold, warm in rows:
        print("%-42s %14.0f %14.0f" % (name, cold, warm))
    return 0


class _NoCache(dict):
    """A cache that never keeps anything: every lookup walks and decodes."""

    def __setitem__(self, key, value):
        pass

    def popitem(self, last=True):
        raise KeyError("empty")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
