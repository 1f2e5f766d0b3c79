#!/bin/bash
# Install everything the tests need, start what they drive, lint, and run
# the whole suite with nothing skipped.  The README's test command
# (`sudo bash tests/check.sh`, or `sudo make check`), and what .ci/run runs.
# Needs root and a Debian 12 or 13 (or newer) with apt; nothing else has to
# be there first, not even python3.
#
# Arguments, if any, go to pytest instead of the whole tests/ folder (e.g.
# `bash tests/check.sh tests/test_parse.py -x`); then the oldest and newest
# Pythons are not run.  SKIP_PREPARE=1 skips installing and starting
# (a machine already prepared).
set -euo pipefail

cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
# Debian's python3 refuses `pip install` outside a venv (PEP 668); this
# installs CI-only tools (pytest, vermin, ruff...) for the tests alone.
export PIP_BREAK_SYSTEM_PACKAGES=1
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore

# Debian packages the tests drive or check with; one list, one place.
PACKAGES=(
    python3 python3-pip make git ca-certificates
    openssh-server openssh-client sshpass sudo util-linux bsdutils procps
    passwd login systemd iproute2 debootstrap systemd-container
    mandoc
    # tests/test_rpm.py, tests/test_repo_rpm.py
    rpm rpmlint createrepo-c gnupg dnf
    # tests/test_install_sh.py: downloaders, OpenPGP checkers, shellcheck
    curl wget gpgv shellcheck
    # tests/test_deb.py, tests/test_repo_apt.py
    build-essential debhelper dpkg-dev lintian apt-utils
    # tests/test_ansible.py
    ansible ansible-lint
    # tests/test_audit_journal.py: fail2ban's journal backend (fail2ban
    # itself is unpacked by the test, never installed as a service)
    python3-systemd
    # tests/test_syslog.py, bench/bench_syslog.py: a real collector (the
    # tests start their own rsyslogd; the system's is never used)
    rsyslog rsyslog-gnutls
    # tests/test_report_html.py: the report page in a real headless browser
    chromium
    # bench/bench_versus.py (tests/test_bench.py): peak RSS of each tool
    # (fail2ban and sshguard themselves are unpacked, never installed)
    time
    # bench/bench_instructions.py (tests/test_bench.py): instruction counts
    valgrind
)
# Python packages, CI-only: never imported by pamsignal.py.
PIP_PACKAGES=(pytest vermin ruff maxminddb pyyaml atheris hypothesis)

step() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "tests/check.sh must run as root (packages, real sshd, useradd," \
         "journald): sudo bash tests/check.sh" >&2
    exit 1
fi

prepare() {
    step "Debian packages"
    apt-get update
    apt-get install -y --no-install-recommends "${PACKAGES[@]}"
    step "Python packages (CI-only tools)"
    python3 -m pip install -q "${PIP_PACKAGES[@]}"

    step "MaxMind's own test databases (tests/test_mmdb.py; cached)"
    # The maxminddb source package carries MaxMind's test and bad-data
    # databases; tests/test_mmdb.py reads them all with pamsignal's reader
    # and compares with the maxminddb package.
    local mmdb_version
    if [ ! -d "$MMDB_DATA/tests/data/test-data" ]; then
        rm -rf "$MMDB_DATA"
        mkdir -p "$MMDB_DATA/download"
        mmdb_version=$(python3 -c \
            'import maxminddb; print(maxminddb.__version__)')
        python3 -m pip download -q --no-deps --no-binary :all: \
            -d "$MMDB_DATA/download" "maxminddb==$mmdb_version"
        tar -xzf "$MMDB_DATA"/download/maxminddb-*.tar.gz -C "$MMDB_DATA" \
            --strip-components=1
    fi

    step "journald"
    # Decided by the socket and journalctl answering, as tests/realsys.py
    # does: in a chroot the host's journald process is visible but useless.
    python3 tests/realsys.py journald

    local tree started
    # bookworm and bullseye (with trixie-tree): the Debian package tests;
    # ansible-tree: the boot tree with python3-apt, for the Ansible role.
    # bare-tree: a Debian 12 minbase without python3 (tests/test_fresh.py).
    # doors-tree: the boot tree with doas, pkexec, polkitd (test_doors.py).
    for tree in trixie-tree boot-tree bookworm-tree bullseye-tree \
        ansible-tree bare-tree doors-tree; do
        step "Debian tree: $tree (cached under /var/cache/pamsignal-tests)"
        started=$SECONDS
        python3 tests/realsys.py "$tree"
        echo "$tree: $((SECONDS - started)) s"
    done
}

MMDB_DATA=/var/cache/pamsignal-tests/maxminddb-sdist
[ "${SKIP_PREPARE:-}" = 1 ] || prepare
export PAMSIGNAL_MMDB_TEST_DATA="$MMDB_DATA/tests/data"

step "vermin (Python 3.6+)"
vermin -t=3.6- --violations pamsignal.py
step "ruff"
python3 -m ruff check pamsignal.py tests bench

step "tests"
rc=0
[ "$#" -gt 0 ] || set -- tests
timeout 2400 python3 -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: that is a failure" >&2
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"

if [ "$*" = tests ]; then
    step "the oldest and newest Python (3.6, 3.13)"
    .ci/pythons
fi
