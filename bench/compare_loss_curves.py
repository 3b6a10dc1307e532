"""Compare the loss curves of two training runs (e.g. fp32 vs mixed precision) from their metrics.csv files.

    python bench/compare_loss_curves.py RUN_A/metrics.csv RUN_B/metrics.csv --labels fp32 bf16 --out bench/amp_loss.png

Prints the mean loss per window of steps for both runs and the run-to-run noise of such a mean (the standard
error from the per-step spread within the window), so a difference can be judged against the noise.
"""
import argparse
import csv

import numpy as np


def read_losses(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return np.array([int(r["step"]) for r in rows]), np.array([float(r["loss"]) for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs=2, help="two metrics.csv files")
    parser.add_argument("--labels", nargs=2, default=("A", "B"))
    parser.add_argument("--window", type=int, default=200, help="steps per window")
    parser.add_argument("--out", default=None, help="PNG of both curves (smoothed)")
    args = parser.parse_args()

    runs = [read_losses(path) for path in args.metrics]
    steps = min(len(s) for s, _ in runs)
    print(f"| steps | {args.labels[0]} mean loss | {args.labels[1]} mean loss | difference | noise (2 s.e.) |")
    print("|---|---|---|---|---|")
    for start in range(0, steps, args.window):
        a, b = (losses[start : start + args.window] for _, losses in runs)
        noise = 2 * np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
        print(f"| {start + 1}-{start + len(a)} | {a.mean():.4f} | {b.mean():.4f} | {b.mean() - a.mean():+.4f} | {noise:.4f} |")

    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        kernel = np.ones(25) / 25
        for (s, losses), label in zip(runs, args.labels):
            ax.plot(s[24:], np.convolve(losses, kernel, mode="valid"), label=f"{label} (mean of 25 steps)")
        ax.set_xlabel("training step")
        ax.set_ylabel("L1 loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(args.out, dpi=120, bbox_inches="tight")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
