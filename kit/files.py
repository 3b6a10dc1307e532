"""Files that are never half-written: atomic writes, writable-folder checks, leftovers of killed writes."""
import contextlib
import glob
import os
import tempfile

from kit.errors import ConfigError


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


def remove_stale_temp_files(folder, name):
    """A write killed midway leaves `.<name>.*.tmp` beside `name`; the file itself is intact."""
    for stale in glob.glob(os.path.join(folder, f".{name}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)
