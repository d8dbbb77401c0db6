"""scripts/merge.py: the weighted average of kimi_mm checkpoints, streamed from safetensors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from scripts.make_tiny import make_tiny
from scripts.merge import main, merge, tensor_files


def load_weights(checkpoint) -> dict[str, torch.Tensor]:
    weights = {}
    for file in set(tensor_files(checkpoint).values()):
        weights |= load_file(checkpoint / file)
    return weights


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    """A second tiny checkpoint: same architecture, other random weights, saved in three shards."""
    path = make_tiny(tmp_path_factory.mktemp("other") / "ckpt", seed=1)
    model = AutoModelForImageTextToText.from_pretrained(path)
    for file in path.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(path, max_shard_size="3MB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def test_weighted_merge_equals_the_hand_computed_average(tiny_dir, other_dir, tmp_path):
    out = merge([tiny_dir, other_dir], tmp_path / "merged", weights=[3, 1])
    a, b, merged = load_weights(tiny_dir), load_weights(other_dir), load_weights(out)
    assert merged.keys() == a.keys()
    for name, tensor in merged.items():
        assert tensor.dtype == a[name].dtype
        torch.testing.assert_close(tensor, 0.75 * a[name] + 0.25 * b[name], msg=name)
    assert not torch.equal(merged["lm_head.weight"], a["lm_head.weight"])
    # The first model is one file, so the merge is too; its processor and remote code come along.
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert (out / "modeling_kimi_mm.py").is_file() and (out / "chat_template.jinja").is_file()
    model = AutoModelForImageTextToText.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], merged["lm_head.weight"])
    assert AutoProcessor.from_pretrained(out).image_token == "<image>"


def test_sharded_first_model_gives_a_sharded_equal_average(tiny_dir, other_dir, tmp_path):
    out = merge([other_dir, tiny_dir, tiny_dir], tmp_path / "merged")  # default: equal weights
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == tensor_files(other_dir)
    a, b, merged = load_weights(tiny_dir), load_weights(other_dir), load_weights(out)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, (b[name] + 2 * a[name]) / 3, msg=name)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in merged.values())
    AutoModelForImageTextToText.from_pretrained(out)


def test_mismatched_models_are_refused_with_the_tensor_named(tiny_dir, tmp_path):
    reshaped = make_tiny(tmp_path / "reshaped", seed=2)
    weights = load_file(reshaped / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"][:-1].contiguous()
    save_file(weights, reshaped / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'lm_head.weight': shape \[\d+, \d+\] in .*reshaped"):
        merge([tiny_dir, reshaped], tmp_path / "out")

    qwen3 = make_tiny(tmp_path / "qwen3", seed=0, text_model_type="qwen3")  # adds q_norm / k_norm
    with pytest.raises(ValueError, match=r"qwen3: tensor names differ .*unexpected \['model.language_model"):
        merge([tiny_dir, qwen3], tmp_path / "out")

    llava = make_tiny(tmp_path / "other_arch", seed=0)
    config = json.loads((llava / "config.json").read_text())
    config["architectures"] = ["LlavaForConditionalGeneration"]
    (llava / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config architectures"):
        merge([tiny_dir, llava], tmp_path / "out")


def test_bad_arguments_are_refused(tiny_dir, other_dir, tmp_path):
    with pytest.raises(ValueError, match="at least two models"):
        merge([tiny_dir], tmp_path / "out")
    with pytest.raises(ValueError, match="2 weights for 3 models"):
        merge([tiny_dir, other_dir, tiny_dir], tmp_path / "out", weights=[1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        merge([tiny_dir, other_dir], tmp_path / "out", weights=[1.5, -0.5])
    with pytest.raises(ValueError, match="sum to 0"):
        merge([tiny_dir, other_dir], tmp_path / "out", weights=[0, 0])
    with pytest.raises(ValueError, match="is one of the models"):
        merge([tiny_dir, other_dir], tiny_dir)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        merge([tiny_dir, tmp_path], tmp_path / "out")


def test_cli(tiny_dir, other_dir, tmp_path, capsys):
    out = main(["--models", str(tiny_dir), str(other_dir), "--weights", "1", "1", "--out", str(tmp_path / "m")])
    assert (out / "model.safetensors").is_file()
    assert "merged 0.5 x" in capsys.readouterr().out
