"""SFT throughput with packing vs padding on a mixed-length batch; prints one JSON line.

    python -m scripts.bench_sft [--batch 16] [--steps 6] [--max-length 2048]

The batch mixes chain-of-thought lengths as long-CoT data does: each synthetic example's worked reasoning is
repeated 1-8 times (about 150 to 1,200 tokens per example). Each mode trains the same tiny model on the same
examples (forward, backward, optimizer step) in its own process, after one warm-up step, so that its peak memory
(max RSS on CPU, max allocated on CUDA) is its own. Tokens/s counts real (non-padding) tokens.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def run_mode(checkpoint: str, packing: bool, batch: int, steps: int, max_length: int) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import kimi_mm  # noqa: F401
    from data.synthetic import generate
    from trainers.sft import PACKED_ATTENTION, ChatSFTDataset, MultimodalCollator

    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint).train()
    if packing:  # as SFTTrainer does
        model.model.language_model.set_attn_implementation(PACKED_ATTENTION)
    examples = [replace(e, reasoning=" ".join([e.reasoning] * (1 + i % 8))) for i, e in enumerate(generate(batch, 0))]
    items = [ChatSFTDataset([e], processor, max_length)[0] for e in examples]
    collate = MultimodalCollator(processor.tokenizer.pad_token_id, max_length, packing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = collate(items)
    real_tokens = sum(len(item["input_ids"]) for item in items)

    def step():
        loss = model(**inputs, logits_for_labels_only=True).loss  # as SFTTrainer does in training
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    peak = (
        torch.cuda.max_memory_allocated()
        if torch.cuda.is_available()
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {
        "tokens_per_s": round(real_tokens * steps / seconds, 1),
        "rows": int(inputs["input_ids"].shape[0]),
        "row_tokens": int(inputs["input_ids"].numel()),
        "real_tokens": real_tokens,
        "peak_memory_mb": round(peak / 2**20, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--mode", choices=["packing", "padding"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mode:  # child process: one mode
        print(json.dumps(run_mode(args.checkpoint, args.mode == "packing", args.batch, args.steps, args.max_length)))
        return {}

    from scripts.make_tiny import make_tiny

    result = {
        "bench": "sft",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "batch": args.batch,
        "steps": args.steps,
        "max_length": args.max_length,
    }
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny(Path(tmp) / "tiny")
        for mode in ("packing", "padding"):
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "scripts.bench_sft",
                        "--mode",
                        mode,
                        "--checkpoint",
                        str(checkpoint),
                        "--batch",
                        str(args.batch),
                        "--steps",
                        str(args.steps),
                        "--max-length",
                        str(args.max_length),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=Path(__file__).resolve().parents[1],
                    env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            result |= {f"{mode}_{k}": v for k, v in json.loads(out).items()}
    result["packing_speedup"] = round(result["packing_tokens_per_s"] / result["padding_tokens_per_s"], 2)
    result["padding_waste"] = round(1 - result["padding_real_tokens"] / result["padding_row_tokens"], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
