"""Real receivers for the notification tests (see docs/CONTRIBUTING.md,
"What the tests run against"): an HTTP(S) server, an SMTP server and an
HTTPS proxy (CONNECT) on 127.0.0.1, each in a thread, recording what they
get and answering as each test scripts them, plus self-signed
certificates made with the `openssl` command.

Test-only, standard library only.  Nothing here is timed: tests wait for
conditions (`wait_for`) with generous timeouts.

    with HttpReceiver() as rx:
        rx.script([telegram_429(1), telegram_ok()])
        ...                                   # the agent posts to rx.url
        first, second = rx.wait_for(2)
        assert second.json["chat_id"] == 42

    certs = make_cert(tmp_dir)                # CA + server cert (cached)
    with HttpReceiver(tls=certs) as rx:       # https://127.0.0.1:PORT
        ...                                   # client trusts certs.ca_file

    with SmtpReceiver(tls=certs, user="u", password="p") as mx:
        ...                                   # STARTTLS + AUTH PLAIN/LOGIN
        (mail,) = mx.wait_for(1)
        assert mail.message["Subject"] == "..."
"""

import base64
import binascii
import email
import email.policy
import hashlib
import http.server
import ipaddress
import json
import math
import os
import re
import secrets
import select
import shutil
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse

HOST = "127.0.0.1"

#: Errors a client can cause by going away (timeouts, resets, TLS aborts):
#: not worth reporting.
_NETWORK_ERRORS = (OSError, EOFError, ValueError)


# ------------------------------------------------------------ certificates


class CertBundle(object):
    """A server certificate and the files around it.

    `ca_file` signed `cert_file` (key `key_file`), whose subjectAltName
    holds `names`.  `other_ca_file` is an unrelated CA: a client that
    trusts only it must reject `cert_file`.  `rogue` is a bundle with a
    certificate for the same names signed by that unrelated CA (its own
    `ca_file` is the unrelated CA, its `other_ca_file` the good one).
    """

    def __init__(self, directory, names, ca_file, ca_key_file, cert_file,
                 key_file, other_ca_file, rogue=None):
        self.directory = directory
        self.names = tuple(names)
        self.ca_file = ca_file
        self.ca_key_file = ca_key_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.other_ca_file = other_ca_file
        self.rogue = rogue

    def server_context(self, require_client_cert=False):
        """An `ssl.SSLContext` serving this certificate; with
        `require_client_cert`, one that refuses a client without a
        certificate signed by `ca_file` (mutual TLS)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.ca_file)
        return context

    def client_cert(self, name="pamsignal-client"):
        """(cert_file, key_file) of a client certificate (clientAuth) for
        `name`, signed by `ca_file`; made once, cached on disk."""
        stem = "client-" + "".join(c if c.isalnum() else "_"
                                   for c in name)[:40]
        with _CERT_LOCK:
            return _make_leaf(self.directory, stem, (name,), self.ca_file,
                              self.ca_key_file, usage="clientAuth")

    def client_context(self, cafile=None):
        """A verifying client context trusting `cafile` (default: the CA
        that signed this certificate)."""
        return ssl.create_default_context(cafile=cafile or self.ca_file)

    def __repr__(self):
        return "<CertBundle %s for %s>" % (self.cert_file,
                                           ", ".join(self.names))


_CERT_LOCK = threading.Lock()
_CERT_CACHE = {}

_CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca

[dn]
CN = %s

[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

_LEAF_REQ_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = %s
"""

_LEAF_EXTENSIONS = """\
[v3_leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = %s
subjectAltName = %s
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes"]


def _openssl(*args):
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("the openssl command is not installed")
    done = subprocess.run([exe] + list(args), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise RuntimeError("openssl %s failed (%d): %s" % (
            args[0], done.returncode,
            done.stderr.decode("utf-8", "replace").strip()))


def _serial():
    return "0x%x" % (secrets.randbits(62) | (1 << 62))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _publish(pairs):
    """Move finished temporary files into place, keys first."""
    for tmp, final in pairs:
        os.replace(tmp, final)


def _make_ca(directory, stem, common_name):
    cert = os.path.join(directory, stem + ".pem")
    key = os.path.join(directory, stem + ".key")
    if os.path.exists(cert) and os.path.exists(key):
        return cert, key
    tag = ".tmp%d.%s" % (os.getpid(), secrets.token_hex(4))
    config = os.path.join(directory, stem + ".cnf" + tag)
    _write(config, _CA_CONFIG % common_name)
    try:
        _openssl("req", "-x509", "-new", *_EC_KEY, "-sha256",
                 "-days", "3650", "-set_serial", _serial(),
                 "-config", config, "-extensions", "v3_ca",
                 "-keyout", key + tag, "-out", cert + tag)
        _publish([(key + tag, key), (cert + tag, cert)])
    finally:
        for path in (config, key + tag, cert + tag):
            if os.path.exists(path):
                os.unlink(path)
    return cert, key


def _make_leaf(directory, stem, names, ca_cert, ca_key, usage="serverAuth"):
    cert = os.path.join(directory, stem + ".pem")
    key = os.path.join(directory, stem + ".key")
    if os.path.exists(cert) and os.path.exists(key):
        return cert, key
    alt = []
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            alt.append("DNS:" + name)
        else:
            alt.append("IP:" + name)
    tag = ".tmp%d.%s" % (os.getpid(), secrets.token_hex(4))
    req_config = os.path.join(directory, stem + ".req.cnf" + tag)
    ext_config = os.path.join(directory, stem + ".ext.cnf" + tag)
    csr = os.path.join(directory, stem + ".csr" + tag)
    _write(req_config, _LEAF_REQ_CONFIG % names[0])
    _write(ext_config, _LEAF_EXTENSIONS % (usage, ", ".join(alt)))
    try:
        _openssl("req", "-new", *_EC_KEY, "-config", req_config,
                 "-keyout", key + tag, "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-sha256", "-days", "825",
                 "-CA", ca_cert, "-CAkey", ca_key, "-set_serial", _serial(),
                 "-extfile", ext_config, "-extensions", "v3_leaf",
                 "-out", cert + tag)
        _publish([(key + tag, key), (cert + tag, cert)])
    finally:
        for path in (req_config, ext_config, csr, key + tag, cert + tag):
            if os.path.exists(path):
                os.unlink(path)
    return cert, key


def make_cert(directory, names=("localhost", "127.0.0.1")):
    """Make (or reuse) certificates in `directory` and return a
    CertBundle: a test CA (`ca.pem`), a server certificate it signed for
    `names` (DNS names and IP addresses, the first is also the CN), an
    unrelated CA (`other-ca.pem`) and, as `.rogue`, a certificate for the
    same names signed by that unrelated CA.

    The CAs are made once per directory; each set of names gets its own
    server certificate signed by the same CA (so `names=("wrong.test",)`
    gives a trusted certificate for the wrong host).  Results are cached
    in the process and on disk."""
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    if not names:
        raise ValueError("make_cert needs at least one name")
    directory = os.path.abspath(str(directory))
    key = (os.path.realpath(directory), names)
    with _CERT_LOCK:
        if key in _CERT_CACHE:
            return _CERT_CACHE[key]
        os.makedirs(directory, exist_ok=True)
        ca_cert, ca_key = _make_ca(
            directory, "ca", "PAMSignal test CA " + secrets.token_hex(4))
        other_cert, other_key = _make_ca(
            directory, "other-ca",
            "PAMSignal unrelated CA " + secrets.token_hex(4))
        slug = "".join(c if c.isalnum() else "_" for c in names[0])[:40]
        digest = hashlib.sha256("\0".join(names).encode()).hexdigest()[:10]
        stem = "%s-%s" % (slug, digest)
        cert, cert_key = _make_leaf(directory, "server-" + stem, names,
                                    ca_cert, ca_key)
        rogue_cert, rogue_key = _make_leaf(directory, "rogue-" + stem,
                                           names, other_cert, other_key)
        rogue = CertBundle(directory, names, other_cert, other_key,
                           rogue_cert, rogue_key, ca_cert)
        bundle = CertBundle(directory, names, ca_cert, ca_key, cert,
                            cert_key, other_cert, rogue=rogue)
        _CERT_CACHE[key] = bundle
        return bundle


def _server_context(tls):
    if tls is None:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    return tls.server_context()


# ---------------------------------------------------------- server plumbing


class _ServerMixin(object):
    """Bookkeeping shared by the HTTP and SMTP servers: TLS on accepted
    sockets (in the connection's thread), tracking of open connections so
    that down()/stop() can cut them, and close with RST on request."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64

    def setup_receiver(self, receiver, ssl_context):
        self.receiver = receiver
        self.ssl_context = ssl_context
        self.abort = threading.Event()
        self.conn_lock = threading.Lock()
        self.connections = set()
        self.resets = set()

    def server_bind(self):
        # HTTPServer.server_bind would look the address up (getfqdn),
        # which can stall on machines without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "localhost"
        self.server_port = self.server_address[1]

    def track(self, sock, old=None):
        with self.conn_lock:
            if old is not None:
                self.connections.discard(old)
            self.connections.add(sock)

    def mark_reset(self, sock):
        """Close `sock` with RST (SO_LINGER 0) instead of FIN."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack("ii", 1, 0))
        with self.conn_lock:
            self.resets.add(sock)

    def close_socket(self, sock):
        with self.conn_lock:
            self.connections.discard(sock)
            reset = sock in self.resets
            self.resets.discard(sock)
        if not reset:
            try:
                socket.socket.shutdown(sock, socket.SHUT_WR)
            except OSError:
                pass
        try:
            sock.close()
        except OSError:
            pass

    def cut_connections(self):
        with self.conn_lock:
            socks = list(self.connections)
        for sock in socks:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass

    def finish_request(self, request, client_address):
        sock = request
        self.track(sock)
        try:
            if self.ssl_context is not None:
                request.settimeout(10)
                try:
                    sock = self.ssl_context.wrap_socket(request,
                                                        server_side=True)
                except _NETWORK_ERRORS as e:
                    self.receiver._note_tls_failure(e)
                    return
                self.track(sock, old=request)
            self.RequestHandlerClass(sock, client_address, self)
        except _NETWORK_ERRORS:
            pass
        except Exception:
            self.receiver._note_error(traceback.format_exc())
        finally:
            self.close_socket(sock)
            if sock is not request:
                self.close_socket(request)

    def shutdown_request(self, request):
        # finish_request closed it (or it was detached by TLS).
        try:
            request.close()
        except OSError:
            pass

    def handle_error(self, request, client_address):
        self.receiver._note_error(traceback.format_exc())


class _Receiver(object):
    """start()/stop(), context manager, down()/up() on the same port."""

    kind = "receiver"

    def __init__(self, tls=None):
        self.tls = tls
        self.host = HOST
        self._ssl_context = _server_context(tls)
        self._port = 0
        self._server = None
        self._thread = None
        self._placeholder = None
        self._started = False
        self._life = threading.Lock()
        self._cond = threading.Condition()
        self.tls_failures = []
        self.errors = []

    # -- life cycle

    def _server_class(self):
        raise NotImplementedError

    def _serve(self):
        server = self._server_class()((self.host, self._port),
                                      self._handler_class,
                                      bind_and_activate=False)
        server.setup_receiver(self, self._ssl_context)
        try:
            server.server_bind()
            server.server_activate()
        except BaseException:
            server.server_close()
            raise
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05},
            name="%s-%d" % (self.kind, self._port))
        thread.daemon = True
        thread.start()
        self._server, self._thread = server, thread

    def _halt(self):
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.abort.set()
        server.shutdown()
        server.server_close()
        server.cut_connections()
        thread.join(10)

    def start(self):
        with self._life:
            if not self._started:
                self._started = True
                self._serve()
        return self

    def stop(self):
        with self._life:
            self._started = False
            self._halt()
            self._drop_placeholder()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def is_up(self):
        return self._server is not None

    def down(self):
        """Refuse connections on the port (and cut the open ones) until
        up().  The port stays reserved, so up() gets it back."""
        with self._life:
            if not self._started:
                raise RuntimeError("%s is not started" % self.kind)
            if self._server is None:
                return
            self._halt()
            # A bound socket that does not listen: connections to the port
            # are refused, and no client's ephemeral port can take it.
            holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                holder.bind((self.host, self._port))
            except OSError:
                holder.close()
            else:
                self._placeholder = holder

    def up(self):
        """Listen again, on the same port as before down()."""
        with self._life:
            if not self._started:
                raise RuntimeError("%s is not started" % self.kind)
            if self._server is not None:
                return
            deadline = time.monotonic() + 10
            while True:
                try:
                    self._serve()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self._drop_placeholder()

    def _drop_placeholder(self):
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    @property
    def port(self):
        return self._port

    # -- bookkeeping

    def wait_for_tls_failures(self, count, timeout=10):
        """Wait until `count` TLS handshakes failed on the server side
        (the client rejected the certificate, ...); return the errors."""
        return self._wait(self.tls_failures, count, timeout,
                          "TLS handshake failures")

    def _note_tls_failure(self, error):
        with self._cond:
            self.tls_failures.append(error)
            self._cond.notify_all()

    def _note_error(self, text):
        with self._cond:
            self.errors.append(text)
        sys.stderr.write("%s error:\n%s\n" % (self.kind, text))

    def _wait(self, items, count, timeout, what):
        with self._cond:
            ok = self._cond.wait_for(lambda: len(items) >= count, timeout)
            got = list(items)
        if not ok:
            raise AssertionError(
                "waited %ss for %d %s on port %d, got %d: %r"
                % (timeout, count, what, self._port, len(got), got))
        return got


# ------------------------------------------------------------------- HTTP


class Request(object):
    """One HTTP request as the receiver read it.

    `headers` is an `http.client.HTTPMessage` (case-insensitive `get`,
    `[]`, `in`); `query` maps each parameter to its last value (all of
    them in `query_list`); `json` is the parsed body or None; `response`
    is what the receiver answered (a Respond/Hang/Drop/... object)."""

    def __init__(self, method, target, headers, body, client_address,
                 tls):
        self.method = method
        self.target = target
        split = urllib.parse.urlsplit(target)
        self.path = split.path
        self.query_list = urllib.parse.parse_qsl(split.query,
                                                 keep_blank_values=True)
        self.query = dict(self.query_list)
        self.headers = headers
        self.body = body
        self.json = None
        if body:
            try:
                self.json = json.loads(body.decode("utf-8"))
            except ValueError:
                pass
        self.client_address = client_address
        self.tls = tls
        self.received_at = time.time()
        self.response = None

    @property
    def text(self):
        return self.body.decode("utf-8", "replace")

    def __repr__(self):
        return "<Request %s %s %d bytes -> %r>" % (
            self.method, self.target, len(self.body), self.response)


def _encode_body(body, headers):
    if body is None:
        return b""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode("utf-8")
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
    elif isinstance(body, str):
        body = body.encode("utf-8")
    if body and not any(k.lower() == "content-type" for k in headers):
        headers["Content-Type"] = "text/plain; charset=utf-8"
    return bytes(body)


class Respond(object):
    """Answer `status` with `body` (bytes, str, or dict/list sent as JSON)
    and extra `headers`.  Content-Length is added; Content-Type too when
    there is a body and none was given."""

    def __init__(self, status=200, body=b"", headers=None):
        self.status = int(status)
        self.headers = dict(headers or {})
        self.body = _encode_body(body, self.headers)

    def _perform(self, handler, request):
        handler._send(self.status, self.headers, self.body)

    def __repr__(self):
        return "%s(%d, %r)" % (type(self).__name__, self.status,
                               self.body[:60])


class Slow(Respond):
    """Answer like Respond, but only after `seconds` (stop() cuts it
    short: the connection is then closed without an answer)."""

    def __init__(self, seconds, status=200, body=b"", headers=None):
        Respond.__init__(self, status, body, headers)
        self.seconds = seconds

    def _perform(self, handler, request):
        if handler.server.abort.wait(self.seconds):
            handler.close_connection = True
            return
        Respond._perform(self, handler, request)

    def __repr__(self):
        return "%s(%s, %d)" % (type(self).__name__, self.seconds,
                               self.status)


class Hang(Slow):
    """Read the request, then say nothing for `seconds` (then 200 `ok`):
    for client timeouts.  stop()/down() end the wait at once."""

    def __init__(self, seconds=60):
        Slow.__init__(self, seconds, 200, b"ok")


class Drip(object):
    """Answer `status`, but one byte every `interval` seconds, padded with
    a header so that the whole answer takes about `seconds`: each read of
    the client gets a byte in time, so a per-read timeout never fires.
    stop()/down() end it at once (the connection is closed)."""

    def __init__(self, seconds=60, interval=1.0, status=200, body=b"ok"):
        self.seconds = seconds
        self.interval = interval
        self.status = int(status)
        self.body = body

    def answer(self):
        """The bytes dripped: status line, padding header, body."""
        head = b"HTTP/1.1 %d Dripping\r\nContent-Length: %d\r\n" % (
            self.status, len(self.body))
        total = int(self.seconds / self.interval)
        padding = max(total - len(head) - len(self.body) - 12, 1)
        return head + b"X-Drip: " + b"a" * padding + b"\r\n\r\n" + self.body

    def _perform(self, handler, request):
        handler.close_connection = True
        for index, byte in enumerate(self.answer()):
            if index and handler.server.abort.wait(self.interval):
                return
            handler.wfile.write(bytes((byte,)))
            handler.wfile.flush()

    def __repr__(self):
        return "Drip(%s, %s)" % (self.seconds, self.interval)


class Drop(object):
    """Read the request, then close the connection (FIN) unanswered."""

    def _perform(self, handler, request):
        handler.close_connection = True

    def __repr__(self):
        return "Drop()"


class Reset(object):
    """Read the request, then close the connection with RST
    (SO_LINGER 0): the client sees ECONNRESET."""

    def _perform(self, handler, request):
        handler.close_connection = True
        handler.server.mark_reset(handler.connection)

    def __repr__(self):
        return "Reset()"


class Truncated(Respond):
    """Send the status line and headers announcing the whole body, then
    only its first `cut` bytes, then close: a connection lost
    mid-response (http.client raises IncompleteRead)."""

    def __init__(self, status=200, body=b'{"ok": true, "result": {}}',
                 headers=None, cut=5):
        Respond.__init__(self, status, body, headers)
        self.cut = cut

    def _perform(self, handler, request):
        handler._send(self.status, self.headers, self.body,
                      limit=self.cut)
        handler.close_connection = True


class Interim(Respond):
    """Answer like Respond, after an interim answer (`interim`, by
    default 103 Early Hints) that http.client itself does not skip."""

    def __init__(self, status=200, body=b"ok", headers=None, interim=103):
        Respond.__init__(self, status, body, headers)
        self.interim = interim

    def _perform(self, handler, request):
        handler.wfile.write(b"HTTP/1.1 %d Early Hints\r\nLink: </a.css>; "
                            b"rel=preload\r\n\r\n" % self.interim)
        Respond._perform(self, handler, request)


class Dynamic(object):
    """Answer with whatever `fn(request)` returns (a response object):
    for answers that depend on the request (signatures, ?wait=true)."""

    def __init__(self, fn, name=None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "fn")

    def _perform(self, handler, request):
        response = self.fn(request)
        request.response = response
        response._perform(handler, request)

    def __repr__(self):
        return "Dynamic(%s)" % self.name


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "PAMSignalTestReceiver/1.0"
    sys_version = ""
    timeout = 30

    def log_message(self, format, *args):
        pass

    def _read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size_line = self.rfile.readline(1024)
                if not size_line:
                    raise EOFError("connection closed inside a chunk")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n",
                                                            b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = self.headers.get("Content-Length")
        if not length:
            return b""
        return self.rfile.read(int(length))

    def _handle(self):
        try:
            body = self._read_body()
        except ValueError:
            self.send_error(400, "bad body framing")
            return
        request = Request(self.command, self.path, self.headers, body,
                          self.client_address,
                          isinstance(self.connection, ssl.SSLSocket))
        response = self.server.receiver._arrived(request)
        response._perform(self, request)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle
    do_HEAD = do_OPTIONS = _handle

    def _send(self, status, headers, body, limit=None):
        self.send_response(status)
        lower = {k.lower() for k in headers}
        for name, value in headers.items():
            self.send_header(name, str(value))
        bodiless = status in (204, 304) or status < 200
        if not bodiless and "content-length" not in lower:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if bodiless or self.command == "HEAD":
            return
        self.wfile.write(body if limit is None else body[:limit])
        self.wfile.flush()


class _HttpServer(_ServerMixin, socketserver.ThreadingMixIn,
                  http.server.HTTPServer):
    """http.server.ThreadingHTTPServer (spelled out: it is 3.7+) with the
    receiver bookkeeping."""


class HttpReceiver(_Receiver):
    """A real HTTP server (HTTPS with `tls=CertBundle` or an SSLContext)
    on 127.0.0.1, recording requests and answering from a script.

    `script([...])` queues responses for the next requests (FIFO); then
    `default` answers (Respond(200, b"ok") unless set).  `requests` is a
    snapshot list; `wait_for(count, timeout)` waits for `count` of them.
    Requests are recorded before they are answered."""

    kind = "http-receiver"
    _handler_class = _HttpHandler

    def __init__(self, tls=None, default=None):
        _Receiver.__init__(self, tls)
        self.default = default if default is not None else Respond(200,
                                                                   b"ok")
        self._script = []
        self._requests = []

    def _server_class(self):
        return _HttpServer

    @property
    def scheme(self):
        return "https" if self._ssl_context is not None else "http"

    @property
    def url(self):
        return "%s://%s:%d" % (self.scheme, self.host, self._port)

    @property
    def localhost_url(self):
        return "%s://localhost:%d" % (self.scheme, self._port)

    def script(self, responses):
        """Queue responses (one or a list) for the next requests."""
        if not isinstance(responses, (list, tuple)):
            responses = [responses]
        with self._cond:
            self._script.extend(responses)
        return self

    @property
    def pending(self):
        """How many scripted responses are not used yet."""
        with self._cond:
            return len(self._script)

    @property
    def requests(self):
        with self._cond:
            return list(self._requests)

    def clear(self):
        """Forget recorded requests and unused scripted responses."""
        with self._cond:
            del self._requests[:]
            del self._script[:]

    def wait_for(self, count, timeout=10):
        return self._wait(self._requests, count, timeout, "requests")

    def _arrived(self, request):
        with self._cond:
            response = self._script.pop(0) if self._script else self.default
            request.response = response
            self._requests.append(request)
            self._cond.notify_all()
        return response

    def __repr__(self):
        return "<HttpReceiver %s>" % self.url


# ---------------------------------------------- service-shaped responses


def _json(status, payload, headers=None):
    h = {"Content-Type": "application/json"}
    h.update(headers or {})
    return Respond(status, json.dumps(payload).encode("utf-8"), h)


def _request_json(request):
    return request.json if isinstance(request.json, dict) else {}


def telegram_ok(message_id=1):
    """Bot API sendMessage success (echoes chat_id and text)."""
    def answer(request):
        sent = _request_json(request)
        return _json(200, {"ok": True, "result": {
            "message_id": message_id, "date": int(time.time()),
            "chat": {"id": sent.get("chat_id", 0), "type": "private"},
            "text": sent.get("text", "")}})
    return Dynamic(answer, "telegram_ok")


def telegram_429(retry_after=1):
    """Bot API flood control: 429, retry_after in the body only."""
    retry_after = int(retry_after)
    return _json(429, {
        "ok": False, "error_code": 429,
        "description": "Too Many Requests: retry after %d" % retry_after,
        "parameters": {"retry_after": retry_after}})


def telegram_error(error_code=400, description="Bad Request: chat not found"):
    """Other Bot API errors, e.g. (401, "Unauthorized"), (403,
    "Forbidden: bot was blocked by the user")."""
    return _json(error_code, {"ok": False, "error_code": error_code,
                              "description": description})


def slack_ok():
    """Incoming webhook success: 200, body `ok`."""
    return Respond(200, b"ok", {"Content-Type": "text/html"})


def slack_error(status=400, text="invalid_payload"):
    """Incoming webhook failure: status + plain text (invalid_payload,
    no_text, channel_not_found, channel_is_archived, ...)."""
    return Respond(status, text.encode(), {"Content-Type": "text/html"})


def slack_429(retry_after=1):
    return Respond(429, b"rate_limited", {"Content-Type": "text/html",
                                          "Retry-After": str(retry_after)})


def discord_ok(message_id="1"):
    """Webhook success: 204 without a body, or 200 with the message as
    JSON when the URL has ?wait=true."""
    def answer(request):
        if request.query.get("wait", "").lower() != "true":
            return Respond(204)
        sent = _request_json(request)
        return _json(200, {"id": message_id, "type": 0,
                           "content": sent.get("content", ""),
                           "embeds": sent.get("embeds", []),
                           "webhook_id": "1"})
    return Dynamic(answer, "discord_ok")


def discord_429(retry_after=1.5, global_=False):
    """Rate limited: 429 with Retry-After (whole seconds, rounded up),
    X-RateLimit-* headers and retry_after as float seconds in the body."""
    headers = {
        "Retry-After": str(int(math.ceil(retry_after))),
        "X-RateLimit-Limit": "5",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset-After": "%.3f" % retry_after,
        "X-RateLimit-Scope": "global" if global_ else "user",
    }
    if global_:
        headers["X-RateLimit-Global"] = "true"
    return _json(429, {"message": "You are being rate limited.",
                       "retry_after": retry_after, "global": global_},
                 headers)


def teams_ok():
    """Workflows webhook: 202 Accepted, empty body."""
    return Respond(202)


def ntfy_ok():
    """Publish success: 200 with the message event as JSON."""
    def answer(request):
        sent = _request_json(request)
        topic = sent.get("topic") or request.path.strip("/")
        message = sent.get("message", request.text if not sent else "")
        now = int(time.time())
        event = {"id": secrets.token_hex(6), "time": now,
                 "expires": now + 43200, "event": "message",
                 "topic": topic, "message": message}
        title = sent.get("title") or request.headers.get("Title")
        if title:
            event["title"] = title
        return _json(200, event)
    return Dynamic(answer, "ntfy_ok")


def ntfy_error(http=429, code=42901,
               error="limit reached: too many requests"):
    """ntfy's error JSON, e.g. (401, 40101, "unauthorized")."""
    return _json(http, {"code": code, "http": http, "error": error,
                        "link": "https://ntfy.sh/docs/publish/"})


def gotify_ok(message_id=1):
    """POST /message success: 200 with the stored message as JSON."""
    def answer(request):
        sent = _request_json(request)
        return _json(200, {
            "id": message_id, "appid": 1,
            "message": sent.get("message", ""),
            "title": sent.get("title", ""),
            "priority": sent.get("priority", 0),
            "extras": sent.get("extras", {}),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return Dynamic(answer, "gotify_ok")


def gotify_401():
    return _json(401, {
        "error": "Unauthorized", "errorCode": 401,
        "errorDescription": "you need to provide a valid access token or "
                            "user credentials to access this api"})


class ServiceAPI(object):
    """A stand-in for a web service's API: checks each request as the
    service does and answers as it would (its success and its error
    bodies).  Use as a receiver's `default` or in its script; what it
    refused, and why, is in `refusals` (so a test sees a wrong request
    even where the sink would only retry)."""

    name = "service"

    def __init__(self):
        self.refusals = []
        self.accepted = []
        self._lock = threading.Lock()

    def _perform(self, handler, request):
        response = self.answer(request)
        request.response = response
        response._perform(handler, request)

    def refuse(self, request, response, why):
        with self._lock:
            self.refusals.append((request, why))
        return response

    def accept(self, request, response):
        with self._lock:
            self.accepted.append(request)
        return response

    def __repr__(self):
        return "%s(%d accepted, %d refused)" % (
            type(self).__name__, len(self.accepted), len(self.refusals))


def _graph_error(status, code, message, kind="OAuthException",
                 details=None):
    """A Graph API error body (the WhatsApp Cloud API's errors)."""
    error = {"message": message, "type": kind, "code": code,
             "fbtrace_id": "A" + secrets.token_hex(10)}
    if details:
        error["error_data"] = {"messaging_product": "whatsapp",
                               "details": details}
    return _json(status, {"error": error})


class WhatsAppAPI(ServiceAPI):
    """The WhatsApp Cloud API's send-message endpoint:

        POST /vNN.N/PHONE_NUMBER_ID/messages
        Authorization: Bearer TOKEN
        Content-Type: application/json
        {"messaging_product": "whatsapp", "to": "<E.164 digits>",
         "type": "text", "text": {"body": "<1 to 4096 characters>"}}

    A wrong or missing token: 401, Graph code 190.  Another phone number
    id: 400, code 100 (no such object).  A malformed body or a text over
    4096 characters: 400, code 100 (invalid parameter).  A recipient not
    in `allowed` (the test number list of a new account): 400, code
    131030.  Success: 200 with contacts and a wamid message id."""

    name = "whatsapp"
    TEXT_LIMIT = 4096

    def __init__(self, token, phone_number_id, allowed=None):
        ServiceAPI.__init__(self)
        self.token = token
        self.phone_number_id = phone_number_id
        self.allowed = allowed

    def answer(self, request):
        parts = request.path.split("/")
        if request.method != "POST" or len(parts) != 4 or \
                not re_fullmatch(r"v\d+\.\d+", parts[1]) or \
                parts[3] != "messages":
            return self.refuse(request, _graph_error(
                400, 2500, "Unknown path components: %s" % request.path),
                "path")
        if request.headers.get("Authorization") != "Bearer " + self.token:
            return self.refuse(request, _graph_error(
                401, 190, "Invalid OAuth access token - Cannot parse "
                "access token"), "token")
        if parts[2] != self.phone_number_id:
            return self.refuse(request, _graph_error(
                400, 100, "Unsupported post request. Object with ID '%s' "
                "does not exist" % parts[2], "GraphMethodException"),
                "phone_number_id")
        sent = request.json
        body = (sent.get("text") or {}).get("body") \
            if isinstance(sent, dict) and isinstance(sent.get("text"),
                                                     dict) else None
        if "application/json" not in request.headers.get(
                "Content-Type", "") or not isinstance(sent, dict) or \
                sent.get("messaging_product") != "whatsapp" or \
                sent.get("type") != "text" or \
                not re_fullmatch(r"[1-9]\d{6,14}", str(sent.get("to"))) \
                or not isinstance(body, str) or not body:
            return self.refuse(request, _graph_error(
                400, 100, "(#100) Invalid parameter"), "shape")
        if len(body) > self.TEXT_LIMIT:
            return self.refuse(request, _graph_error(
                400, 100, "(#100) Param text['body'] must be at most %d "
                "characters long." % self.TEXT_LIMIT), "length")
        if self.allowed is not None and sent["to"] not in self.allowed:
            return self.refuse(request, _graph_error(
                400, 131030, "(#131030) Recipient phone number not in "
                "allowed list", details="Recipient phone number not in "
                "allowed list: Add recipient phone number to recipient "
                "list and try again."), "recipient")
        return self.accept(request, _json(200, {
            "messaging_product": "whatsapp",
            "contacts": [{"input": sent["to"], "wa_id": sent["to"]}],
            "messages": [{"id": "wamid." + secrets.token_hex(16)}]}))


def whatsapp_rate_limited():
    """Cloud API throughput limit: HTTP 400 with Graph code 130429."""
    return _graph_error(400, 130429, "(#130429) Rate limit hit",
                        details="Cloud API message throughput has been "
                        "reached.")


class PagerDutyAPI(ServiceAPI):
    """The PagerDuty Events API v2 enqueue endpoint:

        POST /v2/enqueue   Content-Type: application/json
        {"routing_key": "<32 alphanumerics>", "event_action": "trigger",
         "dedup_key": "<= 255 characters", "payload": {"summary": "<= 1024
         characters", "source", "severity": "critical|error|warning|
         info", "timestamp", "component", "group", "class",
         "custom_details"}}

    Success: 202 {"status": "success", "message": "Event processed",
    "dedup_key"}.  Anything wrong: 400 {"status": "invalid event",
    "message": "Event object is invalid", "errors": [...]}; a well-formed
    key no integration has: 400 with "Invalid routing key".  `incidents`
    maps each dedup key to how many triggers it got (the first opens an
    incident, the rest update it)."""

    name = "pagerduty"
    SEVERITIES = ("critical", "error", "warning", "info")

    def __init__(self, routing_key):
        ServiceAPI.__init__(self)
        self.routing_key = routing_key
        self.incidents = {}

    def _invalid(self, request, errors, why):
        return self.refuse(request, pagerduty_invalid(errors), why)

    def answer(self, request):
        if request.method != "POST" or request.path != "/v2/enqueue":
            return self.refuse(request, Respond(404, b"Not Found"), "path")
        sent = request.json
        if "application/json" not in request.headers.get(
                "Content-Type", "") or not isinstance(sent, dict):
            return self._invalid(request, ["Event object is not valid "
                                           "JSON"], "shape")
        key = str(sent.get("routing_key", ""))
        if len(key) != 32 or not key.isalnum():
            return self._invalid(request, [
                "Length of 'routing_key' is incorrect (should be 32 "
                "characters)"], "routing_key")
        if key != self.routing_key:
            return self._invalid(request, ["Invalid routing key"],
                                 "routing_key")
        payload = sent.get("payload")
        errors = []
        if sent.get("event_action") != "trigger":
            errors.append("'event_action' is invalid (must be one of the "
                          "following: 'trigger', 'acknowledge' or "
                          "'resolve')")
        dedup = sent.get("dedup_key")
        if not isinstance(dedup, str) or not 1 <= len(dedup) <= 255:
            errors.append("'dedup_key' must be a string of at most 255 "
                          "characters")
        if not isinstance(payload, dict):
            errors.append("'payload' is missing or not an object")
            payload = {}
        summary = payload.get("summary")
        if not isinstance(summary, str) or not summary or \
                len(summary) > 1024:
            errors.append("'payload.summary' is missing or longer than "
                          "1024 characters")
        if not isinstance(payload.get("source"), str) or \
                not payload["source"]:
            errors.append("'payload.source' is missing")
        if payload.get("severity") not in self.SEVERITIES:
            errors.append("'payload.severity' is invalid (must be one of "
                          "the following: 'critical', 'warning', 'error' "
                          "or 'info')")
        for name in ("component", "group", "class"):
            if name in payload and not isinstance(payload[name], str):
                errors.append("'payload.%s' must be a string" % name)
        if "custom_details" in payload and \
                not isinstance(payload["custom_details"], dict):
            errors.append("'payload.custom_details' must be an object")
        if errors:
            return self._invalid(request, errors, "shape")
        with self._lock:
            self.incidents[dedup] = self.incidents.get(dedup, 0) + 1
        return self.accept(request, _json(202, {
            "status": "success", "message": "Event processed",
            "dedup_key": dedup}))


def pagerduty_invalid(errors):
    """The Events API's answer to an event it cannot take."""
    return _json(400, {"status": "invalid event",
                       "message": "Event object is invalid",
                       "errors": list(errors)})


def pagerduty_429():
    """Events API throttling: 429 (the body is not JSON to rely on)."""
    return Respond(429, b"", {"Content-Type": "text/plain"})


def re_fullmatch(pattern, text):
    return re.match("(?:%s)\\Z" % pattern, text) is not None


# ------------------------------------------------------------------- SMTP


class Mail(object):
    """One accepted message.  `data` is the DATA as received (CRLF line
    ends, dot-unstuffed); `message` is it parsed with
    email.policy.default (from the data with CRLF turned into LF, so
    get_content() gives plain text)."""

    def __init__(self, mail_from, rcpt_to, data, tls, auth_user, helo,
                 mail_options, peer):
        self.mail_from = mail_from
        self.rcpt_to = list(rcpt_to)
        self.data = data
        self.message = email.message_from_bytes(
            data.replace(b"\r\n", b"\n"), policy=email.policy.default)
        self.tls = tls
        self.auth_user = auth_user
        self.helo = helo
        self.mail_options = list(mail_options)
        self.peer = peer
        self.received_at = time.time()

    @property
    def text(self):
        """The text/plain body (or the first body part) as str."""
        part = self.message.get_body(preferencelist=("plain", "html"))
        return (part or self.message).get_content()

    def __repr__(self):
        return "<Mail from %r to %r subject %r tls=%s auth=%r>" % (
            self.mail_from, self.rcpt_to, self.message.get("Subject"),
            self.tls, self.auth_user)


_DEFAULT_FAILURE_TEXT = {
    421: "4.3.2 Service not available, closing transmission channel",
    450: "4.2.1 Mailbox unavailable, try again later",
    451: "4.3.0 Local error in processing, try again later",
    452: "4.3.1 Insufficient system storage",
    550: "5.1.1 Mailbox unavailable",
    552: "5.3.4 Message size exceeds fixed limit",
    553: "5.1.3 Mailbox name not allowed",
    554: "5.7.1 Transaction failed",
}

_MAX_LINE = 4096
_MAX_DATA = 32 * 1024 * 1024


class _Closed(Exception):
    pass


class _SmtpHandler(socketserver.BaseRequestHandler):

    def setup(self):
        self.rx = self.server.receiver
        self.sock = self.request
        self.sock.settimeout(30)
        self.buf = bytearray()
        self.tls = isinstance(self.sock, ssl.SSLSocket)
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self._reset()

    def _reset(self):
        self.mail_from = None
        self.mail_options = []
        self.rcpt_to = []

    # -- wire

    def _readline(self, limit=_MAX_LINE):
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                return line
            if len(self.buf) > limit:
                self._reply(500, "5.5.6 Line too long")
                raise _Closed()
            chunk = self.sock.recv(65536)
            if not chunk:
                raise _Closed()
            self.buf += chunk

    def _reply(self, code, text, more=()):
        lines = [text] + list(more)
        out = "".join("%d%s%s\r\n" % (code, "-" if i < len(lines) - 1
                                      else " ", line)
                      for i, line in enumerate(lines))
        self.sock.sendall(out.encode("utf-8"))

    def _long_reply(self, where, code):
        """Continuation lines ("220-aaa...") of about `long_reply[1]`
        bytes in all, as fast as the client reads, when `where` is the
        `long_reply[0]` (the greeting, or the EHLO reply over TLS)."""
        kind, size = self.rx.long_reply or (None, 0)
        if kind != where or (where == "EHLO" and not self.tls):
            return
        lines = (b"%d-" % code + b"a" * 994 + b"\r\n") * 64
        for _ in range(size // len(lines) + 1):
            self.sock.sendall(lines)

    # -- session

    def _drip_greeting(self, seconds, interval):
        """The greeting a byte every `interval` for about `seconds` (a
        padded continuation line first), so no single read of the client
        waits long: only a deadline on the whole exchange ends it."""
        tail = b"\r\n220 localhost ESMTP slow\r\n"
        padding = b"a" * max(int(seconds / interval) - len(tail) - 4, 1)
        for index, byte in enumerate(b"220-" + padding + tail):
            if index and self.server.abort.wait(interval):
                raise _Closed()
            self.sock.sendall(bytes((byte,)))

    def handle(self):
        try:
            if self.rx.drip_greeting:
                self._drip_greeting(self.rx.drip_greeting,
                                    self.rx.drip_interval)
            else:
                self._long_reply("greeting", 220)
                self._reply(220, "localhost ESMTP PAMSignal test receiver")
            while True:
                line = self._readline().rstrip(b"\r\n")
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    self._reply(500, "5.5.2 Error: bad UTF-8 syntax")
                    continue
                verb, _, arg = text.partition(" ")
                verb = verb.upper()
                if verb == "AUTH":
                    arg_shown = arg.partition(" ")[0] + " ..."
                else:
                    arg_shown = arg
                self.rx._note_command((verb + " " + arg_shown).rstrip())
                method = getattr(self, "smtp_" + verb, None)
                if method is None:
                    self._reply(502, "5.5.2 Error: command not recognized")
                    continue
                if method(arg.strip()) is False:
                    break
        except _Closed:
            pass

    def finish(self):
        if self.sock is not self.request:
            self.server.close_socket(self.sock)

    def _failure(self, command):
        failure = self.rx._take_failure(command)
        if failure is None:
            return False
        code, text = failure
        self._reply(code, text)
        if code == 421:
            raise _Closed()
        return True

    def smtp_EHLO(self, arg):
        if not arg:
            self._reply(501, "5.5.4 Syntax: EHLO hostname")
            return
        self.helo, self.esmtp = arg, True
        self._reset()
        features = ["SIZE %d" % _MAX_DATA, "8BITMIME", "SMTPUTF8",
                    "ENHANCEDSTATUSCODES"]
        if self.server.starttls_context is not None and not self.tls:
            features.append("STARTTLS")
        if self._auth_offered():
            features.append("AUTH " + " ".join(self.rx.mechanisms))
        self._long_reply("EHLO", 250)
        self._reply(250, "localhost", features)

    def smtp_HELO(self, arg):
        if not arg:
            self._reply(501, "5.5.4 Syntax: HELO hostname")
            return
        self.helo, self.esmtp = arg, False
        self._reset()
        self._reply(250, "localhost")

    def smtp_STARTTLS(self, arg):
        context = self.server.starttls_context
        if context is None:
            self._reply(502, "5.5.1 Error: STARTTLS not offered")
            return
        if self.tls:
            self._reply(503, "5.5.1 Error: TLS already active")
            return
        self._reply(220, "2.0.0 Ready to start TLS")
        del self.buf[:]      # RFC 3207: nothing sent before TLS counts
        try:
            wrapped = context.wrap_socket(self.sock, server_side=True)
        except _NETWORK_ERRORS as e:
            self.rx._note_tls_failure(e)
            raise _Closed() from e
        self.server.track(wrapped, old=self.sock)
        self.sock = wrapped
        self.tls = True
        self.helo, self.esmtp, self.auth_user = None, False, None
        self._reset()

    def _auth_offered(self):
        return (self.rx.user is not None and self.esmtp
                and (self.tls or self.rx.auth_without_tls))

    def _auth_read(self, prompt):
        self._reply(334, prompt)
        line = self._readline().rstrip(b"\r\n")
        if line == b"*":
            self._reply(501, "5.7.0 Authentication cancelled")
            return None
        return line

    @staticmethod
    def _b64(data):
        if data in (b"=", "="):
            return b""
        return base64.b64decode(data, validate=True)

    def smtp_AUTH(self, arg):
        if self.rx.user is None or not self.esmtp:
            self._reply(503, "5.5.1 Error: authentication not enabled")
            return
        if not (self.tls or self.rx.auth_without_tls):
            self._reply(538, "5.7.11 Encryption required for requested "
                             "authentication mechanism")
            return
        if self.auth_user is not None:
            self._reply(503, "5.5.1 Error: already authenticated")
            return
        if self.mail_from is not None:
            self._reply(503, "5.5.1 Error: MAIL transaction in progress")
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism not in self.rx.mechanisms:
            self._reply(504, "5.5.4 Unrecognized authentication type")
            return
        initial = initial.strip() or None
        try:
            if mechanism == "PLAIN":
                if initial is None:
                    initial = self._auth_read("")
                    if initial is None:
                        return
                parts = self._b64(initial).split(b"\0")
                if len(parts) != 3:
                    self._reply(501, "5.5.2 Error: malformed PLAIN response")
                    return
                user, password = parts[1], parts[2]
            else:
                if initial is None:
                    initial = self._auth_read("VXNlcm5hbWU6")
                    if initial is None:
                        return
                user = self._b64(initial)
                answer = self._auth_read("UGFzc3dvcmQ6")
                if answer is None:
                    return
                password = self._b64(answer)
        except (binascii.Error, ValueError):
            self._reply(501, "5.5.2 Error: cannot decode response")
            return
        user = user.decode("utf-8", "replace")
        password = password.decode("utf-8", "replace")
        if user == self.rx.user and password == self.rx.password:
            self.auth_user = user
            self._reply(235, "2.7.0 Authentication successful")
        else:
            self.rx._note_auth_failure(mechanism, user)
            self._reply(535, "5.7.8 Authentication credentials invalid")

    @staticmethod
    def _address(arg, keyword):
        if not arg.upper().startswith(keyword):
            return None, None
        rest = arg[len(keyword):].strip()
        if rest.startswith("<"):
            end = rest.find(">")
            if end < 0:
                return None, None
            return rest[1:end], rest[end + 1:].split()
        address, _, params = rest.partition(" ")
        return address, params.split()

    def smtp_MAIL(self, arg):
        if self.helo is None:
            self._reply(503, "5.5.1 Error: send HELO/EHLO first")
            return
        if self.rx.require_tls and not self.tls:
            self._reply(530, "5.7.0 Must issue a STARTTLS command first")
            return
        if self.rx.require_auth and self.auth_user is None:
            self._reply(530, "5.7.0 Authentication required")
            return
        if self.mail_from is not None:
            self._reply(503, "5.5.1 Error: nested MAIL command")
            return
        address, options = self._address(arg, "FROM:")
        if address is None:
            self._reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return
        if self._failure("MAIL"):
            return
        self.mail_from, self.mail_options = address, options
        self._reply(250, "2.1.0 Ok")

    def smtp_RCPT(self, arg):
        if self.mail_from is None:
            self._reply(503, "5.5.1 Error: need MAIL command")
            return
        address, _ = self._address(arg, "TO:")
        if not address:
            self._reply(501, "5.5.4 Syntax: RCPT TO:<address>")
            return
        if self._failure("RCPT"):
            return
        self.rcpt_to.append(address)
        self._reply(250, "2.1.5 Ok")

    def smtp_DATA(self, arg):
        if not self.rcpt_to:
            self._reply(503, "5.5.1 Error: need RCPT command")
            return
        if self._failure("DATA"):
            self._reset()        # the transaction failed as a whole
            return
        self._reply(354, "End data with <CR><LF>.<CR><LF>")
        data = bytearray()
        while True:
            line = self._readline(limit=_MAX_DATA)
            if line in (b".\r\n", b".\n"):
                break
            if line.startswith(b"."):
                line = line[1:]
            data += line
            if len(data) > _MAX_DATA:
                self._reply(552, "5.3.4 Message too big")
                raise _Closed()
        if self._failure("DATA_END"):
            self._reset()
            return
        mail = Mail(self.mail_from, self.rcpt_to, bytes(data), self.tls,
                    self.auth_user, self.helo, self.mail_options,
                    self.client_address)
        number = self.rx._deliver(mail)
        self._reset()
        self._reply(250, "2.0.0 Ok: queued as %d" % number)

    def smtp_RSET(self, arg):
        self._reset()
        self._reply(250, "2.0.0 Ok")

    def smtp_NOOP(self, arg):
        self._reply(250, "2.0.0 Ok")

    def smtp_VRFY(self, arg):
        self._reply(252, "2.0.0 Cannot VRFY user, but will accept message")

    def smtp_QUIT(self, arg):
        self._reply(221, "2.0.0 Bye")
        return False


class _SmtpServer(_ServerMixin, socketserver.ThreadingMixIn,
                  socketserver.TCPServer):
    starttls_context = None


class SmtpReceiver(_Receiver):
    """A real SMTP server on 127.0.0.1.

    tls            CertBundle (or server SSLContext): STARTTLS is offered,
                   or with implicit_tls=True the port speaks TLS at once
                   (SMTPS, for smtplib.SMTP_SSL).
    user, password enable AUTH (`mechanisms`, default PLAIN and LOGIN);
                   wrong credentials get 535.  AUTH is only offered over
                   TLS when TLS is configured (auth_without_tls overrides).
    require_auth   MAIL before AUTH gets 530 (default: when user is set).
    require_tls    MAIL before STARTTLS gets 530.
    drip_greeting  seconds over which the greeting is sent, a byte every
                   drip_interval seconds (default 1).
    long_reply     ("greeting" or "EHLO", bytes): that reply (EHLO: over
                   TLS only) starts with that many bytes of continuation
                   lines, a reply that seems never to end.

    `messages` (snapshot), `wait_for(count, timeout)`, `commands` (every
    command line, AUTH payloads left out), `auth_failures` [(mechanism,
    user)], `fail_next(code, text, command)`."""

    kind = "smtp-receiver"
    _handler_class = _SmtpHandler

    def __init__(self, tls=None, implicit_tls=False, user=None,
                 password=None, mechanisms=("PLAIN", "LOGIN"),
                 require_auth=None, require_tls=False,
                 auth_without_tls=None, drip_greeting=None,
                 drip_interval=1.0, long_reply=None):
        if implicit_tls and tls is None:
            raise ValueError("implicit_tls needs tls=CertBundle")
        _Receiver.__init__(self, tls if implicit_tls else None)
        self._starttls_context = (None if implicit_tls
                                  else _server_context(tls))
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.user = user
        self.password = password
        self.mechanisms = tuple(m.upper() for m in mechanisms)
        self.require_auth = (user is not None if require_auth is None
                             else require_auth)
        self.require_tls = require_tls
        self.drip_greeting = drip_greeting
        self.drip_interval = drip_interval
        self.long_reply = long_reply
        self.auth_without_tls = (tls is None if auth_without_tls is None
                                 else auth_without_tls)
        self._messages = []
        self._commands = []
        self._failures = []
        self.auth_failures = []

    def _server_class(self):
        context = self._starttls_context

        class Server(_SmtpServer):
            starttls_context = context
        return Server

    @property
    def address(self):
        return (self.host, self._port)

    @property
    def messages(self):
        with self._cond:
            return list(self._messages)

    @property
    def commands(self):
        with self._cond:
            return list(self._commands)

    def wait_for(self, count, timeout=10):
        return self._wait(self._messages, count, timeout, "messages")

    def wait_for_commands(self, count, timeout=10):
        """Wait until `count` command lines arrived; return them."""
        return self._wait(self._commands, count, timeout, "commands")

    def fail_next(self, code, text=None, command=None):
        """Answer the next MAIL, RCPT or DATA command (or only the next
        `command`: "MAIL", "RCPT", "DATA", or "DATA_END" for the reply
        after the message was sent) with `code` and `text`.  Calls queue
        up.  421 also closes the connection."""
        if command is not None:
            command = command.upper()
            if command not in ("MAIL", "RCPT", "DATA", "DATA_END"):
                raise ValueError("command must be MAIL, RCPT, DATA or "
                                 "DATA_END")
        if text is None:
            text = _DEFAULT_FAILURE_TEXT.get(code, "Failed")
        with self._cond:
            self._failures.append((command, int(code), text))
        return self

    def clear(self):
        with self._cond:
            del self._messages[:]
            del self._commands[:]
            del self._failures[:]
            del self.auth_failures[:]

    def _take_failure(self, command):
        with self._cond:
            for i, (wanted, code, text) in enumerate(self._failures):
                if wanted == command or (wanted is None
                                         and command != "DATA_END"):
                    del self._failures[i]
                    return code, text
        return None

    def _deliver(self, mail):
        with self._cond:
            self._messages.append(mail)
            self._cond.notify_all()
            return len(self._messages)

    def _note_command(self, line):
        with self._cond:
            self._commands.append(line)
            self._cond.notify_all()

    def _note_auth_failure(self, mechanism, user):
        with self._cond:
            self.auth_failures.append((mechanism, user))

    def __repr__(self):
        return "<SmtpReceiver %s:%d%s>" % (
            self.host, self._port, " smtps" if self.implicit_tls else "")


# --------------------------------------------------- an HTTPS proxy (CONNECT)



class LoopbackListener(object):
    """A TCP listener on 127.0.0.1 (a free port) whose thread hands each
    connection to `_connection(client)` until the `with` block ends: in a
    thread of its own when `threaded`, else one after another."""

    threaded = True

    def __init__(self):
        self.stopping = threading.Event()
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join(10)
        self.listener.close()

    def _serve(self):
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            if self.threaded:
                threading.Thread(target=self._connection, args=(client,),
                                 daemon=True).start()
            else:
                self._connection(client)


class ConnectProxy(LoopbackListener):
    """What `https_proxy` names: a proxy on 127.0.0.1 that answers CONNECT
    to a loopback port (any host name stands for 127.0.0.1) and relays
    both ways. With `drip`, it answers 200 and then a header line every
    `drip_interval` seconds for `drip` seconds, never the blank line that
    ends its answer. `targets`: the host:port each CONNECT asked for."""

    def __init__(self, drip=None, drip_interval=0.3):
        super().__init__()
        self.drip = drip
        self.drip_interval = drip_interval
        self.targets = []
        self.url = "http://%s:%d" % (HOST, self.port)

    def _connection(self, client):
        try:
            client.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            target = head.split(b" ")[1]
            self.targets.append(target.decode("ascii", "replace"))
            if self.drip is not None:
                self._drip(client)
            else:
                self._relay(client, int(target.rpartition(b":")[2]))
        except _NETWORK_ERRORS:
            pass
        finally:
            client.close()

    def _drip(self, client):
        client.sendall(b"HTTP/1.1 200 Connection established\r\n")
        ends = time.monotonic() + self.drip
        while time.monotonic() < ends and not self.stopping.wait(
                self.drip_interval):
            client.sendall(b"X-Drip: %d\r\n" % int(time.monotonic()))

    def _relay(self, client, port):
        with socket.create_connection((HOST, port), 10) as server:
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            ends = {client: server, server: client}
            while not self.stopping.is_set():
                readable, _, _ = select.select(list(ends), [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    ends[sock].sendall(data)
