"""The signed dnf repository (`make repo-rpm`): its metadata, its
signatures, and Debian's dnf 4 installing from it over HTTP, or refusing.

`make repo-rpm` runs with a throw-away GnuPG home holding two fresh keys:
the repository's, and another one an attacker (or a mix-up) would sign
with.  The repository is served by http.server on 127.0.0.1 and installed
with the real dnf, configured by the README's own .repo file, into an
overlay of the cached Debian 13 tree (tests/rpmsupport.py).  That tree's
python3, systemd and /bin/sh come from dpkg, which dnf cannot see, so a
stand-in package built here provides them in the tree's rpm database: the
dependency resolution is dnf's own.
"""
import bz2
import functools
import gzip
import hashlib
import http.server
import os
import re
import shutil
import tempfile
import threading
import xml.etree.ElementTree as ElementTree

import pytest

import realsys
import rpmsupport
from rpmsupport import check, read, rpm_in, run
from support import REPO, pamsignal

pytestmark = pytest.mark.e2e

SIGNER = "PAMSignal repository test <repo@example.invalid>"
OTHER = "Someone else <other@example.invalid>"
REPO_NS = {"repo": "http://linux.duke.edu/metadata/repo",
           "common": "http://linux.duke.edu/metadata/common"}
#: What the Debian tree has from dpkg, declared to rpm (see above).
STAND_IN_SPEC = """\
Name: debian-tree-base
Version: 1
Release: 1
Summary: What the Debian tree has from dpkg, declared to rpm
License: MIT
BuildArch: noarch
Provides: python3 = 3.13
Provides: /usr/bin/python3
Provides: systemd = 257
Provides: /bin/sh
%description
Stand-in for the tree's dpkg-installed python3, systemd and shell.
%files
"""


def gpg(home, *args):
    return check(["gpg", "--homedir", home, "--batch"] + list(args))


def stop_agents(home):
    """gpg starts an agent per home; end the ones this home started."""
    run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"])
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"gpg-agent") and home.encode() in argv:
            try:
                os.kill(int(pid), 15)
            except OSError:
                pass


@pytest.fixture(scope="module")
def keys():
    """A GnuPG home with the repository's key and another; its path."""
    rpmsupport.require_rpm_tools("gpg", "gpgv", "gpgconf", "rpmsign",
                                 "createrepo_c")
    # Short: the agent's socket path must fit in a sockaddr_un.
    home = tempfile.mkdtemp(prefix="psg-")
    try:
        for user in (SIGNER, OTHER):
            gpg(home, "--passphrase", "", "--quick-gen-key", user,
                "rsa3072", "sign", "never")
        yield home
    finally:
        stop_agents(home)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def repo(keys, tmp_path_factory):
    """dist/repo/rpm as `make repo-rpm GPG_KEY=... GNUPGHOME=...` makes
    it, from a copy of the sources."""
    source_dir = rpmsupport.copy_sources(
        str(tmp_path_factory.mktemp("repo-rpm") / "src"))
    rpmsupport.make_in(source_dir, "repo-rpm",
                       "GPG_KEY=repo@example.invalid", "GNUPGHOME=" + keys)
    return os.path.join(source_dir, "dist", "repo", "rpm")


@pytest.fixture(scope="module")
def other_key(keys, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("other-key") / "other.asc")
    with open(path, "w") as handle:
        handle.write(gpg(keys, "--armor", "--export",
                         "other@example.invalid").stdout)
    return path


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def served(repo):
    """The repository on http://127.0.0.1:PORT/, as a mirror serves it."""
    handler = functools.partial(QuietHandler, directory=repo)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield "http://127.0.0.1:%d/" % server.server_address[1]
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- metadata


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def opened(name, data):
    """The uncompressed bytes of a repodata file."""
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".bz2"):
        return bz2.decompress(data)
    return data


def repomd_entries(repo):
    root = ElementTree.parse(os.path.join(repo, "repodata", "repomd.xml"))
    entries = {}
    for data in root.getroot().findall("repo:data", REPO_NS):
        entries[data.get("type")] = {
            "href": data.find("repo:location", REPO_NS).get("href"),
            "checksum": data.find("repo:checksum", REPO_NS),
            "open": data.find("repo:open-checksum", REPO_NS),
            "size": int(data.find("repo:size", REPO_NS).text),
        }
    return entries


def test_repomd_lists_metadata_whose_checksums_match(repo):
    entries = repomd_entries(repo)
    assert {"primary", "filelists", "other"} <= set(entries)
    for kind, entry in entries.items():
        with open(os.path.join(repo, entry["href"]), "rb") as handle:
            data = handle.read()
        assert entry["checksum"].get("type") == "sha256", kind
        assert sha256(data) == entry["checksum"].text, kind
        assert len(data) == entry["size"], kind
        assert sha256(opened(entry["href"], data)) == entry["open"].text


def test_primary_lists_the_package_with_its_checksum(repo):
    href = repomd_entries(repo)["primary"]["href"]
    with open(os.path.join(repo, href), "rb") as handle:
        primary = ElementTree.fromstring(gzip.decompress(handle.read()))
    packages = primary.findall("common:package", REPO_NS)
    assert len(packages) == 1
    package = packages[0]
    assert package.find("common:name", REPO_NS).text == "pamsignal"
    assert package.find("common:arch", REPO_NS).text == "noarch"
    version = package.find("common:version", REPO_NS)
    assert version.get("ver") == pamsignal.__version__
    location = package.find("common:location", REPO_NS).get("href")
    with open(os.path.join(repo, location), "rb") as handle:
        assert sha256(handle.read()) == package.find(
            "common:checksum", REPO_NS).text


# ---------------------------------------------------------------- signatures


def verify_with(public_key, signature, signed, workdir):
    """gpgv with a keyring of public_key alone, as dnf checks repomd.xml
    against the repository's gpgkey= and nothing else."""
    keyring = os.path.join(workdir, os.path.basename(public_key) + ".gpg")
    check(["gpg", "--homedir", workdir, "--batch", "--yes", "--dearmor",
           "--output", keyring, public_key])
    return run(["gpgv", "--keyring", keyring, signature, signed])


def test_repomd_signature_verifies_with_the_published_key_only(
        repo, other_key, tmp_path):
    repomd = os.path.join(repo, "repodata", "repomd.xml")
    signature = repomd + ".asc"
    published = os.path.join(repo, "RPM-GPG-KEY-pamsignal")
    assert read(signature).startswith("-----BEGIN PGP SIGNATURE-----")
    assert read(published).startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")

    good = verify_with(published, signature, repomd, str(tmp_path))
    assert good.returncode == 0, good.stderr
    assert "Good signature" in good.stderr and SIGNER in good.stderr

    other = verify_with(other_key, signature, repomd, str(tmp_path))
    assert other.returncode != 0
    assert "No public key" in other.stderr, other.stderr

    # A mirror that points primary at other metadata.
    tampered = tmp_path / "repomd.xml"
    tampered.write_text(read(repomd).replace(
        "<revision>", "<revision>1", 1))
    bad = verify_with(published, signature, str(tampered), str(tmp_path))
    assert bad.returncode != 0
    assert "BAD signature" in bad.stderr


def checksig(package, public_key, dbdir):
    """rpmkeys --checksig against a keyring holding only public_key."""
    if public_key:
        check(["rpmkeys", "--dbpath", dbdir, "--import", public_key])
    return run(["rpmkeys", "--dbpath", dbdir, "--checksig", package])


def test_package_is_signed_by_the_exported_key(repo, other_key, tmp_path):
    package = rpmsupport.only_rpm(repo)
    key = os.path.join(repo, "RPM-GPG-KEY-pamsignal")

    good = checksig(package, key, str(tmp_path / "good"))
    assert good.returncode == 0 and "signatures OK" in good.stdout, (
        good.stdout + good.stderr)
    for name, public_key in (("none", None), ("other", other_key)):
        refused = checksig(package, public_key, str(tmp_path / name))
        assert refused.returncode != 0, name
        assert "NOT OK" in refused.stdout, refused.stdout


def test_repo_rpm_needs_a_key():
    rpmsupport.require_rpm_tools()
    # -o rpm: the guard is checked without building the package first.
    result = run(["make", "-C", rpmsupport.REPO, "--no-print-directory",
                  "-o", "rpm", "repo-rpm", "GPG_KEY="])
    assert result.returncode != 0
    assert "set GPG_KEY=" in result.stderr


# ---------------------------------------------------------------- dnf


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    rpmsupport.require_rpm_tools()
    top = str(tmp_path_factory.mktemp("stand-in"))
    spec = os.path.join(top, "debian-tree-base.spec")
    with open(spec, "w") as handle:
        handle.write(STAND_IN_SPEC)
    check(["rpmbuild", "-bb", "--quiet", "--define", "_topdir " + top,
           "--define", "_tmppath " + top, spec])
    return os.path.join(top, "RPMS", "noarch",
                        "debian-tree-base-1-1.noarch.rpm")


@pytest.fixture
def dnf_tree(stand_in):
    realsys.require_binaries("dnf")
    with rpmsupport.debian_overlay() as root:
        installed = rpm_in(root, "-i", stand_in)
        assert installed.returncode == 0, installed.stderr
        yield root


#: Where the README's .repo file points; the tests serve it elsewhere.
README_BASEURL = "https://repo.example.org/pamsignal/rpm/"


def readme_repo_file():
    """The /etc/yum.repos.d/pamsignal.repo the README tells admins to
    write, so that the tests install the way the README says."""
    found = re.search(r"```ini\n(\[pamsignal\]\n.*?)```",
                      read(os.path.join(REPO, "README.md")), re.S)
    assert found, "the README shows no [pamsignal] .repo file"
    return found.group(1)


def dnf_install(tree, workdir, baseurl, gpgkey=None, repo_gpgcheck=True):
    """`dnf install pamsignal` into tree from the README's .repo file,
    pointed at baseurl; gpgkey replaces its key, and repo_gpgcheck=False
    turns its metadata check off."""
    repo_file = readme_repo_file().replace(README_BASEURL, baseurl)
    assert baseurl in repo_file
    if gpgkey:
        repo_file = re.sub(r"(?m)^gpgkey=.*$", "gpgkey=" + gpgkey,
                           repo_file)
    if not repo_gpgcheck:
        repo_file = re.sub(r"(?m)^repo_gpgcheck=1$", "repo_gpgcheck=0",
                           repo_file)
    config = os.path.join(workdir, "dnf.conf")
    with open(config, "w") as handle:
        handle.write(
            "[main]\nreposdir=/nonexistent\ncachedir={work}/cache\n"
            "persistdir={work}/persist\nlogdir={work}\n\n".format(
                work=workdir) + repo_file)
    return run(["dnf", "-y", "--config", config, "--installroot", tree,
                "--releasever", "1", "install", "pamsignal"], timeout=300)


def test_dnf_installs_from_the_signed_repository(served, dnf_tree, keys,
                                                 tmp_path):
    result = dnf_install(dnf_tree, str(tmp_path), served)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Complete!" in result.stdout
    signature = rpm_in(dnf_tree, "-q", "--qf", "%{RSAHEADER:pgpsig}",
                       "pamsignal").stdout
    signer = fingerprint(keys, "repo@example.invalid")
    assert signature.endswith("Key ID " + signer[-16:].lower()), signature
    program = os.path.join(dnf_tree, "usr/bin/pamsignal")
    assert os.stat(program).st_mode & 0o777 == 0o755
    # dnf ran the %post scriptlet too: the unit is enabled.
    assert os.path.islink(os.path.join(
        dnf_tree,
        "etc/systemd/system/multi-user.target.wants/pamsignal.service"))
    version = check(["chroot", dnf_tree, "/usr/bin/pamsignal", "--version"])
    assert version.stdout.strip() == "pamsignal " + pamsignal.__version__


def fingerprint(keys, user):
    listing = gpg(keys, "--with-colons", "--list-keys", user).stdout
    return [line.split(":")[9] for line in listing.splitlines()
            if line.startswith("fpr:")][0]


def test_dnf_refuses_metadata_signed_by_another_key(served, dnf_tree,
                                                    other_key, tmp_path):
    result = dnf_install(dnf_tree, str(tmp_path), served,
                         "file://" + other_key)

    assert result.returncode != 0
    assert "repomd.xml GPG signature verification error" in result.stderr
    assert not os.path.lexists(os.path.join(dnf_tree, "usr/bin/pamsignal"))


def test_dnf_refuses_a_package_signed_by_another_key(served, dnf_tree,
                                                     other_key, tmp_path):
    # Metadata unchecked, as on a repository without repomd.xml.asc: the
    # package's own signature still stops it.
    result = dnf_install(dnf_tree, str(tmp_path), served,
                         "file://" + other_key, repo_gpgcheck=False)

    assert result.returncode != 0
    assert "GPG check FAILED" in result.stderr
    assert not os.path.lexists(os.path.join(dnf_tree, "usr/bin/pamsignal"))
