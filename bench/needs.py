"""What a benchmark needs from the machine: a missing program or module is
named with the Debian or PyPI package that brings it, instead of a
traceback halfway through a run."""
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile


def program(path_or_name, package):
    """Exit with a clear message unless the program exists."""
    found = (os.access(path_or_name, os.X_OK) if os.path.isabs(path_or_name)
             else shutil.which(path_or_name))
    if not found:
        sys.exit("%s is missing: apt-get install -y %s"
                 % (path_or_name, package))


#: Where Debian packages are unpacked once and kept (shared with tests).
UNPACKED = "/var/cache/pamsignal-tests"


def unpacked(name, packages=None):
    """The directory of Debian packages (by default the one called `name`)
    unpacked with `dpkg -x` into UNPACKED/name, never installed (so no
    service of theirs starts): downloaded and unpacked on first use, under
    a lock so that parallel runs unpack them once."""
    packages = list(packages or [name])
    tree = os.path.join(UNPACKED, name)
    program("apt-get", "apt")
    program("dpkg", "dpkg")
    os.makedirs(UNPACKED, exist_ok=True)
    with open(tree + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(os.path.join(tree, "usr")):
            return tree
        work = tempfile.mkdtemp(dir=UNPACKED)
        try:
            os.chmod(work, 0o755)  # apt's sandbox user writes the .deb
            fetched = subprocess.run(
                ["apt-get", "download"] + packages, cwd=work,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                universal_newlines=True, timeout=300)
            debs = sorted(deb for deb in os.listdir(work)
                          if deb.endswith(".deb"))
            if len(debs) != len(packages):
                sys.exit("apt-get download %s failed: %s"
                         % (" ".join(packages), fetched.stdout[-500:]))
            for deb in debs:
                subprocess.run(["dpkg", "-x", deb, "tree"], cwd=work,
                               check=True, timeout=120)
            shutil.rmtree(tree, ignore_errors=True)
            os.rename(os.path.join(work, "tree"), tree)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tree
