"""Pretrain a kimi_mm checkpoint's vision encoder and projector on the synthetic scenes' annotations.

Real VLMs start from a pretrained vision encoder. The demo's tiny model starts from a random one, which cannot tell
digits apart, and the tiny language model cannot learn to read its features in a few minutes of SFT
(docs/findings.md). This stage stands in for the pretrained encoder: a readout head - one learned query per scene slot
(`data.synthetic.SCENE_SLOTS`: the shape in each cell, each digit, each bar's value, each angle label), attention
over the image's projected tokens (the tokens the language model sees) and a linear classifier per slot - is trained
together with the encoder and projector on the `Example.scene` labels of freshly generated images. The head is then
dropped; the language model is not touched.

`align_language_model` is an optional next stage (demo `--align-steps`): the language model, with the vision side
fixed, learns to write what fresh images show (each problem's observation sentence), as VLMs are trained to describe
images before instruction tuning. docs/findings.md has what it did for the demo.

    python -m scripts.pretrain_vision --model DIR [--out DIR] [--steps 600] [--batch-size 64]

Prints one JSON line: held-out slot accuracy per task family before and after, and the time taken.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from data.synthetic import SCENE_SLOTS, generate


class SceneReadout(nn.Module):
    """Reads the scene slots from an image's projected tokens: learned query per slot → multi-head attention over
    the tokens, whose keys carry a learned embedding of the token's index (as the language model sees its position)
    → LayerNorm → one linear classifier per slot."""

    def __init__(self, dim: int, slots: dict[str, int] = SCENE_SLOTS, heads: int = 4, max_tokens: int = 1024):
        super().__init__()
        self.names = list(slots)
        self.queries = nn.Parameter(torch.randn(len(slots), dim) * dim**-0.5)
        self.positions = nn.Parameter(torch.randn(max_tokens, dim) * dim**-0.5)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.classifiers = nn.ModuleList(nn.Linear(dim, n) for n in slots.values())

    def forward(self, tokens: torch.Tensor, padding: torch.Tensor) -> list[torch.Tensor]:
        """tokens `[B, T, D]`, padding `[B, T]` (True where there is no token) → one `[B, classes]` per slot."""
        queries = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        keys = tokens + self.positions[: tokens.shape[1]]
        pooled, _ = self.attention(queries, keys, tokens, key_padding_mask=padding, need_weights=False)
        pooled = self.norm(pooled)
        return [classifier(pooled[:, i]) for i, classifier in enumerate(self.classifiers)]


def vision_parameters(model) -> list[nn.Parameter]:
    """The encoder's and projector's weights, without the projector's grid of position embeddings
    (`projector_position_embeddings`). The grid is a code for "which token is where" meant for the language model:
    vision pretraining leaves it as initialised (the readout brings its own position keys), the image-description
    stage trains it together with the language model (docs/findings.md)."""
    projector = model.model.multi_modal_projector
    grid = projector.position_embedding.weight if projector.position_embedding is not None else None
    return [p for p in [*model.model.vision_tower.parameters(), *projector.parameters()] if p is not grid]


def image_tokens(model, image_processor, images) -> tuple[torch.Tensor, torch.Tensor]:
    """The projected tokens of each image, padded: `[B, T, D]` and the padding mask `[B, T]`."""
    inputs = image_processor(images=images, return_tensors="pt")
    per_image = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
    tokens = nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)
    lengths = torch.tensor([len(t) for t in per_image])
    return tokens, torch.arange(tokens.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)


def targets(examples, names: list[str]) -> torch.Tensor:
    """`[B, slots]` class labels, -100 where an example's scene has no such slot (other task families)."""
    return torch.tensor([[example.scene.get(name, -100) for name in names] for example in examples])


def readout_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the (example, slot) pairs that have a label."""
    total = sum(F.cross_entropy(out, labels[:, i], ignore_index=-100, reduction="sum") for i, out in enumerate(logits))
    return total / (labels != -100).sum().clamp(min=1)


def warmup_cosine(optimizer, steps: int):
    """Linear warm-up over the first 5% of `steps`, then a cosine decay to 0 at `steps`."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )


@torch.no_grad()
def slot_accuracy(model, image_processor, head: SceneReadout, examples, batch_size: int = 128) -> dict[str, float]:
    """Share of labelled slots read correctly, per task family (empty cells and absent digits/bars included)."""
    hits, counts = defaultdict(int), defaultdict(int)
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        labels = targets(batch, head.names)
        predicted = torch.stack(
            [out.argmax(-1) for out in head(*image_tokens(model, image_processor, [e.images[0] for e in batch]))], 1
        )
        for example, row_labels, row_predicted in zip(batch, labels, predicted):
            present = row_labels != -100
            hits[example.task] += int((row_labels[present] == row_predicted[present]).sum())
            counts[example.task] += int(present.sum())
    return {task: round(hits[task] / counts[task], 3) for task in sorted(counts)}


def pretrain_vision(
    model,
    image_processor,
    *,
    steps: int = 600,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    difficulty_weights=None,
    image_size: int = 112,
    held_out: int = 500,
    tasks: list[str] | None = None,
) -> dict:
    """Train `model`'s vision tower and projector (in place) with a `SceneReadout` head on `steps` batches of
    freshly generated synthetic images; the language model is left as it is. Returns held-out slot accuracy per
    task family before and after (`slot_accuracy`), the final loss and the seconds taken."""
    start = time.time()
    torch.manual_seed(seed)
    dim = model.config.text_config.hidden_size
    head = SceneReadout(dim)
    vision = vision_parameters(model)
    was_training = model.training
    model.train()
    test = generate(held_out, seed + 999_983, image_size=image_size, difficulty_weights=difficulty_weights)
    before = slot_accuracy(model, image_processor, head, test)
    optimizer = torch.optim.AdamW([*vision, *head.parameters()], lr=learning_rate, weight_decay=0.0)
    schedule = warmup_cosine(optimizer, steps)
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(steps), desc="vision pretraining"):
        batch = generate(batch_size, seed, tasks, image_size, difficulty_weights, start=step * batch_size)
        logits = head(*image_tokens(model, image_processor, [e.images[0] for e in batch]))
        loss = readout_loss(logits, targets(batch, head.names))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vision + list(head.parameters()), 1.0)
        optimizer.step()
        schedule.step()
    model.zero_grad(set_to_none=True)  # the position grid, outside the optimizer, collected gradients too
    model.train(was_training)
    return {
        "slot_accuracy_before": before,
        "slot_accuracy_after": slot_accuracy(model, image_processor, head, test),
        "final_loss": round(loss.item(), 4),
        "seconds": round(time.time() - start, 1),
    }


def align_language_model(
    model,
    processor,
    *,
    steps: int = 400,
    batch_size: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
    difficulty_weights=None,
    image_size: int = 112,
    held_out: int = 200,
    tasks: list[str] | None = None,
    text_batch_size: int = 0,
) -> dict:
    """Train `model`'s language model (in place; the vision side stays fixed) to say what freshly generated images
    show: the observation sentence of each problem (`generate(form="observe")`, e.g. "... two large black digits on
    a white background: 3 and 9."), assistant tokens only. This is the image-description stage of VLM training:
    reading the image tokens is learned from short, focused examples before long-CoT SFT, where it is two tokens
    among a hundred. With `text_batch_size`, every batch also holds that many text-only problems with their worked
    computation (`generate(form="text")`: sums, differences, look-ups), standing in for the arithmetic a pretrained
    language model brings. Returns the held-out share of observations read exactly (every token right,
    teacher-forced) per task family before and after, the final loss and the seconds taken."""
    from trainers.sft import ChatSFTDataset, MultimodalCollator

    start = time.time()
    torch.manual_seed(seed)
    vision = vision_parameters(model)  # fixed here; the projector's position grid trains with the language model
    fixed = set(map(id, vision))
    trained = [p for p in model.parameters() if id(p) not in fixed]
    frozen = [p.requires_grad for p in vision]
    # Padded rows: the observations are of similar lengths, and one attention call per batch beats packing here.
    collate = MultimodalCollator(processor.tokenizer.pad_token_id, max_length=2048, packing=False)

    def batch(examples):
        dataset = ChatSFTDataset(examples, processor, max_length=2048, with_answer=False)
        return collate([dataset[i] for i in range(len(dataset))])

    options = dict(tasks=tasks, image_size=image_size, difficulty_weights=difficulty_weights, form="observe")
    texts = {**options, "form": "text"}
    test = generate(held_out, seed + 999_979, **options)
    before = observation_accuracy(model, processor, test)
    was_training = model.training
    try:
        for p in vision:
            p.requires_grad_(False)
        model.train()
        optimizer = torch.optim.AdamW(trained, lr=learning_rate, weight_decay=0.0)
        schedule = warmup_cosine(optimizer, steps)
        loss = torch.tensor(float("nan"))
        for step in tqdm(range(steps), desc="image description"):
            examples = generate(batch_size, seed, start=step * batch_size, **options)
            if text_batch_size:
                examples += generate(text_batch_size, seed + 1, start=step * text_batch_size, **texts)
            loss = model(**batch(examples), logits_for_labels_only=True).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            schedule.step()
    finally:
        for p, flag in zip(vision, frozen):
            p.requires_grad_(flag)
        model.train(was_training)
    return {
        "observations_exact_before": before,
        "observations_exact_after": observation_accuracy(model, processor, test),
        "final_loss": round(loss.item(), 4),
        "seconds": round(time.time() - start, 1),
    }


@torch.no_grad()
def observation_accuracy(model, processor, examples, batch_size: int = 64) -> dict[str, float]:
    """Per task family, the share of `examples` (observe form) whose every assistant token is the model's argmax,
    teacher-forced: the observation read exactly."""
    from trainers.sft import ChatSFTDataset, MultimodalCollator

    dataset = ChatSFTDataset(examples, processor, max_length=2048, with_answer=False)
    if len(dataset) != len(examples):
        raise ValueError(
            f"{dataset.skipped} of the {len(examples)} examples could not be tokenized: {dataset.skip_reasons}"
        )
    collate = MultimodalCollator(processor.tokenizer.pad_token_id, max_length=2048, packing=False)
    was_training = model.training
    model.eval()
    hits, counts = defaultdict(int), defaultdict(int)
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch["labels"][:, 1:]
        wrong = ((model(**batch).logits[:, :-1].argmax(-1) != labels) & (labels != -100)).any(1)
        for example, miss in zip(examples[start : start + batch_size], wrong.tolist()):
            counts[example.task] += 1
            hits[example.task] += not miss
    model.train(was_training)
    return {task: round(hits[task] / counts[task], 3) for task in sorted(counts)}


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import kimi_mm  # noqa: F401  (Auto classes)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="kimi_mm checkpoint directory")
    parser.add_argument("--out", help="where to save the result (default: overwrite --model)")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--held-out", type=int, default=500, help="images to measure slot accuracy on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    result = pretrain_vision(
        model,
        processor.image_processor,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        held_out=args.held_out,
    )
    out = args.out or args.model
    model.save_pretrained(out)
    processor.save_pretrained(out)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
