"""Average the weights of two or more kimi_mm checkpoints (k1.5 long2short: merge a long-CoT and a short-CoT model).

    python scripts/merge.py --models outputs/long outputs/short [--weights 0.5 0.5] --out outputs/merged

The weights default to equal; they must be non-negative, one per model, and are normalised to sum to 1 (so
`--weights 3 1` means 0.75 / 0.25). Tensors are read one at a time from the safetensors files (memory-mapped by
`safe_open`) and the result is written shard by shard in the first model's layout (its
`model.safetensors.index.json` when sharded), so memory stays near one shard of the output. Floating-point tensors
are averaged in float32 and stored in the first model's dtype; other tensors must be equal in every model.

The config, generation config, processor, tokenizer, chat template and remote-code files are copied from the first
model. The models must share `model_type`, `architectures`, tensor names and shapes; otherwise a ValueError names
the model and the first tensor (and file) that differs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from contextlib import ExitStack
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
NOT_COPIED = {".safetensors", ".bin", ".pt", ".pth"}  # weights (merged, not copied) and pickles (never copied)


def tensor_files(checkpoint: Path) -> dict[str, str]:
    """Tensor name -> the safetensors file (relative to `checkpoint`) that holds it."""
    index = checkpoint / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (checkpoint / "model.safetensors").is_file():
        with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(f"{checkpoint}: no model.safetensors or {INDEX} (only safetensors checkpoints merge)")
    missing = sorted({name for name in weight_map.values() if not (checkpoint / name).is_file()})
    if missing:
        raise FileNotFoundError(f"{checkpoint}: {INDEX} lists {missing}, which do not exist")
    return weight_map


def normalised_weights(weights: list[float] | None, count: int) -> list[float]:
    """One non-negative weight per model, scaled to sum to 1 (equal weights when `weights` is None)."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise ValueError(f"{len(weights)} weights for {count} models; give one weight per model")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"weights must be finite and non-negative, got {weights}")
    total = sum(weights)
    if total == 0:
        raise ValueError(f"weights {weights} sum to 0")
    return [w / total for w in weights]


def check_compatible(models: list[Path], layouts: list[dict[str, str]], handles: list[dict[str, object]]) -> None:
    """Raise a ValueError naming the model, tensor and file where a model differs from the first one."""
    first_config = json.loads((models[0] / "config.json").read_text())
    for model, layout, opened in zip(models[1:], layouts[1:], handles[1:]):
        config = json.loads((model / "config.json").read_text())
        for key in ("model_type", "architectures"):
            if config.get(key) != first_config.get(key):
                raise ValueError(
                    f"{model}: config {key} {config.get(key)!r} differs from {first_config.get(key)!r} in {models[0]}"
                )
        missing, extra = sorted(layouts[0].keys() - layout.keys()), sorted(layout.keys() - layouts[0].keys())
        if missing or extra:
            raise ValueError(
                f"{model}: tensor names differ from {models[0]}: missing {missing[:5]}, unexpected {extra[:5]}"
                f"{' (and more)' if len(missing) > 5 or len(extra) > 5 else ''}"
            )
        for name, file in layout.items():
            shape = opened[file].get_slice(name).get_shape()
            first_shape = handles[0][layouts[0][name]].get_slice(name).get_shape()
            if shape != first_shape:
                raise ValueError(
                    f"tensor {name!r}: shape {shape} in {model / file} but {first_shape} in {models[0] / layouts[0][name]}"
                )


def merge(models: list[str | Path], out: str | Path, weights: list[float] | None = None) -> Path:
    """Write the weighted average of `models` (kimi_mm checkpoint folders) to `out` and return `out`."""
    models, out = [Path(m) for m in models], Path(out)
    if len(models) < 2:
        raise ValueError(f"merging needs at least two models, got {len(models)}")
    for model in models:
        if not (model / "config.json").is_file():
            raise FileNotFoundError(f"{model}: not a checkpoint folder (no config.json)")
        if model.resolve() == out.resolve():
            raise ValueError(f"--out {out} is one of the models being merged; write to a new folder")
    weights = normalised_weights(weights, len(models))
    layouts = [tensor_files(model) for model in models]
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        handles = [
            {file: stack.enter_context(safe_open(model / file, framework="pt")) for file in set(layout.values())}
            for model, layout in zip(models, layouts)
        ]
        check_compatible(models, layouts, handles)
        total_size = 0
        for file in sorted(set(layouts[0].values())):
            merged = {}
            for name in (name for name, f in layouts[0].items() if f == file):
                tensors = [opened[layout[name]].get_tensor(name) for opened, layout in zip(handles, layouts)]
                merged[name] = average(name, tensors, weights)
                total_size += merged[name].numel() * merged[name].element_size()
            save_file(merged, out / file, metadata={"format": "pt"})
            del merged
    if (models[0] / INDEX).is_file():
        index = {"metadata": {"total_size": total_size}, "weight_map": layouts[0]}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for path in models[0].iterdir():
        if path.is_file() and path.suffix not in NOT_COPIED and path.name != INDEX:
            shutil.copy2(path, out / path.name)
    return out


def average(name: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """sum_i weights[i] * tensors[i], computed in float32 and returned in the first tensor's dtype; a non-float
    tensor (an integer buffer) must be the same in every model and is returned as is."""
    if not tensors[0].is_floating_point():
        if not all(torch.equal(tensors[0], t) for t in tensors[1:]):
            raise ValueError(f"tensor {name!r} ({tensors[0].dtype}) differs between models and cannot be averaged")
        return tensors[0]
    total = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for tensor, weight in zip(tensors, weights):
        total.add_(tensor.float(), alpha=weight)
    return total.to(tensors[0].dtype)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="two or more kimi_mm checkpoint folders")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per model (normalised; default equal)")
    parser.add_argument("--out", required=True, help="folder to write the merged checkpoint to")
    args = parser.parse_args(argv)
    out = merge(args.models, args.out, args.weights)
    weights = normalised_weights(args.weights, len(args.models))
    print(f"merged {', '.join(f'{w:.3g} x {m}' for w, m in zip(weights, args.models))} into {out}")
    return out


if __name__ == "__main__":
    main()
