"""`pamsignal report --html FILE`: one self-contained page, loaded in a
real headless Chromium (Debian's `chromium`): the DOM holds the same
sessions, failures, detections and sudo use as the JSON report; attacker
names come out as text; the page fetches nothing and its
Content-Security-Policy blocks nothing."""
import html.parser
import json
import os
import subprocess
import sys

import pytest

import realsys
import receivers
from support import PAMSIGNAL, json_line, make_entry, write_config
from test_report import story


class Page(html.parser.HTMLParser):
    """The tags of a DOM, and each table as rows of cell texts."""

    def __init__(self, text):
        html.parser.HTMLParser.__init__(self, convert_charrefs=True)
        self.tags = []
        self.tables = []
        self.cell = None
        self.text = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self.tables.append((dict(attrs).get("class"), []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self.cell is not None:
            self.cell.append(data)

    def table(self, kind):
        """The table of that class, as a dict per row."""
        (found,) = [rows for name, rows in self.tables if name == kind]
        return [dict(zip(found[0], row)) for row in found[1:]]


def hostile_names(port):
    """Account names that would run, load or break out if not escaped."""
    return ["<script>fetch('http://127.0.0.1:%d/s')</script>" % port,
            "\"><img src=http://127.0.0.1:%d/i>" % port,
            "x' onmouseover='y"]


def chromium(*arguments, work):
    realsys.require_binaries("chromium")
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--no-first-run", "--user-data-dir=" + os.path.join(work, "profile"),
         "--enable-logging=stderr", "--v=0"] + list(arguments),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)


def blocked(stderr):
    """What the page's policy refused, as Chromium logs it."""
    return [line for line in stderr.splitlines()
            if "Content Security Policy" in line]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """The story and hostile failures, reported as a page and as JSON;
    the page loaded in Chromium while a local server waits for any
    request."""
    work = str(tmp_path_factory.mktemp("report-html"))
    with receivers.HttpReceiver() as listener:
        lines = story() + [make_entry(
            "sshd", "Failed password for invalid user %s from 192.0.2.66 "
            "port 2 ssh2" % name, sequence=900 + number,
            _PID=str(3000 + number)) for number, name in enumerate(
                hostile_names(listener.port))]
        export = os.path.join(work, "export.json")
        with open(export, "w") as handle:
            handle.write("".join(json_line(line) for line in lines))
        config = write_config(os.path.join(work, "pamsignal.conf"), "")
        page = os.path.join(work, "report.html")
        environment = dict(os.environ, TZ="UTC")
        done = subprocess.run(
            [sys.executable, PAMSIGNAL, "--config", config, "report",
             "--html", page, export], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True,
            env=environment, timeout=120)
        assert done.returncode == 0 and done.stdout == "", done.stderr
        document = json.loads(subprocess.run(
            [sys.executable, PAMSIGNAL, "--config", config, "report",
             "--json", export], stdout=subprocess.PIPE, env=environment,
            universal_newlines=True, timeout=120, check=True).stdout)
        shown = chromium("--dump-dom", "file://" + page, work=work)
        requests = listener.requests
    assert shown.returncode == 0, shown.stderr[-2000:]
    with open(page) as handle:
        source = handle.read()
    return {"dom": Page(shown.stdout), "stderr": shown.stderr,
            "document": document, "requests": requests, "source": source,
            "port": listener.port, "work": work, "page": page}


def test_the_page_holds_every_session_as_the_json_report(loaded):
    rows = loaded["dom"].table("sessions")
    sessions = loaded["document"]["sessions"]
    assert [row["USER"] for row in rows] == [
        session["user"] + (">" + session["target_user"]
                           if "target_user" in session else "")
        for session in sessions]
    assert [row["FROM"] for row in rows] == [
        session.get("source") or session.get("tty", "")
        for session in sessions]
    assert [row["END"] for row in rows][1:3] == ["2026-11-27 12:46",
                                                 "reboot/crash"]


def test_the_page_holds_failures_detections_and_sudo(loaded):
    dom, document = loaded["dom"], loaded["document"]
    by_source = dom.table("by_source")
    assert [(row["SOURCE"], row["COUNT"]) for row in by_source] == [
        (row["source"], str(row["count"]))
        for row in document["failures"]["by_source"]]
    assert by_source[0]["DETECTED"] == "brute force, then logged in"
    accounts = [row["USER"] for row in dom.table("by_account")]
    assert accounts == [row["user"] for row in
                        document["failures"]["by_account"]]
    text = "".join(dom.text)
    for ecs in document["detections"]:
        assert ecs["event"]["action"] in text
    assert dom.table("commands") == [
        {"COUNT": "1", "COMMAND": "/usr/bin/systemctl restart nginx"}]
    # The chart: a bar per hour with failures (7, then 3), inline SVG.
    bars = [int(attrs["width"]) for tag, attrs in dom.tags if tag == "rect"]
    assert [row["count"] for row in document["failures"]["per_hour"]] == [
        7, 3]
    assert bars == [400, 400 * 3 // 7]


def test_attacker_names_come_out_as_text(loaded):
    dom = loaded["dom"]
    accounts = [row["USER"] for row in dom.table("by_account")]
    for name in hostile_names(loaded["port"]):
        assert name in accounts
    tags = {tag for tag, _ in dom.tags}
    assert "script" not in tags and "img" not in tags
    assert not any(name.startswith("on") for _, attrs in dom.tags
                   for name in attrs)


def test_the_page_fetches_nothing_and_its_policy_blocks_nothing(loaded):
    assert loaded["requests"] == []
    assert blocked(loaded["stderr"]) == []
    (policy,) = [attrs["content"] for tag, attrs in loaded["dom"].tags
                 if tag == "meta" and attrs.get("http-equiv") ==
                 "Content-Security-Policy"]
    assert policy == "default-src 'none'; style-src 'unsafe-inline'; " \
        "img-src data:"
    # No element names anything to load; the styles fetch nothing.
    assert [attrs for _, attrs in loaded["dom"].tags if {
        "src", "href", "srcset", "action", "data", "poster"} & set(attrs)
    ] == []
    assert "url(" not in loaded["source"] and "@import" not in \
        loaded["source"]


def test_a_page_that_did_fetch_would_be_seen(loaded):
    """The two checks above can fail: the same policy with an outside
    image is blocked, and Chromium says so."""
    work = loaded["work"]
    bad = os.path.join(work, "bad.html")
    with open(loaded["page"]) as handle:
        page = handle.read()
    with open(bad, "w") as handle:
        handle.write(page.replace(
            "<body>", '<body><img src="http://127.0.0.1:%d/x">'
            % loaded["port"]))
    shown = chromium("--dump-dom", "file://" + bad, work=work)
    assert blocked(shown.stderr), shown.stderr[-2000:]


def test_the_page_renders_to_a_picture(loaded):
    picture = os.path.join(loaded["work"], "report.png")
    shown = chromium("--screenshot=" + picture, "--window-size=1200,1600",
                     "file://" + loaded["page"], work=loaded["work"])
    assert shown.returncode == 0, shown.stderr[-2000:]
    with open(picture, "rb") as handle:
        png = handle.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), \
        int.from_bytes(png[20:24], "big")
    assert (width, height) == (1200, 1600)
