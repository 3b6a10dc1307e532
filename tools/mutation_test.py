"""Mutation testing of test_diffusion.py (instructors only; not part of the handout).

    python tools/mutation_test.py              # all mutants + the alternative correct solutions
    python tools/mutation_test.py -k p_sample  # only mutants whose name contains "p_sample"
    python tools/mutation_test.py --list       # print the catalogue

MUTANTS is a catalogue of plausible student bugs, each a list of exact (old, new) text replacements
applied to the reference diffusion.py (each `old` must occur exactly once). For every mutant the harness
runs test_diffusion.py on a temporary copy of the repo's student files with the mutated diffusion.py and
requires at least one failing test ("killed"). It also runs every correct, differently written
implementation in tools/alt_solutions/*.py (and the reference itself), which must pass every test.
Exit status 0 only if every mutant is killed and every correct implementation passes.

Each mutant's `hint` is what a student sees when their output matches that mutant's output on one of the
test probes: tools/make_fixtures.py stores those outputs in the fixture (so rerun it after changing
the catalogue).

The runs are spread over `--jobs` worker subprocesses (default: the number of CPUs, at most 4); each worker
imports torch once and runs one in-process pytest session per implementation (with -x for mutants: stop at
the first failing test), each in its own temporary folder.
"""
import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALT_DIR = os.path.join(ROOT, "tools", "alt_solutions")
# what a test run needs next to the diffusion.py under test
TEST_FILES = ["test_diffusion.py", "grading.py", "conftest.py", "unet.py", "test_fixtures"]


@dataclass
class Mutant:
    name: str
    function: str  # the graded function the bug lives in
    edits: list = field(default_factory=list)  # [(old, new)]
    hint: str = ""


def M(name, function, edits, hint):
    return Mutant(name, function, list(edits), hint)


P_VAR = 'register("posterior_variance", (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) * (1.0 - alphas))'
MEAN = ("mean = extract(self.posterior_mean_coef_xt, t, x.shape) * x + "
        "extract(self.posterior_mean_coef_x0, t, x.shape) * x_0")
X0_HAT = """        x_0 = (x - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * eps) / extract(
            self.sqrt_alphas_cumprod, t, x.shape
        )"""
Q_X0 = "extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0"
Q_NOISE = "+ extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise"
RANDINT = "t = torch.randint(0, self.num_timesteps, (b,), device=x_0.device).long()"
LOOP = "for t_index in reversed(range(self.num_timesteps)):"
STEP = "img = self.p_sample(img, t, t_index)"
LOOP_RETURN = "return unnormalize_to_zero_to_one(img.clamp(-1.0, 1.0))"
# About half of real submissions store only alpha_t and alpha-bar_t and compute the rest where they use it: these
# edits turn the reference into that organisation (tools/alt_solutions/posterior_in_p_sample.py, which must stay
# equal to it: tests/test_fairness.py); the *_on_the_fly mutants are bugs of it (each charged to its own function).
ON_THE_FLY = [
    ("""        # Schedule in float64 (eq. 14), stored as float32 buffers so it follows .to(device).
        alphas = cosine_schedule(self.num_timesteps)
        # cumprod of the *clipped* alphas, so alpha-bar stays > 0 at t = T
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)  # alpha-bar_{t-1}, alpha-bar_0 = 1

        def register(name, value):
            self.register_buffer(name, value.to(torch.float32))

        register("alphas", alphas)
        register("alphas_cumprod", alphas_cumprod)
        register("alphas_cumprod_prev", alphas_cumprod_prev)
        # q(x_t | x_0) (eq. 13)
        register("sqrt_alphas_cumprod", torch.sqrt(alphas_cumprod))
        register("sqrt_one_minus_alphas_cumprod", torch.sqrt(1.0 - alphas_cumprod))
        # posterior q(x_{t-1} | x_t, x_0): mean coefficients and variance (eq. 18)
        register("posterior_mean_coef_x0", torch.sqrt(alphas_cumprod_prev) * (1.0 - alphas) / (1.0 - alphas_cumprod))
        register("posterior_mean_coef_xt", torch.sqrt(alphas) * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        register("posterior_variance", (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) * (1.0 - alphas))
""", """        alphas = cosine_schedule(self.num_timesteps)
        self.register_buffer("alphas", alphas.to(torch.float32))
        self.register_buffer("alphas_cumprod", torch.cumprod(alphas, dim=0).to(torch.float32))
"""),
    ("""        eps = self.model(x, t)
        # eq. 19: x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t), clipped to the data range
        x_0 = (x - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * eps) / extract(
            self.sqrt_alphas_cumprod, t, x.shape
        )
        x_0 = x_0.clamp(-1.0, 1.0)
        # eq. 18: posterior mean
        mean = extract(self.posterior_mean_coef_xt, t, x.shape) * x + extract(self.posterior_mean_coef_x0, t, x.shape) * x_0
        if t_index == 0:
            return mean  # the last step (t = 1) adds no noise
        # eq. 18: sigma_t^2 = (1 - alpha-bar_{t-1}) / (1 - alpha-bar_t) * (1 - alpha_t)
        sigma = torch.sqrt(extract(self.posterior_variance, t, x.shape))
""", """        alpha_t = extract(self.alphas, t, x.shape)
        alpha_bar_t = extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = extract(F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0), t, x.shape)
        eps = self.model(x, t)
        x_0 = ((x - torch.sqrt(1 - alpha_bar_t) * eps) / torch.sqrt(alpha_bar_t)).clamp(-1.0, 1.0)
        mean = (torch.sqrt(alpha_t) * (1 - alpha_bar_prev) * x + torch.sqrt(alpha_bar_prev) * (1 - alpha_t) * x_0) / (
            1 - alpha_bar_t
        )
        if t_index == 0:
            return mean
        sigma = torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_t))
"""),
    ("""        return (
            extract(self.sqrt_alphas_cumprod, t, x_0.shape) * x_0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise
        )
""", """        alpha_bar_t = extract(self.alphas_cumprod, t, x_0.shape)
        return torch.sqrt(alpha_bar_t) * x_0 + torch.sqrt(1 - alpha_bar_t) * noise
"""),
]
NOISE_STEP = "return mean + sigma * self.noise_like(x.shape, x.device)"

MUTANTS = [
    # ---------------------------------------------------------------- schedule (__init__ and the given schedule helper)
    M("schedule_unclipped", "schedule",
      [("    return torch.clip(alphas, 0.001, 1.0)", "    return alphas")],
      "alpha_bar collapses to ~0 at the last step: clip every alpha_t to [0.001, 1] (eq. 14) before the cumulative product."),
    M("schedule_alpha_for_alpha_bar", "schedule",
      [("alphas_cumprod = torch.cumprod(alphas, dim=0)", "alphas_cumprod = alphas")],
      "Looks like alpha_t was used where alpha_bar_t = alpha_1 * ... * alpha_t belongs (take the cumulative product, eq. 12)."),
    M("schedule_alpha_bar_0_is_0", "schedule",
      [("F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)", "F.pad(alphas_cumprod[:-1], (1, 0), value=0.0)")],
      "alpha_bar_{t-1} at the first step looks wrong: alpha_bar_0 = 1 (nothing is noised before step 1)."),
    M("schedule_alpha_bar_prev_not_shifted", "schedule",
      [("alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)", "alphas_cumprod_prev = alphas_cumprod")],
      "Looks like alpha_bar_t was used where alpha_bar_{t-1} belongs (shift by one step, with alpha_bar_0 = 1)."),
    M("schedule_linear_betas", "schedule",
      [("alphas = cosine_schedule(self.num_timesteps)",
        "alphas = 1.0 - torch.linspace(1e-4, 0.02, self.num_timesteps, dtype=torch.float64)")],
      "Looks like the linear beta schedule of Ho et al.; the homework uses the cosine schedule (eq. 14)."),
    M("schedule_no_offset_s", "schedule",
      [("f = torch.cos(((steps / timesteps + s) / (1 + s)) * math.pi / 2) ** 2",
        "f = torch.cos((steps / timesteps) * math.pi / 2) ** 2")],
      "The cosine schedule looks like it lacks the offset s = 0.008: f(t) = cos(((t/T + s) / (1 + s)) * pi/2)^2 (eq. 14)."),
    M("schedule_one_minus_sqrt", "schedule",
      [("torch.sqrt(1.0 - alphas_cumprod))", "1.0 - torch.sqrt(alphas_cumprod))")],
      "Looks like 1 - sqrt(alpha_bar_t) was used where sqrt(1 - alpha_bar_t) belongs (eq. 13)."),
    M("schedule_variance_beta", "schedule",
      [(P_VAR, 'register("posterior_variance", 1.0 - alphas)')],
      "Looks like sigma_t^2 = beta_t was used; the homework uses the posterior variance "
      "(1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t (eq. 18)."),
    M("schedule_variance_missing_beta", "schedule",
      [(P_VAR, 'register("posterior_variance", (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod))')],
      "The posterior variance looks like it lacks the factor beta_t = 1 - alpha_t (eq. 18)."),
    M("schedule_posterior_coefs_swapped", "schedule",
      [('register("posterior_mean_coef_x0", torch.sqrt(alphas_cumprod_prev)',
        'register("posterior_mean_coef_xt", torch.sqrt(alphas_cumprod_prev)'),
       ('register("posterior_mean_coef_xt", torch.sqrt(alphas) *', 'register("posterior_mean_coef_x0", torch.sqrt(alphas) *')],
      "The posterior-mean coefficients look swapped: sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) multiplies x_0, "
      "sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) multiplies x_t (eq. 18)."),
    M("schedule_coef_xt_no_sqrt", "schedule",
      [("torch.sqrt(alphas) * (1.0 - alphas_cumprod_prev)", "alphas * (1.0 - alphas_cumprod_prev)")],
      "Looks like alpha_t was used where sqrt(alpha_t) belongs in the x_t coefficient of the posterior mean (eq. 18)."),
    M("schedule_coef_x0_alpha_bar_t", "schedule",
      [("torch.sqrt(alphas_cumprod_prev) * (1.0 - alphas)", "torch.sqrt(alphas_cumprod) * (1.0 - alphas)")],
      "Looks like alpha_bar_t was used where alpha_bar_{t-1} belongs in the x_0 coefficient of the posterior mean (eq. 18)."),
    M("schedule_not_buffers", "schedule",
      [("self.register_buffer(name, value.to(torch.float32))", "setattr(self, name, value.to(torch.float32))")],
      "The schedule does not follow diffusion.to(device): register it with self.register_buffer."),
    M("schedule_float64_buffers", "schedule",
      [("self.register_buffer(name, value.to(torch.float32))", "self.register_buffer(name, value)")],
      "The schedule is float64, so outputs come out float64 (the float32 U-Net would crash on them)."),
    # ---------------------------------------------------------------- q_sample
    M("q_sample_one_minus_alpha_bar_no_sqrt", "q_sample",
      [(Q_NOISE, "+ (1.0 - extract(self.alphas_cumprod, t, x_0.shape)) * noise")],
      "Looks like (1 - alpha_bar_t) was used where sqrt(1 - alpha_bar_t) belongs (eq. 13)."),
    M("q_sample_alpha_bar_no_sqrt", "q_sample",
      [(Q_X0, "extract(self.alphas_cumprod, t, x_0.shape) * x_0")],
      "Looks like alpha_bar_t was used where sqrt(alpha_bar_t) belongs (eq. 13)."),
    M("q_sample_alpha_for_alpha_bar", "q_sample",
      [(Q_X0, "extract(self.alphas, t, x_0.shape).sqrt() * x_0"),
       (Q_NOISE, "+ (1.0 - extract(self.alphas, t, x_0.shape)).sqrt() * noise")],
      "Looks like alpha_t was used where alpha_bar_t belongs: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 13)."),
    M("q_sample_t_minus_1", "q_sample",
      [(Q_X0, "self.sqrt_alphas_cumprod[t - 1].view(-1, 1, 1, 1) * x_0"),
       (Q_NOISE, "+ self.sqrt_one_minus_alphas_cumprod[t - 1].view(-1, 1, 1, 1) * noise")],
      "Off by one in t: t holds code indices, and index i is math step i + 1, so use alpha_bar[t] (no - 1)."),
    M("q_sample_swapped", "q_sample",
      [(Q_X0, "extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * x_0"),
       (Q_NOISE, "+ extract(self.sqrt_alphas_cumprod, t, x_0.shape) * noise")],
      "The two coefficients look swapped: sqrt(alpha_bar_t) multiplies x_0, sqrt(1 - alpha_bar_t) the noise (eq. 13)."),
    M("q_sample_minus_noise", "q_sample",
      [(Q_NOISE, "- extract(self.sqrt_one_minus_alphas_cumprod, t, x_0.shape) * noise")],
      "The noise term has the wrong sign: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (eq. 13)."),
    M("q_sample_first_t_for_batch", "q_sample",
      [(Q_X0, "extract(self.sqrt_alphas_cumprod, t[:1].expand_as(t), x_0.shape) * x_0"),
       (Q_NOISE, "+ extract(self.sqrt_one_minus_alphas_cumprod, t[:1].expand_as(t), x_0.shape) * noise")],
      "Every image got the first image's t: use each image's own t[i]."),
    M("q_sample_first_t_for_batch_on_the_fly", "q_sample",
      ON_THE_FLY + [("alpha_bar_t = extract(self.alphas_cumprod, t, x_0.shape)", "alpha_bar_t = self.alphas_cumprod[t[0]]")],
      "Every image got the first image's t: use each image's own t[i]."),
    M("q_sample_extract_four_arguments", "q_sample",
      [(Q_X0, "extract(self.sqrt_alphas_cumprod, t, x_0.shape, x_0.device) * x_0")],
      "extract takes three arguments (a, t, x_shape); the result is on a's device already."),
    M("q_sample_extract_four_arguments_on_the_fly", "q_sample",
      ON_THE_FLY + [("alpha_bar_t = extract(self.alphas_cumprod, t, x_0.shape)",
                     "alpha_bar_t = extract(self.alphas_cumprod, t, x_0.shape, x_0.device)")],
      "extract takes three arguments (a, t, x_shape); the result is on a's device already."),
    # ---------------------------------------------------------------- p_losses
    M("p_losses_mse", "p_losses",
      [("F.l1_loss(predicted_noise, noise)", "F.mse_loss(predicted_noise, noise)")],
      "Looks like the squared error (MSE) was used; the homework's loss is the L1 (mean absolute) error (Algorithm 1)."),
    M("p_losses_target_x0", "p_losses",
      [("F.l1_loss(predicted_noise, noise)", "F.l1_loss(predicted_noise, x_0)")],
      "The loss compares the prediction with x_0; the model predicts the noise, so the target is `noise` (Algorithm 1)."),
    M("p_losses_model_sees_x0", "p_losses",
      [("predicted_noise = self.model(x_t, t)", "predicted_noise = self.model(x_0, t)")],
      "The model was given x_0; it must see the noisy x_t = q_sample(x_0, t, noise) (Algorithm 1)."),
    M("p_losses_model_t_plus_1", "p_losses",
      [("predicted_noise = self.model(x_t, t)", "predicted_noise = self.model(x_t, t + 1)")],
      "The model got t + 1; give it the same code index t that q_sample used."),
    M("p_losses_sum", "p_losses",
      [("F.l1_loss(predicted_noise, noise)", 'F.l1_loss(predicted_noise, noise, reduction="sum")')],
      "The loss is a sum; take the mean over all elements (Algorithm 1)."),
    M("p_losses_fresh_noise", "p_losses",
      [("x_t = self.q_sample(x_0, t, noise)", "x_t = self.q_sample(x_0, t, torch.randn_like(noise))")],
      "x_t was made with fresh noise: use the `noise` argument, which is also the loss's target."),
    M("p_losses_detached", "p_losses",
      [("predicted_noise = self.model(x_t, t)", "predicted_noise = self.model(x_t, t).detach()")],
      "The prediction is detached, so no gradient reaches the model."),
    # ---------------------------------------------------------------- forward
    M("forward_never_draws_0", "forward",
      [(RANDINT, "t = torch.randint(1, self.num_timesteps, (b,), device=x_0.device).long()")],
      "t never takes the value 0: draw from 0..T-1."),
    M("forward_never_draws_last", "forward",
      [(RANDINT, "t = torch.randint(0, self.num_timesteps - 1, (b,), device=x_0.device).long()")],
      "t never takes the value T-1: torch.randint's upper bound is exclusive."),
    M("forward_draws_1_to_T", "forward",
      [(RANDINT, "t = torch.randint(1, self.num_timesteps + 1, (b,), device=x_0.device).long()")],
      "t was drawn as a math step 1..T; the code works with indices 0..T-1."),
    M("forward_one_t_per_batch", "forward",
      [(RANDINT, "t = torch.randint(0, self.num_timesteps, (1,), device=x_0.device).long().expand(b)")],
      "The whole batch shares one t: draw one t per image."),
    M("forward_renormalizes", "forward",
      [("return self.p_losses(x_0, t, noise)", "return self.p_losses(normalize_to_neg_one_to_one(x_0), t, noise)")],
      "x_0 was normalized again; forward gets x_0 already in [-1, 1]."),
    M("forward_ignores_noise", "forward",
      [("return self.p_losses(x_0, t, noise)", "return self.p_losses(x_0, t, torch.randn_like(x_0))")],
      "forward drew its own noise; use the `noise` argument."),
    # ---------------------------------------------------------------- p_sample
    M("p_sample_no_clamp", "p_sample",
      [("        x_0 = x_0.clamp(-1.0, 1.0)\n", "")],
      "The x_0 estimate looks unclipped: clamp it to [-1, 1] before the posterior mean (eq. 19)."),
    M("p_sample_clamp_0_1", "p_sample",
      [("x_0 = x_0.clamp(-1.0, 1.0)", "x_0 = x_0.clamp(0.0, 1.0)")],
      "The x_0 estimate is clamped to [0, 1]; the model works in [-1, 1]."),
    M("p_sample_variance_for_std", "p_sample",
      [("sigma = torch.sqrt(extract(self.posterior_variance, t, x.shape))",
        "sigma = extract(self.posterior_variance, t, x.shape)")],
      "Looks like sigma_t^2 was used where sigma_t belongs: the noise is scaled by the standard deviation (eq. 18)."),
    M("p_sample_noise_at_last_step", "p_sample",
      # a variance floored at step 1 (as in Ho et al.'s code) plus noise at t_index 0
      [(P_VAR, "pv = (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod) * (1.0 - alphas)\n"
               '        register("posterior_variance", torch.cat([pv[1:2], pv[1:]]))'),
       ("        if t_index == 0:\n            return mean  # the last step (t = 1) adds no noise\n", "")],
      "Noise was added at the last step (t_index = 0): Algorithm 2 returns the mean there (z = 0 when t = 1)."),
    M("p_sample_no_noise_step_off_by_one", "p_sample",
      [("if t_index == 0:", "if t_index == 1:")],
      "The noise-free step is t_index = 0 (math step t = 1); every other step adds sigma_t z."),
    M("p_sample_x0_divides_by_alpha", "p_sample",
      [(X0_HAT, "        x_0 = (x - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * eps) / "
                "extract(self.alphas, t, x.shape).sqrt()")],
      "The x_0 estimate divides by sqrt(alpha_t); eq. 19 divides by sqrt(alpha_bar_t)."),
    M("p_sample_x0_one_minus_alpha_bar_no_sqrt", "p_sample",
      [("x_0 = (x - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * eps)",
        "x_0 = (x - (1.0 - extract(self.alphas_cumprod, t, x.shape)) * eps)")],
      "Looks like (1 - alpha_bar_t) was used where sqrt(1 - alpha_bar_t) belongs in the x_0 estimate (eq. 19)."),
    M("p_sample_model_t_plus_1", "p_sample",
      [("eps = self.model(x, t)", "eps = self.model(x, t + 1)")],
      "The model got t + 1; give it the code index t."),
    M("p_sample_randn", "p_sample",
      [("return mean + sigma * self.noise_like(x.shape, x.device)", "return mean + sigma * torch.randn(x.shape, device=x.device)")],
      "The noise came from torch.randn; draw it with self.noise_like(x.shape, x.device)."),
    M("p_sample_mean_swapped", "p_sample",
      [(MEAN, "mean = extract(self.posterior_mean_coef_xt, t, x.shape) * x_0 + "
              "extract(self.posterior_mean_coef_x0, t, x.shape) * x")],
      "x_t and the x_0 estimate look swapped in the posterior mean (eq. 18)."),
    # real submissions' p_sample bugs, in both organisations: each costs p_sample's points only (and the device
    # check where p_sample raises), wherever the posterior is computed
    M("p_sample_x0_hat_plus_noise", "p_sample",
      [("            return mean  # the last step (t = 1) adds no noise\n", "            return x_0\n"),
       (NOISE_STEP, "return x_0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * self.noise_like(x.shape, x.device)")],
      "p_sample returned the x_0 estimate plus sqrt(1 - alpha_bar_t) z; x_(t-1) is the posterior mean plus sigma_t z (eq. 18)."),
    M("p_sample_x0_hat_plus_noise_on_the_fly", "p_sample",
      ON_THE_FLY + [("            return mean\n", "            return x_0\n"),
                    (NOISE_STEP, "return x_0 + torch.sqrt(1 - alpha_bar_t) * self.noise_like(x.shape, x.device)")],
      "p_sample returned the x_0 estimate plus sqrt(1 - alpha_bar_t) z; x_(t-1) is the posterior mean plus sigma_t z (eq. 18)."),
    M("p_sample_missing_multiplication", "p_sample",
      [(MEAN, "mean = extract(self.posterior_mean_coef_xt, t, x.shape) * x + "
              "extract(self.posterior_mean_coef_x0, t, x.shape) (x_0)")],
      "A `*` is missing in the posterior mean: `coefficient (x_0)` calls the tensor instead of multiplying."),
    M("p_sample_missing_multiplication_on_the_fly", "p_sample",
      ON_THE_FLY + [("torch.sqrt(alpha_bar_prev) * (1 - alpha_t) * x_0", "torch.sqrt(alpha_bar_prev) * (1 - alpha_t) (x_0)")],
      "A `*` is missing in the posterior mean: `coefficient (x_0)` calls the tensor instead of multiplying."),
    M("p_sample_noise_like_one_argument", "p_sample",
      [(NOISE_STEP, "return mean + sigma * self.noise_like(x.shape)")],
      "noise_like takes the shape and the device: self.noise_like(x.shape, x.device)."),
    M("p_sample_noise_like_one_argument_on_the_fly", "p_sample",
      ON_THE_FLY + [(NOISE_STEP, "return mean + sigma * self.noise_like(x.shape)")],
      "noise_like takes the shape and the device: self.noise_like(x.shape, x.device)."),
    M("p_sample_extract_four_arguments", "p_sample",
      [("x_0 = (x - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * eps)",
        "x_0 = (x - extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape, x.device) * eps)")],
      "extract takes three arguments (a, t, x_shape); the result is on a's device already."),
    M("p_sample_extract_four_arguments_on_the_fly", "p_sample",
      ON_THE_FLY + [("alpha_t = extract(self.alphas, t, x.shape)", "alpha_t = extract(self.alphas, t, x.shape, x.device)")],
      "extract takes three arguments (a, t, x_shape); the result is on a's device already."),
    # ---------------------------------------------------------------- p_sample_loop
    M("loop_ascending", "p_sample_loop", [(LOOP, "for t_index in range(self.num_timesteps):")],
      "The loop runs upward; Algorithm 2 goes from t = T down to 1."),
    M("loop_skips_last_step", "p_sample_loop", [(LOOP, "for t_index in reversed(range(1, self.num_timesteps)):")],
      "The loop stops before t_index = 0."),
    M("loop_starts_below_T", "p_sample_loop", [(LOOP, "for t_index in reversed(range(self.num_timesteps - 1)):")],
      "The loop starts at t_index = T-2 instead of T-1."),
    M("loop_t_index_plus_1", "p_sample_loop", [(STEP, "img = self.p_sample(img, t, t_index + 1)")],
      "p_sample got t_index + 1; pass the code index."),
    M("loop_not_chained", "p_sample_loop",
      [(STEP, "x = self.p_sample(img, t, t_index)"), (LOOP_RETURN, "return unnormalize_to_zero_to_one(x.clamp(-1.0, 1.0))")],
      "Each step must start from the previous step's output."),
    M("loop_no_unnormalize", "p_sample_loop", [(LOOP_RETURN, "return img.clamp(-1.0, 1.0)")],
      "The images are still in [-1, 1]: finish with unnormalize_to_zero_to_one."),
    M("loop_normalize_instead", "p_sample_loop",
      [(LOOP_RETURN, "return normalize_to_neg_one_to_one(img.clamp(-1.0, 1.0))")],
      "normalize_to_neg_one_to_one was used where unnormalize_to_zero_to_one belongs."),
    M("loop_clamp_0_1", "p_sample_loop", [(LOOP_RETURN, "return unnormalize_to_zero_to_one(img.clamp(0.0, 1.0))")],
      "The images were clamped to [0, 1] before unnormalizing: x_0 is in [-1, 1], so clamp to [-1, 1], then map "
      "to [0, 1] with unnormalize_to_zero_to_one."),
    M("loop_unnormalize_every_step", "p_sample_loop",
      [(STEP, "img = unnormalize_to_zero_to_one(self.p_sample(img, t, t_index).clamp(-1.0, 1.0))"),
       (LOOP_RETURN, "return img")],
      "The images were clamped and unnormalized inside the loop: every step works in [-1, 1]; clamp and map to "
      "[0, 1] once, after the last step."),
    M("loop_t_of_batch_1", "p_sample_loop",
      [("t = torch.full((b,), t_index,", "t = torch.full((1,), t_index,")],
      "t must hold one entry per image, shape (batch,)."),
    # ---------------------------------------------------------------- sample
    M("sample_randn", "sample", [("img = self.noise_like(shape, device)", "img = torch.randn(shape, device=device)")],
      "x_T came from torch.randn; draw it with self.noise_like(shape, device)."),
    M("sample_channels_last", "sample",
      [("shape = (batch_size, self.channels, self.image_size, self.image_size)",
        "shape = (batch_size, self.image_size, self.image_size, self.channels)")],
      "x_T has shape (b, H, W, C); PyTorch images are (b, C, H, W)."),
    M("sample_unnormalize_twice", "sample",
      [("return self.p_sample_loop(img)", "return unnormalize_to_zero_to_one(self.p_sample_loop(img))")],
      "The images were unnormalized twice: p_sample_loop already returns [0, 1]."),
    M("sample_no_device", "sample", [("img = self.noise_like(shape, device)", "img = self.noise_like(shape, None)")],
      "x_T was drawn without a device; pass the module's device."),
    M("sample_reads_model_device", "sample", [("device = self.alphas_cumprod.device", "device = self.model.device")],
      "A U-Net has no .device attribute: take the device of one of your buffers, or next(self.model.parameters()).device."),
    M("sample_from_zeros", "sample", [("img = self.noise_like(shape, device)", "img = torch.zeros(shape, device=device)")],
      "Sampling must start from pure noise x_T ~ N(0, I), not zeros."),
]


def apply(source, mutant):
    for old, new in mutant.edits:
        count = source.count(old)
        if count != 1:
            raise ValueError(f"mutant {mutant.name}: expected exactly one occurrence of {old!r}, found {count}")
        source = source.replace(old, new)
    return source


def reference_source():
    with open(os.path.join(ROOT, "diffusion.py")) as f:
        return f.read()


def prepare_dir(diffusion_source, parent, name):
    work = os.path.join(parent, re.sub(r"[^A-Za-z0-9_]", "_", name))
    os.makedirs(work)
    for item in TEST_FILES:
        src = os.path.join(ROOT, item)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(work, item))
        elif os.path.exists(src):
            shutil.copy(src, work)
    with open(os.path.join(work, "diffusion.py"), "w") as f:
        f.write(diffusion_source)
    with open(os.path.join(work, "pytest.ini"), "w") as f:
        f.write("[pytest]\ntestpaths = test_diffusion.py\n")
    return work


class _Collect:
    """pytest plugin: which tests failed (with their message) and how many passed."""

    def __init__(self):
        self.failed, self.messages, self.passed = [], [], 0

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.failed.append(report.nodeid)
            self.messages.append(f"{report.nodeid}: {report.longreprtext[-1500:]}")
        elif report.when == "call" and report.passed:
            self.passed += 1


def _run_in_process(work, stop_at_first_failure):
    """One pytest session in this process on `work`: the previous run's modules are dropped first."""
    import pytest

    for module in ("diffusion", "test_diffusion", "grading", "conftest", "unet"):
        sys.modules.pop(module, None)
    collect = _Collect()
    # unraisableexception runs gc.collect() twice per session (~0.5 s with torch loaded)
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "no:threadexception",
            "--tb=short", "--rootdir", work, "-c", os.path.join(work, "pytest.ini"), os.path.join(work, "test_diffusion.py")]
    if stop_at_first_failure:
        args.insert(0, "-x")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        rc = int(pytest.main(args, plugins=[collect]))
    finally:
        os.chdir(cwd)
    return rc, collect.failed, collect.passed, "\n".join(collect.messages)


def _worker(job_file, result_file):
    """Runs the jobs listed in job_file one after another in this process (torch is imported once)."""
    import contextlib
    import io
    import json

    sys.dont_write_bytecode = True
    with open(job_file) as f:
        jobs = json.load(f)
    for kind, name, work in jobs:
        start = time.time()
        with contextlib.redirect_stdout(io.StringIO()):
            rc, failed, passed, output = _run_in_process(work, stop_at_first_failure=(kind == "mutant"))
        with open(result_file, "a") as f:
            f.write(json.dumps([kind, name, rc, failed, passed, output, time.time() - start]) + "\n")


def run_jobs(jobs, n_workers, parent):
    """jobs: [(kind, name, diffusion source)] -> results, spread over n_workers subprocesses."""
    import json

    prepared = [(kind, name, prepare_dir(src, parent, f"{kind}_{name}")) for kind, name, src in jobs]
    chunks = [prepared[i::n_workers] for i in range(n_workers)]
    procs, result_files = [], []
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", DIFFUSION_TEST_TIMEOUT="60", OMP_NUM_THREADS="1")
    for i, chunk in enumerate(c for c in chunks if c):
        job_file, result_file = os.path.join(parent, f"jobs{i}.json"), os.path.join(parent, f"results{i}.jsonl")
        with open(job_file, "w") as f:
            json.dump(chunk, f)
        open(result_file, "w").close()
        result_files.append(result_file)
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", job_file, result_file],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in procs]
    results = []
    for result_file in result_files:
        with open(result_file) as f:
            results += [json.loads(line) for line in f if line.strip()]
    done = {r[1] for r in results}
    for kind, name, _ in prepared:
        if name not in done:
            results.append([kind, name, -1, [], 0, "worker died:\n" + "\n".join(e[-2000:] for e in errors), 0.0])
    return results


def correct_implementations():
    yield "reference", reference_source()
    for path in sorted(glob.glob(os.path.join(ALT_DIR, "*.py"))):
        with open(path) as f:
            yield os.path.relpath(path, ROOT), f.read()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only mutants whose name contains this")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--no-alternatives", action="store_true", help="skip the correct implementations")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        _worker(*args.worker)
        return 0
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<42} {m.function:<14} {m.hint}")
        return 0

    source = reference_source()
    jobs = []
    if not args.no_alternatives:
        jobs += [("correct", name, src) for name, src in correct_implementations()]
    mutants = [m for m in MUTANTS if args.k in m.name]
    jobs += [("mutant", m.name, apply(source, m)) for m in mutants]  # raises if the catalogue is stale

    problems = []
    start = time.time()
    with tempfile.TemporaryDirectory() as parent:
        results = run_jobs(jobs, max(1, args.jobs), parent)
    for kind, name, rc, failed, passed, output, seconds in results:
        if kind == "mutant":
            ok = rc == 1 and bool(failed)
            print(f"{'killed  ' if ok else 'SURVIVED'} {name:<42} {seconds:5.1f}s  by {failed[0] if failed else '-'}")
            if not ok:
                problems.append(f"mutant {name} survived (pytest exit {rc})\n{output[-2000:]}")
        else:
            ok = rc == 0 and not failed
            print(f"{'passes  ' if ok else 'FAILS   '} {name:<42} {seconds:5.1f}s  {passed} passed")
            if not ok:
                problems.append(f"correct implementation {name} does not pass (pytest exit {rc}): {failed}\n{output[-3000:]}")
    survived = sum(1 for p in problems if p.startswith("mutant"))
    print(f"\nmutation score: {len(mutants) - survived}/{len(mutants)} mutants killed; "
          f"{len(jobs) - len(mutants)} correct implementations run; {time.time() - start:.0f}s")
    for p in problems:
        print("\n" + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
