"""Partial-rollout benchmark; prints one JSON line.

    python -m scripts.bench_partial_rollout [--iterations 8] [--prompts 8] [--n 8] [--max-len 1024] [--budget 128]

On the tiny multimodal checkpoint, with a long-tailed response-length distribution (its EOS logit is scaled so that
most responses stop after a few dozen tokens and a few run to the maximum, far above the median), the same stream of
prompts is rolled out for the same number of iterations twice through the same engine:

- without partial rollouts: every sample runs to the end in the iteration that starts it, so each iteration lasts
  as long as its longest sample;
- with partial rollouts (k1.5 §2.6.2): at most `--budget` new tokens per sample per iteration, unfinished samples
  are carried over in the replay buffer and continued in the next iteration alongside new prompts.

Reported: finished samples/s and generated tokens/s for both and their ratios, and the length distribution.
"""

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data.records import to_messages
from data.synthetic import generate
from scripts.make_tiny import make_tiny
from trainers.partial_rollout import ReplayBuffer, RolloutSettings, collect
from trainers.rollout import RolloutEngine

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep stdout for the JSON line


def long_tailed_checkpoint(out: Path, eos_scale: float, seed: int = 0) -> Path:
    """The tiny random checkpoint with its EOS output row scaled: the EOS logit then varies strongly with the
    context, so some samples end almost at once and others hardly ever (a heavy tail, like long-CoT lengths)."""
    path = make_tiny(out, seed=seed)
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(path).eos_token_id
    weights_file = path / "model.safetensors"
    weights = load_file(weights_file)
    heads = [k for k in weights if k.endswith("lm_head.weight")]  # else the output layer is tied to the embeddings
    key = heads[0] if heads else next(k for k in weights if k.endswith("embed_tokens.weight"))
    weights[key] = weights[key].clone()
    weights[key][eos] *= eos_scale
    save_file(weights, weights_file, metadata={"format": "pt"})
    return path


def run(engine, prompts, iterations: int, settings: RolloutSettings, per_iteration: int) -> dict:
    buffer, finished, tokens, lengths = ReplayBuffer(), 0, 0, []
    ids = list(prompts)
    start = time.perf_counter()
    for it in range(iterations):
        new = ids[it * per_iteration : (it + 1) * per_iteration]
        done, stats = collect(engine, buffer, prompts, new, it, settings, temperature=1.0, seed=None)
        finished += stats.finished
        tokens += stats.tokens
        lengths += [len(s.token_ids) for g in done for s in g.samples]
    seconds = time.perf_counter() - start
    return {
        "seconds": round(seconds, 2),
        "finished_samples": finished,
        "tokens": tokens,
        "finished_per_s": round(finished / seconds, 2),
        "tokens_per_s": round(tokens / seconds, 1),
        "carried_at_end": len(buffer.unfinished()),
        "lengths": lengths,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8, help="new prompts per iteration")
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-len", type=int, default=1024, help="max response length")
    parser.add_argument("--budget", type=int, default=128, help="partial rollouts: tokens per sample per iteration")
    parser.add_argument(
        "--eos-scale",
        type=float,
        default=11.0,  # tuned to the tiny model's random draws (28 before its projector grid): median ~75, p90 ~360
        help="EOS output row scale (the length tail; larger: shorter samples)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = long_tailed_checkpoint(Path(tmp) / "tiny", args.eos_scale)
        engine = RolloutEngine(path, max_model_len=args.max_len + 512, seed=0)
        examples = generate(args.prompts * args.iterations, seed=11)
        prompts = {f"p{i}": engine.encode(to_messages(e, with_response=False)) for i, e in enumerate(examples)}
        warm = RolloutSettings(n=2, max_response_length=32)
        collect(engine, ReplayBuffer(), prompts, ["p0", "p1"], 0, warm)  # warm-up
        full = RolloutSettings(n=args.n, max_response_length=args.max_len, repetition_check=False)
        partial = RolloutSettings(
            n=args.n, max_response_length=args.max_len, budget=args.budget, repetition_check=False
        )
        without = run(engine, prompts, args.iterations, full, args.prompts)
        with_partial = run(engine, prompts, args.iterations, partial, args.prompts)
        engine.shutdown()
    lengths = sorted(without.pop("lengths"))
    with_partial.pop("lengths")
    result = {
        "benchmark": "partial_rollout",
        "model": f"tiny (1.8M), EOS row x{args.eos_scale:g}",
        "iterations": args.iterations,
        "prompts_per_iteration": args.prompts,
        "n": args.n,
        "max_response_length": args.max_len,
        "budget": args.budget,
        "length_median": statistics.median(lengths) if lengths else None,
        "length_p90": lengths[int(0.9 * (len(lengths) - 1))] if lengths else None,
        "length_max": lengths[-1] if lengths else None,
        "without_partial": without,
        "with_partial": with_partial,
        "finished_per_s_ratio": round(with_partial["finished_per_s"] / without["finished_per_s"], 2),
        "tokens_per_s_ratio": round(with_partial["tokens_per_s"] / without["tokens_per_s"], 2),
        "cpu_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
