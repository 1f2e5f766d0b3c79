"""Fuzz target: a web service's answer, as bytes on the wire, through
http.client (as urllib reads it) and every sink's judgement of it.

An input is the whole HTTP response. What http.client cannot read is a
network failure that http_post turns into a retryable DeliveryError, so
it stops there. A response that reads must be judged by every HTTP sink:
None (delivered) or a DeliveryError whose wait is a finite number of
seconds within MAX_RETRY_AFTER_S and whose reason prints safely.
"""

import http.client
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

pamsignal = harness.pamsignal

HTTP_SINKS = [sink for sink in harness.SINKS
              if isinstance(sink, pamsignal.HttpSink)]


class Wire:
    """A socket that has received `data` and nothing more."""

    def __init__(self, data):
        self.data = data

    def makefile(self, mode, *args, **kwargs):
        return io.BytesIO(self.data)


def read_answer(data):
    """(status, headers, body) as http_post gets them, or None where it
    would raise its network DeliveryError instead."""
    response = http.client.HTTPResponse(Wire(data), method="POST")
    try:
        response.begin()
        return response.status, response.headers, response.read(
            pamsignal.MAX_RESPONSE_BYTES)
    except (http.client.HTTPException, OSError, ValueError):
        return None


def check(data):
    answer = read_answer(data)
    if answer is None:
        return
    status, headers, body = answer
    for sink in HTTP_SINKS:
        failure = sink.judge(status, headers, body)
        if failure is None:
            assert 200 <= status < 300, status
            continue
        assert isinstance(failure, pamsignal.DeliveryError), failure
        wait = failure.retry_after
        assert wait is None or (type(wait) in (int, float) and
                                0 <= wait <= pamsignal.MAX_RETRY_AFTER_S)
        assert not pamsignal._UNSAFE_CHARS.search(str(failure)), failure


def response(status_line, headers=(), body=b""):
    head = [status_line] + ["%s: %s" % header for header in headers] + [
        "Content-Length: %d" % len(body)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("utf-8") + body


def seeds():
    """What the services answer: taken, Telegram's refusal, rate limits
    in each form, a moved channel, errors, a chunked body."""
    return [
        response("HTTP/1.1 200 OK", [("Content-Type", "application/json")],
                 b'{"ok":true,"result":{"message_id":5}}'),
        response("HTTP/1.1 200 OK", [], b'{"ok":false,"description":"x"}'),
        response("HTTP/1.1 204 No Content"),
        response("HTTP/1.1 429 Too Many Requests", [("Retry-After", "30")]),
        response("HTTP/1.1 429 Too Many Requests",
                 [("Retry-After", "Wed, 21 Oct 2026 07:28:00 GMT")]),
        response("HTTP/1.1 429 Too Many Requests", [], b'{"ok":false,'
                 b'"error_code":429,"parameters":{"retry_after":12}}'),
        response("HTTP/1.1 429 Too Many Requests", [],
                 b'{"message":"rate limited","retry_after":0.5}'),
        response("HTTP/1.1 301 Moved Permanently",
                 [("Location", "https://elsewhere.example.com/hook")]),
        response("HTTP/1.1 401 Unauthorized", [], b"bad token"),
        response("HTTP/1.1 400 Bad Request", [], b"no \x1b[31m text"),
        response("HTTP/1.1 503 Service Unavailable"),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\nokay\r\n0\r\n\r\n",
    ]


DICTIONARY = [
    "HTTP/1.1 ", "HTTP/1.0 ", "\r\n", ": ", "Retry-After: ", "Location: ",
    "Content-Length: ", "Transfer-Encoding: chunked", "Content-Type: ",
    "Wed, 21 Oct 2026 07:28:00 GMT", " -0000", " +9999", "GMT", "Jan",
    '"retry_after":', '"parameters":', '"ok":false', '"ok": false',
    "1e400", "-1", "nan", "Infinity", "99999999999", "0.000001", "http://",
    "https://[", "]:", "429", "301", "308", "500", "200", "null", "[]",
    "{}", "1" * 400]

if __name__ == "__main__":
    harness.fuzz(check, seeds, DICTIONARY)
