"""Multimodal DPO on long2short preference pairs (k1.5 §2.4) for kimi_mm.

    python -m trainers.long2short --model LONG_COT --data PROBLEMS --out PAIRS_DIR --dpo-pairs   # build the pairs
    python trainers/dpo.py --config configs/dpo_tiny.yaml [--key value ...]
    torchrun --nproc_per_node 2 trainers/dpo.py --config ...        # or: accelerate launch trainers/dpo.py ...

`DPOConfig` + `DPOTrainer`, built on the SFT recipe (`trainers/sft.py`): the same config fields (model, data,
max_length, frozen vision tower, LoRA), its collator (here one padded row per response, images in row order) and its
`save_final`. A pair is a problem (images + question, rendered by the processor's chat template with the generation
prompt) and two response texts, tokenized after it; the loss sees the response tokens only.

The reference policy is, in order: the `ref_model` passed to the trainer; `ref_model_name_or_path`; with LoRA, the
policy with its adapters switched off; otherwise a frozen copy of the initial policy. With
`precompute_ref_log_probs` its log-probs are computed once before training and the reference model is freed; a
dataset whose `ref_logps` are already set needs no reference model at all.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from trainers import cli
from trainers.sft import IGNORE_INDEX, MultimodalCollator, SFTConfig, SFTTrainer

logger = logging.getLogger(__name__)
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class DPOConfig(SFTConfig):
    train_data: str = field(
        default="", metadata={"help": "preference pairs: a jsonl with chosen/rejected texts, or its folder"}
    )
    beta: float = field(default=0.1, metadata={"help": "DPO beta: weight of the implicit KL to the reference"})
    ref_model_name_or_path: str = field(
        default="", metadata={"help": "reference model (default: the initial policy, or the LoRA base)"}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "compute reference log-probs once before training, then free the model"}
    )
    packing: bool = field(default=False, metadata={"help": "not supported: DPO uses one padded row per response"})

    def __post_init__(self):
        super().__post_init__()
        if self.packing:
            raise ValueError("packing is not supported by DPO (one padded row per response); set packing: false")
        if self.beta <= 0:
            raise ValueError(f"beta must be positive, got {self.beta}")


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss (Rafailov et al. 2023, Eq. 7) of a batch of pairs, and the implicit rewards.

        r(y)  = beta * (log pi_theta(y | x) - log pi_ref(y | x))
        loss  = mean over pairs of -log sigmoid(r(y_chosen) - r(y_rejected))

    Inputs: summed response-token log-probs, `[pairs]` each. Returns (loss `[]`, chosen rewards `[pairs]`,
    rejected rewards `[pairs]`), the rewards detached."""
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed log-probability of each row's labelled tokens (labels are the inputs; IGNORE_INDEX elsewhere).

    logits `[rows, length, vocab]`, labels `[rows, length]`; returns `[rows]` in float32. Rows are done one at a
    time, so only one row's log-normaliser is materialised."""
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    targets = labels.masked_fill(~mask, 0).unsqueeze(-1)
    token_logps = torch.stack(
        [
            row.float().gather(-1, target).squeeze(-1) - row.float().logsumexp(-1)
            for row, target in zip(logits[:, :-1], targets)
        ]
    )
    return (token_logps * mask).sum(-1)


class PreferenceDataset(Dataset):
    """Preference pairs (`trainers.long2short.PreferencePair`) tokenized for DPO.

    Each problem's prompt is rendered once by the processor's chat template (generation prompt included, images
    expanded); each response text is tokenized and appended, and only its tokens are labelled. Responses are cut to
    fit `max_length` (counted in `truncated`); pairs whose prompt alone does not fit, whose images fail to decode or
    whose responses hold an image token are skipped and counted by reason in `skip_reasons`. `ref_logps` (one (chosen, rejected) pair of floats per
    item), when set, are returned with the items and replace the reference model."""

    def __init__(self, pairs: list, processor, max_length: int):
        from data.records import to_messages

        self.items, self.skip_reasons, self.truncated = [], Counter(), 0
        self.ref_logps: list[tuple[float, float]] | None = None
        tokenizer, prompts = processor.tokenizer, {}
        for pair in tqdm(pairs, desc="tokenizing pairs", disable=len(pairs) < 64):
            key = id(pair.example)
            if key not in prompts:
                try:
                    prompts[key] = processor.apply_chat_template(
                        to_messages(pair.example, with_response=False),
                        add_generation_prompt=True,
                        tokenize=True,
                        return_dict=True,
                        return_tensors="pt",
                    )
                except ValueError as err:  # an image that passed the loader's check but does not decode
                    logger.warning("skipping the pairs of problem %r: %s", pair.example.id, err)
                    prompts[key] = None
            prompt = prompts[key]
            if prompt is None:
                self.skip_reasons["bad image"] += 1
                continue
            room = max_length - prompt["input_ids"].shape[1]
            if room < 1:
                self.skip_reasons["prompt too long"] += 1
                continue
            responses = [
                tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
                for text in (pair.chosen, pair.rejected)
            ]
            if any((response == processor.image_token_id).any() for response in responses):
                self.skip_reasons["image token in a response"] += 1  # it would have no image features
                continue
            item = {}
            for side, response in zip(("chosen", "rejected"), responses):
                if len(response) > room:
                    self.truncated += 1
                    response = response[:room]
                prompt_ids = prompt["input_ids"][0]
                item[side] = {
                    "input_ids": torch.cat([prompt_ids, response]),
                    "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), response]),
                }
                if "pixel_values" in prompt:
                    item[side] |= {"pixel_values": prompt["pixel_values"], "image_grid_thw": prompt["image_grid_thw"]}
            self.items.append(item)
        if self.skip_reasons or self.truncated:
            logger.warning(
                "%d of %d pairs skipped (%s), %d responses cut to max_length=%d",
                self.skip_reasons.total(),
                len(pairs),
                dict(self.skip_reasons),
                self.truncated,
                max_length,
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        if self.ref_logps is not None:
            item = item | dict(zip(REF_KEYS, self.ref_logps[index]))
        return item


@dataclass
class PreferenceCollator:
    """A batch of B pairs as 2B padded rows, the B chosen responses then the B rejected ones, through the SFT
    collator without packing (one response per row, so a response's log-prob is a row sum); images in row order."""

    pad_token_id: int
    max_length: int

    def __call__(self, items: list[dict]) -> dict:
        collate = MultimodalCollator(self.pad_token_id, self.max_length, packing=False)
        batch = collate([item["chosen"] for item in items] + [item["rejected"] for item in items])
        if REF_KEYS[0] in items[0]:
            batch |= {key: torch.tensor([item[key] for item in items]) for key in REF_KEYS}
        return batch


class DPOTrainer(SFTTrainer):
    """A `Trainer` for multimodal DPO; the SFT trainer's frozen vision tower, LoRA and `save_final` carry over."""

    def __init__(self, model, args: DPOConfig, processing_class, train_dataset=None, ref_model=None, **kwargs):
        kwargs.setdefault("data_collator", PreferenceCollator(processing_class.tokenizer.pad_token_id, args.max_length))
        needs_reference = getattr(train_dataset, "ref_logps", None) is None
        if needs_reference and ref_model is None:
            if args.ref_model_name_or_path:
                ref_model = AutoModelForImageTextToText.from_pretrained(args.ref_model_name_or_path, dtype=model.dtype)
            elif not args.use_lora:  # with LoRA, the reference is the policy with its adapters off
                ref_model = copy.deepcopy(model)
        super().__init__(
            model=model, args=args, processing_class=processing_class, train_dataset=train_dataset, **kwargs
        )
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs; let Trainer scale for accumulation
        self.ref_model = None
        if ref_model is not None:
            ref_model = ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.metrics = defaultdict(list)
        if needs_reference and args.precompute_ref_log_probs and train_dataset is not None:
            train_dataset.ref_logps = self.reference_log_probs(train_dataset)
            self.ref_model = None

    def _logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs of the chosen and of the rejected rows of a batch, `[pairs]` each."""
        inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
        return sequence_logps(model(**inputs, use_cache=False).logits, batch["labels"]).chunk(2)

    @torch.no_grad()
    def _reference_logps(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ref_model is not None:
            return self._logps(self.ref_model, batch)
        policy = self.accelerator.unwrap_model(self.model)
        if not hasattr(policy, "disable_adapter"):
            raise RuntimeError(
                "no reference policy: pass ref_model, set ref_model_name_or_path, use LoRA, or set the dataset's ref_logps"
            )
        with policy.disable_adapter():
            return self._logps(policy, batch)

    def reference_log_probs(self, dataset: PreferenceDataset) -> list[tuple[float, float]]:
        """The reference policy's summed response log-probs (chosen, rejected) for every pair of `dataset`."""
        loader = DataLoader(dataset, batch_size=self.args.per_device_eval_batch_size, collate_fn=self.data_collator)
        logps = []
        for batch in tqdm(loader, desc="reference log-probs", disable=len(loader) < 8):
            chosen, rejected = self._reference_logps(self._prepare_inputs(batch))
            logps += zip(chosen.tolist(), rejected.tolist())
        return logps

    def compute_loss(self, model, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        chosen, rejected = self._logps(model, inputs)
        if REF_KEYS[0] in inputs:
            ref_chosen, ref_rejected = (inputs[key] for key in REF_KEYS)
        else:
            ref_chosen, ref_rejected = self._reference_logps(inputs)
        loss, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.args.beta)
        metrics = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": chosen.detach(),
            "logps/rejected": rejected.detach(),
        }
        if model.training:
            for key, value in metrics.items():
                self.metrics[key].append(self.accelerator.gather_for_metrics(value).mean().item())
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the DPO metrics, averaged over the steps since the last log."""
        logs = logs | {key: sum(values) / len(values) for key, values in self.metrics.items()}
        self.metrics.clear()
        super().log(logs, start_time)


def parse_config(argv: list[str] | None = None) -> DPOConfig:
    """`--config FILE.yaml` sets the defaults, further `--key value` flags override them."""
    return cli.parse_config(DPOConfig, argv)


def main(argv: list[str] | None = None) -> Path:
    import kimi_mm  # noqa: F401  (Auto classes)
    from trainers.long2short import load_preference_pairs

    config = parse_config(argv)
    if not config.model_name_or_path or not config.train_data:
        raise SystemExit("set model_name_or_path and train_data (in the YAML config or as flags)")
    processor = AutoProcessor.from_pretrained(config.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(config.model_name_or_path)
    pairs, skipped = load_preference_pairs(config.train_data)
    dataset = PreferenceDataset(pairs, processor, config.max_length)
    if not len(dataset):
        raise SystemExit(f"no usable preference pairs in {config.train_data}")
    trainer = DPOTrainer(model=model, args=config, processing_class=processor, train_dataset=dataset)
    trainer.train()
    out = trainer.save_final()
    if trainer.is_world_process_zero():
        print(
            f"dpo: {trainer.state.global_step} steps on {trainer.args.world_size} process(es), {len(dataset)} pairs "
            f"({skipped} records and {dataset.skip_reasons.total()} pairs skipped), saved to {out}"
        )
    return out


if __name__ == "__main__":
    main()
