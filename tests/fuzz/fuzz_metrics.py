"""Fuzz target: the health file through parse_metrics and what `status`
makes of it.

The service writes the file as its own (sandboxed) user; `status` reads
it, often as root. An input is the file's text. It must parse, give a
report, and print as text and as JSON.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

pamsignal = harness.pamsignal

NOW_S = 1795780000.0
PATH = "/var/lib/pamsignal/metrics.prom"


def check(data):
    # command_status reads UTF-8 text and refuses anything else.
    text = data.decode("utf-8", "replace")
    metrics = pamsignal.parse_metrics(text)
    report = pamsignal.health_report(metrics, NOW_S)
    assert report["state"] in ("running", "stopped", "gone", "stale")
    report["host"] = {"provider": None, "addresses": ["192.0.2.1"]}
    shown = pamsignal.render_status(report, PATH)
    assert not pamsignal._UNSAFE_CHARS.search(shown.replace("\n", ""))
    json.loads(pamsignal.dumps_safe(dict(report, file=PATH)))


def seeds():
    """A healthy file and a degraded one, as the agent writes them."""
    pid = os.getpid()
    healthy = [
        ("pamsignal_info", {"version": "0.1.0"}, 1),
        ("pamsignal_running", {}, 1), ("pamsignal_pid", {}, pid),
        ("pamsignal_start_time_seconds", {}, NOW_S - 3600),
        ("pamsignal_uptime_seconds", {}, 3600.5),
        ("pamsignal_metrics_time_seconds", {}, NOW_S - 5),
        ("pamsignal_journal_entries_total", {}, 1234),
        ("pamsignal_journal_malformed_lines_total", {}, 0),
        ("pamsignal_journalctl_restarts_total", {}, 1),
        ("pamsignal_journal_lag_seconds", {}, 0.25),
        ("pamsignal_events_total", {"action": "login_success"}, 7),
        ("pamsignal_alerts_sent_total", {"channel": "ops"}, 7),
        ("pamsignal_alerts_failed_total", {"channel": "ops"}, 1),
        ("pamsignal_spool_alerts", {"channel": "ops"}, 2),
        ("pamsignal_spool_oldest_age_seconds", {"channel": "ops"}, 61.5),
        ("pamsignal_config_reloads_total", {"result": "ok"}, 1),
        ("pamsignal_config_reloads_total", {"result": "failed"}, 0),
        ("pamsignal_degraded", {"component": "journal"}, 0)]
    degraded = healthy[:1] + [
        ("pamsignal_running", {}, 0), ("pamsignal_pid", {}, 1),
        ("pamsignal_metrics_time_seconds", {}, NOW_S - 900),
        ("pamsignal_degraded", {"component": "channel:ops"}, 1),
        ("pamsignal_last_error_time_seconds", {}, NOW_S - 60),
        ("pamsignal_last_error_info", {"message": 'cannot "x"\n\\'}, 1)]
    return [pamsignal.render_metrics(samples).encode("utf-8")
            for samples in (healthy, degraded)]


#: Metric names and the numbers Python's float() reads.
DICTIONARY = list(pamsignal.METRICS) + [
    "inf", "-inf", "nan", "1e300", "1e15", "-1", "0x10", "1_000", "{", "}",
    '="', '",', "\\n", "\\\\", "\n"]

if __name__ == "__main__":
    harness.fuzz(check, seeds, DICTIONARY)
