"""Fuzz target: a configuration file through parse_config, and what the
agent then builds from it.

An input is the file (UTF-8; load_config refuses anything else). It must
give a Config or ConfigError, whose problems point at lines of the file.
A rejected secret is not repeated in the problem. A Config must work:
every channel builds its sink, renders a sample alert with its template,
and its policy and throttle judge a sample event.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

pamsignal = harness.pamsignal

SAMPLE = pamsignal.sample_alert(1795780000.0)._replace(
    hostname="web1", source_ip="2001:db8::5")


def secret_values(text):
    """{(section, key): value} of the secrets written in the file."""
    try:
        parser = pamsignal._read_ini(text, "<fuzz>")
    except pamsignal.ConfigError:
        return {}
    found = {}
    for section in parser.sections():
        sink = pamsignal.CHANNEL_TYPES.get(
            parser[section].get("type", "").strip())
        for key, value in parser[section].items():
            if sink is not None and sink.OPTIONS.get(key) in (
                    pamsignal._secret, pamsignal._secret_url):
                found[(section, key)] = value.strip()
    return found


def check(data):
    text = data.decode("utf-8", "replace")
    try:
        config = pamsignal.parse_config(text, "/etc/pamsignal/fuzz.conf")
    except pamsignal.ConfigError as error:
        assert error.problems
        lines = len(text.splitlines()) + 1
        for problem in error.problems:
            assert type(problem) is pamsignal.ConfigProblem
            assert problem.line is None or 1 <= problem.line <= lines, \
                problem
        # A rejected secret is never repeated (check-config output, logs).
        secrets = secret_values(text)
        for problem in error.problems:
            secret = secrets.get((problem.section, problem.key), "")
            assert len(secret) < 8 or secret not in problem.message, \
                problem
        str(error)
        return
    pamsignal.inline_secrets(config)
    pamsignal.refuse_exposed_secrets(config, config.path, 0o600)
    for channel in config.channels:
        sink = pamsignal.CHANNEL_TYPES[channel.type](channel.name,
                                                     channel.options)
        if isinstance(sink, pamsignal.EmailSink):
            sink.message(SAMPLE, 0).as_bytes()
        elif isinstance(sink, pamsignal.HttpSink):
            sink.request(SAMPLE, 0)
        gate = pamsignal.ChannelGate(channel.policy)
        gate.admit(SAMPLE, SAMPLE.timestamp_us)
        gate.due(SAMPLE.timestamp_us + 10 ** 9)


def seeds():
    with open(os.path.join(harness.REPO, "pamsignal.conf.example"),
              encoding="utf-8") as f:
        example = f.read()
    settings = (
        "[pamsignal]\nstate_dir = /var/lib/ps\nfirst_start = -1h\n"
        "spool_max_alerts = 10\nspool_max_age = 2d\nhost_provider = auto\n"
        "[detection]\nbrute_force_fast = 3 in 1m\nlearning_period = 0s\n"
        "[alerts]\nevents = *\nmin_severity = 3\nignore_users = bo*\n"
        "ignore_sources = 10.0.0.0/8, ::1\nalways_groups = admins\n"
        "cooldown = 5m\nrate_limit = 5 in 1m\n"
        "[geoip]\nasn_db = /var/lib/GeoIP/a.mmdb\n")
    return [example.encode("utf-8"), harness.CHANNELS.encode("utf-8"),
            settings.encode("utf-8"), b"", b"[channel:x]\ntype = console\n"]


def dictionary():
    """Sections, keys, channel types, actions and value shapes."""
    words = ["[pamsignal]", "[detection]", "[alerts]", "[geoip]",
             "[channel:", "]", " = ", "\n", "; ", "# ", "credential:",
             "https://", "http://127.0.0.1:", "http://[::1]:", " in ",
             "10m", "-1h", "7d", "0s", "{title}", "{user}", "{", "}", ",",
             "whsec_", "/", "%(", ")s", "*", "default", "\t"]
    for options in (pamsignal.GLOBAL_OPTIONS, pamsignal.DETECTION_OPTIONS,
                    pamsignal.ALERT_OPTIONS, pamsignal.GEOIP_OPTIONS):
        words += list(options)
        words += [option.default for option in options.values()
                  if option.default]
    for kind, sink in pamsignal.CHANNEL_TYPES.items():
        words += [kind, "type = " + kind] + list(sink.OPTIONS)
    return words + list(pamsignal.ACTIONS)


if __name__ == "__main__":
    harness.fuzz(check, seeds, dictionary())
