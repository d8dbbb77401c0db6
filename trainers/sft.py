"""Long-CoT supervised fine-tuning (the k1.5 warm-up) for kimi_mm.

    python trainers/sft.py --config configs/sft_tiny.yaml [--key value ...]
    torchrun --nproc_per_node 2 trainers/sft.py --config ...        # or: accelerate launch trainers/sft.py ...

`SFTConfig` (a `TrainingArguments`) + `SFTTrainer` (a `Trainer`). The loss covers assistant tokens only (the thinking
block and the answer). With `packing`, the examples of a batch are concatenated into rows of at most `max_length`
tokens with `position_ids` restarting at each example and no attention mask, from which transformers builds a
block-diagonal causal mask (sdpa/eager) or variable-length boundaries (flash-attention): no attention crosses
examples and no compute is spent on padding.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import (
    AttentionInterface,
    AutoModelForImageTextToText,
    AutoProcessor,
    Trainer,
    TrainingArguments,
)
from transformers.masking_utils import AttentionMaskInterface

from trainers import cli

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
LM_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass
class SFTConfig(TrainingArguments):
    model_name_or_path: str = field(default="", metadata={"help": "kimi_mm checkpoint to start from (dir or hub id)"})
    train_data: str = field(default="", metadata={"help": "training data: a dataset dir/jsonl/parquet (data.loaders)"})
    max_length: int = field(default=2048, metadata={"help": "longest packed row / example in tokens"})
    packing: bool = field(default=True, metadata={"help": "pack a batch's examples into rows (no padding)"})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "keep the vision encoder's weights fixed"})
    freeze_projector: bool = field(
        default=False,
        metadata={"help": "keep the vision-to-text projector fixed (with a random vision side: see README)"},
    )
    use_lora: bool = field(default=False, metadata={"help": "train LoRA adapters on the LLM's linear layers"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the collator needs every field"})


PACKED_ATTENTION = "kimi_mm_packed_sdpa"


def packed_sdpa_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None, **kwargs
):
    """Causal attention run separately on each packed example (a segment starts where `position_ids` do not go up
    by one), so the cost is the sum of n_i^2 instead of row_length^2 and no mask is built. query/key/value:
    `[rows, heads, length, head_dim]`; returns `[rows, length, heads, head_dim]`."""
    if position_ids is None or attention_mask is not None:
        raise ValueError(f"{PACKED_ATTENTION} needs packed batches (position_ids, no attention mask)")
    rows, _, length, _ = query.shape
    position_ids = position_ids.expand(rows, -1)
    segments = []
    for row, positions in enumerate(position_ids):
        starts = [0] + ((positions[1:] - positions[:-1]) != 1).nonzero().flatten().add(1).tolist()
        segments += [
            torch.nn.functional.scaled_dot_product_attention(
                query[row : row + 1, :, start:end],
                key[row : row + 1, :, start:end],
                value[row : row + 1, :, start:end],
                is_causal=True,
                scale=scaling,
                enable_gqa=True,
                dropout_p=dropout if module.training else 0.0,
            ).transpose(1, 2)  # [1, n_i, heads, head_dim]
            for start, end in zip(starts, starts[1:] + [length])
        ]
    # One concatenation writes the whole output (its backward only slices), instead of a copy into a preallocated
    # tensor per segment, which autograd undoes with a zero-fill and a copy per segment.
    return torch.cat(segments, dim=1).view(rows, length, *segments[0].shape[2:]), None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, lambda *args, **kwargs: None)  # segments come from position_ids


@contextlib.contextmanager
def packed_attention(*models):
    """Within the block, the language model of each of `models` (plain, PEFT-wrapped or accelerate-unwrapped) that
    runs sdpa or eager attention runs `kimi_mm_packed_sdpa`: packed rows then cost the sum of n_i^2 instead of a
    row_length^2 block-diagonal mask. Its own kernel comes back afterwards, for generation and padded batches.
    flash-attention kernels take the packed segments from `position_ids` themselves and stay as they are."""
    switched = []
    try:
        for model in models:
            language = (model.get_base_model() if hasattr(model, "get_base_model") else model).model.language_model
            kernel = language.config._attn_implementation
            if kernel in ("sdpa", "eager"):
                language.set_attn_implementation(PACKED_ATTENTION)
                switched.append((language, kernel))
        yield
    finally:
        for language, kernel in switched:
            language.set_attn_implementation(kernel)


class ChatSFTDataset(Dataset):
    """Examples (`data.records.Example`) tokenized with the processor's chat template, with assistant-only labels.

    Examples longer than `max_length` (an image's tokens are never cut) or whose images fail to decode are skipped
    and counted in `skipped`, by reason in `skip_reasons`. With `with_answer=False` the assistant turn is the reasoning
    alone, no `\\boxed{}` answer (image-description data, `scripts.pretrain_vision.align_language_model`)."""

    def __init__(self, examples: list, processor, max_length: int, with_answer: bool = True):
        from data.records import to_messages

        self.items, self.skip_reasons = [], Counter()
        for example in tqdm(examples, desc="tokenizing", disable=len(examples) < 64):
            try:
                out = processor.apply_chat_template(
                    to_messages(example, with_response=True, with_answer=with_answer),
                    tokenize=True,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                    return_tensors="pt",
                )
            except ValueError as err:  # an image that passed the loader's check but does not decode
                logger.warning("skipping example %r: %s", example.id, err)
                self.skip_reasons["bad image"] += 1
                continue
            input_ids = out["input_ids"][0]
            if len(input_ids) > max_length:
                self.skip_reasons["too long"] += 1
                continue
            labels = torch.where(out["assistant_masks"][0].bool(), input_ids, IGNORE_INDEX)
            item = {"input_ids": input_ids, "labels": labels}
            if "pixel_values" in out:
                item |= {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
            self.items.append(item)
        if self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in self.skip_reasons.items())
            logger.warning(
                "skipped %d of %d examples (%s; max_length=%d)", self.skipped, len(examples), reasons, max_length
            )

    @property
    def skipped(self) -> int:
        return self.skip_reasons.total()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


@dataclass
class MultimodalCollator:
    """Batches tokenized examples. `packing=True`: first-fit rows of at most `max_length` tokens, position ids
    restarting per example, no attention mask and no KV cache (with a cache, transformers would not derive the
    per-example mask); shorter rows end in a padding segment whose labels are ignored.
    `packing=False`: one example per row, right-padded, with an attention mask."""

    pad_token_id: int
    max_length: int
    packing: bool = True

    def __call__(self, items: list[dict]) -> dict:
        rows = self._rows(items)
        width = max(sum(len(items[i]["input_ids"]) for i in row) for row in rows)
        batch = {
            k: torch.full((len(rows), width), v)
            for k, v in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX))
        }
        if self.packing:
            batch["position_ids"] = torch.zeros(len(rows), width, dtype=torch.long)
            # transformers derives the per-example mask from position_ids only when no KV cache is in play.
            batch["use_cache"] = False
        else:
            batch["attention_mask"] = torch.zeros(len(rows), width, dtype=torch.long)
        images = []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids, n = items[i]["input_ids"], len(items[i]["input_ids"])
                batch["input_ids"][r, start : start + n] = ids
                batch["labels"][r, start : start + n] = items[i]["labels"]
                if self.packing:
                    batch["position_ids"][r, start : start + n] = torch.arange(n)
                else:
                    batch["attention_mask"][r, start : start + n] = 1
                if "pixel_values" in items[i]:
                    images.append(items[i])
                start += n
            if self.packing:  # the padding tail forms its own segment
                batch["position_ids"][r, start:] = torch.arange(width - start)
        if images:  # in the order their tokens appear: row by row, example by example
            batch["pixel_values"] = torch.cat([item["pixel_values"] for item in images])
            batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in images])
        return batch

    def _rows(self, items: list[dict]) -> list[list[int]]:
        if not self.packing:
            return [[i] for i in range(len(items))]
        rows, room = [], []
        for i in sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"])):
            n = len(items[i]["input_ids"])
            fit = next((r for r, free in enumerate(room) if free >= n), None)
            if fit is None:
                rows.append([i])
                room.append(self.max_length - n)
            else:
                rows[fit].append(i)
                room[fit] -= n
        return rows


class SFTTrainer(Trainer):
    """A `Trainer` for kimi_mm SFT: builds the collator from the config; optional frozen vision tower and LoRA."""

    def __init__(self, model, args: SFTConfig, processing_class, train_dataset=None, **kwargs):
        cli.freeze_vision(model, args.freeze_vision_tower, args.freeze_projector)
        if args.use_lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=args.lora_r,
                    lora_alpha=args.lora_alpha,
                    lora_dropout=args.lora_dropout,
                    target_modules=LM_LINEAR,
                    modules_to_save=[] if args.freeze_projector else ["multi_modal_projector"],
                ),
            )
        kwargs.setdefault(
            "data_collator", MultimodalCollator(processing_class.tokenizer.pad_token_id, args.max_length, args.packing)
        )
        super().__init__(
            model=model, args=args, processing_class=processing_class, train_dataset=train_dataset, **kwargs
        )

    def train(self, *args, **kwargs):
        """`Trainer.train`, with packing under `packed_attention` (attention per packed example)."""
        models = [self.accelerator.unwrap_model(self.model)] if self.args.packing else []
        with packed_attention(*models):
            return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """The Trainer's loss, with the LM head run only on labelled positions in training (the same loss; no logits
        over prompt, image and padding tokens). Evaluation, which may want the logits, takes the full path."""
        if not return_outputs:
            inputs = {**inputs, "logits_for_labels_only": True}
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def save_final(self, output_dir: str | None = None) -> Path:
        """Save a standalone checkpoint (LoRA merged in) + processor: what vLLM and `from_pretrained` load."""
        output_dir = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        if model.config.text_config._attn_implementation == PACKED_ATTENTION:
            model.model.language_model.set_attn_implementation("sdpa")  # generation needs a regular kernel
        if self.args.should_save:
            model.save_pretrained(output_dir)
            self.processing_class.save_pretrained(output_dir)
        return output_dir


def parse_config(argv: list[str] | None = None) -> SFTConfig:
    """`--config FILE.yaml` sets the defaults, further `--key value` flags override them."""
    return cli.parse_config(SFTConfig, argv)


def main(argv: list[str] | None = None) -> Path:
    import kimi_mm  # noqa: F401  (Auto classes)
    from data.loaders import load_examples

    config = parse_config(argv)
    if not config.model_name_or_path or not config.train_data:
        raise SystemExit("set model_name_or_path and train_data (in the YAML config or as flags)")
    processor = AutoProcessor.from_pretrained(config.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(config.model_name_or_path)
    loaded = load_examples(config.train_data)
    dataset = ChatSFTDataset(loaded.examples, processor, config.max_length)
    trainer = SFTTrainer(model=model, args=config, processing_class=processor, train_dataset=dataset)
    trainer.train()
    out = trainer.save_final()
    if trainer.is_world_process_zero():
        print(
            f"sft: {trainer.state.global_step} steps on {trainer.args.world_size} process(es), "
            f"{len(dataset)} examples ({loaded.skipped + dataset.skipped} skipped), saved to {out}"
        )
    return out


if __name__ == "__main__":
    main()
