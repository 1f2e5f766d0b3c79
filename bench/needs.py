"""What a benchmark needs from the machine: a missing program or module is
named with the Debian or PyPI package that brings it, instead of a
traceback halfway through a run."""
import os
import shutil
import sys


def program(path_or_name, package):
    """Exit with a clear message unless the program exists."""
    found = (os.access(path_or_name, os.X_OK) if os.path.isabs(path_or_name)
             else shutil.which(path_or_name))
    if not found:
        sys.exit("%s is missing: apt-get install -y %s"
                 % (path_or_name, package))
