"""Write a tiny random kimi_mm checkpoint + processor (seconds, no network).

    python scripts/make_tiny.py --out DIR [--seed N] [--text-model-type qwen2|qwen3|llama]

Tests, the demo and the benchmarks build their models with it. The tokenizer is the small byte-level BPE
bundled in `scripts/assets/`; head dims are 64 so that vLLM's CPU attention kernels accept the model.
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from tokenizers import Tokenizer
from transformers import GenerationConfig, PreTrainedTokenizerFast

from kimi_mm import KimiMMConfig, KimiMMForConditionalGeneration, KimiMMImageProcessor, KimiMMProcessor

ASSET = Path(__file__).resolve().parent / "assets" / "tiny_tokenizer.json"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The bundled BPE as a transformers tokenizer: ChatML specials, `<image>` and the thinking tags."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_file(str(ASSET)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<image>"],
        padding_side="left",
    )
    tokenizer.add_tokens(["<think>", "</think>"])  # visible in decoded text, like Qwen3's
    return tokenizer


# Widths and depths: "tiny" (~1.8M parameters) for tests, "small" (~9M) for the demo, "100m" (~110M) for the
# weight-push benchmark.
SIZES = {
    "tiny": {"text": (128, 256, 2, 2, 1), "vision": (128, 256, 2, 2)},
    "small": {"text": (256, 768, 4, 4, 2), "vision": (256, 768, 4, 4)},
    "100m": {"text": (768, 2560, 12, 12, 4), "vision": (512, 1536, 4, 8)},
}


def tiny_config(tokenizer: PreTrainedTokenizerFast, text_model_type: str = "qwen2", size: str = "tiny") -> KimiMMConfig:
    hidden, intermediate, layers, heads, kv_heads = SIZES[size]["text"]
    v_hidden, v_intermediate, v_layers, v_heads = SIZES[size]["vision"]
    text_config = {
        "model_type": text_model_type,
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }
    vision_config = {
        "hidden_size": v_hidden,
        "intermediate_size": v_intermediate,
        "num_hidden_layers": v_layers,
        "num_attention_heads": v_heads,
        "patch_size": 14,
        "num_position_embeddings": 8,
    }
    return KimiMMConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        merge_size=2,
        projector_position_embeddings=4,  # one per token of a 112 x 112 image, the synthetic tasks' size
    )


def make_tiny(out: str | Path, seed: int = 0, text_model_type: str = "qwen2", size: str = "tiny") -> Path:
    """Save a random tiny model and its processor to `out` and return the path."""
    out = Path(out)
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    model = KimiMMForConditionalGeneration(tiny_config(tokenizer, text_model_type, size)).eval()
    with torch.no_grad():  # the position grid at the projected tokens' scale (norm ~1), not the default 0.02
        model.model.multi_modal_projector.position_embedding.weight.normal_(std=0.1)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id
    )
    image_processor = KimiMMImageProcessor(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=224 * 224)
    processor = KimiMMProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-model-type", default="qwen2", choices=["qwen2", "qwen3", "llama"])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    args = parser.parse_args(argv)
    path = make_tiny(args.out, args.seed, args.text_model_type, args.size)
    print(f"wrote tiny kimi_mm checkpoint to {path}")


if __name__ == "__main__":
    main()
