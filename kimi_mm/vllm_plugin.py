"""vLLM plugin: once kimi_mm is installed, `vllm.LLM(model=DIR)` and `vllm serve DIR` load kimi_mm checkpoints.

vLLM calls `register()` in every process it starts (entry point group `vllm.general_plugins`). It registers the
Auto classes (by importing kimi_mm) and maps the architecture onto vLLM's Transformers backend, which runs our
modeling code with vLLM's attention, KV cache and batching - no `trust_remote_code`, no import in user scripts.
It also registers the shared-memory weight-transfer backend (`kimi_mm_shm`) that `trainers.rollout.RolloutEngine`
pushes trained weights through where CUDA IPC is not available; it is loaded only when an engine asks for it. And
it silences one misleading warning of vLLM's in-place reload (`_rotary_reload_warning`).
"""

import logging

ARCHITECTURE = "KimiMMForConditionalGeneration"
BACKEND = "vllm.model_executor.models.transformers:TransformersMultiModalForCausalLM"
WEIGHT_TRANSFER = ("kimi_mm_shm", "trainers.weight_transfer", "SharedMemoryWeightTransferEngine")


def register() -> None:
    from vllm import ModelRegistry

    import kimi_mm  # noqa: F401  (registers AutoConfig/AutoModel/AutoProcessor for kimi_mm)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, BACKEND)

    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(*WEIGHT_TRANSFER)
    except ValueError:  # registered already in this process
        pass
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_rotary_reload_warning)


def _rotary_reload_warning(record: logging.LogRecord) -> bool:
    """Drop vLLM's "<Layer>RotaryEmbedding: Failed to load weights" on every in-place reload: the HF rotary embedding
    owns only `inv_freq`, computed from the config and never in a checkpoint, which the reload puts back unchanged."""
    return not record.getMessage().endswith("RotaryEmbedding: Failed to load weights")
