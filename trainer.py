"""Training, sampling, FID and the diffusion figures for the homework's DDPM: the `Trainer`.

Read `Trainer.train` top to bottom: it is Algorithm 1 with a checkpoint, a sample grid and FID at each milestone.
The machinery lives in kit/ (data, checkpoints, figures, wandb, FID, device set-up); what makes it fast without
changing the math: the images are decoded once into a uint8 tensor on the training device and augmented there,
the loss is read back from the device every `log_every` steps instead of every step, sampling runs under
inference mode, Adam is fused wherever torch has the kernels, and CUDA gets mixed precision, cuDNN autotuning and
TF32.
"""
import contextlib
import glob
import math
import os
import sys
import uuid

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from diffusion import Diffusion
from kit.checkpoints import (
    CHECKPOINT_NAME,
    check_space,
    finite,
    restore_training_state,
    resume_note,
    start_state,
    training_state,
    write_checkpoint,
)
from kit.data import BatchOrder, ImageData, list_images
from kit.device import (
    RunClock,
    amp_dtype,
    autocast,
    compile_warning,
    configure_cuda_math,
    distributed,
    float64_on_mps_problem,
    free_memory,
    fused_adam,
    halving_batch_on_oom,
    host_group,
    isolated_rng,
    read_back,
    sampling_batch_size,
    seed_everything,
    select_device,
    setup_distributed,
)
from kit.errors import ConfigError, TrainingDiverged, TrainingInterrupted
from kit.fid import ensure_inception_weights, scorer_for_data
from kit.figures import diffusion_figures, save_grid, write_metrics
from kit.interrupts import SIGNAL_NAMES, agreed_signal, stop_after_the_step
from kit.logger import WandbLogger
from unet import Unet


class Trainer:
    """One run in `cfg.save_folder`: set up from a validated `utils.Config`, resumed from its checkpoint if any."""

    def __init__(self, cfg, for_training=True):
        self.cfg, self.for_training = cfg, for_training
        self.device, self.rank, self.world_size = setup_distributed(select_device(cfg.device))
        self.is_main = self.rank == 0
        self.amp_dtype = amp_dtype(cfg.amp, self.device)  # checked against the device before the data is read
        configure_cuda_math(self.device)
        seed_everything(cfg.seed + self.rank)
        self.unet = Unet(dim=cfg.unet_dim, dim_mults=cfg.unet_dim_mults, channels=3)
        self.diffusion = Diffusion(self.unet, image_size=cfg.image_size, timesteps=cfg.time_steps)
        problem = float64_on_mps_problem(self.device.type, self.diffusion)
        if problem:
            raise ConfigError(problem)
        self.diffusion.to(self.device)
        self.checkpoint_path = os.path.join(cfg.save_folder, CHECKPOINT_NAME)
        self.samples_folder = os.path.join(cfg.save_folder, "samples")
        if cfg.fid and cfg.fid_extractor == "inception" and self.is_main and for_training:
            ensure_inception_weights()  # a missing download fails now, before the data is read
        # Reading the data is the first long step: everything above was cheap to check.
        self.data = ImageData(list_images(cfg.data_path, cfg.data_class), cfg.image_size, self.device,
                              cfg.dataloader_workers)
        if for_training and cfg.batch_size * self.world_size > len(self.data):
            raise ConfigError(f"--batch_size {cfg.batch_size} is larger than the {len(self.data)} usable images in "
                              f"{cfg.data_path} ({cfg.data_class}): lower --batch_size or add images.")
        self.batch_order = BatchOrder(len(self.data), cfg.seed, self.device)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=cfg.learning_rate, fused=fused_adam(self.device))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step, self.losses, self.fids = 0, [], []  # (step, value) pairs
        self.sampling_batch = None  # found at the first sampling (see `sample`)
        self.run_id, self.started_from = uuid.uuid4().hex[:8], None
        self._load_start_checkpoint()
        if self.is_main and for_training:  # a save writes the new file beside the old one
            check_space(self.checkpoint_path, 3 * 4 * sum(p.numel() for p in self.unet.parameters()))

        self.fid_scorer = None
        if cfg.fid and self.is_main and for_training:
            with isolated_rng(self.device):  # building an extractor must not shift the training RNG streams
                self.fid_scorer = scorer_for_data(self.data, cfg, self.device)
        self.logger = WandbLogger(cfg, self.run_id) if self.is_main else None
        if for_training and cfg.compile:
            warning = compile_warning(self.device.type)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
            else:
                self.diffusion.model = torch.compile(self.unet)
        self.model_for_training = distributed(self.diffusion, self.device) if for_training else self.diffusion
        # where the torchrun processes agree when to stop (a CPU all-reduce: it does not wait for the GPU)
        self.stop_group = host_group() if self.world_size > 1 else None

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def _load_start_checkpoint(self):
        path, state = start_state(self.cfg, self.checkpoint_path, self.for_training)
        if state is None:
            return
        self.unet.load_state_dict(state["model"])
        self.step, self.run_id = state["step"], state["wandb_run_id"]  # the same wandb run goes on
        self.started_from = state.get("started_from") if path == self.checkpoint_path else os.path.abspath(path)
        if self.for_training:
            self.losses, self.fids = restore_training_state(state, self.optimizer, self.scaler, self.device,
                                                            self.rank, self.cfg.seed, self.cfg.learning_rate)
            if self.is_main:
                print(resume_note(path, state, self.cfg))

    def save_checkpoint(self):
        """Write checkpoint.pt, only from weights known to be good: finite, with a finite loss."""
        if not self.is_main:
            return
        with torch.no_grad(), isolated_rng(self.device), autocast(self.device, self.amp_dtype):
            usable = finite(self.unet) and bool(torch.isfinite(self.diffusion(*self._fixed_batch(self.cfg.batch_size))))
        if not usable:
            raise TrainingDiverged.at("the weights stopped giving a finite loss", self.step, self.checkpoint_path,
                                      self.cfg.learning_rate)
        write_checkpoint(self.checkpoint_path, training_state(self))

    def _fixed_batch(self, count):
        """`count` real images (fixed crops and flips) and noise, from --seed; call under isolated_rng."""
        torch.manual_seed(self.cfg.seed)
        x_0 = self.data.batch(torch.arange(min(count, len(self.data)), device=self.data.device))
        return x_0, torch.randn_like(x_0)

    # --- training -------------------------------------------------------------------------------------------------

    def train(self):
        """Algorithm 1, `train_steps` times: batch -> loss -> optimizer step; at each milestone a checkpoint,
        a sample grid and FID."""
        cfg = self.cfg
        bar = tqdm(total=cfg.train_steps, initial=self.step, desc="Training", disable=not self.is_main)
        pending = []  # this step's and earlier losses, still on the device
        if self.step >= cfg.train_steps and self.is_main:
            print(f"Nothing to train: the run is at step {self.step} and --train_steps is {cfg.train_steps}. "
                  "Pass a larger --train_steps to train more.")
        if self.is_main and self.step and self._milestone() and not os.path.isfile(self._grid_path()):
            self.save_sample_grid()  # its save point was interrupted before the grid was written
        clock = RunClock(self.step, cfg.train_steps, self.device)
        with stop_after_the_step(self.checkpoint_path) as stop:
            while self.step < cfg.train_steps and not self._stop_agreed(stop):
                pending.append(self._optimizer_step())
                self.step += 1
                bar.update(1)
                if self.is_main and (note := clock.note_after(self.step)):
                    tqdm.write(note)
                if self._milestone() or len(pending) >= cfg.log_every:
                    self._flush_losses(pending, bar)
                if self._milestone():  # one checkpoint per save point, after the grid and FID
                    try:
                        self.evaluate()
                    except Exception:  # sampling or FID failed: the training steps are saved all the same
                        self.save_checkpoint()
                        raise
                    self.save_checkpoint()
        bar.close()
        interrupted = stop.requested and self.step < cfg.train_steps
        self._flush_losses(pending, bar)
        if self.is_main:
            if interrupted:
                self.save_checkpoint()
            self.write_metrics()
        if interrupted:
            if self.is_main:
                print(f"\nStopped at step {self.step} ({SIGNAL_NAMES[stop.signal]}): checkpoint saved to "
                      f"{self.checkpoint_path}. Re-run the same command to resume.")
            raise TrainingInterrupted(stop.signal)
        return self.summary()

    def _stop_agreed(self, stop):
        """Whether to stop before the next step. Under torchrun a signal may reach some processes only, or reach
        them during different steps; they all take the same decision after the same step, since a process that
        started one more step would wait forever in its gradient all-reduce and lose the final checkpoint."""
        if self.world_size > 1:
            stop.signal = agreed_signal(stop.signal, self.stop_group)
            stop.requested = stop.signal is not None
        return stop.requested

    def _milestone(self):
        return self.step % self.cfg.save_and_sample_every == 0 or self.step == self.cfg.train_steps

    def _optimizer_step(self):
        """One step of Algorithm 1 over `grad_accum` micro-batches; returns the step's loss, on the device."""
        cfg = self.cfg
        self.model_for_training.train()
        step_loss = torch.zeros((), device=self.device)
        per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        for micro in range(cfg.grad_accum):
            # the images of micro-batch `micro` of this step on this rank (disjoint across ranks)
            start = self.step * per_step + (micro * self.world_size + self.rank) * cfg.batch_size
            x_0 = self.data.batch(self.batch_order.indices(start, cfg.batch_size))
            # under DDP, gradients are all-reduced on the last micro-batch only
            no_sync = self.world_size > 1 and micro < cfg.grad_accum - 1
            with self.model_for_training.no_sync() if no_sync else contextlib.nullcontext():
                with autocast(self.device, self.amp_dtype):
                    loss = self.model_for_training(x_0, torch.randn_like(x_0)) / cfg.grad_accum
            self.scaler.scale(loss).backward()
            step_loss += loss.detach().float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return step_loss

    def _flush_losses(self, pending, bar):
        """Read the accumulated per-step losses back from the device (one sync), check them, log them."""
        values = read_back(pending, self.world_size)
        first_step = self.step - len(values) + 1
        for step, value in enumerate(values, start=first_step):
            if not math.isfinite(value):
                raise TrainingDiverged.at(f"the loss became {value}", step, self.checkpoint_path,
                                          self.cfg.learning_rate)
            self.losses.append((step, value))
            if self.logger:
                self.logger.log({"loss": value}, step=step)
        if values:
            bar.set_postfix(loss=f"{values[-1]:.4f}")

    # --- milestones -----------------------------------------------------------------------------------------------

    def evaluate(self):
        """Sample grid (and FID) at a milestone: logged, written to disk, and kept in the next checkpoint."""
        if not self.is_main:
            return
        log = {"img": self.save_sample_grid()}
        if self.fid_scorer is not None:
            log["fid"] = self.fid_scorer.score(self.sample(self.cfg.fid_num_samples))
            self.fids.append((self.step, log["fid"]))
            tqdm.write(f"step {self.step}: FID {log['fid']:.2f}")
        self.logger.log(log, step=self.step)
        self.write_metrics()

    def save_sample_grid(self):
        os.makedirs(self.samples_folder, exist_ok=True)
        return save_grid(self.sample(self.cfg.sample_grid_size), self._grid_path())

    def _grid_path(self):
        return os.path.join(self.samples_folder, f"sample-{self.step}.png")

    @torch.inference_mode()
    def sample(self, count, batch_size=None):
        """`count` images in [0, 1] on the CPU, drawn in batches (as many as the GPU's memory holds, see
        `sampling_batch_size`; halved while it runs out), without touching the training RNG streams."""
        chosen_here = batch_size is None
        batch_size = batch_size or self.sampling_batch or sampling_batch_size(
            self.cfg.image_size, self.cfg.unet_dim, free_memory(self.device))
        with isolated_rng(self.device), autocast(self.device, self.amp_dtype):
            images, worked = halving_batch_on_oom(self._draw, count, batch_size)
        if chosen_here:
            self.sampling_batch = worked  # the next milestones start from what worked
        return images

    def _draw(self, count, batch_size):
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)  # samples depend on (seed, step, batch size) only
        return torch.cat([self.diffusion.sample(min(batch_size, count - start)).float().cpu()
                          for start in tqdm(range(0, count, batch_size), desc="Sampling", leave=False)])

    def write_metrics(self):
        if self.is_main:
            write_metrics(self.cfg.save_folder, self.losses, self.fids)

    def summary(self):
        grids = sorted(glob.glob(os.path.join(self.samples_folder, "sample-*.png")), key=os.path.getmtime)
        checkpoint = self.checkpoint_path if os.path.isfile(self.checkpoint_path) else None
        return {"step": self.step, "loss": self.losses[-1][1] if self.losses else None,
                "fid": self.fids[-1][1] if self.fids else None, "save_folder": self.cfg.save_folder,
                "checkpoint": checkpoint, "sample_grid": grids[-1] if grids else None,
                "metrics": os.path.join(self.cfg.save_folder, "metrics.csv")}

    # --- figures --------------------------------------------------------------------------------------------------

    def visualize(self, num_images=4):
        """The forward and backward diffusion figures (handout 7.4, 7.5) of this model on real images."""
        self.unet.eval()
        with isolated_rng(self.device), autocast(self.device, self.amp_dtype):
            paths = diffusion_figures(self.diffusion, *self._fixed_batch(num_images), self.cfg.save_folder)
        if self.logger:
            self.logger.log(paths, step=self.step)
        return paths

    def close(self):
        if self.logger:
            self.logger.finish()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
