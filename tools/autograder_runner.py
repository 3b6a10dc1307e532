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
     (8 GB virtual), processes (512), file size (8 MB) and open files (256), first in line for the OOM killer,
     a per-probe timeout (60 s) and a share of the run's deadline. It gets the probe inputs on stdin and returns
     plain JSON numbers on a pipe; the grader reads at most 8 MB for the whole run (restarts included), lines of
     at most 4 MB, keeps the first answer per probe as text and ignores anything else.
     Containment (Sandbox.decide), decided once before any student code runs and never relaxed afterwards: a
     cgroup below the runner's own (v2: cgroup.kill, memory.max, pids.max; v1: memory, pids and freezer
     hierarchies), and private mount, IPC, network and PID namespaces, each where root may make it. The memory
     limit is the interpreter's own use after `import torch`, measured in the first worker before it may import
     the submission (it waits for "go"), plus --memory-mb (400 MB by default), counted by the cgroup where there
     is one (tmpfs, SysV shared memory and every thread included; the kernel enforces it), else as the resident
     memory of every process of the uid read through any live thread (a zombie leader's threads count).
     With the mount namespace, the student's process sees only the system folders (/usr, /lib*, /bin, /sbin,
     /etc, /proc, /sys, /dev), its work folder, its home and the interpreter's prefix: every other top-level
     folder (/tmp, /home, /root, /autograder, /opt, ...) is an empty tmpfs.
     When a worker stops (probes done, a limit hit, a crash) every student process is killed from root, never
     as the student's uid (which its processes could signal): cgroup.kill, or a frozen cgroup, then SIGKILL by
     pidfd to every process of the uid until none is left. A probe that hangs or crashes costs only the checks
     that use it: the worker is restarted in the same sandbox for the remaining probes; a restarted worker that
     does not start makes the rest "not run". After the last worker, what the uid left in the machine's IPC
     (SysV objects) and shared folders (/tmp, /var/tmp, /dev/shm, ...) is removed, and the notes say so.
  One deadline for the whole run (--total-limit, 540 s: Gradescope stops at 600): the probes end early enough
  for the judge, whose known-mistake hints get a share of what is left; results.json is always written in time.
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
Instructors see notes in a hidden test entry: mentions of suspicious names, the containment the run had (what
is and is not contained on this machine), processes besides the worker, what was removed after grading, floods,
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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLIC_FILES = ["test_diffusion.py", "grading.py", "probe_worker.py"]  # what the student's process gets next to diffusion.py
MAX_SOURCE = 1 << 20
MAX_PROTOCOL = 8 << 20  # a correct submission sends about 1.5 MB at the largest T
MAX_LINE = 4 << 20
MAX_LOG = 8 << 20
ON_THE_GRADER = "torch, numpy and tqdm"  # what setup.sh installs for the submission (make_autograder.SETUP_SH)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}\Z")
TOTAL_S = 540.0  # Gradescope stops an autograder at 10 minutes: results.json is written by 9 at the latest
MARGIN_MB = 400  # what the student's code may use on top of its interpreter after `import torch`
HINT_BUDGET_S = float(os.environ.get("GRADER_HINT_BUDGET", "30"))  # the known-mistake hints' share of judging
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


# ------------------------------------------------------------------ the throwaway uid: finding, measuring, killing
def pick_uid():
    import pwd
    import random

    used = {p.pw_uid for p in pwd.getpwall()}
    for _ in range(1000):
        uid = random.SystemRandom().randrange(1_100_000, 1_900_000)
        if uid not in used and not processes_of(uid):
            return uid
    raise RuntimeError("no free uid")


def _status(path):
    """(state, {real uid, effective uid}) from a /proc status file."""
    state, uids = None, None
    with open(path) as f:
        for line in f:
            if line.startswith("State:"):
                state = line.split()[1]
            elif line.startswith("Uid:"):
                uids = {int(line.split()[1]), int(line.split()[2])}
                break
    return state, uids


def _alive_of(pid, uid):
    """Whether process `pid` belongs to `uid` and has a running thread. A zombie leader whose other threads still
    run reads State: Z, yet its threads (and their memory) are alive: the threads decide, not the leader."""
    try:
        state, uids = _status(f"/proc/{pid}/status")
        if uids is None or uid not in uids:
            return False
        if state not in ("Z", "X"):
            return True
        return any(_status(f"/proc/{pid}/task/{tid}/status")[0] not in ("Z", "X")
                   for tid in os.listdir(f"/proc/{pid}/task") if tid != str(pid))
    except (OSError, ValueError, IndexError):
        return False


def processes_of(uid):
    """Every process of `uid` with a live thread (real or effective uid)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and _alive_of(name, uid)]


def rss_of(pids):
    """Resident memory of `pids` summed; a process's memory is read through any live thread (a zombie leader's
    own statm reads zero while its threads hold the memory)."""
    total = 0
    for pid in pids:
        best = 0
        for path in [f"/proc/{pid}/statm"] + [f"/proc/{pid}/task/{tid}/statm" for tid in _tasks(pid)]:
            try:
                with open(path) as f:
                    best = max(best, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            except (OSError, ValueError, IndexError):
                continue
            if best:
                break
        total += best
    return total


def _tasks(pid):
    try:
        return os.listdir(f"/proc/{pid}/task")[:64]
    except OSError:
        return []


def signal_all(pids, owned):
    """SIGKILL each of `pids` from root through a pidfd, after checking owned(pid) again (a recycled pid is never
    hit); the pids signalled."""
    hit = set()
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            continue
        try:
            if owned(pid):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                hit.add(pid)
        except OSError:
            pass
        finally:
            os.close(fd)
    return hit


def kill_all(find, owned, deadline):
    """SIGKILL, from root, every process find() lists until none is left or the deadline passes; the pids
    killed. Never as the student's uid: its processes could signal, stop or trace such a killer."""
    killed = set()
    while True:
        pids = find()
        if not pids or time.time() > deadline:
            return killed
        killed |= signal_all(pids, owned)
        time.sleep(0.02)


def namespace_init_of(pid):
    """The child of `pid` that is the init of a PID namespace (the worker goes on as it), as a set."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return set()
    found = set()
    for child in children:
        try:
            with open(f"/proc/{child}/status") as f:
                nspid = next((line.split()[1:] for line in f if line.startswith("NSpid:")), [])
        except OSError:
            continue
        if len(nspid) > 1 and nspid[-1] == "1":
            found.add(child)
    return found


def wait_until(condition, deadline, step=0.02):
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(step)
    return True


# ------------------------------------------------------------------ cgroups (v2, or v1 hierarchies)
def _cgroup_homes():
    """{"v2": dir} and/or {"memory"/"pids"/"freezer": dir}: this process's own cgroup in each mounted hierarchy."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in (controllers.split(",") if controllers else ["v2"]):
                own[name.replace("name=", "")] = path
    homes = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            root, point = left.split()[3:5]
            fstype, _, options = right.split()[:3]
            names = ["v2"] if fstype == "cgroup2" else [o for o in options.split(",") if o in ("memory", "pids", "freezer")] \
                if fstype == "cgroup" else []
            for name in names:
                path = own.get(name)
                if path is None or not (path + "/").startswith(root.rstrip("/") + "/") or name in homes:
                    continue
                homes[name] = os.path.join(point, path[len(root.rstrip("/")):].lstrip("/"))
    return homes


def _own_v2_is_namespace_root():
    with open("/proc/self/cgroup") as f:
        return any(line.strip() == "0::/" for line in f)


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def _read(path):
    with open(path) as f:
        return f.read()


class Cgroup:
    """One grading's cgroup, below the runner's own: with cgroup v2 one folder (cgroup.kill, memory.max,
    pids.max, where this kernel and the delegation allow), else one folder in each v1 hierarchy (memory, pids,
    freezer). Every student process is born inside (the worker joins before dropping root) and cannot leave."""

    def __init__(self, name):
        self.dirs = {}  # role ("kill", "freezer", "memory", "pids") -> (folder, cgroup version)
        self.made = []
        homes = _cgroup_homes()
        if "v2" in homes:
            self._make_v2(homes["v2"], name)
        for role in ("memory", "pids", "freezer"):  # what v2 does not provide, from the v1 hierarchies
            if role in homes and role not in self.dirs:
                folder = self._mkdir(homes[role], name)
                if folder:
                    self.dirs[role] = (folder, 1)

    def _mkdir(self, home, name):
        folder = os.path.join(home, name)
        try:
            os.mkdir(folder)
        except OSError:
            return None
        self.made.append(folder)
        return folder

    def _make_v2(self, home, name):
        control = os.path.join(home, "cgroup.subtree_control")
        try:  # memory and pids for the children, if they must be enabled first
            wanted = {"memory", "pids"} & set(_read(os.path.join(home, "cgroup.controllers")).split())
            missing = wanted - set(_read(control).split())
            if missing:
                try:
                    _write(control, " ".join("+" + c for c in sorted(missing)))
                except OSError as exc:
                    # a container's root cgroup holds its processes, which forbids controllers for children
                    # ("no internal processes"): move them into a leaf of their own, as systemd in Docker does
                    if exc.errno != errno.EBUSY or not _own_v2_is_namespace_root():
                        raise
                    leaf = os.path.join(home, "grader-leaf")
                    os.makedirs(leaf, exist_ok=True)
                    for pid in _read(os.path.join(home, "cgroup.procs")).split():
                        try:
                            _write(os.path.join(leaf, "cgroup.procs"), pid)
                        except OSError:
                            pass
                    _write(control, " ".join("+" + c for c in sorted(missing)))
        except OSError:
            pass  # the group is still made: cgroup.kill alone is worth it
        folder = self._mkdir(home, name)
        if folder is None:
            return
        for role, probe in (("kill", "cgroup.kill"), ("freezer", "cgroup.freeze"), ("memory", "memory.max"),
                            ("pids", "pids.max")):
            if os.path.exists(os.path.join(folder, probe)):
                self.dirs[role] = (folder, 2)

    def join_files(self):
        """cgroup.procs of every folder (opened by the preexec function before it drops root)."""
        return [os.path.join(folder, "cgroup.procs") for folder in {f for f, _ in self.dirs.values()}]

    def set_limits(self, memory=None, pids=None):
        if memory is not None and "memory" in self.dirs:
            folder, version = self.dirs["memory"]
            if version == 2:
                _write(os.path.join(folder, "memory.max"), str(memory))
                if os.path.exists(os.path.join(folder, "memory.swap.max")):
                    _write(os.path.join(folder, "memory.swap.max"), "0")
            else:
                _write(os.path.join(folder, "memory.limit_in_bytes"), str(memory))
                if os.path.exists(os.path.join(folder, "memory.memsw.limit_in_bytes")):
                    _write(os.path.join(folder, "memory.memsw.limit_in_bytes"), str(memory))
        if pids is not None and "pids" in self.dirs:
            _write(os.path.join(self.dirs["pids"][0], "pids.max"), str(pids))

    def memory(self):
        """Bytes charged to the group now (anonymous memory, tmpfs and SysV shared memory included), or None."""
        if "memory" not in self.dirs:
            return None
        folder, version = self.dirs["memory"]
        try:
            return int(_read(os.path.join(folder, "memory.current" if version == 2 else "memory.usage_in_bytes")))
        except (OSError, ValueError):
            return None

    def limit_hits(self):
        """How often the group reached its hard memory limit or had a process killed there (the kernel acts
        between two of the watchdog's readings): any new one counts as over the limit."""
        if "memory" not in self.dirs:
            return 0
        folder, version = self.dirs["memory"]
        try:
            if version == 1:  # failcnt stays 0 on some kernels; the OOM kills are always counted
                counts = [os.path.join(folder, name) for name in ("memory.failcnt", "memory.memsw.failcnt")]
                kills = re.findall(r"^oom_kill (\d+)", _read(os.path.join(folder, "memory.oom_control")), re.M)
                return sum(int(_read(path)) for path in counts if os.path.exists(path)) + sum(map(int, kills))
            events = _read(os.path.join(folder, "memory.events"))
            return sum(int(n) for n in re.findall(r"^(?:max|oom_kill) (\d+)", events, re.M))
        except (OSError, ValueError):
            return 0

    def members(self):
        pids = set()
        for folder, _ in self.dirs.values():
            try:
                pids |= {int(p) for p in _read(os.path.join(folder, "cgroup.procs")).split()}
            except (OSError, ValueError):
                continue
        return sorted(pids)

    def kill(self, deadline):
        """Every process in the group: cgroup.kill (v2), or frozen, killed and thawed, or killed by pid."""
        if "kill" in self.dirs:
            _write(os.path.join(self.dirs["kill"][0], "cgroup.kill"), "1")
            wait_until(lambda: not self.members(), deadline)
            return
        if "freezer" in self.dirs:  # frozen processes cannot fork; a SIGKILL takes them as soon as they thaw
            folder, version = self.dirs["freezer"]
            state = os.path.join(folder, "cgroup.freeze" if version == 2 else "freezer.state")
            _write(state, "1" if version == 2 else "FROZEN")
            wait_until(lambda: version == 2 or _read(state).strip() == "FROZEN", min(deadline, time.time() + 2))
            signal_all(self.members(), lambda pid: True)
            _write(state, "0" if version == 2 else "THAWED")
        kill_all(self.members, lambda pid: pid in self.members(), deadline)

    def remove(self, deadline):
        for folder in reversed(self.made):
            while os.path.isdir(folder):
                try:
                    os.rmdir(folder)
                except OSError:
                    if time.time() > deadline:
                        break
                    time.sleep(0.05)

    def describe(self):
        kinds = sorted({f"v{v}" for _, v in self.dirs.values()})
        return (f"cgroup ({'+'.join(kinds)}): " + ", ".join(
            {"kill": "cgroup.kill", "freezer": "freezer", "memory": "memory limit and accounting", "pids": "pids.max"}[r]
            for r in ("kill", "freezer", "memory", "pids") if r in self.dirs))


# ------------------------------------------------------------------ namespaces, the hidden file system
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
NAMESPACES = {"IPC": CLONE_NEWIPC, "network": CLONE_NEWNET, "PID": CLONE_NEWPID}
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


def _unshare(flags, what):
    import ctypes

    if _libc().unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), f"unshare {what}")


def _mount(source, target, fstype, flags, data=None):
    import ctypes

    if _libc().mount(source and source.encode(), target.encode(), fstype and fstype.encode(), ctypes.c_ulong(flags),
                     data and data.encode()) != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def hide_filesystem(visible, home=None, uid=None):
    """In a new mount namespace: empty tmpfs over every non-system top-level folder (and /dev/shm), with the
    `visible` folders bound back at their own paths. Runs in the child, as root, before dropping to the uid."""
    MS_NOSUID, MS_NODEV, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 2, 4, 4096, 8192, 16384, 1 << 18
    _unshare(CLONE_NEWNS, "mount namespace")
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


def make_sandbox(address_space, uid, visible, home=None, namespaces=0, cgroup_files=()):
    """preexec_fn of the student's process: join the grading's cgroup, limits, first in line for the OOM killer,
    private IPC / network / PID namespaces (`namespaces`: CLONE_ flags), the hidden file system (if given), then the
    unprivileged uid."""
    if visible is not None or namespaces:
        _libc()  # loaded before the fork
    cgroup_files = list(cgroup_files)

    def sandbox():
        for path in cgroup_files:  # before anything else: every descendant is born inside
            _write(path, str(os.getpid()))
        _write("/proc/self/oom_score_adj", "1000")
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_NPROC, (512, 512))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_LOG, MAX_LOG))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        if namespaces:  # PID: the worker's children live in a namespace whose init takes them all when it dies
            _unshare(namespaces, "namespaces")
        if visible is not None:
            hide_filesystem(visible, home, uid)
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        os.umask(0o077)

    return sandbox


def _in_child(function, timeout=10.0):
    """Exit code of function() in a forked child (0 when it returns, 1 when it raises, or its own os._exit code),
    None past the timeout: for what changes a process irreversibly."""
    pid = os.fork()
    if pid == 0:
        try:
            function()
            os._exit(0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)  # a root child we just killed: it is gone at once
            return None
        time.sleep(0.01)


def can_hide_filesystem():
    """Whether this machine lets root make a private mount namespace (Docker without CAP_SYS_ADMIN does not)."""
    return sys.platform.startswith("linux") and _in_child(lambda: hide_filesystem([])) == 0


def available_namespaces():
    """CLONE_ flags of the IPC, network and PID namespaces root may make here."""
    if not sys.platform.startswith("linux"):
        return 0
    return sum(flag for flag in NAMESPACES.values() if _in_child(lambda: _unshare(flag, "probe")) == 0)


# ------------------------------------------------------------------ kernel objects and files left by the uid
IPC_TABLES = {"shm": ("shmid", "shmctl"), "msg": ("msqid", "msgctl"), "sem": ("semid", "semctl")}
SHARED_FOLDERS = ["/tmp", "/var/tmp", "/dev/shm", "/run/shm", "/dev/mqueue", "/run/lock", "/var/lock"]


def ipc_objects_of(uid):
    """[(kind, id)] of the SysV shared memory segments, message queues and semaphore sets that `uid` owns or
    created, in this IPC namespace."""
    found = []
    for kind, (id_column, _) in IPC_TABLES.items():
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header = f.readline().split()
                for line in f:
                    row = dict(zip(header, line.split()))
                    if str(uid) in (row.get("uid"), row.get("cuid")):
                        found.append((kind, int(row[id_column])))
        except (OSError, ValueError, KeyError):
            continue
    return found


def remove_ipc_objects(uid):
    import ctypes

    removed = []
    for kind, ident in ipc_objects_of(uid):
        control = getattr(_libc(), IPC_TABLES[kind][1])
        args = (ident, 0, 0, None) if kind == "sem" else (ident, 0, None)  # IPC_RMID = 0
        if control(*[ctypes.c_void_p(a) if a is None else ctypes.c_int(a) for a in args]) == 0:
            removed.append(f"{kind} id {ident}")
    return removed


def files_of(uid, folders=SHARED_FOLDERS, skip=None, limit=20000):
    """What `uid` owns in the world-writable folders (never following symlinks; a folder it owns is listed, not
    entered), except under `skip` (the grading's own folder, removed whole afterwards)."""
    found, seen = [], 0
    for top in folders:
        if not os.path.isdir(top) or os.path.islink(top):
            continue
        for parent, dirs, files in os.walk(top):
            for name in dirs + files:
                path = os.path.join(parent, name)
                seen += 1
                try:
                    if path != skip and os.lstat(path).st_uid == uid:
                        found.append(path)
                except OSError:
                    continue
            dirs[:] = [d for d in dirs if os.path.join(parent, d) not in found and os.path.join(parent, d) != skip]
            if seen > limit:
                return found
    return found


def remove_posix_queues_of(uid):
    """How many POSIX message queues of `uid` were removed, where /dev/mqueue is not mounted: in a child, through
    a private mount of this IPC namespace's mqueue file system (needs CAP_SYS_ADMIN; None without it)."""
    def remove():
        MS_REC, MS_PRIVATE = 16384, 1 << 18
        _unshare(CLONE_NEWNS, "mount namespace")
        _mount("none", "/", None, MS_REC | MS_PRIVATE)
        folder = tempfile.mkdtemp(prefix="mqueue-")  # on the machine's /tmp: removed again below
        try:
            _mount("mqueue", folder, "mqueue", 0)
            queues = [name for name in os.listdir(folder) if os.lstat(os.path.join(folder, name)).st_uid == uid]
            for name in queues:
                os.remove(os.path.join(folder, name))
            _libc().umount2(folder.encode(), 2)  # MNT_DETACH
        finally:
            os.rmdir(folder)
        os._exit(100 + min(len(queues), 100))

    code = _in_child(remove, timeout=5.0)
    return code - 100 if code is not None and code >= 100 else None


def remove_path(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


# ------------------------------------------------------------------ the sandbox of one grading
class Sandbox:
    """How the student's processes are contained, decided once, before any of its code runs, and never relaxed
    afterwards. With root: a throwaway uid, plus whatever the machine allows of a cgroup (kill, memory, pids) and
    private mount / IPC / network / PID namespaces. Killing is always done from root (cgroup.kill, a frozen cgroup
    or pidfds), never as the student's uid."""

    def __init__(self, uid, visible=None, namespaces=0, cgroup=None, home=None, bare=False):
        self.uid, self.visible, self.namespaces, self.cgroup, self.home = uid, visible, namespaces, cgroup, home
        self.bare = bare
        self.limit = None  # the memory limit (bytes), set from the interpreter's own baseline at its first "ready"

    @classmethod
    def decide(cls, uid, visible_folders, home, bare=False):
        """Everything this machine allows, found out before any student code runs. `bare` (for tests): no cgroup
        and no IPC, network or PID namespace, the processes, memory and kernel objects as in Docker without
        capabilities (the mount namespace stays: a test interpreter may only be reachable through it)."""
        visible = visible_folders if can_hide_filesystem() else None
        if bare:
            return cls(uid, visible, home=home, bare=True)
        cgroup = Cgroup(f"grade-{uid}")
        if not cgroup.dirs:
            cgroup.remove(time.time() + 5)
            cgroup = None
        elif "pids" in cgroup.dirs:
            cgroup.set_limits(pids=512)
        return cls(uid, visible, available_namespaces(), cgroup, home)

    def without_hiding(self):
        self.visible = None

    def preexec(self):
        return make_sandbox(ADDRESS_SPACE, self.uid, self.visible, self.home, self.namespaces,
                            self.cgroup.join_files() if self.cgroup else ())

    def members(self, worker_pid=None):
        if self.uid is None:
            return [worker_pid] if worker_pid else []
        pids = set(processes_of(self.uid))
        if self.cgroup:
            pids |= set(self.cgroup.members())
        return sorted(pids)

    def memory(self, worker_pid=None):
        """What the student's processes use now: the cgroup's charge where there is one (it counts what RSS
        misses: tmpfs files, SysV shared memory, page tables), else the resident memory of every process."""
        charged = self.cgroup.memory() if self.cgroup else None
        return charged if charged is not None else rss_of(self.members(worker_pid))

    def set_memory_limit(self, limit):
        self.limit = limit
        if self.cgroup:  # a hard ceiling just above the watchdog's: the kernel enforces it between two readings
            self.cgroup.set_limits(memory=limit + (32 << 20))

    def limit_hits(self):
        return self.cgroup.limit_hits() if self.cgroup else 0

    def kill(self, deadline):
        """Every process of the student: (the pids that were alive, how many are left)."""
        if self.uid is None:
            return set(), 0
        alive = set(self.members())
        if self.cgroup:
            self.cgroup.kill(deadline)
        alive |= kill_all(lambda: processes_of(self.uid), lambda pid: _alive_of(pid, self.uid), deadline)
        wait_until(lambda: not self.members(), deadline)
        return alive, len(self.members())

    def clean_up(self, deadline, notes):
        """After the last worker: kill what is left, remove the uid's IPC objects and files, the cgroup."""
        if self.uid is None:
            return
        killed, left = self.kill(deadline)
        if killed:
            notes["leftover processes"] = notes.get("leftover processes", 0) + len(killed)
        if left:
            notes["PROCESSES STILL ALIVE after grading"] = left
        objects = remove_ipc_objects(self.uid)
        if not self.namespaces & CLONE_NEWIPC and not os.path.ismount("/dev/mqueue"):  # else among the files
            queues = remove_posix_queues_of(self.uid)
            objects += [f"{queues} POSIX message queues"] if queues else []
            if queues is None:
                notes["POSIX message queues"] = "not listable here (no /dev/mqueue, no CAP_SYS_ADMIN): any are left"
        if objects:
            notes["IPC objects of the uid removed"] = ", ".join(objects[:20])
        files = files_of(self.uid, skip=os.path.dirname(self.home) if self.home else None)
        for path in files:
            remove_path(path)
        if files:
            notes["files of the uid removed"] = f"{len(files)}: " + ", ".join(files[:10])
        if self.cgroup:
            self.cgroup.remove(deadline)

    def describe(self):
        """What is and is not contained, for the instructors' notes."""
        if self.uid is None:
            return ["WARNING: --allow-same-user: the student's process ran as the grader's own user (development "
                    "only; it could read the reference, signal the grader, and nothing it left behind was removed)"]
        named = [name for name, flag in NAMESPACES.items() if self.namespaces & flag]
        lines = ["SIMULATED: GRADER_SANDBOX=bare: no cgroup, IPC, network or PID namespace was tried"] if self.bare else []
        lines += [f"student process ran as uid {self.uid} (throwaway, unprivileged; killed from root, never as it)"]
        lines.append("file system: only system folders, the work folder and the interpreter are visible to the "
                     "student's process (private mount namespace)" if self.visible is not None else
                     "file system: no mount namespace available; the student's process sees every world-readable "
                     "file (the reference is still root-only)")
        lines.append("namespaces: private " + ", ".join(named) if named else
                     "namespaces: none could be made (no CAP_SYS_ADMIN?)")
        if not self.namespaces & CLONE_NEWNET:
            lines.append("network: NOT isolated: the student's process could reach the machine's network")
        if not self.namespaces & CLONE_NEWIPC:
            lines.append("IPC: shared with the machine: SysV objects and POSIX queues of the uid are removed after "
                         "grading (POSIX queues only where /dev/mqueue is mounted)")
        lines.append(self.cgroup.describe() if self.cgroup else
                     "cgroup: none could be made: memory is the resident memory summed over every process of the "
                     "uid (tmpfs files and unattached shared memory not counted); processes killed by pid from root")
        return lines


# ------------------------------------------------------------------ running the probes
class Worker:
    """One probe_worker.py process in the sandbox; yields protocol records with bounded reads. `budget` is the
    protocol bytes left for the whole run (shared by every restarted worker)."""

    def __init__(self, python, work, sandbox, requests, env, budget):
        self.log = open(os.path.join(os.path.dirname(work), "worker.log"), "ab")
        if os.geteuid() == 0:
            os.chown(self.log.name, 0, 0)
        self.proc = subprocess.Popen([python, "-I", "probe_worker.py"], cwd=work, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, start_new_session=True,
                                     preexec_fn=sandbox.preexec())
        try:  # the requests are a few kB: they fit the pipe, this write never waits
            os.set_blocking(self.proc.stdin.fileno(), False)
            self.proc.stdin.write(json.dumps(requests).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.budget = budget
        self.eof = False
        self.own = {self.proc.pid}  # the worker itself (and, once it is ready, its PID namespace's init)
        self.seen = set()  # every process of the student seen while this worker ran

    def go(self):
        """Let the worker import the submission (after its interpreter's memory was measured)."""
        try:
            self.proc.stdin.write(b"go\n")
            self.proc.stdin.close()
        except OSError:
            pass

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
            self.budget["left"] -= len(chunk)
            if self.budget["left"] < 0:
                raise OverflowError(f"more than {MAX_PROTOCOL >> 20} MB of output in all")
            self.buffer += chunk
            if len(self.buffer) > MAX_LINE and b"\n" not in self.buffer:
                raise OverflowError(f"a line longer than {MAX_LINE >> 20} MB")
            if len(chunk) < (1 << 20):
                break
        *complete, self.buffer = self.buffer.split(b"\n")
        lines += complete
        return lines

    def stop(self, sandbox, deadline):
        """Kill the worker and every process of the student; (how many processes besides the worker's own it
        had, alive now or seen while it ran, how many are left)."""
        own = self.own | namespace_init_of(self.proc.pid)
        alive = set(sandbox.members(self.proc.pid))
        if self.eof:  # it is ending by itself: its own exit code says more than our SIGKILL
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
        try:
            self.proc.kill()  # root's own child
        except OSError:
            pass
        killed, left = sandbox.kill(deadline)
        if sandbox.uid is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            left += 1
        self.proc.stdout.close()
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        self.log.close()
        return len((self.seen | alive | killed) - own), left


def parse(line):
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


REFUSED = ("REFUSED: the grader could not start Python as an unprivileged user, so your code was not run (it is "
           "never run as root). This is a problem of the autograder's setup, not of your submission: please tell the "
           "course staff.")
KILL_S = 10.0  # what stopping the student's processes may take


def run_probes(python, work, sandbox, requests, *, deadline, probe_timeout, margin, env, notes):
    """{index: output as JSON text}, {index: why it has none}, a general message (import error / refusal) or ''.
    `deadline`: when the probes end, whatever is left. The memory limit is the interpreter's own use after
    `import torch` (measured in the first worker, before any student code runs) plus `margin` bytes."""
    outputs, missing, general = {}, {}, ""
    pending = list(range(len(requests)))
    budget = {"left": MAX_PROTOCOL}
    ever_ready = False
    while pending and not general:
        try:
            worker = Worker(python, work, sandbox, [[i, requests[i]] for i in pending], env, budget)
        except subprocess.SubprocessError as exc:  # the sandbox could not be set up
            if sandbox.visible is None or ever_ready:
                raise
            notes["file system"] = f"hiding the file system failed ({exc}); ran without it (before any student code)"
            sandbox.without_hiding()
            continue
        except OSError as exc:  # the unprivileged uid cannot execute the interpreter
            general = REFUSED + f" (starting {python} as an unprivileged user failed: {exc.strerror})"
            notes["refused"] = f"the worker could not be started: {exc}"
            break
        peak, ready, imported, last = 0, False, False, time.time()
        limit_hits = sandbox.limit_hits()
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
                if not worker.eof and worker.proc.poll() is not None:  # ended, though a daemon may hold its pipe
                    lines += worker.read(0)
                    worker.eof = True
                used = sandbox.memory(worker.proc.pid)
                peak = max(peak, used)
                worker.seen |= set(sandbox.members(worker.proc.pid))
                if sandbox.limit is not None and (used > sandbox.limit or sandbox.limit_hits() > limit_hits):
                    stop_reason = "memory"
                    break
                for line in lines:
                    record = parse(line)
                    if record is None:
                        notes["malformed protocol lines"] = notes.get("malformed protocol lines", 0) + 1
                        continue
                    if record.get("ready") is True and not ready:
                        ready, last = True, time.time()
                        worker.own |= namespace_init_of(worker.proc.pid)
                        if sandbox.limit is None:  # the first worker, no student code has run yet
                            baseline = sandbox.memory(worker.proc.pid)
                            sandbox.set_memory_limit(baseline + margin)
                            notes["memory limit (MB)"] = (f"{sandbox.limit >> 20} = the interpreter after import "
                                                          f"torch ({baseline >> 20}) + {margin >> 20}")
                        ever_ready = True
                        worker.go()
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
                        outputs[record["i"]] = json.dumps(record["out"])  # text: the grader keeps no parsed copy
                        pending.remove(record["i"])
                        last = time.time()
                    elif record.get("done") is True:
                        pass
                    else:
                        notes["unexpected protocol lines"] = notes.get("unexpected protocol lines", 0) + 1
                    del record
                if general or not pending or worker.eof:
                    break
        except OverflowError as exc:
            stop_reason = "flood"
            notes["flood"] = f"the submission's process wrote {exc}; it was stopped"
        others, left = worker.stop(sandbox, time.time() + KILL_S)
        if stop_reason is None and sandbox.limit_hits() > limit_hits:
            stop_reason = "memory"  # the kernel enforced the cgroup's limit before the watchdog saw it
        if stop_reason:
            notes.setdefault("probes stopped", []).append(stop_reason)
        if others:  # daemons, forks, a PID namespace's orphans: all ended with the worker or were killed then
            notes["processes besides the worker"] = notes.get("processes besides the worker", 0) + others
        if left:
            notes["PROCESSES STILL ALIVE after a worker"] = left
        notes["peak memory of the student's processes (MB)"] = max(
            notes.get("peak memory of the student's processes (MB)", 0), round(peak / 2 ** 20))
        if stop_reason == "time":  # the checks that ran are judged; the others say why they have nothing
            for i in pending:
                missing[i] = "Not run: the whole run reached its time limit."
            break
        if not ready and not ever_ready and sandbox.visible is not None:  # no student code ran: the setup may change
            notes["file system"] = ("the interpreter did not start with the file system hidden; ran without hiding "
                                    "(decided before any student code ran)")
            sandbox.without_hiding()
            continue
        if not ready and not ever_ready:
            general = REFUSED + (" (the interpreter did not start within 120 s)" if stop_reason == "start_timeout" else "")
            notes["refused"] = f"worker exit code {worker.proc.returncode}; see the worker log tail"
            break
        if not ready:  # a restarted worker that never said "ready": nothing about the sandbox changes
            for i in pending:
                missing[i] = ("Not run: the grader's process for your code did not start again after an earlier "
                              "probe stopped it.")
            notes["restart failed"] = f"a restarted worker never said ready ({stop_reason or 'exit'}); {len(pending)} probes not run"
            break
        if general or not pending:
            break
        if not imported:
            general = ("Your diffusion.py could not be imported: " + (
                f"importing it took longer than {probe_timeout:.0f} s" if stop_reason == "probe_timeout" else
                f"importing it used more than {sandbox.limit >> 20} MB of memory" if stop_reason == "memory" else
                f"it wrote more output than the grader reads ({MAX_PROTOCOL >> 20} MB)" if stop_reason == "flood" else
                f"the process ended while importing it (exit code {worker.proc.returncode}: a crash, exit() or os._exit?)"))
            break
        first = pending[0]
        reason = {"probe_timeout": f"it ran longer than {probe_timeout:.0f} s (an infinite loop, or very slow code?)",
                  "memory": f"your code's processes used more than {sandbox.limit >> 20} MB of memory",
                  "flood": f"your code wrote more output than the grader reads ({MAX_PROTOCOL >> 20} MB)"}.get(
            stop_reason, f"the process ended early (exit code {worker.proc.returncode}: a crash or os._exit?)")
        if stop_reason == "flood":
            for i in pending:
                missing[i] = f"Not run: {reason}."
            break
        missing[first] = f"This check's probe stopped: {reason}."
        pending.remove(first)
    return outputs, missing, general

# ------------------------------------------------------------------ trusted side
def trusted(python, command, payload_text, timeout, tmp, hint_budget=None):
    """trusted_judge.py `command` (root, never student code) with JSON text on stdin, within `timeout` seconds."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    if os.environ.get("GRADER_FIXED_SEED"):
        env["GRADER_FIXED_SEED"] = os.environ["GRADER_FIXED_SEED"]
    if hint_budget is not None:
        env["GRADER_HINT_BUDGET"] = f"{hint_budget:.1f}"
    proc = subprocess.run([python, "-I", os.path.join(HERE, "trusted_judge.py"), command],
                          input=payload_text.encode(), capture_output=True, timeout=max(1.0, timeout), cwd=HERE, env=env)
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


def grade_source(source, python, *, started, deadline, judge_reserve, time_limit, probe_timeout, memory_mb, is_root,
                 hidden, notes):
    """Plan, probes in the sandbox, judge: (verdicts, a general message or '', a notice or ''). Adds to `hidden`
    and `notes`; raises subprocess.TimeoutExpired when a trusted step reaches the run's deadline."""
    verdicts, general, notice = {}, "", ""
    parent = work_parent()
    trusted_tmp = tempfile.mkdtemp(prefix="trusted-")
    os.chmod(trusted_tmp, 0o700)
    try:
        plan = trusted(python, "plan", "", deadline - judge_reserve - time.time(), trusted_tmp)
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
        sandbox = Sandbox(None)
        if is_root:  # decided here, before any student code runs, and never relaxed afterwards
            uid = pick_uid()
            os.chown(home, uid, uid)
            os.chmod(home, 0o700)
            prefixes = {os.path.dirname(os.path.dirname(os.path.abspath(python))),
                        os.path.dirname(os.path.dirname(os.path.realpath(python)))}
            sandbox = Sandbox.decide(uid, sorted({work, home} | {p for p in prefixes if p != "/"}), home,
                                     bare=os.environ.get("GRADER_SANDBOX") == "bare")
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg"}
        probe_start = time.time()
        try:
            outputs, missing, general = run_probes(
                python, work, sandbox, requests, deadline=min(probe_start + time_limit, deadline - judge_reserve),
                probe_timeout=probe_timeout, margin=memory_mb << 20, env=env, notes=notes)
        finally:
            sandbox.clean_up(time.time() + KILL_S, notes)
            hidden += sandbox.describe()
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
            student = ",".join(f"{json.dumps(keys[i])}: {text}" for i, text in outputs.items())  # checked JSON
            payload = json.dumps({"params": plan["params"], "per_check": plan["per_check"],
                                  "reference": plan["reference"], "missing": {keys[i]: why for i, why in missing.items()}})
            left = deadline - 5 - time.time()
            judged = trusted(python, "judge", payload[:-1] + ', "student": {' + student + "}}", left, trusted_tmp,
                             hint_budget=min(HINT_BUDGET_S, max(0.0, 0.4 * left - 5)))
            verdicts = judged["results"]
            hidden += judged.get("notes", [])
    finally:
        shutil.rmtree(parent, ignore_errors=True)
        shutil.rmtree(trusted_tmp, ignore_errors=True)
    return verdicts, general, notice


def grade(root, python=sys.executable, time_limit=480.0, probe_timeout=60.0, memory_mb=MARGIN_MB, allow_same_user=False,
          total_limit=TOTAL_S):
    """Grade root/submission into root/results/results.json, written within `total_limit` seconds whatever the
    submission does. `time_limit`: the probes' share at most; `memory_mb`: what the student's code may use on
    top of its interpreter after `import torch`."""
    started = time.time()
    deadline = started + total_limit
    judge_reserve = min(90.0, max(12.0, 0.2 * total_limit))  # what judging and writing the results keep for themselves
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
        try:
            verdicts, general, notice = grade_source(
                source, python, started=started, deadline=deadline, judge_reserve=judge_reserve, time_limit=time_limit,
                probe_timeout=probe_timeout, memory_mb=memory_mb, is_root=is_root, hidden=hidden, notes=notes)
        except subprocess.TimeoutExpired as exc:
            general = ("The grader ran out of time (the whole run's time limit) before it could judge your code; "
                       "please tell the course staff.")
            hidden.append(f"trusted_judge.py {exc.cmd[-1]} stopped at the run's deadline ({total_limit:.0f} s)")
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
    parser.add_argument("--memory-mb", type=int, default=int(os.environ.get("GRADER_MEMORY_MB", str(MARGIN_MB))),
                        help="memory all the student's processes together may use on top of the interpreter's own "
                             "after import torch (measured each run)")
    parser.add_argument("--total-limit", type=float, default=float(os.environ.get("GRADER_TOTAL_LIMIT", str(TOTAL_S))),
                        help="seconds by which results.json is written, whatever the submission does")
    parser.add_argument("--allow-same-user", action="store_true", default=os.environ.get("GRADER_ALLOW_SAME_USER") == "1",
                        help="developers only: run the submission as this user when not root (no isolation)")
    args = parser.parse_args(argv)
    try:
        result = grade(args.root, args.python, args.time_limit, args.probe_timeout, args.memory_mb, args.allow_same_user,
                       args.total_limit)
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
