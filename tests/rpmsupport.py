"""Build pamsignal's RPM as `make rpm` does, and give it a real system to
install into, for tests/test_rpm.py and tests/test_repo_rpm.py.

The package is built from a copy of the files the spec names (plus the
Makefile, the spec and its rpmlintrc), so a test may change a source (a
new default configuration) or the version without touching the checkout.

Scriptlets need a shell and systemctl, and the program needs python3: an
empty directory has none of them, so packages are installed into an
overlay of the cached Debian 13 tree (tests/realsys.py trixie-tree), which
has all three, or of the bootable one (boot-tree) to boot it afterwards.
The cached trees are shared and never written: everything lands in the
overlay's upper directory, which the test owns.  Their python3 and
systemd came from dpkg, not rpm, so rpm does not know them: installs use
--nodeps, or (for dnf) a stand-in package that provides them.
"""

import contextlib
import os
import shutil
import tempfile

import realsys
from support import REPO

SPEC = os.path.join(REPO, "pamsignal.spec")
RPMLINTRC = os.path.join(REPO, "pamsignal.rpmlintrc")


#: Commands run as the end-to-end helpers run them: text output captured;
#: check() raises with the output when a command fails.
run = realsys._run
check = realsys._check


def require_rpm_tools(*extra):
    realsys.require_root()
    realsys.require_binaries("make", "rpm", "rpmbuild", *extra)


def spec_sources():
    """The files the spec's SourceN: lines name, as rpm reads them (its
    conditionals decided)."""
    return check(["rpmspec", "-q", "--srpm", "--qf", "[%{SOURCE}\n]",
                  SPEC]).stdout.split()


#: Where in the source tree a SourceN file that is not at the top lives.
SOURCE_DIRS = ("", "contrib/systemd")


def copy_sources(dest):
    """Copy what `make rpm` reads into dest, each file at its place in the
    source tree; the copy's directory."""
    names = spec_sources() + ["Makefile", "pamsignal.spec",
                              "pamsignal.rpmlintrc"]
    os.makedirs(dest)
    for name in names:
        (relative,) = [os.path.join(directory, name) for directory in
                       SOURCE_DIRS if os.path.exists(os.path.join(
                           REPO, directory, name))]
        os.makedirs(os.path.dirname(os.path.join(dest, relative)),
                    exist_ok=True)
        shutil.copy2(os.path.join(REPO, relative),
                     os.path.join(dest, relative))
    return dest


def make_in(source_dir, *args):
    """`make -C source_dir ARGS...`, which must succeed."""
    return check(["make", "--no-print-directory", "-C", source_dir]
                 + list(args), timeout=300)


def build_rpm(workdir, name, version=None, config_text=None, defines=(),
              files=()):
    """Build the package with `make rpm` from a fresh copy of the sources
    in workdir/name; the .rpm's path.  version overrides the spec's (as
    --define pamsignal_version), config_text the default configuration;
    defines are more (macro, body) pairs for rpmbuild, files more (name,
    text) pairs to put beside the sources."""
    source_dir = copy_sources(os.path.join(workdir, name))
    if config_text is not None:
        files = (("pamsignal.conf.example", config_text),) + tuple(files)
    for file_name, text in files:
        with open(os.path.join(source_dir, file_name), "w") as handle:
            handle.write(text)
    if version:
        defines = (("pamsignal_version", version),) + tuple(defines)
    flags = " ".join("--define '%s %s'" % pair for pair in defines)
    make_in(source_dir, "rpm", "RPMBUILD_FLAGS=" + flags)
    return only_rpm(os.path.join(source_dir, "dist"))


def only_rpm(directory):
    """The one pamsignal .rpm in directory."""
    found = [f for f in os.listdir(directory)
             if f.startswith("pamsignal-") and f.endswith(".noarch.rpm")]
    assert len(found) == 1, found
    return os.path.join(directory, found[0])


def query(package, fmt):
    """rpm -qp --qf FMT of a package file."""
    return check(["rpm", "-qp", "--qf", fmt, package]).stdout


def require_debian_tree(tree, needs, builder):
    realsys.require_binaries("mount", "umount", "chroot")
    if not realsys.trixie_tree_complete(tree, needs):
        realsys.unavailable(
            "the cached Debian 13 tree %s is missing (python3 "
            "tests/realsys.py %s builds it)" % (tree, builder))


@contextlib.contextmanager
def debian_overlay(bootable=False):
    """A writable view of the cached Debian 13 tree (bootable: the one with
    systemd as init) with an empty rpm database; yields its root.  The
    cached tree itself stays untouched."""
    if bootable:
        lower = realsys.BOOT_TREE
        require_debian_tree(lower, realsys.BOOT_NEEDS, "boot-tree")
    else:
        lower = realsys.TRIXIE_TREE
        require_debian_tree(lower, realsys.TRIXIE_NEEDS, "trixie-tree")
    base = tempfile.mkdtemp(prefix="pamsignal-rpm-tree-")
    try:
        # On the host: rpm --root and systemd-nspawn -D take a path.
        with realsys.TreeOverlay(lower, base, host_visible=True) as view:
            rpm_in(view.merged, "--initdb")
            yield view.merged
    finally:
        if not os.path.ismount(os.path.join(base, "merged")):
            shutil.rmtree(base)


def rpm_in(root, *args):
    """rpm on the tree at root; CompletedProcess.  The database is rpm's
    default inside the tree (Debian's rpm: ~/.rpmdb), the one dnf uses."""
    return run(["rpm", "--root", root] + list(args))


def read(path):
    with open(path) as handle:
        return handle.read()


def mode(path):
    return os.lstat(path).st_mode & 0o7777
