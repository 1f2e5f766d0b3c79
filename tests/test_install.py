"""`make install` with DESTDIR/PREFIX lays out a working command."""
import os
import shutil
import subprocess

import pytest

from support import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None,
                                reason="make is not installed")


def make(*args):
    return subprocess.run(["make", "-C", REPO] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=60)


def test_install_into_destdir_gives_a_runnable_command(tmp_path):
    result = make("install", "DESTDIR=%s" % tmp_path, "PREFIX=/usr/local")
    assert result.returncode == 0, result.stderr
    command = tmp_path / "usr/local/bin/pamsignal"
    assert os.stat(str(command)).st_mode & 0o777 == 0o755
    config = tmp_path / "etc/pamsignal/pamsignal.conf"
    assert os.stat(str(config)).st_mode & 0o777 == 0o600
    assert (tmp_path / "usr/local/share/man/man8/pamsignal.8").exists()
    version = subprocess.run([str(command), "--version"],
                             stdout=subprocess.PIPE, universal_newlines=True)
    assert version.stdout.startswith("pamsignal ")
    check = subprocess.run([str(command), "--config", str(config),
                            "check-config"], stdout=subprocess.PIPE)
    assert check.returncode == 0


def test_install_keeps_an_existing_configuration(tmp_path):
    config = tmp_path / "etc/pamsignal/pamsignal.conf"
    config.parent.mkdir(parents=True)
    config.write_text("[pamsignal]\nfirst_start = boot\n")
    assert make("install", "DESTDIR=%s" % tmp_path).returncode == 0
    assert config.read_text() == "[pamsignal]\nfirst_start = boot\n"
