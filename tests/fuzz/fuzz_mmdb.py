"""Fuzz target: a MaxMind DB file through MMDBReader, lookups, the
context an event gets from the records, and `lookup --raw` output.

An input is the whole file. It must open or give DatabaseError; every
lookup must answer or give DatabaseError (ValueError only for an IPv6
address in an IPv4 tree, as documented); what answers must turn into a
well-formed source context and into JSON.
"""

import glob
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from mmdb_writer import MMDBWriter, Typed  # noqa: E402

pamsignal = harness.pamsignal

#: Looked up in every database: both ends of the space, the networks the
#: seeds hold, IPv4 inside IPv6 and an IPv4-mapped address.
ADDRESSES = ("0.0.0.0", "1.2.3.4", "1.2.3.200", "81.2.69.160",
             "255.255.255.255", "::", "2001:db8::1", "2001:db8:1::5",
             "::1.2.3.4", "::ffff:1.2.3.4", "2a02:cf40::1",
             "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")

_COUNTRY = re.compile(r"^[A-Z]{2}\Z")


def check_context(record):
    context = pamsignal.context_from_records([record])
    number = context.as_number
    assert number is None or (type(number) is int and 0 < number < 1 << 32)
    assert context.country is None or _COUNTRY.match(context.country)
    for text in (context.as_org, context.city):
        assert text is None or (type(text) is str and text and
                                len(text) <= pamsignal.MAX_CONTEXT_TEXT)
    provider = pamsignal.source_provider(number, context.as_org)
    assert provider is None or type(provider) is str


def check(data):
    try:
        reader = pamsignal.MMDBReader(data, "fuzz.mmdb")
    except pamsignal.DatabaseError:
        return
    pamsignal.escape_text(str(reader.metadata.get("database_type")))
    bits_of_tree = 128 if reader.ip_version == 6 else 32
    for address in ADDRESSES:
        try:
            record, prefix = reader.lookup_prefix(address)
        except pamsignal.DatabaseError:
            continue
        except ValueError:
            assert reader.ip_version == 4 and ":" in address and \
                not address.startswith("::ffff:")
            continue
        bits = 32 if ":" not in address or address.startswith("::ffff:") \
            else 128
        assert 0 <= prefix <= min(bits, bits_of_tree), prefix
        # What `lookup --raw` prints for it.
        json.loads(pamsignal.dumps_safe({
            "network": pamsignal._network_text(address, prefix),
            "record": pamsignal._plain_json(record)}))
        check_context(record)
        # The cache answers the same.
        assert reader.lookup_prefix(address) == (record, prefix)


EVERY_TYPE = {
    "autonomous_system_number": Typed("uint32", 24940),
    "autonomous_system_organization": "Hetzner Online GmbH",
    "country": {"iso_code": "DE", "names": {"en": "Germany"}},
    "city": {"names": {"en": "Falkenstein"}}, "asn": "AS15169",
    "double": -1.25, "float": Typed("float", 0.5), "bytes": b"\x00\xff",
    "u16": Typed("uint16", 65535), "u64": Typed("uint64", 1 << 63),
    "u128": Typed("uint128", 1 << 100), "i32": Typed("int32", -5),
    "true": True, "list": [1, "two", [3.0, {"four": 4}]], "empty": {},
}


def seeds():
    """Small databases in every layout (the fuzzer works on them), then
    MaxMind's own test and bad databases when PAMSIGNAL_MMDB_TEST_DATA
    names them (as tests/check.sh does)."""
    found = []
    for ip_version in (4, 6):
        for record_size in (24, 28, 32):
            for share in (True, False):
                writer = MMDBWriter(ip_version=ip_version,
                                    record_size=record_size, share=share)
                writer.insert("1.2.3.0/24", EVERY_TYPE)
                writer.insert("1.2.3.128/25", {"country_code": "us"})
                if ip_version == 6:
                    writer.insert("2001:db8::/32", {"asn": 64500})
                found.append(writer.to_bytes())
    root = os.environ.get("PAMSIGNAL_MMDB_TEST_DATA", "")
    for path in sorted(glob.glob(os.path.join(root, "*", "**", "*.mmdb"),
                                 recursive=True)) if root else ():
        if os.path.getsize(path) <= 64 * 1024:
            with open(path, "rb") as f:
                found.append(f.read())
    return found


if __name__ == "__main__":
    harness.fuzz(check, seeds)
