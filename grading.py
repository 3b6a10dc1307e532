"""The machinery of the graded checks in test_diffusion.py: stand-ins, probes, comparison, the runner.

test_diffusion.py lists the graded checks (what each checks, its function's points, its message); everything they
share lives here, and the autograder uses this same file (its student-side worker runs the probes, its trusted
side the judges), so local pytest and Gradescope grade with one source of truth. You never need to edit or read it
to do the homework; it is here so you can see exactly what a check ran.

  * stand-ins: a tiny deterministic U-Net (TinyEps), fixed noise (NoiseFeed), and stand-ins for your own
    functions, so each of them is graded on its own;
  * probes (PROBES): call your Diffusion on inputs made from seeds and return plain numbers (run_request);
  * judges' helpers: tensor_of, close, compare (teaching messages), the schedule's stored quantities, the float32
    allowance of p_sample;
  * the runner: requests_of, judge_check, the known-mistake hints, and run_locally (the body of pytest's test).
"""
import functools
import json
import math
import operator
import os
import re
import time
import traceback
import zlib

import pytest
import torch
from torch import nn

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

    def __call__(self, shape, device, *args, **kwargs):  # device is required, as in the handout's noise_like
        shape = tuple(int(s) for s in shape)
        self.calls.append((list(shape), None if device is None else str(torch.device(device).type)))
        draw = torch.full(shape, float(self.value)) if self.value is not None else torch.randn(shape, generator=self.generator)
        self.draws.append(draw)
        return draw.to(device) if device is not None else draw


class GlobalNoise:
    """Replaces Diffusion.noise_like with draws from torch's global generator: what a p_sample or sample that calls
    torch.randn / randn_like instead of noise_like draws after the same torch.manual_seed. Lets the value checks
    judge such code's math (the noise_like checks still fail it)."""

    def __call__(self, shape, device, *args, **kwargs):
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
    # eps = 0 and x_t = 0 make x0_hat = 0 and the mean 0, so with z = 1 the step returns sigma_t; without noise
    # (z = 0) the step returns the posterior mean (two x_t values per step). The second feed of each: noise as
    # torch.randn draws it after torch's generator is seeded with the step (for a p_sample that calls torch.randn).
    zero, pair = torch.zeros(1, 1, 1, 1), torch.tensor(x, dtype=torch.float32).view(2, 1, 1, 1)
    readings = [("sigma", 0.0, zero, range(1, T), NoiseFeed(value=1.0), "noise 1"),
                ("sigma_global_noise", 0.0, zero, range(1, T), GlobalNoise(), "torch.randn noise"),
                ("mean", eps, pair, range(T), NoiseFeed(value=0.0), "noise 0"),
                ("mean_global_noise", eps, pair, range(T), GlobalNoise(), "torch.randn noise")]
    for key, eps_value, x_t, indices, feed, noise in readings:
        d, err = attempt("Diffusion(...)", new, mod, T, ConstEps(eps_value), 1, 1)
        what = f"p_sample(x, t={{i}}, t_index={{i}}) with eps={eps_value:.3g} and {noise}"
        out[key] = err or every_step(d, x_t, indices, feed, what)
        if isinstance(feed, NoiseFeed):
            out[key + "_noise_like_calls"] = len(feed.calls)
    return out


def every_step(d, x_t, indices, feed, what):
    """p_sample(x_t, t, t_index) at each t_index of `indices`, noise_like = feed, torch's generator seeded with the
    step: the outputs' first len(x_t) values, one row per step; or the first error."""
    rows = []
    for i in indices:
        d.noise_like = feed
        torch.default_generator.manual_seed(i)  # torch.manual_seed also seeds every accelerator: 100x slower
        out, err = attempt(what.format(i=i), d.p_sample, x_t, torch.full((len(x_t),), i, dtype=torch.long), i)
        if err:
            return err
        rows.append(torch.as_tensor(out).reshape(-1)[:len(x_t)])
        if rows[-1].numel() != len(x_t):
            return {"error": f"{what.format(i=i)} returned {rows[-1].numel()} values for {len(x_t)} images."}
    return record(torch.stack(rows) if rows else torch.zeros(0))


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
    result = {"out": err or record(out)}
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


def close(got, expected, rtol=1e-3, atol=1e-5, slack=0.0, scale=None):
    """|got - expected| <= atol * scale + rtol * |expected| + slack, everywhere (slack: an allowance per value).

    scale: what atol is relative to; by default the largest |expected| (at least 1), so `expected` must be trusted
    numbers (the reference's outputs, or the reference run on a checked schedule): one huge value the student
    controls there would make every tolerance huge. Where the student's own numbers are compared with each other,
    the caller passes a trusted scale."""
    if got is None or expected is None or got.shape != expected.shape:
        return False
    scale = tolerance_scale(expected) if scale is None else scale
    return bool(torch.isfinite(got).all() and ((got - expected).abs() <= atol * scale + rtol * expected.abs() + slack).all())


def tolerance_scale(expected):
    return max(1.0, float(expected.abs().max())) if expected.numel() else 1.0


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


def compare(what, got_rec, ref_rec, rtol=1e-3, atol=1e-5, labels=None, slack=0.0, scale=None):
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
    scale = tolerance_scale(expected) if scale is None else scale
    if close(got, expected, rtol, atol, slack, scale):
        return None
    finite = torch.isfinite(got)
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


def req(probe, **args):
    return {"probe": probe, "args": args}


def step_labels(T, start=0):
    return [f"t={i}" for i in range(start, T)]


def both_routes(got, ref, judge_route):
    """The problems (None: right) of the isolated route (a stand-in for the other function) and of the
    student's own route; a check passes when either is right."""
    iso = judge_route(got.get("isolated"), ref.get("isolated"))
    own = judge_route(got.get("own"), ref.get("own"))
    return iso, own


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


# ------------------------------------------------------------------ the schedule as stored
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


def stored_tables(got, T):
    """[(name, [aligned values])] of the tensors the instance stores (probe_schedule's "stored"): a tensor of T
    values as it is, one of T+1 values without its first or without its last (either may be the extra step)."""
    tables = []
    for s in got.get("stored", [])[:64] if isinstance(got.get("stored"), list) else []:
        v = tensor_of({"shape": [len(s["values"])], "values": s["values"]}) if (  # other lengths: no schedule
            isinstance(s, dict) and isinstance(s.get("values"), list) and len(s["values"]) in (T, T + 1)) else None
        if v is not None:
            tables.append((str(s.get("name"))[:60], [v] if v.numel() == T else [v[1:], v[:-1]]))
    return tables


def matches(candidate, target):
    """A stored table equals a quantity, relative to each value, where the quantity is finite."""
    ok = torch.isfinite(target)
    return bool(ok.any()) and candidate.shape == target.shape and close_relative(candidate[ok], target[ok])


def stored_match(got, targets, T):
    """(student tensor name, quantity name) of the first stored tensor that equals one of `targets` by value
    (relative to each value, so a difference at tiny values, e.g. alpha_bar near t = T, shows)."""
    for table, candidates in stored_tables(got, T):
        for candidate in candidates:
            for name, target in targets.items():
                if matches(candidate, target):
                    return table, name
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


def alpha_bar_problem(alpha_bar):
    """Why a tensor (steps 1..T) is no alpha_bar a diffusion runs on, or None. An alpha_bar starts almost clean
    (alpha_bar_1 >= 0.9), ends noisier (alpha_bar_T <= 0.9) and adds noise at every step: beta_t = 1 - alpha_bar_t /
    alpha_bar_{t-1} >= 1e-6 (real schedules have more: the cosine one 3.7e-5 at T = 1100, alpha_t taken for
    alpha_bar_t 4e-6, the linear one 1e-4). So a constant alpha_bar of 1 (x_t = x_0), one near 0 everywhere, an
    increasing one, or one with a step that does nothing is refused: with those, code that ignores the schedule
    or the model would look right for "its" schedule."""
    if alpha_bar.numel() == 0 or not torch.isfinite(alpha_bar).all() or alpha_bar.min() <= 0 or alpha_bar.max() > 1:
        return "values outside (0, 1]"
    if alpha_bar[0] < 0.9 or alpha_bar[-1] > 0.9:
        return f"alpha_bar runs from {float(alpha_bar[0]):.3g} to {float(alpha_bar[-1]):.3g}, not from about 1 to below 0.9"
    beta = 1 - alpha_bar / torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    if beta.min() < 1e-6:
        return f"alpha_bar does not decrease at t = {int(beta.argmin()) + 1} (beta_t = {float(beta.min()):.3g})"
    return None


def alpha_bar_candidates(got, T):
    """Stored tensors (cast to float32, as code runs on them) that are an alpha_bar (alpha_bar_problem), or whose
    square is: the student's own alpha_bar, or its square root."""
    out = []
    for name, candidates in stored_tables(got, T):
        for c in candidates:
            c = c.float().double()
            if c.numel() == T:
                out += [(n, ab) for n, ab in ((name, c), (name + "^2", c * c)) if alpha_bar_problem(ab) is None]
    return out


# ------------------------------------------------------------------ each mistake charged once (tools/GRADING.md)
def known_quantities(ref):
    """Every correct per-step quantity a Diffusion may keep: reference_quantities' and the forms of alpha_t,
    beta_t and alpha_bar_{t-1} real submissions keep (Algorithm 2's 1/sqrt(alpha_t) and eps coefficient, ...)."""
    q = reference_quantities(ref)
    alphas, ab, ab_prev = q["alphas"]["alphas"], q["alpha_bar"]["alphas_cumprod"], q["posterior_mean"]["alphas_cumprod_prev"]
    known = {name: value for group in q.values() for name, value in group.items()}
    known.update(sqrt_alphas=alphas.sqrt(), sqrt_recip_alphas=alphas.rsqrt(), sqrt_betas=(1 - alphas).sqrt(),
                 log_alphas=alphas.log(), log_betas=(1 - alphas).log(), eps_coefficient=(1 - alphas) / (1 - ab).sqrt(),
                 one_minus_alphas_cumprod_prev=1 - ab_prev, sqrt_one_minus_alphas_cumprod_prev=(1 - ab_prev).sqrt(),
                 posterior_log_variance=q["posterior_variance"]["posterior_variance"].log())
    return known


def unexplained_tables(got, ref, T):
    """Names of the stored tables that hold no correct quantity of known_quantities (by value), or that are named
    like one of the reference's buffers and do not hold its values: what __init__ computed wrong (or something
    the grader does not know)."""
    known = known_quantities(ref)
    own_name = {s["name"]: torch.tensor(s["values"], dtype=torch.float64) for s in ref.get("stored", [])}
    return [name for name, candidates in stored_tables(got, T)
            if not any(matches(c, own_name[name]) if name in own_name else any(matches(c, k) for k in known.values())
                       for c in candidates)]


def stored_alpha_bar(got, ref, T):
    """The name of a stored table that determines alpha_bar_t exactly at both ends (alpha_bar, its square root or
    1/sqrt, with 1 - alpha_bar also right relative to each value), or None."""
    ab = reference_quantities(ref)["alpha_bar"]["alphas_cumprod"]
    for name, candidates in stored_tables(got, T):
        for c in candidates:
            for alpha_bar in (c, c * c, 1 / (c * c)):
                if matches(alpha_bar, ab) and matches(1 - alpha_bar, 1 - ab):
                    return name
    return None


# ------------------------------------------------------------------ running checks
def requests_of(checks, params):
    """{check name: [request, ...]} and the distinct requests of `checks`, for one set of parameters."""
    per_check = {c.name: c.requests(params) for c in checks}
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
        message = with_known_mistakes(str(message), chk, got, ref, mistakes, hints)
    return bool(passed), str(message)


def with_known_mistakes(message, chk, got, ref, mistakes, hints):
    """A failing check's message, plus the known mistakes its output matches (see known_mistakes)."""
    found = known_mistakes(chk, got, ref, mistakes, hints)
    if not found:
        return message
    which = "a known mistake" if len(found) == 1 else "one of these known mistakes"
    return (message + f"\n  This output matches {which}:\n" + "".join(f"    - {h}\n" for h in found)).rstrip()


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
            outs = []
            for r in requests:
                key = (index, request_key(r))
                if key not in cache:
                    if deadline is not None and time.time() > deadline:
                        break
                    cache[key] = json.loads(json.dumps(run_request(module, r)))
                outs.append(cache[key])
            if len(outs) < len(requests):
                break
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


_outputs = {}  # request key -> the submission's probe output, shared by the checks of one pytest run


def local_output(module, request):
    key = request_key(request)
    if key not in _outputs:
        _outputs[key] = json.loads(json.dumps(run_request(module, request)))  # plain data, like the autograder's
    return _outputs[key]


def run_locally(chk, module):
    """The body of test_diffusion.py's pytest test: judge one check of `module` (the submission) against the
    fixture's reference numbers at LOCAL_PARAMS; fails the test with the judge's message."""
    data = fixture()
    requests = chk.requests(LOCAL_PARAMS)
    got = [local_output(module, r) for r in requests]
    ref = [data["outputs"].get(request_key(r), {}) for r in requests]
    passed, message = judge_check(chk, got, ref, LOCAL_PARAMS, data["mistakes"].get(chk.name, []), data["hints"])
    if passed:
        return
    todo = re.search(r"not implemented yet \((.*)\)\.", message)
    if todo:
        pytest.fail(f"not implemented yet: {todo.group(1)}", pytrace=False)
    pytest.fail(message, pytrace=False)
