"""Readers for what a SIEM receives, written from the specifications
themselves, independently of pamsignal.py's writers: RFC 5424 and RFC 3164
syslog messages, RFC 6587 framing, ArcSight CEF, IBM QRadar LEEF 2.0.

Each reader raises ValueError on anything its specification does not
allow, so a test that reads a record also proves it is well formed."""

import re

_RFC5424 = re.compile(
    r"^<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) ", re.S)
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
_SD_NAME = re.compile(r'[^= \]"]{1,32}')
_TIMESTAMP = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)$")


def parse_rfc5424(message):
    """bytes -> dict: pri, timestamp, hostname, app_name, procid, msgid,
    sd ({sd_id: {name: value}}, in order), msg (text, BOM removed),
    bom (whether it had one)."""
    text = message.decode("utf-8")
    match = _RFC5424.match(text)
    if not match:
        raise ValueError("not an RFC 5424 header: %r" % text[:80])
    pri = int(match.group(1))
    if pri > 191:
        raise ValueError("PRI %d out of range" % pri)
    timestamp, hostname, app_name, procid, msgid = match.group(2, 3, 4, 5,
                                                               6)
    limits = ((hostname, 255), (app_name, 48), (procid, 128), (msgid, 32))
    for value, limit in limits:
        if not _PRINTABLE.match(value) or len(value) > limit:
            raise ValueError("bad header field %r" % value)
    if not _TIMESTAMP.match(timestamp):
        raise ValueError("bad TIMESTAMP %r" % timestamp)
    sd, rest = _parse_sd(text[match.end():])
    bom = rest.startswith(" \ufeff")
    if rest and not rest.startswith(" "):
        raise ValueError("no space before MSG: %r" % rest[:40])
    return {"pri": pri, "timestamp": timestamp, "hostname": hostname,
            "app_name": app_name, "procid": procid, "msgid": msgid,
            "sd": sd, "msg": rest[2 if bom else 1:], "bom": bom}


def _parse_sd(text):
    if text.startswith("-"):
        return {}, text[1:]
    elements = {}
    position = 0
    if not text.startswith("["):
        raise ValueError("no STRUCTURED-DATA: %r" % text[:40])
    while position < len(text) and text[position] == "[":
        name = _SD_NAME.match(text, position + 1)
        if not name:
            raise ValueError("bad SD-ID at %d" % position)
        params = elements.setdefault(name.group(0), {})
        position = name.end()
        while text[position] == " ":
            param = _SD_NAME.match(text, position + 1)
            if not param or text[param.end():param.end() + 2] != '="':
                raise ValueError("bad SD-PARAM at %d" % position)
            value, position = _sd_value(text, param.end() + 2)
            params[param.group(0)] = value
        if text[position] != "]":
            raise ValueError("SD-ELEMENT not closed at %d" % position)
        position += 1
    return elements, text[position:]


def _sd_value(text, position):
    """PARAM-VALUE up to its closing quote: \\", \\\\ and \\] stand for
    the character; a backslash before anything else is kept."""
    out = []
    while True:
        char = text[position]
        if char == "\\" and text[position + 1] in '"\\]':
            out.append(text[position + 1])
            position += 2
        elif char == '"':
            return "".join(out), position + 1
        elif char == "]":
            raise ValueError("unescaped ] in PARAM-VALUE")
        else:
            out.append(char)
            position += 1


_RFC3164 = re.compile(
    r"^<(\d{1,3})>(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
    r"([ 1-3]\d) (\d\d:\d\d:\d\d) (\S+) ([A-Za-z0-9_.-]{1,32}): ", re.S)


def parse_rfc3164(message):
    """bytes -> dict: pri, timestamp ("Mmm dd hh:mm:ss"), hostname, tag,
    msg."""
    text = message.decode("utf-8")
    match = _RFC3164.match(text)
    if not match:
        raise ValueError("not an RFC 3164 message: %r" % text[:80])
    return {"pri": int(match.group(1)),
            "timestamp": "%s %s %s" % match.group(2, 3, 4),
            "hostname": match.group(5), "tag": match.group(6),
            "msg": text[match.end():]}


def octet_frames(stream):
    """RFC 6587 octet counting: bytes -> [message bytes]."""
    frames = []
    while stream:
        length, space, rest = stream.partition(b" ")
        if not space or not length.isdigit():
            raise ValueError("bad frame length %r" % length[:10])
        frames.append(rest[:int(length)])
        stream = rest[int(length):]
    return frames


_CEF_HEADER_FIELDS = 7
_CEF_KEY = re.compile(r"(?:^| )([A-Za-z0-9_]+)=")
_CEF_EXTENSION_ESCAPES = {"\\": "\\", "=": "=", "n": "\n", "r": "\r"}


def parse_cef(text):
    """"CEF:0|..." -> (header [version, vendor, product, device version,
    class id, name, severity], {key: value}) with CEF's escapes undone."""
    if not text.startswith("CEF:"):
        raise ValueError("not CEF: %r" % text[:40])
    header, position, field = [], 4, []
    while len(header) < _CEF_HEADER_FIELDS:
        char = text[position]
        if char == "\\":
            if text[position + 1] not in "\\|":
                raise ValueError("bad header escape at %d" % position)
            field.append(text[position + 1])
            position += 2
            continue
        if char in "\r\n":
            raise ValueError("line break in a CEF header")
        if char == "|":
            header.append("".join(field))
            field = []
        else:
            field.append(char)
        position += 1
    extension = text[position:]
    keys = list(_CEF_KEY.finditer(extension))
    if extension and (not keys or keys[0].start() != 0):
        raise ValueError("extension does not start with a key")
    pairs = {}
    for index, key in enumerate(keys):
        end = keys[index + 1].start() if index + 1 < len(keys) \
            else len(extension)
        raw = extension[key.end():end]
        if "\n" in raw or "\r" in raw:
            raise ValueError("raw line break in %s" % key.group(1))
        if re.search(r"(?<!\\)(?:\\\\)*=", raw):
            raise ValueError("unescaped = in %s" % key.group(1))
        if key.group(1) in pairs:
            raise ValueError("key %s twice" % key.group(1))
        pairs[key.group(1)] = re.sub(
            r"\\(.)", lambda m: _CEF_EXTENSION_ESCAPES.get(
                m.group(1), "\\" + m.group(1)), raw)
    return header, pairs


_LEEF2 = re.compile(r"^LEEF:2\.0\|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|"
                    r"(.|x[0-9A-Fa-f]{1,4}|0x[0-9A-Fa-f]{1,4})\|")


def parse_leef(text):
    """"LEEF:2.0|..." -> (header [vendor, product, version, event id],
    {key: value})."""
    match = _LEEF2.match(text)
    if not match:
        raise ValueError("not LEEF 2.0: %r" % text[:60])
    delimiter = match.group(5)
    if len(delimiter) > 1:
        delimiter = chr(int(delimiter.lstrip("0").lstrip("x"), 16))
    pairs = {}
    for attribute in text[match.end():].split(delimiter):
        key, equals, value = attribute.partition("=")
        if not equals or not re.match(r"^[A-Za-z0-9_]+$", key):
            raise ValueError("bad LEEF attribute %r" % attribute[:40])
        if key in pairs or re.search(r"[\t\r\n]", value):
            raise ValueError("bad LEEF value for %s" % key)
        pairs[key] = value
    return list(match.group(1, 2, 3, 4)), pairs
