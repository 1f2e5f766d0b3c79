"""The man pages: clean under `mandoc -T lint`, and they keep up with the
program: every command and option of the command line is in pamsignal(8),
every configuration key with its default in pamsignal.conf(5)."""
import argparse
import os
import re
import shutil
import subprocess

import pytest

import realsys
from support import REPO, pamsignal

PAGES = ("pamsignal.8", "pamsignal.conf.5")


def page(name):
    with open(os.path.join(REPO, name)) as handle:
        return handle.read()


def words(roff):
    """The page's text as a reader sees it, roughly: escapes and font
    requests removed, so `.BR \\-\\-json ]` reads `--json ]`."""
    text = roff.replace("\\-", "-").replace("\\(dq", '"')
    text = re.sub(r"\\f[BIRP]", "", text)
    lines = []
    for line in text.splitlines():
        font = re.match(r"^\.(?:B|I|BR|RB|BI|IB|IR|RI)\b ?", line)
        if font:  # alternating fonts: the quotes only group words
            line = re.sub(r" +", " ", line[font.end():].replace('"', ""))
            line = line.replace(" ,", ",")
        lines.append(line)
    return "\n".join(lines)


@pytest.mark.parametrize("name", PAGES)
def test_page_is_clean_under_mandoc_lint(name):
    if shutil.which("mandoc") is None:
        realsys.unavailable("mandoc is not installed (apt-get install mandoc)")
    result = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", name],
                            cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True,
                            timeout=60)
    assert (result.returncode, result.stdout) == (0, "")


def command_line():
    """(command, option strings) of every subcommand, and the global
    options, from the real parser."""
    parser = pamsignal.build_parser()
    found = {"": [o for a in parser._actions for o in a.option_strings]}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = [o for a in sub._actions
                               for o in a.option_strings]
    return found


def test_every_command_and_option_is_in_pamsignal_8():
    text = words(page("pamsignal.8"))
    commands = re.search(r"(?s)\.SH COMMANDS(.*?)\.SH ", text).group(1)
    missing = []
    for command, options in command_line().items():
        if command and not re.search(r"(?m)^%s\b" % re.escape(command),
                                     commands):
            missing.append(command)
        missing += ["%s %s" % (command, option) for option in options
                    if option not in ("-h",) and option not in text]
    assert missing == []


def test_every_exit_code_is_in_pamsignal_8():
    text = words(page("pamsignal.8"))
    status = re.search(r"(?s)\.SH EXIT STATUS(.*?)\.SH ", text).group(1)
    codes = {pamsignal.EXIT_OK, pamsignal.EXIT_FAILURE, 2,
             pamsignal.ConfigError.exit_code}
    assert {int(c) for c in re.findall(r"(?m)^(\d+)$", status)} == codes


def configuration_keys():
    """(section, key, default) of every key the parser accepts; channel
    keys with None (their defaults live in the prose)."""
    for section, options in (("pamsignal", pamsignal.GLOBAL_OPTIONS),
                             ("detection", pamsignal.DETECTION_OPTIONS),
                             ("alerts", pamsignal.ALERT_OPTIONS),
                             ("geoip", pamsignal.GEOIP_OPTIONS),
                             ("audit", pamsignal.AUDIT_OPTIONS),
                             ("report", pamsignal.REPORT_OPTIONS)):
        for key, option in options.items():
            yield section, key, option.default
    for sink in pamsignal.CHANNEL_TYPES.values():
        for key in sink.OPTIONS:
            yield "channel:NAME", key, None


def test_every_configuration_key_is_in_pamsignal_conf_5():
    text = words(page("pamsignal.conf.5"))
    sections = dict(re.findall(r"(?s)\.SH \[([^\]]+)\](.*?)(?=\.SH |\Z)",
                               text))
    missing = []
    for section, key, default in configuration_keys():
        body = sections.get(section, "")
        if default is None:
            if not re.search(r"(?m)^%s\b" % key, body):
                missing.append((section, key))
            continue
        # "key (default VALUE)", or keys named together with one default
        entry = re.search(r"(?m)^(?:[a-z_]+, )*%s\b[^\n]*\(default ([^)]*)"
                          % key, body)
        if entry is None:
            missing.append((section, key))
        elif default and default not in entry.group(1):
            missing.append((section, key, default, entry.group(1)))
    assert missing == []
    assert set(sections) == {"pamsignal", "detection", "alerts", "geoip",
                             "audit", "report", "channel:NAME"}
