#!/usr/bin/env python3
"""Instructions per entry of each stage of `scan` (a benchmark, not a
test), counted by valgrind's callgrind: steady where wall-clock figures
on a shared machine move by 10 to 30% within a day and by half from one
day to the next.

Each stage is a step of bench/stages.py (decoding; parsing on top;
the whole pipeline on top, with no channel), then `scan --json` and
`scan` themselves, in process. Each is counted over the first N entries
of bench_versus.py's README or stress mix and over none, and the
difference divided by N.

Usage: python3 bench/bench_instructions.py [--python PY] [--entries N]
           [--mix readme|stress]
Needs valgrind (Debian's package); a few minutes for 2,000 entries.
"""
import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_versus  # noqa: E402
from needs import program  # noqa: E402

#: What the counted interpreter runs: one stage over the export's lines,
#: `rounds` times (0 or 1).
STAGE_PROGRAM = """
import os, sys
sys.path[:0] = [%(repo)r, %(here)r]
import pamsignal, stages
stage, export, rounds, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), \
    sys.argv[4]
with open(export, "rb") as handle:
    lines = handle.readlines()
defaults = pamsignal.default_config()
for _ in range(rounds):
    if stage in ("json", "text"):
        with open(os.devnull, "w") as sink:
            pamsignal.main(["--config", config, "scan"] +
                           (["--json"] if stage == "json" else []) +
                           [export], sink)
        continue
    pipeline = pamsignal.Pipeline(
        [], defaults.detection, skip_unwatched=True,
        enricher=pamsignal.Enricher.from_config(defaults, False))
    step = getattr(stages, stage)
    for line in lines:
        step(pipeline, line)
"""

#: (stage, what it adds to the one before it).
STAGES = (("decoding", "decoding the JSON line"),
          ("parsing", "parsing (trust checks, rules)"),
          ("processing", "sessions, pairing, enrichment, detection"),
          ("json", "`scan --json`: policy, rendering, printing"),
          ("text", "`scan` (text) instead"))


def instructions(python, stage, export, rounds):
    """Instructions callgrind counted for one run (the configuration: an
    empty file beside the export)."""
    config = os.path.join(os.path.dirname(export), "empty.conf")
    if not os.path.exists(config):
        os.close(os.open(config, os.O_WRONLY | os.O_CREAT, 0o600))
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         python, "-c", STAGE_PROGRAM % {"repo": REPO, "here": HERE},
         stage, export, str(rounds), config],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        universal_newlines=True, check=True)
    for line in result.stderr.splitlines():
        if "Collected :" in line:
            return int(line.split(":")[-1])
    raise SystemExit("callgrind printed no count:\n" + result.stderr)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--entries", type=int, default=2000)
    parser.add_argument("--mix", choices=("readme", "stress"),
                        default="readme")
    arguments = parser.parse_args(argv)
    program("valgrind", "valgrind")
    if arguments.entries < 1:
        parser.error("--entries must be at least 1")
    mix = bench_versus.readme_mix if arguments.mix == "readme" \
        else bench_versus.stress_mix
    with tempfile.TemporaryDirectory() as directory:
        export, _ = bench_versus.write_inputs(
            directory, "mix", mix, arguments.entries, syslog=False)
        empty, _ = bench_versus.write_inputs(directory, "none", mix, 1,
                                             syslog=False)
        print("instructions per entry, %s mix, %d entries, %s\n"
              % (arguments.mix, arguments.entries, arguments.python))
        print("| stage | adds | total |")
        print("|---|---|---|")
        totals = []
        # The steps' base: the same program reading the lines, no step run.
        base = instructions(arguments.python, "decoding", export, 0)
        for stage, title in STAGES:
            if stage in ("json", "text"):  # the run of one entry as base
                count = (instructions(arguments.python, stage, export, 1) -
                         instructions(arguments.python, stage, empty, 1)) \
                    // (arguments.entries - 1 or 1)
            else:
                count = (instructions(arguments.python, stage, export, 1) -
                         base) // arguments.entries
            # each adds to the one before (text: instead of JSON's lines)
            before = totals[-1] if stage != "text" and totals else \
                totals[2] if stage == "text" else 0
            totals.append(count)
            print("| %s | %+d | %d |" % (title, count - before, count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
