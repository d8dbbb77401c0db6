"""Plot an RL run's curves (k1.5 Figure 5): reward, training accuracy and response length against iteration.

python -m scripts.plot_rl outputs/rl/metrics.jsonl [--out outputs/rl/curves.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data.records import read_jsonl


def read_metrics(path: str | Path) -> list[dict]:
    lines = [record for _, record in read_jsonl(path)]
    if not lines:
        raise ValueError(f"{path} holds no metrics")
    return lines


def plot_curves(metrics: list[dict], out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [m["iteration"] for m in metrics]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(x, [m["reward_mean"] for m in metrics], marker=".")
    axes[0].set(title="mean reward", xlabel="iteration")
    axes[1].plot(x, [m["accuracy"] for m in metrics], marker=".", color="tab:green")
    axes[1].set(title="training accuracy", xlabel="iteration", ylim=(0, 1))
    axes[2].plot(x, [m["response_length_mean"] for m in metrics], marker=".", label="mean")
    axes[2].plot(x, [m["response_length_max"] for m in metrics], marker=".", alpha=0.6, label="max")
    axes[2].set(title="response length (tokens)", xlabel="iteration")
    axes[2].legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="metrics.jsonl written by trainers/rl.py")
    parser.add_argument("--out", help="PNG path (default: curves.png next to the metrics)")
    args = parser.parse_args(argv)
    out = plot_curves(read_metrics(args.metrics), args.out or Path(args.metrics).with_name("curves.png"))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
