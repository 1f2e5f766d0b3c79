"""One source for every configuration key: the option tables in
pamsignal.py (each key's check, default and help). The example
configuration and the key sections of pamsignal.conf(5) are made from them
by tests/docgen.py (`make docs`); these tests fail on any difference, and
on a key a reader would find unexplained."""
import glob
import os
import re

import pytest

import docgen
from support import pamsignal


@pytest.mark.parametrize("name", sorted(docgen.made()))
def test_the_committed_file_is_what_the_option_tables_make(name):
    assert docgen.read(name) == docgen.made()[name], (
        "%s differs from the option tables: run make docs" % name)


def every_option():
    for section, options, _ in pamsignal.CONFIG_SECTIONS:
        for key, option in options.items():
            yield section, key, option


def test_every_key_has_help_and_a_default_its_check_accepts():
    for section, key, option in every_option():
        assert isinstance(option, pamsignal.Option), (section, key)
        assert len(option.help.split()) >= 4, (section, key)
        option.check(option.default)  # raises ValueError when not


def test_every_section_of_fixed_keys_is_documented():
    """parse_config knows these sections besides [channel:NAME]."""
    documented = [name for name, _, _ in pamsignal.CONFIG_SECTIONS]
    config = pamsignal.parse_config("".join(
        "[%s]\n" % name for name in documented))
    assert config.channels == ()
    with pytest.raises(pamsignal.ConfigError) as unknown:
        pamsignal.parse_config("[nonesuch]\n")
    expected = str(unknown.value.problems[0])
    assert all("[%s]" % name in expected for name in documented)


def test_each_key_appears_with_its_help_in_every_document():
    texts = {name: docgen.read(name) for name in docgen.made()}
    for section, key, option in every_option():
        first_words = " ".join(option.help.split()[:3])
        setting = ("%s = %s" % (key, option.default)).rstrip()
        assert "\n%s\n" % setting in texts[docgen.EXAMPLE], key
        in_its_section = re.search(
            r"(?s)\n\.SH \[%s\]\n(.*?)(?:\n\.SH |\Z)" % re.escape(section),
            texts[docgen.MAN_PAGE]).group(1)
        assert "\n.BR %s " % key in in_its_section, (section, key)
        for name, text in texts.items():
            assert first_words in " ".join(text.split()), (name, key)


#: Where a repository path may be cited: the code, the tests, the
#: benchmarks, the build and CI files and the documents.
CITING = ("pamsignal.py", "README.md", "Makefile", "pamsignal.8",
          "pamsignal.conf.5", "tests/*.py", "tests/fuzz/*.py", "tests/*.sh",
          "bench/*.py", "docs/*.md", ".ci/*")

#: A path into the repository's folders, not inside a longer path.
_CITED_PATH = re.compile(r"(?<![\w./$-])((?:tests|bench|docs|contrib|"
                         r"debian|\.ci)/[\w.-]+(?:/[\w.-]+)*)(?![\w$%{*])")

#: A document cited by its name alone (such as CONTRIBUTING.md).
_CITED_DOCUMENT = re.compile(r"(?<![\w./-])([A-Z][A-Z_]+\.md)\b")

#: Cited paths that are not this repository's: the maxminddb source
#: package's own test data folder.
NOT_OURS = {"tests/data"}


def cited_paths():
    """(citing file, path) of every repository path the files cite;
    placeholders such as tests/fuzz/regressions/TARGET left out."""
    for pattern in CITING:
        for name in sorted(glob.glob(os.path.join(docgen.REPO, pattern))):
            with open(name, errors="replace") as handle:
                text = handle.read()
            where = os.path.relpath(name, docgen.REPO)
            for match in _CITED_PATH.finditer(text):
                path = match.group(1).rstrip(".")
                if path not in NOT_OURS and not any(
                        part.isupper() for part in path.split("/")):
                    yield where, path
            for match in _CITED_DOCUMENT.finditer(text):
                found = [place for place in ("", "docs/")
                         if os.path.exists(os.path.join(
                             docgen.REPO, place + match.group(1)))]
                yield where, (found or [""])[0] + match.group(1)


def test_every_file_the_repository_cites_is_in_it():
    cited = list(cited_paths())
    assert ("tests/realsys.py", "docs/CONTRIBUTING.md") in cited
    missing = [(where, path) for where, path in cited
               if not os.path.exists(os.path.join(docgen.REPO, path))]
    assert missing == []
