import os
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText, TrainerCallback

from data.records import Example
from data.synthetic import generate, write_dataset
from trainers.sft import (
    IGNORE_INDEX,
    PACKED_ATTENTION,
    ChatSFTDataset,
    MultimodalCollator,
    SFTConfig,
    SFTTrainer,
    packed_attention,
)

from .conftest import ROOT, shapes_image


@pytest.fixture(scope="module")
def examples():
    return generate(8, seed=0)


@pytest.fixture(scope="module")
def dataset(examples, processor):
    return ChatSFTDataset(examples, processor, max_length=2048)


class AttentionKernels(TrainerCallback):
    """Records the language model's attention kernel at every training step."""

    def __init__(self):
        self.seen = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.add(model.config.get_text_config()._attn_implementation)


def test_labels_cover_only_the_assistant_turn(processor):
    example = Example(
        problem="How many red circles?",
        answer="3",
        images=[shapes_image(56, 56)],
        reasoning="I count one, two, three. Let me check: three.",
    )
    item = ChatSFTDataset([example], processor, 2048)[0]
    trained = item["input_ids"][item["labels"] != IGNORE_INDEX]
    assert processor.decode(trained) == (
        "<think>\nI count one, two, three. Let me check: three.\n</think>\n\n\\boxed{3}<|im_end|>"
    )
    assert (item["labels"][item["input_ids"] == processor.image_token_id] == IGNORE_INDEX).all()


def test_too_long_and_undecodable_examples_are_skipped_and_counted(processor, examples, tmp_path):
    dataset = ChatSFTDataset(examples[:3], processor, max_length=40)
    assert len(dataset) == 0 and dataset.skip_reasons == {"too long": 3}
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = Example(problem="How many?", answer="1", images=[str(broken)], id="bad-1")
    dataset = ChatSFTDataset([bad, examples[0]], processor, max_length=2048)
    assert len(dataset) == 1 and dataset.skip_reasons == {"bad image": 1} and dataset.skipped == 1


def test_packing_fills_rows_without_padding(dataset, processor):
    items = [dataset[i] for i in range(4)]
    total = sum(len(item["input_ids"]) for item in items)
    packed = MultimodalCollator(processor.tokenizer.pad_token_id, max_length=total, packing=True)(items)
    assert packed["input_ids"].shape == (1, total)
    assert "attention_mask" not in packed
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 4  # one segment per example
    narrow = MultimodalCollator(processor.tokenizer.pad_token_id, max_length=total // 2 + 40, packing=True)(items)
    assert 1 < narrow["input_ids"].shape[0] < 4
    assert narrow["pixel_values"].shape == packed["pixel_values"].shape


def test_packed_and_padded_batches_give_the_same_loss_and_logits(dataset, processor, tiny_model):
    items = [dataset[i] for i in range(4)]
    pad = processor.tokenizer.pad_token_id
    packed = MultimodalCollator(pad, max_length=4096, packing=True)(items)
    padded = MultimodalCollator(pad, max_length=4096, packing=False)(items)
    with torch.no_grad():
        packed_out = tiny_model(**packed)
        padded_out = tiny_model(**padded)
    torch.testing.assert_close(packed_out.loss, padded_out.loss, atol=1e-5, rtol=1e-5)
    # Example by example: the packed row's logits equal those of the padded row (no cross-example attention).
    order = sorted(range(4), key=lambda i: -len(items[i]["input_ids"]))  # the collator's first-fit order
    start = 0
    for i in order:
        n = len(items[i]["input_ids"])
        torch.testing.assert_close(
            packed_out.logits[0, start : start + n], padded_out.logits[i, :n], atol=1e-4, rtol=1e-4
        )
        start += n


def test_logits_for_labels_only_gives_the_same_loss_and_gradients(dataset, processor, tiny_model):
    """The SFT trainer's loss path runs the LM head on labelled positions only; loss and gradients must not change."""
    batch = MultimodalCollator(processor.tokenizer.pad_token_id, max_length=4096, packing=False)(
        [dataset[i] for i in range(3)]
    )
    results = []
    for flag in (False, True):
        tiny_model.zero_grad()
        out = tiny_model(**batch, logits_for_labels_only=flag)
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]))
        assert (out.logits is None) == flag
    tiny_model.zero_grad()
    (full, full_grads), (only, only_grads) = results
    torch.testing.assert_close(only, full, atol=1e-6, rtol=1e-6)
    assert len(full_grads) == len(only_grads) > 0
    for a, b in zip(full_grads, only_grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    # The Trainer's count of label tokens across accumulation steps divides the summed loss, as the default does.
    count = torch.tensor(1000)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_model(**batch, logits_for_labels_only=True, num_items_in_batch=count).loss,
            tiny_model(**batch, num_items_in_batch=count).loss,
        )
    with pytest.raises(ValueError, match="needs labels"):
        tiny_model(input_ids=batch["input_ids"], logits_for_labels_only=True)


def test_short_sft_run_lowers_the_loss(tiny_dir, processor, dataset, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=25,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        logging_steps=1,
        save_strategy="no",
        warmup_steps=0,
        lr_scheduler_type="constant",
        use_cpu=True,
        seed=0,
    )
    kernels = AttentionKernels()
    trainer = SFTTrainer(model=model, args=args, processing_class=processor, train_dataset=dataset, callbacks=[kernels])
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:3]) / 3
    # Packed rows train with attention per example; the model's own kernel is back for generation afterwards.
    assert kernels.seen == {PACKED_ATTENTION}
    assert model.config.text_config._attn_implementation == "sdpa"
    out = trainer.save_final(tmp_path / "final")
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()


def test_lora_and_frozen_vision_tower(tiny_dir, processor, dataset, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        use_lora=True,
        lora_r=4,
        freeze_vision_tower=True,
        save_strategy="no",
        use_cpu=True,
    )
    kernels = AttentionKernels()
    trainer = SFTTrainer(model=model, args=args, processing_class=processor, train_dataset=dataset, callbacks=[kernels])
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "multi_modal_projector" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    trainer.train()
    assert kernels.seen == {PACKED_ATTENTION}  # through the PEFT wrapper too
    out = trainer.save_final(tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("use_lora", [False, True])
def test_frozen_vision_tower_and_projector_stay_put(tiny_dir, processor, dataset, tmp_path, use_lora):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    vision = {n: p.detach().clone() for n, p in model.named_parameters() if "vision_tower" in n or "projector" in n}
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        use_lora=use_lora,
        lora_r=4,
        freeze_vision_tower=True,
        freeze_projector=True,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = SFTTrainer(model=model, args=args, processing_class=processor, train_dataset=dataset)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and not any("vision_tower" in n or "projector" in n for n in trainable)
    trainer.train()
    trained = AutoModelForImageTextToText.from_pretrained(trainer.save_final(tmp_path / "final"))
    after = dict(trained.named_parameters())
    assert all(torch.equal(after[n], before) for n, before in vision.items())
    original = dict(AutoModelForImageTextToText.from_pretrained(tiny_dir).named_parameters())
    assert any(not torch.equal(after[n], original[n]) for n in after if "language_model" in n)  # the LLM did train


@pytest.mark.slow
def test_cli_with_yaml_and_two_processes(tiny_dir, tmp_path):
    data_dir = write_dataset(generate(8, seed=1), tmp_path / "data")
    config = {
        "model_name_or_path": str(tiny_dir),
        "train_data": str(data_dir),
        "output_dir": str(tmp_path / "out"),
        "max_steps": 2,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "use_cpu": True,
        "logging_steps": 1,
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(ROOT / "trainers" / "sft.py"),
            "--config",
            str(tmp_path / "sft.yaml"),
            "--learning_rate",
            "1e-4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "sft: 2 steps on 2 process(es)" in proc.stdout


def test_config_file_and_flag_overrides(tmp_path):
    from trainers.sft import parse_config

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"output_dir": "x", "learning_rate": 0.5, "packing": True}))
    config = parse_config(["--config", str(tmp_path / "c.yaml"), "--learning_rate", "0.25", "--packing", "false"])
    assert (config.output_dir, config.learning_rate, config.packing) == ("x", 0.25, False)


def test_per_example_attention_matches_the_masked_path(dataset, processor, tiny_dir):
    from trainers.sft import PACKED_ATTENTION

    items = [dataset[i] for i in range(4)]
    packed = MultimodalCollator(processor.tokenizer.pad_token_id, max_length=500, packing=True)(items)
    assert packed["input_ids"].shape[0] > 1  # several rows, each with several examples and a padding tail
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    reference = AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()
    model.model.language_model.set_attn_implementation(PACKED_ATTENTION)
    per_example = model(**packed)
    masked = reference(**packed)  # sdpa with the block-diagonal mask transformers derives
    torch.testing.assert_close(per_example.logits, masked.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(per_example.loss, masked.loss, atol=1e-5, rtol=1e-5)
    per_example.loss.backward()
    masked.loss.backward()  # and the same gradients, so training follows the same path
    compared = 0
    for (name, param), other in zip(model.named_parameters(), reference.parameters()):
        if param.grad is not None or other.grad is not None:
            torch.testing.assert_close(param.grad, other.grad, atol=1e-5, rtol=1e-4, msg=name)
            compared += name.startswith("model.language_model.layers.")
    assert compared > 0


def test_packed_attention_matches_the_block_mask_and_restores_the_kernel(tiny_model):
    """The per-example kernel gives the logits of transformers' block-diagonal mask for a packed row (the RL trainer
    runs its packed forwards under it too), and the model's own kernel comes back, after an error as well."""
    lengths = [5, 9, 3]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, tiny_model.config.text_config.vocab_size, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    with torch.no_grad():
        masked = tiny_model(input_ids=ids, position_ids=positions, use_cache=False).logits
        with packed_attention(tiny_model):
            assert tiny_model.config.text_config._attn_implementation == PACKED_ATTENTION
            packed = tiny_model(input_ids=ids, position_ids=positions, use_cache=False).logits
    torch.testing.assert_close(packed, masked, atol=1e-5, rtol=1e-5)
    # each example on its own gives the same logits: nothing leaks across the packed examples
    alone = tiny_model(input_ids=ids[:, 5:14], use_cache=False).logits
    torch.testing.assert_close(packed[:, 5:14], alone, atol=1e-5, rtol=1e-5)
    assert tiny_model.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), packed_attention(tiny_model):
        raise RuntimeError("boom")
    assert tiny_model.config.text_config._attn_implementation == "sdpa"
