"""Command-line configs for the trainers: `--config FILE.yaml` sets the defaults, further `--key value` flags override."""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import HfArgumentParser


def parse_config(config_class, argv: list[str] | None = None):
    """Parse a `TrainingArguments` subclass from `argv` (default: `sys.argv[1:]`): the YAML file after `--config`
    gives the defaults and any other flags override them."""
    import yaml

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(config_class)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 == len(argv):
            raise SystemExit("--config needs a YAML file")
        path = Path(argv[i + 1])
        del argv[i : i + 2]
        if not path.is_file():
            raise SystemExit(f"--config {path}: no such file")
        parser.set_defaults(**(yaml.safe_load(path.read_text()) or {}))
    (config,) = parser.parse_args_into_dataclasses(args=argv)
    return config


def freeze_vision(model, tower: bool, projector: bool) -> None:
    """Keep the vision encoder and/or the projector of a kimi_mm model (or a PEFT wrapper around one) fixed.

    Training the vision side together with a random LLM washes its features out (the projector is pulled towards
    whatever helps the text tokens long before the LLM has learned to look), whether the encoder is random or
    pretrained (`scripts/pretrain_vision.py`); with both fixed, the LLM learns to read them."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    modules = ([base.model.vision_tower] if tower else []) + ([base.model.multi_modal_projector] if projector else [])
    for module in modules:
        module.requires_grad_(False)
