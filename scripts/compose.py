"""Compose a kimi_mm checkpoint from a pretrained SigLIP vision model and a pretrained causal LM.

    python scripts/compose.py --vision google/siglip-so400m-patch14-384 --llm Qwen/Qwen2.5-7B-Instruct --out DIR

Both sources are local directories or hub ids. The vision tower takes SigLIP's weights (the patch conv as a Linear
over flattened patches, the learned position grid, interpolated per image at run time; the pooling head dropped).
The LLM and its tokenizer are copied, `<image>`, ChatML and thinking tokens added where missing (embeddings grow
only past the LLM's own vocabulary, new rows set to the mean). The projector is freshly initialised.
As in MoonViT, the encoder adds 2D rotary positions on top of SigLIP's weights, so its features are a starting point
to train from (projector warm-up, then joint training), not SigLIP's own.
"""

import argparse
import copy
import inspect
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel
from transformers.image_processing_base import ImageProcessingMixin
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from kimi_mm import (
    KimiMMConfig,
    KimiMMForConditionalGeneration,
    KimiMMImageProcessor,
    KimiMMProcessor,
    KimiMMVisionConfig,
)

IMAGE_TOKEN, IM_START, IM_END = "<image>", "<|im_start|>", "<|im_end|>"
THINK_TOKENS = ("<think>", "</think>")
# Copied as they are from SigLIP's vision config (the encoder layers share SigLIP's shapes and names).
SHARED_VISION_FIELDS = (
    "hidden_size intermediate_size num_hidden_layers num_attention_heads patch_size hidden_act layer_norm_eps "
    "num_channels"
).split()
_PROCESSOR_DEFAULTS = inspect.signature(KimiMMImageProcessor.__init__).parameters
DEFAULT_MIN_PIXELS = _PROCESSOR_DEFAULTS["min_pixels"].default
DEFAULT_MAX_PIXELS = _PROCESSOR_DEFAULTS["max_pixels"].default


def siglip_vision_config(vision: str):
    """The SigLIP vision config of a full `siglip` or a `siglip_vision_model` checkpoint."""
    config = AutoConfig.from_pretrained(vision)
    if config.model_type == "siglip":
        return config.vision_config
    if config.model_type != "siglip_vision_model":
        raise ValueError(
            f"--vision {vision!r} is a {config.model_type!r} model; compose needs a SigLIP checkpoint "
            "(model_type 'siglip' or 'siglip_vision_model')"
        )
    return config


def siglip_state_dict(vision: str, siglip_config) -> dict[str, torch.Tensor]:
    """SigLIP vision weights renamed to KimiMMVisionModel's keys (the pooling `head.*` dropped)."""
    siglip, info = SiglipVisionModel.from_pretrained(
        vision, config=siglip_config, dtype=torch.float32, output_loading_info=True
    )
    if info["missing_keys"]:
        raise ValueError(f"--vision {vision!r} lacks SigLIP vision weights: {sorted(info['missing_keys'])}")
    state = {}
    for key, value in siglip.state_dict().items():
        key = key.removeprefix("vision_model.")
        if key.startswith("head."):
            continue
        if key == "embeddings.patch_embedding.weight":  # Conv2d [D, C, p, p] → Linear over (channel, row, col)
            value = value.reshape(value.shape[0], -1)
        state[key.removeprefix("embeddings.").removeprefix("encoder.")] = value
    return state


def add_tokens(tokenizer) -> None:
    """`<image>` (special), ChatML turn markers (special) and the thinking tags (normal), where missing."""
    vocab = tokenizer.get_vocab()
    specials = [IMAGE_TOKEN] + [t for t in (IM_START, IM_END) if t not in vocab]
    tokenizer.add_special_tokens({"additional_special_tokens": specials}, replace_extra_special_tokens=False)
    tokenizer.add_tokens([t for t in THINK_TOKENS if t not in vocab])


def grow_embeddings(llm, num_tokens: int) -> None:
    """Resize the LLM's embeddings to `num_tokens` only if it exceeds them; new rows are the mean of the old."""
    old = llm.get_input_embeddings().weight.shape[0]
    if num_tokens <= old:
        return
    llm.resize_token_embeddings(num_tokens, mean_resizing=False)
    weights = {id(w): w for w in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight)}
    with torch.no_grad():
        for weight in weights.values():  # one tensor when the embeddings are tied
            weight[old:] = weight[:old].mean(0)


def as_list(token_ids) -> list[int]:
    return [] if token_ids is None else [token_ids] if isinstance(token_ids, int) else list(token_ids)


def compose(
    vision: str,
    llm: str,
    out: str | Path,
    seed: int = 0,
    dtype: str | torch.dtype = "auto",
    merge_size: int = 2,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Path:
    """Build and save a kimi_mm checkpoint + processor to `out`; return the path. `dtype="auto"` keeps the LLM's."""
    out = Path(out)
    siglip_config = siglip_vision_config(vision)
    llm_type = AutoConfig.from_pretrained(llm).model_type
    if llm_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--llm {llm!r} is a {llm_type!r} model, which is not a causal LM (AutoModelForCausalLM)")

    vision_config = KimiMMVisionConfig(
        **{name: getattr(siglip_config, name) for name in SHARED_VISION_FIELDS},
        num_position_embeddings=siglip_config.image_size // siglip_config.patch_size,
    )
    vision_state = siglip_state_dict(vision, siglip_config)

    language_model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype).eval()
    dtype = language_model.dtype
    tokenizer = AutoTokenizer.from_pretrained(llm, padding_side="left")  # for batched generation, as make_tiny's
    original_eos = as_list(language_model.generation_config.eos_token_id) or as_list(tokenizer.eos_token_id)
    add_tokens(tokenizer)
    grow_embeddings(language_model, len(tokenizer))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or IM_END
    tokenizer.eos_token = IM_END

    text_config = language_model.config.to_dict() | {"dtype": str(dtype).removeprefix("torch.")}
    config = KimiMMConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        merge_size=merge_size,
    )
    torch.manual_seed(seed)  # the projector is the only freshly initialised part that is kept
    model = KimiMMForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.model.vision_tower.load_state_dict(vision_state, strict=True)
    model.model.language_model.load_state_dict(language_model.base_model.state_dict(), strict=True)
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict(), strict=True)
    model.to(dtype)

    generation_config = copy.deepcopy(language_model.generation_config)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    generation_config.eos_token_id = list(dict.fromkeys([*original_eos, im_end_id]))
    generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config

    try:
        image_stats, _ = ImageProcessingMixin.get_image_processor_dict(vision)
    except OSError:  # no preprocessor_config.json next to the vision weights
        image_stats = {}
    image_processor = KimiMMImageProcessor(
        patch_size=siglip_config.patch_size,
        merge_size=merge_size,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        image_mean=image_stats.get("image_mean", (0.5, 0.5, 0.5)),
        image_std=image_stats.get("image_std", (0.5, 0.5, 0.5)),
    )
    model.save_pretrained(out)
    KimiMMProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vision", required=True, help="SigLIP checkpoint (local dir or hub id)")
    parser.add_argument("--llm", required=True, help="causal LM checkpoint with its tokenizer (local dir or hub id)")
    parser.add_argument("--out", required=True, help="directory to write the kimi_mm checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed for the projector's initialisation")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype of the checkpoint (auto: the LLM's)",
    )
    parser.add_argument("--merge-size", type=int, default=2, help="side of the patch block merged into one token")
    parser.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS)
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    args = parser.parse_args(argv)
    path = compose(**vars(args))
    print(f"wrote kimi_mm checkpoint composed from {args.vision} + {args.llm} to {path}")


if __name__ == "__main__":
    main()
