"""Processor for interleaved image + text chat: tokenizer + KimiMMImageProcessor.

The text holds one `image_token` per image; the processor expands each to exactly the number of tokens the
encoder produces for that image (`patch_rows * patch_cols / merge_size**2`). Engines that expand placeholders
themselves (vLLM) count the same number through `_get_num_multimodal_tokens`.
"""

from transformers.processing_utils import MultiModalData, ProcessingKwargs, ProcessorMixin

from .image_processing_kimi_mm import _flatten

# ChatML turns; an image content block becomes one placeholder; the assistant's reasoning sits in a thinking
# block (`reasoning_content`, or already inside `content`). The generation prompt opens the thinking block unless
# `enable_thinking=False`, which closes it empty (short-CoT mode).
CHAT_TEMPLATE = (
    "{%- set think_start = think_start | default('<think>') -%}"
    "{%- set think_end = think_end | default('</think>') -%}"
    "{%- set image_token = image_token | default('<image>') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = namespace(text='') -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}{%- set content.text = content.text + image_token -%}"
    "{%- elif block['type'] == 'text' -%}{%- set content.text = content.text + block['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = content.text -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}"
    "{%- if think_start not in content -%}"
    "{{- think_start + '\n' + (message.get('reasoning_content') or '') + '\n' + think_end + '\n\n' -}}"
    "{%- endif -%}"
    "{{- content + '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and not enable_thinking -%}"
    "{{- think_start + '\n\n' + think_end + '\n\n' -}}"
    "{%- else -%}{{- think_start + '\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


class KimiMMProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": False, "return_mm_token_type_ids": False}}


class KimiMMProcessor(ProcessorMixin):
    valid_processor_kwargs = KimiMMProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        image_token: str = "<image>",
        think_start: str = "<think>",
        think_end: str = "</think>",
        **kwargs,
    ):
        self.image_token = image_token
        self.think_start = think_start
        self.think_end = think_end
        token_id = tokenizer.convert_tokens_to_ids(image_token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {image_token!r} token; add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{image_token!r}]}})"
            )
        self.image_token_id = token_id
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    def __call__(self, images=None, text=None, **kwargs):
        """Tokenize `text` (a string or a batch), expanding each `image_token` to its image's token count.

        `images` is flat (in order of appearance across the batch) or one list per sample. Raises `ValueError`
        when placeholders and images do not pair up, or when truncation would cut an image's tokens."""
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            self._check_placeholders(texts, images)
        return super().__call__(images=images, text=text, **kwargs)

    def _check_placeholders(self, texts: list[str], images) -> None:
        counts = [t.count(self.image_token) for t in texts]
        nested = (
            isinstance(images, (list, tuple))
            and len(images) == len(texts)
            and len(texts) > 1
            and all(isinstance(x, (list, tuple)) for x in images)
        )
        if nested:
            for i, (count, sample_images) in enumerate(zip(counts, images)):
                if count != len(_flatten(sample_images)):
                    raise ValueError(
                        f"sample {i}: the text has {count} {self.image_token!r} placeholder(s) but "
                        f"{len(_flatten(sample_images))} image(s) were given; put one placeholder per image"
                    )
        elif sum(counts) != len(_flatten(images)):
            raise ValueError(
                f"the text has {sum(counts)} {self.image_token!r} placeholder(s) (per sample: {counts}) but "
                f"{len(_flatten(images))} image(s) were given; put one placeholder per image"
            )

    def _process_images(self, images, **kwargs):
        processed = self.image_processor(images, **kwargs)
        return processed, [self.replace_image_token(processed, i) for i in range(len(processed["image_grid_thw"]))]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        grid = image_inputs["image_grid_thw"][image_idx]
        return self.image_token * (int(grid[1]) * int(grid[2]) // self.image_processor.merge_size**2)

    def _check_special_mm_tokens(self, text: list[str], text_inputs, modalities: list[str]) -> None:
        for i, ids in enumerate(text_inputs["input_ids"]):
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            expected = text[i].count(self.image_token)
            if ids.count(self.image_token_id) != expected:
                raise ValueError(
                    f"sample {i}: truncation would cut image tokens ({expected} expected, "
                    f"{ids.count(self.image_token_id)} kept); raise max_length or drop the image, "
                    "image tokens are never cut silently"
                )

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs) -> MultiModalData:
        """Token and patch counts for images of the given `(height, width)` sizes, without processing them."""
        data = {}
        if image_sizes is not None:
            patches = [self.image_processor.get_number_of_image_patches(h, w, kwargs) for h, w in image_sizes]
            data["num_image_patches"] = patches
            data["num_image_tokens"] = [n // self.image_processor.merge_size**2 for n in patches]
        return MultiModalData(**data)

    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        kwargs.setdefault("think_start", self.think_start)
        kwargs.setdefault("think_end", self.think_end)
        kwargs.setdefault("image_token", self.image_token)
        return super().apply_chat_template(conversation, chat_template, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]


__all__ = ["KimiMMProcessor", "CHAT_TEMPLATE"]
