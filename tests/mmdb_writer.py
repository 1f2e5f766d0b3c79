"""A small MaxMind DB (format 2) writer for the tests: every data type,
record sizes 24, 28 and 32, IPv4 and IPv6 trees (IPv4 networks live at
::/96 of an IPv6 tree, without MaxMind's ::ffff:0:0/96 and 2002::/16
aliases), map keys and repeated records shared through pointers.

Also the pieces a test needs to build a broken file by hand:
control(), pointer(), encode() and metadata_block().
"""
import ipaddress
import struct

MARKER = b"\xab\xcd\xefMaxMind.com"

#: type name -> type number of the format.
TYPES = {"pointer": 1, "utf8_string": 2, "double": 3, "bytes": 4,
         "uint16": 5, "uint32": 6, "map": 7, "int32": 8, "uint64": 9,
         "uint128": 10, "array": 11, "container": 12, "end_marker": 13,
         "boolean": 14, "float": 15}


class Typed(object):
    """A value with an explicit type, e.g. Typed("uint16", 80)."""

    def __init__(self, kind, value):
        self.kind = kind
        self.value = value

    def __repr__(self):
        return "Typed(%r, %r)" % (self.kind, self.value)


def control(kind, size):
    """Control byte(s) and size bytes of a field of type `kind` (a name or
    number) and `size`."""
    number = TYPES.get(kind, kind)
    if size < 29:
        first, extra = size, b""
    elif size < 285:
        first, extra = 29, bytes([size - 29])
    elif size < 65821:
        first, extra = 30, (size - 285).to_bytes(2, "big")
    else:
        first, extra = 31, (size - 65821).to_bytes(3, "big")
    if number <= 7:
        return bytes([number << 5 | first]) + extra
    return bytes([first, number - 7]) + extra


def pointer(target):
    """A pointer to data-section offset `target`, in the shortest form."""
    if target < 2048:
        return bytes([0x20 | (target >> 8), target & 0xFF])
    if target < 2048 + (1 << 19):
        value = target - 2048
        return bytes([0x28 | (value >> 16)]) + (value & 0xFFFF).to_bytes(
            2, "big")
    if target < 526336 + (1 << 27):
        value = target - 526336
        return bytes([0x30 | (value >> 24)]) + (value & 0xFFFFFF).to_bytes(
            3, "big")
    return bytes([0x38]) + target.to_bytes(4, "big")


def _kind_of(value):
    if isinstance(value, Typed):
        return value.kind, value.value
    if isinstance(value, bool):
        return "boolean", value
    if isinstance(value, str):
        return "utf8_string", value
    if isinstance(value, bytes):
        return "bytes", value
    if isinstance(value, float):
        return "double", value
    if isinstance(value, dict):
        return "map", value
    if isinstance(value, (list, tuple)):
        return "array", value
    if isinstance(value, int):
        if value < 0:
            return "int32", value
        if value < 1 << 32:
            return "uint32", value
        if value < 1 << 64:
            return "uint64", value
        return "uint128", value
    raise TypeError("cannot encode %r" % (value,))


def _int_bytes(value, limit, signed=False):
    if signed and value < 0:
        return (value & 0xFFFFFFFF).to_bytes(4, "big")
    raw = value.to_bytes(limit, "big").lstrip(b"\0")
    assert len(raw) <= limit
    return raw


class DataSection(object):
    """The data section being written; with `share`, map keys and equal
    values are written once and pointed at."""

    def __init__(self, share=True):
        self.data = bytearray()
        self.share = share
        self.written = {}

    def add(self, value):
        """Write a value; its offset in the data section."""
        key = _identity(value) if self.share else None
        if key is not None and key in self.written:
            return self.written[key]
        encoded = self._encode(value)  # may write what it points to first
        offset = len(self.data)
        self.data += encoded
        if key is not None:
            self.written[key] = offset
        return offset

    def _shared(self, value):
        """A pointer to the value when sharing, else the value itself."""
        if not self.share:
            return self._encode(value)
        return pointer(self.add(value))

    def _encode(self, value):
        kind, raw = _kind_of(value)
        if kind == "map":
            body = b"".join(self._shared(str(k)) + self._member(v)
                            for k, v in raw.items())
            return control(kind, len(raw)) + body
        if kind == "array":
            return control(kind, len(raw)) + b"".join(
                self._member(v) for v in raw)
        return encode(value)

    def _member(self, value):
        kind, _ = _kind_of(value)
        if self.share and kind in ("map", "utf8_string"):
            return pointer(self.add(value))
        return self._encode(value)


def encode(value):
    """One value as a data field, with no pointers."""
    kind, raw = _kind_of(value)
    if kind == "utf8_string":
        raw = raw.encode("utf-8")
        return control(kind, len(raw)) + raw
    if kind == "bytes":
        return control(kind, len(raw)) + raw
    if kind == "double":
        return control(kind, 8) + struct.pack(">d", raw)
    if kind == "float":
        return control(kind, 4) + struct.pack(">f", raw)
    if kind == "boolean":
        return control(kind, 1 if raw else 0)
    if kind in ("uint16", "uint32", "uint64", "uint128", "int32"):
        limit = {"uint16": 2, "uint32": 4, "uint64": 8, "uint128": 16,
                 "int32": 4}[kind]
        body = _int_bytes(raw, limit, signed=kind == "int32")
        return control(kind, len(body)) + body
    if kind == "map":
        return control(kind, len(raw)) + b"".join(
            encode(str(k)) + encode(v) for k, v in raw.items())
    if kind == "array":
        return control(kind, len(raw)) + b"".join(encode(v) for v in raw)
    if kind == "end_marker":
        return control(kind, 0)
    raise TypeError("cannot encode %r" % (value,))


def _identity(value):
    """A hashable key telling equal values (and their types) apart."""
    kind, raw = _kind_of(value)
    if kind == "map":
        return ("map", tuple((k, _identity(v)) for k, v in raw.items()))
    if kind == "array":
        return ("array", tuple(_identity(v) for v in raw))
    if kind in ("double", "float"):
        return (kind, struct.pack(">d", raw))
    return (kind, raw)


def metadata_block(**fields):
    """The marker and metadata map (values already in their types)."""
    return MARKER + encode(fields)


class _Leaf(object):
    def __init__(self, record):
        self.record = record


class MMDBWriter(object):
    """Networks with their records -> the bytes of a MaxMind DB."""

    def __init__(self, ip_version=6, record_size=28, database_type="Test",
                 languages=("en",), description=None, share=True):
        assert ip_version in (4, 6) and record_size in (24, 28, 32)
        self.ip_version = ip_version
        self.record_size = record_size
        self.database_type = database_type
        self.languages = list(languages)
        self.description = description or {"en": "pamsignal test database"}
        self.share = share
        self.root = [None, None]

    def insert(self, network, record):
        """Give `network` ("192.0.2.0/24", "2001:db8::/32") `record`; a
        later, more specific network overrides part of an earlier one."""
        net = ipaddress.ip_network(network)
        bits = self.ip_version == 6 and 128 or 32
        if net.version == 6 and self.ip_version == 4:
            raise ValueError("IPv6 network in an IPv4 database")
        number, length = int(net.network_address), net.prefixlen
        if net.version == 4 and self.ip_version == 6:
            length += 96  # ::a.b.c.d/96+n
        if length == 0:
            raise ValueError("a whole-space network is not supported")
        node = self.root
        for depth in range(length):
            bit = number >> (bits - 1 - depth) & 1
            if depth == length - 1:
                node[bit] = _Leaf(record)
                return self
            child = node[bit]
            if not isinstance(child, list):
                child = node[bit] = [child, child]  # split an empty/leaf
            node = child
        return self

    def _nodes(self):
        """Nodes breadth first, the root first."""
        order, queue = [], [self.root]
        while queue:
            node = queue.pop(0)
            order.append(node)
            queue.extend(c for c in node if isinstance(c, list))
        return order

    def to_bytes(self, **metadata_overrides):
        nodes = self._nodes()
        number = {id(node): n for n, node in enumerate(nodes)}
        node_count = len(nodes)
        data = DataSection(self.share)

        def record_value(child):
            if child is None:
                return node_count
            if isinstance(child, list):
                return number[id(child)]
            return node_count + 16 + data.add(child.record)

        tree = bytearray()
        for node in nodes:
            tree += pack_node(self.record_size, record_value(node[0]),
                              record_value(node[1]))
        metadata = {
            "node_count": Typed("uint32", node_count),
            "record_size": Typed("uint16", self.record_size),
            "ip_version": Typed("uint16", self.ip_version),
            "database_type": self.database_type,
            "languages": self.languages,
            "binary_format_major_version": Typed("uint16", 2),
            "binary_format_minor_version": Typed("uint16", 0),
            "build_epoch": Typed("uint64", 1795780000),
            "description": self.description,
        }
        metadata.update(metadata_overrides)
        metadata = {k: v for k, v in metadata.items() if v is not None}
        return bytes(tree) + bytes(16) + bytes(data.data) + metadata_block(
            **metadata)


def pack_node(record_size, left, right):
    """One search tree node."""
    if record_size == 24:
        return left.to_bytes(3, "big") + right.to_bytes(3, "big")
    if record_size == 28:
        middle = (left >> 24) << 4 | (right >> 24)
        return ((left & 0xFFFFFF).to_bytes(3, "big") + bytes([middle])
                + (right & 0xFFFFFF).to_bytes(3, "big"))
    return left.to_bytes(4, "big") + right.to_bytes(4, "big")


def raw_database(tree, data, **metadata):
    """A database from a hand-made tree (bytes) and data section (bytes),
    for broken files; metadata fields given replace (None: remove) the
    usual ones."""
    fields = {"node_count": Typed("uint32", len(tree) // 6),
              "record_size": Typed("uint16", 24),
              "ip_version": Typed("uint16", 4),
              "database_type": "Broken",
              "binary_format_major_version": Typed("uint16", 2),
              "binary_format_minor_version": Typed("uint16", 0)}
    fields.update(metadata)
    fields = {k: v for k, v in fields.items() if v is not None}
    return tree + bytes(16) + data + metadata_block(**fields)


def heavy_records_database(leaves, text=4000, maps=1000, texts=5):
    """An IPv4 database whose first address byte picks one of `leaves`
    records (1, 2, 4, ... 256), each an array of `texts` pointers to one
    long string and one to an array of `maps` empty maps: a small file
    whose every record decodes to far more memory than it takes."""
    data = control("utf8_string", text) + b"A" * text
    maps_at = len(data)
    data += control("array", maps) + bytes([0xE0]) * maps
    heavy = control("array", texts + 1) + pointer(0) * texts + pointer(
        maps_at)
    depth = leaves.bit_length() - 1
    node_count = (1 << depth) - 1 if depth else 1
    records = []
    for _ in range(leaves):
        records.append(len(data))
        data += heavy
    if not depth:  # one node, both halves on the one record
        tree = pack_node(24, 1 + 16 + records[0], 1 + 16 + records[0])
    else:
        def child(index):
            if index < node_count:
                return index
            return node_count + 16 + records[index - node_count]
        tree = b"".join(pack_node(24, child(2 * node + 1),
                                  child(2 * node + 2))
                        for node in range(node_count))
    return raw_database(tree, data,
                        node_count=Typed("uint32", node_count))

