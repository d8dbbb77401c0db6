"""How a weight push travels from the trainer into the rollout engine's vLLM worker.

Every push runs vLLM's RL weight-sync protocol: `LLM.start_weight_update()` (the worker starts a layerwise in-place
reload), `LLM.update_weights(...)` once per chunk (the worker loads it with the model's own `load_weights`, under
checkpoint names), `LLM.finish_weight_update()` (the worker re-runs the kernel-format processing, e.g. vLLM-CPU's
oneDNN repacking, into the same tensors). Two transports carry the bytes:

- `"shm"` (CPU, and any engine whose trainer weights sit in host memory): the trainer copies the weights once into
  a shared-memory file that lives as long as the engine; the worker maps the same file and loads from it without
  another copy. Its worker side, `SharedMemoryWeightTransferEngine`, is registered with vLLM's
  `WeightTransferEngineFactory` by kimi_mm's vLLM plugin under the name `kimi_mm_shm`.
- `"ipc"` (CUDA): vLLM's own CUDA-IPC backend. The weights are packed on the GPU into one reusable buffer whose IPC
  handle the worker maps, so they never leave the GPU (`ipc_updates`).

This module imports vLLM; `trainers.rollout` imports it only once an engine exists.
"""

from __future__ import annotations

import base64
import math
import mmap
import os
import pickle
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

SHM_BACKEND = "kimi_mm_shm"
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


# -- trainer side --------------------------------------------------------------------------------------------


class SharedWeightBuffer:
    """One copy of the weights in a shared-memory file, mapped by the trainer and by vLLM's worker.

    `layout` lists `(name, byte_offset, shape, dtype)`; the file is reused across pushes (its pages stay resident),
    so a push costs one copy in and the engine's own in-place reload."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.specs = specs
        self.layout, offset = [], 0
        for name, (shape, dtype) in specs.items():
            self.layout.append((name, offset, list(shape), str(dtype).removeprefix("torch.")))
            offset += -(-math.prod(shape) * dtype.itemsize // 64) * 64  # 64-byte aligned
        self.path = str(Path(SHM_DIR) / f"kimi_mm_weights_{os.getpid()}_{uuid.uuid4().hex}.bin")
        with open(self.path, "w+b") as f:
            f.truncate(max(offset, 1))
            self._map = mmap.mmap(f.fileno(), 0)
        self._views = _views(self._map, self.layout)

    def write(self, weights: Iterable[tuple[str, torch.Tensor]]) -> dict:
        """Write `weights` into the buffer; returns the one update that tells the worker where they are."""
        for name, tensor in weights:
            self._views[name].copy_(tensor)
        return {"path": self.path, "layout": self.layout}

    def close(self) -> None:
        self._views = {}
        _close(self._map)
        Path(self.path).unlink(missing_ok=True)


def ipc_updates(weights: Iterable[tuple[str, torch.Tensor]], buffer_bytes: int) -> Iterator[dict]:
    """vLLM's packed CUDA-IPC transfer: tensors are copied into one GPU buffer of `buffer_bytes` (at least the
    largest tensor) and each full buffer is one update. The handles travel pickled (`ipc_handles_pickled`), which
    the worker accepts only with VLLM_ALLOW_INSECURE_SERIALIZATION=1 (RolloutEngine sets it for this transport,
    before the engine starts, so the engine and the trainer agree on it). The caller
    must send each update before asking for the next: the buffer is refilled in place."""
    from vllm.distributed.weight_transfer.packed_tensor import packed_ipc_producer

    gpu_uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    for chunk in packed_ipc_producer(iter(weights), gpu_uuid, lambda item: item[1], buffer_size_bytes=buffer_bytes):
        yield {
            "names": chunk.names,
            "dtype_names": chunk.dtype_names,
            "shapes": chunk.shapes,
            "tensor_sizes": chunk.tensor_sizes,
            "ipc_handles_pickled": base64.b64encode(pickle.dumps(chunk.ipc_handle)).decode("ascii"),
        }


# -- worker side (runs in vLLM's worker process) --------------------------------------------------------------


@dataclass
class SharedMemoryInitInfo(WeightTransferInitInfo):
    pass


@dataclass
class SharedMemoryUpdateInfo(WeightTransferUpdateInfo):
    path: str
    layout: list


class SharedMemoryWeightTransferEngine(WeightTransferEngine[SharedMemoryInitInfo, SharedMemoryUpdateInfo]):
    """Loads pushes from a `SharedWeightBuffer`: maps the file once (remapped when the trainer's layout changes)
    and hands the model zero-copy views of it, inside vLLM's layerwise reload."""

    init_info_cls = SharedMemoryInitInfo
    update_info_cls = SharedMemoryUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._maps: dict[str, mmap.mmap] = {}

    def init_transfer_engine(self, init_info: SharedMemoryInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict) -> None:
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():  # the base class synchronises unconditionally, which fails on CPU
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: SharedMemoryUpdateInfo) -> None:
        if update_info.path not in self._maps:
            self.shutdown()  # a buffer of an earlier layout: release it
            with open(update_info.path, "r+b") as f:
                self._maps[update_info.path] = mmap.mmap(f.fileno(), 0)
        self.model.load_weights(iter(_views(self._maps[update_info.path], update_info.layout).items()))

    def shutdown(self) -> None:
        for path in list(self._maps):
            _close(self._maps.pop(path))


def _close(buffer: mmap.mmap) -> None:
    try:
        buffer.close()
    except BufferError:  # a tensor still views it; the mapping goes when that tensor does
        pass


def _views(buffer: mmap.mmap, layout: list) -> dict[str, torch.Tensor]:
    """Tensors viewing `buffer` (no copy) at the layout's offsets."""
    storage = torch.frombuffer(buffer, dtype=torch.uint8)
    views = {}
    for name, offset, shape, dtype in layout:
        dtype = getattr(torch, dtype)
        views[name] = storage[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
    return views
