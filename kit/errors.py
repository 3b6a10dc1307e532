"""The errors a user is shown as one sentence (main.py and the notebooks print them without a traceback)."""
import os


class ConfigError(ValueError):
    """Bad user input, found before any long work starts. The message names the value and the fix."""


DEFAULT_LEARNING_RATE = 1e-3  # the course's Adam rate (utils.Config's default), known to train this U-Net


def advised_learning_rate(learning_rate):
    """A rate to try after `learning_rate` diverged: the default when it was above it (1e30 / 10 would diverge
    again), else ten times lower."""
    return DEFAULT_LEARNING_RATE if learning_rate > DEFAULT_LEARNING_RATE else learning_rate / 10


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says which checkpoint is kept and what to change."""

    @classmethod
    def at(cls, problem, step, checkpoint_path, learning_rate):
        kept = (f"the last good checkpoint ({checkpoint_path}) is kept, and re-running resumes from it with the new "
                "options" if os.path.isfile(checkpoint_path) else "no checkpoint had been saved, so re-running starts over")
        advised = advised_learning_rate(learning_rate)
        example = f"{advised:g}" + (", the default" if advised == DEFAULT_LEARNING_RATE else "")
        return cls(f"{problem} at step {step}: training stopped; {kept}. Lower --learning_rate (now {learning_rate}, "
                   f"e.g. {example}) or try --amp off, then re-run the same command.")


class FIDSetupError(RuntimeError):
    """The FID feature extractor cannot be obtained; raised at start-up, not at the first evaluation."""


class DiskFull(RuntimeError):
    """A save found no space left; the previous checkpoint is intact and the run resumes once space is freed."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was saved; `signum` says which (exit code 128 + signum)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
