"""The signed apt repository (`make repo-apt`) as an admin's apt sees it.

Two throw-away GPG keys (no passphrase, in a GNUPGHOME of their own) sign
two repositories of the same package.  Each is served by http.server on
127.0.0.1; apt-get runs chrooted in an overlay of a cached tree
(realsys.TreeOverlay; a chroot shares the host's network), set up as the
README's three lines do: the key in /etc/apt/keyrings, a signed-by source
line, apt-get install.  The repository signed by the key apt was given
installs on Debian 11, 12 and 13; on Debian 12, the one signed by another
key is refused."""
import functools
import http.server
import os
import shutil
import subprocess
import threading

import pytest

import realsys
from support import REPO, pamsignal

pytestmark = pytest.mark.e2e

KEYRING = "/etc/apt/keyrings/pamsignal-archive-keyring.gpg"
SOURCES = "/etc/apt/sources.list.d/pamsignal.list"


def gpg(home, *arguments):
    return subprocess.run(["gpg", "--batch", "--homedir", home] +
                          list(arguments), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, check=True, timeout=60)


@pytest.fixture(scope="module")
def gnupg(tmp_path_factory):
    """GNUPGHOME with two signing keys; their fingerprints."""
    realsys.require_binaries("gpg", "gpgconf", "apt-ftparchive", "make")
    home = str(tmp_path_factory.mktemp("gnupg"))
    os.chmod(home, 0o700)
    fingerprints = []
    for name in ("archive", "stranger"):
        gpg(home, "--passphrase", "", "--quick-gen-key",
            "PAMSignal %s <%s@example.org>" % (name, name), "ed25519",
            "sign", "1d")
        listed = gpg(home, "--with-colons", "--list-keys",
                     "%s@example.org" % name).stdout.decode()
        fingerprints.append([line.split(":")[9] for line in
                             listed.splitlines()
                             if line.startswith("fpr:")][0])
    yield home, fingerprints
    # The agent gpg started for this home, and only that one.
    subprocess.run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"],
                   timeout=30)


def make_repo(dist, home, key, debian_package):
    """`make repo-apt` signed by `key`, reusing the session's .deb."""
    os.makedirs(dist, exist_ok=True)
    shutil.copy(debian_package, dist)
    result = subprocess.run(
        ["make", "-C", REPO, "-o", "deb", "repo-apt", "DISTDIR=" + dist,
         "GPG_KEY=" + key, "GNUPGHOME=" + home], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return os.path.join(dist, "repo")


@pytest.fixture(scope="module")
def repos(gnupg, debian_package, tmp_path_factory):
    home, (archive, stranger) = gnupg
    base = tmp_path_factory.mktemp("repos")
    return {"good": make_repo(str(base / "good"), home, archive,
                              debian_package),
            "stranger": make_repo(str(base / "stranger"), home, stranger,
                                  debian_package)}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *arguments):
        pass


@pytest.fixture
def serve():
    """serve(directory) -> its URL on 127.0.0.1, until the test ends."""
    servers = []

    def start(directory):
        handler = functools.partial(QuietHandler, directory=directory)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return "http://127.0.0.1:%d/" % server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def overlay(tmp_path):
    """overlay(suite) -> a fresh overlay of its tree, until the test ends."""
    started = []

    def start(suite):
        tree = realsys.TreeOverlay(realsys.require_package_tree(suite),
                                   str(tmp_path / suite))
        started.append(tree)
        return tree.start()

    yield start
    for tree in started:
        tree.stop()


def test_the_repository_holds_the_signed_indexes(repos):
    repo = repos["good"]
    for name in ("dists/stable/Release", "dists/stable/InRelease",
                 "dists/stable/Release.gpg",
                 "dists/stable/main/binary-all/Packages",
                 "dists/stable/main/binary-all/Packages.gz",
                 "pamsignal-archive-keyring.gpg",
                 "pool/main/pamsignal_%s_all.deb" % pamsignal.__version__):
        assert os.path.getsize(os.path.join(repo, name)) > 0, name
    with open(os.path.join(repo, "dists/stable/Release")) as handle:
        release = handle.read()
    for field in ("Suite: stable", "Codename: stable", "Components: main",
                  "Architectures: all"):
        assert field + "\n" in release
    assert " main/binary-all/Packages.gz\n" in release


def test_make_repo_apt_wants_a_key(debian_package, tmp_path):
    dist = str(tmp_path / "dist")
    os.makedirs(dist)
    shutil.copy(debian_package, dist)
    result = subprocess.run(
        ["make", "-C", REPO, "-o", "deb", "repo-apt", "DISTDIR=" + dist,
         "GPG_KEY="], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=60)
    assert result.returncode != 0
    assert "make repo-apt needs GPG_KEY=<key id>" in result.stderr
    assert not os.path.exists(os.path.join(dist, "repo"))


def configure_apt(tree, url, keyring):
    """The README's lines: the key, a signed-by source; nothing else."""
    os.makedirs(os.path.dirname(tree.path(KEYRING)), exist_ok=True)
    shutil.copy(keyring, tree.path(KEYRING))
    os.chmod(tree.path(KEYRING), 0o644)
    with open(tree.path(SOURCES), "w") as handle:
        handle.write("deb [signed-by=%s] %s stable main\n" % (KEYRING, url))
    # Only the repository under test: pamsignal must come from there.
    with open(tree.path("/etc/apt/sources.list"), "w"):
        pass


@pytest.mark.parametrize("suite", sorted(realsys.PACKAGE_SUITES))
def test_apt_installs_from_the_signed_repository(suite, repos, overlay,
                                                 serve):
    repo = repos["good"]
    tree = overlay(suite)
    configure_apt(tree, serve(repo),
                  os.path.join(repo, "pamsignal-archive-keyring.gpg"))
    update = tree.apt_get("update")
    assert update.returncode == 0, update.stdout + update.stderr
    assert "NO_PUBKEY" not in update.stdout + update.stderr
    install = tree.apt_get("install", "pamsignal")
    assert install.returncode == 0, install.stdout + install.stderr
    assert tree.package_status("pamsignal") == "ii |%s" % pamsignal.__version__
    assert tree.run(["pamsignal", "--version"]).stdout == \
        "pamsignal %s\n" % pamsignal.__version__


def test_apt_refuses_a_repository_signed_by_another_key(repos, gnupg,
                                                        overlay, serve):
    bookworm = overlay("bookworm")
    # The admin holds the project's key; the server offers a repository
    # signed by someone else's.
    configure_apt(bookworm, serve(repos["stranger"]),
                  os.path.join(repos["good"],
                               "pamsignal-archive-keyring.gpg"))
    update = bookworm.apt_get("update")
    output = update.stdout + update.stderr
    assert update.returncode != 0, output
    # apt names the key that signed it (a long key id: the fingerprint's
    # last 16 digits) and refuses the repository.
    stranger = gnupg[1][1]
    assert "NO_PUBKEY %s" % stranger[-16:] in output, output
    assert "is not signed" in output, output
    install = bookworm.apt_get("install", "pamsignal")
    assert install.returncode != 0
    assert bookworm.package_status("pamsignal") is None
    assert not os.path.lexists(bookworm.path("/usr/bin/pamsignal"))
