"""The demo pipeline end to end at toy sizes (the full run is `make demo`)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from scripts.demo import main


@pytest.mark.slow
@pytest.mark.vllm
def test_demo_pipeline_writes_report_plots_and_a_reloadable_checkpoint(tmp_path):
    args = ["--out", str(tmp_path), "--train", "24", "--test", "10", "--epochs", "1", "--vision-steps", "5"]
    args += ["--align-steps", "2", "--align-batch", "4", "--align-text-batch", "2"]  # the description stage, small
    summary = main(
        [*args, "--rl-iterations", "2", "--rl-problems", "8", "--rl-prompts", "4", "--long2short-iterations", "1"]
    )
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# kimi_mm demo report") and "| after RL |" in report and "## RL" in report
    assert [m["iteration"] for m in summary["rl_metrics"]] == [0, 1] and 0.0 <= summary["accuracy_rl"] <= 1.0
    for name in ("loss.png", "accuracy.png", "rl_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["weight_files"] == ["model.safetensors"]
    assert summary["train_examples"] == 24 and summary["test_examples"] == 10
    assert set(summary["per_task_sft"]) == {
        "bar_chart",
        "colour_choice",
        "count_shapes",
        "digit_arithmetic",
        "triangle_angle",
    }
    assert 0.0 <= summary["accuracy_sft"] <= 1.0 and summary["example_reply"]
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    sampling = summary["long2short_sampling"]  # shortest rejection sampling ran on the 8 RL problems
    assert sampling["problems"] == 8 and sampling["kept"] + sampling["no_correct"] == 8
    assert ("rejection SFT" in summary["stages"]) == (sampling["kept"] > 0)  # a toy model may get none right
    assert list(summary["stages"])[-1] == "long2short RL" and (tmp_path / "long2short_final").is_dir()
    assert "## long2short" in report and (tmp_path / "token_efficiency.png").read_bytes()[:4] == b"\x89PNG"
    assert set(summary["vision_pretraining"]["slot_accuracy_after"]) == set(summary["per_task_sft"])
    # the description stage's default families
    assert set(summary["image_description"]["observations_exact_after"]) == {"count_shapes", "bar_chart"}
    assert "trained to describe fresh images" in report
    # The (pretrained) vision encoder and projector stay fixed through SFT and RL (the demo's default); the LLM trains.
    base, final = (load_file(tmp_path / d / "model.safetensors") for d in ("base", "final"))
    vision = [k for k in base if "vision_tower" in k or "multi_modal_projector" in k]
    assert vision and all(torch.equal(base[k], final[k]) for k in vision)
    assert any(not torch.equal(base[k], final[k]) for k in base if "language_model" in k)
