"""One training per run folder: an exclusive lock on `<output_dir>/.run.lock`, held for the
run's life and released by the kernel when the process dies (however it dies).

A POSIX record lock (`fcntl.lockf`): it belongs to the process, so forked data workers that
outlive a run do not keep holding it (an `flock` is shared with them), and NFS and Lustre (with
`-o flock`) honour it across nodes. Not the `filelock` package: it uses `flock` and truncates the
file on every attempt, erasing the holder's line (host, PID, since when) that a refused job
prints. The folder's writability is checked here too, before anything is built.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from pipeline.errors import RunFolderInUse, StorageError

LOCK_FILE = ".run.lock"
# A filesystem without flock (Lustre mounted without `-o flock`) answers with one of these.
_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


def check_writable(folder: Path) -> None:
    """Create `folder` and a file in it, or raise a StorageError (exit 4) naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StorageError(
            f"train.output_dir {folder}: cannot write there ({exc.strerror or exc}); "
            "choose another folder or fix its permission or quota"
        ) from exc


def _holder(path: Path) -> str:
    """The holder's line as written by `RunLock.acquire`, for the refused job's message."""
    try:
        held = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(held["since"]))
        job = f", Slurm job {held['job']}" if held.get("job") else ""
        return f"PID {held['pid']} on {held['host']}{job}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


class RunLock:
    """`acquire(folder)` takes the lock or raises RunFolderInUse (exit 2); `release()` frees it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        check_writable(folder)
        path = folder / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides
        except OSError as exc:
            raise StorageError(f"{path}: cannot open the run's lock ({exc.strerror})") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise RunFolderInUse(
                    f"train.output_dir {folder} is in use by another training "
                    f"({_holder(path)}); wait for it to end, or give this one another "
                    "train.output_dir"
                ) from None
            if exc.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            print(
                f"warning: {path}: this filesystem has no file locks ({exc.strerror}); "
                "nothing stops a second training in this folder",
                file=sys.stderr,
                flush=True,
            )
        held = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.time(),
            "job": os.environ.get("SLURM_JOB_ID"),
        }
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(held) + "\n").encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{path}: cannot write the run's lock ({exc.strerror})") from exc
        return cls(path, fd)

    def release(self) -> None:
        """Free the lock (the file stays: removing it would race a job opening it now)."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
