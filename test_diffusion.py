"""Graded tests for diffusion.py (the DDPM homework).

    pytest test_diffusion.py                 # everything; your score per function is printed at the end
    pytest test_diffusion.py -k q_sample     # the checks of one function

What is graded and how much: POINTS below (the only place the weights live). A function's points are
split evenly over its checks, so every passing check earns partial credit.

How a check works (the Gradescope autograder runs these same checks):
  * a *probe* calls your `Diffusion` on inputs made from a seed and returns plain numbers: its outputs,
    what it gave the model (a tiny deterministic stand-in for the U-Net, `TinyEps`, a real nn.Module with a
    parameter and a buffer), and the shapes it asked `noise_like` for;
  * a *judge* compares those numbers with the reference solution's numbers for the same inputs and explains
    any difference (with the known mistake it looks like, when one matches).
Here the reference numbers come from test_fixtures/reference_outputs.json, made for fixed inputs. The
autograder draws fresh inputs (other seeds, other T) for every submission and computes the reference numbers
itself, so only a correct implementation passes there.

Each function is graded on its own: where a check would otherwise also depend on another of your functions,
it is also run with a stand-in for that function (e.g. p_losses with a stand-in q_sample, forward with a
stand-in p_losses, p_sample_loop with a stand-in p_sample, sample with a stand-in p_sample_loop), and the check
passes if either way is right. So draw sampling noise through `self.noise_like(shape, device)`, call
`self.q_sample`, `self.p_losses`, `self.p_sample` and `self.p_sample_loop` rather than inlining them (inlined
code is still graded, through your own functions), and use only the public API: buffer names, float32 vs
float64 arithmetic, `extract` vs plain indexing are up to you.
"""
import functools
import json
import math
import operator
import os
import random
import re
import time
import traceback
import zlib

import pytest
import torch
from torch import nn

import diffusion

# ---------------------------------------------------------------------------------------------------
# Points per graded function (100 in all). Partial credit: points * (checks passed / checks of that function).
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

FIXTURE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_fixtures", "reference_outputs.json")
CHANNELS, IMAGE_SIZE = 3, 5  # distinct on purpose, so a mixed-up shape shows
SIZES = ("small", "large")
LOCAL_PARAMS = {"T": {"small": 50, "large": 1000}, "mid": {"small": 25, "large": 500}, "seed": 20240601}
N_SUBSAMPLE = 48  # values of an output compared with the known mistakes
MAX_VALUES = 200_000  # a probe never sends more numbers than this for one tensor


def draw_params(rng):
    """Inputs of one grading run. The autograder calls this with a secret random.Random; locally LOCAL_PARAMS."""
    small, large = rng.randint(20, 120), rng.randint(600, 1100)
    return {"T": {"small": small, "large": large},
            "mid": {"small": rng.randint(2, small - 2), "large": rng.randint(2, large - 2)},
            "seed": rng.getrandbits(48)}


def seed_of(params, key):
    return (params["seed"] * 1000003 + zlib.crc32(key.encode())) % (2 ** 62)


# ------------------------------------------------------------------ stand-ins for the U-Net and the noise
class TinyEps(nn.Module):
    """Deterministic noise predictor eps(x, t) with a parameter and a buffer, like a real U-Net.

    Smooth in x, different for every t, one weight per channel; follows .to(device / dtype). Records every call.
    """

    def __init__(self, channels=CHANNELS):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.6, 1.4, channels))
        self.register_buffer("frequency", torch.tensor(0.37))
        self.calls = []

    def forward(self, x, time):
        self.calls.append((x.detach().clone(), time.detach().clone() if torch.is_tensor(time) else time))
        w = self.weight.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
        phase = torch.cos(time.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))) * self.frequency.to(x.dtype) + 0.5)
        return torch.tanh(w * x + phase) * 1.3 + 0.2 * phase


class ConstEps(TinyEps):
    """Predicts the same noise value everywhere (isolates the schedule inside p_sample)."""

    def __init__(self, value, channels=1):
        super().__init__(channels)
        self.register_buffer("value", torch.tensor(float(value)))

    def forward(self, x, time):
        self.calls.append((None, None))
        return torch.zeros_like(x) + self.value.to(x.dtype) + 0.0 * self.weight.sum().to(x.dtype)


class NoiseFeed:
    """Replaces Diffusion.noise_like: N(0, I) draws from a seed (or a constant); records (shape, device) of each call."""

    def __init__(self, seed=0, value=None):
        self.generator = torch.Generator().manual_seed(int(seed))
        self.value = value
        self.calls = []
        self.draws = []

    def __call__(self, shape, device=None, *args, **kwargs):
        shape = tuple(int(s) for s in shape)
        self.calls.append((list(shape), None if device is None else str(torch.device(device).type)))
        draw = torch.full(shape, float(self.value)) if self.value is not None else torch.randn(shape, generator=self.generator)
        self.draws.append(draw)
        return draw.to(device) if device is not None else draw


class GlobalNoise:
    """Replaces Diffusion.noise_like with draws from torch's global generator: what a p_sample or sample that calls
    torch.randn / randn_like instead of noise_like draws after the same torch.manual_seed. Lets the value checks
    judge such code's math (the noise_like checks still fail it)."""

    def __call__(self, shape, device=None, *args, **kwargs):
        return torch.randn(tuple(int(s) for s in shape), device=device)


class StandInQ:
    """Stand-in q_sample: a[t] x_0 + b[t] noise with arbitrary per-step coefficients; records its calls."""

    def __init__(self, a, b):
        self.a, self.b, self.calls = a, b, 0

    def __call__(self, x_0, t, noise):
        self.calls += 1
        shape = (-1,) + (1,) * (x_0.dim() - 1)
        return self.a.to(x_0)[t].view(shape) * x_0 + self.b.to(x_0)[t].view(shape) * noise


class StandInLoss:
    """Stand-in p_losses: records (x_0, t, noise) and returns a scalar that depends on the model's weights."""

    def __init__(self, model, scale):
        self.model, self.scale, self.calls = model, scale, []

    def __call__(self, x_0, t, noise):
        self.calls.append((x_0, t, noise))
        return self.model.weight.sum() * self.scale


class StandInStep:
    """Stand-in p_sample: 0.9 tanh(a_k x + b_k + s) for the k-th call, s = +1, -1, +1, ... over the pixels, so
    every step's output (x_0 included) holds both signs inside (-0.9, 0.9), as real images in [-1, 1] do, and a
    clamp to the wrong range always shows; records (t_index, t, x)."""

    def __init__(self, a, b):
        self.a, self.b, self.calls = a, b, []

    def __call__(self, x, t, t_index):
        k = len(self.calls)
        self.calls.append((t_index, t, x))
        i = k % len(self.a)
        signs = (1 - 2 * (torch.arange(x.numel(), device=x.device) % 2)).reshape(x.shape).to(x.dtype)
        return 0.9 * torch.tanh(float(self.a[i]) * x + float(self.b[i]) + signs)


class StandInLoop:
    """Stand-in p_sample_loop: images in [0, 1] made from x_T and the model's weights; records x_T."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, img):
        self.calls.append(img)
        w = self.model.weight.to(img).view(1, -1, *([1] * (img.dim() - 2)))
        return (torch.tanh(img * w) + 1) / 2


# ------------------------------------------------------------------ inputs (the same on both sides, from seeds)
def generator(seed):
    return torch.Generator().manual_seed(int(seed) % (2 ** 63))


def randn(shape, seed):
    return torch.randn(shape, generator=generator(seed))


def uniform(shape, seed, low=-1.0, high=1.0):
    """Values in [low, high] (default [-1, 1], like normalized images)."""
    return torch.rand(shape, generator=generator(seed)) * (high - low) + low


def steps(T, n, seed):
    """n step indices: 0, T-1, then random ones in 0..T-1."""
    rest = torch.randint(0, T, (max(0, n - 2),), generator=generator(seed))
    return torch.cat([torch.tensor([0, T - 1]), rest])[:n].long()


def image(batch, seed, image_size=IMAGE_SIZE, kind=randn):
    return kind((batch, CHANNELS, image_size, image_size), seed)


# ------------------------------------------------------------------ probes (run on the submission and on the reference)
class ProbeError(Exception):
    pass


def _where_in_diffusion_py(exc):
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.basename(f.filename) == "diffusion.py"]
    if not frames:
        return ""
    f = frames[-1]
    return f" (diffusion.py line {f.lineno}, in {f.name}: `{(f.line or '').strip()}`)"


def _exception_hint(text):
    text = text.lower()
    if "device" in text or "meta" in text:
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


def error_record(what, exc):
    if isinstance(exc, NotImplementedError):
        return {"error": f"{what}: not implemented yet ({str(exc) or 'NotImplementedError'}).", "todo": str(exc)[:200]}
    message = f"{what} raised {type(exc).__name__}: {str(exc).strip()[:300]}{_where_in_diffusion_py(exc)}."
    hint = _exception_hint(str(exc))
    return {"error": message + (f"\n  hint: {hint}" if hint else "")}


def attempt(what, fn, *args, **kwargs):
    """Run student code: (result, None) or (None, error record)."""
    try:
        return fn(*args, **kwargs), None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any error in student code becomes a message
        return None, error_record(what, exc)


def record(x, values=True):
    """A tensor as plain data: shape, dtype, device, requires_grad and (unless asked not to) its values."""
    if not torch.is_tensor(x):
        return {"type": type(x).__name__}
    out = {"shape": [int(s) for s in x.shape], "dtype": str(x.dtype).replace("torch.", ""),
           "device": x.device.type, "grad": bool(x.requires_grad)}
    if values and x.device.type != "meta" and x.numel() <= MAX_VALUES:
        out["values"] = x.detach().to("cpu", torch.float64).reshape(-1).tolist()
    return out


def new(mod, T, model=None, channels=CHANNELS, image_size=IMAGE_SIZE):
    model = TinyEps(channels) if model is None else model
    return mod.Diffusion(model, image_size=image_size, channels=channels, timesteps=T)


def instance(mod, T, model, channels=CHANNELS, image_size=IMAGE_SIZE):
    """A Diffusion for checks that replace the functions it needs: the student's __init__ if it runs, else a bare one."""
    d, err = attempt("Diffusion(...)", new, mod, T, model, channels, image_size)
    if err is None:
        return d
    d = mod.Diffusion.__new__(mod.Diffusion)
    nn.Module.__init__(d)
    d.model, d.image_size, d.channels, d.num_timesteps = model, image_size, channels, int(T)
    return d


def stored_vectors(d, T):
    """Every float tensor of length T or T+1 the instance keeps (buffers, attributes, lists, dicts), by value."""
    found, seen = [], set()

    def add(name, value):
        if not torch.is_tensor(value) or not value.dtype.is_floating_point or value.device.type == "meta":
            return
        if value.numel() not in (T, T + 1) or id(value) in seen or len(found) >= 64:
            return
        seen.add(id(value))
        found.append({"name": name, "values": value.detach().to("cpu", torch.float64).reshape(-1).tolist()})

    for name, value in d.named_buffers():
        if not name.startswith("model."):
            add(name, value)
    internals = set(vars(nn.Module()))
    for name, value in list(vars(d).items()):
        if name in internals:
            continue
        if isinstance(value, dict):
            for k, v in list(value.items())[:64]:
                add(f"{name}[{k!r}]", v)
        elif isinstance(value, (list, tuple)):
            for k, v in enumerate(value[:64]):
                add(f"{name}[{k}]", v)
        else:
            add(name, value)
    return found


def model_call(model, values=True):
    if not model.calls:
        return None
    x, t = model.calls[0]
    return {"x": record(x, values) if x is not None else None, "t": record(t) if t is not None else None,
            "n": len(model.calls)}


def probe_schedule(mod, T, x, eps):
    """The schedule as stored (any names) and as q_sample / p_sample reveal it."""
    d, err = attempt(f"Diffusion(model, image_size=1, channels=1, timesteps={T})", new, mod, T, TinyEps(1), 1, 1)
    if err:
        return {"init": err}
    out = {"stored": stored_vectors(d, T)}
    a, err = attempt("q_sample(x_0=1, t, noise=0)", d.q_sample, torch.ones(T, 1, 1, 1), torch.arange(T), torch.zeros(T, 1, 1, 1))
    out["sqrt_alpha_bar"] = err or record(a)
    b, err = attempt("q_sample(x_0=0, t, noise=1)", d.q_sample, torch.zeros(T, 1, 1, 1), torch.arange(T), torch.ones(T, 1, 1, 1))
    out["sqrt_one_minus_alpha_bar"] = err or record(b)
    # eps = 0 and x_t = 0 make x0_hat = 0 and the mean 0, so with z = 1 the step returns sigma_t
    d0, err = attempt("Diffusion(...)", new, mod, T, ConstEps(0.0), 1, 1)
    sigma = []
    for i in range(1, T):
        if err:
            break
        d0.noise_like = NoiseFeed(value=1.0)
        s, err = attempt(f"p_sample(x=0, t={i}, t_index={i}) with eps=0 and noise 1", d0.p_sample,
                         torch.zeros(1, 1, 1, 1), torch.full((1,), i, dtype=torch.long), i)
        if err is None:
            sigma.append(torch.as_tensor(s).reshape(-1)[:1])
    out["sigma"] = err or record(torch.cat(sigma) if sigma else torch.zeros(0))
    # no noise (z = 0): the step returns the posterior mean; two x_t values per step
    dm, err = attempt("Diffusion(...)", new, mod, T, ConstEps(eps), 1, 1)
    xs = torch.tensor(x, dtype=torch.float32).view(2, 1, 1, 1)
    feeds = [NoiseFeed(value=0.0), GlobalNoise()]  # the second: noise as torch.randn draws it after the same seed
    for key, feed in zip(("mean", "mean_global_noise"), feeds):
        mean = []
        for i in range(T):
            if err:
                break
            dm.noise_like = feed
            torch.default_generator.manual_seed(i)  # torch.manual_seed also seeds every accelerator: 100x slower
            m, err = attempt(f"p_sample(x, t={i}, t_index={i}) with eps={eps:.3g} and noise 0", dm.p_sample, xs,
                             torch.full((2,), i, dtype=torch.long), i)
            if err is None:
                mean.append(torch.as_tensor(m).reshape(-1)[:2])
        out[key] = err or record(torch.stack(mean) if mean else torch.zeros(0))
    out["mean_noise_like_calls"] = len(feeds[0].calls)
    return out


def probe_device(mod, T):
    """Build, move to the meta device (like .to('cuda'), without a GPU), and run q_sample and p_sample there."""
    d, err = attempt("Diffusion(...)", new, mod, T)
    if err:
        return {"init": err}
    _, err = attempt("diffusion.to('meta')", d.to, "meta")
    if err:
        return {"to": err}
    out = {"tensors": []}
    for name, value in list(d.named_buffers()) + list(vars(d).items()):
        if torch.is_tensor(value) and value.dtype.is_floating_point and not name.startswith("model."):
            out["tensors"].append([name, value.device.type])
    x = torch.zeros(2, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, device="meta")
    t = torch.zeros(2, dtype=torch.long, device="meta")
    q, err = attempt("q_sample on the meta device", d.q_sample, x, t, x)
    out["q_sample"] = err or record(q, values=False)
    p, err = attempt("p_sample on the meta device", d.p_sample, x, t + T // 2, T // 2)
    out["p_sample"] = err or record(p, values=False)
    return out


def probe_q_sample(mod, T, seed):
    x_0, noise, t = image(5, seed, kind=uniform), image(5, seed + 1), steps(T, 5, seed + 2)
    d, err = attempt("Diffusion(...)", new, mod, T)
    if err:
        return {"init": err}
    out, err = attempt(f"q_sample(x_0, t={t.tolist()}, noise)", d.q_sample, x_0, t, noise)
    result = {"out": err or record(out), "stored": stored_vectors(d, T)}
    shapes = []
    for batch in (1, 7):
        o, err = attempt("q_sample", d.q_sample, image(batch, seed, kind=uniform), torch.arange(batch) % T, image(batch, seed))
        shapes.append(err or record(o, values=False))
    result["shapes"] = shapes
    return result


def p_losses_inputs(T, seed):
    return (image(4, seed, kind=uniform), steps(T, 4, seed + 1), image(4, seed + 2),
            uniform((T,), seed + 3, 0.05, 1.0), uniform((T,), seed + 4, 0.05, 1.0))


def _p_losses_route(d, model, x_0, t, noise):
    loss, err = attempt(f"p_losses(x_0, t={t.tolist()}, noise)", d.p_losses, x_0, t, noise)
    if err:
        return err
    out = {"loss": record(loss), "model": model_call(model)}
    if torch.is_tensor(loss) and loss.requires_grad and loss.numel() == 1:
        _, err = attempt("loss.backward()", loss.backward)
        grad = model.weight.grad
        out["weight_grad"] = err or (record(grad) if grad is not None else None)
    return out


def probe_p_losses(mod, T, seed):
    x_0, t, noise, a, b = p_losses_inputs(T, seed)
    model = TinyEps()
    d, err = attempt("Diffusion(...)", new, mod, T, model)
    own = err or _p_losses_route(d, model, x_0, t, noise)
    model = TinyEps()
    d = instance(mod, T, model)
    d.q_sample = q = StandInQ(a, b)
    isolated = _p_losses_route(d, model, x_0, t, noise)
    if isinstance(isolated, dict) and "error" not in isolated:
        isolated["q_calls"] = q.calls
    return {"own": own, "isolated": isolated}


def probe_forward(mod, T, seed, torch_seed, batch, image_size, values):
    x_0, noise = image(batch, seed, image_size, kind=uniform), image(batch, seed + 1, image_size)
    scale = float(uniform((1,), seed + 2, 0.5, 2.0))
    # with a stand-in p_losses: forward must draw t and hand (x_0, t, noise) over unchanged
    model = TinyEps()
    d = instance(mod, T, model, image_size=image_size)
    d.p_losses = stand_in = StandInLoss(model, scale)
    torch.manual_seed(torch_seed)
    loss, err = attempt("forward(x_0, noise)", d, x_0, noise)
    isolated = err or {"loss": record(loss), "calls": len(stand_in.calls)}
    if not err and stand_in.calls:
        x_seen, t_seen, noise_seen = stand_in.calls[0]
        isolated.update(t=record(t_seen), x_0=record(x_seen, values), noise=record(noise_seen, values))
    # with its own p_losses: the t the model saw, and p_losses at that t
    model = TinyEps()
    d, err = attempt("Diffusion(...)", new, mod, T, model, image_size=image_size)
    own = err
    if not err:
        torch.manual_seed(torch_seed)
        loss, err = attempt("forward(x_0, noise)", d, x_0, noise)
        own = err or {"loss": record(loss), "model": model_call(model, values=False)}
        if not err and model.calls and torch.is_tensor(model.calls[0][1]) and values:
            t_seen = model.calls[0][1]
            model.calls.clear()
            again, err = attempt("p_losses(x_0, t, noise) at forward's t", d.p_losses, x_0, t_seen.long(), noise)
            own["p_losses_at_t"] = err or record(again)
    return {"isolated": isolated, "own": own}


def probe_p_sample(mod, T, seed, t_index):
    x = image(3, seed)
    model = TinyEps()
    d, err = attempt("Diffusion(...)", new, mod, T, model)
    if err:
        return {"init": err}
    d.noise_like = feed = NoiseFeed(seed + 1)
    t = torch.full((3,), t_index, dtype=torch.long)
    torch.manual_seed(seed + 2)
    out, err = attempt(f"p_sample(x_t, t, t_index={t_index})", d.p_sample, x, t, t_index)
    result = {"out": err or record(out), "model": model_call(model), "noise_like": feed.calls[:4]}
    # the same step with its noise drawn as torch.randn would after the same seed, and without noise (the
    # difference of the two is the noise term, whose float32 rounding the torch.randn route allows for)
    for key, feed in (("out_global_noise", GlobalNoise()), ("out_zero_noise", NoiseFeed(value=0.0))):
        d.noise_like = feed
        torch.manual_seed(seed + 2)
        out, err = attempt(f"p_sample(x_t, t, t_index={t_index})", d.p_sample, x, t, t_index)
        result[key] = err or record(out)
    return result


def probe_p_sample_noise(mod, T, seed, t_index):
    """Where p_sample's randomness comes from: noise_like (two feeds), torch's global seed, and none at t_index 0."""
    x = image(3, seed)
    d, err = attempt("Diffusion(...)", new, mod, T)
    if err:
        return {"init": err}
    result = {}
    for name, feed_seed, torch_seed, i in [("a", seed + 1, seed + 2, t_index), ("b", seed + 1, seed + 3, t_index),
                                           ("c", seed + 4, seed + 2, t_index), ("last_a", seed + 1, seed + 2, 0),
                                           ("last_b", seed + 4, seed + 3, 0)]:
        d.noise_like = feed = NoiseFeed(feed_seed)
        torch.manual_seed(torch_seed)
        out, err = attempt(f"p_sample(x, t, t_index={i})", d.p_sample, x, torch.full((3,), i, dtype=torch.long), i)
        result[name] = err or record(out)
        result[name + "_noise_like"] = feed.calls[:4]
    return result


def as_index(value):
    """A step index as an int: a Python int, or what stands for one (a 0-d integer tensor, a numpy integer: a loop
    over torch.arange passes those, and p_sample works the same with them); None for anything else. Exact types
    only: a subclass could report one index here and behave as another in the submission's own p_sample."""
    integer_tensor = type(value) is torch.Tensor and value.dim() == 0 and not value.dtype.is_floating_point and (
        value.dtype not in (torch.bool, torch.complex64, torch.complex128))
    numpy_integer = type(value).__module__ == "numpy" and type(value).__name__.startswith(("int", "uint"))
    return operator.index(value) if type(value) is int or integer_tensor or numpy_integer else None


def loop_inputs(T, seed):
    return image(2, seed), uniform((T,), seed + 1, 0.5, 1.5), uniform((T,), seed + 2, -0.5, 0.5)


def probe_p_sample_loop(mod, T, seed):
    img, a, b = loop_inputs(T, seed)
    d = instance(mod, T, TinyEps())
    d.p_sample = step = StandInStep(a, b)
    out, err = attempt("p_sample_loop(x_T)", d.p_sample_loop, img)
    calls = []
    for t_index, t, x in step.calls[: 3 * T + 3]:
        index = as_index(t_index)
        calls.append([index if index is not None else repr(t_index)[:40],
                      record(t) if torch.is_tensor(t) and t.numel() <= 16 else repr(t)[:40],
                      float(x.reshape(-1)[0]) if torch.is_tensor(x) and x.numel() else None])
    isolated = err or {"out": record(out), "calls": calls, "n": len(step.calls)}
    d, err = attempt("Diffusion(...)", new, mod, T)
    own = err
    if not err:
        d.noise_like = NoiseFeed(seed + 3)
        out, err = attempt("p_sample_loop(x_T)", d.p_sample_loop, img)
        own = err or {"out": record(out)}
    return {"isolated": isolated, "own": own}


def probe_sample(mod, T, seed, batch):
    a, b = uniform((T,), seed + 1, 0.5, 1.5), uniform((T,), seed + 2, -0.5, 0.5)
    result = {}
    for route in ("stand_in_loop", "stand_in_step", "own", "stand_in_loop_global_noise"):
        model = TinyEps()
        if route == "own":
            d, err = attempt("Diffusion(...)", new, mod, T, model)
            if err:
                result[route] = err
                continue
        else:
            d = instance(mod, T, model)
        d.noise_like = feed = NoiseFeed(seed)
        loop = None
        if route.startswith("stand_in_loop"):
            d.p_sample_loop = loop = StandInLoop(model)
        elif route == "stand_in_step":
            d.p_sample = StandInStep(a, b)
        if route == "stand_in_loop_global_noise":  # x_T as torch.randn draws it after the same seed
            d.noise_like = GlobalNoise()
        torch.manual_seed(seed + 7)
        out, err = attempt(f"sample({batch})", d.sample, batch)
        rec = err or {"out": record(out), "noise_like": feed.calls[:4]}
        if not err and loop is not None:
            rec["loop_input"] = record(loop.calls[0]) if loop.calls else None
        result[route] = rec
    return result


PROBES = {"schedule": probe_schedule, "device": probe_device, "q_sample": probe_q_sample, "p_losses": probe_p_losses,
          "forward": probe_forward, "p_sample": probe_p_sample, "p_sample_noise": probe_p_sample_noise,
          "p_sample_loop": probe_p_sample_loop, "sample": probe_sample}
NO_REFERENCE = {"device", "p_sample_noise"}  # judged without the reference's numbers


def request_key(request):
    return json.dumps(request, sort_keys=True)


def run_request(mod, request):
    """Run one probe request {"probe": name, "args": {...}} on a diffusion module; plain data back."""
    torch.manual_seed(0)
    fn = PROBES[request["probe"]]
    try:
        return fn(mod, **request["args"])
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a probe never raises
        return error_record(f"probe {request['probe']}", exc)


# ------------------------------------------------------------------ judges (plain data in, verdict and message out)
def tensor_of(rec):
    """A probe's tensor record -> float64 tensor, or None if it is not a well-formed record with values."""
    if not isinstance(rec, dict) or not isinstance(rec.get("shape"), list) or not isinstance(rec.get("values"), list):
        return None
    shape, values = rec["shape"], rec["values"]
    if len(shape) > 8 or not all(type(s) is int and 0 <= s <= MAX_VALUES for s in shape):
        return None
    if math.prod(shape) != len(values) or len(values) > MAX_VALUES:
        return None
    clean = []
    for v in values:
        if type(v) is float or type(v) is int:
            try:
                clean.append(float(v))
            except OverflowError:
                clean.append(math.inf)
        else:
            clean.append(math.nan)
    return torch.tensor(clean, dtype=torch.float64).reshape(shape)


def error_of(rec):
    """The error message of a failed student call, or None."""
    return str(rec["error"])[:3000] if isinstance(rec, dict) and "error" in rec else None


def first_error(*recs):
    for rec in recs:
        if isinstance(rec, dict):
            for value in [rec] + [rec.get(k) for k in ("init", "to")]:
                e = error_of(value)
                if e:
                    return e
    return None


def close(got, expected, rtol=1e-3, atol=1e-5, slack=0.0):
    """|got - expected| <= atol * scale + rtol * |expected| + slack, everywhere (slack: an allowance per value)."""
    if got is None or expected is None or got.shape != expected.shape:
        return False
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return bool(torch.isfinite(got).all() and ((got - expected).abs() <= atol * scale + rtol * expected.abs() + slack).all())


def _fmt(values, n=4):
    flat = values.reshape(-1)
    shown = ", ".join(f"{v:.6g}" for v in flat[:n].tolist())
    return f"[{shown}, ...]" if flat.numel() > n else f"[{shown}]"


def _rows(labels, bad_rows):
    bad = [labels[i] for i in bad_rows]
    good = [labels[i] for i in range(len(labels)) if i not in set(bad_rows)]
    shown = ", ".join(bad if len(bad) <= 8 else bad[:4] + ["..."] + bad[-3:])
    text = f"  wrong at {len(bad)} of {len(labels)}: {shown}"
    if good and len(good) <= 8:
        text += f"; right at {', '.join(good)}"
    elif good:
        text += f"; right at the other {len(good)}"
    return text + "\n"


def compare(what, got_rec, ref_rec, rtol=1e-3, atol=1e-5, labels=None, slack=0.0):
    """None if the student's tensor record matches the reference's, else a teaching message."""
    error = error_of(got_rec)
    if error:
        return error
    expected = tensor_of(ref_rec)
    if expected is None:
        return f"{what}: the reference produced no output here (please tell the course staff)."
    if got_rec is None:
        return f"{what}: there was no result (an earlier step failed)."
    if not isinstance(got_rec, dict) or "shape" not in got_rec:
        return f"{what}: expected a tensor, got {got_rec.get('type', 'nothing') if isinstance(got_rec, dict) else 'nothing'}."
    got = tensor_of(got_rec)
    if got is None or list(got.shape) != list(expected.shape):
        shape = got_rec.get("shape")
        return f"{what}: expected shape {tuple(expected.shape)}, got {tuple(shape) if isinstance(shape, list) else shape}."
    if close(got, expected, rtol, atol, slack):
        return None
    finite = torch.isfinite(got)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    bad = ~finite | ((got - expected).abs() > atol * scale + rtol * expected.abs() + slack)
    message = f"{what} does not match the reference solution.\n"
    if labels is not None and expected.dim() >= 1 and expected.shape[0] == len(labels):
        message += _rows(labels, [i for i in range(expected.shape[0]) if bad[i].any()])
    if not finite.all():
        message += f"  {int((~finite).sum())} of {got.numel()} values are nan or inf.\n"
    err = torch.where(finite, (got - expected).abs(), torch.full_like(got, math.inf))
    flat = int(err.reshape(-1).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), expected.shape)) if expected.dim() else ()
    where = f" [{labels[index[0]]}]" if labels is not None and index and index[0] < len(labels) else ""
    message += (f"  largest error at index {index}{where}: expected {expected.reshape(-1)[flat].item():.6g}, "
                f"got {got.reshape(-1)[flat].item():.6g}\n")
    if expected.numel() > 1:
        message += f"  expected (first values): {_fmt(expected)}\n  got      (first values): {_fmt(got)}\n"
    return message.rstrip()


class Check:
    """One graded check: the probe requests it needs, and how to judge their outputs."""

    def __init__(self, name, function, requests, judge, primary=None):
        self.name, self.function, self.requests, self.judge, self.primary = name, function, requests, judge, primary

    def __repr__(self):
        return self.name


CHECKS = []


def check(name, function, requests, primary=None):
    def register(judge):
        assert function in POINTS, function
        CHECKS.append(Check(name, function, requests, judge, primary))
        return judge

    return register


def req(probe, **args):
    return {"probe": probe, "args": args}


def _labels(T, start=0):
    return [f"t={i}" for i in range(start, T)]


NOISE_ELSEWHERE = ("p_sample's math is right, but its noise did not come from self.noise_like (see the check "
                   "p_sample_noise_comes_from_noise_like).")


def noisy_output_allowance(with_noise, without_noise, rtol, rounding, relative_to_mean=False):
    """What a p_sample value check allows per value around a reference output with noise (`with_noise`; the
    same step without noise: `without_noise`): rtol of that output (of the mean alone where the noise_like route's
    noise is 0: relative_to_mean), plus the float32 rounding (float32_rounding) of the noise term sigma_t z,
    where a float32 schedule's sigma_t shows even when mean + sigma_t z is near 0 (measured: 9e-5 at T = 800,
    t_index 4). The noise_like and torch.randn routes get the same formula, so neither is looser: rtol of the
    mean, or 4 roundings, on the torch.randn route alone excused small errors of the mean (a red team's mean
    8e-4 off scored 98.5 with torch.randn against 93.8 with noise_like). Pass it to compare with rtol=0. Without
    the noisy output there is nothing to allow (compare reports the missing output); without the noise-free one,
    just rtol of the noisy output."""
    a, b = tensor_of(with_noise), tensor_of(without_noise)
    if a is None:
        return 0.0
    if b is None or a.shape != b.shape:
        return rtol * a.abs()
    return rtol * (b if relative_to_mean else a).abs() + rounding * (a - b).abs()


def schedule_rtol(T):
    """Relative tolerance, per t_index, for what p_sample computes from the schedule: 1e-3, plus float32_rounding.
    At T = 1000: 4.5e-3 at t_index = 1, 1.9e-3 at 10, 1.1e-3 in the middle. Real float32 submissions were measured to
    need up to 1.1e-3 at t_index = 1 (T from 600 to 1100); a wrong coefficient there is off by 10 % or more."""
    return 1e-3 + float32_rounding(T)


def float32_rounding(T):
    """Per t_index, the relative error a schedule kept in float32 (as correct as float64: the handout's original
    cosine_schedule is float32) brings into the posterior's coefficients, counting one float32 rounding (2**-24)
    where it is magnified: over each of 1 - alpha_bar_t, 1 - alpha_bar_{t-1} and 1 - alpha_t, differences of
    numbers near 1 that the posterior divides by (large near t = 1); in f(t) = cos(theta_t)^2 near theta = pi/2,
    whose relative error 2 theta / (pi/2 - theta) per rounding of theta reaches alpha_t and, through 1 - alpha_t,
    beta_t (large near t = T: measured 6.6e-5 in a real submission's posterior variance at T = 1093); and one per
    step of the cumulative product."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    theta = (steps / T + 0.008) / 1.008 * math.pi / 2
    f = torch.cos(theta) ** 2
    clipped = f[1:] / f[:-1] < 0.001  # the last step: alpha_T is the clip's 0.001, exact
    alphas = (f[1:] / f[:-1]).clamp(0.001, 1.0)  # eq. 14, as in the reference
    alphas_cumprod = torch.cumprod(alphas, 0)
    alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    near_one = 1 / (1 - alphas_cumprod) + 1 / (1 - alphas) + torch.where(
        alphas_cumprod_prev < 1, 1 / (1 - alphas_cumprod_prev).clamp(min=1e-300), torch.zeros_like(alphas))
    cos_near_zero = 2 * theta / (math.pi / 2 - theta).clamp(min=1e-300)
    alpha_error = torch.where(clipped, torch.zeros_like(alphas), cos_near_zero[1:] + cos_near_zero[:-1])
    return 2.0 ** -24 * (near_one + alpha_error * (1 + alphas / (1 - alphas)) + steps[1:])


# ================================================================== schedule (__init__)
def schedule_req(p, size):
    T = p["T"][size]
    x = uniform((2,), seed_of(p, f"schedule/{size}"), -0.9, 0.9).tolist()
    eps = float(uniform((1,), seed_of(p, f"schedule/{size}/eps"), 0.1, 0.5))
    return req("schedule", T=T, x=x, eps=eps)


def reference_quantities(ref):
    """Quantities any correct schedule may store, computed from the reference's buffers; name -> float64 tensor."""
    stored = {s["name"]: torch.tensor(s["values"], dtype=torch.float64) for s in ref.get("stored", [])}
    alphas, ab, ab_prev, var = (stored[n] for n in ("alphas", "alphas_cumprod", "alphas_cumprod_prev", "posterior_variance"))
    log_var = torch.log(torch.cat([var[1:2], var[1:]]))
    return {
        "alpha_bar": {"alphas_cumprod": ab, "sqrt_alphas_cumprod": ab.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ab).sqrt(),
                      "one_minus_alphas_cumprod": 1 - ab, "sqrt_recip_alphas_cumprod": ab.rsqrt(),
                      "sqrt_recipm1_alphas_cumprod": (1 / ab - 1).sqrt(), "log_one_minus_alphas_cumprod": torch.log(1 - ab),
                      "log_alphas_cumprod": torch.log(ab)},
        "posterior_variance": {"posterior_variance": var, "posterior_std": var.sqrt(),
                               "posterior_log_variance_clipped": log_var},
        "posterior_mean": {"alphas_cumprod_prev": ab_prev, "sqrt_alphas_cumprod_prev": ab_prev.sqrt(),
                           "posterior_mean_coef_x0": stored["posterior_mean_coef_x0"],
                           "posterior_mean_coef_xt": stored["posterior_mean_coef_xt"]},
        "alphas": {"alphas": alphas, "betas": 1 - alphas},
    }


def close_relative(got, target, rtol=1e-2):
    """Elementwise relative closeness (exact zeros must stay ~0): tiny values count as much as large ones."""
    if got.shape != target.shape or not torch.isfinite(got).all():
        return False
    return bool(((got - target).abs() <= rtol * target.abs() + 1e-12).all())


def stored_match(got, targets, T):
    """(student tensor name, quantity name) of the first stored tensor that equals one of `targets` by value
    (relative to each value, so a difference at tiny values, e.g. alpha_bar near t = T, shows)."""
    for s in got.get("stored", []) if isinstance(got.get("stored"), list) else []:
        if not isinstance(s, dict):
            continue
        v = tensor_of({"shape": [len(s.get("values", []))], "values": s.get("values")}) if isinstance(s.get("values"), list) else None
        if v is None:
            continue
        for candidate in ([v] if v.numel() == T else [v[1:], v[:-1]]):
            for name, target in targets.items():
                ok = torch.isfinite(target)
                if ok.any() and candidate.shape == target.shape and close_relative(candidate[ok], target[ok]):
                    return str(s.get("name"))[:60], name
    return None


# a group matches by storage when, for each of these sets, some stored tensor holds one of its quantities; alpha_bar
# needs both ends: quantities sensitive where alpha_bar -> 0 (t near T) and where it -> 1 (t near 0)
STORAGE_SETS = {
    "alpha_bar": [("alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_recip_alphas_cumprod", "log_alphas_cumprod"),
                  ("one_minus_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                   "log_one_minus_alphas_cumprod")],
    "posterior_variance": [("posterior_variance", "posterior_std", "posterior_log_variance_clipped")],
    "posterior_mean": [("alphas_cumprod_prev", "sqrt_alphas_cumprod_prev", "posterior_mean_coef_x0"),
                       ("posterior_mean_coef_xt",)],
}


def storage_match(got, ref, group, T):
    """[(student tensor, quantity)] covering every set of the group, or None."""
    quantities = reference_quantities(ref)[group]
    found = []
    for names in STORAGE_SETS[group]:
        match = stored_match(got, {n: quantities[n] for n in names}, T)
        if match is None:
            return None
        found.append(match)
    return found


SCHEDULE_GROUPS = {
    "alpha_bar": ("alpha_bar_t (eq. 12-14)", [("sqrt_alpha_bar", "sqrt(alpha_bar_t), read as q_sample(x_0=1, t, noise=0)"),
                                             ("sqrt_one_minus_alpha_bar", "sqrt(1 - alpha_bar_t), read as q_sample(x_0=0, t, noise=1)")]),
    "posterior_variance": ("the posterior variance sigma_t^2 (eq. 18)",
                           [("sigma", "sigma_t, read as p_sample(x=0, t, t_index) with eps=0 and noise_like -> 1")]),
    "posterior_mean": ("alpha_bar_{t-1} and the posterior-mean coefficients (eq. 18)",
                       [("mean", "the posterior mean, read as p_sample(x, t, t_index) with a constant eps and noise_like -> 0")]),
}


def judge_schedule(group, got, ref, T):
    title, readings = SCHEDULE_GROUPS[group]
    error = first_error(got)
    if error and "stored" not in got:
        return False, error
    found = storage_match(got, ref, group, T)
    if found:
        return True, "your Diffusion holds " + ", ".join(f"{q} (self.{n})" for n, q in found) + " of the reference schedule"
    problems = []
    for key, what in readings:
        labels = _labels(T, 1 if key == "sigma" else 0)
        problem = compare(f"{what} for T={T}", got.get(key), ref.get(key), rtol=1e-3, atol=1e-6, labels=labels)
        if problem is None:
            continue
        problems.append(problem)
    if not problems:
        return True, ""
    names = [str(s.get("name"))[:40] for s in got.get("stored", []) if isinstance(s, dict)]
    stored = (f"None of the tensors your Diffusion keeps ({', '.join(names[:12]) or 'none'}) holds {title} of the "
              "reference schedule, and your functions do not reveal it either:\n")
    return False, stored + "\n".join(problems)


for _size in SIZES:
    for _group in SCHEDULE_GROUPS:
        def _judge(got, ref, p, _group=_group, _size=_size):
            return judge_schedule(_group, got[0], ref[0], p["T"][_size])

        def _primary(got, _group=_group):
            key = SCHEDULE_GROUPS[_group][1][0][0]
            return got[0].get(key) if isinstance(got[0], dict) else None

        check(f"schedule_{_group}-{_size}_T", "schedule", functools.partial(lambda p, s: [schedule_req(p, s)], s=_size),
              primary=_primary)(_judge)


@check("schedule_follows_module_to_device", "schedule", lambda p: [req("device", T=p["T"]["small"])])
def judge_device(got, ref, p):
    rec = got[0]
    error = first_error(rec)
    if error and "q_sample" not in rec:
        return False, error
    device_errors = [error_of(rec.get(f)) for f in ("q_sample", "p_sample")
                     if error_of(rec.get(f)) and "not implemented" not in error_of(rec.get(f))]
    ran = [f for f in ("q_sample", "p_sample") if isinstance(rec.get(f), dict) and rec[f].get("device") == "meta"]
    off = [f for f in ("q_sample", "p_sample") if isinstance(rec.get(f), dict) and "device" in rec[f] and rec[f]["device"] != "meta"]
    left = [str(n) for n, dev in rec.get("tensors", []) if dev != "meta"] if isinstance(rec.get("tensors"), list) else []
    advice = ("diffusion.to(device) must move the schedule: store it with self.register_buffer(name, tensor) in __init__ "
              "(or move it yourself, e.g. to x.device, where you use it).")
    if off:
        return False, f"After diffusion.to('meta'), {', '.join(off)} returned a tensor on another device. " + advice
    if ran and not device_errors:
        return True, ""
    if device_errors:
        return False, "After diffusion.to('meta') (which stands in for .to('cuda')):\n  " + "\n  ".join(device_errors) + "\n" + advice
    if left:  # neither function runs yet: judge what .to() did to the stored tensors
        return False, f"After diffusion.to('meta'), these tensors stayed behind: {', '.join(left[:8])}. " + advice
    tensors = rec.get("tensors") if isinstance(rec.get("tensors"), list) else []
    if tensors:
        return True, ""
    return False, first_error(rec.get("q_sample"), rec.get("p_sample")) or "Diffusion keeps no schedule tensors."


# ================================================================== q_sample
def q_req(p, size):
    return req("q_sample", T=p["T"][size], seed=seed_of(p, f"q_sample/{size}"))


def alpha_bar_candidates(got, T):
    """Stored tensors that look like the student's own alpha_bar (or its square root): decreasing, in (0, 1]."""
    out = []
    for s in got.get("stored", []) if isinstance(got.get("stored"), list) else []:
        v = tensor_of({"shape": [len(s.get("values", []))], "values": s.get("values")}) if isinstance(s, dict) and isinstance(s.get("values"), list) else None
        if v is None:
            continue
        for c in ([v] if v.numel() == T else [v[1:], v[:-1]]):
            if c.numel() == T and torch.isfinite(c).all() and (c > 0).all() and (c <= 1).all() and c[0] > 0.9 \
                    and bool((c[1:] <= c[:-1] + 1e-7).all()):
                out += [(str(s.get("name"))[:60], c), (str(s.get("name"))[:60] + "^2", c * c)]
    return out


def judge_q_sample(got, ref, p, size):
    T = p["T"][size]
    seed = seed_of(p, f"q_sample/{size}")
    if "out" not in got:
        return False, first_error(got) or "no result"
    problem = compare(f"q_sample(x_0, t, noise) for T={T} with t = {steps(T, 5, seed + 2).tolist()} (eq. 13)",
                      got.get("out"), ref.get("out"), rtol=1e-3, atol=1e-5)
    if problem is None:
        return True, ""
    # right formula for the student's own (wrong) alpha_bar? then the schedule checks take the points, not this one
    # (only when the student's alpha_bar differs from the reference's, and not for a tensor that holds alpha_t)
    out = tensor_of(got.get("out"))
    quantities = reference_quantities(ref) if isinstance(ref.get("stored"), list) else None
    if out is not None and quantities and storage_match(got, ref, "alpha_bar", T) is None:
        x_0, noise, t = image(5, seed, kind=uniform), image(5, seed + 1), steps(T, 5, seed + 2)
        alphas = quantities["alphas"]["alphas"]
        for name, ab in alpha_bar_candidates(got, T):
            if close(ab, alphas, rtol=1e-4, atol=1e-6) or close(ab, alphas.sqrt(), rtol=1e-4, atol=1e-6):
                continue
            a = ab[t].view(-1, 1, 1, 1)
            if close(out, a.sqrt() * x_0.double() + (1 - a).sqrt() * noise.double(), rtol=1e-3, atol=1e-5):
                return True, (f"q_sample is right for the alpha_bar your Diffusion stores (self.{name}); that alpha_bar "
                              "differs from the reference, which the schedule checks count.")
    return False, problem


for _size in SIZES:
    check(f"q_sample_matches_reference-{_size}_T", "q_sample", functools.partial(lambda p, s: [q_req(p, s)], s=_size),
          primary=lambda got: got[0].get("out"))(
        functools.partial(lambda got, ref, p, s: judge_q_sample(got[0], ref[0], p, s), s=_size))


@check("q_sample_shape_and_dtype", "q_sample", lambda p: [q_req(p, "small")])
def judge_q_sample_shape(got, ref, p):
    rec = got[0]
    error = first_error(rec)
    if error and "shapes" not in rec:
        return False, error
    for batch, out in zip((1, 7), rec.get("shapes") or [None, None]):
        shape = [batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE]
        if error_of(out):
            return False, error_of(out)
        if not isinstance(out, dict) or out.get("shape") != shape:
            return False, f"q_sample on a batch of shape {tuple(shape)} returned {out.get('shape') if isinstance(out, dict) else out}."
        if out.get("dtype") != "float32":
            return False, (f"q_sample returned {out.get('dtype')} for float32 inputs; expected float32. The U-Net's weights "
                           "are float32, so float64 x_t would crash training: store the schedule as float32 buffers "
                           "(compute in float64 and cast), or cast the result back with .to(x_0.dtype).")
    return True, ""


# ================================================================== p_losses
def pl_req(p, size):
    return req("p_losses", T=p["T"][size], seed=seed_of(p, f"p_losses/{size}"))


def _routes(got, ref, judge_route):
    """Pass if the isolated route (stand-in for the other function) or the student's own route is right."""
    iso = judge_route(got.get("isolated"), ref.get("isolated"))
    own = judge_route(got.get("own"), ref.get("own"))
    return iso, own


def judge_p_losses(got, ref, p, size):
    T = p["T"][size]
    t = p_losses_inputs(T, seed_of(p, f"p_losses/{size}"))[1].tolist()
    what = f"p_losses(x_0, t, noise) for T={T}, t = {t} (Algorithm 1)"
    iso, own = _routes(got, ref, lambda g, r: compare(what, (g or {}).get("loss") if not error_of(g) else g,
                                                       (r or {}).get("loss")))
    if iso is None and own is None:
        return True, ""
    if iso is None:
        return True, ("Your p_losses is right (checked with a stand-in q_sample); with your own q_sample it does not match "
                      "the reference, so your q_sample is wrong (see the q_sample checks):\n" + own)
    if own is None:
        return True, "p_losses matches the reference with your own q_sample."
    return False, own if "not implemented" not in own else iso


def judge_p_losses_model(got, ref, p, size):
    T = p["T"][size]

    def route(g, r):
        if error_of(g):
            return error_of(g)
        gm, rm = (g or {}).get("model"), (r or {}).get("model")
        if not gm:
            return "p_losses never called self.model: it should predict the noise with self.model(x_t, t)."
        t_problem = compare(f"the t that p_losses gave the model (T={T}; it should be the t it was called with)",
                            gm.get("t"), rm.get("t"), rtol=0, atol=0)
        if t_problem:
            return t_problem
        return compare(f"the x that p_losses gave the model (T={T}; it should be x_t = q_sample(x_0, t, noise))",
                       gm.get("x"), rm.get("x"))

    iso, own = _routes(got, ref, route)
    if iso is None or own is None:
        return True, ""
    return False, own if "not implemented" not in own else iso


for _size in SIZES:
    check(f"p_losses_matches_reference-{_size}_T", "p_losses", functools.partial(lambda p, s: [pl_req(p, s)], s=_size),
          primary=lambda got: (got[0].get("isolated") or {}).get("loss") if isinstance(got[0].get("isolated"), dict) else None)(
        functools.partial(lambda got, ref, p, s: judge_p_losses(got[0], ref[0], p, s), s=_size))
    check(f"p_losses_feeds_x_t_and_t_to_model-{_size}_T", "p_losses",
          functools.partial(lambda p, s: [pl_req(p, s)], s=_size))(
        functools.partial(lambda got, ref, p, s: judge_p_losses_model(got[0], ref[0], p, s), s=_size))


@check("p_losses_returns_differentiable_scalar", "p_losses", lambda p: [pl_req(p, "small")])
def judge_p_losses_scalar(got, ref, p):
    def route(g):
        if error_of(g) or not isinstance(g, dict):
            return error_of(g) or "no result"
        loss = g.get("loss") or {}
        if loss.get("shape") != []:
            return (f"p_losses should return a scalar (0-dim) tensor, got {loss.get('shape', loss.get('type'))}: "
                    "reduce with the mean.")
        if loss.get("dtype") != "float32":
            return f"p_losses returned {loss.get('dtype')}; expected float32 (keep the schedule float32, or cast back to x_0.dtype)."
        if not loss.get("grad"):
            return ("The loss does not require grad, so training cannot update the model: don't detach the prediction "
                    "and don't compute the loss under torch.no_grad().")
        grad = tensor_of(g.get("weight_grad")) if not error_of(g.get("weight_grad")) else None
        if grad is None or not torch.isfinite(grad).all() or grad.abs().sum() == 0:
            return "loss.backward() left no (finite, nonzero) gradient on the model's weights."
        return None

    iso, own = route(got[0].get("isolated")), route(got[0].get("own"))
    if iso is None or own is None:
        return True, ""
    return False, own if "not implemented" not in own else iso


# ================================================================== forward
def fw_req(p, size, kind, n=0):
    T = p["T"][size]
    seed = seed_of(p, f"forward/{size}/{kind}/{n}")
    if kind == "loss":
        return req("forward", T=T, seed=seed, torch_seed=seed + 7, batch=6, image_size=IMAGE_SIZE, values=True)
    return req("forward", T=T, seed=seed, torch_seed=seed + 7, batch=20 * T, image_size=1, values=False)


def _forward_t(rec, batch, T):
    """(t as a list of ints, problem) from a route record."""
    t = rec.get("t") if "t" in rec else ((rec.get("model") or {}).get("t"))
    values = tensor_of(t)
    if values is None:
        return None, "forward did not pass a t tensor on."
    if list(values.shape) != [batch]:
        return None, f"forward drew t of shape {tuple(values.shape)}; expected one step per image, shape ({batch},)."
    if t.get("dtype", "").startswith(("float", "bool", "complex")) or t.get("dtype") in ("half", "double", "bfloat16"):
        return None, f"forward drew t as {t.get('dtype')}; expected integer step indices (torch.randint gives torch.long)."
    ints = [int(v) for v in values.tolist()] if torch.isfinite(values).all() else None
    if ints is None:
        return None, "forward drew t with non-finite values."
    if min(ints) < 0 or max(ints) > T - 1:
        return ints, (f"forward drew t from {min(ints)} to {max(ints)}, outside the code indices 0..{T - 1} "
                      "(code index i is math step t = i + 1).")
    return ints, None


def judge_forward_loss(got, ref, p, size):
    T, batch = p["T"][size], 6
    iso, r_iso = got.get("isolated"), ref.get("isolated") or {}
    problems = []
    if isinstance(iso, dict) and not error_of(iso):
        if iso.get("calls") != 1:
            problems.append(f"forward called self.p_losses {iso.get('calls')} times; expected once, "
                            "return self.p_losses(x_0, t, noise).")
        else:
            _, problem = _forward_t(iso, batch, T)
            problem = problem or compare("the x_0 forward gave p_losses (it should pass x_0, already in [-1, 1], unchanged)",
                                         iso.get("x_0"), r_iso.get("x_0"), rtol=0, atol=1e-7)
            problem = problem or compare("the noise forward gave p_losses (it should pass the given noise unchanged)",
                                         iso.get("noise"), r_iso.get("noise"), rtol=0, atol=1e-7)
            problem = problem or compare("forward's return value (it should return p_losses' loss unchanged)",
                                         iso.get("loss"), r_iso.get("loss"), rtol=1e-6, atol=1e-7)
            if not problem and not (iso.get("loss") or {}).get("grad"):
                problem = "forward's loss does not require grad; training could not update the model."
            if not problem:
                return True, ""
            problems.append(problem)
    else:
        problems.append(error_of(iso) or "no result")
    own = got.get("own")
    if isinstance(own, dict) and not error_of(own):  # forward that computes the loss itself, checked with its own p_losses
        model = own.get("model") or {}
        _, problem = _forward_t(own, batch, T) if model else (None, "forward never called the model.")
        if not problem and model.get("n") != 1:
            problem = f"forward called the model {model.get('n')} times; expected once (through p_losses)."
        if not problem:
            problem = compare("forward(x_0, noise) compared with your p_losses(x_0, t, noise) at the t it drew",
                              own.get("loss"), own.get("p_losses_at_t"), rtol=1e-5, atol=1e-7)
        if not problem and not (own.get("loss") or {}).get("grad"):
            problem = "forward's loss does not require grad; training could not update the model."
        if not problem:
            return True, ""
    return False, problems[0]


def judge_forward_uniform(got, ref, p, size):
    T = p["T"][size]
    batch = 20 * T  # every step is drawn with overwhelming probability
    draws, problems = [], []
    for rec in got:
        route = rec.get("isolated") if isinstance(rec.get("isolated"), dict) and rec["isolated"].get("calls") == 1 else rec.get("own")
        if not isinstance(route, dict) or error_of(route):
            return False, error_of(route) or error_of(rec.get("isolated")) or "forward gave no t."
        ints, problem = _forward_t(route, batch, T)
        if problem:
            return False, f"forward should draw t uniformly from {{0, ..., {T - 1}}} (T={T}): {problem}"
        draws.append(ints)
    values = sorted(set(draws[0]))
    low, high = values[0], values[-1]
    if len(values) == 1:
        problems.append(f"every image in the batch got the same t = {low}; draw one t per image, shape (batch,)")
    if low > 0:
        problems.append(f"never drew t = 0 in {batch} draws (smallest was {low}): use torch.randint(0, T, ...)")
    if high < T - 1:
        problems.append(f"never drew t = {T - 1} = T-1 in {batch} draws (largest was {high}): torch.randint's upper "
                        "bound is exclusive, so use torch.randint(0, T, ...)")
    if not problems and len(values) != T:
        problems.append(f"drew only {len(values)} of the {T} steps in {batch} draws")
    if not problems:
        counts = [0] * T
        for v in draws[0]:
            counts[v] += 1
        if max(counts) > 20 + 12 * math.sqrt(20):  # mean 20 per step; far above that is not uniform
            problems.append(f"t = {counts.index(max(counts))} was drawn {max(counts)} times in {batch} draws "
                            f"(about {batch // T} expected): draw uniformly")
    if not problems and draws[0] == draws[1]:
        problems.append("two runs with different torch seeds drew exactly the same t: draw t with torch.randint")
    if problems:
        return False, f"forward should draw t uniformly from {{0, ..., {T - 1}}} (T={T}):\n  " + "\n  ".join(problems)
    return True, ""


for _size in SIZES:
    check(f"forward_is_p_losses_at_the_drawn_t-{_size}_T", "forward",
          functools.partial(lambda p, s: [fw_req(p, s, "loss")], s=_size))(
        functools.partial(lambda got, ref, p, s: judge_forward_loss(got[0], ref[0], p, s), s=_size))
    check(f"forward_draws_t_uniformly_over_all_steps-{_size}_T", "forward",
          functools.partial(lambda p, s: [fw_req(p, s, "uniform", 0), fw_req(p, s, "uniform", 1)], s=_size))(
        functools.partial(judge_forward_uniform, size=_size))


# ================================================================== p_sample
def ps_index(p, size, which):
    T = p["T"][size]
    return {"last": T - 1, "mid": p["mid"][size], "one": 1, "zero": 0}[which]


def ps_req(p, size, which):
    return req("p_sample", T=p["T"][size], seed=seed_of(p, f"p_sample/{size}/{which}"), t_index=ps_index(p, size, which))


for _size in SIZES:
    for _which in ("last", "mid", "one", "zero"):
        def _judge(got, ref, p, _size=_size, _which=_which):
            T, i = p["T"][_size], ps_index(p, _size, _which)
            what, rtol = f"p_sample(x_t, t, t_index={i}) (T={T}, Algorithm 2, eq. 18-19)", float(schedule_rtol(T)[i])
            out = got[0].get("out") if not error_of(got[0].get("init")) else got[0].get("init")
            rounding = float(float32_rounding(T)[i])

            def against(key):  # the same allowance on both routes
                allowance = noisy_output_allowance(ref[0].get(key), ref[0].get("out_zero_noise"), rtol, rounding)
                return compare(what, out, ref[0].get(key), rtol=0, slack=allowance)

            problem = against("out")
            if problem and not got[0].get("noise_like") and against("out_global_noise") is None:
                return True, NOISE_ELSEWHERE
            return problem is None, problem or ""

        check(f"p_sample_matches_reference-{_size}_T-t_index_{_which}", "p_sample",
              functools.partial(lambda p, s, w: [ps_req(p, s, w)], s=_size, w=_which),
              primary=lambda got: got[0].get("out"))(_judge)

    def _judge_mean(got, ref, p, _size=_size):
        T = p["T"][_size]
        rec = got[0]
        problem = first_error(rec) if "stored" not in rec else None
        what = (f"the posterior mean, read as p_sample(x, t, t_index) with a constant eps and noise_like -> 0, for "
                f"every t_index in 0..{T - 1} (T={T}, eq. 18-19)")
        rtol = schedule_rtol(T).view(-1, 1)
        problem = problem or compare(what, rec.get("mean"), ref[0].get("mean"), rtol=rtol, atol=1e-6, labels=_labels(T))
        allowance = noisy_output_allowance(ref[0].get("mean_global_noise"), ref[0].get("mean"), rtol,
                                           float32_rounding(T).view(-1, 1), relative_to_mean=True)
        if problem and rec.get("mean_noise_like_calls") == 0 and compare(
                what, rec.get("mean"), ref[0].get("mean_global_noise"), rtol=0, atol=1e-6, slack=allowance) is None:
            return True, NOISE_ELSEWHERE
        return problem is None, problem or ""

    check(f"p_sample_mean_at_every_step-{_size}_T", "p_sample",
          functools.partial(lambda p, s: [schedule_req(p, s)], s=_size), primary=lambda got: got[0].get("mean"))(_judge_mean)


@check("p_sample_noise_comes_from_noise_like", "p_sample",
       lambda p: [req("p_sample_noise", T=p["T"]["small"], seed=seed_of(p, "p_sample_noise"), t_index=p["mid"]["small"])])
def judge_p_sample_noise(got, ref, p):
    rec, i = got[0], p["mid"]["small"]
    error = first_error(rec, *(rec.get(k) for k in ("a", "b", "c", "last_a", "last_b")))
    if error:
        return False, error
    a, b, c, la, lb = (tensor_of(rec.get(k)) for k in ("a", "b", "c", "last_a", "last_b"))
    if any(v is None for v in (a, b, c, la, lb)):
        return False, "p_sample did not return a tensor."
    calls = rec.get("a_noise_like") or []
    if not calls:
        return False, (f"p_sample at t_index={i} never called self.noise_like: draw z with self.noise_like(x.shape, x.device), "
                       "not torch.randn (the grader fixes the randomness through noise_like).")
    if calls[0][0] != [3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE]:
        return False, f"p_sample asked noise_like for shape {tuple(calls[0][0])}; expected x's shape {(3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)}."
    if not close(a, b, rtol=0, atol=1e-6):
        return False, ("With noise_like fixed, p_sample's output still changes with torch's global random seed: all of the "
                       "step's randomness must come from self.noise_like (no torch.randn / randn_like).")
    if close(a, c, rtol=0, atol=1e-7):
        return False, f"p_sample at t_index={i} gives the same output for different noise_like draws: add sigma_t * z."
    if not close(la, lb, rtol=0, atol=1e-6):
        return False, ("At the last step (t_index = 0, math t = 1) p_sample's output depends on the noise: Algorithm 2 "
                       "adds no noise there (z = 0), it returns the mean.")
    return True, ""


@check("p_sample_calls_model_with_x_t_and_t", "p_sample", lambda p: [ps_req(p, "small", "mid")])
def judge_p_sample_model(got, ref, p):
    rec, r = got[0], ref[0]
    error = first_error(rec)
    if error and not rec.get("model"):
        return False, error
    model = rec.get("model")
    if not model:
        return False, "p_sample never called self.model: predict the noise with self.model(x, t)."
    problem = compare("the x p_sample gave the model (it should be its input x_t: self.model(x, t))",
                      model.get("x"), r["model"]["x"], rtol=0, atol=1e-6)
    problem = problem or compare("the t p_sample gave the model (it should be the t it was called with)",
                                 model.get("t"), r["model"]["t"], rtol=0, atol=0)
    return problem is None, problem or ""


@check("p_sample_shape_and_dtype", "p_sample", lambda p: [ps_req(p, "small", "last"), ps_req(p, "small", "zero")])
def judge_p_sample_shape(got, ref, p):
    for rec, t_index in zip(got, (p["T"]["small"] - 1, 0)):
        out = rec.get("out") if not error_of(rec.get("init")) else rec.get("init")
        if error_of(out):
            return False, error_of(out)
        if not isinstance(out, dict) or out.get("shape") != [3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE] or out.get("dtype") != "float32":
            got_text = f"{out.get('shape')} {out.get('dtype')}" if isinstance(out, dict) and "shape" in out else "no tensor"
            return False, (f"p_sample at t_index={t_index} should return x_(t-1) with x's shape and dtype "
                           f"({(3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE)} float32), got {got_text}.")
    return True, ""


# ================================================================== p_sample_loop
def loop_req(p, size):
    return req("p_sample_loop", T=p["T"][size], seed=seed_of(p, f"p_sample_loop/{size}"))


def judge_loop_order(got, ref, p, size):
    T = p["T"][size]
    rec = got.get("isolated")
    if error_of(rec) or not isinstance(rec, dict):
        return False, error_of(rec) or "no result"
    calls = rec.get("calls") if isinstance(rec.get("calls"), list) else []
    order = [c[0] if isinstance(c, list) and c else None for c in calls]
    expected = list(range(T - 1, -1, -1))
    if order != expected:
        summary = f"{order[:3]} ... {order[-3:]}" if len(order) > 6 else str(order)
        problem = (f"p_sample was called {rec.get('n')} times with t_index = {summary}; expected {T} calls, "
                   f"t_index = {T - 1}, {T - 2}, ..., 0 (T={T}).")
        if order == expected[::-1]:
            problem += " The loop runs upward: Algorithm 2 goes from t = T down to t = 1 (reversed(range(T)))."
        elif order and order[0] != T - 1:
            problem += f" It should start at t_index = T-1 = {T - 1} (math step t = T)."
        elif order and order[-1] != 0:
            problem += " It should end at t_index = 0 (math step t = 1)."
        return False, problem
    ref_calls = (ref.get("isolated") or {}).get("calls") or []
    for k, (call, ref_call) in enumerate(zip(calls, ref_calls)):
        t_index, t, x = (call + [None, None, None])[:3]
        t_values = tensor_of(t) if isinstance(t, dict) else None
        if t_values is None or list(t_values.shape) != [2] or str(t.get("dtype", "")).startswith(("float", "bool")):
            return False, (f"At t_index={t_index}, p_sample got t = {t if not isinstance(t, dict) else t.get('shape')}; "
                           "expected an integer tensor of shape (batch,) = (2,) holding t_index for every image "
                           "(torch.full((b,), t_index, dtype=torch.long)).")
        if t_values.tolist() != [t_index, t_index] or t.get("device") != "cpu":
            return False, (f"At t_index={t_index}, p_sample got t = {t_values.tolist()} on {t.get('device')}; "
                           f"expected {[t_index] * 2} on the image's device (cpu here).")
        if not isinstance(x, (int, float)) or not math.isclose(float(x), float(ref_call[2]), rel_tol=1e-6, abs_tol=1e-7):
            return False, (f"At t_index={t_index}, p_sample was given " + ("something other than the starting image x_T"
                           if k == 0 else "something other than the previous step's output") +
                           ": each step must feed x_(t-1) into the next.")
    return True, ""


for _size in SIZES:
    check(f"p_sample_loop_visits_every_step_in_descending_order-{_size}_T", "p_sample_loop",
          functools.partial(lambda p, s: [loop_req(p, s)], s=_size))(
        functools.partial(lambda got, ref, p, s: judge_loop_order(got[0], ref[0], p, s), s=_size))


@check("p_sample_loop_returns_images_in_0_1", "p_sample_loop", lambda p: [loop_req(p, "small")])
def judge_loop_range(got, ref, p):
    rec = got[0].get("isolated")
    if error_of(rec) or not isinstance(rec, dict):
        return False, error_of(rec) or "no result"
    expected = tensor_of((ref[0].get("isolated") or {}).get("out"))
    out = tensor_of(rec.get("out"))
    if out is None or out.shape != expected.shape:
        return False, f"p_sample_loop should return images of shape {tuple(expected.shape)}, got {(rec.get('out') or {}).get('shape')}."
    if close(out, expected, rtol=0, atol=1e-6):
        return True, ""
    x_0 = expected * 2 - 1  # the last step's output (in [-1, 1] here)
    worst = int(torch.nan_to_num((out - expected).abs(), nan=math.inf).reshape(-1).argmax())
    v, o = x_0.reshape(-1)[worst].item(), out.reshape(-1)[worst].item()
    message = (f"The last step returned x_0 = {v:.4f} (in [-1, 1]); p_sample_loop should map it to [0, 1], "
               f"i.e. (x_0 + 1) / 2 = {(v + 1) / 2:.4f}, but returned {o:.4f}.")
    if close(out, (x_0.clamp(0, 1) + 1) / 2, rtol=0, atol=1e-6):
        message += " Looks like x_0 was clamped to [0, 1] before unnormalizing: clamp to [-1, 1]."
    elif close(out, x_0, rtol=0, atol=1e-6):
        message += " Looks like unnormalize_to_zero_to_one is missing."
    elif close(out, 2 * x_0 - 1, rtol=0, atol=1e-6):
        message += " Looks like normalize_to_neg_one_to_one was used where unnormalize_to_zero_to_one belongs."
    elif close(out, (expected + 1) / 2, rtol=0, atol=1e-6):
        message += " Looks like the output was unnormalized twice."
    return False, message


def judge_loop_matches(got, ref, p, size):
    T = p["T"][size]
    iso, own = _routes(got, ref, lambda g, r: compare(
        f"p_sample_loop(x_T) over all {T} steps (T={T}, Algorithm 2)", g.get("out") if isinstance(g, dict) and not error_of(g) else g,
        (r or {}).get("out"), atol=5e-4))
    if iso is None:
        return True, ""
    if own is None:
        return True, "p_sample_loop matches the reference with your own p_sample."
    return False, iso


for _size in SIZES:
    check(f"p_sample_loop_matches_reference-{_size}_T", "p_sample_loop", functools.partial(lambda p, s: [loop_req(p, s)], s=_size),
          primary=lambda got: (got[0].get("isolated") or {}).get("out") if isinstance(got[0].get("isolated"), dict) else None)(
        functools.partial(lambda got, ref, p, s: judge_loop_matches(got[0], ref[0], p, s), s=_size))


# ================================================================== sample
ROUTES = ("stand_in_loop", "stand_in_step", "own")


def sample_req(p, size, batch=3):
    return req("sample", T=p["T"][size], seed=seed_of(p, f"sample/{size}/{batch}"), batch=batch)


@check("sample_draws_start_with_noise_like", "sample", lambda p: [sample_req(p, "small")])
def judge_sample_start(got, ref, p):
    rec, r = got[0], ref[0]
    expected_shape = [3, CHANNELS, IMAGE_SIZE, IMAGE_SIZE]
    problems = []
    for route in ROUTES:
        g = rec.get(route)
        if error_of(g) or not isinstance(g, dict):
            problems.append(error_of(g) or "no result")
            continue
        calls = g.get("noise_like") or []
        if not calls:
            problems.append("sample never called self.noise_like: draw the starting x_T with self.noise_like(shape, device), "
                            "not torch.randn (the grader fixes the randomness through noise_like).")
            continue
        shape, device = calls[0][0], calls[0][1]
        if shape != expected_shape:
            problems.append(f"sample(3) asked noise_like for shape {tuple(shape)}; expected (batch, channels, image_size, "
                            f"image_size) = {tuple(expected_shape)} (here channels=3, image_size=5).")
            continue
        if device != "cpu":
            problems.append(f"sample passed device={device!r} to noise_like; pass the device the module lives on "
                            "(e.g. the device of one of your buffers, or next(self.model.parameters()).device).")
            continue
        if route == "stand_in_loop":
            if not g.get("loop_input"):
                problems.append("sample never called self.p_sample_loop.")
                continue
            problem = compare("the x_T sample gave p_sample_loop (it should be the noise_like draw)",
                              g.get("loop_input"), r[route].get("loop_input"), rtol=0, atol=1e-7)
            problem = problem or compare("sample's return value (p_sample_loop's images, unchanged)",
                                         g.get("out"), r[route].get("out"), rtol=0, atol=1e-6)
            if problem:
                problems.append(problem)
                continue
        else:
            problem = compare("sample(3)", g.get("out"), r[route].get("out"), atol=5e-4)
            if problem:
                problems.append(problem)
                continue
        return True, ""
    return False, problems[0]


def judge_sample_matches(got, ref, p, size):
    T = p["T"][size]
    problems = []
    for route in ROUTES:
        g = got[0].get(route)
        out = g.get("out") if isinstance(g, dict) and not error_of(g) else g
        problem = compare(f"sample(3) (T={T}, Algorithm 2)", out, (ref[0].get(route) or {}).get("out"), atol=5e-4)
        if problem is None:
            return True, ""
        problems.append(problem)
        if route == "stand_in_loop" and isinstance(g, dict) and not g.get("noise_like") and compare(
                "sample(3)", out, (ref[0].get("stand_in_loop_global_noise") or {}).get("out"), atol=5e-4) is None:
            return True, ("sample is right, but its x_T did not come from self.noise_like (see the check "
                          "sample_draws_start_with_noise_like).")
    return False, problems[0]


for _size in SIZES:
    check(f"sample_matches_reference-{_size}_T", "sample", functools.partial(lambda p, s: [sample_req(p, s)], s=_size),
          primary=lambda got: (got[0].get("stand_in_loop") or {}).get("out") if isinstance(got[0].get("stand_in_loop"), dict) else None)(
        functools.partial(judge_sample_matches, size=_size))


@check("sample_shape_dtype_range", "sample", lambda p: [sample_req(p, "small", 1), sample_req(p, "small", 4)])
def judge_sample_shape(got, ref, p):
    problems = []
    for route in ROUTES:
        for rec, batch in zip(got, (1, 4)):
            g = rec.get(route)
            shape = [batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE]
            if error_of(g) or not isinstance(g, dict):
                problems.append(error_of(g) or "no result")
                break
            out = g.get("out") or {}
            values = tensor_of(out)
            if out.get("shape") != shape or out.get("dtype") != "float32" or values is None:
                problems.append(f"sample({batch}) should return float32 images of shape {tuple(shape)}, "
                                f"got {out.get('shape', out.get('type'))} {out.get('dtype', '')}.")
                break
            if not torch.isfinite(values).all() or values.min() < 0 or values.max() > 1:
                problems.append(f"sample({batch}) returned values from {values.min().item():.4g} to "
                                f"{values.max().item():.4g}; images must lie in [0, 1].")
                break
            if out.get("grad"):
                problems.append("sample's output requires grad; sampling should run without autograd (@torch.no_grad()).")
                break
        else:
            return True, ""
    return False, problems[0]


# ------------------------------------------------------------------ running checks
def requests_of(params):
    """{check name: [request, ...]} and the distinct requests, for one set of parameters."""
    per_check = {c.name: c.requests(params) for c in CHECKS}
    distinct = {}
    for requests in per_check.values():
        for r in requests:
            distinct.setdefault(request_key(r), r)
    return per_check, distinct


def subsample(values):
    n = len(values)
    if n <= N_SUBSAMPLE:
        return list(values)
    return [values[round(i * (n - 1) / (N_SUBSAMPLE - 1))] for i in range(N_SUBSAMPLE)]


def primary_values(chk, outputs):
    """The values of a check's main output (for matching known mistakes), subsampled; None if there are none."""
    if chk.primary is None:
        return None
    try:
        t = tensor_of(chk.primary(outputs))
    except Exception:  # noqa: BLE001 - malformed student data
        return None
    if t is None or not torch.isfinite(t).all() or t.numel() == 0:
        return None
    return subsample(t.reshape(-1).tolist())


def known_mistakes(chk, got, ref, mistakes, hints):
    """Hints of the known mistakes whose output equals the student's (mistakes: [[hint ids], values])."""
    mine = primary_values(chk, got)
    if mine is None:
        return []
    found = []
    for ids, row in mistakes:
        row_t, mine_t = torch.tensor(row, dtype=torch.float64), torch.tensor(mine, dtype=torch.float64)
        scale = max(1.0, float(row_t.abs().max())) if row_t.numel() else 1.0
        if row_t.shape == mine_t.shape and ((mine_t - row_t).abs() <= 1e-4 * scale + 1e-3 * row_t.abs()).all():
            found += [hints[i] for i in ids if 0 <= i < len(hints)]
    return list(dict.fromkeys(found))[:3]


def judge_check(chk, got, ref, params, mistakes=(), hints=()):
    """(passed, message) for one check; a judge that trips over malformed student data fails the check."""
    try:
        passed, message = chk.judge(got, ref, params)
    except Exception as exc:  # noqa: BLE001
        passed, message = False, f"the output could not be judged ({type(exc).__name__}): malformed or missing values."
    if not passed and mistakes:
        found = known_mistakes(chk, got, ref, mistakes, hints)
        if found:
            which = "a known mistake" if len(found) == 1 else "one of these known mistakes"
            message += f"\n  This output matches {which}:\n" + "".join(f"    - {h}\n" for h in found)
            message = message.rstrip()
    return bool(passed), str(message)


def mistake_rows(checks, params, reference_outputs, mutants, per_check_requests, deadline=None):
    """{check name: [[mutant indices], values]} for the mutants (index, function, module) given.

    Shared by this script (local fixture) and the autograder's trusted judge (fresh inputs, failing checks only).
    """
    cache, rows = {}, {}
    for chk in checks:
        if chk.primary is None:
            continue
        requests = per_check_requests[chk.name]
        ref = [reference_outputs[request_key(r)] for r in requests]
        expected = primary_values(chk, ref)
        if expected is None:
            continue
        exp_t = torch.tensor(expected, dtype=torch.float64)
        scale = max(1.0, float(exp_t.abs().max()))
        found = []
        for index, function, module in mutants:
            if function != chk.function and not (chk.function == "p_sample" and function == "schedule"):
                continue
            if deadline is not None and time.time() > deadline:
                break
            outs = []
            for r in requests:
                key = (index, request_key(r))
                if key not in cache:
                    cache[key] = json.loads(json.dumps(run_request(module, r)))
                outs.append(cache[key])
            values = primary_values(chk, outs)
            if values is None or len(values) != len(expected):
                continue
            v = torch.tensor(values, dtype=torch.float64)
            if ((v - exp_t).abs() <= 1e-5 * scale + 1e-3 * exp_t.abs()).all():
                continue  # this mistake does not show here
            for row in found:
                if torch.allclose(torch.tensor(row[1], dtype=torch.float64), v, rtol=1e-6, atol=1e-9):
                    row[0].append(index)
                    break
            else:
                found.append([[index], values])
        if found:
            rows[chk.name] = found
    return rows


# ------------------------------------------------------------------ pytest: the same checks, locally
@functools.lru_cache(maxsize=None)
def fixture():
    if not os.path.exists(FIXTURE_PATH):
        pytest.fail(f"missing {FIXTURE_PATH}: it ships with the handout next to this file "
                    "(instructors: tools/make_fixtures.py).", pytrace=False)
    with open(FIXTURE_PATH) as f:
        data = json.load(f)
    if randn((6,), 12345).tolist() != data["rng_check"]:
        pytest.fail("torch's random numbers differ from those the fixture was made with (a different torch version?). "
                    "Use the pinned torch from requirements.txt (instructors: rerun tools/make_fixtures.py).", pytrace=False)
    return data


_outputs = {}


def local_output(request):
    key = request_key(request)
    if key not in _outputs:
        _outputs[key] = json.loads(json.dumps(run_request(diffusion, request)))  # plain data, like the autograder's
    return _outputs[key]


@pytest.mark.parametrize("chk", [pytest.param(c, id=c.name, marks=[pytest.mark.graded(c.function),
                                                                    pytest.mark.timeout(TEST_TIMEOUT)]) for c in CHECKS])
def test_check(chk):
    data = fixture()
    requests = chk.requests(LOCAL_PARAMS)
    got = [local_output(r) for r in requests]
    ref = [data["outputs"].get(request_key(r), {}) for r in requests]
    passed, message = judge_check(chk, got, ref, LOCAL_PARAMS, data["mistakes"].get(chk.name, []), data["hints"])
    if passed:
        return
    todo = re.search(r"not implemented yet \((.*)\)\.", message)
    if todo:
        pytest.fail(f"not implemented yet: {todo.group(1)}", pytrace=False)
    pytest.fail(message, pytrace=False)
