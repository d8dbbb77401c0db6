"""Token efficiency (k1.5 Figure 7): accuracy vs mean response tokens of several checkpoints on one eval set.

    python scripts/token_efficiency.py --checkpoints outputs/long outputs/merged outputs/dpo \\
        --data outputs/data/test --out outputs/token_efficiency [--labels long merge dpo] [--max-tokens 1024]

Each checkpoint answers every problem once, greedily, through the rollout engine (vLLM); a response is correct when
it finished, closed its thinking block and its final answer passes `data.verify.is_correct` (as in
`trainers.long2short`). Response tokens count everything the model generated after the generation prompt, thinking
included. Writes `OUT/token_efficiency.md` (a table), `OUT/token_efficiency.json` (with per-example results) and
`OUT/token_efficiency.png` (the scatter).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.records import Example
from trainers.long2short import sample_groups

NAME = "token_efficiency"


def evaluate_checkpoint(
    checkpoint, examples: Sequence[Example], max_tokens: int = 1024, max_model_len: int = 4096, **engine_kwargs
) -> dict:
    """Greedy accuracy and mean response tokens of `checkpoint` on `examples`.

    `checkpoint`: a checkpoint folder (an engine is started for it and shut down after) or a running
    `RolloutEngine`. Returns {"accuracy", "mean_tokens", "examples": [{"id", "task", "correct", "num_tokens",
    "response"}, ...]}."""
    from trainers.rollout import RolloutEngine

    own = not isinstance(checkpoint, RolloutEngine)
    engine = RolloutEngine(checkpoint, max_model_len=max_model_len, **engine_kwargs) if own else checkpoint
    try:
        # 256 prompts per call: greedy requests are one sequence each, and the engine runs that many at once.
        groups = sample_groups(engine, examples, n=1, max_tokens=max_tokens, temperature=0.0, batch_size=256)
    finally:
        if own:
            engine.shutdown()
    per_example = [
        {"id": e.id, "task": e.task, "correct": r.correct, "num_tokens": r.num_tokens, "response": r.text}
        for e, (r,) in zip(examples, groups)
    ]
    count = max(len(per_example), 1)
    return {
        "accuracy": sum(row["correct"] for row in per_example) / count,
        "mean_tokens": sum(row["num_tokens"] for row in per_example) / count,
        "examples": per_example,
    }


def write_report(results: dict[str, dict], out: str | Path) -> Path:
    """Write the table (Markdown), the results (JSON) and the scatter (PNG) for `results` (label ->
    `evaluate_checkpoint` result) to `out`; tokens are also given relative to the first checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    base = next(iter(results.values()))["mean_tokens"] or 1.0
    lines = [
        "| checkpoint | accuracy | mean response tokens | tokens vs first |",
        "|---|---|---|---|",
        *(
            f"| {label} | {r['accuracy']:.1%} | {r['mean_tokens']:.1f} | {r['mean_tokens'] / base:.2f}x |"
            for label, r in results.items()
        ),
    ]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in results.items():
        ax.scatter(r["mean_tokens"], 100 * r["accuracy"], s=40)
        ax.annotate(label, (r["mean_tokens"], 100 * r["accuracy"]), textcoords="offset points", xytext=(5, 5))
    ax.set(xlabel="mean response tokens", ylabel="accuracy (%)", title="Token efficiency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{NAME}.png", dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> dict:
    from data.loaders import load_examples

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", required=True, help="kimi_mm checkpoint folders")
    parser.add_argument("--labels", nargs="+", help="a name per checkpoint (default: the paths as given)")
    parser.add_argument("--data", required=True, help="eval problems: a dataset folder or file (data.loaders)")
    parser.add_argument("--out", required=True, help="output folder for the table, JSON and plot")
    parser.add_argument("--max-tokens", type=int, default=1024, help="response budget in tokens")
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args(argv)
    labels = args.labels or args.checkpoints
    if len(labels) != len(args.checkpoints) or len(set(labels)) != len(labels):
        raise SystemExit(f"--labels needs one distinct name per checkpoint, got {labels} for {args.checkpoints}")
    examples = load_examples(args.data).examples
    if not examples:
        raise SystemExit(f"no usable problems in {args.data}")
    results = {
        label: evaluate_checkpoint(path, examples, args.max_tokens, args.max_model_len) | {"checkpoint": str(path)}
        for label, path in zip(labels, args.checkpoints)
    }
    out = write_report(results, args.out)
    print((out / f"{NAME}.md").read_text() + f"written to {out}")
    return results


if __name__ == "__main__":
    main()
