"""End-to-end demo (the README's first command): build a tiny kimi_mm model, save it as safetensors + processor,
reload it with the Auto classes and answer an image question.

    python -m scripts.demo [--out outputs/demo]

The SFT/RL issues extend this into data → SFT → RL → eval; until then it shows the model package round trip.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForImageTextToText, AutoProcessor

import kimi_mm  # noqa: F401  (registers the Auto classes)
from scripts.make_tiny import make_tiny


def demo_image() -> Image.Image:
    image = Image.new("RGB", (160, 112), "white")
    draw = ImageDraw.Draw(image)
    for i in range(3):
        draw.ellipse((10 + 50 * i, 36, 50 + 50 * i, 76), fill="red")
    return image


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.time()

    checkpoint = make_tiny(out / "checkpoint", seed=0)
    weight_files = sorted(p.name for p in checkpoint.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[demo_image()], text=prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    summary = {
        "checkpoint": str(checkpoint),
        "weight_files": weight_files,
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "answer": answer,
        "seconds": round(time.time() - start, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"demo: tiny kimi_mm ({summary['parameters']:,} params) saved to {checkpoint} as {weight_files}, "
        f"reloaded, answered {answer!r} (untrained) in {summary['seconds']}s"
    )
    return summary


if __name__ == "__main__":
    main()
