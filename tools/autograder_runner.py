"""Gradescope grading runner: grades a submitted diffusion.py into results/results.json.

Shipped in autograder.zip as grader.py (tools/make_autograder.py builds the zip) and started by run_autograder:

    python3 grader.py --root /autograder        # reads submission/, writes results/results.json

Principle: no point can be earned by anything the submission's process can see or predict.

  1. Lock-down. The autograder folder (source/: the reference solution, the mutant catalogue, this file) is made
     root-only (0700). The results folder is root's. The submission's diffusion.py is read without following
     symlinks (O_NOFOLLOW, regular files only, at most 1 MB); nothing else of the submission is used.
  2. Plan (trusted, root, trusted_judge.py plan): fresh inputs for every check are drawn from a secret seed
     (secrets module: other T, other seeds each run) and the reference solution's outputs are computed.
  3. Probe (untrusted): probe_worker.py runs as a throwaway unprivileged uid (no passwd entry, no groups, a new
     uid each run, so it shares nothing with any other process, unlike `nobody`) in a fresh folder holding only
     the submission and the public test_diffusion.py, with a scrubbed environment, limits on address space
     (8 GB virtual), processes (512), file size (8 MB) and open files (256), a watchdog on the resident memory
     summed over all its processes (--memory-mb, 640 MB by default), a per-probe timeout (60 s) and a
     wall-clock limit. It gets the probe inputs on stdin and returns plain JSON numbers on a pipe; the grader
     reads at most 8 MB, lines of at most 4 MB, keeps the first answer per probe and ignores anything else.
     Where the machine allows a private mount namespace (root with CAP_SYS_ADMIN), the student's process sees
     only the system folders (/usr, /lib*, /bin, /sbin, /etc, /proc, /sys, /dev), its work folder, its home and
     the interpreter's prefix: every other top-level folder (/tmp, /home, /root, /autograder, /opt, ...) is an
     empty tmpfs, so no world-readable copy of anything elsewhere on the machine is visible either.
     When the probes are done (or a limit is hit) every process of that uid is killed (kill(-1) as that uid, so
     setsid daemons, double forks, threads, finalizers and atexit handlers all end with it). A probe that hangs
     costs only the checks that use it: the worker is restarted for the remaining probes.
  4. Judge (trusted, root, trusted_judge.py judge, after every student process is gone): compares the student's
     numbers with the reference's using the judges of test_diffusion.py (one source of truth with local pytest),
     re-judges failing q_sample / p_sample checks on the student's own schedule buffers (so a schedule bug costs
     only the schedule), adds known-mistake hints (the mutant catalogue run on the same inputs), and the grader
     writes results.json.
     Student data is parsed as JSON only (never unpickled), checked for shape and finiteness.

If the runner is not root, or the unprivileged uid cannot start the interpreter (e.g. it is installed under a
folder only root can read), grading is refused with a results.json that says so: the submission is never run
as root or as the grader's own user (--allow-same-user exists for developers only, and says so in the results).
Whatever happens, results/results.json is written, with a score of 0 and the reason at worst.
Instructors see notes in a hidden test entry: mentions of suspicious names, leftover processes, floods,
malformed protocol lines, limits hit, and the timings.
"""
import argparse
import errno
import json
import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLIC_FILES = ["test_diffusion.py", "grading.py", "probe_worker.py"]  # what the student's process gets next to diffusion.py
MAX_SOURCE = 1 << 20
MAX_PROTOCOL = 8 << 20  # a correct submission sends about 1.5 MB at the largest T
MAX_LINE = 4 << 20
MAX_LOG = 8 << 20
ON_THE_GRADER = "torch, numpy and tqdm"  # what setup.sh installs for the submission (make_autograder.SETUP_SH)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}\Z")
ADDRESS_SPACE = int(os.environ.get("GRADER_ADDRESS_SPACE_MB", "8192")) << 20  # virtual; the watchdog limits resident memory
SUSPICIOUS = {  # shown to instructors only; mentions are not proof of anything
    "test_diffusion": r"test_diffusion", "pytest": r"\bpytest\b", "grader files": r"grading_|grader\.py|probe_worker|trusted_judge|manifest\.json",
    "sys.modules": r"sys\.modules", "gc": r"\bgc\b", "_getframe": r"_getframe", "inspect": r"\binspect\b",
    "/proc": r"/proc", "results.json": r"results\.json", "os.environ": r"os\.environ", "builtins": r"\bbuiltins\b",
    "ctypes": r"\bctypes\b", "os._exit": r"os\._exit", "subprocess": r"\bsubprocess\b", "fork": r"\bfork\b|setsid",
    "sys.settrace": r"sys\.settrace", "atexit": r"\batexit\b", "os.write": r"os\.write", "threading": r"\bthreading\b",
    "__torch_function__": r"__torch_function__", "allclose": r"allclose", "socket": r"\bsocket\b",
}


# ------------------------------------------------------------------ reading the submission safely
def find_submission(folder):
    found = []
    for parent, dirs, files in os.walk(folder):  # does not follow symlinked folders
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__MACOSX")[:50]
        if parent.count(os.sep) - folder.count(os.sep) > 6:
            dirs[:] = []
        if "diffusion.py" in files:
            found.append(os.path.join(parent, "diffusion.py"))
    found.sort(key=lambda p: (p.count(os.sep), p))
    return found[0] if found else None


def listing(folder, limit=20):
    names = []
    for parent, _, files in os.walk(folder):
        names += [os.path.relpath(os.path.join(parent, f), folder) for f in files[:200]]
        if len(names) > 1000:
            break
    names.sort()
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "") if names else "(nothing)"


def read_source(path):
    """The submitted file's bytes: a regular file (no symlink, no device, no fifo) of at most 1 MB."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("diffusion.py is a symbolic link; upload the file itself") from None
        raise ValueError(f"diffusion.py could not be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("diffusion.py is not a regular file; upload the file itself")
        if info.st_size > MAX_SOURCE:
            raise ValueError(f"diffusion.py is {info.st_size} bytes; the limit is {MAX_SOURCE} bytes")
        chunks, size = [], 0
        while size <= MAX_SOURCE:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_SOURCE:
            raise ValueError(f"diffusion.py is larger than {MAX_SOURCE} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ the throwaway uid
def pick_uid():
    import pwd
    import random

    used = {p.pw_uid for p in pwd.getpwall()}
    for _ in range(1000):
        uid = random.SystemRandom().randrange(1_100_000, 1_900_000)
        if uid not in used and not processes_of(uid):
            return uid
    raise RuntimeError("no free uid")


def processes_of(uid):
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                        break  # a zombie holds nothing; its parent (or init) reaps it
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid or int(line.split()[2]) == uid:
                            pids.append(int(name))
                        break
        except (OSError, ValueError, IndexError):
            continue
    return pids


def rss_of(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


def kill_uid(uid):
    """SIGKILL every process of `uid` (kill(-1) from a child running as that uid); returns how many were alive."""
    alive = len(processes_of(uid))
    for _ in range(20):
        pid = os.fork()
        if pid == 0:  # child: become the uid, then signal everything it owns until nothing is left
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                for _ in range(1000):
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:
                        break
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        if not processes_of(uid):
            break
        time.sleep(0.05)
    return alive


# top-level folders the student's process keeps seeing (system files); every other one is hidden behind an empty
# tmpfs in a private mount namespace, except the folders it needs (work folder, home, the interpreter's prefix)
SYSTEM_DIRS = {"usr", "lib", "lib32", "lib64", "libx32", "bin", "sbin", "etc", "proc", "sys", "dev"}
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes

        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


def _mount(source, target, fstype, flags, data=None):
    import ctypes

    if _libc().mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                     data and data.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def hide_filesystem(visible, home=None, uid=None):
    """In a new mount namespace: empty tmpfs over every non-system top-level folder (and /dev/shm), with the
    `visible` folders bound back at their own paths. Runs in the child, as root, before dropping to the uid."""
    import ctypes

    MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 2, 4, 4096, 8192, 16384, 1 << 18
    if _libc().unshare(0x00020000) != 0:  # CLONE_NEWNS
        raise OSError(ctypes.get_errno(), "unshare")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    os.umask(0o022)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=700")  # staging
    staged = []
    for k, path in enumerate(visible):
        if path.split("/")[1] in SYSTEM_DIRS:
            continue
        stage = f"/dev/shm/{k}"
        os.mkdir(stage)
        _mount(path, stage, None, MS_BIND | MS_REC)
        staged.append((stage, path))
    for name in os.listdir("/"):
        path = "/" + name
        if name in SYSTEM_DIRS or os.path.islink(path):
            continue
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        elif os.path.isfile(path):  # e.g. a container's info file
            _mount("/dev/null", path, None, MS_BIND)
    for stage, path in staged:
        os.makedirs(path, exist_ok=True)
        _mount(stage, path, None, MS_MOVE)
    _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")
    if home is not None and uid is not None:  # the only writable place: 64 MB, so the disk cannot be filled
        _mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, f"size=64m,mode=700,uid={uid},gid={uid}")


def make_sandbox(address_space, uid, visible, home=None):
    """preexec_fn of the student's process: limits, the hidden file system (if given), then the unprivileged uid."""
    if visible is not None:
        _libc()  # loaded before the fork

    def sandbox():
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_NPROC, (512, 512))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_LOG, MAX_LOG))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        if visible is not None:
            hide_filesystem(visible, home, uid)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.umask(0o077)

    return sandbox


def can_hide_filesystem():
    """Whether this machine lets root make a private mount namespace (Docker without CAP_SYS_ADMIN does not)."""
    if not sys.platform.startswith("linux"):
        return False
    pid = os.fork()
    if pid == 0:
        try:
            hide_filesystem([])
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


# ------------------------------------------------------------------ running the probes
class Worker:
    """One probe_worker.py process as `uid`; yields protocol records with bounded reads."""

    def __init__(self, python, work, uid, requests, env, memory, visible=None):
        self.log = open(os.path.join(os.path.dirname(work), "worker.log"), "ab")
        if os.geteuid() == 0:
            os.chown(self.log.name, 0, 0)
        self.proc = subprocess.Popen([python, "-I", "probe_worker.py"], cwd=work, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, start_new_session=True,
                                     preexec_fn=make_sandbox(ADDRESS_SPACE, uid, visible, env.get("HOME")))
        try:
            self.proc.stdin.write(json.dumps(requests).encode())
            self.proc.stdin.close()
        except OSError:
            pass
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.total = 0
        self.eof = False

    def read(self, timeout):
        """Complete lines available within `timeout` seconds (may be none); sets eof at the end."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        lines = []
        if not ready:
            return lines
        while True:
            try:
                chunk = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                self.eof = True
                break
            self.total += len(chunk)
            if self.total > MAX_PROTOCOL:
                raise OverflowError(f"more than {MAX_PROTOCOL >> 20} MB of output")
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE and b"\n" not in self.buffer:
                raise OverflowError(f"a line longer than {MAX_LINE >> 20} MB")
            if len(chunk) < (1 << 20):
                break
        *complete, self.buffer = self.buffer.split(b"\n")
        lines += complete
        return lines

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


def parse(line):
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


REFUSED = ("REFUSED: the grader could not start Python as an unprivileged user, so your code was not run (it is "
           "never run as root). This is a problem of the autograder's setup, not of your submission: please tell the "
           "course staff.")


def run_probes(python, work, uid, requests, *, time_limit, probe_timeout, memory, env, notes, visible=None):
    """{index: output}, {index: why it has none}, a general message (import error / refusal) or ''."""
    outputs, missing, general = {}, {}, ""
    pending = list(range(len(requests)))
    deadline = time.time() + time_limit
    restarts = 0
    while pending and not general:
        try:
            worker = Worker(python, work, uid, [[i, requests[i]] for i in pending], env, memory, visible)
        except subprocess.SubprocessError as exc:  # the sandbox could not be set up (e.g. no mount namespace)
            if visible is None:
                raise
            notes["file system"] = f"hiding the file system failed ({exc}); ran without it"
            visible = None
            continue
        except OSError as exc:  # the unprivileged uid cannot execute the interpreter
            general = REFUSED + f" (starting {python} as an unprivileged user failed: {exc.strerror})"
            notes["refused"] = f"the worker could not be started: {exc}"
            break
        peak, ready, imported, last = 0, False, False, time.time()
        stop_reason = None
        try:
            while True:
                now = time.time()
                if now > deadline:
                    stop_reason = "time"
                    break
                limit = 120.0 if not ready else probe_timeout  # importing torch is not the submission's time
                if now - last > limit:
                    stop_reason = "probe_timeout" if ready else "start_timeout"
                    break
                lines = worker.read(0.25)
                pids = processes_of(uid) if uid is not None else [worker.proc.pid]
                rss = rss_of(pids)
                peak = max(peak, rss)
                if rss > memory:
                    stop_reason = "memory"
                    break
                for line in lines:
                    record = parse(line)
                    if record is None:
                        notes["malformed protocol lines"] = notes.get("malformed protocol lines", 0) + 1
                        continue
                    if record.get("ready") is True:
                        ready, last = True, time.time()
                    elif record.get("imported") is True and ready:
                        imported, last = True, time.time()
                        names = record.get("stand_ins")
                        if isinstance(names, list) and names:  # identifiers only: the worker is not trusted
                            notes["stand-ins"] = [n for n in names if isinstance(n, str) and IDENTIFIER.match(n)][:12]
                    elif "import_error" in record and ready and not imported:
                        general = "Your diffusion.py could not be imported:\n" + str(record["import_error"])[-2500:]
                        if "ModuleNotFoundError" in general:
                            general += (f"\nThe grader has {ON_THE_GRADER}, and stand-ins for the course's other "
                                        "packages and files: diffusion.py must not need any other module.")
                    elif isinstance(record.get("i"), int) and record["i"] in pending and "out" in record:
                        outputs[record["i"]] = record["out"]
                        pending.remove(record["i"])
                        last = time.time()
                    elif record.get("done") is True:
                        pass
                    else:
                        notes["unexpected protocol lines"] = notes.get("unexpected protocol lines", 0) + 1
                if general or not pending or worker.eof:
                    break
        except OverflowError as exc:
            stop_reason = "flood"
            notes["flood"] = f"the submission's process wrote {exc}; it was stopped"
        worker.stop()
        if stop_reason:
            notes.setdefault("probes stopped", []).append(stop_reason)
        if uid is not None:
            left = kill_uid(uid)
            if left:
                notes["leftover processes"] = notes.get("leftover processes", 0) + left
        notes["peak RSS of the student's processes (MB)"] = max(notes.get("peak RSS of the student's processes (MB)", 0),
                                                                 round(peak / 2 ** 20))
        if not ready and visible is not None:  # perhaps the interpreter needs a folder the hiding left out
            notes["file system"] = "the interpreter did not start with the file system hidden; ran without hiding"
            visible = None
            continue
        if not ready:
            general = REFUSED + (" (the interpreter did not start within 120 s)" if stop_reason == "start_timeout" else "")
            notes["refused"] = f"worker exit code {worker.proc.returncode}; see the worker log tail"
            break
        if general or not pending:
            break
        if not imported:
            general = ("Your diffusion.py could not be imported: " + (
                f"importing it took longer than {probe_timeout:.0f} s" if stop_reason == "probe_timeout" else
                f"importing it used more than {memory // 2 ** 20} MB of memory" if stop_reason == "memory" else
                f"the whole run reached the time limit of {time_limit:.0f} s" if stop_reason == "time" else
                f"it wrote more output than the grader reads ({MAX_PROTOCOL >> 20} MB)" if stop_reason == "flood" else
                f"the process ended while importing it (exit code {worker.proc.returncode}: a crash, exit() or os._exit?)"))
            break
        first = pending[0]
        reason = {"time": f"the whole run reached the time limit of {time_limit:.0f} s",
                  "probe_timeout": f"it ran longer than {probe_timeout:.0f} s (an infinite loop, or very slow code?)",
                  "memory": f"your code's processes used more than {memory // 2 ** 20} MB of memory",
                  "flood": f"your code wrote more output than the grader reads ({MAX_PROTOCOL >> 20} MB)"}.get(
            stop_reason, f"the process ended early (exit code {worker.proc.returncode}: a crash or os._exit?)")
        if stop_reason in ("time", "flood"):
            for i in pending:
                missing[i] = f"Not run: {reason}."
            break
        missing[first] = f"This check's probe stopped: {reason}."
        pending.remove(first)
        restarts += 1  # bounded: each restart drops one probe; the time limit bounds the rest
    return outputs, missing, general


# ------------------------------------------------------------------ trusted side
def trusted(python, command, payload, timeout, tmp):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if os.environ.get("GRADER_FIXED_SEED"):
        env["GRADER_FIXED_SEED"] = os.environ["GRADER_FIXED_SEED"]
    proc = subprocess.run([python, "-I", os.path.join(HERE, "trusted_judge.py"), command],
                          input=json.dumps(payload).encode() if payload is not None else b"", capture_output=True,
                          timeout=timeout, cwd=HERE, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"trusted_judge.py {command} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return json.loads(proc.stdout)


def lock_down(root):
    """The autograder's own files: readable by root only. The results folder: writable by root only."""
    os.chmod(HERE, 0o700)
    results = os.path.join(root, "results")
    os.makedirs(results, exist_ok=True)
    os.chown(results, 0, 0)
    os.chmod(results, 0o755)


def work_parent():
    """A folder the unprivileged uid can traverse (0711) for the per-run work folder."""
    for base in (tempfile.gettempdir(), "/tmp", "/var/tmp", "/dev/shm"):
        try:
            path = tempfile.mkdtemp(prefix="grade-", dir=base)
        except OSError:
            continue
        os.chmod(path, 0o711)
        ok = all(os.stat(p).st_mode & 0o001 for p in _ancestors(path))
        if ok:
            return path
        shutil.rmtree(path, ignore_errors=True)
    return tempfile.mkdtemp(prefix="grade-")


def _ancestors(path):
    out, p = [], os.path.abspath(path)
    while True:
        out.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            return out
        p = parent


def grade(root, python=sys.executable, time_limit=480.0, probe_timeout=60.0, memory_mb=640, allow_same_user=False):
    started = time.time()
    with open(os.path.join(HERE, "manifest.json")) as f:
        manifest = json.load(f)
    results_path = os.path.join(root, "results", "results.json")
    os.makedirs(os.path.dirname(results_path), exist_ok=True)
    if os.path.lexists(results_path):
        os.remove(results_path)
    submission_dir = os.path.join(root, "submission")
    verdicts, general, notice, hidden, notes = {}, "", "", [], {}
    is_root = os.name == "posix" and os.geteuid() == 0
    if is_root:
        lock_down(root)
    submitted = find_submission(submission_dir) if os.path.isdir(submission_dir) else None
    source = None
    if submitted is None:
        general = ("No diffusion.py found in your submission (found: " + listing(submission_dir) + "). "
                   "Upload your diffusion.py (the file itself, or a zip containing it).")
    else:
        try:
            source = read_source(submitted)
            compile(source, "diffusion.py", "exec")
        except ValueError as exc:
            general, source = f"{exc}. Nothing could be run.", None
        except SyntaxError as exc:
            general = (f"diffusion.py has a syntax error at line {exc.lineno}: {exc.msg}"
                       + (f"\n    {exc.text.rstrip()}" if exc.text else "") + "\nNothing could be run.")
            source = None
        except (RecursionError, MemoryError, OverflowError) as exc:
            general, source = f"diffusion.py could not be compiled ({type(exc).__name__}). Nothing could be run.", None
    if source is not None and not is_root and not allow_same_user:
        general, source = ("REFUSED: the grader is not running as root, so it cannot run your code as a separate "
                           "unprivileged user; your code was not run. Please tell the course staff."), None
        hidden.append("refused: not root (use --allow-same-user only for local development)")
    if source is not None:
        text = source.decode("utf-8", errors="replace")
        flagged = sorted(label for label, pattern in SUSPICIOUS.items() if re.search(pattern, text))
        if flagged:
            hidden.append("submission mentions: " + ", ".join(flagged))
        parent = work_parent()
        trusted_tmp = tempfile.mkdtemp(prefix="trusted-")
        os.chmod(trusted_tmp, 0o700)
        try:
            plan = trusted(python, "plan", None, 300, trusted_tmp)
            hidden.append(f"plan: T = {plan['params']['T']} ({time.time() - started:.1f} s)")
            if os.environ.get("GRADER_FIXED_SEED"):
                hidden.append("WARNING: GRADER_FIXED_SEED is set: the inputs were not secret (for tests only)")
            keys = sorted(plan["requests"], key=lambda k: (plan["requests"][k]["probe"] == "schedule", k))
            requests = [plan["requests"][k] for k in keys]
            work = os.path.join(parent, "work")
            home = os.path.join(parent, "home")
            os.makedirs(work)
            os.makedirs(home)
            for name in PUBLIC_FILES:
                shutil.copy(os.path.join(HERE, name), work)
            with open(os.path.join(work, "diffusion.py"), "wb") as f:
                f.write(source)
            for folder, _, files in os.walk(work):
                os.chmod(folder, 0o755)
                for name in files:
                    os.chmod(os.path.join(folder, name), 0o644)
            uid, visible = None, None
            if is_root:
                if can_hide_filesystem():
                    prefixes = {os.path.dirname(os.path.dirname(os.path.abspath(python))),
                                os.path.dirname(os.path.dirname(os.path.realpath(python)))}
                    visible = sorted({work, home} | {p for p in prefixes if p != "/"})
                    hidden.append("file system: only system folders, the work folder and the interpreter are visible "
                                  "to the student's process (private mount namespace)")
                else:
                    hidden.append("file system: no mount namespace available; the student's process sees every "
                                  "world-readable file (the reference is still root-only)")
                uid = pick_uid()
                os.chown(home, uid, uid)
                os.chmod(home, 0o700)
                hidden.append(f"student process ran as uid {uid} (throwaway, unprivileged)")
            else:
                hidden.append("WARNING: --allow-same-user: the student's process ran as the grader's own user "
                              "(development only; it could read the reference)")
            env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
                   "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
            probe_start = time.time()
            outputs, missing, general = run_probes(python, work, uid, requests, time_limit=time_limit,
                                                   probe_timeout=probe_timeout, memory=memory_mb << 20, env=env,
                                                   notes=notes, visible=visible)
            hidden.append(f"probes: {len(outputs)} of {len(requests)} answered in {time.time() - probe_start:.1f} s")
            log_path = os.path.join(parent, "worker.log")
            if os.path.exists(log_path):
                with open(log_path, "rb") as f:
                    f.seek(max(0, os.path.getsize(log_path) - 3000))
                    hidden.append("student process output (tail):\n" + f.read().decode(errors="replace"))
            stand_ins = notes.pop("stand-ins", None)
            if stand_ins:
                notice = (f"Note: your diffusion.py imports {', '.join(stand_ins)}, which the grader does not have "
                          f"(it has {ON_THE_GRADER}). Each was replaced by a stand-in that does nothing; the "
                          "graded functions must not need them.")
                hidden.append(notice)
            if not general:
                payload = {"params": plan["params"], "per_check": plan["per_check"], "reference": plan["reference"],
                           "student": {keys[i]: out for i, out in outputs.items()},
                           "missing": {keys[i]: why for i, why in missing.items()}}
                judged = trusted(python, "judge", payload, 600, trusted_tmp)
                verdicts = judged["results"]
                hidden += judged.get("notes", [])
        finally:
            shutil.rmtree(parent, ignore_errors=True)
            shutil.rmtree(trusted_tmp, ignore_errors=True)
    for key, value in notes.items():
        hidden.append(f"{key}: {value}")
    tests, total = [], 0.0
    for test in manifest["tests"]:
        passed, output = verdicts.get(test["id"], (False, general or "This check was not judged."))
        score = test["max_score"] if passed is True else 0.0
        total += score
        tests.append({"name": f"{test['function']}: {test['id']}", "score": round(score, 4),
                      "max_score": round(test["max_score"], 4), "output": str(output)[:6000] or "passed",
                      "visibility": "visible"})
    hidden.append(f"grading took {time.time() - started:.1f} s")
    tests.append({"name": "grader notes (instructors only)", "score": 0, "max_score": 0,
                  "output": "\n".join(hidden) or "-", "visibility": "hidden"})
    summary = "\n".join(f"{function}: {sum(t['score'] for t in tests if t['name'].startswith(function + ':')):.2f} / {points}"
                        for function, points in manifest["points"].items())
    result = {"score": round(total, 4), "output": "".join(text + "\n\n" for text in (general, notice) if text) + summary,
              "visibility": "visible", "stdout_visibility": "hidden", "tests": tests}
    write_results(results_path, result)
    return result


def write_results(path, result):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.environ.get("AUTOGRADER_ROOT", "/autograder"))
    parser.add_argument("--python", default=sys.executable, help="interpreter for the trusted and the student's processes")
    parser.add_argument("--time-limit", type=float, default=float(os.environ.get("GRADER_TIME_LIMIT", "480")))
    parser.add_argument("--probe-timeout", type=float, default=float(os.environ.get("GRADER_PROBE_TIMEOUT", "60")))
    parser.add_argument("--memory-mb", type=int, default=int(os.environ.get("GRADER_MEMORY_MB", "640")),
                        help="resident memory of all the student's processes together (watchdog)")
    parser.add_argument("--allow-same-user", action="store_true", default=os.environ.get("GRADER_ALLOW_SAME_USER") == "1",
                        help="developers only: run the submission as this user when not root (no isolation)")
    args = parser.parse_args(argv)
    try:
        result = grade(args.root, args.python, args.time_limit, args.probe_timeout, args.memory_mb, args.allow_same_user)
    except Exception as exc:  # noqa: BLE001 - never leave Gradescope without a results file
        import traceback

        traceback.print_exc()
        result = {"score": 0, "output": f"The grader itself failed ({type(exc).__name__}: {str(exc)[:500]}); please tell "
                                        "the course staff. Your submission was not graded.", "tests": [],
                  "stdout_visibility": "hidden"}
        write_results(os.path.join(args.root, "results", "results.json"), result)
        return 1
    print(f"score {result['score']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
