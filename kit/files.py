"""Files that are never half-written: atomic writes, writable-folder checks, leftovers of killed writes, and the
lock that keeps a second run out of a folder in use."""
import contextlib
import glob
import os
import socket
import tempfile
import time

from kit.errors import ConfigError

LOCK_NAME = ".lock"
try:
    import fcntl

    def _lock(f):
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
except ImportError:  # Windows
    import msvcrt

    def _lock(f):
        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: readers see the old or the new file,
    never a partial one, even if the process is killed or the disk fills up mid-write."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_writable(folder):
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"--save_folder {folder!r} is not writable ({error.strerror}): choose a folder you can write to."
        ) from None


def remove_leftovers(folder):
    """A write killed midway leaves its hidden `.<name>.<random>.tmp` beside `name` (which is intact): remove them."""
    for stale in glob.glob(os.path.join(glob.escape(folder), ".*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)


@contextlib.contextmanager
def claim_folder(folder):
    """One training run per folder: an exclusive lock on `<folder>/.lock` for the block (the operating system
    drops it when the process ends in any way, even by SIGKILL; the file names its holder for the refusal
    message). Under the lock, the leftovers of writes killed midway are removed: no other run's write is in
    flight. Under torchrun only rank 0 claims the folder."""
    if int(os.environ.get("RANK", 0)) != 0:
        yield
        return
    with open(os.path.join(folder, LOCK_NAME), "a+") as lock_file:
        try:
            _lock(lock_file)
        except OSError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            raise ConfigError(f"--save_folder {folder!r} is in use by another training run ({holder}). Wait for it "
                              "to finish or stop it, or pass another --save_folder.") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        lock_file.flush()
        for place in (folder, os.path.join(folder, "samples")):
            remove_leftovers(place)
        yield  # closing the file drops the lock
