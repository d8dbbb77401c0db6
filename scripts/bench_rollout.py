"""Rollout and weight-push benchmark; prints one JSON line.

    python -m scripts.bench_rollout [--prompts 16] [--n 4] [--max-tokens 128]

1. Rollout tokens/s through the RolloutEngine (vLLM) vs transformers `generate`, on the same multimodal checkpoint,
   prompts (one image each, sizes varying), n samples and token budget, each after one warm-up call; for the tiny
   (~1.8M) checkpoint and a ~110M one. Sampling ignores EOS on both sides, so every side produces exactly
   prompts x n x max_tokens tokens. `generate` runs all prompts in one batch, and one prompt (n samples) at a time.
2. Weight push of a ~110M-parameter model into a running engine (`update_weights`: check, write, in-place reload,
   cache reset) in seconds and GB/s, next to a plain memory copy of the same tensors measured in the same run.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from scripts.make_tiny import make_tiny
from trainers.rollout import RolloutEngine, full_weights

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep stdout for the JSON line


def prompts_and_images(n_prompts: int):
    from PIL import Image, ImageDraw

    messages = []
    for i in range(n_prompts):
        image = Image.new("RGB", (96 + 16 * (i % 6), 80 + 24 * (i % 4)), (40 * i % 255, 90, 160))
        ImageDraw.Draw(image).ellipse((10, 10, 50, 50), fill="red")
        messages.append(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": image},
                        {"type": "text", "text": f"Question {i}: how many circles?"},
                    ],
                }
            ]
        )
    return messages


def bench_rollout(path: Path, n_prompts: int, n: int, max_tokens: int, dtype: str = "float32") -> dict:
    """Tokens/s of the rollout engine and of transformers `generate` (all prompts in one batch, and one prompt at a
    time with its n samples, as a trainer without an inference engine does)."""
    chats = prompts_and_images(n_prompts)
    engine = RolloutEngine(path, max_model_len=2048, max_images_per_prompt=1, dtype=dtype, seed=0)
    prompts = [engine.encode(chat) for chat in chats]
    params = {"n": n, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
    engine.generate(prompts[:2], **params)  # warm-up
    start = time.perf_counter()
    groups = engine.generate(prompts, **params)
    vllm_s = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for g in groups for c in g)
    processor = engine.processor
    engine.shutdown()

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    texts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    images = [[block["image"] for block in chat[0]["content"] if block["type"] == "image"] for chat in chats]
    kwargs = {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "num_return_sequences": n,
        "max_new_tokens": max_tokens,
        "min_new_tokens": max_tokens,
    }

    def hf_generate(batch: range) -> int:
        inputs = processor(
            images=[images[i] for i in batch], text=[texts[i] for i in batch], padding=True, return_tensors="pt"
        )
        out = model.generate(**inputs, **kwargs)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    with torch.inference_mode():
        hf_generate(range(2))  # warm-up
        start = time.perf_counter()
        hf_tokens = hf_generate(range(n_prompts))
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        per_prompt_tokens = sum(hf_generate(range(i, i + 1)) for i in range(n_prompts))
        per_prompt_s = time.perf_counter() - start
    assert hf_tokens == per_prompt_tokens == tokens, (hf_tokens, per_prompt_tokens, tokens)
    return {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "tokens": tokens,
        "vllm_tokens_per_s": round(tokens / vllm_s, 1),
        "hf_batched_tokens_per_s": round(tokens / batched_s, 1),
        "hf_per_prompt_tokens_per_s": round(tokens / per_prompt_s, 1),
        "speedup_vs_hf_batched": round(batched_s / vllm_s, 2),
        "speedup_vs_hf_per_prompt": round(per_prompt_s / vllm_s, 2),
    }


def bench_push(path: Path, repeats: int = 3, dtype: str = "float32") -> dict:
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    engine = RolloutEngine(path, max_model_len=512, max_images_per_prompt=1, dtype=dtype)
    engine.update_weights(model)  # warm-up
    push = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.update_weights(model)
        push.append(time.perf_counter() - start)
    engine.shutdown()

    with full_weights(model) as weights:
        sources = [t for _, t in weights]
    targets = [torch.empty_like(t) for t in sources]
    copies = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for dst, src in zip(targets, sources):
            dst.copy_(src)
        copies.append(time.perf_counter() - start)
    push_s, copy_s = min(push), min(copies[1:])
    return {
        "push_params_m": round(n_params / 1e6, 1),
        "push_gb": round(n_bytes / 1e9, 3),
        "push_s": round(push_s, 3),
        "push_gb_per_s": round(n_bytes / 1e9 / push_s, 2),
        "memcpy_gb_per_s": round(n_bytes / 1e9 / copy_s, 2),
        "push_fraction_of_memcpy": round(copy_s / push_s, 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both engines' dtype")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        tiny, m100 = make_tiny(Path(tmp) / "tiny"), make_tiny(Path(tmp) / "m100", size="100m")
        result = {
            "bench": "rollout",
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(),
            "prompts": args.prompts,
            "n": args.n,
            "max_tokens": args.max_tokens,
        }
        for label, path in (("tiny", tiny), ("100m", m100)):
            result |= {
                f"{label}_{k}": v
                for k, v in bench_rollout(path, args.prompts, args.n, args.max_tokens, args.dtype).items()
            }
        result |= bench_push(m100, dtype=args.dtype)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
