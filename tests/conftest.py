import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kimi_mm  # noqa: E402,F401  (registers the Auto classes)
from scripts.make_tiny import make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random checkpoint + processor, built once per test session."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


def shapes_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic image with some structure (so features differ between images)."""
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", (width, height), tuple(torch.randint(0, 255, (3,), generator=g).tolist()))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = (
            torch.randint(0, max(width - 8, 1), (1,), generator=g).item(),
            torch.randint(0, max(height - 8, 1), (1,), generator=g).item(),
        )
        color = tuple(torch.randint(0, 255, (3,), generator=g).tolist())
        draw.rectangle((x0, y0, x0 + width // 4, y0 + height // 4), fill=color)
    return image
