"""Native-resolution image processor for kimi_mm (Pillow + numpy + torch; no torchvision).

Each image keeps its aspect ratio and is resized only to fit the `[min_pixels, max_pixels]` budget and to
multiples of `patch_size * merge_size`, then cut into flattened patches:
`pixel_values` `[total_patches, 3 * patch_size**2]` (channel, row, column order inside a patch) and
`image_grid_thw` `[num_images, 3]` = `(1, patch_rows, patch_cols)`.
"""

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


class ImageInputError(ValueError):
    """An image that cannot be used, named by its position (and path when it has one)."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Closest `(height, width)` with both sides multiples of `factor`, the aspect ratio kept and the area
    within `[min_pixels, max_pixels]`."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    if h * w > max_pixels:  # a thin image whose short side was clamped up to one factor
        if h >= w:
            h = max(factor, max_pixels // w // factor * factor)
        else:
            w = max(factor, max_pixels // h // factor * factor)
    return h, w


class KimiMMImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_grid_thw"]

    def __init__(
        self,
        patch_size: int = 14,
        merge_size: int = 2,
        min_pixels: int = 56 * 56,
        max_pixels: int = 1280 * 28 * 28,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
        min_side: int = 4,
        max_aspect_ratio: float = 200.0,
        max_input_pixels: int = 89_478_485,
        **kwargs,
    ):
        """`min_side`, `max_aspect_ratio` and `max_input_pixels` bound what is accepted at all: smaller, thinner
        or larger inputs (the last a decompression-bomb guard, checked before decoding) are refused with an error."""
        kwargs.pop("size", None)  # derived from min/max_pixels
        super().__init__(**kwargs)
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels {min_pixels} is larger than max_pixels {max_pixels}")
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.min_side = min_side
        self.max_aspect_ratio = max_aspect_ratio
        self.max_input_pixels = max_input_pixels

    @property
    def size(self) -> dict[str, int]:
        """The pixel budget in the Qwen2-VL convention that vLLM reads (`longest_edge` is an area)."""
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    # -- loading ---------------------------------------------------------------------------------------------

    def fetch_images(self, images):
        """Keep the nesting; loading (with its checks) happens per image in `load_image`."""
        return images

    def load_image(self, image, index: int = 0) -> Image.Image:
        """Open a PIL image, path or bytes, refuse unusable ones, and return it as RGB."""
        name = f"image {index}"
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            name += f" ({path})"
            if not path.is_file():
                raise ImageInputError(f"{name}: file not found")
            image = self._open(path, name)
        elif isinstance(image, (bytes, bytearray)):
            image = self._open(io.BytesIO(image), name)
        elif isinstance(image, np.ndarray) or isinstance(image, torch.Tensor):
            array = np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image)
            if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
                array = array.transpose(1, 2, 0)  # channels-first → channels-last
            if array.dtype != np.uint8:
                array = (
                    (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
                    if array.max() <= 1
                    else array.astype(np.uint8)
                )
            image = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
        elif not isinstance(image, Image.Image):
            raise ImageInputError(f"{name}: unsupported type {type(image).__name__}; pass a PIL image, path or bytes")

        width, height = image.size
        if width * height > self.max_input_pixels:
            raise ImageInputError(
                f"{name}: {width}x{height} pixels exceeds max_input_pixels={self.max_input_pixels} "
                "(possible decompression bomb); downscale it first or raise the limit"
            )
        if min(width, height) < self.min_side:
            raise ImageInputError(f"{name}: {width}x{height} is too small; each side needs >= {self.min_side} pixels")
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            raise ImageInputError(
                f"{name}: aspect ratio of {width}x{height} exceeds max_aspect_ratio={self.max_aspect_ratio}"
            )
        try:
            return to_rgb(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageInputError(f"{name}: cannot decode image data ({err})") from err

    @staticmethod
    def _open(source, name: str) -> Image.Image:
        try:
            with warnings.catch_warnings():  # our own pixel limit is checked (with a clearer error) right after
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(source)  # lazy: only the header is read, so the size check runs before decoding
        except Image.DecompressionBombError as err:
            raise ImageInputError(f"{name}: {err}") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageInputError(f"{name}: not a readable image ({err})") from err

    # -- processing ------------------------------------------------------------------------------------------

    def resized_size(self, height: int, width: int, min_pixels=None, max_pixels=None) -> tuple[int, int]:
        return smart_resize(
            height,
            width,
            self.patch_size * self.merge_size,
            min_pixels or self.min_pixels,
            max_pixels or self.max_pixels,
        )

    def get_number_of_image_patches(self, height: int, width: int, images_kwargs: dict | None = None) -> int:
        """Patches (before merging) that an image of this size produces: what `_get_num_multimodal_tokens` uses."""
        kw = images_kwargs or {}
        h, w = self.resized_size(height, width, kw.get("min_pixels"), kw.get("max_pixels"))
        return (h // self.patch_size) * (w // self.patch_size)

    def preprocess(
        self, images, min_pixels: int | None = None, max_pixels: int | None = None, return_tensors=None, **kwargs
    ) -> BatchFeature:
        """images: one image or a (possibly nested, one list per sample) list of PIL images, paths or bytes."""
        flat = _flatten(images)
        p, c = self.patch_size, 3
        mean = np.asarray(self.image_mean, dtype=np.float32).reshape(c, 1, 1)
        std = np.asarray(self.image_std, dtype=np.float32).reshape(c, 1, 1)
        patches, grids = [], []
        for index, image in enumerate(flat):
            image = self.load_image(image, index)
            h, w = self.resized_size(image.height, image.width, min_pixels, max_pixels)
            if (image.width, image.height) != (w, h):
                image = image.resize((w, h), Image.Resampling.BICUBIC)
            array = (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 - mean) / std
            # [C, H, W] → [rows, cols, C, p, p] → [rows * cols, C * p * p] (row-major patches)
            array = array.reshape(c, h // p, p, w // p, p).transpose(1, 3, 0, 2, 4).reshape(-1, c * p * p)
            patches.append(array)
            grids.append([1, h // p, w // p])
        if not flat:
            data = {"pixel_values": np.zeros((0, c * p * p), np.float32), "image_grid_thw": np.zeros((0, 3), np.int64)}
        else:
            data = {"pixel_values": np.concatenate(patches), "image_grid_thw": np.asarray(grids, dtype=np.int64)}
        return BatchFeature(data=data, tensor_type=return_tensors)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (L, LA, P, RGBA, CMYK, I;16 ... all end as RGB)."""
    image.load()
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(array.max(), 1.0)
        image = Image.fromarray((array * scale).astype(np.uint8))
    return image.convert("RGB")


def _flatten(images) -> list:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [leaf for item in images for leaf in _flatten(item)]
    return [images]


__all__ = ["KimiMMImageProcessor", "ImageInputError", "smart_resize"]
