"""Run a command on a pseudo-terminal and type passwords at its prompts.

    python3 pty_answer.py '["first", "second"]' COMMAND [ARG...]

doas, pkexec's text agent and su read a password only from a terminal.
Each time the output shows one more "password" prompt, the next password
of the list is typed (none left: nothing is typed). Prints the command's
output and its exit status as one JSON object. Run inside a booted test
container (tests/test_doors.py), so it needs only Python 3.6+."""
import json
import os
import pty
import select
import signal
import sys
import time


def main(argv):
    passwords = json.loads(argv[1])
    pid, terminal = pty.fork()
    if pid == 0:
        os.execvp(argv[2], argv[2:])
    output, prompts = b"", 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        readable, _, _ = select.select([terminal], [], [], 0.1)
        if readable:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO: the command closed the terminal
                break
            if not chunk:
                break
            output += chunk
        seen = output.lower().count(b"password")
        if seen > prompts and passwords:
            prompts = seen
            time.sleep(0.3)  # the prompt turns echo off before it reads
            os.write(terminal, passwords.pop(0).encode() + b"\n")
    else:
        os.kill(pid, signal.SIGKILL)  # hung: its output tells why
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
    print(json.dumps({"rc": code,
                      "output": output.decode("utf-8", "replace")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
