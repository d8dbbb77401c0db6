"""scripts/compose.py: a kimi_mm checkpoint from a tiny random SigLIP + a tiny random causal LM (no network)."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import kimi_mm  # noqa: F401  (registers the Auto classes)
from scripts.compose import compose, main
from scripts.make_tiny import ASSET, tiny_tokenizer

VISION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 56,
    "patch_size": 14,
}
IMAGE_MEAN, IMAGE_STD = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
ADDED = ["<|im_start|>", "<|im_end|>", "<image>", "<think>", "</think>"]


@pytest.fixture(scope="module")
def siglip_dirs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """A SiglipVisionModel checkpoint and a full SiglipModel one, each with its vision weights (no prefix)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("siglip")
    vision_only = SiglipVisionModel(SiglipVisionConfig(**VISION))
    full = SiglipModel(
        SiglipConfig(
            vision_config=VISION,
            text_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 100,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "pad_token_id": 0,
            },
        )
    )
    dirs = {}
    for name, model in (("siglip_vision_model", vision_only), ("siglip", full)):
        model.save_pretrained(root / name)
        SiglipImageProcessorPil(image_mean=IMAGE_MEAN, image_std=IMAGE_STD).save_pretrained(root / name)
        state = {
            k.removeprefix("vision_model."): v.clone()
            for k, v in model.state_dict().items()
            if not k.startswith(("text_model.", "logit_"))
        }
        dirs[name] = (root / name, state)
    return dirs


def bare_tokenizer() -> PreTrainedTokenizerFast:
    """The bundled BPE with ChatML, `<image>` and the thinking tags renamed away: compose must add them all."""
    data = json.loads(ASSET.read_text())
    for i, token in enumerate(data["added_tokens"][1:], 1):
        data["model"]["vocab"][f"<|reserved_{i}|>"] = data["model"]["vocab"].pop(token["content"])
        token["content"] = f"<|reserved_{i}|>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<|endoftext|>"
    )
    assert not set(ADDED) & set(tokenizer.get_vocab())
    return tokenizer


def make_llm(path: Path, model_type: str, tokenizer, vocab_size: int, tie: bool):
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[model_type]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    llm = AutoModelForCausalLM.from_config(config).eval()
    llm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return llm


# qwen2: tied embeddings, every token already present, a padded vocabulary (no resize), a SiglipVisionModel;
# llama: untied, ChatML/<image>/thinking tokens missing (embeddings grow), a full SiglipModel, run through the CLI.
CASES = {
    "qwen2": {"tie": True, "tokenizer": tiny_tokenizer, "pad_vocab": 16, "vision": "siglip_vision_model", "cli": False},
    "llama": {"tie": False, "tokenizer": bare_tokenizer, "pad_vocab": 0, "vision": "siglip", "cli": True},
}


@pytest.mark.parametrize("model_type", list(CASES))
def test_compose(tmp_path, siglip_dirs, model_type):
    case = CASES[model_type]
    vision_dir, siglip_state = siglip_dirs[case["vision"]]
    original_tokenizer = case["tokenizer"]()
    vocab = len(original_tokenizer) + case["pad_vocab"]
    llm = make_llm(tmp_path / "llm", model_type, original_tokenizer, vocab, case["tie"])
    out = tmp_path / "composed"
    if case["cli"]:
        main(["--vision", str(vision_dir), "--llm", str(tmp_path / "llm"), "--out", str(out), "--seed", "3"])
    else:
        assert compose(str(vision_dir), str(tmp_path / "llm"), out, seed=3) == out

    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    assert type(model).__name__ == "KimiMMForConditionalGeneration"
    weight_files = {p.name for p in out.iterdir() if p.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt"}}
    assert weight_files and all(name.endswith(".safetensors") for name in weight_files)

    # 1. the vision tower holds the SigLIP weights under the mapping; the patch Linear equals the conv on our patches
    tower = model.model.vision_tower
    assert tower.config.num_position_embeddings == VISION["image_size"] // VISION["patch_size"]
    expected = {}
    for key, value in siglip_state.items():
        if key.startswith("head.") or key == "embeddings.position_ids":
            continue
        if key == "embeddings.patch_embedding.weight":
            value = value.reshape(value.shape[0], -1)
        expected[key.removeprefix("embeddings.").removeprefix("encoder.")] = value
    actual = tower.state_dict()
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    image = torch.randn(1, 3, 28, 28)
    conv = torch.nn.Conv2d(3, 64, 14, stride=14)
    conv.load_state_dict(
        {
            k.removeprefix("embeddings.patch_embedding."): v
            for k, v in siglip_state.items()
            if k.startswith("embeddings.patch_embedding.")
        }
    )
    patches = image[0].reshape(3, 2, 14, 2, 14).permute(1, 3, 0, 2, 4).reshape(4, -1)  # the processor's layout
    with torch.no_grad():
        torch.testing.assert_close(tower.patch_embedding(patches), conv(image).flatten(2)[0].T)

    # 2. text-only logits equal the LLM's on its vocabulary; the tokens and embeddings are as expected
    assert all(token in tokenizer.get_vocab() for token in ADDED)
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == processor.image_token_id
    assert "<image>" in tokenizer.all_special_tokens
    assert model.config.tie_word_embeddings == case["tie"]
    assert model.config.text_config.vocab_size == max(vocab, len(tokenizer))
    input_ids = torch.randint(0, len(original_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = llm(input_ids).logits
        logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits[..., :vocab], expected_logits, atol=1e-5, rtol=0)
    if case["pad_vocab"] == 0:  # grown: the new rows are the mean of the LLM's rows
        new_rows = model.get_input_embeddings().weight[vocab:]
        assert new_rows.shape[0] == len(ADDED)
        torch.testing.assert_close(new_rows, llm.get_input_embeddings().weight.mean(0).expand_as(new_rows))

    # 3. generation config, processor settings, and a generation with an image
    eos = model.generation_config.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    assert original_tokenizer.eos_token_id in eos and tokenizer.pad_token is not None
    assert tokenizer.padding_side == "left"
    assert processor.image_processor.patch_size == VISION["patch_size"] and processor.image_processor.merge_size == 2
    assert processor.image_processor.image_mean == IMAGE_MEAN and processor.image_processor.image_std == IMAGE_STD
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.new("RGB", (84, 56), "red")], text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == (84 // 14) * (56 // 14) // 4
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_compose_rejects_wrong_model_types(tmp_path, siglip_dirs):
    tokenizer = tiny_tokenizer()
    make_llm(tmp_path / "llm", "qwen2", tokenizer, len(tokenizer), tie=False)
    vision_dir = siglip_dirs["siglip_vision_model"][0]
    with pytest.raises(ValueError, match="'qwen2'"):
        compose(str(tmp_path / "llm"), str(tmp_path / "llm"), tmp_path / "out")
    with pytest.raises(ValueError, match="'siglip_vision_model'.*not a causal LM"):
        compose(str(vision_dir), str(vision_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()
