#!/usr/bin/env python3
"""Two versions of pamsignal.py side by side (a benchmark, not a test).

Loads OLD and NEW into one process and feeds each, in turn, the same lines
through a fresh Pipeline (decode, trust, parse, pairing, sessions,
detection), ROUNDS times, so that a shared machine's load swings hit both
alike. Two corpora: bench_pipeline.py's mix (sshd under brute force, some
sudo, other programs) and runs of sudo (text and JSON), su and console
login as the real programs write them, each run its own process.

Usage: python3 bench/bench_compare.py OLD.py NEW.py [N] [ROUNDS]
       (default 50000 entries, 7 rounds; prints best and median entries/s)
"""
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_pipeline import in_process_rate, synthetic_entries  # noqa: E402

#: (identifier, writer UID, message) of one run of each program.
RUNS = (
    (("sudo", "1000", "pam_unix(sudo:auth): authentication failure; "
      "logname= uid=1000 euid=0 tty=/dev/pts/0 ruser=alice rhost=  "
      "user=alice"),
     ("sudo", "1000", "alice : TTY=pts/0 ; PWD=/home/alice ; USER=root ; "
      "COMMAND=/usr/bin/systemctl restart nginx"),
     ("sudo", "1000", "pam_unix(sudo:session): session opened for user "
      "root(uid=0) by alice(uid=1000)"),
     ("sudo", "1000", "pam_unix(sudo:session): session closed for user "
      "root")),
    (("sudo", "1000", '@cee:{"sudo":{"accept":{"uuid":"5a1faca78f",'
      '"server_time":{"seconds":1796555486,"nanoseconds":1},'
      '"submituser":"alice","command":"/usr/bin/id","runuser":"root",'
      '"runcwd":"/","submithost":"vm","submitcwd":"/","runuid":0,'
      '"columns":80,"lines":24,"runargv":["id","-u"],'
      '"runenv":["LANG=C.UTF-8","SUDO_USER=alice"]}}}'),
     ("sudo", "1000", "pam_unix(sudo:session): session opened for user "
      "root(uid=0) by (uid=1000)"),
     ("sudo", "1000", "pam_unix(sudo:session): session closed for user "
      "root")),
    (("su", "1000", "pam_unix(su:auth): authentication failure; logname= "
      "uid=1000 euid=0 tty=/dev/pts/1 ruser=alice rhost=  user=root"),
     ("su", "1000", "FAILED SU (to root) alice on pts/1")),
    (("su", "1000", "(to root) alice on pts/1"),
     ("su", "1000", "pam_unix(su:session): session opened for user "
      "root(uid=0) by (uid=1000)"),
     ("su", "1000", "pam_unix(su:session): session closed for user root")),
    (("login", "0", "pam_unix(login:auth): authentication failure; "
      "logname= uid=0 euid=0 tty=/dev/ttyS0 ruser= rhost=  user=bob"),
     ("login", "0", "FAILED LOGIN (1) on '/dev/ttyS0' FOR 'bob', "
      "Authentication failure"),
     ("login", "0", "pam_unix(login:session): session opened for user "
      "bob(uid=1001) by LOGIN(uid=0)"),
     ("login", "0", "LOGIN ON ttyS0 BY bob")),
)


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def program_runs(count):
    """`count` journal lines of RUNS, over and over, a PID per run."""
    lines, number, pid = [], 0, 1000
    while len(lines) < count:
        for run in RUNS:
            pid += 1
            for identifier, uid, message in run:
                number += 1
                lines.append(json.dumps({
                    "__REALTIME_TIMESTAMP": str(1795780000000000 +
                                                number * 1000),
                    "_BOOT_ID": "0f6c6b5d6a2a4f35a1e1b1d9c3b0f6e1",
                    "_HOSTNAME": "web1", "SYSLOG_IDENTIFIER": identifier,
                    "MESSAGE": message, "_PID": str(pid), "_UID": uid,
                    "_COMM": identifier, "_EXE": "/usr/bin/" + identifier,
                    "_TRANSPORT": "syslog"}).encode() + b"\n")
    return lines[:count]


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    versions = (("old", load("pamsignal_old", sys.argv[1])),
                ("new", load("pamsignal_new", sys.argv[2])))
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 50000
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 7
    corpora = (("bench_pipeline mix", [
        json.dumps(entry).encode() + b"\n"
        for entry in synthetic_entries(count)]),
        ("sudo, su and login runs", program_runs(count)))
    for title, lines in corpora:
        rates, events = {label: [] for label, _ in versions}, {}
        for _ in range(rounds):
            for label, module in versions:
                per_second, events[label] = in_process_rate(lines, module)
                rates[label].append(per_second)
        for label, _ in versions:
            ordered = sorted(rates[label])
            print("%-24s %s: best %6d  median %6d entries/s  (%d events)" % (
                title, label, ordered[-1], ordered[len(ordered) // 2],
                events[label]))


if __name__ == "__main__":
    main()
