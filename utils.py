"""The front door: what main.py and the notebooks call.

`Config` is the one source of truth for every option and its default: main.py builds its command line from
it, and `train_diffusion(**args)` / `visualize_diffusion(**args)` take the same names (the notebooks call them).
Options are validated here, before any long work starts; the Trainer (trainer.py) and its machinery (kit/)
stand below this file.
"""
import codecs
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from kit.checkpoints import CHECKPOINT_NAME
from kit.data import DATA_CLASSES, make_smoke_data
from kit.device import select_device
from kit.errors import DEFAULT_LEARNING_RATE, ConfigError, DiskFull, FIDSetupError, TrainingDiverged
from kit.files import check_writable, claim_folder
from trainer import Trainer

__all__ = ["Config", "ConfigError", "DiskFull", "FIDSetupError", "TrainingDiverged", "select_device", "train_diffusion",
           "train_with_torchrun", "visualize_diffusion"]


def option(default, help, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class Config:
    # handout table 2: diffusion and training
    time_steps: int = option(50, "diffusion steps T")
    train_steps: int = option(10000, "optimizer steps to train for (in total, counting resumed ones)")
    save_folder: str = option("./results", "where checkpoints, samples, metrics and figures go")
    data_path: str = option("./data/train", "folder holding cat/ dog/ wild/ with the training images")
    load_path: Optional[str] = option(
        None, "checkpoint to start a new run from (re-running then resumes the run in --save_folder), or to draw "
        "with --visualize")
    data_class: str = option("cat", "which AFHQ class to train on", choices=DATA_CLASSES)
    image_size: int = option(32, "image side in pixels (must be divisible by 2^(levels-1))")
    batch_size: int = option(32, "images per micro-batch")
    grad_accum: int = option(2, "micro-batches accumulated per optimizer step (the course's trainer uses 2)")
    learning_rate: float = option(DEFAULT_LEARNING_RATE, "Adam learning rate")
    # handout table 3: model
    unet_dim: int = option(16, "base channel width of the U-Net")
    unet_dim_mults: Tuple[int, ...] = option((1, 2, 4, 8), "channel multiplier per U-Net level")
    # handout table 4: evaluation and logging
    fid: bool = option(False, "compute FID against the real images at every save")
    save_and_sample_every: int = option(1000, "steps between checkpoints, sample grids and FID")
    visualize: bool = option(
        False, "only draw the forward and backward diffusion figures, of --load_path or else of the run in "
        "--save_folder (no training)"
    )
    dataloader_workers: int = option(4, "threads that decode the images once at start-up")
    # this kit's additions
    seed: int = option(0, "random seed: a seeded run is reproducible on the CPU (on a GPU, cuDNN's and other kernels "
                       "are not deterministic)")
    device: str = option("auto", "where to run: auto picks cuda > mps > cpu", choices=("auto", "cuda", "mps", "cpu"))
    wandb: str = option(
        "auto", "auto: online if a wandb key is set up, else offline files", choices=("auto", "online", "offline", "disabled")
    )
    wandb_project: str = option("ddpm-afhq", "wandb project name")
    fresh: bool = option(False, "ignore the checkpoint in --save_folder and start over")
    smoke: bool = option(
        False, "check the setup: the whole pipeline on a few generated images in --save_folder, in under a minute"
    )
    fid_num_samples: int = option(1000, "generated images per FID evaluation")
    fid_extractor: str = option(
        "inception", "FID features: clean-fid's Inception, or 'tiny' (a random conv net, for tests only)",
        choices=("inception", "tiny"),
    )
    sample_grid_size: int = option(64, "images in each saved sample grid (a square number)")
    log_every: int = option(50, "steps between loss read-backs from the device (every step is still logged)")
    amp: str = option(
        "auto", "mixed precision: auto = bf16 on Ampere+ GPUs and bf16-capable CPUs, fp16 on older GPUs, else off; "
        "off = float32 (on Ampere+ GPUs, matrix products and convolutions in TF32)",
        choices=("auto", "bf16", "fp16", "off"),
    )
    compile: bool = option(False, "torch.compile the U-Net on CUDA (slower start, faster steps); elsewhere a warning")

    @classmethod
    def from_args(cls, **args):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; valid options are: {', '.join(sorted(names))}")
        if "unet_dim_mults" in args and args["unet_dim_mults"] is not None:
            args["unet_dim_mults"] = tuple(int(m) for m in args["unet_dim_mults"])
        return cls(**{k: v for k, v in args.items() if not (v is None and k != "load_path")})

    def model_signature(self):
        """What a checkpoint's weights depend on: loading into a different setting is refused."""
        return {
            "image_size": self.image_size,
            "unet_dim": self.unet_dim,
            "unet_dim_mults": list(self.unet_dim_mults),
            "time_steps": self.time_steps,
        }


# Generous bounds: every sensible run fits inside them; what lies outside would crash or run out of memory late
MAX_SEED = 2**32 - 1  # torch accepts seeds below 2**64; the trainer derives (seed + rank) * 1_000_003 + step
MAX_TIME_STEPS = 100_000
MAX_IMAGE_SIZE = 512  # AFHQ's own resolution
MAX_UNET_DIM = 512
MAX_SAMPLE_GRID = 1024  # a 32 x 32 grid
MAX_FID_SAMPLES = 100_000  # FID-50k, the largest count in common use, is 50 000
MAX_WORKERS = 256


def _check_checkpoint_file(path, flag, fix):
    """A checkpoint path that exists must be a readable checkpoint file (this kit writes zip archives), checked
    now rather than after the data is read or after the first save point. Raises ConfigError."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path!r} is a folder, not a checkpoint file. {fix}")
    if not os.path.isfile(path):
        raise ConfigError(f"{flag} {path!r} is not a regular file (a device, socket or pipe?). {fix}")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ConfigError(f"{flag} {path!r} cannot be read ({error.strerror}). {fix}") from None
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{flag} {path!r} is not a checkpoint written by this kit's training (nor by torch.save): "
                          f"it is empty, damaged or another kind of file. {fix}")


def validate_config(cfg: Config):
    """Check everything that can be checked without reading the data. Raises ConfigError naming the value and
    the fix; nothing is written before these checks pass."""
    for name in ("train_steps", "batch_size", "grad_accum", "time_steps", "save_and_sample_every", "unet_dim",
                 "image_size", "fid_num_samples", "log_every", "sample_grid_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"--{name} {value!r}: must be a positive whole number.")
    if not (isinstance(cfg.learning_rate, (int, float)) and math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        raise ConfigError(f"--learning_rate {cfg.learning_rate!r}: must be a positive number, e.g. 1e-3.")
    if not 0 <= cfg.dataloader_workers <= MAX_WORKERS:
        raise ConfigError(f"--dataloader_workers {cfg.dataloader_workers}: must be between 0 and {MAX_WORKERS} "
                          f"(threads that decode the images; about the number of CPU cores, e.g. 4).")
    if not (isinstance(cfg.seed, int) and 0 <= cfg.seed <= MAX_SEED):
        raise ConfigError(f"--seed {cfg.seed!r}: must be a whole number from 0 to {MAX_SEED} (2**32 - 1): torch "
                          "takes seeds below 2**64, and the kit derives per-process and per-step seeds from it "
                          "(seed * 1000003 + step), which must stay in that range. E.g. --seed 0.")
    if cfg.time_steps > MAX_TIME_STEPS:
        raise ConfigError(f"--time_steps {cfg.time_steps}: at most {MAX_TIME_STEPS} (every sample runs T network "
                          "passes). The course uses 50; 1000, as in the DDPM paper, is the usual maximum.")
    if cfg.data_class not in DATA_CLASSES:
        raise ConfigError(f"--data_class {cfg.data_class!r}: unknown class; choose one of {', '.join(DATA_CLASSES)}.")
    if not cfg.unet_dim_mults or any(m <= 0 for m in cfg.unet_dim_mults):
        raise ConfigError(f"--unet_dim_mults {list(cfg.unet_dim_mults)}: give positive integers, e.g. 1 2 4 8.")
    if cfg.image_size > MAX_IMAGE_SIZE:
        raise ConfigError(f"--image_size {cfg.image_size}: at most {MAX_IMAGE_SIZE}, AFHQ's own resolution (every "
                          "image is kept decoded in memory). The course uses 32.")
    downsamples = 2 ** (len(cfg.unet_dim_mults) - 1)
    if cfg.image_size % downsamples:
        raise ConfigError(
            f"--image_size {cfg.image_size}: a U-Net with {len(cfg.unet_dim_mults)} levels halves the image "
            f"{len(cfg.unet_dim_mults) - 1} times, so the size must be divisible by {downsamples} "
            f"(e.g. {max(downsamples, cfg.image_size // downsamples * downsamples)})."
        )
    if cfg.unet_dim % 8:
        raise ConfigError(f"--unet_dim {cfg.unet_dim}: GroupNorm uses 8 groups, so it must be a multiple of 8.")
    if cfg.unet_dim > MAX_UNET_DIM:
        raise ConfigError(f"--unet_dim {cfg.unet_dim}: at most {MAX_UNET_DIM} (the parameter count grows with its "
                          "square: 2.47 M at 16, the course's value; DDPM's CIFAR-10 model uses 128).")
    root = math.isqrt(cfg.sample_grid_size)
    if root * root != cfg.sample_grid_size or cfg.sample_grid_size > MAX_SAMPLE_GRID:
        raise ConfigError(f"--sample_grid_size {cfg.sample_grid_size}: must be a square number from 1 to "
                          f"{MAX_SAMPLE_GRID}, such as 36 or 64.")
    if cfg.fid_num_samples < 2 or cfg.fid_num_samples > MAX_FID_SAMPLES:
        raise ConfigError(
            f"--fid_num_samples {cfg.fid_num_samples}: must be from 2 (a covariance needs at least two images) to "
            f"{MAX_FID_SAMPLES}. FID is only comparable between runs with the same count and is reliable with "
            "thousands of images (clean-fid recommends at least 2048 for Inception features); the default is 1000."
        )
    if cfg.load_path is not None:
        if not os.path.exists(cfg.load_path):
            raise ConfigError(
                f"--load_path {cfg.load_path!r}: no such checkpoint file. Point it at a checkpoint.pt written by "
                f"training (e.g. {os.path.join(cfg.save_folder, CHECKPOINT_NAME)})."
            )
        _check_checkpoint_file(cfg.load_path, "--load_path",
                               "Point it at a checkpoint.pt written by training "
                               f"(e.g. {os.path.join(cfg.save_folder, CHECKPOINT_NAME)}).")
    checkpoint = os.path.join(cfg.save_folder, CHECKPOINT_NAME)
    if os.path.exists(checkpoint) and not os.path.isfile(checkpoint):  # in the way of every save, --fresh or not
        raise ConfigError(f"{checkpoint!r} is in the way of this run's checkpoint: it is "
                          f"{'a folder' if os.path.isdir(checkpoint) else 'not a regular file'}. Remove or rename it, "
                          "or pass another --save_folder.")
    if os.path.isfile(checkpoint) and not cfg.fresh and not (cfg.visualize and cfg.load_path):  # may be resumed
        _check_checkpoint_file(checkpoint, "--save_folder's checkpoint",
                               "Remove or rename it, or pass --fresh to start over (it is then replaced), "
                               "or another --save_folder.")
    check_writable(cfg.save_folder)


def smoke_config(cfg):
    """--smoke: the whole pipeline, small: generated data, a few steps, sampling, tiny-extractor FID, figures."""
    check_writable(cfg.save_folder)  # the smoke data goes there
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


# torch.cuda.is_bf16_supported(including_emulation=...) (--amp auto on a GPU) is the newest API the kit needs; 2.4
# and Colab's 2.11 pass every check (bench/README.md, "Platform check")
OLDEST_TORCH = (2, 4)


def check_torch_version(version):
    """Refuse a torch older than the kit supports, naming it and the fix, before it fails somewhere in the run."""
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())
    if (major, minor) < OLDEST_TORCH:
        oldest = ".".join(map(str, OLDEST_TORCH))
        raise ConfigError(f"torch {version} is older than {oldest}, the oldest this kit supports: install torch "
                          f">= {oldest} (requirements.txt pins the tested pair), e.g. pip install -r requirements.txt.")


def checked_config(args):
    """Config from keyword options, with --smoke applied, validated. Raises ConfigError naming the fix."""
    check_torch_version(torch.__version__)
    cfg = Config.from_args(**args)
    if cfg.smoke:
        cfg = smoke_config(cfg)
    validate_config(cfg)
    return cfg


def train_diffusion(**args):
    """Train (or resume) with the given options; returns a summary dict (see Trainer.summary)."""
    cfg = checked_config(args)
    with claim_folder(cfg.save_folder):  # a second run in the same folder is refused, naming this one
        trainer = Trainer(cfg)
        try:
            summary = trainer.train()
            if cfg.visualize:
                summary.update(trainer.visualize())
            return summary
        finally:
            trainer.close()


def visualize_diffusion(**args):
    """Forward and backward diffusion figures (handout 7.4, 7.5) for a trained checkpoint."""
    trainer = Trainer(checked_config({**args, "visualize": True}), for_training=False)
    try:
        return trainer.visualize()
    finally:
        trainer.close()


def command_line(args):
    """main.py's flags for keyword options (the names train_diffusion takes); None means the default."""
    flags = []
    for name, value in args.items():
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, (tuple, list)):
            flags += [f"--{name}", *map(str, value)]
        elif value is not None:
            flags += [f"--{name}", str(value)]
    return flags


def split_grad_accum(args, processes):
    """(args, note) for `processes` torchrun processes. Each process takes its own micro-batches, so a step takes
    batch_size x grad_accum x processes images: grad_accum is divided among the processes when it divides evenly
    (the handout's 32 x 2 = 64 images a step become 32 x 1 on each of two GPUs), else kept, and the note says so."""
    cfg = Config.from_args(**args)
    images = cfg.batch_size * cfg.grad_accum
    if cfg.grad_accum % processes == 0:
        each = cfg.grad_accum // processes
        return {**args, "grad_accum": each}, (f"{processes} processes with grad_accum {each} each: {images} images a "
                                              f"step, as in one process with grad_accum {cfg.grad_accum}")
    return args, (f"grad_accum {cfg.grad_accum} does not divide among {processes} processes: each step takes "
                  f"{images * processes} images instead of {images} (a grad_accum that is a multiple of {processes} "
                  "keeps them)")


def run_passing_on_a_stop(command):
    """Run `command` with its output shown as it comes (progress bars too); returns its exit code. A stop meanwhile
    (Ctrl-C, a notebook's stop button: SIGINT) is passed on to it as one SIGINT, its last words are shown, then
    KeyboardInterrupt is raised here; a second stop raises it at once."""
    # its own session: the SIGINT that a notebook's stop button sends to the kernel's whole process group would
    # reach it too, and a second one makes the trainer stop at once, without saving
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    stops = []

    def pass_on(signum, frame):  # a handler, not KeyboardInterrupt inside the read: no output is lost
        stops.append(signum)
        if len(stops) > 1:
            raise KeyboardInterrupt
        process.send_signal(signal.SIGINT)  # torchrun passes it to each process: they finish the step and save

    previous = signal.signal(signal.SIGINT, pass_on)
    try:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(process.stdout.fileno(), 65536):
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        process.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if stops:
        raise KeyboardInterrupt
    return process.returncode


def train_with_torchrun(processes, **args):
    """train_diffusion(**args) in `processes` processes, one per GPU (Kaggle's "GPU T4 x2"): main.py under torchrun
    in a subprocess (DistributedDataParallel; torch cannot fork a notebook kernel that has used CUDA), with the
    images per step kept (split_grad_accum). Its output is shown as it comes. A stop (Ctrl-C, the notebook's stop
    button) is passed on once: every process finishes its step and the run saves, as in one process. Returns where
    the results are; the run's own summary is the last lines of its output."""
    args, note = split_grad_accum(args, processes)
    cfg = checked_config(args)  # a wrong option: one sentence here, not one per process
    print(note)
    main = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), main,
               *command_line(args)]
    print("running:", " ".join(command), flush=True)
    returncode = run_passing_on_a_stop(command)
    if returncode:
        raise RuntimeError(f"training in {processes} processes stopped with exit code {returncode}: its "
                           "messages are above. To train in one process instead: train_diffusion(**args) (in the "
                           "notebooks, ALL_GPUS = False).")
    return {"processes": processes, "grad_accum": cfg.grad_accum, "save_folder": cfg.save_folder,
            "checkpoint": os.path.join(cfg.save_folder, CHECKPOINT_NAME),
            "metrics": os.path.join(cfg.save_folder, "metrics.csv")}
