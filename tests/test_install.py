"""`make install` with DESTDIR/PREFIX lays out a working command;
`pamsignal.py install` sets up the hardened unit (the scp path)."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from support import PAMSIGNAL, REPO, pamsignal

needs_make = pytest.mark.skipif(shutil.which("make") is None,
                                reason="make is not installed")
UNIT = os.path.join(REPO, "pamsignal.service")


def make(*args):
    return subprocess.run(["make", "-C", REPO] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


@needs_make
def test_install_into_destdir_gives_a_runnable_command(tmp_path):
    result = make("install", "DESTDIR=%s" % tmp_path, "PREFIX=/usr/local")
    assert result.returncode == 0, result.stderr
    command = tmp_path / "usr/local/bin/pamsignal"
    assert os.stat(str(command)).st_mode & 0o777 == 0o755
    config = tmp_path / "etc/pamsignal/pamsignal.conf"
    assert os.stat(str(config)).st_mode & 0o777 == 0o600
    assert (tmp_path / "usr/local/share/man/man8/pamsignal.8").exists()
    assert (tmp_path / "usr/local/share/man/man5/pamsignal.conf.5").exists()
    assert config.read_text() == pamsignal.example_config()
    assert mode(config.parent) == 0o700
    unit = (tmp_path / "lib/systemd/system/pamsignal.service").read_text()
    assert unit == pamsignal.SERVICE_UNIT.replace(
        "/usr/bin/pamsignal", "/usr/local/bin/pamsignal")
    for name, text in pamsignal.REPORT_UNITS.items():
        report_unit = tmp_path / "lib/systemd/system" / name
        assert report_unit.read_text() == text.replace(
            "/usr/bin/pamsignal", "/usr/local/bin/pamsignal")
        assert mode(report_unit) == 0o644
    version = subprocess.run([str(command), "--version"],
                             stdout=subprocess.PIPE, universal_newlines=True)
    assert version.stdout.startswith("pamsignal ")
    check = subprocess.run([str(command), "--config", str(config),
                            "check-config"], stdout=subprocess.PIPE)
    assert check.returncode == 0
    result = make("uninstall", "DESTDIR=%s" % tmp_path, "PREFIX=/usr/local")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(str(tmp_path / "lib/systemd/system"))) == []
    assert config.exists()


@needs_make
def test_install_keeps_an_existing_configuration(tmp_path):
    config = tmp_path / "etc/pamsignal/pamsignal.conf"
    config.parent.mkdir(parents=True)
    config.write_text("[pamsignal]\nfirst_start = boot\n")
    assert make("install", "DESTDIR=%s" % tmp_path).returncode == 0
    assert config.read_text() == "[pamsignal]\nfirst_start = boot\n"


def cli(*args):
    return subprocess.run([sys.executable, PAMSIGNAL] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def mode(path):
    return os.stat(str(path)).st_mode & 0o7777


def test_the_embedded_unit_is_the_shipped_unit():
    with open(UNIT) as handle:
        assert pamsignal.SERVICE_UNIT == handle.read()


def exposure(unit):
    """systemd-analyze security's overall exposure of a unit file."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager",
         unit], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        universal_newlines=True, timeout=120)
    found = re.search(r"Overall exposure level for %s: (\d+\.\d)"
                      % re.escape(os.path.basename(unit)), result.stdout)
    assert found, result.stdout
    return float(found.group(1))


def test_unit_exposure_is_at_most_1_1():
    assert exposure(UNIT) <= 1.1


def test_the_embedded_report_units_are_the_shipped_ones():
    for name, text in pamsignal.REPORT_UNITS.items():
        with open(os.path.join(REPO, name)) as handle:
            assert handle.read() == text


def test_the_report_service_is_sandboxed_no_worse_than_the_agent():
    assert exposure(os.path.join(REPO, "pamsignal-report.service")) <= \
        exposure(UNIT)


def test_install_writes_program_unit_and_example_config(tmp_path):
    result = cli("install", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    program = tmp_path / "usr/bin/pamsignal"
    unit = tmp_path / "etc/systemd/system/pamsignal.service"
    config = tmp_path / "etc/pamsignal/pamsignal.conf"
    with open(PAMSIGNAL, "rb") as handle:
        assert program.read_bytes() == handle.read()
    assert mode(program) == 0o755
    assert unit.read_text() == pamsignal.SERVICE_UNIT and mode(unit) == 0o644
    for name, text in pamsignal.REPORT_UNITS.items():
        report_unit = tmp_path / "etc/systemd/system" / name
        assert report_unit.read_text() == text and mode(report_unit) == 0o644
    assert "systemctl enable --now pamsignal-report.timer" in result.stdout
    assert mode(config) == 0o600
    assert mode(config.parent) == 0o700
    # Not PID 1 below --root: it says what to run instead of running it.
    assert "systemctl enable --now pamsignal.service" in result.stdout
    version = subprocess.run([str(program), "--version"],
                             stdout=subprocess.PIPE, universal_newlines=True)
    assert version.stdout.strip() == "pamsignal %s" % pamsignal.__version__
    check = cli("--config", str(config), "check-config")
    assert check.returncode == 0, check.stderr
    assert config.read_text() == pamsignal.example_config()


def test_install_makes_no_directory_others_can_write_under_umask_000(
        tmp_path):
    """A 0777 sshd.service.d would let anyone add an ExecStartPre= that
    systemd runs as root."""
    result = subprocess.run(
        ["sh", "-c", 'umask 000 && exec "$0" "$1" install --root "$2"',
         sys.executable, PAMSIGNAL, str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60)
    assert result.returncode == 0, result.stderr
    made = [os.path.join(top, name) for top, names, _ in
            os.walk(str(tmp_path)) for name in names]
    assert any(path.endswith("/sshd.service.d") for path in made)
    for path in made:
        expected = 0o700 if path.endswith("/etc/pamsignal") else 0o755
        assert mode(path) == expected, path
    for top, _, names in os.walk(str(tmp_path)):
        for name in names:
            assert not mode(os.path.join(top, name)) & 0o022, name


def test_one_example_configuration_everywhere():
    """install writes the very file make install and the packages ship."""
    with open(os.path.join(REPO, "pamsignal.conf.example")) as handle:
        assert pamsignal.example_config() == handle.read()


def test_example_certificates_are_where_the_service_can_read_them():
    """/etc/pamsignal is root's, mode 0700, and the service runs as its
    DynamicUser: a certificate there makes it fail at start."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    for text in (pamsignal.example_config(), readme):
        named = re.findall(r"^#?(?:cert|ca)_file = (\S+)", text, re.M)
        assert named and not [path for path in named
                              if path.startswith("/etc/pamsignal/")]


def test_example_config_sets_every_key_to_its_default():
    text = pamsignal.example_config()
    example = pamsignal.parse_config(text)
    defaults = pamsignal.default_config("<config>")
    assert example._replace(channels=()) == defaults
    # Every key is written out (a reader sees them all), not just defaulted.
    ini = pamsignal._read_ini(text, "<example>")
    for section, options in (("pamsignal", pamsignal.GLOBAL_OPTIONS),
                             ("geoip", pamsignal.GEOIP_OPTIONS),
                             ("detection", pamsignal.DETECTION_OPTIONS),
                             ("alerts", pamsignal.ALERT_OPTIONS),
                             ("audit", pamsignal.AUDIT_OPTIONS),
                             ("report", pamsignal.REPORT_OPTIONS)):
        assert sorted(ini[section]) == sorted(options), section
    # Its one live channel is the console as a log, as with no file at all.
    (console,) = example.channels
    assert (console.type, console.policy) == ("console",
                                              pamsignal.SHOW_EVERYTHING)


def test_install_keeps_an_edited_config_and_honours_prefix(tmp_path):
    config = tmp_path / "etc/pamsignal/pamsignal.conf"
    config.parent.mkdir(parents=True)
    config.write_text("[pamsignal]\nfirst_start = boot\n")
    result = cli("install", "--root", str(tmp_path), "--prefix",
                 "/usr/local")
    assert result.returncode == 0, result.stderr
    assert "kept %s" % config in result.stdout
    assert config.read_text() == "[pamsignal]\nfirst_start = boot\n"
    unit = (tmp_path / "etc/systemd/system/pamsignal.service").read_text()
    assert "ExecStart=/usr/local/bin/pamsignal --config" in unit
    assert "/usr/bin/pamsignal" not in unit
    report_unit = (tmp_path / "etc/systemd/system/pamsignal-report.service"
                   ).read_text()
    assert "ExecStart=/usr/local/bin/pamsignal --config" in report_unit
    assert "/usr/bin/pamsignal" not in report_unit
    assert (tmp_path / "usr/local/bin/pamsignal").exists()


def test_uninstall_keeps_data_unless_purged(tmp_path):
    assert cli("install", "--root", str(tmp_path)).returncode == 0
    state = tmp_path / "var/lib/private/pamsignal"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{}")
    os.symlink("private/pamsignal", str(tmp_path / "var/lib/pamsignal"))
    result = cli("uninstall", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "usr/bin/pamsignal").exists()
    assert not (tmp_path / "etc/systemd/system/pamsignal.service").exists()
    for name in pamsignal.REPORT_UNITS:
        assert not (tmp_path / "etc/systemd/system" / name).exists()
    assert (tmp_path / "etc/pamsignal/pamsignal.conf").exists()
    assert (state / "state.json").exists()
    assert "--purge removes them" in result.stdout
    result = cli("uninstall", "--root", str(tmp_path), "--purge")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "etc/pamsignal").exists()
    assert not state.exists()
    assert not os.path.lexists(str(tmp_path / "var/lib/pamsignal"))


def test_stage_config_copies_for_the_owner_of_the_directory(tmp_path):
    source = tmp_path / "pamsignal.conf"
    source.write_text("[pamsignal]\nfirst_start = boot\n")
    os.chmod(str(source), 0o600)
    runtime = tmp_path / "run"
    runtime.mkdir()
    if os.geteuid() == 0:
        os.chown(str(runtime), 4321, 4321)  # the service's transient user
    result = cli("--config", str(source), "stage-config",
                 str(runtime / "pamsignal.conf"))
    assert result.returncode == 0, result.stderr
    staged = runtime / "pamsignal.conf"
    assert staged.read_text() == source.read_text()
    assert mode(staged) == 0o600
    assert os.stat(str(staged)).st_uid == os.stat(str(runtime)).st_uid
    # No file at the default place: an empty copy, so defaults apply.
    missing = cli("--config", str(tmp_path / "nothing"), "stage-config",
                  str(staged))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def tree(top):
    """Every path below `top` with its mode and contents."""
    found = {}
    for directory, _, names in os.walk(str(top)):
        found[directory] = mode(directory)
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as handle:
                found[path] = (mode(path), handle.read())
    return found


@pytest.mark.parametrize("command", [["install"], ["uninstall"],
                                     ["uninstall", "--purge"]])
def test_install_and_uninstall_leave_a_packaged_pamsignal_alone(tmp_path,
                                                                command):
    """A .deb owns /usr/bin/pamsignal and the conffile: uninstall would
    delete them, install override the package's unit."""
    root = tmp_path / "root"
    assert cli("install", "--root", str(root)).returncode == 0
    (root / "var/lib/dpkg").mkdir(parents=True)
    tools = tmp_path / "bin"
    tools.mkdir()
    asked = tmp_path / "asked"
    fake = tools / "dpkg-query"
    fake.write_text('#!/bin/sh\necho "$*" >> %s\n'
                    'echo "pamsignal: /usr/bin/pamsignal"\n' % asked)
    fake.chmod(0o755)
    before = tree(root)
    result = subprocess.run(
        [sys.executable, PAMSIGNAL] + command + ["--root", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60,
        env=dict(os.environ, PATH="%s:%s" % (tools, os.environ["PATH"])))
    assert result.returncode == 1
    assert "/usr/bin/pamsignal belongs to the installed package pamsignal" \
        in result.stderr
    assert "apt " in result.stderr and not result.stdout
    assert tree(root) == before
    # It asked root's package database, not this host's.
    assert "--admindir=%s/var/lib/dpkg -S /usr/bin/pamsignal" % root \
        in asked.read_text()


def test_install_goes_on_when_no_package_owns_the_program(tmp_path):
    (tmp_path / "var/lib/dpkg").mkdir(parents=True)
    tools = tmp_path / "bin"
    tools.mkdir()
    fake = tools / "dpkg-query"
    fake.write_text("#!/bin/sh\necho 'dpkg-query: no path found' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    result = subprocess.run(
        [sys.executable, PAMSIGNAL, "install", "--root", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60,
        env=dict(os.environ, PATH="%s:%s" % (tools, os.environ["PATH"])))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "usr/bin/pamsignal").exists()
