"""The errors a user is shown as one sentence (main.py and the notebooks print them without a traceback)."""
import os


class ConfigError(ValueError):
    """Bad user input, found before any long work starts. The message names the value and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says which checkpoint is kept and what to change."""

    @classmethod
    def at(cls, problem, step, checkpoint_path, learning_rate):
        kept = (f"the last good checkpoint ({checkpoint_path}) is kept, and re-running resumes from it with the new "
                "options" if os.path.isfile(checkpoint_path) else "no checkpoint had been saved, so re-running starts over")
        return cls(f"{problem} at step {step}: training stopped; {kept}. Lower --learning_rate (now {learning_rate}, "
                   f"e.g. {learning_rate / 10:g}) or try --amp off, then re-run the same command.")


class FIDSetupError(RuntimeError):
    """The FID feature extractor cannot be obtained; raised at start-up, not at the first evaluation."""


class DiskFull(RuntimeError):
    """A save found no space left; the previous checkpoint is intact and the run resumes once space is freed."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was saved; `signum` says which (exit code 128 + signum)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum
