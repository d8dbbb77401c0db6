"""Write a checkpoint's model card (README.md) with the hub metadata and its evaluation results as `model-index`.

    python -m scripts.model_card --model DIR --results outputs/eval/mathvista/results.json outputs/eval/mmmu/results.json \\
        [--repo-id user/name] [--base-model Qwen/Qwen2.5-1.5B-Instruct] [--datasets ID ...] [--license apache-2.0]

The card is rendered from `model_cards/template.md` through `huggingface_hub`'s card API: metadata (license,
library_name transformers, pipeline_tag image-text-to-text, base_model, datasets, tags) and one `model-index`
entry per `results.json` written by `scripts/evaluate.py`. It is then validated locally (no network): the
metadata parses, the required fields are there, and the model-index round-trips to the same results.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "template.md"
REQUIRED = ("license", "library_name", "pipeline_tag")
TAGS = ["kimi_mm", "multimodal", "vision-language", "reasoning", "long-cot", "custom_code"]
GROUPS = {"MathVista": ("task", "task"), "MMMU": ("discipline", "discipline")}  # breakdown shown in the card


def read_results(paths: list[str | Path]) -> list[dict]:
    """The `results.json` files of `scripts/evaluate.py`; one per benchmark and split."""
    results, seen = [], {}
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"results file {path}: cannot be read as JSON ({error})") from error
        missing = [
            key for key in ("benchmark", "dataset", "split", "accuracy", "correct", "total") if key not in result
        ]
        if missing:
            raise ValueError(f"results file {path}: no {missing} (write it with scripts/evaluate.py)")
        key = (result["benchmark"], result["split"])
        if key in seen:
            raise ValueError(f"results files {seen[key]} and {path} are both {key[0]} {key[1]}; keep one")
        seen[key] = path
        results.append(result)
    return results


def eval_result(result: dict) -> EvalResult:
    """A `model-index` entry: accuracy in percent on the benchmark's hub dataset and split."""
    return EvalResult(
        task_type="image-text-to-text",
        task_name="Multimodal reasoning",
        dataset_type=result["dataset"],
        dataset_name=f"{result['benchmark']} ({result['split']})",
        dataset_split=result["split"],
        metric_type="accuracy",
        metric_name="Accuracy (%)",
        metric_value=round(100 * result["accuracy"], 1),
    )


def _decoding(result: dict) -> str:
    generation = result.get("generation")
    if not generation:
        return "re-scored predictions"
    sampling = "greedy" if generation["temperature"] == 0 else f"temperature {generation['temperature']}"
    thinking = "" if generation.get("thinking", True) else ", thinking off"
    return f"{sampling}, up to {generation['max_new_tokens']} new tokens{thinking}"


def _evaluation(result: dict) -> dict:
    group_key, group_name = GROUPS.get(result["benchmark"], (None, None))
    return {
        "benchmark": result["benchmark"],
        "split": result["split"],
        "accuracy": 100 * result["accuracy"],
        "correct": result["correct"],
        "total": result["total"],
        "no_answer": result.get("no_answer", 0),
        "decoding": _decoding(result),
        "group_name": group_name,
        "groups": result.get("by", {}).get(group_key, {}),
    }


def _num_parameters(model_dir: Path) -> str:
    from trainers.rollout import checkpoint_weight_shapes

    count = sum(math.prod(shape) for shape in checkpoint_weight_shapes(model_dir).values())
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _processor_config(model_dir: Path) -> dict:
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (model_dir / name).is_file():
            config = json.loads((model_dir / name).read_text())
            return {**config.get("image_processor", {}), **config}
    raise FileNotFoundError(f"{model_dir} has no processor files; save them with processor.save_pretrained(DIR)")


def build_card(
    model_dir: str | Path,
    results: list[dict],
    *,
    repo_id: str | None = None,
    model_name: str | None = None,
    base_model: list[str] | None = None,
    datasets: list[str] | None = None,
    license: str = "apache-2.0",
    language: list[str] | None = None,
    summary: str = "",
    training: str = "",
    template: str | Path = TEMPLATE,
) -> ModelCard:
    """The model card of the checkpoint in `model_dir`, with `results` (from `read_results`) as model-index."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a checkpoint (no config.json)")
    config = json.loads((model_dir / "config.json").read_text())
    processor = _processor_config(model_dir)
    text, vision = config["text_config"], config["vision_config"]
    model_name = model_name or (repo_id or model_dir.resolve().name).split("/")[-1]
    card_data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        language=language or ["en"],
        base_model=base_model[0] if base_model and len(base_model) == 1 else base_model or None,
        datasets=datasets or None,
        tags=TAGS,
        eval_results=[eval_result(result) for result in results] or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template),
        model_name=model_name,
        repo_id=repo_id or str(model_dir),
        summary=summary,
        training=training,
        license=license,
        base_models=base_model or [],
        num_parameters=_num_parameters(model_dir),
        text_model_type=text.get("model_type", "causal"),
        text_layers=text.get("num_hidden_layers"),
        text_width=text.get("hidden_size"),
        vocab_size=text.get("vocab_size"),
        vision_layers=vision.get("num_hidden_layers"),
        vision_width=vision.get("hidden_size"),
        patch_size=vision.get("patch_size", 14),
        merge_size=config.get("merge_size", 2),
        position_grid=config.get("projector_position_embeddings", 0),
        min_pixels=processor.get("min_pixels"),
        max_pixels=processor.get("max_pixels"),
        think_start=processor.get("think_start", "<think>"),
        think_end=processor.get("think_end", "</think>"),
        evaluations=[_evaluation(result) for result in results],
    )


def validate_card(card: ModelCard | str | Path) -> ModelCard:
    """Check a card without the network: its metadata parses (model-index included), the required fields are set,
    and every evaluation result has a dataset, a metric and a numeric value. Raises a ValueError listing what is
    wrong. (`ModelCard.validate()` asks the hub for its own check.)"""
    where = "model card" if isinstance(card, ModelCard) else f"model card {card}"
    if not isinstance(card, ModelCard):
        card = ModelCard.load(card)  # raises on a malformed YAML header or model-index
    data = card.data.to_dict()
    problems = [f"no {key!r}" for key in REQUIRED if not data.get(key)]
    if "model-index" in data:
        _, results = model_index_to_eval_results(data["model-index"])
        for result in results:
            if not result.dataset_type or not result.metric_type or not isinstance(result.metric_value, (int, float)):
                problems.append(f"model-index entry {result.dataset_name!r} lacks a dataset, metric or numeric value")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory (the card is written to DIR/README.md)")
    parser.add_argument("--results", nargs="*", default=[], help="results.json files of scripts/evaluate.py")
    parser.add_argument("--repo-id", help="hub repository id, used in the usage snippet")
    parser.add_argument("--model-name", help="default: the repository or directory name")
    parser.add_argument("--base-model", nargs="+", help="hub ids of the models it starts from")
    parser.add_argument("--datasets", nargs="+", help="hub ids of the training datasets")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--language", nargs="+", default=["en"])
    parser.add_argument("--summary", default="", help="a paragraph on what the model is for")
    parser.add_argument("--training", default="", help="a paragraph on how it was trained")
    parser.add_argument("--template", default=str(TEMPLATE))
    parser.add_argument("--out", help="default: DIR/README.md")
    args = parser.parse_args(argv)

    card = build_card(
        args.model,
        read_results(args.results),
        repo_id=args.repo_id,
        model_name=args.model_name,
        base_model=args.base_model,
        datasets=args.datasets,
        license=args.license,
        language=args.language,
        summary=args.summary,
        training=args.training,
        template=args.template,
    )
    out = Path(args.out or Path(args.model) / "README.md")
    card.save(out)
    validate_card(out)
    print(f"wrote the model card to {out} ({len(card.data.eval_results or [])} evaluation result(s)); it validates")


if __name__ == "__main__":
    main()
