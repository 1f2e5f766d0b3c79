"""What each stage of the pipeline costs per entry, shared by the
benchmarks that break their time down (bench_detection, bench_versus):
steps that go one stage further each, and the best of a few timed
passes of the same lines through a fresh pipeline."""
import sys
import time


def decoding(pipeline, line):
    """Only the JSON line decoded."""
    pipeline.decode(line)


def parsing(pipeline, line):
    """Decoded, then parsed to an event (or nothing)."""
    entry = pipeline.decode(line)
    if entry is not None:
        pipeline_module(pipeline).parse_entry(entry)


def processing(pipeline, line):
    """Decoded, parsed and through the whole pipeline."""
    entry = pipeline.decode(line)
    if entry is not None:
        pipeline.process_entry(entry)


def pipeline_module(pipeline):
    """The pamsignal module the pipeline comes from (a benchmark may have
    loaded its own copy)."""
    return sys.modules[type(pipeline).__module__]


def best_us(lines, new_pipeline, step, change=None, rounds=3):
    """Microseconds per line of the quickest of `rounds` passes of
    `step(pipeline, line)` over `lines`, each through `new_pipeline()`
    (altered by `change(pipeline)` first, when given)."""
    seconds = []
    for _ in range(rounds):
        pipeline = new_pipeline()
        if change is not None:
            change(pipeline)
        started = time.perf_counter()
        for line in lines:
            step(pipeline, line)
        seconds.append(time.perf_counter() - started)
    return min(seconds) / len(lines) * 1e6
