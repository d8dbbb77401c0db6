import pytest
from transformers import AutoConfig

from kimi_mm import KimiMMConfig, KimiMMVisionConfig

TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 100,
}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_config_round_trips_through_config_json(tmp_path, model_type):
    config = KimiMMConfig(
        text_config={"model_type": model_type, **TEXT},
        vision_config={"hidden_size": 64, "num_attention_heads": 2, "num_position_embeddings": 4},
        image_token_id=7,
        merge_size=2,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, KimiMMConfig)
    assert loaded.text_config.model_type == model_type
    assert isinstance(loaded.vision_config, KimiMMVisionConfig)
    assert loaded.vision_config.num_position_embeddings == 4
    assert loaded.image_token_id == 7
    saved, reloaded = config.to_dict(), loaded.to_dict()
    for d in (saved, reloaded):
        d.pop("_name_or_path", None)
    assert reloaded == saved


def test_config_is_keyword_only():
    with pytest.raises(ValueError, match="keyword"):
        KimiMMConfig(None, None)


def test_unknown_text_model_type_is_named():
    with pytest.raises(ValueError, match="'not_a_model'"):
        KimiMMConfig(text_config={"model_type": "not_a_model"})


def test_vision_head_dim_must_suit_2d_rope():
    with pytest.raises(ValueError, match="multiple of 4"):
        KimiMMVisionConfig(hidden_size=36, num_attention_heads=2)


def test_tied_text_config_ties_the_composite():
    config = KimiMMConfig(text_config={"model_type": "qwen2", **TEXT, "tie_word_embeddings": True})
    assert config.tie_word_embeddings
