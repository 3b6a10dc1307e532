"""Graded tests for diffusion.py (the DDPM homework): the list of graded checks.

    pytest test_diffusion.py                 # everything; your score per function is printed at the end
    pytest test_diffusion.py -k q_sample     # the checks of one function

What is graded and how much: POINTS below (the only place the weights live). A function's points are
split evenly over its checks, so every passing check earns partial credit. Below POINTS come the checks,
one section per function: each is registered with @check(name, function, inputs), and its judge says what it
checks and returns (passed, the message you see when it fails).

How a check works (the Gradescope autograder runs these same checks; the machinery is in grading.py):
  * a *probe* calls your `Diffusion` on inputs made from a seed and returns plain numbers: its outputs,
    what it gave the model (a tiny deterministic stand-in for the U-Net, `TinyEps`, a real nn.Module with a
    parameter and a buffer), and the shapes it asked `noise_like` for;
  * a *judge* (here) compares those numbers with the reference solution's numbers for the same inputs and
    explains any difference (with the known mistake it looks like, when one matches).
Here the reference numbers come from test_fixtures/reference_outputs.json, made for fixed inputs. The
autograder draws fresh inputs (other seeds, other T) for every submission and computes the reference numbers
itself, so only a correct implementation passes there.

Each function is graded on its own: where a check would otherwise also depend on another of your functions,
it is also run with a stand-in for that function (e.g. p_losses with a stand-in q_sample, forward with a
stand-in p_losses, p_sample_loop with a stand-in p_sample, sample with a stand-in p_sample_loop), and the check
passes if either way is right. So draw sampling noise through `self.noise_like(shape, device)`, call
`self.q_sample`, `self.p_losses`, `self.p_sample` and `self.p_sample_loop` rather than inlining them (inlined
code is still graded, through your own functions), and use only the public API: buffer names, float32 vs
float64 arithmetic, `extract` vs plain indexing are up to you. float64 is graded correct, but an Apple GPU (MPS)
has no float64: to train there, keep the buffers float32 (the trainer refuses float64 buffers on MPS and names them).
"""
import functools
import math
import os

import pytest
import torch

import diffusion
from grading import (CHANNELS, IMAGE_SIZE, SIZES, Check, alpha_bar_candidates, both_routes, close, compare, error_of,
                     first_error, float32_rounding, image, noisy_output_allowance, p_losses_inputs, reference_quantities,
                     req, run_locally, schedule_rtol, seed_of, step_labels, steps, storage_match, stored_alpha_bar,
                     tensor_of, tolerance_scale, unexplained_tables, uniform)

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


CHECKS = []  # every graded check, in the order of this file


def check(name, function, requests, primary=None):
    """Registers the decorated judge as a graded check of `function` (a key of POINTS). requests(params) lists the
    probe requests (inputs) it needs; primary(outputs) picks the output compared with the known mistakes."""
    def register(judge):
        assert function in POINTS, function
        CHECKS.append(Check(name, function, requests, judge, primary))
        return judge

    return register


NOISE_ELSEWHERE = ("p_sample's math is right, but its noise did not come from self.noise_like (see the check "
                   "p_sample_noise_comes_from_noise_like).")


# ================================================================== schedule (__init__)
def schedule_req(p, size):
    T = p["T"][size]
    x = uniform((2,), seed_of(p, f"schedule/{size}"), -0.9, 0.9).tolist()
    eps = float(uniform((1,), seed_of(p, f"schedule/{size}/eps"), 0.1, 0.5))
    return req("schedule", T=T, x=x, eps=eps)


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
        labels = step_labels(T, 1 if key == "sigma" else 0)
        problem = compare(f"{what} for T={T}", got.get(key), ref.get(key), rtol=1e-3, atol=1e-6, labels=labels)
        if problem is None:
            continue
        problems.append(problem)
    if not problems:
        return True, ""
    elsewhere = graded_in_the_functions(group, got, ref, T)
    if elsewhere:
        return True, elsewhere
    names = [str(s.get("name"))[:40] for s in got.get("stored", []) if isinstance(s, dict)]
    stored = (f"None of the tensors your Diffusion keeps ({', '.join(names[:12]) or 'none'}) holds {title} of the "
              "reference schedule, and your functions do not reveal it either:\n")
    return False, stored + "\n".join(problems)


def graded_in_the_functions(group, got, ref, T):
    """Each mistake is charged once, to the function whose own code is wrong: the schedule checks grade what
    __init__ stores. When it stores a correct alpha_bar_t and nothing wrong, 1 - alpha_bar_t is that alpha_bar's,
    and a posterior it does not store is p_sample's to compute, graded by p_sample's own checks (its outputs, its
    mean and its sigma_t at every step): the group passes here whatever p_sample does, unless p_sample is still
    the TODO (then nothing computes the posterior). The message of such a pass, or None."""
    alpha_bar = stored_alpha_bar(got, ref, T)
    if alpha_bar is None or unexplained_tables(got, ref, T):
        return None
    if group == "alpha_bar":
        return f"your Diffusion holds alpha_bar_t (self.{alpha_bar}), which also gives 1 - alpha_bar_t"
    if any(isinstance(got.get(key), dict) and "todo" in got[key] for key in ("sigma", "mean")):
        return None
    return (f"your Diffusion stores a correct alpha_bar_t (self.{alpha_bar}) and not {SCHEDULE_GROUPS[group][0]}: "
            "p_sample computes it, and p_sample's checks grade it")


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


def judge_q_sample(got, ref, p, size):
    """got, ref: the q_sample record and the schedule record of the same T."""
    (got, schedule), (ref, schedule_ref) = got, ref
    T = p["T"][size]
    seed = seed_of(p, f"q_sample/{size}")
    if "out" not in got:
        return False, first_error(got) or "no result"
    problem = compare(f"q_sample(x_0, t, noise) for T={T} with t = {steps(T, 5, seed + 2).tolist()} (eq. 13)",
                      got.get("out"), ref.get("out"), rtol=1e-3, atol=1e-5)
    if problem is None:
        return True, ""
    # right formula for the student's own (wrong) alpha_bar? then the schedule checks take the points, not this one:
    # only where the alpha_bar check of this T fails (so the mistake is counted there, once), for a real alpha_bar
    # (alpha_bar_candidates) that the schedule probe's Diffusion stores, and not for a tensor that holds alpha_t
    out, expected = tensor_of(got.get("out")), tensor_of(ref.get("out"))
    if out is not None and expected is not None and isinstance(schedule_ref.get("stored"), list) and not judge_schedule(
            "alpha_bar", schedule, schedule_ref, T)[0]:
        x_0, noise, t = image(5, seed, kind=uniform), image(5, seed + 1), steps(T, 5, seed + 2)
        alphas = reference_quantities(schedule_ref)["alphas"]["alphas"]
        for name, ab in alpha_bar_candidates(schedule, T):
            if close(ab, alphas, rtol=1e-4, atol=1e-6) or close(ab, alphas.sqrt(), rtol=1e-4, atol=1e-6):
                continue
            a = ab[t].view(-1, 1, 1, 1)
            if close(out, a.sqrt() * x_0.double() + (1 - a).sqrt() * noise.double(), rtol=1e-3, atol=1e-5,
                     scale=tolerance_scale(expected)):
                return True, (f"q_sample is right for the alpha_bar your Diffusion stores (self.{name}); that alpha_bar "
                              "differs from the reference, which the schedule checks count.")
    return False, problem


for _size in SIZES:
    check(f"q_sample_matches_reference-{_size}_T", "q_sample",
          functools.partial(lambda p, s: [q_req(p, s), schedule_req(p, s)], s=_size), primary=lambda got: got[0].get("out"))(
        functools.partial(judge_q_sample, size=_size))


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


def judge_p_losses(got, ref, p, size):
    T = p["T"][size]
    t = p_losses_inputs(T, seed_of(p, f"p_losses/{size}"))[1].tolist()
    what = f"p_losses(x_0, t, noise) for T={T}, t = {t} (Algorithm 1)"
    iso, own = both_routes(got, ref, lambda g, r: compare(what, (g or {}).get("loss") if not error_of(g) else g,
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

    iso, own = both_routes(got, ref, route)
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
                              own.get("loss"), own.get("p_losses_at_t"), rtol=1e-5, atol=1e-7, scale=1.0)
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

    for _name, _key, _start, _what in (
            ("mean", "mean", 0, "the posterior mean, read as p_sample(x, t, t_index) with a constant eps and noise_like -> 0"),
            ("std", "sigma", 1, "sigma_t, read as p_sample(x=0, t, t_index) with eps=0 and noise_like -> 1")):
        def _judge_every_step(got, ref, p, _size=_size, key=_key, start=_start, what=_what):
            T = p["T"][_size]
            rec = got[0]
            what = f"{what}, for every t_index in {start}..{T - 1} (T={T}, eq. 18-19)"
            rtol = schedule_rtol(T)[start:].view(-1, 1)
            problem = first_error(rec) if "stored" not in rec else None
            problem = problem or compare(what, rec.get(key), ref[0].get(key), rtol=rtol, atol=1e-6,
                                         labels=step_labels(T, start))
            # the same step with torch.randn noise: the mean's noise-free output is the mean itself
            allowance = noisy_output_allowance(ref[0].get(key + "_global_noise"), ref[0].get(key) if key == "mean" else None,
                                               rtol, float32_rounding(T)[start:].view(-1, 1), relative_to_mean=True)
            if problem and rec.get(key + "_noise_like_calls") == 0 and compare(
                    what, rec.get(key), ref[0].get(key + "_global_noise"), rtol=0, atol=1e-6, slack=allowance) is None:
                return True, NOISE_ELSEWHERE
            return problem is None, problem or ""

        check(f"p_sample_{_name}_at_every_step-{_size}_T", "p_sample",
              functools.partial(lambda p, s: [schedule_req(p, s)], s=_size),
              primary=functools.partial(lambda got, key: got[0].get(key), key=_key))(_judge_every_step)


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
    if not close(a, b, rtol=0, atol=1e-6, scale=1.0):
        return False, ("With noise_like fixed, p_sample's output still changes with torch's global random seed: all of the "
                       "step's randomness must come from self.noise_like (no torch.randn / randn_like).")
    if close(a, c, rtol=0, atol=1e-7, scale=1.0):
        return False, f"p_sample at t_index={i} gives the same output for different noise_like draws: add sigma_t * z."
    if not close(la, lb, rtol=0, atol=1e-6, scale=1.0):
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
    iso, own = both_routes(got, ref, lambda g, r: compare(
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


@pytest.mark.parametrize("chk", [pytest.param(c, id=c.name, marks=[pytest.mark.graded(c.function),
                                                                    pytest.mark.timeout(TEST_TIMEOUT)]) for c in CHECKS])
def test_check(chk):
    run_locally(chk, diffusion)
