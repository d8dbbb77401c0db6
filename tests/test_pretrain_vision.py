"""Vision pretraining on the synthetic scene annotations and image-description training of the language model
(scripts/pretrain_vision.py)."""

import shutil

import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from scripts.pretrain_vision import align_language_model, main, pretrain_vision, readout_loss


def test_readout_loss_counts_only_labelled_slots():
    torch.manual_seed(0)
    logits = [torch.randn(3, 5), torch.randn(3, 7)]
    labels = torch.tensor([[1, -100], [-100, 6], [4, 2]])
    expected = torch.stack(
        [
            torch.nn.functional.cross_entropy(logits[0][0:1], labels[0:1, 0]),
            torch.nn.functional.cross_entropy(logits[1][1:2], labels[1:2, 1]),
            torch.nn.functional.cross_entropy(logits[0][2:3], labels[2:3, 0]),
            torch.nn.functional.cross_entropy(logits[1][2:3], labels[2:3, 1]),
        ]
    ).mean()
    assert torch.allclose(readout_loss(logits, labels), expected)


def test_pretraining_teaches_the_vision_side_to_read_scenes_and_leaves_the_llm(tiny_dir, tmp_path):
    source = tmp_path / "base"
    shutil.copytree(tiny_dir, source)
    out = tmp_path / "pretrained"
    result = main(
        ["--model", str(source), "--out", str(out), "--steps", "60", "--batch-size", "32", "--held-out", "100"]
    )
    before, after = result["slot_accuracy_before"], result["slot_accuracy_after"]
    assert set(after) == {"bar_chart", "colour_choice", "count_shapes", "digit_arithmetic", "triangle_angle"}
    assert sum(after.values()) / 5 > sum(before.values()) / 5 + 0.2, result
    old, new = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    assert old.keys() == new.keys()
    for name in old:  # the projector's position grid is the language model's to learn (vision_parameters)
        same = torch.equal(old[name], new[name])
        assert same == (
            "language_model" in name
            or "lm_head" in name
            or name.endswith("multi_modal_projector.position_embedding.weight")
        ), name
    AutoModelForImageTextToText.from_pretrained(out)  # a complete checkpoint


def test_image_description_trains_the_llm_only_and_restores_the_model(tiny_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    result = align_language_model(model, processor, steps=40, batch_size=16, held_out=20, tasks=["digit_arithmetic"])
    assert set(result["observations_exact_after"]) == {"digit_arithmetic"}
    assert result["final_loss"] < 2.0, result  # from ~ln(vocab) = 8: the sentence template is learned
    for name, p in model.named_parameters():
        vision = "vision_tower" in name or "multi_modal_projector" in name
        grid = name == "model.multi_modal_projector.position_embedding.weight"  # trained with the language model
        assert torch.equal(p, before[name]) == (vision and not grid), name
        assert p.requires_grad == flags[name], name


def test_pretraining_leaves_no_gradients_behind(tiny_dir):
    """The projector's position grid is outside the optimizer but in the graph: its gradients must not linger into
    the next stage."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    pretrain_vision(model, processor.image_processor, steps=2, batch_size=4, held_out=10)
    assert [name for name, p in model.named_parameters() if p.grad is not None] == []
