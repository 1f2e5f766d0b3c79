"""The MaxMind DB reader: every data type and record size, IPv4 in IPv6
trees, prefix boundaries, replaced and missing files, and broken or hostile
files (each must give DatabaseError, never another exception or a hang).
Databases are built with tests/mmdb_writer.py; where the `maxminddb`
package is installed, it reads the same files as a second opinion."""
import ipaddress
import os
import random
import socket
import tracemalloc

import pytest

from mmdb_writer import (MMDBWriter, Typed, control, encode,
                         heavy_records_database, pack_node, pointer,
                         raw_database)
from support import pamsignal

DatabaseError = pamsignal.DatabaseError

EVERY_TYPE = {
    "text": "héllo wörld", "empty": "", "long": "x" * 70000,
    "double": -1.25, "float": Typed("float", 0.5),
    "bytes": b"\x00\xffraw", "no_bytes": b"",
    "u16": Typed("uint16", 65535), "u16_zero": Typed("uint16", 0),
    "u32": Typed("uint32", 4294967295),
    "u64": Typed("uint64", 18446744073709551615),
    "u128": Typed("uint128", (1 << 128) - 1),
    "i32_negative": Typed("int32", -2147483648),
    "i32_short": Typed("int32", 300),
    "true": True, "false": False,
    "array": [1, "two", [3.0, {"four": 4}]], "no_array": [],
    "map": {"nested": {"deeper": {"key": "value"}}}, "no_map": {},
}

EXPECTED = dict(EVERY_TYPE, float=0.5, u16=65535, u16_zero=0,
                u32=4294967295, u64=18446744073709551615,
                u128=(1 << 128) - 1, i32_negative=-2147483648,
                i32_short=300)


def reader_of(data):
    return pamsignal.MMDBReader(data, "test.mmdb")


def small_database(ip_version=6, record_size=28, share=True):
    writer = MMDBWriter(ip_version=ip_version, record_size=record_size,
                        share=share)
    writer.insert("1.2.3.0/24", EVERY_TYPE)
    writer.insert("1.2.3.128/25", {"half": "upper"})
    writer.insert("10.0.0.0/8", {"ten": 10})
    if ip_version == 6:
        writer.insert("2001:db8::/32", {"six": True})
        writer.insert("2001:db8:1::/48", {"six": "more specific"})
    return writer.to_bytes()


@pytest.mark.parametrize("record_size", [24, 28, 32])
@pytest.mark.parametrize("ip_version", [4, 6])
@pytest.mark.parametrize("share", [True, False])
def test_every_type_in_every_layout(record_size, ip_version, share):
    reader = reader_of(small_database(ip_version, record_size, share))
    assert reader.metadata["record_size"] == record_size
    assert reader.metadata["ip_version"] == ip_version
    assert reader.lookup("1.2.3.4") == EXPECTED
    assert type(reader.lookup("1.2.3.4")["true"]) is bool
    assert reader.lookup("1.2.3.200") == {"half": "upper"}
    assert reader.lookup("10.255.255.255") == {"ten": 10}
    assert reader.lookup("11.0.0.0") is None
    if ip_version == 6:
        assert reader.lookup("2001:db8:ffff::1") == {"six": True}
        assert reader.lookup("2001:db8:1:2::3") == {"six": "more specific"}
        assert reader.lookup("2001:db9::") is None


def test_prefix_boundaries_and_lengths():
    reader = reader_of(small_database(ip_version=4, record_size=24))
    # The /25 inside the /24 splits it: each half answers as a /25.
    assert reader.lookup_prefix("1.2.3.0") == (EXPECTED, 25)
    assert reader.lookup_prefix("1.2.3.127") == (EXPECTED, 25)
    assert reader.lookup_prefix("1.2.3.128") == ({"half": "upper"}, 25)
    assert reader.lookup_prefix("1.2.3.255") == ({"half": "upper"}, 25)
    assert reader.lookup("1.2.2.255") is None
    assert reader.lookup("1.2.4.0") is None
    assert reader.lookup_prefix("9.255.255.255")[0] is None
    assert reader.lookup_prefix("10.0.0.0") == ({"ten": 10}, 8)


def test_ipv4_lives_at_the_start_of_an_ipv6_tree():
    reader = reader_of(small_database(ip_version=6))
    assert reader.ipv4_start < reader.node_count
    # The same networks through the 128-bit path ::a.b.c.d ...
    assert reader.lookup("::1.2.3.4") == EXPECTED
    # ... and IPv4-mapped addresses are the IPv4 address itself.
    assert reader.lookup("::ffff:1.2.3.200") == {"half": "upper"}
    assert reader.lookup_prefix("1.2.3.200")[1] == 25
    assert reader.lookup_prefix("::1.2.3.200")[1] == 96 + 25


def test_ipv4_start_of_an_ipv6_tree_without_ipv4():
    writer = MMDBWriter(ip_version=6)
    writer.insert("2001:db8::/32", {"six": True})
    reader = reader_of(writer.to_bytes())
    assert reader.ipv4_start == reader.node_count  # empty: not found
    assert reader.lookup("1.2.3.4") is None


def test_addresses_the_database_cannot_answer():
    reader = reader_of(small_database(ip_version=4))
    with pytest.raises(ValueError, match="IPv6 address cannot be looked up"):
        reader.lookup("2001:db8::1")
    for bad in ("1.2.3", "example.com", "1.2.3.4.5", "", "::g"):
        with pytest.raises(ValueError, match="not an IP address"):
            reader.lookup(bad)


def test_answers_are_cached_and_the_cache_is_bounded():
    reader = reader_of(small_database())
    first = reader.lookup("1.2.3.4")
    assert reader.lookup("1.2.3.4") is first
    for n in range(pamsignal.MMDB_CACHE_SIZE + 100):
        reader.lookup("10.0.%d.%d" % (n >> 8, n & 255))
    assert len(reader.cache) == pamsignal.MMDB_CACHE_SIZE
    assert reader.lookup("10.0.0.1") == {"ten": 10}


def test_a_file_is_mapped_and_closed(tmp_path):
    path = tmp_path / "t.mmdb"
    path.write_bytes(small_database())
    reader = pamsignal.MMDBReader.open(str(path))
    assert reader.lookup("1.2.3.4") == EXPECTED
    assert reader.name == str(path)
    reader.close()
    with pytest.raises(ValueError):
        reader.buffer[0]  # the mapping is gone


@pytest.mark.parametrize("content, message", [
    (None, "cannot read .*No such file"),
    (b"", "cannot read .*empty"),
    (b"hello world", "not a MaxMind DB file"),
])
def test_unopenable_files(tmp_path, content, message):
    path = tmp_path / "t.mmdb"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatabaseError, match=message):
        pamsignal.MMDBReader.open(str(path))


# ---------------------------------------------------------------- maxminddb


def test_same_answers_as_the_official_reader(tmp_path):
    maxminddb = pytest.importorskip(
        "maxminddb", reason="pip install maxminddb (a second opinion)")
    rng = random.Random(7)
    for ip_version, record_size in ((4, 24), (6, 28), (6, 32)):
        writer = MMDBWriter(ip_version=ip_version, record_size=record_size)
        for n in range(300):
            length = rng.randrange(8, 30)
            address = rng.randrange(1 << 32) >> (32 - length) << (32 - length)
            writer.insert("%d.%d.%d.%d/%d" % (
                address >> 24, address >> 16 & 255, address >> 8 & 255,
                address & 255, length), dict(EVERY_TYPE, n=n) if n % 7 == 0
                else {"n": n, "name": "net %d" % (n % 13)})
        path = str(tmp_path / ("db%d%d.mmdb" % (ip_version, record_size)))
        with open(path, "wb") as handle:
            handle.write(writer.to_bytes())
        theirs = maxminddb.open_database(path, maxminddb.MODE_MMAP)
        ours = pamsignal.MMDBReader.open(path)
        assert ours.metadata["node_count"] == theirs.metadata().node_count
        for _ in range(2000):
            address = "%d.%d.%d.%d" % tuple(rng.randrange(256)
                                            for _ in range(4))
            assert ours.lookup_prefix(address) == tuple(
                theirs.get_with_prefix_len(address)), address
        theirs.close()
        ours.close()


# ---------------------------------------------------------------- hostile


def assert_only_database_errors(data, addresses=("1.2.3.4", "1.2.3.200",
                                                 "10.1.1.1", "2001:db8::1")):
    """Opening and looking up either works or says DatabaseError."""
    try:
        reader = reader_of(data)
    except DatabaseError:
        return "refused"
    for address in addresses:
        try:
            reader.lookup(address)
        except DatabaseError:
            pass
        except ValueError as error:  # an IPv6 address, IPv4 database
            assert "IPv6" in str(error)
    return "opened"


def compact_database(record_size):
    """Every type but the long text, a few networks: a few hundred bytes."""
    writer = MMDBWriter(ip_version=6, record_size=record_size)
    writer.insert("1.2.3.0/24", dict(EVERY_TYPE, long="short"))
    writer.insert("1.2.3.128/25", {"half": "upper"})
    writer.insert("2001:db8::/32", {"six": [True, 1.5]})
    return writer.to_bytes()


@pytest.mark.parametrize("record_size", [24, 28, 32])
def test_truncated_at_every_byte_is_refused(record_size):
    data = compact_database(record_size)
    assert assert_only_database_errors(data) == "opened"
    for cut in range(len(data)):
        with pytest.raises(DatabaseError):
            reader_of(data[:cut])


@pytest.mark.parametrize("record_size", [24, 28, 32])
def test_any_flipped_byte_gives_an_answer_or_database_error(record_size):
    data = bytearray(compact_database(record_size))
    for position in range(len(data)):
        for flip in (0xFF, 0x20, 0x01):
            broken = bytearray(data)
            broken[position] ^= flip
            assert_only_database_errors(bytes(broken))


def test_random_bytes_after_a_valid_tree_give_database_errors():
    rng = random.Random(11)
    tree = pack_node(24, 1 + 16, 1 + 16)  # both halves: data offset 0
    for _ in range(3000):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        assert_only_database_errors(raw_database(tree, junk),
                                    ("1.2.3.4", "200.1.1.1"))


def one_record_database(data):
    """An IPv4 database whose whole space answers data-section offset 0."""
    return raw_database(pack_node(24, 1 + 16, 1 + 16), data)


@pytest.mark.parametrize("data, message", [
    (pointer(0), "pointer to a pointer"),
    (encode({"loop": "x"})[:1] + encode("loop") + pointer(0),
     "nested deeper than 512"),
    (control("utf8_string", 16000000) + b"abc", "larger than 2097152"),
    (control("utf8_string", 1000000) + b"abc", "runs past the end"),
    (control("bytes", 70000) + b"abc", "runs past the end"),
    (control("map", 16000000) + b"abc", "more than 65536 values"),
    (control("array", 16843036), "more than 65536 values"),
    (control("array", 1000) + encode(1), "1000 items cannot fit"),
    (pointer(5000), "outside the section"),
    (control("double", 4) + b"\0" * 4, "double of 4 bytes"),
    (control("float", 8) + b"\0" * 8, "float of 8 bytes"),
    (control("uint16", 3) + b"\0" * 3, "uint16 of 3 bytes"),
    (control("uint128", 17) + b"\0" * 17, "uint128 of 17 bytes"),
    (control("int32", 5) + b"\0" * 5, "int32 of 5 bytes"),
    (control("boolean", 2), "boolean of value 2"),
    (bytes([0x00, 0x00]), "invalid extended type 7"),
    (bytes([0x00, 0x09]), "invalid extended type 16"),
    (control("container", 0), "unexpected data cache container"),
    (control("end_marker", 0), "unexpected end marker"),
    (control("map", 1) + encode(5) + encode("v"), "key is not a string"),
    (control("map", 1) + encode("k"), "offset outside the data section"),
    (bytes([0x5D]), "a size of 1 bytes runs past"),
    (bytes([0x00]), "extended type past the end"),
    (bytes([0x38, 0, 0]), "a pointer of 4 bytes runs past"),
])
def test_hostile_records_are_refused_clearly(data, message):
    reader = reader_of(one_record_database(data))
    with pytest.raises(DatabaseError, match=message):
        reader.lookup("1.2.3.4")


def test_pointers_that_multiply_work_are_cut_short():
    # Level n: an array of 16 pointers to level n-1; 8 levels would be
    # 16**8 values decoded from a few hundred bytes.
    data = encode("leaf")
    level_at = 0
    for _ in range(8):
        next_at = len(data)
        data += control("array", 16) + pointer(level_at) * 16
        level_at = next_at
    reader = reader_of(raw_database(
        pack_node(24, 1 + 16 + level_at, 1 + 16 + level_at), data))
    with pytest.raises(DatabaseError, match="more than 65536 values"):
        reader.lookup("1.2.3.4")


def test_shared_values_are_charged_each_time_they_are_used():
    # A small map is decoded once and then taken from the cache of shared
    # values, yet each use still counts against the record's limits.
    small = encode({"k%d" % n: n for n in range(30)})  # 61 values
    for uses, fits in ((1000, True), (1100, False)):
        data = small + control("array", uses) + pointer(0) * uses
        top = len(small)
        reader = reader_of(raw_database(pack_node(24, 1 + 16 + top,
                                                  1 + 16 + top), data))
        if fits:
            record = reader.lookup("1.2.3.4")
            assert len(record) == uses and record[-1]["k29"] == 29
        else:
            with pytest.raises(DatabaseError, match="more than 65536"):
                reader.lookup("1.2.3.4")


def test_pointers_to_one_long_text_are_cut_short():
    data = encode("x" * 60000)
    top = len(data)
    data += control("array", 100) + pointer(0) * 100
    reader = reader_of(raw_database(pack_node(24, 1 + 16 + top,
                                              1 + 16 + top), data))
    with pytest.raises(DatabaseError, match="larger than 2097152 bytes"):
        reader.lookup("1.2.3.4")


def nested_arrays(depth):
    return control("array", 1) * depth + encode("bottom")


def test_nesting_up_to_512_is_read_and_deeper_refused():
    value = reader_of(one_record_database(nested_arrays(512))).lookup(
        "1.2.3.4")
    for _ in range(512):
        (value,) = value
    assert value == "bottom"
    reader = reader_of(one_record_database(nested_arrays(513)))
    with pytest.raises(DatabaseError, match="nested deeper than 512"):
        reader.lookup("1.2.3.4")


def test_a_shared_value_cannot_smuggle_nesting_past_the_limit():
    # Ten nested arrays, shared: decoded (and cached) near the top, then
    # pointed at again 505 levels down, where 505 + 10 is too deep.
    shared = nested_arrays(10)
    top = len(shared)
    for levels, fits in ((500, True), (505, False)):
        data = shared + control("array", 2) + pointer(0) + control(
            "array", 1) * levels + pointer(0)
        reader = reader_of(raw_database(pack_node(24, 1 + 16 + top,
                                                  1 + 16 + top), data))
        if fits:
            assert len(reader.lookup("1.2.3.4")) == 2
        else:
            with pytest.raises(DatabaseError, match="deeper than 512"):
                reader.lookup("1.2.3.4")


def test_records_outside_the_data_section_are_refused():
    data = encode("only")
    for record, message in (
            (1 + 1, "record 2 points outside"),          # node_count + 1
            (1 + 15, "record 16 points outside"),         # node_count + 15
            (1 + 16 + len(data), "points outside the data section"),
            (1 + 16 + len(data) + 3, "points outside the data section"),
            (1 << 24 - 1, "points outside the data section")):
        reader = reader_of(raw_database(pack_node(24, record, record), data))
        with pytest.raises(DatabaseError, match=message):
            reader.lookup("1.2.3.4")


def test_a_tree_that_runs_out_of_address_bits_is_corrupt():
    # Node 0 points to itself for ever: 32 bits, still inside the tree.
    reader = reader_of(raw_database(pack_node(24, 0, 0), encode("x")))
    with pytest.raises(DatabaseError, match="32 address bits end in node 0"):
        reader.lookup("1.2.3.4")


@pytest.mark.parametrize("metadata, message", [
    ({"node_count": None}, "lacks node_count"),
    ({"node_count": "one"}, "lacks node_count"),
    ({"record_size": Typed("uint16", 20)}, "record size 20"),
    ({"ip_version": Typed("uint16", 5)}, "IP version 5"),
    ({"binary_format_major_version": Typed("uint16", 3)},
     "format version 3, not 2"),
    ({"node_count": Typed("uint32", 1000)}, "tree of 1000 nodes does not"),
    ({"node_count": Typed("uint32", 4294967295)}, "does not fit"),
    ({"node_count": Typed("int32", -1)}, "negative node count"),
])
def test_bad_metadata_is_refused(metadata, message):
    data = raw_database(pack_node(24, 1, 1), encode("x"), **metadata)
    with pytest.raises(DatabaseError, match=message):
        reader_of(data)


def test_metadata_that_is_not_a_map_or_is_broken():
    tree = pack_node(24, 1, 1) + bytes(16)
    for tail, message in ((encode(["a", "list"]), "not a map"),
                          (control("map", 3) + encode("k"),
                           "unreadable metadata"),
                          (pointer(0), "unreadable metadata: .*pointer to a "
                           "pointer")):
        with pytest.raises(DatabaseError, match=message):
            reader_of(tree + b"\xab\xcd\xefMaxMind.com" + tail)


def test_separator_must_be_zero():
    data = bytearray(raw_database(pack_node(24, 1, 1), encode("x")))
    data[6 + 3] = 1
    with pytest.raises(DatabaseError, match="no data section separator"):
        reader_of(bytes(data))


def test_the_last_marker_counts_and_metadata_pointers_are_its_own():
    # A marker inside the data section must not be taken for the real one.
    data = encode("\xab\xcd\xefMaxMind.com")
    good = raw_database(pack_node(24, 1 + 16, 1 + 16), data)
    assert reader_of(good).lookup("1.2.3.4") == "\xab\xcd\xefMaxMind.com"


# ---------------------------------------------------------------- files


def test_a_replaced_file_is_read_again_and_a_missing_one_warned_once(
        tmp_path, capsys):
    path = str(tmp_path / "GeoLite2-ASN.mmdb")
    database = pamsignal.GeoDatabase(path, "asn_db")
    assert database.current(1000.0) is None
    assert database.current(1000.0 + pamsignal.GEOIP_RECHECK_S) is None
    warnings = capsys.readouterr().err
    assert warnings.count("warning: asn_db %s unusable" % path) == 1
    assert "No such file" in warnings

    first = MMDBWriter(ip_version=4)
    first.insert("1.2.3.0/24", {"version": 1})
    with open(path, "wb") as handle:
        handle.write(first.to_bytes())
    assert database.current(1006.0) is None  # not checked again yet
    assert database.current(1010.0).lookup("1.2.3.4") == {"version": 1}

    second = MMDBWriter(ip_version=4)
    second.insert("1.2.3.0/24", {"version": 2})
    with open(path + ".tmp", "wb") as handle:
        handle.write(second.to_bytes())
    os.replace(path + ".tmp", path)  # what geoipupdate does
    assert database.current(1011.0).lookup("1.2.3.4") == {"version": 1}
    assert database.current(1020.0).lookup("1.2.3.4") == {"version": 2}

    with open(path + ".tmp", "wb") as handle:
        handle.write(b"not a database")
    os.replace(path + ".tmp", path)
    assert database.current(1030.0) is None
    assert "not a MaxMind DB file" in capsys.readouterr().err
    assert database.current(1040.0) is None
    assert capsys.readouterr().err == ""  # said once
    database.close()


def test_a_clock_that_went_back_checks_again(tmp_path):
    path = str(tmp_path / "c.mmdb")
    database = pamsignal.GeoDatabase(path)
    database.current(5000.0)
    with open(path, "wb") as handle:
        handle.write(small_database())
    assert database.current(10.0) is not None


# ---------------------------------------------------------------- meaning


@pytest.mark.parametrize("address, scope", [
    ("10.1.2.3", "private"), ("172.31.255.255", "private"),
    ("172.32.0.1", "public"), ("192.168.1.1", "private"),
    ("100.64.0.1", "cgnat"), ("100.127.255.255", "cgnat"),
    ("100.128.0.1", "public"), ("127.0.0.1", "loopback"),
    ("169.254.169.254", "link_local"), ("192.0.2.1", "documentation"),
    ("198.51.100.7", "documentation"), ("203.0.113.5", "documentation"),
    ("198.18.0.1", "benchmarking"), ("224.0.0.1", "multicast"),
    ("255.255.255.255", "reserved"), ("0.0.0.0", "unspecified"),
    ("8.8.8.8", "public"), ("::1", "loopback"), ("::", "unspecified"),
    ("fe80::1", "link_local"), ("fd00::1", "private"),
    ("2001:db8::5", "documentation"), ("2001:db9::", "public"),
    ("ff02::1", "multicast"), ("2a01:4f8::1", "public"),
    ("::ffff:10.0.0.1", "private"), ("not an address", None),
])
def test_special_ranges_need_no_lookup(address, scope):
    assert pamsignal.address_scope(address) == scope


def test_special_ranges_agree_with_the_ipaddress_module():
    # The ranges are indexed by first byte: every edge and many random
    # addresses must give what a plain scan of the networks gives.
    networks = [(ipaddress.ip_network("%s/%d" % (
        socket.inet_ntop(socket.AF_INET6 if len(net) == 16 else
                         socket.AF_INET, net), length)), label)
        for net, length, label in pamsignal.SPECIAL_RANGES]
    rng = random.Random(7)
    addresses = [ipaddress.ip_address(rng.getrandbits(bits))
                 for bits in (32, 128) for _ in range(20000)]
    for network, _ in networks:
        addresses += [network.network_address, network.broadcast_address,
                      network.network_address - 1 if int(
                          network.network_address) else
                      network.network_address,
                      network.broadcast_address + 1 if int(
                          network.broadcast_address) < (
                          1 << network.max_prefixlen) - 1 else
                      network.broadcast_address]
    for address in addresses:
        expected = next((label for network, label in networks
                         if address in network), "public")
        assert pamsignal.address_scope(str(address)) == expected, address


@pytest.mark.parametrize("records, expected", [
    # GeoLite2 / GeoIP2 ASN, and DB-IP Lite ASN (same keys)
    ([{"autonomous_system_number": 15169,
       "autonomous_system_organization": "GOOGLE"}],
     (15169, "GOOGLE", None, None)),
    # GeoLite2 Country; anonymous proxies only have registered_country
    ([{"country": {"iso_code": "VN", "names": {"en": "Vietnam"}},
       "registered_country": {"iso_code": "US"}}],
     (None, None, "VN", None)),
    ([{"registered_country": {"iso_code": "de"}}],
     (None, None, "DE", None)),
    # GeoLite2 City
    ([{"city": {"names": {"en": "Hanoi", "de": "Hanoi"}},
       "country": {"iso_code": "VN"}}], (None, None, "VN", "Hanoi")),
    # IPinfo Lite, and the older IPinfo country_asn
    ([{"asn": "AS13335", "as_name": "Cloudflare, Inc.",
       "country": "United States", "country_code": "US"}],
     (13335, "Cloudflare, Inc.", "US", None)),
    ([{"asn": "AS24940", "as_name": "Hetzner Online GmbH",
       "country": "DE"}], (24940, "Hetzner Online GmbH", "DE", None)),
    # several databases: the first that has a field gives it
    ([{"autonomous_system_number": 64500}, None,
      {"country": {"iso_code": "FR"}, "autonomous_system_number": 1}],
     (64500, None, "FR", None)),
    # hostile shapes are ignored, not trusted
    ([{"autonomous_system_number": "AS-1", "country": {"iso_code": 7},
       "city": ["x"], "asn": -5}], (None, None, None, None)),
    ([{"autonomous_system_number": 1 << 40, "country": "Germany"}],
     (None, None, None, None)),
    # a database cannot make every event megabytes long
    ([{"as_name": "N" * 100000, "city": {"names": {"en": "C" * 300}}}],
     (None, "N" * 256, None, "C" * 256)),
])
def test_records_of_every_vendor_are_normalised(records, expected):
    assert tuple(pamsignal.context_from_records(records))[:4] == expected


def test_a_file_cut_short_in_place_is_never_read(tmp_path, capsys):
    # `cp new.mmdb GeoLite2-ASN.mmdb` truncates the mapped file: touching
    # a page past its new end would kill the process with SIGBUS.
    path = str(tmp_path / "cp.mmdb")
    big = MMDBWriter(ip_version=4)
    for n in range(2000):
        big.insert("10.%d.%d.0/24" % (n >> 8, n & 255), {"n": n, "pad": "x"
                                                        * 40})
    with open(path, "wb") as handle:
        handle.write(big.to_bytes())
    database = pamsignal.GeoDatabase(path, "asn_db")
    assert database.current(100.0).lookup("10.7.207.1") == {
        "n": 2000 - 1, "pad": "x" * 40}
    with open(path, "r+b") as handle:
        handle.truncate(4096)
    assert database.current(100.0) is None  # within the recheck interval
    assert "unusable" in capsys.readouterr().err
    with open(path, "wb") as handle:
        handle.write(small_database())
    assert database.current(110.0).lookup("1.2.3.200") == {"half": "upper"}
    database.close()


# ---------------------------------------------------------------- MaxMind's


def official_data(kind):
    """MaxMind's own test databases ("test-data" or "bad-data"), from the
    maxminddb source package that .ci/run unpacks."""
    root = os.environ.get("PAMSIGNAL_MMDB_TEST_DATA", "")
    folder = os.path.join(root, kind)
    if not root or not os.path.isdir(folder):
        reason = ("set PAMSIGNAL_MMDB_TEST_DATA to the tests/data folder of "
                  "the maxminddb source package (.ci/run does)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    found = []
    for directory, _, files in os.walk(folder):
        found += [os.path.join(directory, name) for name in sorted(files)
                  if name.endswith(".mmdb")]
    assert found, folder
    return found


def sample_addresses(theirs, ip_version, count, rng):
    """Addresses at both ends of the database's first networks, and
    random ones."""
    addresses = []
    try:
        for number, (network, _) in enumerate(theirs):
            if number >= count:
                break
            addresses += [str(network.network_address),
                          str(network.broadcast_address)]
    except Exception:  # the official reader chokes on some test files
        pass
    for _ in range(count):
        addresses.append("%d.%d.%d.%d" % tuple(rng.randrange(256)
                                               for _ in range(4)))
        if ip_version == 6:
            addresses.append(":".join("%x" % rng.randrange(65536)
                                      for _ in range(8)))
    return addresses


def answer(lookup, address):
    try:
        return tuple(lookup(address))
    except Exception as error:  # which kind, for the comparison
        return ("error", "IPv6" in str(error) and isinstance(
            error, ValueError))


def test_maxminds_test_databases_give_the_official_answers():
    maxminddb = pytest.importorskip(
        "maxminddb", reason="pip install maxminddb (a second opinion)")
    rng = random.Random(5)
    for path in official_data("test-data"):
        try:
            theirs = maxminddb.open_database(path, maxminddb.MODE_MMAP)
        except maxminddb.InvalidDatabaseError:
            with pytest.raises(DatabaseError):
                pamsignal.MMDBReader.open(path)
            continue
        ours = pamsignal.MMDBReader.open(path)
        # Files made to be slow to decode get a few addresses only.
        heavy = "limit" in path or "dos" in path
        for address in sample_addresses(theirs, ours.ip_version,
                                        2 if heavy else 60, rng):
            ours_said = answer(ours.lookup_prefix, address)
            theirs_said = answer(theirs.get_with_prefix_len, address)
            assert ours_said == theirs_said, (path, address)
            if ours_said[0] == "error" and not ours_said[1]:
                with pytest.raises(DatabaseError):
                    ours.lookup(address)
        ours.close()
        theirs.close()


def test_maxminds_bad_databases_give_database_errors_only():
    rng = random.Random(6)
    refused = 0
    for path in official_data("bad-data"):
        try:
            reader = pamsignal.MMDBReader.open(path)
        except DatabaseError:
            refused += 1
            continue
        for _ in range(300):
            address = "%d.%d.%d.%d" % tuple(rng.randrange(256)
                                            for _ in range(4))
            try:
                reader.lookup(address)
            except DatabaseError:
                pass
        reader.close()
    assert refused >= 8  # most of them are broken beyond opening


def test_maxminds_geolite2_records_are_normalised():
    paths = {os.path.basename(path): path
             for path in official_data("test-data")}
    readers = [pamsignal.MMDBReader.open(paths[name]) for name in (
        "GeoLite2-ASN-Test.mmdb", "GeoLite2-City-Test.mmdb")]

    def context(address):
        return tuple(pamsignal.context_from_records(
            [reader.lookup(address) for reader in readers]))[:4]
    assert context("89.160.20.112") == (29518, "Bredband2 AB", "SE",
                                        "Link\u00f6ping")
    assert context("1.128.0.1") == (1221, "Telstra Pty Ltd", None, None)
    assert context("2001:218::1") == (None, None, "JP", None)
    for reader in readers:
        reader.close()


def traced_growth(action):
    """Bytes still allocated after `action()` that were not before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_addresses_of_one_heavy_record_share_one_copy():
    # Every address of a 12 KB file answers one record of ~90 KB in
    # memory: kept once, not once per address (an attacker's /64).
    reader = reader_of(heavy_records_database(1))
    first = reader.lookup("1.0.0.1")
    assert len(first) == 6 and first[0] == "A" * 4000 and \
        first[-1] == [{}] * 1000

    def many():
        for n in range(400):
            assert reader.lookup("2.0.%d.%d" % (n >> 8, n & 255)) is first
    assert traced_growth(many) < 1024 * 1024  # the old cache: 36 MB


def test_records_kept_are_bounded_by_memory_not_count(monkeypatch):
    monkeypatch.setattr(pamsignal, "MMDB_RECORD_CACHE_BYTES",
                        2 * 1024 * 1024, raising=False)
    reader = reader_of(heavy_records_database(256))

    def many():
        for n in range(256):  # 256 records: each decoded on its own
            assert reader.lookup("%d.0.0.1" % n)[-1] == [{}] * 1000
    assert traced_growth(many) < 3 * 1024 * 1024  # the old cache: 23 MB
    assert 0 < reader.records_bytes <= 2 * 1024 * 1024
    assert 1 < len(reader.records) < 256
    assert reader.lookup("255.0.0.1") is reader.lookup("255.1.2.3")


def test_a_record_past_the_limits_is_refused_clearly():
    data = control("utf8_string", 60000) + b"A" * 60000
    data += control("array", 40) + pointer(0) * 40  # 2.4 MB of text
    reader = reader_of(raw_database(pack_node(24, 1 + 16 + 60003,
                                              1 + 16 + 60003), data))
    with pytest.raises(DatabaseError, match="record larger than 2097152 "
                       "bytes"):
        reader.lookup("1.2.3.4")
    data = control("array", 70000) + bytes([0xE0]) * 70000
    reader = reader_of(one_record_database(data))
    with pytest.raises(DatabaseError, match="more than 65536 values"):
        reader.lookup("1.2.3.4")
