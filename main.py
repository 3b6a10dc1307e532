"""Train the homework's DDPM, or draw its diffusion figures.

    python main.py                          # train on ./data/train (cats), 10 000 steps, checkpoints in ./results
    python main.py --fid --train_steps 1000 --save_and_sample_every 100
    python main.py --visualize                # the figures of the run in --save_folder (no training)
    python main.py --smoke                  # is my setup right? (under a minute on a laptop CPU)
    torchrun --nproc_per_node 2 main.py ... # several GPUs (or CPU processes): DistributedDataParallel

Every option and its default lives in utils.Config; `python main.py --help` lists them.
"""
import signal
import sys

INTERRUPTED_AT_START = "Interrupted before training started; nothing was changed."


class StoppedAtStart(KeyboardInterrupt):
    """SIGTERM before training started: stop like Ctrl-C does, with exit code 128 + SIGTERM."""

    signum = signal.SIGTERM


def _sigterm_at_start(signum, frame):
    raise StoppedAtStart


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm_at_start)  # the trainer takes SIGTERM over while it trains
try:  # importing torch takes seconds: a Ctrl-C or SIGTERM meanwhile gets one line, not an import traceback
    import argparse
    import dataclasses
    import os
    import typing

    from utils import (
        Config,
        ConfigError,
        DiskFull,
        FIDSetupError,
        TrainingDiverged,
        train_diffusion,
        visualize_diffusion,
    )
except KeyboardInterrupt as interrupt:
    if __name__ != "__main__":
        raise
    print(INTERRUPTED_AT_START, file=sys.stderr)
    sys.exit(128 + getattr(interrupt, "signum", signal.SIGINT))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each option; the usage examples kept as written."""


def build_parser():
    parser = argparse.ArgumentParser(
        description="Train a DDPM on AFHQ and draw its figures (the reference homework kit).",
        epilog=__doc__.split("\n\n")[1], formatter_class=HelpFormatter,
        allow_abbrev=False,  # --train_step 5 is an error, not --train_steps 5
    )
    hints = typing.get_type_hints(Config)
    for option in dataclasses.fields(Config):
        flag, kind = f"--{option.name}", hints[option.name]
        kwargs = {"default": option.default, "help": option.metadata["help"]}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif option.name == "unet_dim_mults":
            parser.add_argument(flag, type=int, nargs="+", metavar="MULT", **{**kwargs, "default": list(option.default)})
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is typing.Union else kind
            parser.add_argument(flag, type=base, choices=option.metadata.get("choices"), **kwargs)
    return parser


def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    try:
        if args["visualize"] and not args["smoke"]:  # figures only: of --load_path, else of --save_folder's run
            result = visualize_diffusion(**args)
        else:
            result = train_diffusion(**args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except NotImplementedError as error:
        print(f"error: implement the TODOs in diffusion.py first ({error}). "
              "`pytest test_diffusion.py` shows which parts are missing.", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM; the trainer has said what was saved
        return 128 + getattr(interrupt, "signum", signal.SIGINT)
    except (FIDSetupError, TrainingDiverged, DiskFull) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one report
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:  # main() handles those during training; this one came while parsing
        print(INTERRUPTED_AT_START, file=sys.stderr)
        sys.exit(128 + getattr(interrupt, "signum", signal.SIGINT))
