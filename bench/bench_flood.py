#!/usr/bin/env python3
"""A brute force against a real sshd while the agent follows the journal
(a benchmark, not a test): how many failed logins a second sshd logs on
this machine, what following them costs the agent, and how long after
sshd's line each alert is out.

An sshd of the bench's own (loopback, a free port, PAM and passwords, the
rest as shipped: MaxStartups 10:30:100, pam_unix's delay after a wrong
password) is flooded for SECONDS by CLIENTS parallel `sshpass ssh` runs,
each one wrong password for an invalid user from a loopback address of
its own (a botnet: every attempt a new source). Meanwhile `pamsignal.py
run --json` follows the real journal with its audit log, printing every
event to a console channel that holds nothing back; the bench reads that
output as it comes. Printed:

  attempts made, and the lines sshd wrote to the journal (per second)
  the agent's CPU (its own and its journalctl's) over the flood, as a
  share of one core and per line sshd wrote; its peak resident memory
  how many of the wrong passwords sshd logged (by source address and
  port) have an event and how many events they have (one each), and the
  delay from each one's journal time to its event on the agent's output
  (median, 99th percentile, largest), beside the same delay to a plain
  `journalctl -f` (journald tells its followers in batches)

Needs root, systemd-journald (started if none answers), openssh-server
and sshpass, as the end-to-end tests do.

Usage: sudo python3 bench/bench_flood.py [--clients N] [--seconds S]
           [--python PY]
"""
import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PAMSIGNAL = os.path.join(REPO, "pamsignal.py")
sys.path.insert(0, os.path.join(REPO, "tests"))

from bench_memory import memory_kib  # noqa: E402
from needs import program  # noqa: E402
import realsys  # noqa: E402

#: How long the output may stay quiet before the agent counts as caught
#: up: longer than a held sshd failure waits for its connection's end.
QUIET_S = 12

#: Clock ticks per second, for /proc/PID/stat's CPU times.
TICKS = os.sysconf("SC_CLK_TCK")


def start_sshd(directory, port):
    """An sshd of the bench's own on 127.0.0.1:port, in the foreground
    (-D), as shipped but for the port, PAM and password logins."""
    config = os.path.join(directory, "sshd_config")
    if not any(os.path.exists("/etc/ssh/ssh_host_%s_key" % kind)
               for kind in ("ed25519", "ecdsa", "rsa")):
        subprocess.run(["ssh-keygen", "-A"], check=True)
    keys = ["HostKey /etc/ssh/ssh_host_%s_key" % kind
            for kind in ("ed25519", "ecdsa", "rsa")
            if os.path.exists("/etc/ssh/ssh_host_%s_key" % kind)]
    with open(config, "w") as handle:
        handle.write("\n".join([
            "Port %d" % port, "ListenAddress 127.0.0.1",
            "PidFile %s" % os.path.join(directory, "sshd.pid"),
            "UsePAM yes", "PasswordAuthentication yes",
            "KbdInteractiveAuthentication no"] + keys) + "\n")
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", config],
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 20
    while not realsys._ssh_banner("127.0.0.1", port):
        if sshd.poll() is not None or time.time() > deadline:
            stop([sshd])
            raise SystemExit("the bench's sshd did not come up")
        time.sleep(0.1)
    return sshd


def start_agent(directory, python):
    """`pamsignal.py run --json` on the real journal, every event to the
    console (nothing held back), its audit log on as by default."""
    config = os.path.join(directory, "pamsignal.conf")
    with open(config, "w") as handle:
        handle.write(
            "[pamsignal]\nstate_dir = %s\nlog_dir = %s\n"
            "[channel:console]\ntype = console\nformat = json\nevents = *\n"
            "cooldown = off\nrate_limit = off\nrepeats = off\n"
            % (os.path.join(directory, "state"),
               os.path.join(directory, "log")))
    os.chmod(config, 0o600)
    return subprocess.Popen([python, PAMSIGNAL, "--config", config, "run",
                             "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)


class Output:
    """The agent's output lines as they come, each with when it came."""

    def __init__(self, stream):
        self.lines = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, args=(stream,),
                                       daemon=True)
        self.reader.start()

    def _read(self, stream):
        for line in stream:
            with self.lock:
                self.lines.append((time.time(), line))

    def printed(self):
        with self.lock:
            return list(self.lines)

    def events(self, prefix):
        """(time printed, event) of the agent's login failures of users
        named `prefix`..."""
        found = []
        for printed, line in self.printed():
            event = json.loads(line)
            if event["event"]["action"] == "login_failure" and \
                    event.get("user", {}).get("name", "").startswith(prefix):
                found.append((printed, event))
        return found

    def failures(self, prefix):
        """(time printed, journal time in seconds) of journalctl's lines
        of failed passwords for users named `prefix`..."""
        found = []
        for printed, line in self.printed():
            entry = json.loads(line)
            if realsys._text(entry.get("MESSAGE")).startswith(
                    "Failed password for invalid user " + prefix):
                found.append((printed, int(entry["__REALTIME_TIMESTAMP"])
                              / 1e6))
        return found

    def quiet_for(self, seconds):
        with self.lock:
            last = self.lines[-1][0] if self.lines else 0
        return time.time() - last >= seconds


def attempt(port, user, source):
    """One wrong password for `user` from `source`; True when ssh ran."""
    return realsys.ssh_password(user, "wrong", host="127.0.0.1", port=port,
                                timeout=60, source=source) is not None


def flood(port, prefix, clients, seconds):
    """CLIENTS threads trying wrong passwords until SECONDS pass; returns
    how many attempts were made."""
    deadline = time.time() + seconds
    made = [0] * clients

    def client(number):
        while time.time() < deadline:
            attempt(port, "%s%d" % (prefix, made[number] % 50),
                    realsys.unique_loopback())
            made[number] += 1

    threads = [threading.Thread(target=client, args=(number,))
               for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(made)


def cpu_seconds(pid):
    """User and system CPU of a process so far, in seconds."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


#: What sshd's processes log as: OpenSSH 9.8 and later log each
#: connection as sshd-session (10.x also sshd-auth).
SSHD_IDENTIFIERS = ("sshd", "sshd-session", "sshd-auth")


def sshd_lines(cursor, prefix, listener_pid):
    """The lines the bench's sshd wrote since `cursor`: its listener's and
    those of every connection process that named one of its users."""
    entries = [entry for entry in realsys.journal_entries(cursor)
               if realsys._text(entry.get("SYSLOG_IDENTIFIER"))
               in SSHD_IDENTIFIERS]
    pids = {realsys._text(entry.get("_PID")) for entry in entries
            if prefix in realsys._text(entry.get("MESSAGE"))}
    pids.add(str(listener_pid))
    return [entry for entry in entries
            if realsys._text(entry.get("_PID")) in pids]


#: sshd's line for a wrong password of an invalid user: its source.
FAILED_PASSWORD = re.compile(r"Failed password for invalid user (\S+) from "
                             r"(\S+) port (\d+) ")


def failed_passwords(entries, prefix):
    """(source address, port) -> journal time in seconds of each wrong
    password sshd logged for a user named `prefix`..."""
    found = {}
    for entry in entries:
        match = FAILED_PASSWORD.match(realsys._text(entry.get("MESSAGE")))
        if match and match.group(1).startswith(prefix):
            found[match.group(2), int(match.group(3))] = int(
                entry["__REALTIME_TIMESTAMP"]) / 1e6
    return found


def source_of(event):
    source = event.get("source", {})
    return source.get("ip"), source.get("port")


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--python", default="/usr/bin/python3")
    return parser.parse_args(argv)


def wait_until_ready(port, prefix, agent, output):
    """Until the agent has printed a first attempt (tried again every few
    seconds: the agent follows only from when it started)."""
    deadline = time.time() + 90
    while not output.events(prefix):
        if agent.poll() is not None or time.time() > deadline:
            raise SystemExit("the agent never printed a first attempt")
        attempt(port, prefix, realsys.unique_loopback())
        for _ in range(25):
            if output.events(prefix):
                return
            time.sleep(0.2)


def wait_until_caught_up(output, longest_s=180):
    """Until the agent's output has been quiet for QUIET_S (other logins
    on the machine may keep it busy: then for at most `longest_s`)."""
    deadline = time.time() + longest_s
    while not output.quiet_for(QUIET_S) and time.time() < deadline:
        time.sleep(0.5)


def cpu_of(pids):
    """CPU seconds of the processes that are still there."""
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass  # a journalctl the agent replaced
    return total


def stop(processes):
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(args, directory, started_processes):
    """The flood and what it cost; returns the figures to print."""
    port = realsys.free_port()
    prefix = "fl%s" % secrets.token_hex(3)
    sshd = start_sshd(directory, port)
    started_processes.append(sshd)
    agent = start_agent(directory, args.python)
    started_processes.append(agent)
    output = Output(agent.stdout)
    # journalctl -f alone, for what journald's own notice of new entries
    # takes (it tells followers in batches, up to a quarter second late)
    follower = subprocess.Popen(["journalctl", "-f", "-o", "json", "-n", "0"]
                                + ["SYSLOG_IDENTIFIER=%s" % name
                                   for name in SSHD_IDENTIFIERS],
                                stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
    started_processes.append(follower)
    followed = Output(follower.stdout)
    wait_until_ready(port, prefix + "w", agent, output)
    journalctl = realsys.child_processes(agent.pid)
    cursor = realsys.journal_cursor()
    cpu_before = cpu_of([agent.pid] + journalctl)
    started = time.time()
    made = flood(port, prefix + "x", args.clients, args.seconds)
    flooded_s = time.time() - started
    wait_until_caught_up(output)
    cpu = cpu_of([agent.pid] + journalctl) - cpu_before
    entries = sshd_lines(cursor, prefix + "x", sshd.pid)
    failures = failed_passwords(entries, prefix + "x")
    events = output.events(prefix + "x")
    told = {}
    for printed, event in events:
        told.setdefault(source_of(event), []).append(printed)
    return {"flooded_s": flooded_s, "made": made, "cpu": cpu,
            "peak": memory_kib(agent.pid)[1] / 1024.0,
            "entries": len(entries),
            "failures": len(failures),
            "with_event": sum(1 for key in failures if key in told),
            "their_events": sum(len(told[key]) for key in failures
                                if key in told),
            "others": sum(len(times) for key, times in told.items()
                          if key not in failures),
            "delays": [min(told[key]) - logged
                       for key, logged in failures.items() if key in told],
            "plain_delays": [printed - logged for printed, logged
                             in followed.failures(prefix + "x")]}


def main(argv=None):
    args = parse_arguments(argv)
    if os.geteuid() != 0:
        sys.exit("run as root: the bench starts sshd and journald")
    program("/usr/sbin/sshd", "openssh-server")
    program("sshpass", "sshpass")
    realsys.ensure_journald()
    directory = tempfile.mkdtemp(prefix="pamsignal-flood-")
    started_processes = []
    try:
        figures = measure(args, directory, started_processes)
    finally:
        stop(started_processes)
        shutil.rmtree(directory, ignore_errors=True)
    flooded_s = figures["flooded_s"]
    print("sshd flooded for %.0f s by %d clients, Python %s for the agent; "
          "load average %.1f at the end" % (
              flooded_s, args.clients, args.python, os.getloadavg()[0]))
    print("attempts made            %8d  (%.0f/s)" % (
        figures["made"], figures["made"] / flooded_s))
    print("failed-password lines    %8d  (%.0f/s)" % (
        figures["failures"], figures["failures"] / flooded_s))
    print("sshd lines in the journal %7d  (%.0f/s)" % (
        figures["entries"], figures["entries"] / flooded_s))
    print("agent CPU (with its journalctl) %.2f s: %.1f%% of one core, "
          "%.0f us per sshd line" % (
              figures["cpu"], 100 * figures["cpu"] / flooded_s,
              1e6 * figures["cpu"] / max(figures["entries"], 1)))
    print("agent peak RSS           %8.1f MiB" % figures["peak"])
    print("failed passwords with an event %d of %d (events for them %d); "
          "other failures (cut off before a password) %d" % (
              figures["with_event"], figures["failures"],
              figures["their_events"], figures["others"]))
    for name, values in (("journal to agent output", figures["delays"]),
                         ("journal to journalctl -f",
                          figures["plain_delays"])):
        if values:
            print("%-24s median %.0f ms, 99%% %.0f ms, largest %.0f ms" % (
                name, 1000 * percentile(values, 0.5),
                1000 * percentile(values, 0.99), 1000 * max(values)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
