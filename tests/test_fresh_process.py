"""Loading as a user does: a new Python process, Auto classes, pipeline, and remote code without kimi_mm."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from scripts.make_tiny import make_tiny

from .conftest import ROOT, shapes_image

BLOCK_KIMI_MM = """
import sys
class _Block:  # kimi_mm is "not installed" in this process
    def find_spec(self, name, path=None, target=None):
        if name == "kimi_mm" or name.startswith("kimi_mm."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
"""

LOAD_AND_RUN = """
import json, sys, torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
ckpt, image_path, remote = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
kw = {"trust_remote_code": True} if remote else {}
model = AutoModelForImageTextToText.from_pretrained(ckpt, **kw).eval()
base = AutoModel.from_pretrained(ckpt, **kw)
processor = AutoProcessor.from_pretrained(ckpt, **kw)
image = Image.open(image_path)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[image], text=prompt, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits[0, -1]
result = {"model": type(model).__name__, "base": type(base).__name__, "processor": type(processor).__name__,
          "modules": sorted({type(model).__module__.split(".")[0], type(processor).__module__.split(".")[0]}),
          "kimi_mm_imported": "kimi_mm" in sys.modules, "last_logits": logits.tolist()}
if not remote:
    pipe = pipeline("image-text-to-text", model=ckpt)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "How many?"}]}]
    result["pipeline"] = pipe(text=chat, max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]["content"]
print("RESULT" + json.dumps(result))
"""


def run_fresh(code: str, *args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT.parent, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_model, processor, tmp_path_factory):
    image_path = tmp_path_factory.mktemp("img") / "image.png"
    shapes_image(96, 64, seed=5).save(image_path)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    from PIL import Image

    inputs = processor(images=[Image.open(image_path)], text=prompt, return_tensors="pt")
    with torch.no_grad():
        logits = tiny_model(**inputs).logits[0, -1]
        generated = tiny_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return image_path, logits, answer


@pytest.mark.slow
def test_fresh_process_auto_classes_and_pipeline(tiny_dir, reference):
    image_path, logits, answer = reference
    result = run_fresh("import kimi_mm\n" + LOAD_AND_RUN, tiny_dir, image_path, 0)
    assert (result["model"], result["base"], result["processor"]) == (
        "KimiMMForConditionalGeneration",
        "KimiMMModel",
        "KimiMMProcessor",
    )
    torch.testing.assert_close(torch.tensor(result["last_logits"]), logits, atol=1e-5, rtol=1e-5)
    assert result["pipeline"].strip() == answer.strip()


@pytest.mark.slow
def test_remote_code_loads_where_kimi_mm_is_not_installed(tiny_dir, reference):
    image_path, logits, _ = reference
    result = run_fresh(BLOCK_KIMI_MM + LOAD_AND_RUN, tiny_dir, image_path, 1)
    assert not result["kimi_mm_imported"]
    assert result["modules"] == ["transformers_modules"]  # the exported code files, not the package
    torch.testing.assert_close(torch.tensor(result["last_logits"]), logits, atol=1e-5, rtol=1e-5)


def test_make_tiny_cli_is_seeded_and_writes_safetensors(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "make_tiny.py"), "--out", tmp_path / name, "--seed", str(seed)],
            check=True,
            capture_output=True,
            cwd=tmp_path,
        )
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "processor_config.json",
        "modeling_kimi_mm.py",
        "processing_kimi_mm.py",
        "image_processing_kimi_mm.py",
    } <= files
    assert not {n for n in files if n.endswith((".bin", ".pt", ".pth"))}
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["text_config"]["head_dim"] >= 32
    assert config["vision_config"]["hidden_size"] // config["vision_config"]["num_attention_heads"] >= 32


@pytest.mark.parametrize("text_model_type", ["qwen3", "llama"])
def test_make_tiny_other_language_models(tmp_path, text_model_type):
    from transformers import AutoModelForImageTextToText

    path = make_tiny(tmp_path / text_model_type, text_model_type=text_model_type)
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert model.config.text_config.model_type == text_model_type
