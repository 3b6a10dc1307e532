"""Stopping cleanly. The first Ctrl-C, or SIGTERM (what Colab, Kaggle and Slurm send when they end a session),
lets the current step (and any sampling or FID under way) finish; the trainer then saves and says how to resume.
A second one stops at once, keeping the last checkpoint. Under torchrun the processes agree after every step
whether any of them was signalled (`agreed_signal`), so that they all stop after the same one."""
import contextlib
import signal
import threading
import types

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


@contextlib.contextmanager
def stop_after_the_step(checkpoint_path):
    """Yields `stop`: `stop.requested` turns True at the first Ctrl-C or SIGTERM, `stop.signal` says which.
    Works in a terminal and in a Jupyter kernel; elsewhere than the main thread, Ctrl-C stays a plain
    KeyboardInterrupt (signal handlers can only be set from the main thread)."""
    stop = types.SimpleNamespace(requested=False, signal=None)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested, stop.signal = True, signum
        tqdm.write(f"{SIGNAL_NAMES[signum]}: saving a checkpoint after this step "
                   f"({SIGNAL_NAMES[signum]} again stops at once).")

    previous = {signum: signal.signal(signum, handler) for signum in SIGNAL_NAMES}
    try:
        yield stop
    except KeyboardInterrupt:  # the second Ctrl-C or SIGTERM
        print(f"\nStopped at once; the last checkpoint ({checkpoint_path}) is kept. "
              "Re-run the same command to resume from it.")
        raise
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


def agreed_signal(signum, group=None):
    """The signal that stops a torchrun run (None: go on), the same in every process whichever of them received
    it: one all-reduce of the largest signal number (SIGTERM outranks Ctrl-C)."""
    flag = torch.tensor([signum or 0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag) or None
