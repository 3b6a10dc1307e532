"""Stopping cleanly: the first Ctrl-C finishes the step, then the trainer saves; a second one stops at once."""
import contextlib
import signal
import threading
import types

from tqdm.auto import tqdm


@contextlib.contextmanager
def ctrl_c_stops_after_the_step(checkpoint_path):
    """The first Ctrl-C lets the current step (and any sampling or FID under way) finish, so the checkpoint
    saved next is consistent; a second Ctrl-C stops at once, keeping the last checkpoint. Works in a terminal
    and in a Jupyter kernel."""
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
    except KeyboardInterrupt:  # the second Ctrl-C
        print(f"\nStopped at once; the last checkpoint ({checkpoint_path}) is kept. "
              "Re-run the same command to resume from it.")
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
