"""kimi_mm: a native-resolution vision encoder, a pixel-shuffle projector and any HF causal LM.

Image tensors use the flattened-patch layout that vLLM's Transformers backend splits per image:
`pixel_values` is `[total_patches, channels * patch_size**2]` for every image of a batch (each image's patches
in row-major order), and `image_grid_thw` is `[num_images, 3]` holding `(1, patch_rows, patch_cols)`.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_kimi_mm import KimiMMConfig, KimiMMVisionConfig


@dataclass
class KimiMMModelOutputWithPast(BaseModelOutputWithPast):
    """`image_hidden_states`: `[num_image_tokens, text_hidden]` projected features of all images, if any."""

    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class KimiMMCausalLMOutputWithPast(ModelOutput):
    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor] | None = None
    attentions: tuple[torch.FloatTensor] | None = None
    image_hidden_states: torch.FloatTensor | None = None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def vision_rotary_embedding(
    grid_thw: torch.Tensor, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """2D RoPE tables `(cos, sin)`, each `[total_patches, head_dim]`: the first half of the rotated frequencies
    follows the patch row, the second half the patch column."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, device=device, dtype=torch.float) / (head_dim // 2))
    positions = []
    for _, h, w in grid_thw.tolist():
        rows = torch.arange(h, device=device).repeat_interleave(w)
        cols = torch.arange(w, device=device).repeat(h)
        positions.append(torch.stack([rows, cols], dim=-1))
    pos = torch.cat(positions).float()  # [N, 2]
    freqs = torch.cat([torch.outer(pos[:, 0], inv_freq), torch.outer(pos[:, 1], inv_freq)], dim=-1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class KimiMMVisionAttention(nn.Module):
    """Bidirectional attention over the packed patches of all images, confined to each image."""

    def __init__(self, config: KimiMMVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        **kwargs,
    ) -> torch.Tensor:
        seq_len = hidden_states.shape[0]
        shape = (seq_len, self.num_heads, self.head_dim)
        cos, sin = (t.unsqueeze(1).to(hidden_states.dtype) for t in position_embeddings)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        value = self.v_proj(hidden_states).view(shape)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        # [1, heads, N, head_dim]
        query, key, value = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.config.attention_dropout if self.training else 0.0
        if "flash" in (self.config._attn_implementation or ""):
            # Varlen kernels take the image boundaries directly.
            max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            attn_output, _ = attention_interface(
                self,
                query,
                key,
                value,
                attention_mask=None,
                scaling=self.scaling,
                dropout=dropout,
                cu_seq_lens_q=cu_seqlens,
                cu_seq_lens_k=cu_seqlens,
                max_length_q=max_len,
                max_length_k=max_len,
                is_causal=False,
                **kwargs,
            )
        else:
            # No cross-image attention and no [N, N] mask: one batched call per run of same-sized images.
            outputs = []
            for start, count, length in _same_length_runs(cu_seqlens):
                q, k, v = (
                    t[0, :, start : start + count * length].unflatten(1, (count, length)).transpose(0, 1)
                    for t in (query, key, value)
                )  # [count, heads, length, head_dim]
                out, _ = attention_interface(
                    self, q, k, v, attention_mask=None, scaling=self.scaling, dropout=dropout, is_causal=False, **kwargs
                )
                outputs.append(out.reshape(1, count * length, *out.shape[2:]))
            attn_output = torch.cat(outputs, dim=1)
        return self.out_proj(attn_output.reshape(seq_len, -1))


def _same_length_runs(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first patch, number of images, patches per image) for each run of consecutive images of one length."""
    runs = []
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        if runs and runs[-1][2] == end - start:
            runs[-1][1] += 1
        else:
            runs.append([start, 1, end - start])
    return [tuple(run) for run in runs]


class KimiMMVisionMLP(nn.Module):
    def __init__(self, config: KimiMMVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class KimiMMVisionEncoderLayer(nn.Module):
    def __init__(self, config: KimiMMVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = KimiMMVisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = KimiMMVisionMLP(config)

    def forward(self, hidden_states, cu_seqlens, position_embeddings, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.layer_norm1(hidden_states), cu_seqlens, position_embeddings, **kwargs
        )
        return hidden_states + self.mlp(self.layer_norm2(hidden_states))


class KimiMMPreTrainedModel(PreTrainedModel):
    config: KimiMMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["KimiMMVisionEncoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Export both heads, so AutoModel (which vLLM's Transformers backend builds) and
        # AutoModelForImageTextToText both load with trust_remote_code where kimi_mm is not installed.
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": "modeling_kimi_mm.KimiMMModel",
                "AutoModelForImageTextToText": "modeling_kimi_mm.KimiMMForConditionalGeneration",
            }
        return super().save_pretrained(save_directory, *args, **kwargs)


def interpolated_grid(weight: torch.Tensor, sizes: list[list[int]]) -> torch.Tensor:
    """A learned square grid of embeddings (`weight`: `[n * n, D]`, row-major), bicubic-interpolated to each
    `(rows, cols)` in `sizes` and flattened row-major: `[sum(rows * cols), D]`."""
    n = math.isqrt(weight.shape[0])
    grid = weight.reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    out = []
    for h, w in sizes:
        resized = (
            grid
            if (h, w) == (n, n)
            else F.interpolate(grid.float(), size=(h, w), mode="bicubic", align_corners=False).to(grid.dtype)
        )
        out.append(resized[0].flatten(1).transpose(0, 1))
    return torch.cat(out)


class KimiMMVisionModel(KimiMMPreTrainedModel):
    """Patch embedding → (+ interpolated absolute positions) → pre-norm transformer with 2D RoPE → final norm."""

    config: KimiMMVisionConfig
    base_model_prefix = "vision_tower"
    input_modalities = ("image",)
    main_input_name = "pixel_values"

    def __init__(self, config: KimiMMVisionConfig):
        super().__init__(config)
        patch_dim = config.num_channels * config.patch_size**2
        self.patch_embedding = nn.Linear(patch_dim, config.hidden_size)
        n = config.num_position_embeddings
        self.position_embedding = nn.Embedding(n * n, config.hidden_size) if n > 0 else None
        self.layers = nn.ModuleList([KimiMMVisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def absolute_position_embeddings(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """The learned `n x n` grid, bicubic-interpolated to each image's patch grid: `[total_patches, hidden]`."""
        return interpolated_grid(self.position_embedding.weight, grid_thw[:, 1:].tolist())

    @can_return_tuple
    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs) -> BaseModelOutput:
        """pixel_values: `[total_patches, C * patch**2]`; grid_thw: `[num_images, 3]`.
        Returns `last_hidden_state` `[total_patches, hidden]`."""
        grid_thw = grid_thw.to(torch.long)
        hidden_states = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        if self.position_embedding is not None:
            hidden_states = hidden_states + self.absolute_position_embeddings(grid_thw)
        lengths = grid_thw.prod(-1)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(device=hidden_states.device, dtype=torch.int32)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        position_embeddings = vision_rotary_embedding(grid_thw, head_dim, self.config.rope_theta, hidden_states.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, cu_seqlens, position_embeddings
                )
            else:
                hidden_states = layer(hidden_states, cu_seqlens, position_embeddings, **kwargs)
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden_states))


def pixel_shuffle(features: torch.Tensor, grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """Merge each `merge_size x merge_size` block of neighbouring patches into one vector.

    features: `[total_patches, D]` (row-major per image) → `[total_patches / merge_size**2, merge_size**2 * D]`."""
    m = merge_size
    out = []
    for image, (_, h, w) in zip(torch.split(features, grid_thw.prod(-1).tolist()), grid_thw.tolist()):
        image = image.reshape(h // m, m, w // m, m, -1).permute(0, 2, 1, 3, 4)
        out.append(image.reshape((h // m) * (w // m), -1))
    return torch.cat(out)


class KimiMMMultiModalProjector(nn.Module):
    """2x2 pixel shuffle → LayerNorm → Linear → GELU → Linear into the LLM width (+ an optional learned grid of
    position embeddings, interpolated to each image's token grid, so the LLM can tell which token is where)."""

    def __init__(self, config: KimiMMConfig):
        super().__init__()
        self.merge_size = config.merge_size
        in_dim = config.vision_config.hidden_size * config.merge_size**2
        out_dim = config.text_config.hidden_size
        self.layer_norm = nn.LayerNorm(in_dim, eps=config.projector_layer_norm_eps)
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=config.projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=config.projector_bias)
        n = config.projector_position_embeddings
        self.position_embedding = nn.Embedding(n * n, out_dim) if n > 0 else None

    def forward(self, image_features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        merged = pixel_shuffle(image_features, grid_thw, self.merge_size)
        tokens = self.linear_2(self.act(self.linear_1(self.layer_norm(merged))))
        if self.position_embedding is not None:
            tokens = tokens + interpolated_grid(
                self.position_embedding.weight, (grid_thw[:, 1:] // self.merge_size).tolist()
            )
        return tokens


class KimiMMModel(KimiMMPreTrainedModel):
    """Vision tower + projector + the base LM built from `text_config` (no LM head)."""

    def __init__(self, config: KimiMMConfig):
        super().__init__(config)
        self.vision_tower = KimiMMVisionModel._from_config(config.vision_config)
        self.multi_modal_projector = KimiMMMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.FloatTensor, image_grid_thw: torch.LongTensor, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Encode and project images. `pooler_output` is a tuple with one `[tokens_i, text_hidden]` tensor per image,
        `tokens_i = rows_i * cols_i / merge_size**2`."""
        grid = torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(-1, 3).cpu()
        m = self.config.merge_size
        if pixel_values.shape[0] != int(grid.prod(-1).sum()):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[0]} patches but image_grid_thw {grid.tolist()} describes "
                f"{int(grid.prod(-1).sum())}; pass both as produced by KimiMMImageProcessor"
            )
        if ((grid[:, 1:] % m) != 0).any():
            raise ValueError(f"image_grid_thw {grid.tolist()} has rows/cols not divisible by merge_size {m}")
        hidden = self.vision_tower(pixel_values, grid, **kwargs).last_hidden_state
        features = self.multi_modal_projector(hidden, grid)
        return BaseModelOutputWithPooling(
            last_hidden_state=hidden, pooler_output=torch.split(features, (grid.prod(-1) // m**2).tolist())
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        **kwargs,
    ) -> KimiMMModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values needs image_grid_thw (returned by the processor next to it)")
            image_features = torch.cat(self.get_image_features(pixel_values, image_grid_thw).pooler_output)
            image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        return KimiMMModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
        )

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """Boolean `[batch, seq, 1]` mask of the image-token positions, checked against the feature count."""
        if input_ids is None:
            image_embed = self.get_input_embeddings()(
                torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
            )
            mask = (inputs_embeds == image_embed).all(-1)
        else:
            mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != image_features.shape[0]:
            raise ValueError(
                f"the prompt holds {int(mask.sum())} image tokens but the images produce {image_features.shape[0]} "
                "features; build inputs with KimiMMProcessor, which expands one placeholder per image to its exact "
                "token count (and never truncate inside an image)"
            )
        return mask.unsqueeze(-1).to(inputs_embeds.device)


class KimiMMForConditionalGeneration(KimiMMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: KimiMMConfig):
        super().__init__(config)
        self.model = KimiMMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values, image_grid_thw, **kwargs) -> BaseModelOutputWithPooling:
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        logits_for_labels_only: bool = False,
        **kwargs,
    ) -> KimiMMCausalLMOutputWithPast:
        """`logits_for_labels_only=True` (with `labels`): the LM head runs only where a next-token label is set
        (assistant tokens in SFT), which saves its time and memory on prompt, image and padding positions. The
        loss is the same as the default's; `logits` is then None."""
        if logits_for_labels_only and labels is None:
            raise ValueError("logits_for_labels_only=True needs labels")
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = logits = None
        if logits_for_labels_only:
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # position t predicts token t + 1
            keep = targets != -100
            total = F.cross_entropy(self.lm_head(hidden_states[keep]).float(), targets[keep], reduction="sum")
            count = kwargs.get("num_items_in_batch")  # the Trainer's count across gradient-accumulation steps
            loss = total / (count if count is not None else keep.sum().clamp(min=1))
        else:
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])
        if labels is not None and loss is None:
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
        return KimiMMCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )


__all__ = [
    "KimiMMForConditionalGeneration",
    "KimiMMModel",
    "KimiMMPreTrainedModel",
    "KimiMMVisionModel",
]
