"""A real syslog collector for the tests and the benchmark: Debian's
rsyslogd, started with its own configuration, pid file and work directory
in a temporary directory (never the system's /etc/rsyslog.conf or a
system rsyslogd), listening on one loopback port: imudp, imtcp, or imtcp
with the gtls driver (rsyslog-gnutls) for TLS.

Each message it receives is written to `messages.log` as one line: the
raw message exactly as received (`%rawmsg%`), JSON-escaped by rsyslog so
that a newline inside a message cannot pass for a new one. Control
characters are kept as received (parser.escapeControlCharactersOnReceive
off), so what the file holds is what the sender sent.

    with Collector(tmp_dir, "tcp") as collector:
        ...                                  # send to 127.0.0.1:collector.port
        messages = collector.wait_for(3)     # [bytes, ...] in arrival order
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

RSYSLOGD = "/usr/sbin/rsyslogd"

#: rsyslog's TLS driver; in the separate rsyslog-gnutls package on Debian.
GTLS_DRIVER = "/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so"

_GLOBAL = """\
global(workDirectory="{work}"{size}
       parser.escapeControlCharactersOnReceive="off"{tls_global})
module(load="mmnormalize")
template(name="raw" type="string" string="%rawmsg:::json%\\n")
template(name="cef" type="string" string="%$!cef%\\n")
ruleset(name="collected") {{
    action(type="omfile" file="{log}" template="raw" flushOnTXEnd="on"
           asyncWriting="off"){cef_action}
}}
"""

#: With parse_cef: liblognorm's CEF parser (rsyslog's mmnormalize) reads
#: each message's MSG too, and its fields go to cef.log as JSON.
_CEF_ACTION = """
    action(type="mmnormalize" rulebase="{rulebase}")
    action(type="omfile" file="{cef_log}" template="cef" flushOnTXEnd="on"
           asyncWriting="off")"""

_TLS_GLOBAL = """
       defaultNetstreamDriver="gtls"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}\""""

_INPUTS = {
    "udp": 'module(load="imudp")\n'
           'input(type="imudp" address="127.0.0.1" port="{port}" '
           'ruleset="collected")\n',
    "tcp": 'module(load="imtcp")\n'
           'input(type="imtcp" address="127.0.0.1" port="{port}" '
           'ruleset="collected")\n',
    "tls": 'module(load="imtcp" streamDriver.name="gtls" '
           'streamDriver.mode="1" streamDriver.authMode="{auth_mode}"'
           '{peers})\n'
           'input(type="imtcp" address="127.0.0.1" port="{port}" '
           'ruleset="collected")\n',
}


def free_port(kind="tcp"):
    """A port nobody listens on now (the collector binds it next)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp"
                          else socket.SOCK_STREAM)
    try:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
    finally:
        probe.close()


def written_lines(path):
    """The lines rsyslog has finished writing to `path` (none while it does
    not exist): a line still being written is left for the next look (seen
    once: read half-written, it was not JSON)."""
    try:
        with open(path, "rb") as handle:
            return [line.decode("utf-8")
                    for line in handle.read().split(b"\n")[:-1]]
    except FileNotFoundError:
        return []


class Collector(object):
    """rsyslogd on 127.0.0.1:`port` for `transport` udp, tcp or tls.

    For tls, `certs` is a receivers.CertBundle served by the collector;
    `client_ca` makes it require a client certificate signed by that CA
    (x509/certvalid), `permitted_peer` one whose name matches
    (x509/name). `max_size` sets maxMessageSize (None: rsyslog's
    default). `parse_cef` has rsyslog's own CEF parser read each message
    (`cef_records()`)."""

    def __init__(self, directory, transport, certs=None, client_ca=None,
                 permitted_peer=None, port=None, max_size="64k",
                 parse_cef=False):
        self.directory = os.path.join(str(directory), "rsyslog-%s" %
                                      transport)
        self.transport = transport
        self.certs = certs
        self.client_ca = client_ca
        self.permitted_peer = permitted_peer
        self.port = port or free_port(transport)
        self.max_size = max_size
        self.parse_cef = parse_cef
        self.cef_log = os.path.join(self.directory, "cef.log")
        self.log = os.path.join(self.directory, "messages.log")
        self.pid_file = os.path.join(self.directory, "rsyslogd.pid")
        self.config = os.path.join(self.directory, "rsyslog.conf")
        self.process = None

    def _config_text(self):
        work = os.path.join(self.directory, "work")
        os.makedirs(work, exist_ok=True)
        tls_global = ""
        auth_mode, peers = "anon", ""
        if self.transport == "tls":
            tls_global = _TLS_GLOBAL.format(
                ca=self.client_ca or self.certs.ca_file,
                cert=self.certs.cert_file, key=self.certs.key_file)
            if self.permitted_peer:
                auth_mode = "x509/name"
                peers = ' permittedPeer=["%s"]' % self.permitted_peer
            elif self.client_ca:
                auth_mode = "x509/certvalid"
        size = ' maxMessageSize="%s"' % self.max_size if self.max_size \
            else ""
        cef_action = ""
        if self.parse_cef:
            rulebase = os.path.join(self.directory, "cef.rb")
            with open(rulebase, "w") as handle:
                handle.write("version=2\nrule=:%cef:cef%\n")
            cef_action = _CEF_ACTION.format(rulebase=rulebase,
                                            cef_log=self.cef_log)
        return _GLOBAL.format(work=work, log=self.log, size=size,
                              tls_global=tls_global,
                              cef_action=cef_action) + \
            _INPUTS[self.transport].format(port=self.port,
                                           auth_mode=auth_mode, peers=peers)

    def start(self, timeout=20):
        """Start rsyslogd and return once it accepts (tcp/tls) or once
        its pid file is written (udp)."""
        os.makedirs(self.directory, exist_ok=True)
        with open(self.config, "w") as handle:
            handle.write(self._config_text())
        if os.path.exists(self.pid_file):
            os.unlink(self.pid_file)
        self.stderr = open(os.path.join(self.directory, "rsyslogd.err"),
                           "ab")
        self.process = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", self.config, "-i", self.pid_file],
            stdin=subprocess.DEVNULL, stdout=self.stderr,
            stderr=self.stderr)
        deadline = time.monotonic() + timeout
        while not self._listening():
            if self.process.poll() is not None:
                raise RuntimeError("rsyslogd exited with %d: %s" % (
                    self.process.returncode, self.errors()))
            if time.monotonic() > deadline:
                raise RuntimeError("rsyslogd did not start listening on %d "
                                   "within %ds: %s" % (self.port, timeout,
                                                       self.errors()))
            time.sleep(0.05)
        return self

    def _listening(self):
        if self.transport == "udp":
            return os.path.exists(self.pid_file) and _udp_bound(self.port)
        try:
            socket.create_connection(("127.0.0.1", self.port), 1).close()
        except OSError:
            return False
        return True

    def stop(self, timeout=20):
        """SIGTERM, as a service manager stops it; wait for the exit."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        self.stderr.close()

    def errors(self):
        try:
            with open(os.path.join(self.directory, "rsyslogd.err"), "rb") \
                    as handle:
                return handle.read().decode("utf-8", "replace")[-3000:]
        except OSError:
            return ""

    def messages(self):
        """Every message received so far, as bytes, in arrival order."""
        return [json.loads('"%s"' % line).encode("utf-8", "surrogateescape")
                for line in written_lines(self.log)]

    def cef_records(self):
        """What liblognorm's CEF parser made of each message (parse_cef):
        {"DeviceVendor", ..., "Extensions": {key: value}}."""
        return [json.loads(line) for line in written_lines(self.cef_log)
                if line.strip()]

    def wait_for(self, count, timeout=30):
        """At least `count` messages (all of them), waiting up to
        `timeout` seconds; fewer if they never come."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages()
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)


def _udp_bound(port):
    """Whether something listens on UDP 127.0.0.1:port (/proc/net/udp)."""
    wanted = ":%04X" % port
    try:
        with open("/proc/net/udp") as handle:
            return any(line.split()[1].endswith(wanted)
                       for line in list(handle)[1:])
    except OSError:
        return False
