"""Graded tests for diffusion.py (the DDPM homework).

    pytest test_diffusion.py                 # everything; your score per function is printed at the end
    pytest test_diffusion.py -k q_sample     # the tests of one function

What is graded and how much: POINTS below (the only place the weights live). A function's points are
split evenly over its tests, so every passing test earns partial credit. The Gradescope autograder runs
this same file.

The tests use only the public API of `Diffusion` (constructor, `q_sample`, `p_losses`, `forward`,
`p_sample`, `p_sample_loop`, `sample`), so your buffer names, float32 vs float64 arithmetic, `extract`
vs plain indexing are up to you. Randomness is fixed by replacing `noise_like` on the instance (so draw
all sampling noise through `self.noise_like(shape, device)`) and by seeding torch before `forward`
draws t with `torch.randint`. A tiny deterministic noise predictor (`TinyEps`, it depends on both x
and t) stands in for the U-Net, so everything runs in seconds on a CPU.

Expected values come from test_fixtures/diffusion_reference.pt, generated from the reference solution
by tools/make_fixtures.py (instructors). When an output is wrong, the message says what was expected,
what came out, and, if it matches a known mistake, which one.
"""
import functools
import math
import os
import traceback

import pytest
import torch
from torch import nn

import diffusion

# ---------------------------------------------------------------------------------------------------
# Points per graded function (100 in all). Partial credit: points * (tests passed / tests of that function).
POINTS = {
    "schedule": 15,  # Diffusion.__init__: the cosine schedule and the posterior coefficients
    "q_sample": 15,
    "p_losses": 15,
    "forward": 10,
    "p_sample": 20,
    "p_sample_loop": 15,
    "sample": 10,
}
TEST_TIMEOUT = float(os.environ.get("DIFFUSION_TEST_TIMEOUT", "60"))  # seconds per test (pytest-timeout)
# ---------------------------------------------------------------------------------------------------

FIXTURE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_fixtures", "diffusion_reference.pt")
TS = (50, 1000)  # the course's T and a larger one
CHANNELS, IMAGE_SIZE = 3, 5  # distinct on purpose, so a mixed-up shape shows
N_SUBSAMPLE = 48  # how many values of each known mistake's output the fixture keeps


def graded(function):
    """Mark a test as part of `function`'s points, with a per-test timeout."""
    assert function in POINTS, function

    def mark(test):
        return pytest.mark.graded(function)(pytest.mark.timeout(TEST_TIMEOUT)(test))

    return mark


def fail(message):
    pytest.fail(message, pytrace=False)


# ------------------------------------------------------------------ stand-ins for the U-Net and the noise
class TinyEps(nn.Module):
    """Deterministic noise predictor eps(x, t): smooth in x, different for every t, one weight per channel.

    Records every call as (x, t) so the tests can see what the model was given.
    """

    def __init__(self, channels=CHANNELS):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.6, 1.4, channels))
        self.calls = []

    def forward(self, x, time):
        self.calls.append((x.detach().clone(), time.detach().clone()))
        w = self.weight.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        phase = torch.cos(time.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * 0.37 + 0.5)
        return torch.tanh(w * x + phase) * 1.3 + 0.2 * phase


class ConstEps(nn.Module):
    """Predicts the same noise value everywhere (isolates the schedule inside p_sample)."""

    def __init__(self, value):
        super().__init__()
        self.value = value
        self.calls = []

    def forward(self, x, time):
        self.calls.append((x.detach().clone(), time.detach().clone()))
        return torch.full_like(x, self.value)


class NoiseSequence:
    """Replaces Diffusion.noise_like: a reproducible sequence of N(0, I) draws; records (shape, device) of each call."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = []
        self.draws = []

    def __call__(self, shape, device=None, *args, **kwargs):
        shape = tuple(int(s) for s in shape)
        self.calls.append((shape, device))
        draw = torch.randn(shape, generator=self.generator)
        self.draws.append(draw)
        return draw.to(device) if device is not None else draw


class ConstNoise(NoiseSequence):
    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def __call__(self, shape, device=None, *args, **kwargs):
        shape = tuple(int(s) for s in shape)
        self.calls.append((shape, device))
        draw = torch.full(shape, float(self.value))
        return draw.to(device) if device is not None else draw


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def uniform(shape, seed):
    """Values in [-1, 1], like normalized images."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def make(mod, T, model=None, channels=CHANNELS, image_size=IMAGE_SIZE):
    model = TinyEps(channels) if model is None else model
    return mod.Diffusion(model, image_size=image_size, channels=channels, timesteps=T)


def mixed_t(T):
    return torch.tensor([0, 1, T // 2, T - 1])


def t_labels(t, T):
    return [f"t={int(v)}" for v in t] if t is not None else None


# ------------------------------------------------------------------ probes: runs whose outputs the fixture holds
# A probe takes the diffusion module and returns a tensor. tools/make_fixtures.py runs every probe on the
# reference solution (-> "expected") and on each known mistake (-> hints).
PROBES = {}  # name -> (function(mod), rtol, atol, labels for dim 0 or None, what it shows)


def _probe(name, fn, *, rtol=1e-3, atol=1e-5, labels=None, what=""):
    PROBES[name] = (fn, rtol, atol, labels, what)


def probe_sqrt_alpha_bar(mod, T):
    d = make(mod, T, channels=1, image_size=1)
    return d.q_sample(torch.ones(T, 1, 1, 1), torch.arange(T), torch.zeros(T, 1, 1, 1)).reshape(-1)


def probe_sqrt_one_minus_alpha_bar(mod, T):
    d = make(mod, T, channels=1, image_size=1)
    return d.q_sample(torch.zeros(T, 1, 1, 1), torch.arange(T), torch.ones(T, 1, 1, 1)).reshape(-1)


def probe_posterior_std(mod, T):
    # eps = 0 and x_t = 0 make x0_hat = 0 and the mean 0, so with z = 1 the step returns sigma_t
    d = make(mod, T, model=ConstEps(0.0), channels=1, image_size=1)
    out = []
    for i in range(1, T):
        d.noise_like = ConstNoise(1.0)
        out.append(d.p_sample(torch.zeros(1, 1, 1, 1), torch.full((1,), i, dtype=torch.long), i).reshape(()))
    return torch.stack(out)


def probe_posterior_mean(mod, T):
    # no noise (z = 0): the step returns the posterior mean; two x_t values per step
    d = make(mod, T, model=ConstEps(0.3), channels=1, image_size=1)
    x = torch.tensor([0.05, -0.4]).view(2, 1, 1, 1)
    out = []
    for i in range(T):
        d.noise_like = ConstNoise(0.0)
        out.append(d.p_sample(x, torch.full((2,), i, dtype=torch.long), i).reshape(2))
    return torch.stack(out)


def probe_q_sample(mod, T):
    d = make(mod, T)
    return d.q_sample(uniform((4, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 11), mixed_t(T), randn((4, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 12))


def p_losses_t(T, which):
    return {"first": torch.zeros(4, dtype=torch.long), "last": torch.full((4,), T - 1), "mixed": mixed_t(T)}[which]


def run_p_losses(mod, T, which):
    model = TinyEps()
    d = make(mod, T, model=model)
    x_0 = uniform((4, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 21)
    noise = randn((4, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 22)
    loss = d.p_losses(x_0, p_losses_t(T, which), noise)
    return loss, model


def probe_p_losses(mod, T, which):
    loss, _ = run_p_losses(mod, T, which)
    return loss.reshape(-1)


def probe_p_losses_model_x(mod, T):
    _, model = run_p_losses(mod, T, "mixed")
    if not model.calls:
        fail("p_losses never called self.model: it should predict the noise with self.model(x_t, t).")
    return model.calls[0][0]


def probe_p_losses_model_t(mod, T):
    _, model = run_p_losses(mod, T, "mixed")
    if not model.calls:
        fail("p_losses never called self.model: it should predict the noise with self.model(x_t, t).")
    return model.calls[0][1].reshape(-1).double()


def probe_p_sample(mod, T, t_index):
    d = make(mod, T)
    d.noise_like = NoiseSequence(31)
    x = randn((3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 32)
    return d.p_sample(x, torch.full((3,), t_index, dtype=torch.long), t_index)


def probe_p_sample_loop(mod, T):
    d = make(mod, T)
    d.noise_like = NoiseSequence(51)
    return d.p_sample_loop(randn((2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 52))


def probe_sample(mod, T):
    d = make(mod, T)
    d.noise_like = NoiseSequence(61)
    return d.sample(2)


for _T in TS:
    _all_t = [f"t={i}" for i in range(_T)]
    _probe(f"schedule/sqrt_alpha_bar/T{_T}", functools.partial(probe_sqrt_alpha_bar, T=_T), atol=1e-8, labels=_all_t,
           what=f"sqrt(alpha_bar_t), read as q_sample(x_0=1, t, noise=0) for every t in 0..{_T - 1} (T={_T}, eq. 12-14)")
    _probe(f"schedule/sqrt_one_minus_alpha_bar/T{_T}", functools.partial(probe_sqrt_one_minus_alpha_bar, T=_T),
           atol=1e-8, labels=_all_t,
           what=f"sqrt(1 - alpha_bar_t), read as q_sample(x_0=0, t, noise=1) for every t in 0..{_T - 1} (T={_T}, eq. 13)")
    _probe(f"schedule/posterior_std/T{_T}", functools.partial(probe_posterior_std, T=_T), atol=1e-8, labels=_all_t[1:],
           what=f"sigma_t = sqrt(posterior variance), read as p_sample(x=0, t, t_index) with eps=0 and noise_like -> 1, "
                f"for t_index 1..{_T - 1} (T={_T}, eq. 17)")
    _probe(f"p_sample/mean_every_step/T{_T}", functools.partial(probe_posterior_mean, T=_T), atol=1e-6, labels=_all_t,
           what=f"the posterior mean, read as p_sample(x, t, t_index) with eps=0.3 and noise_like -> 0, for every "
                f"t_index in 0..{_T - 1} (T={_T}, eq. 15-16)")
    _probe(f"q_sample/T{_T}", functools.partial(probe_q_sample, T=_T), labels=t_labels(mixed_t(_T), _T),
           what=f"q_sample(x_0, t, noise) with t = {mixed_t(_T).tolist()} (T={_T}, eq. 13)")
    for _which in ("first", "last", "mixed"):
        _probe(f"p_losses/T{_T}/{_which}", functools.partial(probe_p_losses, T=_T, which=_which),
               what=f"p_losses(x_0, t, noise) with t = {p_losses_t(_T, _which).tolist()} (T={_T}, Algorithm 1, eq. 19)")
    _probe(f"p_losses/model_x/T{_T}", functools.partial(probe_p_losses_model_x, T=_T), labels=t_labels(mixed_t(_T), _T),
           what=f"the x that p_losses gave the model, with t = {mixed_t(_T).tolist()} (T={_T}; it should be x_t)")
    _probe(f"p_losses/model_t/T{_T}", functools.partial(probe_p_losses_model_t, T=_T), atol=0,
           what=f"the t that p_losses gave the model (T={_T}; it should be the t it was called with)")
    for _i in (_T - 1, _T // 2, 1, 0):
        _probe(f"p_sample/T{_T}/t_index{_i}", functools.partial(probe_p_sample, T=_T, t_index=_i),
               what=f"p_sample(x_t, t, t_index={_i}) (T={_T}, Algorithm 2, eq. 15-17)")
    # T float32 steps accumulate rounding, hence the looser atol for whole runs
    _probe(f"p_sample_loop/T{_T}", functools.partial(probe_p_sample_loop, T=_T), atol=5e-4,
           what=f"p_sample_loop(x_T) run over all {_T} steps (T={_T}, Algorithm 2)")
    _probe(f"sample/T{_T}", functools.partial(probe_sample, T=_T), atol=5e-4, what=f"sample(2) (T={_T}, Algorithm 2)")


# ------------------------------------------------------------------ reference data and comparison
@functools.lru_cache(maxsize=None)
def reference():
    if not os.path.exists(FIXTURE_PATH):
        fail(f"missing {FIXTURE_PATH}: it ships with the handout next to this file (instructors: tools/make_fixtures.py).")
    data = torch.load(FIXTURE_PATH, weights_only=True)
    if not torch.equal(data["rng_check"], randn((6,), 12345)):
        fail("torch's random numbers differ from those the fixture was made with (a different torch version?). "
             "Use the pinned torch from requirements.txt (instructors: rerun tools/make_fixtures.py).")
    return data


def _where_in_diffusion_py(exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.basename(f.filename) == "diffusion.py"]
    if not frames:
        return ""
    f = frames[-1]
    return f" (diffusion.py line {f.lineno}, in {f.name}: `{(f.line or '').strip()}`)"


def _exception_hint(text):
    text = text.lower()
    if "device" in text:
        return ("Tensors on different devices: register the schedule with self.register_buffer(...) so that "
                "diffusion.to(device) moves it, and create new tensors on x.device.")
    if "out of bounds" in text or "out of range" in text:
        return ("An index outside 0..T-1: code index i is math step t = i + 1, so t tensors hold 0..T-1 "
                "(see the index convention at the top of diffusion.py).")
    if "expected scalar type" in text or "dtype" in text:
        return "Mixed dtypes: keep the schedule float32 (or cast results back to x.dtype) and t integer (torch.long)."
    if "size of tensor" in text or "shape" in text or "must match" in text:
        return "A shape mismatch: per-sample coefficients must broadcast as (b, 1, 1, 1) against (b, C, H, W)."
    return ""


def call(what, fn, *args, **kwargs):
    """Run student code; turn an exception into a readable failure."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError as exc:
        fail(f"{what}: not implemented yet ({exc or 'NotImplementedError'}){_where_in_diffusion_py(exc)}.")
    except pytest.fail.Exception:
        raise
    except Exception as exc:  # noqa: BLE001 - any error in student code becomes a failure message
        message = f"{what} raised {type(exc).__name__}: {str(exc).strip()[:300]}{_where_in_diffusion_py(exc)}."
        hint = _exception_hint(str(exc))
        fail(message + (f"\n  hint: {hint}" if hint else ""))


def _fmt(values, n=4):
    flat = values.reshape(-1)
    shown = ", ".join(f"{v:.6g}" for v in flat[:n].tolist())
    return f"[{shown}, ...]" if flat.numel() > n else f"[{shown}]"


def _summarize_rows(labels, bad_rows):
    bad = [labels[i] for i in bad_rows]
    good = [labels[i] for i in range(len(labels)) if i not in set(bad_rows)]
    shown = ", ".join(bad if len(bad) <= 8 else bad[:4] + ["..."] + bad[-3:])
    text = f"  wrong at {len(bad)} of {len(labels)}: {shown}"
    if good and len(good) <= 8:
        text += f"; right at {', '.join(good)}"
    elif good:
        text += f"; right at the other {len(good)}"
    return text + "\n"


def check_output(name, got, what=None):
    """Compare a probe's output with the fixture; on mismatch, fail with a teaching message."""
    _, rtol, atol, labels, description = PROBES[name]
    what = what or description
    ref = reference()["probes"][name]
    expected = ref["expected"]
    if not torch.is_tensor(got):
        fail(f"{what}: expected a tensor, got {type(got).__name__}.")
    got64 = got.detach().to("cpu", torch.float64)
    if got64.shape != expected.shape:
        fail(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got64.shape)}.")
    finite = torch.isfinite(got64)
    scale = max(1.0, float(expected.abs().max()))
    tol = atol * scale + rtol * expected.abs()
    bad = ~finite | ((got64 - expected).abs() > tol)
    if not bad.any():
        return
    message = f"{what} does not match the reference solution.\n"
    if labels is not None and expected.dim() >= 1 and expected.shape[0] == len(labels):
        bad_rows = [i for i in range(expected.shape[0]) if bad[i].any()]
        message += _summarize_rows(labels, bad_rows)
    if not finite.all():
        message += f"  {int((~finite).sum())} of {got64.numel()} values are nan or inf.\n"
    err = torch.where(finite, (got64 - expected).abs(), torch.full_like(got64, math.inf))
    flat = int(err.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), expected.shape)) if expected.dim() else ()
    where = f" [{labels[index[0]]}]" if labels is not None and index and index[0] < len(labels) else ""
    message += (f"  largest error at index {index}{where}: expected {expected.reshape(-1)[flat].item():.6g}, "
                f"got {got64.reshape(-1)[flat].item():.6g}\n")
    if expected.numel() > 1:
        message += f"  expected (first values): {_fmt(expected)}\n  got      (first values): {_fmt(got64)}\n"
    hints = _known_mistakes(ref, got64)
    if hints:
        which = "a known mistake" if len(hints) == 1 else "one of these known mistakes"
        message += f"  This output matches {which}:\n" + "".join(f"    - {h}\n" for h in hints)
    else:
        message += "  (no known mistake matches; re-check the equation named above step by step)\n"
    fail(message.rstrip())


def subsample_index(numel):
    return torch.linspace(0, numel - 1, min(numel, N_SUBSAMPLE)).round().long()


def _known_mistakes(ref, got64):
    rows, hint_ids = ref["mistakes"], ref["mistake_hints"]
    if rows.numel() == 0 or not torch.isfinite(got64).all():
        return []
    sub = got64.reshape(-1)[subsample_index(got64.numel())]
    exp = ref["expected"].reshape(-1)[subsample_index(got64.numel())]
    scale = max(1.0, float(exp.abs().max()))
    hints = []
    for row, ids in zip(rows.double(), hint_ids):
        if ((sub - row).abs() <= 1e-4 * scale + 1e-3 * row.abs()).all():
            hints.extend(reference()["hints"][i] for i in ids)
    return list(dict.fromkeys(hints))[:3]


def run_probe(name, what=None):
    fn, *_, description = PROBES[name]
    return call(what or description, fn, diffusion)


def check_probe(name):
    check_output(name, run_probe(name))


# ================================================================== schedule (__init__)
@graded("schedule")
@pytest.mark.parametrize("T", TS)
def test_schedule_sqrt_alpha_bar(T):
    check_probe(f"schedule/sqrt_alpha_bar/T{T}")


@graded("schedule")
@pytest.mark.parametrize("T", TS)
def test_schedule_sqrt_one_minus_alpha_bar(T):
    check_probe(f"schedule/sqrt_one_minus_alpha_bar/T{T}")


@graded("schedule")
@pytest.mark.parametrize("T", TS)
def test_schedule_posterior_std(T):
    check_probe(f"schedule/posterior_std/T{T}")


def _plain_tensor_attributes(module):
    """Names of tensors kept as plain attributes (also inside lists, tuples and dicts): .to(device) skips them."""
    found, internals = [], set(vars(nn.Module()))
    for name, value in vars(module).items():
        if name in internals:
            continue
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        if any(torch.is_tensor(v) for v in values):
            found.append(name)
    return found


@graded("schedule")
def test_schedule_moves_with_module_to_device():
    """The schedule must live in registered buffers, so `diffusion.to(device)` moves it to the GPU."""
    d = call("Diffusion(model, image_size=5, channels=3, timesteps=50)", make, diffusion, 50)
    plain = _plain_tensor_attributes(d)
    if plain:
        fail(f"Diffusion keeps tensors in plain attributes ({', '.join('self.' + n for n in plain)}): diffusion.to(device) "
             "does not move those, so training on a GPU would fail with a device mismatch. Store the schedule with "
             "self.register_buffer(name, tensor) in __init__.")
    moved = call("Diffusion(...).to(torch.float64)", d.to, torch.float64)
    out = call("q_sample after .to(torch.float64)", moved.q_sample, uniform((2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 3).double(),
               torch.tensor([0, 49]), randn((2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 4).double())
    if not torch.is_tensor(out) or out.dtype != torch.float64 or out.device.type != "cpu":
        fail("After diffusion.to(torch.float64), q_sample on float64 inputs should return float64 on the inputs' device.")


# ================================================================== q_sample
@graded("q_sample")
@pytest.mark.parametrize("T", TS)
def test_q_sample_matches_reference(T):
    check_probe(f"q_sample/T{T}")


@graded("q_sample")
def test_q_sample_shape_and_dtype():
    d = call("Diffusion(...)", make, diffusion, 50)
    for shape in [(1, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), (7, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)]:
        x_0, noise = uniform(shape, 1), randn(shape, 2)
        out = call("q_sample", d.q_sample, x_0, torch.arange(shape[0]) % 50, noise)
        if not torch.is_tensor(out) or tuple(out.shape) != shape:
            fail(f"q_sample on a batch of shape {shape} returned shape "
                 f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}; expected {shape}.")
        if out.dtype != torch.float32:
            fail(f"q_sample returned {out.dtype} for float32 inputs; expected float32. The U-Net's weights are float32, "
                 "so float64 x_t would crash training: store the schedule as float32 buffers (compute in float64 "
                 "and cast), or cast the result back with .to(x_0.dtype).")


# ================================================================== p_losses
@graded("p_losses")
@pytest.mark.parametrize("T,which", [(T, w) for T in TS for w in ("first", "last", "mixed")])
def test_p_losses_matches_reference(T, which):
    check_probe(f"p_losses/T{T}/{which}")


@graded("p_losses")
@pytest.mark.parametrize("T", TS)
def test_p_losses_feeds_x_t_and_t_to_model(T):
    check_output(f"p_losses/model_t/T{T}", run_probe(f"p_losses/model_t/T{T}"))
    check_output(f"p_losses/model_x/T{T}", run_probe(f"p_losses/model_x/T{T}"))


@graded("p_losses")
def test_p_losses_returns_differentiable_scalar():
    loss, model = call("p_losses", run_p_losses, diffusion, 50, "mixed")
    if not torch.is_tensor(loss) or loss.dim() != 0:
        fail(f"p_losses should return a scalar (0-dim) tensor, got "
             f"{tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__}: reduce with the mean.")
    if loss.dtype != torch.float32:
        fail(f"p_losses returned {loss.dtype}; expected float32 (keep the schedule float32, or cast back to x_0.dtype).")
    if not loss.requires_grad:
        fail("The loss does not require grad, so training cannot update the model: don't detach the prediction "
             "and don't compute the loss under torch.no_grad().")
    loss.backward()
    if model.weight.grad is None or not torch.isfinite(model.weight.grad).all() or model.weight.grad.abs().sum() == 0:
        fail("loss.backward() left no (finite, nonzero) gradient on the model's weights.")


# ================================================================== forward
def _forward_run(T, batch, image_size, seed):
    model = TinyEps()
    d = call("Diffusion(...)", make, diffusion, T, model=model, image_size=image_size)
    x_0 = uniform((batch, CHANNELS, image_size, image_size), 71)
    noise = randn((batch, CHANNELS, image_size, image_size), 72)
    torch.manual_seed(seed)
    loss = call("forward(x_0, noise)", d, x_0, noise)
    if not model.calls:
        fail("forward never called the model: it should draw t and return self.p_losses(x_0, t, noise).")
    t_seen = model.calls[0][1]
    if t_seen.shape != (batch,):
        fail(f"forward gave the model t of shape {tuple(t_seen.shape)}; expected one step per image, shape ({batch},).")
    if t_seen.dtype.is_floating_point or t_seen.dtype == torch.bool:
        fail(f"forward drew t as {t_seen.dtype}; expected integer step indices (torch.randint gives torch.long).")
    return d, model, x_0, noise, loss, t_seen


@graded("forward")
@pytest.mark.parametrize("T", TS)
def test_forward_is_p_losses_at_the_drawn_t(T):
    d, model, x_0, noise, loss, t_seen = _forward_run(T, 6, IMAGE_SIZE, seed=0)
    if len(model.calls) != 1:
        fail(f"forward called the model {len(model.calls)} times; expected once (through p_losses).")
    if not torch.is_tensor(loss) or loss.dim() != 0:
        fail("forward should return the scalar loss of p_losses.")
    if not loss.requires_grad:
        fail("forward's loss does not require grad; training could not update the model.")
    if int(t_seen.min()) < 0 or int(t_seen.max()) > T - 1:
        fail(f"forward drew t = {t_seen.tolist()}, outside 0..{T - 1}.")
    model.calls.clear()
    expected = call("p_losses", d.p_losses, x_0, t_seen.long(), noise)
    if not torch.allclose(loss.detach().double(), expected.detach().double(), rtol=1e-5, atol=1e-7):
        fail(f"forward(x_0, noise) returned {loss.item():.6g}, but p_losses(x_0, t, noise) at the t it drew "
             f"(t = {t_seen.tolist()}) gives {expected.item():.6g}. forward should pass x_0 (already in [-1, 1]) "
             "and the given noise to p_losses unchanged.")


@graded("forward")
@pytest.mark.parametrize("T", TS)
def test_forward_draws_t_uniformly_over_all_steps(T):
    batch = 20 * T  # every step is drawn with overwhelming probability (and the seed makes it certain)
    _, _, _, _, _, t_seen = _forward_run(T, batch, 1, seed=1)
    values = torch.unique(t_seen.long())
    low, high = int(values.min()), int(values.max())
    problems = []
    if values.numel() == 1:
        problems.append(f"every image in the batch got the same t = {low}; draw one t per image, shape (batch,)")
    if low < 0 or high > T - 1:
        problems.append(f"drew t from {low} to {high}, outside the code indices 0..{T - 1} "
                        "(code index i is math step t = i + 1)")
    if low > 0:
        problems.append(f"never drew t = 0 in {batch} draws (smallest was {low}): use torch.randint(0, T, ...)")
    if high < T - 1:
        problems.append(f"never drew t = {T - 1} = T-1 in {batch} draws (largest was {high}): torch.randint's upper "
                        "bound is exclusive, so use torch.randint(0, T, ...)")
    if not problems and values.numel() != T:
        problems.append(f"drew only {values.numel()} of the {T} steps in {batch} draws")
    if problems:
        fail(f"forward should draw t uniformly from {{0, ..., {T - 1}}} (T={T}):\n  " + "\n  ".join(problems))


# ================================================================== p_sample
@graded("p_sample")
@pytest.mark.parametrize("T,t_index", [(T, i) for T in TS for i in (T - 1, T // 2, 1, 0)])
def test_p_sample_matches_reference(T, t_index):
    check_probe(f"p_sample/T{T}/t_index{t_index}")


@graded("p_sample")
@pytest.mark.parametrize("T", TS)
def test_p_sample_mean_at_every_step(T):
    check_probe(f"p_sample/mean_every_step/T{T}")


@graded("p_sample")
def test_p_sample_noise_comes_from_noise_like():
    d = call("Diffusion(...)", make, diffusion, 50)
    x = randn((3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 5)
    outs = []
    for seed in (1, 2):
        d.noise_like = NoiseSequence(7)
        torch.manual_seed(seed)
        outs.append(call("p_sample(x, t, t_index=30)", d.p_sample, x, torch.full((3,), 30), 30))
        if not d.noise_like.calls:
            fail("p_sample at t_index=30 never called self.noise_like: draw z with self.noise_like(x.shape, x.device), "
                 "not torch.randn (the grader fixes the randomness through noise_like).")
        if d.noise_like.calls[0][0] != tuple(x.shape):
            fail(f"p_sample asked noise_like for shape {d.noise_like.calls[0][0]}; expected x's shape {tuple(x.shape)}.")
    if not torch.equal(outs[0], outs[1]):
        fail("With noise_like fixed, p_sample's output still changes with torch's global random seed: all of the "
             "step's randomness must come from self.noise_like (no torch.randn / randn_like).")
    last = []
    for seed in (3, 4):
        d.noise_like = NoiseSequence(seed)
        last.append(call("p_sample(x, t, t_index=0)", d.p_sample, x, torch.zeros(3, dtype=torch.long), 0))
    if not torch.allclose(last[0], last[1], rtol=0, atol=1e-6):
        fail("At the last step (t_index = 0, math t = 1) p_sample's output depends on the noise: Algorithm 2 "
             "adds no noise there (z = 0), it returns the mean.")


@graded("p_sample")
def test_p_sample_calls_model_with_x_t_and_t():
    model = TinyEps()
    d = call("Diffusion(...)", make, diffusion, 50, model=model)
    d.noise_like = NoiseSequence(8)
    x = randn((3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 9)
    t = torch.full((3,), 17, dtype=torch.long)
    call("p_sample(x, t, t_index=17)", d.p_sample, x, t, 17)
    if not model.calls:
        fail("p_sample never called self.model: predict the noise with self.model(x, t).")
    x_seen, t_seen = model.calls[0]
    if x_seen.shape != x.shape or not torch.allclose(x_seen.double(), x.double(), atol=1e-6):
        fail("p_sample gave the model something other than its input x_t: call self.model(x, t).")
    if t_seen.reshape(-1).shape != t.shape or not torch.equal(t_seen.reshape(-1).long(), t):
        fail(f"p_sample gave the model t = {t_seen.reshape(-1)[:3].tolist()}..., expected the t it was called with "
             f"({t[:3].tolist()}...).")


@graded("p_sample")
def test_p_sample_shape_and_dtype():
    d = call("Diffusion(...)", make, diffusion, 50)
    d.noise_like = NoiseSequence(10)
    for t_index in (49, 0):
        x = randn((2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 11)
        out = call(f"p_sample(x, t, t_index={t_index})", d.p_sample, x, torch.full((2,), t_index), t_index)
        if not torch.is_tensor(out) or out.shape != x.shape or out.dtype != torch.float32:
            got = f"{tuple(out.shape)} {out.dtype}" if torch.is_tensor(out) else type(out).__name__
            fail(f"p_sample at t_index={t_index} should return x_(t-1) with x's shape and dtype "
                 f"({tuple(x.shape)} float32), got {got}.")


# ================================================================== p_sample_loop
class FakeStep:
    """Replaces p_sample: records (x, t, t_index) and returns a constant image per step, in [-0.9, 0.9]."""

    def __init__(self):
        self.calls, self.outputs = [], []

    def __call__(self, x, t, t_index):
        self.calls.append((x.detach().clone(), t, t_index))
        out = torch.full_like(x, 0.9 * math.cos(1.7 * len(self.calls)))
        self.outputs.append(out)
        return out


@graded("p_sample_loop")
@pytest.mark.parametrize("T", TS)
def test_p_sample_loop_visits_every_step_in_descending_order(T):
    d = call("Diffusion(...)", make, diffusion, T)
    d.p_sample = step = FakeStep()
    img = randn((2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 41)
    call("p_sample_loop", d.p_sample_loop, img)
    order = [int(c[2]) for c in step.calls]
    expected = list(range(T - 1, -1, -1))
    if order != expected:
        summary = f"{order[:3]} ... {order[-3:]}" if len(order) > 6 else str(order)
        problems = f"p_sample was called {len(order)} times with t_index = {summary}; expected {T} calls, " \
                   f"t_index = {T - 1}, {T - 2}, ..., 0 (T={T})."
        if order == expected[::-1]:
            problems += " The loop runs upward: Algorithm 2 goes from t = T down to t = 1 (reversed(range(T)))."
        elif order and order[0] != T - 1:
            problems += f" It should start at t_index = T-1 = {T - 1} (math step t = T)."
        elif order and order[-1] != 0:
            problems += " It should end at t_index = 0 (math step t = 1)."
        fail(problems)
    for k, (x, t, t_index) in enumerate(step.calls):
        if not torch.is_tensor(t) or t.shape != (2,) or t.dtype.is_floating_point:
            fail(f"At t_index={t_index}, p_sample got t = {t!r}; expected an integer tensor of shape (batch,) = (2,) "
                 "holding t_index for every image (torch.full((b,), t_index, dtype=torch.long)).")
        if t.device != img.device or not bool((t.long() == t_index).all()):
            fail(f"At t_index={t_index}, p_sample got t = {t.tolist()} on {t.device}; expected {[t_index] * 2} on "
                 f"{img.device}.")
        previous = img if k == 0 else step.outputs[k - 1]
        if not torch.equal(x, previous):
            fail(f"At t_index={t_index}, p_sample was given " + ("something other than the starting image x_T"
                 if k == 0 else "something other than the previous step's output") +
                 ": each step must feed x_(t-1) into the next.")


@graded("p_sample_loop")
def test_p_sample_loop_returns_images_in_0_1():
    d = call("Diffusion(...)", make, diffusion, 50)
    d.p_sample = step = FakeStep()
    out = call("p_sample_loop", d.p_sample_loop, randn((2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE), 42))
    if not step.outputs:
        fail("p_sample_loop never called self.p_sample.")
    x_0 = step.outputs[-1]
    expected = (x_0 + 1) / 2
    if not torch.is_tensor(out) or out.shape != expected.shape:
        fail(f"p_sample_loop should return images of shape {tuple(expected.shape)}, got "
             f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__}.")
    if torch.allclose(out, expected, atol=1e-6):
        return
    v, o = x_0.reshape(-1)[0].item(), out.reshape(-1)[0].item()
    message = (f"The last step returned x_0 = {v:.4f} (in [-1, 1]); p_sample_loop should map it to [0, 1], "
               f"i.e. (x_0 + 1) / 2 = {(v + 1) / 2:.4f}, but returned {o:.4f}.")
    if abs(o - v) < 1e-6:
        message += " Looks like unnormalize_to_zero_to_one is missing."
    elif abs(o - (2 * v - 1)) < 1e-6:
        message += " Looks like normalize_to_neg_one_to_one was used where unnormalize_to_zero_to_one belongs."
    elif abs(o - ((v + 1) / 2 + 1) / 2) < 1e-6:
        message += " Looks like the output was unnormalized twice."
    fail(message)


@graded("p_sample_loop")
@pytest.mark.parametrize("T", TS)
def test_p_sample_loop_matches_reference(T):
    check_probe(f"p_sample_loop/T{T}")


# ================================================================== sample
@graded("sample")
def test_sample_draws_start_with_noise_like():
    d = call("Diffusion(...)", make, diffusion, 50)
    d.noise_like = noise = NoiseSequence(3)
    seen = []

    def fake_loop(img):
        seen.append(img)
        return torch.full_like(img, 0.25)

    d.p_sample_loop = fake_loop
    out = call("sample(3)", d.sample, 3)
    expected_shape = (3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    if not noise.calls:
        fail("sample never called self.noise_like: draw the starting x_T with self.noise_like(shape, device), "
             "not torch.randn (the grader fixes the randomness through noise_like).")
    shape, device = noise.calls[0]
    if shape != expected_shape:
        fail(f"sample(3) asked noise_like for shape {shape}; expected (batch, channels, image_size, image_size) = "
             f"{expected_shape} (here channels=3, image_size=5).")
    if device is None or torch.device(device) != torch.device("cpu"):
        fail(f"sample passed device={device!r} to noise_like; pass the device the module lives on "
             "(e.g. the device of one of your buffers), so sampling works on a GPU.")
    if seen:
        if not torch.equal(seen[0], noise.draws[0]):
            fail("sample gave p_sample_loop something other than the noise_like draw as x_T.")
        if not torch.is_tensor(out) or not torch.equal(out, torch.full_like(seen[0], 0.25)):
            fail("sample should return p_sample_loop's images unchanged (they are already in [0, 1]).")


@graded("sample")
@pytest.mark.parametrize("T", TS)
def test_sample_matches_reference(T):
    check_probe(f"sample/T{T}")


@graded("sample")
def test_sample_shape_dtype_range():
    d = call("Diffusion(...)", make, diffusion, 50)
    for batch in (1, 4):
        d.noise_like = NoiseSequence(batch)
        out = call(f"sample({batch})", d.sample, batch)
        shape = (batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
        if not torch.is_tensor(out) or tuple(out.shape) != shape or out.dtype != torch.float32:
            got = f"{tuple(out.shape)} {out.dtype}" if torch.is_tensor(out) else type(out).__name__
            fail(f"sample({batch}) should return float32 images of shape {shape}, got {got}.")
        if not torch.isfinite(out).all() or out.min() < 0 or out.max() > 1:
            fail(f"sample({batch}) returned values from {out.min().item():.4g} to {out.max().item():.4g}; "
                 "images must lie in [0, 1].")
        if out.requires_grad:
            fail("sample's output requires grad; sampling should run without autograd (@torch.no_grad()).")
