#!/usr/bin/env python3
"""Worst-case parse time of hostile messages (a benchmark, not a test).

Each message is crafted against one rule's regex (many separators, long
near-misses, a trailing newline) at the largest size the parser reads.
A regex with catastrophic backtracking shows here as milliseconds or more
per message; linear ones stay in microseconds.
Usage: python3 bench/bench_hostile.py
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from support import make_entry, pamsignal  # noqa: E402

SIZE = pamsignal.MAX_MESSAGE_CHARS

HOSTILE = (
    ("login", "TOO MANY LOGIN TRIES (3) FOR x" + ", " * (SIZE // 2) + "\nz"),
    ("login", "FAILED LOGIN 1 FOR " + "'x, " * (SIZE // 4) + "\n"),
    ("login", "ROOT LOGIN on '" + "'" * SIZE),
    ("sshd", "Failed password for " + " from 1 port 2" * (SIZE // 14)),
    ("sshd", "Accepted publickey for a" + " from 1.2.3.4 port 5 ssh2: "
     "RSA-CERT SHA256:x ID" * (SIZE // 48)),
    ("sshd", "Invalid user " + " from" * (SIZE // 5)),
    ("sshd", "User " + " not allowed because" * (SIZE // 20)),
    ("sudo", "a : " + "USER=x ; " * (SIZE // 9) + "\n"),
    ("sudo", "a : " + " ; COMMAND=" * (SIZE // 11)),
    ("su", "FAILED SU (to " + " " * SIZE),
    ("systemd-logind", "New session " + "'" * SIZE),
    ("pkexec", "a: Executing command [USER=root] [TTY=t] [CWD="
     + "] [COMMAND=" * (SIZE // 12)),
    ("pkexec", "a: Error executing command as another user: " + "[" * SIZE),
    ("polkitd", "Operator of x FAILED to authenticate to gain authorization"
     " for action a for b [" + "] (owned by unix-user:" * (SIZE // 22)),
    ("doas", "a ran command" + " as root from" * (SIZE // 13)),
    ("doas", "command not permitted for a: " + ":" * SIZE),
)


def main():
    worst = 0.0
    for identifier, message in HOSTILE:
        entry = make_entry(identifier, message)
        started = time.perf_counter()
        pamsignal.parse_entry(entry)
        took = time.perf_counter() - started
        worst = max(worst, took)
        print("%-15s %-45r %8.3f ms" % (identifier, message[:45],
                                         took * 1000))
    print("worst: %.3f ms per message" % (worst * 1000))


if __name__ == "__main__":
    main()
