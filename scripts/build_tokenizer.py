"""Rebuild `scripts/assets/tiny_tokenizer.json`, the small byte-level BPE bundled for tiny checkpoints.

Run only when the asset must change (`python -m scripts.build_tokenizer`); the output is committed so that
`make_tiny.py` needs no network and no training. Trained on docstrings of the Python standard library plus a
vocabulary of visual-reasoning words; digits are split one per token so arithmetic stays learnable.
"""

import argparse
import importlib
import pkgutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<think>", "</think>"]
ASSET = Path(__file__).parent / "assets" / "tiny_tokenizer.json"

DOMAIN_TEXT = """
How many red circles are in the image? Count the blue squares. What is the sum of the digits shown?
The bar chart shows values for each category. Which bar is the tallest? Read the value of the green bar.
In the triangle, angle A is 40 degrees and angle B is 65 degrees, so angle C is 180 - 40 - 65 = 75 degrees.
Let me think step by step. First, I list every shape. Then I check my count again. Wait, I made a slip:
I counted one triangle twice, so the correct total is 4. The answer is \\boxed{4}. Options: (A) 3 (B) 4 (C) 5 (D) 6.
user assistant system
red green blue yellow purple orange black white gray circle square triangle rectangle star hexagon line segment
length width height area perimeter angle degree radius diameter sum difference product quotient total count
left right top bottom above below next between largest smallest tallest shortest more fewer equal plus minus
times divided multiply add subtract therefore so because check verify answer question image figure chart
"""


def corpus() -> list[str]:
    texts = [DOMAIN_TEXT] * 200
    for info in pkgutil.iter_modules():
        if info.name.startswith("_") or info.name in {"antigravity", "this", "idlelib", "tkinter", "turtle"}:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - any module that cannot import is simply not used
            continue
        texts.extend(
            doc for obj in list(vars(module).values()) if isinstance(doc := getattr(obj, "__doc__", None), str)
        )
    return texts


def build(vocab_size: int = 4096) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ASSET)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    build(args.vocab_size).save(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
