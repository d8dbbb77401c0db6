"""Evaluate a checkpoint on MathVista or MMMU with the official prompts and scoring (rule-based extraction).

    python -m scripts.evaluate --benchmark mathvista --data path/to/MathVista --model DIR --out outputs/eval/mathvista
    python -m scripts.evaluate --benchmark mmmu --data path/to/MMMU --model DIR --out outputs/eval/mmmu
    python -m scripts.evaluate --benchmark mathvista --data path/to/MathVista --predictions responses.jsonl --out DIR

With `--model`, responses are generated through the rollout engine (vLLM), greedy by default; with
`--predictions`, a JSON-lines file of `{"id": ..., "response": ...}` is re-scored (MathVista ids are pids;
`"pid"` is read too), e.g. the `responses.jsonl` of an earlier run. A response is the whole assistant turn: text
after the last `</think>` is the answer, and a thinking block left open means no answer.

Writes OUT/results.json (overall accuracy; MathVista by question type, answer type, task, skill, ...; MMMU by
discipline and subject), OUT/responses.jsonl (each response with its extraction and verdict) and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm.auto import tqdm

from data import mathvista, mmmu
from data.eval_common import THINK_TAGS
from data.records import read_jsonl

BENCHMARKS = {"mathvista": mathvista, "mmmu": mmmu}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    parser.add_argument("--data", required=True, help="the benchmark's local copy: a folder or a data file")
    parser.add_argument("--split", help="default: testmini (MathVista), validation (MMMU)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint directory to generate responses with (vLLM)")
    source.add_argument("--predictions", help="JSON-lines file of {id, response} to re-score")
    parser.add_argument("--out", required=True, help="directory for results.json, responses.jsonl and results.md")
    parser.add_argument("--limit", type=int, help="evaluate the first N problems only")
    parser.add_argument("--subjects", nargs="+", help="MMMU: evaluate these subjects only (e.g. Math Physics)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip and count invalid records instead of failing")
    parser.add_argument("--instruction", default="", help="extra line after the official prompt (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=4096, help="response budget (thinking included)")
    parser.add_argument("--max-model-len", type=int, default=8192, help="prompt (with image tokens) + response")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128, help="prompts per engine call (progress bar steps)")
    parser.add_argument("--no-thinking", action="store_true", help="close the thinking block empty (short-CoT mode)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs / compilation (faster start)")
    parser.add_argument(
        "--think-tags", nargs=2, default=list(THINK_TAGS), metavar=("START", "END"), help="with --predictions"
    )
    return parser.parse_args(argv)


def read_predictions(path: str | Path, known_ids: set[str]) -> dict[str, str]:
    """id -> response from a JSON-lines file; errors name the line of a bad, duplicate or unknown entry."""
    responses = {}
    for number, record in read_jsonl(path):
        item = record.get("id", record.get("pid")) if isinstance(record, dict) else None
        if item is None or not isinstance(record.get("response"), str):
            shown = json.dumps(record)[:200]
            raise ValueError(f"{path} line {number}: expected {{'id': ..., 'response': '...'}}, got {shown}")
        item = str(item)
        if item not in known_ids:
            raise ValueError(f"{path} line {number}: id {item!r} is not a (valid) problem of this split")
        if item in responses:
            raise ValueError(f"{path} line {number}: a second response for id {item!r}")
        responses[item] = record["response"]
    return responses


def generate_responses(engine, bench, problems: list, args: argparse.Namespace) -> dict[str, str]:
    """id -> full response (the thinking block the chat template opened + the completion), in batches."""
    template_kwargs = {"enable_thinking": False} if args.no_thinking else {}
    opened = open_thinking(engine.processor, **template_kwargs)
    responses = {}
    with tqdm(total=len(problems), desc=f"generating ({bench.NAME})", unit="problem") as progress:
        for start in range(0, len(problems), args.batch_size):
            batch = problems[start : start + args.batch_size]
            prompts = [engine.encode(bench.to_messages(p, args.instruction), **template_kwargs) for p in batch]
            try:
                groups = engine.generate(
                    prompts,
                    max_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    seed=args.seed,
                )
            except ValueError as error:  # "prompt {i}: ..." from the engine's checks of each request
                match = re.match(r"prompt (\d+): ", str(error))
                item = repr(batch[int(match.group(1))].id) if match else f"in {[p.id for p in batch]}"
                raise ValueError(f"{bench.NAME} problem {item}: {error}") from error
            for problem, (completion, *_) in zip(batch, groups):
                text = engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                responses[problem.id] = opened + text
            progress.update(len(batch))
    return responses


def open_thinking(processor, **template_kwargs) -> str:
    """What the chat template writes of the thinking block before the model's first token ("<think>\\n"), or ""
    when the generation prompt leaves no block open."""
    start_tag, end_tag = processor.think_start, processor.think_end
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": ""}]}], add_generation_prompt=True, **template_kwargs
    )
    start = prompt.rfind(start_tag)
    return prompt[start:] if start >= 0 and prompt.rfind(end_tag) < start else ""


def run(args: argparse.Namespace, engine=None) -> dict:
    """Load, generate (with `engine`, else a new RolloutEngine on `args.model`) or read responses, score, write."""
    bench = BENCHMARKS[args.benchmark]
    split = args.split or bench.DEFAULT_SPLIT
    if args.subjects and bench is not mmmu:
        raise ValueError("--subjects applies to MMMU only")
    loaded = bench.load(args.data, split=split, skip_invalid=args.skip_invalid)
    problems = mmmu.select_subjects(loaded.examples, args.subjects) if args.subjects else loaded.examples
    problems = problems[: args.limit]  # responses to the problems left out are ignored
    if not problems:
        raise ValueError(f"no {bench.NAME} problems to evaluate in {args.data} (split {split!r})")

    if args.predictions:
        responses = read_predictions(args.predictions, {p.id for p in loaded.examples})
        think_tags = tuple(args.think_tags)
        source = {"predictions": str(args.predictions)}
    else:
        own_engine = engine is None
        if own_engine:
            from trainers.rollout import RolloutEngine

            engine = RolloutEngine(
                args.model,
                max_model_len=args.max_model_len,
                max_images_per_prompt=max(len(p.images) for p in problems) or 1,
                dtype=args.dtype,
                seed=args.seed,
                enforce_eager=args.enforce_eager,
            )
        try:
            responses = generate_responses(engine, bench, problems, args)
        finally:
            if own_engine:
                engine.shutdown()
        think_tags = (engine.processor.think_start, engine.processor.think_end)
        source = {
            "model": str(args.model),
            "generation": {
                "max_new_tokens": args.max_new_tokens,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "seed": args.seed,
                "thinking": not args.no_thinking,
                "instruction": args.instruction,
            },
        }

    rows, scores = bench.score(problems, responses, think_tags)
    results = {
        "benchmark": bench.NAME,
        "dataset": bench.HF_DATASET,
        "split": split,
        **scores,
        "missing_responses": len(problems) - len(rows),
        "skipped": loaded.reasons,
        **source,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    with open(out / "responses.jsonl", "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(bench.markdown(results))
    notes = [f"{results['no_answer']} without an answer"]
    if results["missing_responses"]:
        notes.append(f"{results['missing_responses']} problem(s) without a response, left out")
    if loaded.skipped:
        notes.append(f"{loaded.skipped} invalid record(s) skipped: {loaded.reasons}")
    print(
        f"{bench.NAME} {split}: accuracy {results['accuracy']:.2%} ({results['correct']}/{results['total']}); "
        f"{'; '.join(notes)}; results in {out}"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
