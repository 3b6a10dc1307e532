"""The errors a user is shown as one sentence (main.py and the notebooks print them without a traceback)."""
import os


class ConfigError(ValueError):
    """Bad user input, found before any long work starts. The message names the value and the fix."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says which checkpoint is kept and what to change."""

    @classmethod
    def at(cls, value, step, checkpoint_path, learning_rate):
        saved = (f"the last good checkpoint ({checkpoint_path}) is kept" if os.path.isfile(checkpoint_path)
                 else "no checkpoint had been saved yet")
        return cls(f"the loss became {value} at step {step}: training stopped and {saved}. "
                   f"Lower --learning_rate (now {learning_rate}) or try --amp off, then re-run.")


class FIDSetupError(RuntimeError):
    """The FID feature extractor cannot be obtained; raised at start-up, not at the first evaluation."""
