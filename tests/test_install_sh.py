"""The release path: `make dist` and `curl -fsSL .../install.sh | sudo bash`.

A throw-away OpenPGP key signs a `make dist` of this tree; an http.server
on 127.0.0.1 stands in for the release site (one directory per release,
as on GitHub).  install.sh then runs for real:

- on this host with --download-only: curl, wget and Python's own
  downloader, each over TLS from a CA it must not trust and one it is told
  to (redirects to https followed, to http refused); gpg and gpgv
  checking the signature; the release addresses and the arguments;
- piped into bash chrooted in an overlay of the cached Debian 13 tree
  (sqv checks the signature there, python3 downloads): every refusal
  (altered release, no verifier, old or no Python, no systemd, a packaged
  install), with nothing written to the tree;
- piped into bash inside the booted Debian 13 tree (systemd-nspawn, as
  tests/test_service_boot.py boots it): install, enable and start, the
  upgrade to a pinned version that keeps the configuration, uninstall.
"""
import hashlib
import http.server
import os
import re
import shutil
import tarfile
import threading

import pytest

import realsys
from receivers import Dynamic, HttpReceiver, Respond, make_cert
from support import REPO, pamsignal, wait_for
from realsys import Container

INSTALL_SH = os.path.join(REPO, "install.sh")
VERSION = pamsignal.__version__
PINNED = "9.9.9"  # a second release, made by the tests
#: The man pages of this tree, shipped and installed beside the program.
MANPAGES = [name for name in ("pamsignal.8", "pamsignal.conf.5")
            if os.path.exists(os.path.join(REPO, name))]
#: What install.sh fetches from a release directory.
RELEASE_FILES = ["pamsignal.py"] + MANPAGES + ["SHA256SUMS",
                                                "SHA256SUMS.asc"]
CHROOT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
              "/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
              "PYTHONDONTWRITEBYTECODE": "1"}


def run(command, **options):
    options.setdefault("timeout", 120)
    return realsys._run(command, **options)


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


# ---------------------------------------------------------------- keys


class Key(object):
    """A throw-away signing key in its own GNUPGHOME."""

    def __init__(self, home, name):
        self.home = home
        os.makedirs(home, mode=0o700)
        self.gpg("--passphrase", "", "--quick-gen-key",
                 "%s <release@invalid>" % name, "ed25519", "sign", "never")
        listing = self.gpg("--with-colons", "--list-keys").stdout
        self.fingerprint = re.search(r"^fpr:+([0-9A-F]{40}):", listing,
                                     re.M).group(1)
        self.public = os.path.join(home, "public.asc")
        with open(self.public, "w") as handle:
            handle.write(self.gpg("--armor", "--export",
                                  self.fingerprint).stdout)

    def gpg(self, *arguments):
        result = run(["gpg", "--batch", "--homedir", self.home] +
                     list(arguments))
        assert result.returncode == 0, result.stderr
        return result

    def sign(self, directory):
        self.gpg("--yes", "--local-user", self.fingerprint, "--armor",
                 "--detach-sign", "-o", os.path.join(directory,
                                                     "SHA256SUMS.asc"),
                 os.path.join(directory, "SHA256SUMS"))

    def close(self):
        run(["gpgconf", "--homedir", self.home, "--kill", "all"])


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    """The release key and a stranger's key."""
    realsys.require_binaries("gpg", "gpgconf")
    base = str(tmp_path_factory.mktemp("keys"))
    made = [Key(os.path.join(base, "release"), "PAMSignal release"),
            Key(os.path.join(base, "stranger"), "Someone else")]
    yield made
    for key in made:
        key.close()


# ---------------------------------------------------------------- releases


def make(*arguments, **environment):
    """make in this tree (dist builds the packages too: their own tests
    check what is in them)."""
    return run(["make", "-C", REPO] + list(arguments),
               env=dict(os.environ, **environment))


@pytest.fixture(scope="session")
def dist(tmp_path_factory, keys):
    """`make dist` signed with the release key."""
    realsys.require_binaries("make", "git", "sha256sum")
    release = keys[0]
    directory = str(tmp_path_factory.mktemp("dist"))
    result = make("dist", "DISTDIR=" + directory,
                  "GPG_KEY=" + release.fingerprint, GNUPGHOME=release.home)
    assert result.returncode == 0, result.stdout + result.stderr
    return directory


def write_sums(directory):
    names = sorted(name for name in os.listdir(directory)
                   if not name.startswith("SHA256SUMS"))
    with open(os.path.join(directory, "SHA256SUMS"), "w") as handle:
        for name in names:
            handle.write("%s  %s\n" % (sha256(os.path.join(directory,
                                                           name)), name))


def publish(site, name, dist, key=None, alter=None):
    """site/NAME/: the release files of `dist`; `alter(directory)` changes
    them afterwards; `key` signs the sums anew first."""
    directory = os.path.join(site, name)
    os.makedirs(directory)
    for file_name in RELEASE_FILES:
        shutil.copy(os.path.join(dist, file_name), directory)
    if key is not None:
        write_sums(directory)
        key.sign(directory)
    if alter is not None:
        alter(directory)
    return directory


def append(directory, name, text):
    with open(os.path.join(directory, name), "a") as handle:
        handle.write(text)


def pinned_release(directory):
    """dist as release PINNED: its own pamsignal.py, sums and signature."""
    path = os.path.join(directory, "pamsignal.py")
    with open(path) as handle:
        source = handle.read()
    with open(path, "w") as handle:
        handle.write(source.replace('__version__ = "%s"' % VERSION,
                                    '__version__ = "%s"' % PINNED, 1))


@pytest.fixture(scope="session")
def site(tmp_path_factory, dist, keys):
    """The release site: latest/, vVERSION/, vPINNED/, and altered copies
    of latest/ under bad-*/latest/."""
    release, stranger = keys
    root = str(tmp_path_factory.mktemp("site"))
    publish(root, "latest", dist)
    publish(root, "v" + VERSION, dist)
    pinned = publish(root, "v" + PINNED, dist, alter=pinned_release)
    write_sums(pinned)
    release.sign(pinned)

    def tamper(directory):
        append(directory, "pamsignal.py", "\nimport os; os.system('id')\n")

    def tamper_and_resum(directory):
        tamper(directory)
        write_sums(directory)  # the old signature stays

    def unsign(directory):
        os.unlink(os.path.join(directory, "SHA256SUMS.asc"))

    publish(root, "bad-file/latest", dist, alter=tamper)
    publish(root, "bad-sums/latest", dist, alter=tamper_and_resum)
    publish(root, "bad-signer/latest", dist, key=stranger)
    publish(root, "unsigned/latest", dist, alter=unsign)
    return root


class Site(object):
    """http.server on 127.0.0.1 serving the site; records each request's
    path and User-Agent."""

    def __init__(self, root):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *arguments, **options):
                super().__init__(*arguments, directory=root, **options)

            def do_GET(self):
                requests.append((self.path, self.headers["User-Agent"]))
                super().do_GET()

            def log_message(self, *arguments):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def server(site):
    served = Site(site)
    yield served
    served.close()


# ---------------------------------------------------------------- make dist


def test_make_dist_sums_signs_and_ships_the_tracked_files(dist, keys):
    release = keys[0]
    manpages = MANPAGES
    tarball = "pamsignal-%s.tar.gz" % VERSION
    packages = ["pamsignal-%s-1.noarch.rpm" % VERSION,
                "pamsignal_%s_all.deb" % VERSION]
    assert sorted(os.listdir(dist)) == sorted(
        [tarball, "pamsignal.py", "install.sh", "SHA256SUMS",
         "SHA256SUMS.asc"] + manpages + packages)
    check = run(["sha256sum", "--check", "--strict", "SHA256SUMS"],
                cwd=dist)
    assert check.returncode == 0, check.stdout + check.stderr
    checked = sorted(line.rsplit(": ", 1)[0]
                     for line in check.stdout.splitlines())
    assert checked == sorted(set(os.listdir(dist)) -
                             {"SHA256SUMS", "SHA256SUMS.asc"})
    verify = release.gpg("--status-fd", "1", "--verify",
                         os.path.join(dist, "SHA256SUMS.asc"),
                         os.path.join(dist, "SHA256SUMS"))
    assert "VALIDSIG %s" % release.fingerprint in verify.stdout
    for name in ["pamsignal.py"] + manpages:
        assert sha256(os.path.join(dist, name)) == \
            sha256(os.path.join(REPO, name))
    tracked = run(["git", "-C", REPO, "ls-tree", "-r", "--name-only",
                   "HEAD"]).stdout.split()
    with tarfile.open(os.path.join(dist, tarball)) as archive:
        members = [member.name for member in archive.getmembers()
                   if member.isfile() or member.issym()]
        with archive.extractfile("pamsignal-%s/Makefile" % VERSION) as f:
            shipped_makefile = f.read()
    assert sorted(members) == sorted("pamsignal-%s/%s" % (VERSION, name)
                                     for name in tracked)
    tracked_makefile = run(["git", "-C", REPO, "show", "HEAD:Makefile"])
    assert shipped_makefile.decode() == tracked_makefile.stdout


def test_the_released_install_sh_carries_the_signing_key(dist, keys):
    with open(INSTALL_SH) as handle:
        source = handle.read()
    with open(os.path.join(dist, "install.sh")) as handle:
        released = handle.read()
    with open(keys[0].public) as handle:
        key = handle.read()
    marker = "    cat <<'PAMSIGNAL_RELEASE_KEY'\n"
    assert source.count(marker) == 1
    assert released == source.replace(marker, marker + key)
    assert os.stat(os.path.join(dist, "install.sh")).st_mode & 0o777 == \
        0o755


def test_make_dist_without_a_key_is_unsigned(tmp_path):
    result = make("dist", "DISTDIR=%s" % tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "SHA256SUMS.asc").exists()
    assert sha256(str(tmp_path / "install.sh")) == sha256(INSTALL_SH)
    assert "install.sh" in (tmp_path / "SHA256SUMS").read_text()


def test_make_dist_refuses_an_unknown_key(tmp_path, keys):
    result = make("dist", "DISTDIR=%s" % tmp_path, "GPG_KEY=" + "0" * 40,
                  GNUPGHOME=keys[0].home)
    assert result.returncode != 0
    assert "no such key" in result.stderr
    assert not (tmp_path / "SHA256SUMS").exists()
    assert not (tmp_path / "release-key.tmp").exists()


def test_shellcheck_finds_nothing_in_install_sh(dist):
    realsys.require_binaries("shellcheck")
    result = run(["shellcheck", INSTALL_SH, os.path.join(dist,
                                                         "install.sh")])
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------- on this host


def path_without(directory, *hidden):
    """A PATH directory linking every command of this host's PATH except
    `hidden`: the same machine as if those were not installed."""
    os.makedirs(directory)
    for entry in os.environ["PATH"].split(os.pathsep) + ["/usr/bin",
                                                         "/bin"]:
        if not os.path.isdir(entry):
            continue
        for name in os.listdir(entry):
            link = os.path.join(directory, name)
            target = os.path.join(entry, name)
            if (name not in hidden and not os.path.lexists(link)
                    and os.access(target, os.X_OK)):
                os.symlink(target, link)
    return directory


#: Variables that would make a downloader trust another CA.
CA_VARIABLES = ("CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR")


def download_only(script, base_url, target, path=None, extra=(), **more):
    environment = dict(os.environ)
    for name in ("PAMSIGNAL_BASE_URL",) + CA_VARIABLES:
        environment.pop(name, None)
    environment.update(more)
    if path:
        environment["PATH"] = path
    return run(["bash", script, "--base-url", base_url, "--download-only",
                target] + list(extra), env=environment)


@pytest.mark.parametrize("downloader,agent", [
    ("curl", "curl/"), ("wget", "Wget/"), ("python3", "Python-urllib/")])
def test_each_downloader_fetches_and_verifies(downloader, agent, dist,
                                              server, tmp_path):
    hidden = {"curl": (), "wget": ("curl",),
              "python3": ("curl", "wget")}[downloader]
    path = path_without(str(tmp_path / "bin"), *hidden)
    del server.requests[:]
    result = download_only(os.path.join(dist, "install.sh"), server.url,
                           str(tmp_path / "release"), path)
    assert result.returncode == 0, result.stderr
    assert "(with %s)" % downloader in result.stdout
    assert "signature of SHA256SUMS: good" in result.stdout
    assert "downloaded and verified PAMSignal %s" % VERSION in result.stdout
    fetched = sorted(path for path, _ in server.requests)
    assert fetched == sorted("/latest/" + name for name in RELEASE_FILES)
    assert all(user_agent.startswith(agent)
               for _, user_agent in server.requests), server.requests
    assert sorted(os.listdir(str(tmp_path / "release"))) == \
        sorted(RELEASE_FILES)
    assert sha256(str(tmp_path / "release/pamsignal.py")) == \
        sha256(os.path.join(REPO, "pamsignal.py"))


@pytest.mark.parametrize("verifier", ["gpg", "gpgv"])
def test_each_verifier_tells_a_good_signature_from_a_stranger(
        verifier, dist, server, tmp_path):
    hidden = ("sqv", "gpg") if verifier == "gpgv" else ("sqv",)
    path = path_without(str(tmp_path / "bin"), *hidden)
    script = os.path.join(dist, "install.sh")
    good = download_only(script, server.url, str(tmp_path / "good"), path)
    assert good.returncode == 0, good.stderr
    assert "signature of SHA256SUMS: good" in good.stdout
    bad = download_only(script, server.url + "/bad-signer",
                        str(tmp_path / "bad"), path)
    assert bad.returncode == 1
    assert "not a good signature by the release key" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_a_key_given_with_key_replaces_the_built_in_one(server, keys,
                                                        tmp_path):
    release, stranger = keys
    unsigned_script = download_only(INSTALL_SH, server.url,
                                    str(tmp_path / "plain"))
    assert unsigned_script.returncode == 0, unsigned_script.stderr
    assert "not signature-checked" in unsigned_script.stdout
    mine = download_only(INSTALL_SH, server.url, str(tmp_path / "mine"),
                         extra=["--key", release.public])
    assert "signature of SHA256SUMS: good" in mine.stdout
    theirs = download_only(INSTALL_SH, server.url, str(tmp_path / "theirs"),
                           extra=["--key", stranger.public])
    assert theirs.returncode == 1
    assert "not a good signature" in theirs.stderr


@pytest.fixture(scope="session")
def https_site(site, server, tmp_path_factory):
    """The site over TLS, with a certificate from a test CA that nothing
    trusts unless told to.  /to-http/... redirects to the plain site,
    /to-https/... to itself (as GitHub redirects a release download)."""
    certs = make_cert(str(tmp_path_factory.mktemp("tls")))

    def answer(request):
        if request.path.startswith("/to-https/"):
            return Respond(302, headers={
                "Location": receiver.url + request.path[len("/to-https"):]})
        if request.path.startswith("/to-http/"):
            return Respond(302, headers={
                "Location": server.url + request.path[len("/to-http"):]})
        path = os.path.join(site, request.path.lstrip("/"))
        if ".." in request.path or not os.path.isfile(path):
            return Respond(404)
        with open(path, "rb") as handle:
            return Respond(200, handle.read())

    with HttpReceiver(tls=certs, default=Dynamic(answer)) as receiver:
        yield receiver, certs.ca_file


HIDE_FOR = {"curl": (), "wget": ("curl",), "python3": ("curl", "wget")}


@pytest.mark.parametrize("downloader", sorted(HIDE_FOR))
def test_an_untrusted_certificate_is_refused(downloader, dist, https_site,
                                             tmp_path):
    receiver, _ = https_site
    path = path_without(str(tmp_path / "bin"), *HIDE_FOR[downloader])
    result = download_only(os.path.join(dist, "install.sh"), receiver.url,
                           str(tmp_path / "release"), path)
    assert result.returncode == 1
    assert "(with %s)" % downloader in result.stdout
    assert "could not download %s/latest/SHA256SUMS" % receiver.url in \
        result.stderr
    assert not (tmp_path / "release").exists()


@pytest.mark.parametrize("downloader", ["curl", "python3"])
def test_https_works_and_no_redirect_leads_back_to_http(
        downloader, dist, https_site, server, tmp_path):
    receiver, ca_file = https_site
    path = path_without(str(tmp_path / "bin"), *HIDE_FOR[downloader])
    script = os.path.join(dist, "install.sh")
    trusted = {"CURL_CA_BUNDLE": ca_file, "SSL_CERT_FILE": ca_file}
    good = download_only(script, receiver.url + "/to-https",
                         str(tmp_path / "good"), path, **trusted)
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "good/pamsignal.py").exists()
    del server.requests[:]
    downgraded = download_only(script, receiver.url + "/to-http",
                               str(tmp_path / "bad"), path, **trusted)
    assert downgraded.returncode == 1
    assert "could not download %s/to-http/latest/SHA256SUMS" \
        % receiver.url in downgraded.stderr
    assert server.requests == []


@pytest.mark.parametrize("arguments,release_url", [
    ([], "https://github.com/pamsignal/pamsignal/releases/latest/download"),
    (["--version", "v0.2.0"],
     "https://github.com/pamsignal/pamsignal/releases/download/v0.2.0"),
    (["--base-url", "https://mirror.example.org/ps/"],
     "https://mirror.example.org/ps/latest"),
    (["--base-url", "https://mirror.example.org/ps", "--version", "1.2.3"],
     "https://mirror.example.org/ps/v1.2.3")])
def test_where_each_release_is_looked_for(arguments, release_url, server,
                                          tmp_path):
    """Through a proxy that refuses to connect anywhere (the test site
    answers CONNECT with 501): the first address asked for is printed and
    the download fails without reaching the network."""
    environment = dict(os.environ, https_proxy=server.url, no_proxy="")
    for name in ("PAMSIGNAL_BASE_URL", "HTTPS_PROXY", "NO_PROXY"):
        environment.pop(name, None)
    result = run(["bash", INSTALL_SH, "--download-only",
                  str(tmp_path / "release")] + arguments, env=environment)
    assert result.returncode == 1
    assert "downloading from %s (with curl)" % release_url in result.stdout
    assert "could not download %s/SHA256SUMS" % release_url in \
        result.stderr


@pytest.mark.parametrize("base_url", [
    "http://mirror.example.org/pamsignal", "http://127.0.0.1.example.org/",
    "ftp://127.0.0.1/pamsignal", "http://[::2]/pamsignal"])
def test_only_https_or_this_host(base_url, dist, tmp_path):
    result = download_only(os.path.join(dist, "install.sh"), base_url,
                           str(tmp_path / "release"))
    assert result.returncode == 1
    assert "only https:// (or http:// to this host)" in result.stderr


@pytest.mark.parametrize("arguments,complaint", [
    (["--purge"], "--purge goes with --uninstall"),
    (["--version", "0.2.0;id"], "--version 0.2.0;id: not a version"),
    (["--version", "../../x"], "expected a version such as 0.2.0"),
    (["--key", "/nonexistent"], "--key /nonexistent: cannot read"),
    (["--bogus"], "unknown option: --bogus")])
def test_bad_arguments_are_refused_before_anything_runs(arguments, complaint,
                                                        server):
    del server.requests[:]
    result = run(["bash", INSTALL_SH, "--base-url", server.url] + arguments)
    assert result.returncode == 1
    assert complaint in result.stderr
    assert server.requests == []


def test_help_says_how_to_pin_mirror_and_uninstall():
    result = run(["bash", INSTALL_SH, "--help"])
    assert result.returncode == 0
    for option in ("--version X.Y.Z", "--base-url URL", "--key FILE",
                   "--download-only DIR", "--uninstall", "--purge"):
        assert option in result.stdout


def test_a_truncated_script_runs_nothing(dist, tmp_path):
    """curl cut short: bash reads a function that is never called."""
    with open(os.path.join(dist, "install.sh")) as handle:
        text = handle.read()
    cut = text[:text.rindex("pamsignal_installer \"$@\"")]
    marker = str(tmp_path / "ran")
    for end in (len(cut), len(cut) // 2):
        result = run(["bash", "-s", "--", "--download-only", marker],
                     input=cut[:end])
        assert "pamsignal-install:" not in result.stdout + result.stderr
    assert not os.path.exists(marker)


# ---------------------------------------------------------------- Debian 13


class Debian13View(realsys.TreeOverlay):
    """An overlay of the cached Debian 13 tree (realsys.TreeOverlay) that
    knows which of its files the test put there, so written() tells what
    the runs themselves wrote."""

    def __init__(self, tree, workdir):
        super(Debian13View, self).__init__(tree, workdir)
        self.prepared = set()

    def run(self, command, input=None):
        return super(Debian13View, self).run(
            command, input=input, env=CHROOT_ENV, timeout=120)

    def prepare(self, path, text=None, mode=0o755):
        """A file of text or bytes (or, with no text, a directory) in
        the view before the test runs; written() leaves these out."""
        target = self.path(path)
        if text is None:
            os.makedirs(target)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(text if isinstance(text, bytes) else
                             text.encode())
            os.chmod(target, mode)
        self.prepared.add(path)

    def whiteout(self, path):
        """Hide a file of the tree (overlayfs records the deletion)."""
        os.unlink(self.path(path))
        self.prepared.add(path)

    def unprepare(self, path):
        """Take a directory prepare() made away again."""
        os.rmdir(self.path(path))
        self.prepared.discard(path)

    def written(self):
        """Paths the runs created or changed, other than directories
        whose only change is their time stamp."""
        found = []
        upper = self.upper()
        for directory, subdirs, files in os.walk(upper):
            inside = "/" + os.path.relpath(directory, upper)
            found += [os.path.join(inside, name) for name in files]
            found += [os.path.join(inside, name) for name in subdirs
                      if "pamsignal" in name]
        return sorted(set(found) - self.prepared)


@pytest.fixture
def debian13(tmp_path):
    """A fresh overlay of the cached Debian 13 tree that looks booted
    with systemd (/run/systemd/system), which is all install.sh asks
    before it downloads."""
    realsys.require_root()
    realsys.require_binaries("unshare", "chroot", "mount")
    tree = realsys.require_package_tree("trixie")
    view = Debian13View(tree, str(tmp_path / "overlay")).start()
    try:
        view.prepare("/run/systemd/system")
        yield view
    finally:
        view.stop()


def curl_pipe_bash(view, dist, *arguments):
    """What `curl -fsSL URL/install.sh | sudo bash -s -- ARGS` runs."""
    with open(os.path.join(dist, "install.sh")) as handle:
        script = handle.read()
    return view.run(["bash", "-s", "--"] + list(arguments), input=script)


@pytest.mark.parametrize("release,reason", [
    ("bad-file", "a downloaded file does not match SHA256SUMS"),
    ("bad-sums", "SHA256SUMS.asc is not a good signature"),
    ("bad-signer", "SHA256SUMS.asc is not a good signature"),
    ("unsigned", "could not download %s/unsigned/latest/SHA256SUMS.asc")])
def test_an_altered_release_installs_nothing(release, reason, debian13, dist,
                                             server):
    result = curl_pipe_bash(debian13, dist, "--base-url",
                            "%s/%s" % (server.url, release))
    assert result.returncode == 1, result.stdout
    assert reason.replace("%s", server.url) in result.stderr
    assert "Nothing was installed" in result.stderr
    assert "(with python3)" in result.stdout  # the tree has no curl, wget
    assert debian13.written() == []


def test_the_unaltered_release_passes_the_same_checks(debian13, dist,
                                                      server):
    """The other half of the refusals: the same tree and script reach the
    install step (which, chrooted, cannot reach systemd)."""
    result = curl_pipe_bash(debian13, dist, "--base-url", server.url)
    assert "signature of SHA256SUMS: good" in result.stdout
    assert "checksums: good (%d files)" % (1 + len(MANPAGES)) in \
        result.stdout
    assert "/usr/bin/pamsignal" in debian13.written()


def test_no_signature_checker_is_refused(debian13, dist, server):
    debian13.whiteout("/usr/bin/sqv")  # as if apt had not pulled it in
    result = curl_pipe_bash(debian13, dist, "--base-url", server.url)
    assert result.returncode == 1
    assert "no OpenPGP verifier here" in result.stderr
    assert "apt-get install sqv or gpgv" in result.stderr
    assert debian13.written() == []


@pytest.mark.parametrize("python,complaint", [
    ("3.5", "python3 is 3.5; PAMSignal needs Python 3.6 or newer"),
    (None, "python3 is not installed; PAMSignal needs Python 3.6 or newer")])
def test_python_older_than_3_6_is_refused(python, complaint, debian13, dist,
                                          server):
    if python is None:
        debian13.whiteout("/usr/bin/python3")
    else:
        debian13.prepare("/usr/local/bin/python3",
                         '#!/bin/sh\ncase "$1" in --version) echo "Python '
                         '%s.10";; *) echo %s;; esac\n' % (python, python))
    del server.requests[:]
    result = curl_pipe_bash(debian13, dist, "--base-url", server.url)
    assert result.returncode == 1
    assert complaint in result.stderr
    assert "apt-get install python3" in result.stderr  # Debian was found
    assert server.requests == []
    assert debian13.written() == []


def test_without_systemd_it_says_what_to_do_instead(debian13, dist,
                                                     server):
    debian13.unprepare("/run/systemd/system")
    del server.requests[:]
    result = curl_pipe_bash(debian13, dist, "--base-url", server.url)
    assert result.returncode == 1
    assert "systemd is not running as PID 1 here" in result.stderr
    assert "--download-only DIR" in result.stderr
    assert "python3 DIR/pamsignal.py run" in result.stderr
    assert server.requests == []
    assert debian13.written() == []


# ---------------------------------------------------------------- booted

SITE_PORT = 8089
SITE_INSIDE = "/root/release-site"


@pytest.fixture(scope="module")
def booted(tmp_path_factory, site):
    """The Debian 13 boot tree under systemd-nspawn (--volatile=overlay,
    --private-network: nothing written to the cached tree, its sshd on
    its own port 22), with the release site served inside on loopback."""
    realsys.require_root()
    realsys.require_binaries("systemd-nspawn", "nsenter")
    tree = realsys.require_boot_tree()
    box = Container(tree, str(
        tmp_path_factory.mktemp("nspawn-install") / "nspawn.log"))
    try:
        box.start()
        for release in ("latest", "v" + PINNED):
            for name in RELEASE_FILES:
                with open(os.path.join(site, release, name)) as handle:
                    text = handle.read()
                inside = "%s/%s/%s" % (SITE_INSIDE, release, name)
                box.run(["mkdir", "-p", os.path.dirname(inside)])
                box.write(inside, text)
        box.run(["systemd-run", "--quiet", "--unit=release-site", "python3",
                 "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                 SITE_INSIDE, str(SITE_PORT)])
        assert wait_for(lambda: box.run(
            ["python3", "-c", "import socket; socket.create_connection("
             "('127.0.0.1', %d))" % SITE_PORT], check=False).returncode == 0)
        yield box
    finally:
        box.stop()


def pipe_install(box, dist, *arguments):
    with open(os.path.join(dist, "install.sh")) as handle:
        script = handle.read()
    # env -i: what sudo leaves of this environment, near enough
    return box.run(["env", "-i"] + ["%s=%s" % pair for pair in
                                    sorted(CHROOT_ENV.items())] +
                   ["bash", "-s", "--", "--base-url",
                    "http://127.0.0.1:%d" % SITE_PORT] + list(arguments),
                   input=script, check=False, timeout=180)


def site_log(box):
    return box.run(["journalctl", "-u", "release-site", "-o", "cat",
                    "--no-pager"]).stdout


def test_curl_pipe_bash_installs_enables_and_starts(booted, dist):
    result = pipe_install(booted, dist)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "installed PAMSignal %s" % VERSION in result.stdout
    for step in ("edit /etc/pamsignal/pamsignal.conf",
                 "pamsignal check-config", "pamsignal test-alert"):
        assert step in result.stdout
    assert "running: systemctl restart pamsignal.service" in result.stdout
    assert booted.show("UnitFileState") == "enabled"
    assert booted.show("ActiveState") == "active"
    # The daily report's units, the timer left off.
    for name, text in pamsignal.REPORT_UNITS.items():
        assert booted.run(["cat", "/etc/systemd/system/" + name]).stdout \
            == text
    assert booted.show("UnitFileState", "pamsignal-report.timer") == \
        "disabled"
    assert "systemctl enable --now pamsignal-report.timer" in result.stdout
    installed = ["/usr/bin/pamsignal"] + [
        "/usr/share/man/man%s/%s" % (name[-1], name) for name in MANPAGES]
    sums = booted.run(["sha256sum"] + installed).stdout.split()
    assert sums[0::2] == [sha256(os.path.join(REPO, name))
                          for name in ["pamsignal.py"] + MANPAGES]
    mode = booted.run(["stat", "-c", "%a %U", "/etc/pamsignal/"
                       "pamsignal.conf"]).stdout.split()
    assert mode == ["600", "root"]
    left = booted.run(["sh", "-c", "ls -d /tmp/pamsignal-install.* "
                       "2>/dev/null || true"]).stdout
    assert left == ""
    assert "GET /latest/pamsignal.py" in site_log(booted)


def test_a_second_run_upgrades_to_a_pinned_version_and_keeps_config(
        booted, dist):
    config = "[channel:console]\ntype = console\nformat = json\n"
    booted.write("/etc/pamsignal/pamsignal.conf", config)
    before = booted.show("MainPID")
    result = pipe_install(booted, dist, "--version", PINNED)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "upgraded PAMSignal %s -> %s; kept /etc/pamsignal/" \
        "pamsignal.conf" % (VERSION, PINNED) in result.stdout
    assert "GET /v%s/pamsignal.py" % PINNED in site_log(booted)
    assert booted.run(["pamsignal", "--version"]).stdout.strip() == \
        "pamsignal " + PINNED
    assert booted.run(["cat", "/etc/pamsignal/pamsignal.conf"]).stdout == \
        config
    assert booted.show("ActiveState") == "active"
    assert booted.show("MainPID") not in (before, "0")  # restarted


def test_a_pin_the_release_does_not_hold_is_refused(booted, dist):
    result = pipe_install(booted, dist, "--version", "0.0.1")
    assert result.returncode == 1
    assert "could not download http://127.0.0.1:%d/v0.0.1/SHA256SUMS" \
        % SITE_PORT in result.stderr
    assert booted.run(["pamsignal", "--version"]).stdout.strip() == \
        "pamsignal " + PINNED


def test_uninstall_then_purge(booted, dist):
    result = pipe_install(booted, dist, "--uninstall")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed /usr/share/man/man8/pamsignal.8" in result.stdout
    assert "kept the configuration" in result.stdout
    for path in ("/usr/bin/pamsignal", "/etc/systemd/system/"
                 "pamsignal.service", "/etc/systemd/system/"
                 "pamsignal-report.service", "/etc/systemd/system/"
                 "pamsignal-report.timer", "/usr/share/man/man8/pamsignal.8"):
        assert booted.run(["test", "-e", path], check=False).returncode == 1
    assert booted.show("ActiveState") == "inactive"
    assert booted.run(["test", "-e", "/etc/pamsignal/pamsignal.conf"],
                      check=False).returncode == 0
    again = pipe_install(booted, dist)
    assert again.returncode == 0, again.stderr
    purged = pipe_install(booted, dist, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert booted.run(["test", "-e", "/etc/pamsignal"],
                      check=False).returncode == 1


# ---------------------------------------------------------------- workflow

WORKFLOW = os.path.join(REPO, ".github", "workflows", "release.yml")


def workflow_steps():
    try:
        import yaml
    except ImportError:
        realsys.unavailable("PyYAML is not installed (tests/check.sh "
                            "installs it)")
    with open(WORKFLOW) as handle:
        workflow = yaml.safe_load(handle)
    # YAML 1.1 reads the key `on` as true
    trigger = workflow.get("on", workflow.get(True))
    (job,) = workflow["jobs"].values()
    return trigger, job, job["steps"]


def test_the_release_workflow_tests_then_signs_then_publishes():
    trigger, job, steps = workflow_steps()
    assert trigger == {"push": {"tags": ["v*"]}}
    assert job["container"]["image"] == "debian:12"
    runs = [step.get("run", "") for step in steps]

    def first(text):
        return next(i for i, run_text in enumerate(runs) if text in run_text)

    assert first("bash tests/check.sh") < first("gpg --batch --quiet "
                                                "--import")
    assert first("--import") < first("make dist") < first("gh release "
                                                          "create")
    (checkout,) = [step for step in steps
                   if step.get("uses", "").startswith("actions/checkout")]
    assert checkout["with"]["persist-credentials"] is False
    # The key and the token reach only the step that needs each.
    for secret, text in (("secrets.RELEASE_GPG_KEY", "--import"),
                         ("github.token", "gh release create")):
        holders = [i for i, step in enumerate(steps) if secret in
                   str(step.get("env", {}))]
        assert holders == [first(text)]
        assert all(secret not in run_text for run_text in runs)


def test_the_release_workflow_scripts_pass_shellcheck(tmp_path):
    realsys.require_binaries("shellcheck")
    _, _, steps = workflow_steps()
    for number, step in enumerate(steps):
        if "run" not in step:
            continue
        # ${{ expressions }} are substituted before the shell sees them
        script = re.sub(r"\$\{\{[^}]*\}\}", "x", step["run"])
        path = tmp_path / ("step%d.sh" % number)
        path.write_text("#!/bin/bash\nset -eo pipefail\n" + script)
        result = run(["shellcheck", str(path)])
        assert result.returncode == 0, (step.get("name"), result.stdout)


def test_a_packaged_install_is_left_to_the_package_manager(debian13, dist,
                                                           server, tmp_path):
    """A .deb owns /usr/bin/pamsignal: install.sh neither overwrites nor
    removes it (its unit in /etc would shadow the package's)."""
    realsys.require_binaries("dpkg-deb")
    package = tmp_path / "package"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN/control").write_text(
        "Package: pamsignal\nVersion: 0.0.1\nArchitecture: all\n"
        "Maintainer: Tests <tests@invalid>\nDescription: stand-in\n")
    (package / "usr/bin").mkdir(parents=True)
    (package / "usr/bin/pamsignal").write_text("#!/bin/sh\necho packaged\n")
    (package / "usr/bin/pamsignal").chmod(0o755)
    built = run(["dpkg-deb", "--root-owner-group", "--build", str(package),
                 str(tmp_path / "pamsignal.deb")])
    assert built.returncode == 0, built.stderr
    with open(str(tmp_path / "pamsignal.deb"), "rb") as handle:
        debian13.prepare("/root/pamsignal.deb", handle.read(), 0o644)
    installed = debian13.run(["dpkg", "-i", "/root/pamsignal.deb"])
    assert installed.returncode == 0, installed.stderr
    for arguments in ((), ("--uninstall",)):
        result = curl_pipe_bash(debian13, dist, "--base-url", server.url,
                                *arguments)
        assert result.returncode == 1
        assert "/usr/bin/pamsignal belongs to an installed package" in \
            result.stderr
    assert debian13.run(["pamsignal"]).stdout == "packaged\n"
    assert not [path for path in debian13.written()
                if path.startswith(("/etc/pamsignal", "/etc/systemd"))]
