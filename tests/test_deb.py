"""The Debian package for real (debian/, `make deb`).

The .deb is built once per session (conftest's debian_package), checked by
lintian, and installed into overlays of cached debootstrapped trees
(realsys.TreeOverlay: the shared trees are never written):

- Debian 12 (bookworm): the whole life of a package: the previous version
  installed, the admin's edits and the service's state, an upgrade that
  keeps them, `dpkg -r`, `dpkg -P`;
- Debian 11, 12 and 13 (Python 3.9, 3.11, 3.13): installed with
  `apt-get install ./pamsignal_VERSION_all.deb`, the program runs
  `--version`, `check-config` and `scan` of an export made from the lines
  captured on Debian 12 (tests/fixtures/messages.json);
- Debian 13 booted with systemd as PID 1 (systemd-nspawn, as in
  test_service_boot.py): installing enables and starts the service, removing
  stops it, purging removes what the running service wrote.

The trees are built by tests/check.sh (python3 tests/realsys.py
bullseye-tree, bookworm-tree, trixie-tree, boot-tree)."""
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import realsys
from support import (PAMSIGNAL, REPO, captured_export, event_summary,
                     pamsignal)

pytestmark = pytest.mark.e2e

VERSION = pamsignal.__version__
#: An older version than this tree's, for the upgrade ("~" sorts first).
OLD_VERSION = VERSION + "~old"
CONFIG = "/etc/pamsignal/pamsignal.conf"
WANTS = "/etc/systemd/system/multi-user.target.wants/pamsignal.service"
TIMER_WANTS = "/etc/systemd/system/timers.target.wants/" \
    "pamsignal-report.timer"
#: What the service writes (DynamicUser= keeps the real directories under
#: private/, reached by a symlink) and purge must remove.
SERVICE_DIRS = ("/var/lib/pamsignal", "/var/lib/private/pamsignal",
                "/var/log/pamsignal", "/var/log/private/pamsignal")
#: Python of each release the package is installed on.
PYTHONS = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}


def source_copy(destination, version=None, changelog_version=None):
    """A copy of the source tree; `version` patches __version__ and
    `changelog_version` adds a debian/changelog entry on top."""
    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(
        ".git", "dist", "__pycache__", ".pytest_cache", ".ruff_cache"))
    if version:
        path = os.path.join(destination, "pamsignal.py")
        with open(path) as handle:
            text = handle.read()
        text = text.replace('__version__ = "%s"' % VERSION,
                            '__version__ = "%s"' % version, 1)
        with open(path, "w") as handle:
            handle.write(text)
    if changelog_version:
        path = os.path.join(destination, "debian", "changelog")
        with open(path) as handle:
            text = handle.read()
        entry = ("pamsignal (%s) unstable; urgency=medium\n\n"
                 "  * A version for the tests.\n\n"
                 " -- Tests <tests@example.org>  "
                 "Sun, 06 Dec 2026 08:00:00 +0000\n\n" % changelog_version)
        with open(path, "w") as handle:
            handle.write(entry + text)
    return destination


@pytest.fixture(scope="module")
def older_package(tmp_path_factory):
    """The same package at OLD_VERSION, to upgrade from."""
    realsys.require_binaries("make", "dpkg-buildpackage", "dh")
    source = source_copy(str(tmp_path_factory.mktemp("old") / "src"),
                         OLD_VERSION, OLD_VERSION)
    dist = str(tmp_path_factory.mktemp("old-dist"))
    realsys.build_deb(source, dist)
    return os.path.join(dist, "pamsignal_%s_all.deb" % OLD_VERSION)


def dpkg_field(deb, name):
    return subprocess.run(["dpkg-deb", "-f", deb, name],
                          stdout=subprocess.PIPE, universal_newlines=True,
                          check=True).stdout.strip()


# ---------------------------------------------------------------- building


def test_changelog_and_program_agree_on_the_version(debian_package):
    logged = subprocess.run(
        ["dpkg-parsechangelog", "-l", os.path.join(REPO, "debian",
                                                   "changelog"),
         "-S", "Version"], stdout=subprocess.PIPE, universal_newlines=True,
        check=True).stdout.strip()
    assert logged == VERSION
    assert dpkg_field(debian_package, "Version") == VERSION
    assert os.path.basename(debian_package) == \
        "pamsignal_%s_all.deb" % VERSION


def test_make_deb_refuses_a_changelog_behind_the_program(tmp_path):
    source = source_copy(str(tmp_path / "src"), version=VERSION + ".1")
    result = subprocess.run(
        ["make", "-C", source, "deb", "DISTDIR=%s" % (tmp_path / "dist")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    assert result.returncode != 0
    assert "debian/changelog is at %s but pamsignal.py at %s.1" % (
        VERSION, VERSION) in result.stderr
    assert not (tmp_path / "dist").exists()


def lintian(workdir, *arguments):
    # lintian leaves some temporary files behind: in `workdir`, not /tmp.
    return subprocess.run(["lintian"] + list(arguments),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300,
                          env=dict(os.environ, TMPDIR=workdir))


def test_lintian_has_no_errors_or_warnings(debian_package, tmp_path):
    realsys.require_binaries("lintian")
    result = lintian(str(tmp_path), "--fail-on", "error,warning",
                     debian_package)
    tags = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [t for t in tags if t.startswith(("E:", "W:"))], tags
    # The 0600 configuration is deliberate: the overrides say why, and
    # lintian applies them (an override that no longer matches would show
    # up as unused-override).
    tags = lintian(str(tmp_path), "--show-overrides", "--info",
                   debian_package) \
        .stdout.splitlines()
    overridden = [t for t in tags if t.startswith("O:")]
    assert any("non-standard-file-perm" in t and "pamsignal.conf" in t
               for t in overridden), tags
    assert any("non-standard-dir-perm" in t for t in overridden), tags
    assert not [t for t in tags if "unused-override" in t], tags


def test_package_metadata(debian_package):
    assert dpkg_field(debian_package, "Package") == "pamsignal"
    assert dpkg_field(debian_package, "Architecture") == "all"
    assert "python3 (>= 3.6)" in dpkg_field(debian_package, "Depends")


# ---------------------------------------------------------------- Debian 12


def dpkg(tree, *arguments):
    result = tree.run(["dpkg"] + list(arguments), stdin=subprocess.DEVNULL,
                      timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def put_deb(tree, deb):
    inside = "/tmp/" + os.path.basename(deb)
    shutil.copy(deb, tree.path(inside))
    return inside


def status(tree):
    return tree.package_status("pamsignal")


def read(tree, inside):
    with open(tree.path(inside)) as handle:
        return handle.read()


def write(tree, inside, text):
    os.makedirs(os.path.dirname(tree.path(inside)), exist_ok=True)
    with open(tree.path(inside), "w") as handle:
        handle.write(text)


def exists(tree, inside):
    return os.path.lexists(tree.path(inside))


def mode_and_owner(tree, inside):
    """"mode user:group" of a path, as the tree's own stat sees it."""
    result = tree.run(["stat", "-c", "%a %U:%G", inside])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def overlay_of(suite, tmp_path_factory):
    tree = realsys.require_package_tree(suite)
    workdir = str(tmp_path_factory.mktemp("overlay-" + suite))
    return realsys.TreeOverlay(tree, workdir).start()


@pytest.fixture(scope="module")
def bookworm(tmp_path_factory):
    """One Debian 12 overlay through the whole life of the package."""
    tree = overlay_of("bookworm", tmp_path_factory)
    yield tree
    tree.stop()


#: What the admin and the running service leave behind (inside the tree).
ADMIN_CHANNEL = "\n[channel:hook]\ntype = webhook\n" \
                "url = http://127.0.0.1:8080/pamsignal\n"
SERVICE_FILES = {"/var/lib/private/pamsignal/state.json": '{"cursor": "s=1"}',
                 "/var/lib/private/pamsignal/spool/hook/0001.json": "{}",
                 "/var/log/private/pamsignal/alerts.log": "one alert\n"}


def test_install_the_previous_version(bookworm, older_package):
    dpkg(bookworm, "-i", put_deb(bookworm, older_package))
    assert status(bookworm) == "ii |%s" % OLD_VERSION
    assert bookworm.run(["pamsignal", "--version"]).stdout == \
        "pamsignal %s\n" % OLD_VERSION
    # Enabled even here, where systemd does not run: the symlink is made.
    assert os.readlink(bookworm.path(WANTS)) == \
        "/lib/systemd/system/pamsignal.service"


def test_upgrade_keeps_configuration_state_and_spool(bookworm,
                                                     debian_package):
    assert status(bookworm) == "ii |%s" % OLD_VERSION
    shipped = read(bookworm, CONFIG)
    write(bookworm, CONFIG, shipped + ADMIN_CHANNEL)
    for path, text in SERVICE_FILES.items():
        write(bookworm, path, text)
    # As systemd links them for DynamicUser=yes.
    os.symlink("private/pamsignal", bookworm.path("/var/lib/pamsignal"))
    os.symlink("private/pamsignal", bookworm.path("/var/log/pamsignal"))

    dpkg(bookworm, "-i", put_deb(bookworm, debian_package))

    assert status(bookworm) == "ii |%s" % VERSION
    assert bookworm.run(["pamsignal", "--version"]).stdout == \
        "pamsignal %s\n" % VERSION
    assert read(bookworm, CONFIG) == shipped + ADMIN_CHANNEL
    for path, text in SERVICE_FILES.items():
        assert read(bookworm, path) == text
    assert read(bookworm, "/var/lib/pamsignal/state.json") == \
        SERVICE_FILES["/var/lib/private/pamsignal/state.json"]
    checked = bookworm.run(["pamsignal", "check-config"])
    assert checked.returncode == 0, checked.stderr
    # The shipped console channel and the admin's webhook.
    assert checked.stdout == "%s: OK (2 channels)\n" % CONFIG
    # Still dpkg's conffile, with the md5sum of the file it shipped.
    conffiles = bookworm.run(["dpkg-query", "-W", "-f=${Conffiles}",
                              "pamsignal"]).stdout.split()
    with open(os.path.join(REPO, "pamsignal.conf.example"), "rb") as handle:
        shipped_md5 = hashlib.md5(handle.read()).hexdigest()
    assert conffiles == [CONFIG, shipped_md5]


def test_installed_files_owners_and_modes(bookworm, debian_package):
    assert status(bookworm) == "ii |%s" % VERSION
    expected = {"/usr/bin/pamsignal": "755 root:root",
                "/lib/systemd/system/pamsignal.service": "644 root:root",
                "/lib/systemd/system/pamsignal-report.service":
                    "644 root:root",
                "/lib/systemd/system/pamsignal-report.timer":
                    "644 root:root",
                "/etc/pamsignal": "700 root:root",
                CONFIG: "600 root:root",
                "/usr/share/man/man8/pamsignal.8.gz": "644 root:root",
                "/usr/share/doc/pamsignal/README.md.gz": "644 root:root",
                "/usr/share/doc/pamsignal/pamsignal.conf.example.gz":
                    "644 root:root"}
    assert {path: mode_and_owner(bookworm, path) for path in expected} == \
        expected
    with open(PAMSIGNAL) as handle:
        assert read(bookworm, "/usr/bin/pamsignal") == handle.read()
    assert read(bookworm, "/lib/systemd/system/pamsignal.service") == \
        pamsignal.SERVICE_UNIT
    for name, text in pamsignal.REPORT_UNITS.items():
        assert read(bookworm, "/lib/systemd/system/" + name) == text
    # The daily report stays off until the admin enables its timer.
    assert not exists(bookworm, TIMER_WANTS)
    # journald's rate limit lifted for sshd, under both of its unit names
    for unit in ("ssh", "sshd"):
        drop_in = "/usr/lib/systemd/system/%s.service.d/" \
            "pamsignal-ratelimit.conf" % unit
        assert mode_and_owner(bookworm, drop_in) == "644 root:root"
        assert read(bookworm, drop_in) == pamsignal.SSH_RATELIMIT_DROPIN
    # Every man page of the source tree (debian/pamsignal.manpages lists
    # them), the README and the example.
    pages = [name for name in os.listdir(REPO)
             if re.match(r"^pamsignal(\.conf)?\.[1-8]$", name)]
    assert "pamsignal.8" in pages
    shipped = ["/usr/share/man/man%s/%s.gz" % (name[-1], name)
               for name in pages]
    shipped += ["/usr/share/doc/pamsignal/%s.gz" % name
                for name in ("pamsignal.conf.example", "README.md")]
    for path in shipped:
        name = os.path.basename(path)[:-len(".gz")]
        assert exists(bookworm, path), \
            "%s is not in the package (debian/pamsignal.manpages?)" % name
        with gzip.open(bookworm.path(path)) as inside, \
                open(os.path.join(REPO, name), "rb") as source:
            assert inside.read() == source.read(), name


def test_pamsignal_install_and_uninstall_leave_the_package_alone(bookworm):
    """Its own install would override the package's unit, its uninstall
    delete the package's program and conffile: both refuse, inside the
    system and from outside with --root (that root's dpkg database)."""
    assert status(bookworm) == "ii |%s" % VERSION
    before = {path: read(bookworm, path)
              for path in ("/usr/bin/pamsignal", CONFIG)}
    for command in (["install"], ["uninstall"], ["uninstall", "--purge"]):
        for result in (
                bookworm.run(["pamsignal"] + command,
                             stdin=subprocess.DEVNULL, timeout=120),
                subprocess.run([sys.executable, PAMSIGNAL] + command +
                               ["--root", bookworm.path("/")],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=120)):
            assert result.returncode == 1, result.stdout + result.stderr
            assert "/usr/bin/pamsignal belongs to the installed package " \
                "pamsignal (dpkg): use the package manager" in result.stderr
    assert {path: read(bookworm, path) for path in before} == before
    assert not exists(bookworm, "/etc/systemd/system/pamsignal.service")


def test_remove_keeps_configuration_and_state(bookworm):
    assert status(bookworm) == "ii |%s" % VERSION
    dpkg(bookworm, "-r", "pamsignal")
    assert status(bookworm) == "rc |%s" % VERSION
    assert not exists(bookworm, "/usr/bin/pamsignal")
    assert not exists(bookworm, "/lib/systemd/system/pamsignal.service")
    for name in pamsignal.REPORT_UNITS:
        assert not exists(bookworm, "/lib/systemd/system/" + name)
    assert read(bookworm, CONFIG).endswith(ADMIN_CHANNEL)
    for path, text in SERVICE_FILES.items():
        assert read(bookworm, path) == text
    # Removed, not purged: dpkg still names the conffile, but nothing is
    # installed, so the scp path's install may go on (it refused).
    pamsignal.refuse_packaged(bookworm.path("/"), "/usr", "install")


def test_purge_removes_configuration_state_and_logs(bookworm):
    assert status(bookworm) == "rc |%s" % VERSION
    # Another DynamicUser service's state, next to ours: it must stay.
    write(bookworm, "/var/lib/private/other/keep", "other service\n")
    dpkg(bookworm, "-P", "pamsignal")
    # dpkg forgets it, or remembers it as not installed.
    assert status(bookworm) in (None, "un |", "pn |")
    for path in ("/etc/pamsignal", WANTS) + SERVICE_DIRS:
        assert not exists(bookworm, path), path
    assert read(bookworm, "/var/lib/private/other/keep") == "other service\n"


# ---------------------------------------------------------------- releases


@pytest.mark.parametrize("suite", sorted(PYTHONS))
def test_installs_and_runs_on(suite, debian_package, tmp_path_factory):
    started = time.monotonic()
    tree = overlay_of(suite, tmp_path_factory)
    try:
        python = tree.run(["python3", "--version"]).stdout
        assert python.startswith("Python %s." % PYTHONS[suite]), python
        # As the README has it: apt-get install ./pamsignal_*.deb
        installed = tree.apt_get("install", put_deb(tree, debian_package))
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert status(tree) == "ii |%s" % VERSION
        assert tree.run(["pamsignal", "--version"]).stdout == \
            "pamsignal %s\n" % VERSION
        checked = tree.run(["pamsignal", "check-config"])
        assert (checked.returncode, checked.stdout) == (
            0, "%s: OK (1 channel)\n" % CONFIG), checked.stderr
        export, actions = captured_export()
        write(tree, "/tmp/export.json", export)
        text = tree.run(["pamsignal", "scan", "/tmp/export.json"])
        assert text.returncode == 0, text.stderr
        for action in actions:
            assert re.search(r"\b%s\b" % action, text.stdout), (action,
                                                               text.stdout)
        scanned = tree.run(["pamsignal", "scan", "--json",
                            "/tmp/export.json"])
        assert scanned.returncode == 0, scanned.stderr
        # The very events the host's Python finds in the same export.
        host = subprocess.run(
            [sys.executable, PAMSIGNAL, "scan", "--json", "-"], input=export,
            stdout=subprocess.PIPE, universal_newlines=True, check=True)
        assert event_summary(scanned.stdout) == event_summary(host.stdout)
        assert {a for a, _, _ in event_summary(scanned.stdout)} >= actions
    finally:
        tree.stop()
    print("%s (Python %s): %.1f s" % (suite, PYTHONS[suite],
                                      time.monotonic() - started))


# ---------------------------------------------------------------- systemd


@pytest.fixture(scope="module")
def booted(debian_package, older_package, tmp_path_factory):
    """The bootable Debian 13 tree booted on a volatile overlay, the
    package's directory bound in at /mnt/dist, the older one's at
    /mnt/old."""
    with realsys.booted_container(
            str(tmp_path_factory.mktemp("nspawn") / "nspawn.log"),
            [(os.path.dirname(debian_package), "/mnt/dist"),
             (os.path.dirname(older_package), "/mnt/old")],
            "booted package tests") as box:
        yield box


def test_install_enables_and_starts_the_service(booted, older_package):
    booted.run(["dpkg", "-i", "/mnt/old/" + os.path.basename(older_package)])
    assert booted.run(["systemctl", "is-enabled", "pamsignal"]) \
        .stdout.strip() == "enabled"
    # Type=notify: active (not activating) means READY=1 arrived.
    assert booted.run(["systemctl", "is-active", "pamsignal"]) \
        .stdout.strip() == "active"
    assert booted.show("StatusText").startswith("Following the journal")
    # The package's unit (/lib is /usr/lib on Debian 13), not one in /etc.
    assert booted.show("FragmentPath") in (
        "/lib/systemd/system/pamsignal.service",
        "/usr/lib/systemd/system/pamsignal.service")
    # The service's own state, as its dynamic user wrote it.
    assert realsys.wait_for(lambda: booted.run(
        ["test", "-e", "/var/lib/private/pamsignal/state.json"],
        check=False).returncode == 0, timeout=30), booted.unit_log()


def test_upgrade_restarts_the_service_and_keeps_its_spool(booted,
                                                          debian_package):
    before = booted.show("MainPID")
    waiting = "/var/lib/pamsignal/spool/hook/0001.json"
    booted.run(["mkdir", "-p", os.path.dirname(waiting)])
    booted.write(waiting, '{"waiting": true}')
    booted.run(["dpkg", "-i", "/mnt/dist/" +
                os.path.basename(debian_package)])
    assert booted.run(["systemctl", "is-active", "pamsignal"]) \
        .stdout.strip() == "active"
    assert booted.show("MainPID") not in (before, "0")
    assert booted.run(["pamsignal", "--version"]).stdout == \
        "pamsignal %s\n" % VERSION
    assert booted.run(["cat", "/var/lib/private/pamsignal/spool/hook/"
                       "0001.json"]).stdout == '{"waiting": true}'
    # The daily report came with it, off; the admin turns it on.
    timer = ["pamsignal-report.timer"]
    assert booted.run(["systemctl", "is-enabled"] + timer,
                      check=False).stdout.strip() == "disabled"
    assert booted.show("ActiveState", timer[0]) == "inactive"
    booted.run(["systemctl", "enable", "--now"] + timer)
    assert booted.show("ActiveState", timer[0]) == "active"


def test_remove_stops_the_service(booted):
    assert booted.show("ActiveState") == "active"
    booted.run(["dpkg", "-r", "pamsignal"])
    for unit in ("pamsignal", "pamsignal-report.timer"):
        assert booted.run(["systemctl", "is-active", unit],
                          check=False).stdout.strip() == "inactive"
    assert booted.run(["test", "-e", "/var/lib/private/pamsignal/"
                       "state.json"], check=False).returncode == 0


def test_purge_removes_what_the_service_wrote(booted):
    booted.run(["dpkg", "-P", "pamsignal"])
    for path in ("/etc/pamsignal", WANTS, TIMER_WANTS) + SERVICE_DIRS:
        left = booted.run(["sh", "-c", 'test -e "$1" || test -L "$1"',
                           "sh", path], check=False)
        assert left.returncode != 0, path
    assert booted.run(["systemctl", "is-enabled", "pamsignal"],
                      check=False).returncode != 0
