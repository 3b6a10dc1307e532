"""checkpoint.pt: what a run saves to be resumed, written atomically, read back only as plain tensors."""
import dataclasses
import errno
import io
import os
import shutil

import torch

from kit.device import accelerator_rng_state, set_accelerator_rng_state
from kit.errors import ConfigError, DiskFull
from kit.files import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def write_checkpoint(path, state):
    """Serialize in memory, then write atomically: a full disk is then a plain ENOSPC, told in one sentence."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    try:
        atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFull(f"no space left to save the checkpoint in {os.path.dirname(os.path.abspath(path))}: it needs "
                       f"{megabytes(len(buffer.getbuffer()))} free there, {megabytes(free_space(path))} are. The "
                       f"previous checkpoint is kept; free some space, then re-run the same command to resume.") from None


def free_space(path):
    return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free


def megabytes(size):
    return f"{size / 2**20:.1f} MB"


def check_space(path, needed):
    """Refuse at start-up when even one save cannot fit (a save writes a new file beside the old one)."""
    free = free_space(path)
    if free < needed:
        raise ConfigError(f"only {megabytes(free)} are free in {os.path.dirname(os.path.abspath(path))}, "
                          f"and a checkpoint needs about {megabytes(needed)}: free some space or pass another "
                          "--save_folder.")


def finite(module):
    """Whether every weight is finite: a checkpoint is only written from weights that are."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def read_checkpoint(path, signature):
    """The saved state, checked to be this kit's and to fit `signature` (Config.model_signature). Raises ConfigError."""
    fix = ("Pass a checkpoint.pt written by this kit's training as --load_path, or start over with --fresh "
           "(or another --save_folder).")
    try:
        # on the CPU: RNG states must stay there; load_state_dict moves the rest to the parameters' device
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"checkpoint {path!r} could not be read ({reason}). {fix}") from None
    except Exception:  # noqa: BLE001 - torch's own message advises loading unsafely: say what it means instead
        raise ConfigError(f"{path!r} is not a checkpoint of this kit (or it is damaged): it holds something other "
                          f"than the plain tensors and numbers its training saves. {fix}") from None
    if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT
            and isinstance(state.get("signature"), dict)):
        raise ConfigError(f"{path!r} is not a checkpoint written by this kit's training. {fix}")
    theirs = state["signature"]
    mismatched = [f"{k}={theirs.get(k)} (this run: {v})" for k, v in signature.items() if theirs.get(k) != v]
    if mismatched:
        raise ConfigError(
            f"checkpoint {path} was trained with {', '.join(mismatched)}. Pass the same options to continue "
            "it, or start a new run with --fresh or another --save_folder."
        )
    return state


def start_state(cfg, own_path, for_training):
    """Which checkpoint a run starts from, as (path, state), or (None, None) for a new run.

    Training resumes the run in --save_folder (own_path) unless --fresh. --load_path starts a run from that
    file once: the run records it ("started_from"), and re-running the same command resumes the save folder's
    run instead of starting over again. A save folder holding a run that was not started from --load_path is
    refused rather than overwritten. --visualize draws --load_path, else the save folder's checkpoint."""
    load_path = cfg.load_path
    own = own_path if os.path.isfile(own_path) else None
    if not for_training or (cfg.fresh and load_path):
        path = load_path or own
    elif cfg.fresh:
        path = None
    elif load_path is None or own is None or os.path.samefile(load_path, own):
        path = own or load_path
    else:
        state = read_checkpoint(own, cfg.model_signature())
        if state.get("started_from") != os.path.abspath(load_path):
            raise ConfigError(
                f"--save_folder {cfg.save_folder!r} already holds a run at step {state['step']} that was not started "
                f"from --load_path {load_path!r}. Re-run without --load_path to resume it, add --fresh to start over "
                "from --load_path (replacing it), or pass another --save_folder.")
        return own, state
    if path is None and not for_training:
        raise ConfigError(f"--visualize draws a trained model: pass --load_path, or train first (there is no "
                          f"{own_path}).")
    return (path, read_checkpoint(path, cfg.model_signature())) if path else (None, None)


RESUMABLE_CHANGES_IGNORED = ("load_path", "fresh", "smoke", "visualize", "dataloader_workers")


def changed_options(saved_config, cfg):
    """'--name old -> new' for each option that differs from the checkpoint's run (and may differ: the options
    that the weights depend on are refused by read_checkpoint)."""
    current = dataclasses.asdict(cfg)
    return [f"--{name} {saved_config[name]} -> {value}" for name, value in current.items()
            if name in saved_config and name not in RESUMABLE_CHANGES_IGNORED
            and _comparable(saved_config[name]) != _comparable(value)]


def resume_note(path, state, cfg):
    changes = changed_options(state["config"], cfg)
    return (f"Resuming from {path} at step {state['step']} (use --fresh to start over)"
            + (f", with changed options: {', '.join(changes)}." if changes else "."))


def _comparable(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def training_state(trainer):
    """Everything a resumed run needs to continue bit-identically: weights, optimizer, scaler, step, metrics,
    RNG streams, and the wandb run id (the same wandb run continues)."""
    device = trainer.device
    return {
        "model": trainer.unet.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(), "step": trainer.step, "config": dataclasses.asdict(trainer.cfg),
        "signature": trainer.cfg.model_signature(), "metrics": {"loss": trainer.losses, "fid": trainer.fids},
        "rng": {"cpu": torch.get_rng_state(),  # and the GPU's, under its kind
                **{kind: accelerator_rng_state(device) if device.type == kind else None for kind in ("cuda", "mps")}},
        "wandb_run_id": trainer.run_id, "started_from": trainer.started_from,
    }


ADAM_KERNEL_CHOICES = ("fused", "foreach", "capturable")  # how Adam runs on this device, not what it learned


def with_this_runs_kernels(saved_optimizer, optimizer):
    """The saved optimizer state with this run's kernel choices in its param groups.

    `Optimizer.load_state_dict` places each `state["step"]` by the *saved* group's flags (fused or capturable:
    on the parameter's device as float32; otherwise left where it was saved, on the CPU). A checkpoint written
    where Adam was not fused (a CPU before this kit fused it there, or a device without fused kernels) and
    resumed on CUDA would leave `step` on the CPU, and the fused kernel fails at the first step."""
    groups = [{**saved, **{key: group[key] for key in ADAM_KERNEL_CHOICES if key in group}}
              for saved, group in zip(saved_optimizer["param_groups"], optimizer.param_groups)]
    return {**saved_optimizer, "param_groups": groups}


def restore_training_state(state, optimizer, scaler, device, rank, seed, learning_rate):
    """Load the optimizer, scaler and RNG streams saved by `training_state`; returns (losses, fids)."""
    optimizer.load_state_dict(with_this_runs_kernels(state["optimizer"], optimizer))
    for group in optimizer.param_groups:
        group["lr"] = learning_rate  # this run's --learning_rate, not the saved one
    if state["scaler"]:  # empty when saved without fp16 (CPU, bf16): keep this run's fresh scaler
        scaler.load_state_dict(state["scaler"])
    if rank == 0:
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type != "cpu" and state["rng"].get(device.type) is not None:  # saved on a GPU of this kind
            set_accelerator_rng_state(device, state["rng"][device.type])
    else:  # other ranks: fresh streams for this step, not a replay of their first steps
        torch.manual_seed((seed + rank) * 1_000_003 + state["step"])
    return [tuple(p) for p in state["metrics"]["loss"]], [tuple(p) for p in state["metrics"]["fid"]]
