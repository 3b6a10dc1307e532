"""checkpoint.pt: what a run saves to be resumed, written atomically, read back only as plain tensors."""
import dataclasses

import torch

from kit.errors import ConfigError
from kit.files import atomic_write, remove_stale_temp_files

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


def write_checkpoint(path, state):
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


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


def clean_leftovers(folder):
    """A save killed midway leaves its temporary file; the checkpoint itself is intact."""
    remove_stale_temp_files(folder, CHECKPOINT_NAME)


def training_state(trainer):
    """Everything a resumed run needs to continue bit-identically: weights, optimizer, scaler, step, metrics,
    RNG streams, and the wandb run id (the same wandb run continues)."""
    device = trainer.device
    return {
        "model": trainer.unet.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict(), "step": trainer.step, "config": dataclasses.asdict(trainer.cfg),
        "signature": trainer.cfg.model_signature(), "metrics": {"loss": trainer.losses, "fid": trainer.fids},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "wandb_run_id": trainer.run_id,
    }


def restore_training_state(state, optimizer, scaler, device, rank, seed):
    """Load the optimizer, scaler and RNG streams saved by `training_state`; returns (losses, fids)."""
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:  # the saved flag is the saving device's
        group["fused"] = device.type == "cuda"
    if state["scaler"]:  # empty when saved without fp16 (CPU, bf16): keep this run's fresh scaler
        scaler.load_state_dict(state["scaler"])
    if rank == 0:
        torch.set_rng_state(state["rng"]["cpu"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    else:  # other ranks: fresh streams for this step, not a replay of their first steps
        torch.manual_seed((seed + rank) * 1_000_003 + state["step"])
    return [tuple(p) for p in state["metrics"]["loss"]], [tuple(p) for p in state["metrics"]["fid"]]
