"""The rollout engine: the one module in kimi_mm's trainers that talks to vLLM.

    engine = RolloutEngine("path/to/checkpoint", max_model_len=4096)
    prompt = engine.encode([{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}])
    groups = engine.generate([prompt], n=8, max_tokens=1024, temperature=1.0)   # 8 Completions for the prompt
    longer = engine.continue_responses([prompt], [groups[0][0]], max_tokens=1024)  # partial rollouts
    engine.update_weights(trained_model)                                       # in place, no reload from disk

Prompts reach vLLM as token ids holding ONE unexpanded `<image>` token per image: vLLM expands placeholders itself,
and ids already expanded by the processor would be silently corrupted (TRL #6294, verl #5241).

The engine runs in vLLM's own processes (its default), never in the trainer's: vLLM's Transformers backend rewrites
the HF decoder class it serves (`support_torch_compile`), which would break the trainer's own models of that class in
a shared process. On CUDA, a one-GPU engine's processes are pinned to the trainer's current GPU, so each rank of a
multi-GPU run gets its engine on its own GPU.

A push runs vLLM's weight-sync protocol (start, one update per chunk, finish: an in-place layerwise reload under
checkpoint names) over one of two transports (`trainers.weight_transfer`): CUDA IPC on CUDA, where the weights stay
on the GPU, and a shared-memory buffer that lives as long as the engine elsewhere. Then the prefix and encoder caches
are cleared. On CUDA, `enable_sleep_mode` lets training and rollouts share one GPU (`sleep()` before the training
step, `wake_up()` after).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TRANSPORTS = ("auto", "ipc", "shm")


@dataclass
class Prompt:
    """Token ids (chat template + tokenizer, one `<image>` token per image) and the images, in order."""

    token_ids: list[int]
    images: list[Image.Image] = field(default_factory=list)


@dataclass
class Completion:
    """One sampled response. `versions[i]` is the policy version (number of weight pushes) that produced token i."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or stop token), "length" (token budget or max_model_len), "abort"
    versions: list[int]
    text: str = ""

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


class RolloutEngine:
    """A vLLM engine serving a kimi_mm checkpoint for RL rollouts, with in-place weight updates."""

    def __init__(
        self,
        model: str | Path,
        *,
        max_model_len: int = 4096,
        max_images_per_prompt: int = 4,
        dtype: str = "auto",
        seed: int = 0,
        logprobs_mode: str = "raw_logprobs",
        gpu_memory_utilization: float = 0.5,
        cpu_kv_cache_gib: int = 2,
        enable_sleep_mode: bool | None = None,
        enforce_eager: bool = False,
        weight_transfer: str = "auto",
        ipc_buffer_gib: float = 1.0,
        **engine_kwargs,
    ):
        """`logprobs_mode="raw_logprobs"` returns log-softmax of the unscaled logits (the policy's own log-probs);
        `"processed_logprobs"` returns those of the temperature/top-p-adjusted sampling distribution.
        `cpu_kv_cache_gib` sizes the KV cache on CPU; `gpu_memory_utilization` on CUDA. Sleep mode defaults to on
        when CUDA is available. `weight_transfer`: how `update_weights` moves the weights, "ipc" (CUDA IPC, the
        default for an engine on one GPU; packed through a GPU buffer of `ipc_buffer_gib`, grown to the largest
        tensor) or "shm" (a shared-memory buffer in host memory, the default elsewhere). Extra keyword arguments go
        to `vllm.LLM`."""
        if weight_transfer not in TRANSPORTS:
            raise ValueError(f"weight_transfer must be one of {TRANSPORTS}, got {weight_transfer!r}")
        self.path = Path(model)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint {str(self.path)!r} is not a directory")
        has_processor = any((self.path / name).is_file() for name in PROCESSOR_FILES)
        if not has_processor or not (self.path / "tokenizer_config.json").is_file():
            raise FileNotFoundError(
                f"checkpoint {str(self.path)!r} has no processor files ({' or '.join(PROCESSOR_FILES)} and "
                "tokenizer_config.json); save them next to the weights with processor.save_pretrained(DIR)"
            )
        from transformers import AutoProcessor

        import kimi_mm  # noqa: F401  (Auto classes)

        self.processor = AutoProcessor.from_pretrained(self.path)
        self.tokenizer = self.processor.tokenizer
        self.image_token_id = self.processor.image_token_id
        self.max_model_len = max_model_len
        self.max_images_per_prompt = max_images_per_prompt
        self.weight_shapes = checkpoint_weight_shapes(self.path)
        self.version = 0

        self.on_cuda = torch.cuda.is_available()
        if not self.on_cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
            if (os.cpu_count() or 1) <= 4:
                # vLLM-CPU keeps a core for its scheduler; on a small machine that idles half the compute
                # (measured here: 1.8x rollout tokens/s for a 110M model with both cores for the worker).
                os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        self.sleep_mode = self.on_cuda if enable_sleep_mode is None else enable_sleep_mode
        if self.sleep_mode and not self.on_cuda:
            raise ValueError("enable_sleep_mode needs CUDA; vLLM refuses it on CPU")
        if "weight_transfer_config" in engine_kwargs:
            raise ValueError("the engine sets vLLM's weight_transfer_config itself; choose with weight_transfer=")
        gpus = math.prod(engine_kwargs.get(f"{kind}_parallel_size", 1) for kind in ("tensor", "pipeline", "data"))
        one_gpu = self.on_cuda and gpus == 1
        self.transport = ("ipc" if one_gpu else "shm") if weight_transfer == "auto" else weight_transfer
        if self.transport == "ipc" and not one_gpu:
            raise ValueError(
                "weight_transfer='ipc' needs CUDA and an engine on one GPU (the trainer's); use 'shm' (the default "
                "on CPU and for tensor/pipeline/data-parallel engines, whose workers all map the same buffer)"
            )
        self.ipc_buffer_bytes = int(ipc_buffer_gib * 2**30)
        from vllm import LLM

        from trainers.weight_transfer import SHM_BACKEND

        if self.transport == "ipc":
            # vLLM carries CUDA IPC handles only as pickles, which both sides must allow for the engine's lifetime:
            # the engine tags its replies when it starts with this set, and this process must then accept them.
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        with _engine_environment(pin_gpu=one_gpu):
            self.llm = LLM(
                model=str(self.path),
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                limit_mm_per_prompt={"image": max_images_per_prompt},
                logprobs_mode=logprobs_mode,
                enforce_eager=enforce_eager,
                weight_transfer_config={"backend": "ipc" if self.transport == "ipc" else SHM_BACKEND},
                **({"gpu_memory_utilization": gpu_memory_utilization} if self.on_cuda else {}),
                **({"enable_sleep_mode": True} if self.sleep_mode else {}),
                **engine_kwargs,
            )
        self.llm.init_weight_transfer_engine({"init_info": {"packed": True} if self.transport == "ipc" else {}})
        self.llm.update_weight_version("0")  # vLLM's weight version follows `self.version` from here on
        self.sleeping = False
        self.push_buffer = None  # the shared-memory transport's buffer, made at the first push
        self.unusable: str | None = None  # why the engine must not generate (a push failed after it began)
        self.stale = False  # True when a successful push makes it usable again

    # -- prompts ---------------------------------------------------------------------------------------------

    def encode(self, messages: list[dict], **template_kwargs) -> Prompt:
        """A chat (content blocks `{"type": "image", "image": PIL|path|bytes}` / `{"type": "text", ...}`) as a
        Prompt: chat template with the generation prompt, tokenized without expanding the image placeholders."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        images = [
            block.get("image", block.get("path", block.get("url")))
            for message in messages
            if isinstance(message.get("content"), list)
            for block in message["content"]
            if block.get("type") == "image"
        ]
        return Prompt(self.tokenizer(text, add_special_tokens=False)["input_ids"], images)

    def _request(self, index: int, prompt: Prompt, response_ids: Sequence[int] = ()) -> dict:
        """The vLLM request for a prompt (+ a partial response), after checking it fits the engine."""
        n_placeholders = prompt.token_ids.count(self.image_token_id)
        if n_placeholders != len(prompt.images):
            raise ValueError(
                f"prompt {index}: {n_placeholders} image token(s) for {len(prompt.images)} image(s); token ids must "
                "hold one unexpanded image token per image (use RolloutEngine.encode, not processor-expanded ids)"
            )
        if len(prompt.images) > self.max_images_per_prompt:
            raise ValueError(
                f"prompt {index}: {len(prompt.images)} images, over the engine's max_images_per_prompt="
                f"{self.max_images_per_prompt}"
            )
        image_processor = self.processor.image_processor
        images = []
        for i, image in enumerate(prompt.images):
            try:
                images.append(image_processor.load_image(image, i))
            except ValueError as err:
                raise ValueError(f"prompt {index}: {err}") from err
        sizes = [(image.height, image.width) for image in images]
        image_tokens = (
            sum(self.processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]) if sizes else 0
        )
        length = len(prompt.token_ids) - n_placeholders + image_tokens + len(response_ids)
        if length >= self.max_model_len:
            raise ValueError(
                f"prompt {index}: {length} tokens after expanding its {len(images)} image(s) to {image_tokens} image "
                f"tokens{f' (with {len(response_ids)} response tokens)' if response_ids else ''}; the engine's "
                f"max_model_len is {self.max_model_len}"
            )
        request = {"prompt_token_ids": list(prompt.token_ids) + list(response_ids)}
        if images:
            request["multi_modal_data"] = {"image": images}
        return request

    # -- generation ------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], n: int = 1, *, max_tokens: int, **sampling) -> list[list[Completion]]:
        """`n` samples per prompt; returns one list of Completions per prompt. `sampling`: see `sampling_params`."""
        return self.rollout(prompts, n=n, max_tokens=max_tokens, **sampling)

    def continue_responses(
        self, prompts: Sequence[Prompt], partials: Sequence[Completion], *, max_tokens: int, **sampling
    ) -> list[Completion]:
        """Continue each unfinished response (prompt + its partial tokens + the same images) with a new token
        budget. The result holds the partial's tokens, logprobs and versions followed by the new ones."""
        if len(prompts) != len(partials):
            raise ValueError(f"{len(prompts)} prompts but {len(partials)} partial responses")
        return [group[0] for group in self.rollout(prompts, partials, max_tokens=max_tokens, **sampling)]

    def rollout(
        self,
        prompts: Sequence[Prompt],
        partials: Sequence[Completion | None] | None = None,
        *,
        n: int = 1,
        max_tokens: int | Sequence[int],
        **sampling,
    ) -> list[list[Completion]]:
        """Fresh samples and continuations in ONE engine call (so they batch together): for prompt i, `n` new
        samples if `partials[i]` is None, else one continuation of that partial response. `max_tokens` is one budget
        or one per prompt. Returns one list of Completions per prompt (continuations include the partial's tokens)."""
        partials = list(partials) if partials is not None else [None] * len(prompts)
        budgets = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
        if not len(prompts) == len(partials) == len(budgets):
            raise ValueError(f"{len(prompts)} prompts, {len(partials)} partials and {len(budgets)} token budgets")
        requests = [self._request(i, p, c.token_ids if c else ()) for i, (p, c) in enumerate(zip(prompts, partials))]
        params = [
            sampling_params(1 if c else n, budget, banned_token_ids=[self.image_token_id], **sampling)
            for c, budget in zip(partials, budgets)
        ]
        results = []
        for partial, out in zip(partials, self._run(requests, params)):
            new = [self._completion(c) for c in out.outputs]
            results.append([_join(partial, c) for c in new] if partial else new)
        return results

    def check(self, prompt: Prompt, index: int = 0) -> None:
        """Raise the ValueError that `generate` would raise for this prompt (too long, too many or bad images)."""
        self._request(index, prompt)

    def _run(self, requests: list[dict], params):
        if self.unusable:
            raise RuntimeError(self.unusable)
        if self.sleeping:
            raise RuntimeError("the engine is asleep; call wake_up() before generating")
        return self.llm.generate(requests, params, use_tqdm=False)

    def _completion(self, output) -> Completion:
        token_ids = list(output.token_ids)
        logprobs = [position[token].logprob for token, position in zip(token_ids, output.logprobs or [])]
        return Completion(
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=output.finish_reason or "abort",
            versions=[self.version] * len(token_ids),
            text=output.text,
        )

    # -- weights ---------------------------------------------------------------------------------------------

    def update_weights(self, model: nn.Module) -> int:
        """Push `model`'s weights into the running engine in place and return the new policy version.

        `model` may be wrapped (DDP / accelerate / torch.compile), sharded (FSDP2 DTensors, DeepSpeed ZeRO-3: every
        rank must call this, since gathers are collectives) or a PEFT model (adapters merged for the push, then
        unmerged). Names and shapes are checked against the checkpoint before anything is written, so a bad push
        raises and the engine keeps serving the old weights; so does a failure while the weights are gathered into
        the shared-memory buffer, which is filled before the engine is touched (IPC gathers chunk by chunk, during
        the push). A push that fails after the engine received part of it leaves part of the weights replaced and
        part uninitialised, so the engine then refuses to generate until a push succeeds (or for good, with a
        message saying to start a new engine, when the engine itself failed; see `_push`)."""
        if self.unusable and not self.stale:
            raise RuntimeError(self.unusable)
        if self.sleeping:
            self.wake_up()
        specs = full_weight_specs(model)
        self.check_weights({name: shape for name, (shape, _) in specs.items()})
        with full_weights(model) as weights:
            if self.transport == "ipc":
                from trainers.weight_transfer import ipc_updates

                sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs.values()]
                updates = ipc_updates(weights, max(min(self.ipc_buffer_bytes, sum(sizes)), max(sizes)))
            else:
                updates = [self._shared_buffer(specs).write(weights)]  # written before the engine is touched
            try:
                self._push(updates)
            finally:
                if self.transport == "ipc":  # after finish, when the worker has let go of the IPC buffer
                    torch.cuda.ipc_collect()
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.version += 1
        return self.version

    def _push(self, updates: Iterator[dict] | list[dict]) -> None:
        """vLLM's weight-sync protocol: start, one update per chunk (each sent before the next is made: IPC refills
        one buffer), finish with the new version (vLLM's weight version = our policy version).

        On failure: if the engine finishes the reload cleanly, layers that got nothing keep their old weights, but a
        layer that got part of its tensors was finished with uninitialised memory for the rest, so the engine is
        stale (refuses to generate) once any chunk went out, until a push succeeds. If the engine cannot finish
        (it failed inside start, an update or finish), layers stay half reloaded and no later push repairs them."""
        sent = 0
        try:
            self.llm.start_weight_update()
            for update in updates:
                sent += 1
                self.llm.update_weights({"update_info": update})
        except BaseException as err:
            try:
                self.llm.finish_weight_update()
            except Exception:
                self._unusable_for_good(err)
            else:
                if sent:
                    self.unusable = (
                        f"the last weight push failed part-way ({err!r}), so the engine's weights are part old, part "
                        "new and part uninitialised; it refuses to generate until update_weights succeeds"
                    )
                    self.stale = True
            raise
        finally:
            if hasattr(updates, "close"):  # an IPC producer stopped early lets go of its GPU buffer
                updates.close()
        try:
            self.llm.finish_weight_update(str(self.version + 1))
        except BaseException as err:
            self._unusable_for_good(err)
            raise
        self.unusable, self.stale = None, False

    def _unusable_for_good(self, err: BaseException) -> None:
        self.unusable = (
            f"a weight push failed inside the engine ({err!r}) and left its model half reloaded; this engine cannot "
            "serve again: shut it down and start a new RolloutEngine"
        )
        self.stale = False

    def _shared_buffer(self, specs: dict):
        from trainers.weight_transfer import SharedWeightBuffer

        if self.push_buffer is None or self.push_buffer.specs != specs:
            if self.push_buffer is not None:
                self.push_buffer.close()
            self.push_buffer = SharedWeightBuffer(specs)
        return self.push_buffer

    def check_weights(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Raise a ValueError naming every weight whose name or shape differs from the served checkpoint's."""
        expected = self.weight_shapes
        missing = sorted(set(expected) - set(shapes))
        unexpected = sorted(set(shapes) - set(expected))
        wrong = sorted(
            f"{k}: {tuple(shapes[k])} vs {expected[k]}"
            for k in set(shapes) & set(expected)
            if tuple(shapes[k]) != expected[k]
        )
        if missing or unexpected or wrong:
            parts = [
                f"{label} {items[:8]}{' ...' if len(items) > 8 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                if items
            ]
            raise ValueError(
                "weight push refused, nothing was written (the engine keeps its weights): " + "; ".join(parts)
            )

    # -- sharing one GPU (k1.5 hybrid deployment) ------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Free the GPU for training: level 1 offloads weights to CPU and drops the KV cache."""
        if not self.sleep_mode:
            raise RuntimeError("sleep mode is off (it needs CUDA and enable_sleep_mode=True)")
        self.llm.sleep(level=level)
        self.sleeping = True

    def shutdown(self) -> None:
        """Stop vLLM's engine processes (they also stop when this process exits) and free the push buffer."""
        self.llm.llm_engine.engine_core.shutdown()
        if self.push_buffer is not None:
            self.push_buffer.close()

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


@contextmanager
def _engine_environment(pin_gpu: bool) -> Iterator[None]:
    """While vLLM's engine processes start (they inherit it; this process gets its own back), CUDA_VISIBLE_DEVICES
    names only the trainer's current GPU when `pin_gpu`, so each rank's one-GPU engine runs on that rank's GPU."""
    changes = {}
    if pin_gpu:
        changes["CUDA_VISIBLE_DEVICES"] = engine_visible_devices(
            torch.cuda.current_device(), os.environ.get("CUDA_VISIBLE_DEVICES")
        )
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def engine_visible_devices(index: int, visible: str | None) -> str:
    """CUDA_VISIBLE_DEVICES naming only the GPU that this process calls `cuda:index` under `visible` (its own
    CUDA_VISIBLE_DEVICES, None or empty when unset)."""
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    if ids is None:
        return str(index)
    if not 0 <= index < len(ids):
        raise ValueError(f"cuda:{index} is not among CUDA_VISIBLE_DEVICES={visible!r}")
    return ids[index]


def sampling_params(
    n: int,
    max_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    banned_token_ids: Sequence[int] = (),
):
    """vLLM sampling parameters for rollouts: the sampled token's logprob on every position, special tokens kept in
    the text. `ignore_eos` (benchmarks) samples exactly `max_tokens` tokens. `banned_token_ids` are never sampled (the
    engine bans the image placeholder: one inside a response would break the image-token count of a continuation
    or a training forward)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=n,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop_token_ids=list(stop_token_ids) if stop_token_ids else None,
        logprobs=0,
        skip_special_tokens=False,
        ignore_eos=ignore_eos,
        logit_bias={int(t): -100.0 for t in banned_token_ids} or None,
    )


def _join(partial: Completion, new: Completion) -> Completion:
    """A partial response followed by its continuation."""
    return Completion(
        token_ids=list(partial.token_ids) + new.token_ids,
        logprobs=list(partial.logprobs) + new.logprobs,
        finish_reason=new.finish_reason,
        versions=list(partial.versions) + new.versions,
        text=partial.text + new.text,
    )


def checkpoint_weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the weights in a safetensors checkpoint (read from the headers, no data loaded)."""
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    shapes = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} has no {name}")
        with safe_open(path / name, framework="pt") as f:
            shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
    return shapes


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / DeepSpeed engine / accelerate / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "merge_adapter") and hasattr(model, "peft_config")


def _checkpoint_name(name: str, peft: bool) -> str | None:
    """HF checkpoint name of a parameter, or None for parameters that are not pushed (LoRA factors)."""
    name = name.replace("_checkpoint_wrapped_module.", "")
    if not peft:
        return name
    if "lora_" in name or ".original_module." in name:
        return None
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def _global_shape(param: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", None) or param.shape)  # ZeRO-3 keeps the full shape in ds_shape


def full_weight_specs(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint names, full (unsharded) shapes and dtypes of what `full_weights` yields, without gathering data."""
    model = _unwrap(model)
    peft = _is_peft(model)
    return {n: (_global_shape(p), p.dtype) for raw, p in model.named_parameters() if (n := _checkpoint_name(raw, peft))}


@contextmanager
def full_weights(model: nn.Module) -> Iterator[Iterator[tuple[str, torch.Tensor]]]:
    """Yield an iterator of `(checkpoint_name, full_tensor)`, gathering one parameter at a time."""
    model = _unwrap(model)
    peft = _is_peft(model)
    if peft:
        model.merge_adapter()
    try:
        yield _gathered(model, peft)
    finally:
        if peft:
            model.unmerge_adapter()


def _gathered(model: nn.Module, peft: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for raw, param in model.named_parameters():
        name = _checkpoint_name(raw, peft)
        if name is None:
            continue
        if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data.detach().clone()
        elif hasattr(param, "full_tensor"):  # FSDP2 DTensor
            yield name, param.full_tensor().detach()
        else:
            yield name, param.detach()
