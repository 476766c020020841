"""Child processes that must not outlive the process that started them."""

import ctypes
import functools
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int) -> None:
    """In the child, before exec: ask Linux to send it signum when its parent dies, however the parent dies."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def start_child(command: list[str], signum: int = signal.SIGTERM, **popen) -> subprocess.Popen:
    """subprocess.Popen(command), sent signum (on Linux) when this process dies."""
    on_linux = sys.platform == "linux"
    return subprocess.Popen(command, preexec_fn=functools.partial(_die_with_parent, signum) if on_linux else None,
                            **popen)
