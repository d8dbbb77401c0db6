import json

import pytest
import torch
from transformers import AutoModel, AutoModelForImageTextToText

from kimi_mm import KimiMMConfig, KimiMMForConditionalGeneration, KimiMMModel
from kimi_mm.modeling_kimi_mm import pixel_shuffle
from scripts.make_tiny import tiny_config, tiny_tokenizer

from .conftest import shapes_image

SIZES = [(56, 56), (140, 84), (84, 196)]  # (width, height): grids 4x4, 6x10, 14x6


def prompt_inputs(processor, images, text="Describe"):
    placeholders = "".join("<image>" for _ in images)
    return processor(
        images=images or None, text=f"<|im_start|>user\n{placeholders}{text}<|im_end|>\n", return_tensors="pt"
    )


def test_packed_images_encode_like_each_alone(tiny_model, processor):
    images = [shapes_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    packed = processor.image_processor(images, return_tensors="pt")
    with torch.no_grad():
        together = tiny_model.get_image_features(packed["pixel_values"], packed["image_grid_thw"]).pooler_output
        for image, feats in zip(images, together):
            alone = processor.image_processor([image], return_tensors="pt")
            single = tiny_model.get_image_features(alone["pixel_values"], alone["image_grid_thw"]).pooler_output
            assert len(single) == 1 and single[0].shape == feats.shape
            torch.testing.assert_close(feats, single[0], atol=1e-5, rtol=1e-5)


def test_batched_prompts_give_the_logits_of_each_prompt_alone(tiny_model, processor):
    texts, images = [], []
    for i, (w, h) in enumerate(SIZES):
        texts.append(f"<|im_start|>user\n<image>What is shown {'?' * i}<|im_end|>\n")
        images.append([shapes_image(w, h, seed=i)])
    batch = processor(images=images, text=texts, padding=True, return_tensors="pt")  # left padding
    with torch.no_grad():
        logits = tiny_model(**batch).logits
        for i in range(len(texts)):
            alone = processor(images=images[i], text=texts[i], return_tensors="pt")
            expected = tiny_model(**alone).logits[0]
            n = expected.shape[0]
            torch.testing.assert_close(logits[i, -n:], expected, atol=1e-4, rtol=1e-4)


def test_attention_implementations_agree(tiny_dir, processor):
    images = [shapes_image(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    inputs = prompt_inputs(processor, images)
    outputs = {}
    for impl in ("eager", "sdpa"):
        model = AutoModelForImageTextToText.from_pretrained(tiny_dir, attn_implementation=impl).eval()
        assert model.config.vision_config._attn_implementation == impl
        with torch.no_grad():
            outputs[impl] = model(**inputs).logits
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], atol=1e-4, rtol=1e-4)


def test_images_change_the_output_and_text_only_works(tiny_model, processor):
    with torch.no_grad():
        text_only = tiny_model(**prompt_inputs(processor, [])).logits
        a = tiny_model(**prompt_inputs(processor, [shapes_image(56, 56, seed=1)])).logits
        b = tiny_model(**prompt_inputs(processor, [shapes_image(56, 56, seed=2)])).logits
    assert text_only.shape[1] > 0
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_generate_with_several_images(tiny_model, processor):
    inputs = prompt_inputs(processor, [shapes_image(56, 56), shapes_image(84, 140)])
    out = tiny_model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 5) or out.shape[1] <= inputs["input_ids"].shape[1] + 5
    # Greedy decoding with the KV cache equals a full forward over the generated sequence.
    new = out[0, inputs["input_ids"].shape[1] :]
    with torch.no_grad():
        full = tiny_model(
            input_ids=out[:, :-1], pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]
        ).logits
    start = inputs["input_ids"].shape[1] - 1
    assert full[0, start : start + len(new)].argmax(-1).tolist() == new.tolist()


def test_mismatched_image_tokens_raise(tiny_model, processor):
    inputs = prompt_inputs(processor, [shapes_image(56, 56)])
    ids = inputs["input_ids"].clone()
    first = (ids[0] == processor.image_token_id).nonzero()[0].item()
    ids[0, first] = 0  # drop one image token
    with pytest.raises(ValueError, match="3 image tokens but the images produce 4 features"):
        tiny_model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="describes"):
        tiny_model.get_image_features(inputs["pixel_values"][:-1], inputs["image_grid_thw"])


def test_save_load_identical_logits_and_safetensors_only(tiny_model, processor, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    weights = sorted(p.name for p in tmp_path.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth"})
    assert weights == ["model.safetensors"]
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    inputs = prompt_inputs(processor, [shapes_image(84, 56)])
    with torch.no_grad():
        assert torch.equal(tiny_model(**inputs).logits, loaded(**inputs).logits)


def test_sharded_save_loads_back(tiny_model, processor, tmp_path):
    tiny_model.save_pretrained(tmp_path, max_shard_size="2MB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert not list(tmp_path.glob("*.bin"))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    inputs = prompt_inputs(processor, [shapes_image(56, 84)])
    with torch.no_grad():
        assert torch.equal(tiny_model(**inputs).logits, loaded(**inputs).logits)


def test_base_model_loads_through_automodel(tiny_dir, tiny_model, processor):
    base = AutoModel.from_pretrained(tiny_dir).eval()
    assert isinstance(base, KimiMMModel)
    inputs = prompt_inputs(processor, [shapes_image(56, 56)])
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
        torch.testing.assert_close(tiny_model.lm_head(hidden), tiny_model(**inputs).logits)


@pytest.mark.parametrize("text_model_type", ["qwen3", "llama"])
def test_other_language_models(text_model_type, processor):
    config = tiny_config(tiny_tokenizer(), text_model_type)
    model = KimiMMForConditionalGeneration(config).eval()
    assert type(model.model.language_model).__name__.lower().startswith(text_model_type)
    inputs = prompt_inputs(processor, [shapes_image(56, 84)])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], config.text_config.vocab_size)


def test_training_step_reaches_every_part(processor):
    model = KimiMMForConditionalGeneration(tiny_config(tiny_tokenizer())).train()
    inputs = prompt_inputs(processor, [shapes_image(56, 84)])
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    for name in (
        "model.vision_tower.layers.0.self_attn.q_proj.weight",
        "model.vision_tower.position_embedding.weight",
        "model.multi_modal_projector.linear_1.weight",
        "model.language_model.layers.0.mlp.up_proj.weight",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_pixel_shuffle_merges_2x2_neighbours():
    # One 2x4 grid with feature = patch index: merged token 1 holds patches (0,2), (0,3), (1,2), (1,3).
    features = torch.arange(8.0).unsqueeze(-1)
    merged = pixel_shuffle(features, torch.tensor([[1, 2, 4]]), 2)
    assert merged.tolist() == [[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]


def test_tied_embeddings(processor, tmp_path):
    config = tiny_config(tiny_tokenizer())
    config = KimiMMConfig(**{**config.to_dict(), "tie_word_embeddings": True})
    model = KimiMMForConditionalGeneration(config)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = KimiMMForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)


def test_2d_rotary_positions_follow_rows_then_columns():
    from kimi_mm.modeling_kimi_mm import vision_rotary_embedding

    head_dim, theta = 16, 10000.0
    cos, _ = vision_rotary_embedding(torch.tensor([[1, 2, 3], [1, 2, 2]]), head_dim, theta, torch.device("cpu"))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2))
    positions = [(r, c) for r in range(2) for c in range(3)] + [(r, c) for r in range(2) for c in range(2)]
    assert cos.shape == (len(positions), head_dim)
    for i, (row, col) in enumerate(positions):
        expected = torch.cat([torch.cos(row * inv_freq), torch.cos(col * inv_freq)])
        torch.testing.assert_close(cos[i, : head_dim // 2], expected)
        torch.testing.assert_close(cos[i, head_dim // 2 :], expected)  # rotate_half pairs i with i + head_dim/2


def test_absolute_position_grid_is_used_as_is_at_its_native_size(tiny_model):
    tower = tiny_model.model.vision_tower
    n = tower.config.num_position_embeddings
    native = tower.absolute_position_embeddings(torch.tensor([[1, n, n]]))
    torch.testing.assert_close(native, tower.position_embedding.weight)
    resized = tower.absolute_position_embeddings(torch.tensor([[1, 4, 6]]))
    assert resized.shape == (24, tower.config.hidden_size)


def test_projector_position_grid_tells_identical_tokens_apart(tiny_model):
    """The projector's grid (`projector_position_embeddings`) is added per token: identical patch features give
    tokens that differ by exactly the grid at its native size, and still differ when it is interpolated."""
    projector = tiny_model.model.multi_modal_projector
    n, m = tiny_model.config.projector_position_embeddings, tiny_model.config.merge_size
    grid = projector.position_embedding.weight
    assert n > 0 and grid.shape == (n * n, tiny_model.config.text_config.hidden_size)
    features = torch.zeros((n * m) ** 2, tiny_model.config.vision_config.hidden_size)
    with torch.no_grad():
        native = projector(features, torch.tensor([[1, n * m, n * m]]))
        torch.testing.assert_close(native - native[0], grid - grid[0])
        resized = projector(features[: 2 * m * 3 * m], torch.tensor([[1, 2 * m, 3 * m]]))
    assert resized.shape == (6, grid.shape[1])
    assert all(not torch.allclose(resized[i], resized[j]) for i in range(6) for j in range(i))
