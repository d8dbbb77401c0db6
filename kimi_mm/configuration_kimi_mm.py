"""Configuration of kimi_mm: a native-resolution vision encoder + projector + any HF causal LM."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


class KimiMMVisionConfig(PreTrainedConfig):
    r"""Vision encoder in the MoonViT spirit: patch embedding at native resolution, 2D rotary positions,
    optional learned absolute positions (a `num_position_embeddings` grid, bicubic-interpolated to each image).

    Layer names follow SigLIP so that SigLIP weights can initialise it (`scripts/compose.py`)."""

    model_type = "kimi_mm_vision"
    base_config_key = "vision_config"

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 14
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    # Side of the square grid of learned absolute position embeddings; 0 disables them.
    num_position_embeddings: int = 0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError("the vision head dim must be a multiple of 4 for the 2D rotary embedding")
        super().__post_init__(**kwargs)


class KimiMMConfig(PreTrainedConfig):
    r"""Composite config: `vision_config` (ours), `text_config` (any HF causal-LM config, e.g. qwen2, qwen3,
    llama), projector settings, the image placeholder token and the spatial merge size.

    Example:
    ```python
    >>> config = KimiMMConfig(text_config={"model_type": "qwen2", "hidden_size": 128}, image_token_id=5)
    ```"""

    model_type = "kimi_mm"
    sub_configs = {"text_config": AutoConfig, "vision_config": KimiMMVisionConfig}

    vision_config: dict | KimiMMVisionConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 151655
    # Side of the square of neighbouring patches merged into one LLM token (2 = 2x2 pixel shuffle).
    merge_size: int = 2
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    projector_layer_norm_eps: float = 1e-5
    # Side of a square grid of learned position embeddings added to the projected image tokens (interpolated to
    # each image's token grid); 0 disables it.
    projector_position_embeddings: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.vision_config is None:
            self.vision_config = KimiMMVisionConfig()
        elif isinstance(self.vision_config, dict):
            self.vision_config = KimiMMVisionConfig(**self.vision_config)

        if self.text_config is None:
            self.text_config = CONFIG_MAPPING["qwen2"]()
        elif isinstance(self.text_config, dict):
            text_config = dict(self.text_config)
            model_type = text_config.pop("model_type", "qwen2")
            if model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f"text_config model_type {model_type!r} is not a model type this transformers version knows; "
                    "use a causal LM config such as 'qwen2', 'qwen3' or 'llama'"
                )
            self.text_config = CONFIG_MAPPING[model_type](**text_config)

        if self.merge_size < 1:
            raise ValueError(f"merge_size must be >= 1, got {self.merge_size}")
        if self.projector_position_embeddings < 0:
            raise ValueError(f"projector_position_embeddings must be >= 0, got {self.projector_position_embeddings}")
        # Models whose checkpoints tie embeddings record it in their own config.
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        super().__post_init__(**kwargs)


__all__ = ["KimiMMConfig", "KimiMMVisionConfig"]
