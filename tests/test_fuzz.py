"""The fuzz targets of tests/fuzz/: every regression input and seed
replayed (bounded in time and memory, no atheris needed), then each target
run under atheris for a short time, as CI does on every run.

`make fuzz` runs them for longer (docs/CONTRIBUTING.md, "Fuzzing").
"""

import base64
import glob
import importlib
import os
import subprocess
import sys

import pytest

import realsys

FUZZ_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz")
sys.path.insert(0, FUZZ_DIR)
import harness  # noqa: E402

TARGETS = sorted(harness.target_name(path) for path in
                 glob.glob(os.path.join(FUZZ_DIR, "fuzz_*.py")))

#: Seconds each target runs under atheris in the suite (CI).
CI_SECONDS = int(os.environ.get("PAMSIGNAL_FUZZ_CI_SECONDS", "15"))


def target(name):
    return importlib.import_module("fuzz_" + name)


def test_every_reader_has_a_target():
    assert TARGETS == ["config", "http", "journal", "metrics", "mmdb",
                       "spool", "state"]


REGRESSIONS = [(name, file_name) for name in TARGETS
               for file_name, _ in harness.regression_inputs(name)]


@pytest.mark.parametrize("name,file_name", REGRESSIONS)
def test_regression_input_holds(name, file_name):
    """Each input once crashed a reader (or broke a property); now it must
    pass every property of its target."""
    data = dict(harness.regression_inputs(name))[file_name]
    with harness.bounded():
        target(name).check(data)


def test_regression_folders_belong_to_targets():
    assert os.path.isdir(harness.REGRESSIONS)
    assert set(os.listdir(harness.REGRESSIONS)) <= set(TARGETS)


@pytest.mark.parametrize("name", TARGETS)
def test_seeds_hold(name):
    """The seeds the fuzzer starts from, made from the fixtures, pass: the
    properties hold for what the readers meet every day."""
    fuzz_target = target(name)
    seeds = fuzz_target.seeds()
    assert len(seeds) >= 2
    for seed in seeds:
        with harness.bounded():
            fuzz_target.check(seed)


def test_bounded_catches_a_hang_and_a_hog():
    with pytest.raises(harness.Hang):
        with harness.bounded(hang_s=0.2):
            while True:
                pass
    with pytest.raises(AssertionError, match="allocated"):
        with harness.bounded(peak_limit=1 << 20):
            hog = bytearray(8 << 20)
            del hog


def run_target(name, tmp_path, seconds, *extra):
    """The target under atheris; (exit code, output)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    cached = os.path.join(harness.CORPUS_ROOT, name)
    command = [sys.executable, os.path.join(FUZZ_DIR, "fuzz_%s.py" % name),
               "-max_total_time=%d" % seconds, "-print_final_stats=1",
               "-artifact_prefix=%s/" % tmp_path, str(corpus)]
    if os.path.isdir(cached):
        command.append(cached)  # what `make fuzz` learned, read only
    result = subprocess.run(
        command + list(extra), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, universal_newlines=True,
        timeout=seconds + 300, env=dict(os.environ, TMPDIR=str(tmp_path)))
    return result.returncode, result.stdout


@pytest.mark.parametrize("name", TARGETS)
def test_target_runs_clean_under_atheris(name, tmp_path):
    """A short coverage-guided run finds no crash, hang or memory blow-up
    (each would end libFuzzer with an error and a crash file)."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        realsys.unavailable("atheris is not installed (pip install atheris;"
                            " tests/check.sh does)")
    code, output = run_target(name, tmp_path, CI_SECONDS)
    crashes = [path for path in glob.glob(str(tmp_path / "*"))
               if os.path.basename(path).split("-")[0] in
               ("crash", "timeout", "oom", "leak")]
    found = "".join("\n%s (base64): %s" % (
        os.path.basename(path),
        base64.b64encode(open(path, "rb").read()).decode())
        for path in crashes)
    assert code == 0 and not crashes, (
        "fuzz_%s.py found a problem; add the input under "
        "tests/fuzz/regressions/%s/ once fixed:%s\n%s"
        % (name, name, found, output[-6000:]))
    assert "Done " in output and "stat::number_of_executed_units" in output


@pytest.mark.parametrize("body,said", [
    ("raise ValueError('refused')", "ValueError: refused"),
    ("bytearray(2 << 30)", "MemoryError"),
    ("while True: pass", "ERROR: libFuzzer: timeout"),
], ids=["exception", "memory", "hang"])
def test_the_runner_reports_what_breaks_a_property(body, said, tmp_path):
    """An input that raises, allocates without bound or hangs ends the run
    with an error, whatever the target."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        realsys.unavailable("atheris is not installed (pip install atheris;"
                            " tests/check.sh does)")
    breaking = tmp_path / "breaking"
    breaking.write_bytes(b"any input")
    script = tmp_path / "fuzz_broken.py"
    script.write_text(
        "import sys\nsys.path.insert(0, %r)\nimport harness\n"
        "def check(data):\n    %s\n"
        "harness.fuzz(check, lambda: [b'x'])\n" % (FUZZ_DIR, body))
    result = subprocess.run(
        [sys.executable, str(script), "-timeout=2", str(breaking)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=120, cwd=str(tmp_path),
        env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert result.returncode != 0 and said in result.stdout, result.stdout
