"""The RPM package (pamsignal.spec, `make rpm`): what it holds, that rpmlint
finds nothing, and its life on a real system: install, upgrade with an
edited configuration, removal.

Packages are built once per module by `make rpm` from copies of the
sources (tests/rpmsupport.py), and installed with the real rpm into an
overlay of the cached Debian 13 tree, where the scriptlets run with a real
shell and systemctl (offline, as in any chroot), and the installed program
runs on that tree's python3.  rpm is told --nodeps because the tree's
python3 and systemd were installed by dpkg, so its rpm database (empty at
first) does not list them.
"""
import gzip
import os
import re

import pytest

import realsys
import rpmsupport
from rpmsupport import check, mode, read, rpm_in, run
from support import PAMSIGNAL, REPO, pamsignal, wait_for
from realsys import Container

pytestmark = pytest.mark.e2e

#: A version above the program's, for upgrades.
NEXT_VERSION = pamsignal.__version__ + ".1"
CONFIG = "/etc/pamsignal/pamsignal.conf"
PROGRAM = "/usr/bin/pamsignal"
UNIT = "/usr/lib/systemd/system/pamsignal.service"
#: The daily report's units, shipped off (no preset enables them).
REPORT_UNITS = {"/usr/lib/systemd/system/" + name: text
                for name, text in pamsignal.REPORT_UNITS.items()}
TIMER_ENABLED = "/etc/systemd/system/timers.target.wants/" \
    "pamsignal-report.timer"
MAN5 = "/usr/share/man/man5/pamsignal.conf.5.gz"
RATELIMIT_DIR = "/usr/lib/systemd/system/sshd.service.d"
RATELIMIT = RATELIMIT_DIR + "/pamsignal-ratelimit.conf"
#: Where `systemctl preset` (the %post scriptlet) enables the unit.
ENABLED = "/etc/systemd/system/multi-user.target.wants/pamsignal.service"
#: What an admin makes of the configuration.
EDITED = "[pamsignal]\nfirst_start = boot\n"


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """The package as shipped, a higher version, and a higher version whose
    default configuration changed."""
    rpmsupport.require_rpm_tools()
    workdir = str(tmp_path_factory.mktemp("rpm-build"))
    built = {
        "current": rpmsupport.build_rpm(workdir, "current"),
        "upgrade": rpmsupport.build_rpm(workdir, "upgrade", NEXT_VERSION),
        "new_default": rpmsupport.build_rpm(
            workdir, "new-default", NEXT_VERSION,
            read(os.path.join(REPO, "pamsignal.conf.example"))
            + "\n# a new default\n"),
    }
    return built


@pytest.fixture
def tree():
    with rpmsupport.debian_overlay() as root:
        yield root


def in_tree(tree, path):
    return os.path.join(tree, path.lstrip("/"))


def install(tree, package, action="-i"):
    result = rpm_in(tree, action, "--nodeps", package)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def edit_config(tree):
    with open(in_tree(tree, CONFIG), "w") as handle:
        handle.write(EDITED)


def installed_version(tree):
    return rpm_in(tree, "-q", "--qf", "%{VERSION}", "pamsignal").stdout


# ---------------------------------------------------------------- the package


def test_the_spec_has_the_program_version(packages):
    spec = check(["rpmspec", "-q", "--srpm", "--qf", "%{VERSION}",
                  rpmsupport.SPEC]).stdout
    assert spec == pamsignal.__version__
    assert rpmsupport.query(packages["current"], "%{VERSION}") == spec
    assert rpmsupport.query(packages["upgrade"],
                            "%{VERSION}") == NEXT_VERSION


def rpmlint(*args):
    rpmsupport.require_rpm_tools("rpmlint")
    result = run(["rpmlint"] + list(args))
    summary = re.search(r"(\d+) errors, (\d+) warnings", result.stdout)
    assert summary, result.stdout + result.stderr
    return result.stdout, int(summary.group(1)), int(summary.group(2))


def test_rpmlint_finds_nothing_left(packages):
    # A filter that no longer hides anything is an error of rpmlint's own
    # (unused-rpmlintrc-filter): stale excuses fail this test too.
    output, errors, warnings = rpmlint(
        "-r", rpmsupport.RPMLINTRC, packages["current"], rpmsupport.SPEC)
    assert (errors, warnings) == (0, 0), output


def test_the_distribution_systemd_macros_win(tmp_path):
    """On Fedora and EL, systemd-rpm-macros defines these before the spec
    is read: the spec's fallbacks must then stay out of the way."""
    rpmsupport.require_rpm_tools()
    package = rpmsupport.build_rpm(str(tmp_path), "fedora-like", defines=(
        ("_unitdir", "/opt/units"),
        ("systemd_post()", "distro-post %{?*}"),
        ("systemd_preun()", "distro-preun %{?*}"),
        ("systemd_postun_with_restart()", "distro-postun %{?*}")))
    scripts = rpmsupport.query(package, "%{POSTIN}|%{PREUN}|%{POSTUN}")
    post, preun, postun = scripts.split("|")
    assert post.splitlines()[0] == "distro-post pamsignal.service"
    assert "systemctl restart sshd" in post  # the drop-in's hint
    assert (preun, postun) == (
        "distro-preun pamsignal.service pamsignal-report.timer "
        "pamsignal-report.service", "distro-postun pamsignal.service")
    files = rpmsupport.query(package, "[%{FILENAMES}\n]").split()
    assert "/opt/units/pamsignal.service" in files


def test_depends_on_python3_and_systemd_only(packages):
    requires = rpmsupport.query(
        packages["current"],
        "[%{REQUIRENAME} %{REQUIREFLAGS:depflags} %{REQUIREVERSION}\n]")
    wanted = set(line.strip() for line in requires.splitlines()
                 if not line.startswith(("rpmlib(", "/bin/sh", "config(")))
    assert wanted == {"python3 >= 3.6", "systemd", "/usr/bin/python3"}
    assert rpmsupport.query(packages["current"], "%{ARCH}") == "noarch"


def test_files_modes_owners_and_config_flags(packages):
    listing = rpmsupport.query(
        packages["current"],
        "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}:"
        "%{FILEGROUPNAME}\t%{FILEFLAGS:fflags}\n]")
    files = {}
    for line in listing.splitlines():
        name, perms, owner, flags = line.split("\t")
        assert owner == "root:root", line
        files[name] = (perms, flags)
    docs = {os.path.basename(name): entry for name, entry in files.items()
            if name.startswith("/usr/share/doc/")}
    assert docs.pop("README.md") == ("-rw-r--r--", "d")
    assert docs.pop("pamsignal.conf.example") == ("-rw-r--r--", "d")
    assert [perms for perms, _ in docs.values()] == ["drwxr-xr-x"]
    rest = {name: entry for name, entry in files.items()
            if not name.startswith("/usr/share/doc/")}
    expected = {
        "/etc/pamsignal": ("drwx------", ""),
        # c = %config, n = noreplace
        CONFIG: ("-rw-------", "cn"),
        PROGRAM: ("-rwxr-xr-x", ""),
        UNIT: ("-rw-r--r--", ""),
        "/usr/share/man/man8/pamsignal.8.gz": ("-rw-r--r--", "d"),
        MAN5: ("-rw-r--r--", "d"),
        RATELIMIT_DIR: ("drwxr-xr-x", ""),
        RATELIMIT: ("-rw-r--r--", ""),
    }
    expected.update((unit, ("-rw-r--r--", "")) for unit in REPORT_UNITS)
    assert rest == expected


# ---------------------------------------------------------------- on a system


def test_install_lays_out_a_working_service(packages, tree):
    install(tree, packages["current"])

    program = read(in_tree(tree, PROGRAM))
    shipped = read(PAMSIGNAL)
    # The distribution's python3, not the first on PATH; nothing else
    # differs from pamsignal.py.
    assert program.split("\n", 1) == [
        "#!/usr/bin/python3", shipped.split("\n", 1)[1]]
    assert read(in_tree(tree, UNIT)) == pamsignal.SERVICE_UNIT
    for unit, text in REPORT_UNITS.items():
        assert read(in_tree(tree, unit)) == text
    assert not os.path.lexists(in_tree(tree, TIMER_ENABLED))  # off
    assert read(in_tree(tree, CONFIG)) == read(
        os.path.join(REPO, "pamsignal.conf.example"))
    with gzip.open(in_tree(tree, "/usr/share/man/man8/pamsignal.8.gz"),
                   "rt") as page:
        assert page.read() == read(os.path.join(REPO, "pamsignal.8"))
    assert mode(in_tree(tree, PROGRAM)) == 0o755
    assert mode(in_tree(tree, "/etc/pamsignal")) == 0o700
    assert mode(in_tree(tree, CONFIG)) == 0o600
    # %post: systemctl preset enabled the unit.
    assert os.readlink(in_tree(tree, ENABLED)) == UNIT

    # The installed program runs on the tree's own python3 and accepts the
    # configuration the package installed.
    version = check(["chroot", tree, PROGRAM, "--version"]).stdout
    assert version.strip() == "pamsignal " + pamsignal.__version__
    check(["chroot", tree, PROGRAM, "--config", CONFIG, "check-config"])
    verify = rpm_in(tree, "-V", "--nodeps", "pamsignal")
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_upgrade_keeps_an_edited_configuration(packages, tree):
    install(tree, packages["current"])
    edit_config(tree)

    install(tree, packages["upgrade"], action="-U")

    assert installed_version(tree) == NEXT_VERSION
    assert read(in_tree(tree, CONFIG)) == EDITED
    assert mode(in_tree(tree, CONFIG)) == 0o600
    # Same default in both versions: nothing set beside it.
    assert sorted(os.listdir(in_tree(tree, "/etc/pamsignal"))) == [
        "pamsignal.conf"]
    # The old version's %preun ran as an upgrade: the unit stays enabled.
    assert os.readlink(in_tree(tree, ENABLED)) == UNIT


def test_upgrade_with_a_new_default_sets_it_beside_the_edit(packages, tree):
    install(tree, packages["current"])
    edit_config(tree)

    install(tree, packages["new_default"], action="-U")

    assert read(in_tree(tree, CONFIG)) == EDITED
    rpmnew = in_tree(tree, CONFIG + ".rpmnew")
    assert read(rpmnew).endswith("\n# a new default\n")
    # The new default is as private as the configuration itself.
    assert mode(rpmnew) == 0o600


def test_erase_removes_the_program_and_saves_an_edited_config(packages,
                                                             tree):
    install(tree, packages["current"])
    edit_config(tree)

    erase = rpm_in(tree, "-e", "pamsignal")

    assert erase.returncode == 0, erase.stdout + erase.stderr
    for path in [PROGRAM, UNIT, CONFIG, ENABLED] + list(REPORT_UNITS):
        assert not os.path.lexists(in_tree(tree, path)), path
    saved = in_tree(tree, CONFIG + ".rpmsave")
    assert read(saved) == EDITED
    assert mode(saved) == 0o600
    assert mode(in_tree(tree, "/etc/pamsignal")) == 0o700
    assert rpm_in(tree, "-q", "pamsignal").returncode != 0


def test_erase_of_an_untouched_install_leaves_nothing(packages, tree):
    install(tree, packages["current"])

    erase = rpm_in(tree, "-e", "pamsignal")

    assert erase.returncode == 0, erase.stdout + erase.stderr
    assert not os.path.lexists(in_tree(tree, "/etc/pamsignal"))
    assert not os.path.lexists(in_tree(tree, PROGRAM))


def test_the_installed_package_starts_at_boot(packages, tmp_path):
    """rpm installs it into the bootable Debian 13 tree; booted with
    systemd-nspawn, systemd starts the unit %post enabled, from its
    packaged path, with the packaged configuration."""
    realsys.require_binaries("systemd-nspawn", "nsenter")
    with rpmsupport.debian_overlay(bootable=True) as root:
        install(root, packages["current"])
        box = Container(root, str(tmp_path / "nspawn.log"))
        try:
            box.start()
            # Type=notify: active (not activating) means READY=1 arrived.
            assert wait_for(lambda: box.show("ActiveState") in (
                "active", "failed"), timeout=60)
            assert box.show("ActiveState") == "active", box.unit_log()
            assert box.show("StatusText").startswith("Following the journal")
            assert box.show("UnitFileState") == "enabled"
            assert box.show("FragmentPath") == UNIT
            assert "/usr/bin/pamsignal --config /run/pamsignal/" \
                "pamsignal.conf run" in box.show("ExecStart")
        finally:
            box.stop()
