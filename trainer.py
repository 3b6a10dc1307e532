"""Training, sampling, FID, checkpoints and figures for the homework's DDPM.

The loop is plain on purpose (read `Trainer.train` top to bottom). What makes it fast without changing the math:
the images are decoded once into a uint8 tensor on the training device and augmented there (resize once, random
crop + flip per batch, as the course's torchvision pipeline does), the loss is read back from the device every
`log_every` steps instead of every step, sampling runs under inference mode, and CUDA gets mixed precision and
fused Adam.
"""
import contextlib
import csv
import dataclasses
import datetime
import glob
import io
import math
import os
import signal
import threading
import types
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from diffusion import Diffusion, normalize_to_neg_one_to_one, unnormalize_to_zero_to_one
from unet import Unet
from utils import (
    Config,
    ConfigError,
    atomic_write,
    isolated_rng,
    list_images,
    seed_everything,
    select_device,
    validate_config,
)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
VISUALIZE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 0.99)  # handout 7.4 / 7.5: points of T shown in the figures


class TrainingDiverged(RuntimeError):
    pass


@contextlib.contextmanager
def ctrl_c_stops_after_the_step():
    """The first Ctrl-C lets the current step (and any sampling or FID under way) finish, so the checkpoint
    saved next is consistent; a second Ctrl-C stops at once. Works in a terminal and in a Jupyter kernel."""
    stop = types.SimpleNamespace(requested=False)
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be set from the main thread: plain KeyboardInterrupt there
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        tqdm.write("Ctrl-C: saving a checkpoint after this step (press Ctrl-C again to stop at once).")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_image(path, load_size):
    """Decode one image and resize it as torchvision's Resize(load_size) does on a PIL image (bilinear,
    shorter side to load_size), then center-crop to a square so that all images stack into one tensor."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = load_size / min(w, h)
        img = img.resize((max(load_size, round(w * scale)), max(load_size, round(h * scale))), Image.BILINEAR)
        left, top = (img.size[0] - load_size) // 2, (img.size[1] - load_size) // 2
        return np.asarray(img.crop((left, top, left + load_size, top + load_size)), dtype=np.uint8)


class ImageData:
    """All training images, decoded once, as a (N, 3, L, L) uint8 tensor on the training device with
    L = int(1.12 * image_size). Batches get a random image_size crop and a random horizontal flip, in [-1, 1]."""

    def __init__(self, files, image_size, device, workers=4):
        self.image_size = image_size
        self.load_size = int(1.12 * image_size)

        def decode(path):
            try:
                return load_image(path, self.load_size)
            except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError):
                return None

        with ThreadPoolExecutor(max(1, workers)) as pool:
            decoded = list(tqdm(pool.map(decode, files), total=len(files), desc="Decoding images", leave=False))
        skipped = [f for f, img in zip(files, decoded) if img is None]
        images = [img for img in decoded if img is not None]
        if skipped:
            print(f"Skipped {len(skipped)} unreadable or non-image file(s), e.g. {skipped[0]}")
        if not images:
            raise ConfigError(
                f"none of the {len(files)} files under {os.path.dirname(files[0])!r} could be read as an image: "
                "check that the data folder holds .jpg/.png images (see data/README.md)."
            )
        self.files = [f for f, img in zip(files, decoded) if img is not None]
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous().to(device)
        self.device = device
        self._crop_range = torch.arange(image_size, device=device)  # pixel offsets inside a crop

    def __len__(self):
        return len(self.images)

    def batch(self, indices):
        """Random crop + flip of the given images, as floats in [-1, 1], drawn from the device's global RNG."""
        x = self.images[indices.to(self.device)]
        b = x.shape[0]
        slack = self.load_size - self.image_size
        offsets = torch.randint(0, slack + 1, (b, 2), device=self.device)
        rows = (offsets[:, 0, None] + self._crop_range)[:, None, :, None]  # (b, 1, S, 1)
        cols = (offsets[:, 1, None] + self._crop_range)[:, None, None, :]  # (b, 1, 1, S)
        channels = torch.arange(x.shape[1], device=self.device)[None, :, None, None]
        x = x[torch.arange(b, device=self.device)[:, None, None, None], channels, rows, cols]
        flip = torch.rand(b, device=self.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return normalize_to_neg_one_to_one(x.float() / 255)

    def center_crops(self):
        """The deterministic counterpart of the training crops: the reference images for FID."""
        start = (self.load_size - self.image_size) // 2
        return self.images[:, :, start : start + self.image_size, start : start + self.image_size]


class BatchOrder:
    """Which images each micro-batch uses: a fresh permutation per epoch, derived from (seed, epoch), so the
    order depends only on the step and a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, num_images, seed):
        self.num_images = num_images
        self.seed = seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch):
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_images, generator=generator)
        return self._perm

    def indices(self, start, count):
        """Images start .. start+count-1 of the endless stream of epoch permutations."""
        out = []
        while count > 0:
            epoch, offset = divmod(start, self.num_images)
            take = min(count, self.num_images - offset)
            out.append(self._permutation(epoch)[offset : offset + take])
            start, count = start + take, count - take
        return torch.cat(out)


def make_smoke_data(folder, count=48, size=36, seed=0):
    """A few generated images (soft colored blobs) in the homework's folder layout, for --smoke."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "cat"), exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        color, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = (blob * color + (1 - blob) * background).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "cat", f"smoke_{i:03d}.png"))
    return folder


def smoke_config(cfg):
    """--smoke: the whole pipeline, small: generated data, a few steps, sampling, tiny-extractor FID, figures."""
    checkpoint = os.path.join(cfg.save_folder, CHECKPOINT_NAME)
    if os.path.isfile(checkpoint) and not os.path.isdir(os.path.join(cfg.save_folder, "smoke_data")):
        raise ConfigError(f"--smoke would overwrite the training run in {cfg.save_folder!r} ({checkpoint}): "
                          "pass another folder, e.g. --smoke --save_folder ./smoke_results")
    data_path = make_smoke_data(os.path.join(cfg.save_folder, "smoke_data"))
    return dataclasses.replace(
        cfg, data_path=data_path, data_class="cat", train_steps=4, save_and_sample_every=4, batch_size=8,
        fid=True, fid_extractor="tiny", fid_num_samples=16, sample_grid_size=16, visualize=True, log_every=2,
        fresh=True, load_path=None, smoke=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# Logging


def wandb_key_configured():
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(requested):
    """'auto' -> online when a wandb key is configured, else offline run files. Never prompts."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if wandb_key_configured():
        return "online"
    print("wandb: no API key configured, logging offline to run files (`wandb sync` uploads them later).")
    return "offline"


class WandbLogger:
    """wandb that never stops training: any failure disables it with a one-line warning."""

    def __init__(self, cfg, run_id):
        self.run = None
        mode = wandb_mode(cfg.wandb)
        if mode == "disabled":
            return
        try:
            import wandb

            if mode == "online" and not wandb_key_configured():
                print("wandb: --wandb online but no API key is configured; logging offline instead.")
                mode = "offline"
            self.wandb = wandb
            self.run = wandb.init(
                project=cfg.wandb_project, config=dataclasses.asdict(cfg), dir=cfg.save_folder, mode=mode,
                id=run_id, resume="allow", settings=wandb.Settings(silent=True, console="off"),
            )
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            self._disable(error)

    def _disable(self, error):
        warnings.warn(f"wandb failed ({type(error).__name__}: {error}); training goes on without wandb.")
        self.run = None

    def log(self, data, step):
        if self.run is None:
            return
        try:
            data = {k: self.wandb.Image(v) if isinstance(v, str) and v.endswith(".png") else v for k, v in data.items()}
            self.run.log(data, step=step)
        except Exception as error:  # noqa: BLE001
            self._disable(error)

    def finish(self):
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as error:  # noqa: BLE001
                self._disable(error)


def save_grid(images, path):
    """Save (b, c, h, w) images in [0, 1] as one square PNG grid, rounded as torchvision's save_image does."""
    b, c, h, w = images.shape
    nrow = math.ceil(math.sqrt(b))
    ncol = math.ceil(b / nrow)
    pad = 2
    grid = torch.zeros(c, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i, img in enumerate(images.float().cpu()):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = img
    array = grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def save_figure(fig, path):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return path


def plot_curve(points, ylabel, path, smooth=True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, values = zip(*points)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values, alpha=0.35 if smooth and len(values) > 20 else 1.0, label=ylabel)
    if smooth and len(values) > 20:
        window = max(5, len(values) // 50)
        kernel = np.ones(window) / window
        ax.plot(steps[window - 1 :], np.convolve(values, kernel, mode="valid"), label=f"{ylabel} (mean of {window})")
        ax.legend()
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Trainer


def cpu_has_native_bf16():
    """x86 CPUs with AVX512-BF16 or AMX run bf16 matrix math natively (read from Linux's /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


class Trainer:
    def __init__(self, cfg: Config, for_training=True):
        if cfg.smoke:
            cfg = smoke_config(cfg)
        validate_config(cfg)
        self.cfg = cfg
        self.for_training = for_training
        self.rank, self.world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.is_main = self.rank == 0
        self.device = self._setup_device()
        self.amp_dtype = self._amp_dtype()  # checks --amp against the device before the data is read
        seed_everything(cfg.seed + self.rank)
        self.checkpoint_path = os.path.join(cfg.save_folder, CHECKPOINT_NAME)
        self.samples_folder = os.path.join(cfg.save_folder, "samples")

        if cfg.fid and cfg.fid_extractor == "inception" and self.is_main and for_training:
            from fid import ensure_inception_weights

            ensure_inception_weights()  # a missing download fails now, before the data is read
        # Reading the data is the first long step: everything above was cheap to check.
        self.data = ImageData(list_images(cfg.data_path, cfg.data_class), cfg.image_size, self.device,
                              cfg.dataloader_workers)
        if for_training and cfg.batch_size * self.world_size > len(self.data):
            raise ConfigError(
                f"--batch_size {cfg.batch_size} is larger than the {len(self.data)} usable images in "
                f"{cfg.data_path} ({cfg.data_class}): lower --batch_size or add images."
            )
        self.batch_order = BatchOrder(len(self.data), cfg.seed)

        self.unet = Unet(dim=cfg.unet_dim, dim_mults=cfg.unet_dim_mults, channels=3)
        self.diffusion = Diffusion(self.unet, image_size=cfg.image_size, timesteps=cfg.time_steps).to(self.device)
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=cfg.learning_rate,
                                          fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.losses, self.fids = [], []  # (step, value) pairs
        self.run_id = uuid.uuid4().hex[:8]
        self._load_start_checkpoint()

        # FID reference statistics before training (computed once, then cached on disk)
        self.fid_scorer = None
        if cfg.fid and self.is_main and for_training:
            with isolated_rng(self.device):  # building an extractor must not shift the training RNG streams
                self.fid_scorer = self._build_fid_scorer()
        self.logger = WandbLogger(cfg, self.run_id) if self.is_main else None
        self.model_for_training = self._wrap_for_training() if for_training else self.diffusion

    # --- setup ----------------------------------------------------------------------------------------------------

    def _setup_device(self):
        device = select_device(self.cfg.device)
        if self.world_size > 1:
            if device.type == "cuda":
                local_rank = int(os.environ.get("LOCAL_RANK", 0))
                torch.cuda.set_device(local_rank)
                device = torch.device("cuda", local_rank)
            if not dist.is_initialized():
                # the other ranks wait in the next all-reduce while rank 0 samples and scores FID
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                        timeout=datetime.timedelta(hours=2))
        return device

    def _amp_dtype(self):
        choice = self.cfg.amp
        if choice == "auto":
            if self.device.type == "cuda":
                native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and newer
                return torch.bfloat16 if native_bf16 else torch.float16  # fp16 + GradScaler on a T4
            if self.device.type == "cpu" and cpu_has_native_bf16():
                return torch.bfloat16  # about 1.9x faster steps here, same loss curve (bench/RESULTS.md)
            return None  # emulated bf16 is slower than fp32 on other CPUs; MPS autocast support is partial
        if choice == "off":
            return None
        if self.device.type == "cpu" and choice == "fp16":
            raise ConfigError("--amp fp16 needs a GPU; use --amp bf16 or off on the CPU.")
        return torch.bfloat16 if choice == "bf16" else torch.float16

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def _wrap_for_training(self):
        model = self.diffusion
        if self.cfg.compile:
            self.diffusion.model = torch.compile(self.unet)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        return model

    def _build_fid_scorer(self):
        from fid import FIDScorer

        real = self.data.center_crops().permute(0, 2, 3, 1).cpu().numpy()
        fingerprint = "|".join(f"{os.path.basename(f)}:{os.path.getsize(f)}" for f in self.data.files)
        cache_key = f"{self.cfg.data_class}|{self.cfg.image_size}|{len(real)}|{fingerprint}"
        cache_dir = os.environ.get("DDPM_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ddpm-homework"))
        return FIDScorer(real, extractor_name=self.cfg.fid_extractor, device=self.device, cache_dir=cache_dir,
                         cache_key=cache_key, workers=max(1, self.cfg.dataloader_workers))

    # --- checkpoints ----------------------------------------------------------------------------------------------

    def _load_start_checkpoint(self):
        if self.is_main and self.for_training:  # a save killed midway leaves its temporary file; the checkpoint is intact
            for stale in glob.glob(os.path.join(self.cfg.save_folder, f".{CHECKPOINT_NAME}.*.tmp")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
        path = self.cfg.load_path
        if path is None and os.path.isfile(self.checkpoint_path) and not (self.for_training and self.cfg.fresh):
            path = self.checkpoint_path
        if path is None:
            if not self.for_training:
                raise ConfigError(f"--visualize needs a trained model: pass --load_path (there is no {self.checkpoint_path}; "
                                  "train first).")
            return
        state = self._read_checkpoint(path)
        self.unet.load_state_dict(state["model"])
        self.step = state["step"]
        self.run_id = state["wandb_run_id"]  # figures and resumed training log to the same wandb run
        if self.for_training:
            self.optimizer.load_state_dict(state["optimizer"])
            for group in self.optimizer.param_groups:  # the saved flag is the saving device's
                group["fused"] = self.device.type == "cuda"
            if state["scaler"]:  # empty when saved without fp16 (CPU, bf16): keep this run's fresh scaler
                self.scaler.load_state_dict(state["scaler"])
            self.losses = [tuple(p) for p in state["metrics"]["loss"]]
            self.fids = [tuple(p) for p in state["metrics"]["fid"]]
            if self.rank == 0:
                torch.set_rng_state(state["rng"]["cpu"])
                if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
                    torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
            else:  # other ranks: fresh streams for this step, not a replay of their first steps
                torch.manual_seed((self.cfg.seed + self.rank) * 1_000_003 + self.step)
            if self.is_main:
                print(f"Resuming from {path} at step {self.step} (use --fresh to start over).")

    def _read_checkpoint(self, path):
        try:
            # on the CPU: RNG states must stay there; load_state_dict moves the rest to the parameters' device
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same actionable message
            raise ConfigError(f"checkpoint {path!r} could not be read ({type(error).__name__}: {error}); "
                              "pass another --load_path, or --fresh to start over.") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{path!r} is not a checkpoint written by this kit's trainer; pass another --load_path.")
        ours, theirs = self.cfg.model_signature(), state["signature"]
        mismatched = [f"{k}={theirs.get(k)} (this run: {v})" for k, v in ours.items() if theirs.get(k) != v]
        if mismatched:
            raise ConfigError(
                f"checkpoint {path} was trained with {', '.join(mismatched)}. Pass the same options to continue "
                "it, or start a new run with --fresh or another --save_folder."
            )
        return state

    def save_checkpoint(self):
        if not self.is_main:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "model": self.unet.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "config": dataclasses.asdict(self.cfg),
            "signature": self.cfg.model_signature(),
            "metrics": {"loss": self.losses, "fid": self.fids},
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
            "wandb_run_id": self.run_id,
        }
        atomic_write(self.checkpoint_path, lambda f: torch.save(state, f))

    # --- training -------------------------------------------------------------------------------------------------

    def _micro_batch(self, micro):
        """Images for micro-batch `micro` of the current step on this rank (disjoint across ranks)."""
        cfg = self.cfg
        per_step = cfg.batch_size * cfg.grad_accum * self.world_size
        start = self.step * per_step + (micro * self.world_size + self.rank) * cfg.batch_size
        return self.data.batch(self.batch_order.indices(start, cfg.batch_size))

    def _flush_losses(self, pending, bar, across_ranks=True):
        """Read the accumulated per-step losses back from the device (one sync), check them, log them."""
        if not pending:
            return
        values = torch.stack(pending)
        if self.world_size > 1 and across_ranks:
            dist.all_reduce(values)
            values /= self.world_size
        values = values.float().cpu().tolist()
        first_step = self.step - len(values) + 1
        pending.clear()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                saved = f"the last good checkpoint ({self.checkpoint_path}) is kept" if os.path.isfile(
                    self.checkpoint_path) else "no checkpoint had been saved yet"
                raise TrainingDiverged(
                    f"the loss became {value} at step {first_step + offset}: training stopped and {saved}. "
                    f"Lower --learning_rate (now {self.cfg.learning_rate}) or try --amp off, then re-run."
                )
            self.losses.append((first_step + offset, value))
            if self.logger:
                self.logger.log({"loss": value}, step=first_step + offset)
        bar.set_postfix(loss=f"{values[-1]:.4f}")

    def train(self):
        cfg = self.cfg
        bar = tqdm(total=cfg.train_steps, initial=self.step, desc="Training", disable=not self.is_main)
        pending = []
        with ctrl_c_stops_after_the_step() as stop:
            try:
                while self.step < cfg.train_steps and not stop.requested:
                    self.model_for_training.train()
                    step_loss = torch.zeros((), device=self.device)
                    for micro in range(cfg.grad_accum):
                        x_0 = self._micro_batch(micro)
                        last = micro == cfg.grad_accum - 1
                        # under DDP, gradients are all-reduced on the last micro-batch only
                        no_sync = self.world_size > 1 and not last
                        with self.model_for_training.no_sync() if no_sync else contextlib.nullcontext():
                            with self._autocast():
                                loss = self.model_for_training(x_0, torch.randn_like(x_0)) / cfg.grad_accum
                        self.scaler.scale(loss).backward()
                        step_loss += loss.detach().float()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    pending.append(step_loss)
                    self.step += 1
                    bar.update(1)

                    milestone = self.step % cfg.save_and_sample_every == 0 or self.step == cfg.train_steps
                    if milestone or len(pending) >= cfg.log_every:
                        self._flush_losses(pending, bar)
                    if milestone:
                        self.save_checkpoint()  # first, so a failure in sampling or FID loses no training
                        self.evaluate()
            except KeyboardInterrupt:  # a second Ctrl-C: stop at once, mid-step; the last checkpoint stands
                bar.close()
                print(f"\nStopped at once; the last checkpoint ({self.checkpoint_path}) is kept. "
                      "Re-run the same command to resume from it.")
                raise
        bar.close()
        if stop.requested and self.step < cfg.train_steps:
            # ranks may stop at different steps under torchrun, so no collectives here; rank 0 saves
            self._flush_losses(pending, bar, across_ranks=False)
            if self.is_main:
                self.save_checkpoint()
                self.write_metrics()
                print(f"\nInterrupted at step {self.step}: checkpoint saved to {self.checkpoint_path}. "
                      "Re-run the same command to resume.")
            raise KeyboardInterrupt
        if self.is_main:
            self.write_metrics()
        return self.summary()

    def evaluate(self):
        """Sample grid (and FID) at a milestone; logged, written to disk, and kept in the checkpoint."""
        if not self.is_main:
            return
        grid = self.sample_grid()
        log = {"img": grid}
        if self.fid_scorer is not None:
            value = self.compute_fid()
            self.fids.append((self.step, value))
            log["fid"] = value
            tqdm.write(f"step {self.step}: FID {value:.2f}")
        self.logger.log(log, step=self.step)
        self.write_metrics()
        self.save_checkpoint()  # again, now with this milestone's metrics

    @torch.inference_mode()
    def sample(self, count, batch_size=None):
        """`count` images in [0, 1] on the CPU, drawn in batches, without touching the training RNG streams."""
        batch_size = batch_size or (1000 if self.device.type == "cuda" else 250)
        out = []
        with isolated_rng(self.device), self._autocast():
            torch.manual_seed(self.cfg.seed * 1_000_003 + self.step)  # samples depend on (seed, step) only
            for start in tqdm(range(0, count, batch_size), desc="Sampling", leave=False):
                out.append(self.diffusion.sample(min(batch_size, count - start)).float().cpu())
        return torch.cat(out)

    def sample_grid(self):
        os.makedirs(self.samples_folder, exist_ok=True)
        path = os.path.join(self.samples_folder, f"sample-{self.step}.png")
        return save_grid(self.sample(self.cfg.sample_grid_size), path)

    def compute_fid(self):
        return self.fid_scorer.score(self.sample(self.cfg.fid_num_samples))

    def write_metrics(self):
        """metrics.csv, loss.png and fid.png: the handout's curves without wandb."""
        if not self.is_main:
            return
        fid_at = dict(self.fids)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["step", "loss", "fid"])
        for step, loss in self.losses:
            writer.writerow([step, f"{loss:.6f}", f"{fid_at[step]:.4f}" if step in fid_at else ""])
        atomic_write(os.path.join(self.cfg.save_folder, "metrics.csv"), lambda f: f.write(buffer.getvalue().encode()))
        if self.losses:
            plot_curve(self.losses, "loss", os.path.join(self.cfg.save_folder, "loss.png"))
        if self.fids:
            plot_curve(self.fids, "FID", os.path.join(self.cfg.save_folder, "fid.png"), smooth=False)

    def summary(self):
        grids = sorted(glob.glob(os.path.join(self.samples_folder, "sample-*.png")), key=os.path.getmtime)
        return {
            "step": self.step,
            "loss": self.losses[-1][1] if self.losses else None,
            "fid": self.fids[-1][1] if self.fids else None,
            "save_folder": self.cfg.save_folder,
            "checkpoint": self.checkpoint_path if os.path.isfile(self.checkpoint_path) else None,
            "sample_grid": grids[-1] if grids else None,
            "metrics": os.path.join(self.cfg.save_folder, "metrics.csv"),
        }

    # --- figures --------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def visualize(self, num_images=4):
        """Forward process on real images at 0/25/50/75/99 % of T (handout 7.4), and the backward process from
        the last forward image, shown after the reverse steps at the same points (7.5)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        T = self.cfg.time_steps
        t_indices = sorted({min(T - 1, int(f * T)) for f in VISUALIZE_FRACTIONS})
        self.unet.eval()
        with isolated_rng(self.device), self._autocast():
            torch.manual_seed(self.cfg.seed)
            x_0 = self.data.batch(torch.arange(min(num_images, len(self.data))))
            noise = torch.randn_like(x_0)
            forward = []
            for i in t_indices:
                t = torch.full((len(x_0),), i, device=self.device, dtype=torch.long)
                forward.append(self.diffusion.q_sample(x_0, t, noise))
            backward, x = [], forward[-1]
            for i in reversed(range(t_indices[-1] + 1)):
                x = self.diffusion.p_sample(x, torch.full((len(x),), i, device=self.device, dtype=torch.long), i)
                if i in t_indices:
                    backward.append(x)

        def figure(columns, titles, name, suptitle):
            fig, axes = plt.subplots(len(x_0), len(columns), figsize=(2 * len(columns), 2 * len(x_0)), squeeze=False)
            for col, (images, title) in enumerate(zip(columns, titles)):
                images = unnormalize_to_zero_to_one(images.float().clamp(-1, 1)).cpu()
                for row, img in enumerate(images):
                    axes[row][col].imshow(img.permute(1, 2, 0).numpy())
                    axes[row][col].axis("off")
                axes[0][col].set_title(title, fontsize=9)
            fig.suptitle(suptitle)
            path = save_figure(fig, os.path.join(self.cfg.save_folder, f"{name}.png"))
            plt.close(fig)
            return path

        paths = {
            "forward_diffusion": figure(forward, [f"q(x_t|x_0), t={i + 1}" for i in t_indices], "forward_diffusion",
                                        f"Forward diffusion (T={T})"),
            "backward_diffusion": figure(backward, [f"after step t={i + 1}" for i in reversed(t_indices)],
                                         "backward_diffusion", f"Backward diffusion from x_{t_indices[-1] + 1}"),
        }
        if self.logger:
            self.logger.log(paths, step=self.step)
        return paths

    def close(self):
        if self.logger:
            self.logger.finish()
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

