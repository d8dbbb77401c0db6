import pytest
import torch
from transformers import AutoProcessor

from kimi_mm import KimiMMProcessor

from .conftest import shapes_image


def image_token_counts(processor, input_ids) -> list[int]:
    return [int((row == processor.image_token_id).sum()) for row in input_ids]


def test_each_placeholder_expands_to_its_image_token_count(processor):
    images = [shapes_image(56, 56), shapes_image(224, 112)]
    out = processor(images=images, text="<image> and <image> compared", return_tensors="pt")
    grids = out["image_grid_thw"].tolist()
    assert grids == [[1, 4, 4], [1, 8, 16]]  # (t, rows, cols): 112 px tall, 224 px wide
    assert image_token_counts(processor, out["input_ids"]) == [4 + 32]
    # The runs of image tokens sit where the placeholders were, in order.
    ids = out["input_ids"][0].tolist()
    first = ids.index(processor.image_token_id)
    assert ids[first : first + 4] == [processor.image_token_id] * 4
    assert ids[first + 4] != processor.image_token_id


def test_batch_with_padding_and_nested_images(processor):
    images = [[shapes_image(56, 56)], [shapes_image(84, 84), shapes_image(56, 112)]]
    out = processor(
        images=images,
        text=["<image> short", "<image><image> a longer second prompt"],
        padding=True,
        return_tensors="pt",
    )
    assert out["input_ids"].shape[0] == 2
    assert out["attention_mask"].shape == out["input_ids"].shape
    assert out["attention_mask"][0].sum() < out["attention_mask"][1].sum()  # first row is padded
    assert image_token_counts(processor, out["input_ids"]) == [4, 9 + 8]


def test_text_only_prompts_work(processor):
    out = processor(text="no images here", return_tensors="pt")
    assert "pixel_values" not in out
    assert image_token_counts(processor, out["input_ids"]) == [0]


@pytest.mark.parametrize("text,n_images", [("<image><image> two", 1), ("<image> one", 2), ("none", 1)])
def test_placeholder_image_mismatch_is_an_error(processor, text, n_images):
    with pytest.raises(ValueError, match=r"placeholder.*image\(s\) were given"):
        processor(images=[shapes_image(56, 56)] * n_images, text=text)


def test_per_sample_mismatch_names_the_sample(processor):
    with pytest.raises(ValueError, match="sample 1"):
        processor(images=[[shapes_image(56, 56)], []], text=["<image> a", "<image> b"])


def test_truncation_never_cuts_image_tokens(processor):
    text = "some words before the picture " * 3 + "<image>"
    with pytest.raises(ValueError, match="sample 0: truncation would cut image tokens"):
        processor(images=[shapes_image(224, 224)], text=text, truncation=True, max_length=30)
    ok = processor(images=[shapes_image(224, 224)], text=text, truncation=True, max_length=500, return_tensors="pt")
    assert image_token_counts(processor, ok["input_ids"]) == [64]


def test_chat_template_thinking_and_generation_prompt(processor):
    messages = [
        {"role": "system", "content": "Be careful."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count the circles."}]},
    ]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe careful.<|im_end|>\n"
        "<|im_start|>user\n<image>Count the circles.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    short = processor.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    assert short.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    answered = messages + [{"role": "assistant", "reasoning_content": "One, two, three.", "content": "\\boxed{3}"}]
    full = processor.apply_chat_template(answered)
    assert full.endswith("<|im_start|>assistant\n<think>\nOne, two, three.\n</think>\n\n\\boxed{3}<|im_end|>\n")
    assert full.startswith(prompt)  # the generation prompt is a prefix of the trained-on conversation


def test_think_tags_are_configurable(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir, think_start="<reason>", think_end="</reason>")
    prompt = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert prompt.endswith("assistant\n<reason>\n")


def test_apply_chat_template_tokenizes_images_and_masks_assistant(processor):
    image = shapes_image(84, 56)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "\\boxed{2}"},
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_tensors="pt", return_assistant_tokens_mask=True
    )
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert image_token_counts(processor, out["input_ids"]) == [6]
    mask = out["assistant_masks"][0].bool()
    assistant_text = processor.decode(out["input_ids"][0][mask])
    assert assistant_text == "<think>\n\n</think>\n\n\\boxed{2}<|im_end|>"


def test_num_multimodal_tokens_matches_processing(processor):
    sizes = [(56, 56), (300, 200), (17, 90), (1024, 768)]
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes)
    for (h, w), n_tokens, n_patches in zip(sizes, counts["num_image_tokens"], counts["num_image_patches"]):
        out = processor(images=[shapes_image(w, h)], text="<image>", return_tensors="pt")
        assert image_token_counts(processor, out["input_ids"]) == [n_tokens]
        assert out["pixel_values"].shape[0] == n_patches


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, KimiMMProcessor)
    assert loaded.image_token_id == processor.image_token_id
    a = processor(images=[shapes_image(60, 60)], text="<image> hi", return_tensors="pt")
    b = loaded(images=[shapes_image(60, 60)], text="<image> hi", return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_tokenizer_without_image_token_is_refused(processor):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=processor.tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="no '<img>' token"):
        KimiMMProcessor(image_processor=processor.image_processor, tokenizer=bare, image_token="<img>")
