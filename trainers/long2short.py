"""long2short data (k1.5 §2.4): shortest rejection sampling and DPO pairs from a long-CoT model's own samples.

    python -m trainers.long2short --model CKPT --data DIR --out DIR [--n 8] [--max-tokens 1024] [--dpo-pairs]

Each problem is sampled `n` times through the rollout engine (`trainers.rollout.RolloutEngine`) and every response
is scored as the RL trainer scores it (`trainers.rewards`): correct when it finished (end-of-turn token), closed the
thinking block once with one `\\boxed{}` answer after it, and that answer passes `data.verify.is_correct`. Then,
per problem:
- shortest rejection sampling keeps the shortest correct response as an SFT example (its reasoning, the reference
  answer), written with `data.synthetic.write_dataset`, so `trainers/sft.py --train_data DIR` reads it directly;
- `build_dpo_pairs` takes that response as the positive and, as negatives, the incorrect responses longer than it
  and the correct responses at least 1.5 times its length (written to `DIR/dpo_pairs.jsonl` with `--dpo-pairs`;
  `trainers/dpo.py` reads it).
Problems with no correct response give neither and are counted.

A response text here is what the model wrote after the generation prompt (which opens the thinking block), special
tokens included: "reasoning\\n</think>\\n\\n\\boxed{4}<|im_end|>".
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from data.loaders import load_examples
from data.records import Example, read_jsonl, to_messages
from data.synthetic import write_dataset
from trainers.rewards import THINK_END, accuracy_reward, format_reward

logger = logging.getLogger(__name__)
PAIRS_FILE = "dpo_pairs.jsonl"


@dataclass
class ScoredResponse:
    """One sampled response to a problem, with its length in tokens and whether it is correct."""

    text: str
    num_tokens: int
    correct: bool


@dataclass
class PreferencePair:
    """A problem with a preferred (`chosen`) and a dispreferred (`rejected`) response text."""

    example: Example
    chosen: str
    rejected: str


@dataclass
class RejectionSamplingResult:
    """`examples`: the SFT examples (one per problem with a correct response); `groups`: every scored response, per
    input problem; `no_correct`: the ids of the problems without a correct response."""

    examples: list[Example]
    groups: list[list[ScoredResponse]]
    no_correct: list[str]


def shortest_correct(group: Sequence[ScoredResponse]) -> int | None:
    """The index of the shortest correct response (the first one on a tie), or None when none is correct."""
    correct = [i for i, response in enumerate(group) if response.correct]
    return min(correct, key=lambda i: group[i].num_tokens) if correct else None


def build_dpo_pairs(
    group: Sequence[ScoredResponse], correct_ratio: float = 1.5, incorrect_ratio: float = 1.0
) -> list[tuple[ScoredResponse, ScoredResponse]]:
    """(chosen, rejected) pairs from the scored responses to one problem (k1.5 §2.4).

    The positive is the shortest correct response (the first in `group` among equally short ones). The negatives,
    in `group` order, are the incorrect responses longer than `incorrect_ratio` x its length and the correct ones at
    least `correct_ratio` x its length (k1.5: "1.5 times longer"). No correct response, no pairs."""
    if correct_ratio <= 1:
        raise ValueError(f"correct_ratio must be above 1 (a correct negative must be longer), got {correct_ratio}")
    if incorrect_ratio < 0:
        raise ValueError(f"incorrect_ratio must be non-negative, got {incorrect_ratio}")
    best = shortest_correct(group)
    if best is None:
        return []
    chosen = group[best]
    return [
        (chosen, response)
        for i, response in enumerate(group)
        if i != best
        and (
            response.num_tokens >= correct_ratio * chosen.num_tokens
            if response.correct
            else response.num_tokens > incorrect_ratio * chosen.num_tokens
        )
    ]


def score_completion(completion, example: Example, processor) -> ScoredResponse:
    """Score a rollout `Completion` with the RL trainer's verdicts (`trainers.rewards`): correct when it finished
    (end-of-turn token), its answer after the thinking block is right (`accuracy_reward`) and its format is clean
    (`format_reward`: the block closed once, one `\\boxed{}` after it). The text is decoded from the token ids with
    special tokens kept, as the RL trainer does."""
    text = processor.tokenizer.decode(completion.token_ids, skip_special_tokens=False)
    correct = (
        completion.finish_reason == "stop"
        and accuracy_reward(None, [text], answer=[example.answer], choices=[example.choices])[0] == 1
        and format_reward(None, [text])[0] == 1
    )
    return ScoredResponse(text, len(completion.token_ids), correct)


def sample_groups(
    engine,
    examples: Sequence[Example],
    n: int = 8,
    max_tokens: int = 1024,
    temperature: float = 1.0,
    batch_size: int = 64,
    **sampling,
) -> list[list[ScoredResponse]]:
    """`n` scored responses per example from a `RolloutEngine`, in the order of `examples`."""
    groups = []
    for start in tqdm(range(0, len(examples), batch_size), desc="sampling", disable=len(examples) <= batch_size):
        batch = examples[start : start + batch_size]
        prompts = [engine.encode(to_messages(example, with_response=False)) for example in batch]
        outputs = engine.generate(prompts, n=n, max_tokens=max_tokens, temperature=temperature, **sampling)
        groups += [
            [score_completion(c, example, engine.processor) for c in completions]
            for example, completions in zip(batch, outputs)
        ]
    return groups


def shortest_rejection_sampling(engine, examples: Sequence[Example], n: int = 8, **sampling) -> RejectionSamplingResult:
    """Sample `n` responses per problem and keep the shortest correct one as an SFT example (k1.5 §2.4): the
    example's reasoning becomes the response's thinking block; its answer stays the reference answer. `sampling`
    goes to `sample_groups` (max_tokens, temperature, batch_size, seed, ...)."""
    groups = sample_groups(engine, examples, n=n, **sampling)
    kept, no_correct = [], []
    for example, group in zip(examples, groups):
        best = shortest_correct(group)
        if best is None:
            no_correct.append(example.id)
            continue
        kept.append(replace(example, reasoning=group[best].text.split(THINK_END, 1)[0].strip()))
    if no_correct:
        logger.warning("%d of %d problems have no correct response among %d samples", len(no_correct), len(groups), n)
    return RejectionSamplingResult(kept, groups, no_correct)


def preference_pairs(
    examples: Sequence[Example], groups: Sequence[Sequence[ScoredResponse]], **ratios
) -> list[PreferencePair]:
    """`build_dpo_pairs` on each problem's group (`ratios`: correct_ratio, incorrect_ratio)."""
    return [
        PreferencePair(example, chosen.text, rejected.text)
        for example, group in zip(examples, groups)
        for chosen, rejected in build_dpo_pairs(group, **ratios)
    ]


def write_preference_pairs(pairs: Sequence[PreferencePair], dataset_dir: str | Path) -> Path:
    """Write `dataset_dir/dpo_pairs.jsonl`: per problem, its record from `dataset_dir/data.jsonl`
    (written by `write_dataset`, images included) plus `chosen` (a text) and `rejected` (a list of texts).

    `load_preference_pairs(path)` reads it back; so do `data.loaders.load_examples` (the problems) and
    `datasets.load_dataset("json")`."""
    dataset_dir = Path(dataset_dir)
    records = {}
    with open(dataset_dir / "data.jsonl", encoding="utf-8") as file:
        for line in file:
            record = json.loads(line)
            records[record["id"]] = record
    grouped: dict[str, dict] = {}
    for pair in pairs:
        if pair.example.id not in records:
            raise ValueError(f"pair for problem {pair.example.id!r}, which is not in {dataset_dir / 'data.jsonl'}")
        entry = grouped.setdefault(pair.example.id, {**records[pair.example.id], "chosen": pair.chosen, "rejected": []})
        if entry["chosen"] != pair.chosen:
            raise ValueError(f"problem {pair.example.id!r}: pairs with different chosen responses; write one per file")
        entry["rejected"].append(pair.rejected)
    path = dataset_dir / PAIRS_FILE
    with open(path, "w", encoding="utf-8") as file:
        for entry in grouped.values():
            file.write(json.dumps(entry, ensure_ascii=False) + "\n")
    return path


def load_preference_pairs(path: str | Path) -> tuple[list[PreferencePair], int]:
    """Pairs from a jsonl file of problem records (see `data.loaders`) with `chosen` (a text) and `rejected` (a
    text or a list of texts), e.g. what `write_preference_pairs` writes. A folder means `folder/dpo_pairs.jsonl`.
    Returns the pairs and the number of records skipped (bad problem, or no chosen/rejected text)."""
    path = Path(path)
    if path.is_dir():
        path = path / PAIRS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no preference pairs file at {path}")
    responses = {}
    for number, record in read_jsonl(path):
        record["id"] = str(record.get("id") or f"{path.stem}-{number}")
        if record["id"] in responses:
            raise ValueError(f"{path}:{number}: duplicate id {record['id']!r}; give each problem one record")
        responses[record["id"]] = record
    loaded = load_examples(list(responses.values()), image_root=str(path.parent))
    pairs, skipped = [], loaded.skipped
    for example in loaded.examples:
        record = responses[example.id]
        chosen, rejected = record.get("chosen"), record.get("rejected")
        rejected = [rejected] if isinstance(rejected, str) else rejected or []
        if not isinstance(chosen, str) or not chosen or not all(isinstance(r, str) and r for r in rejected):
            logger.warning("%s: record %r has no chosen text or a rejected entry that is not a text", path, example.id)
            skipped += 1
            continue
        pairs += [PreferencePair(example, chosen, text) for text in rejected]
    return pairs, skipped


def sampling_stats(result: RejectionSamplingResult) -> dict:
    """Counts (problems, kept, no_correct and their ids), the samples' accuracy and mean response tokens: of all
    samples, of the correct ones and of the kept (shortest correct) ones."""
    responses = [r for group in result.groups for r in group]
    correct = [r for r in responses if r.correct]
    kept = [group[best] for group in result.groups if (best := shortest_correct(group)) is not None]
    return {
        "problems": len(result.groups),
        "kept": len(result.examples),
        "no_correct": len(result.no_correct),
        "no_correct_ids": result.no_correct,
        "sample_accuracy": sum(r.correct for r in responses) / max(len(responses), 1),
        "mean_tokens_all": sum(r.num_tokens for r in responses) / max(len(responses), 1),
        "mean_tokens_correct": sum(r.num_tokens for r in correct) / max(len(correct), 1),
        "mean_tokens_kept": sum(r.num_tokens for r in kept) / max(len(kept), 1),
    }


def write_long2short_data(
    engine,
    examples: Sequence[Example],
    out: str | Path,
    n: int = 8,
    dpo_pairs: bool = False,
    correct_ratio: float = 1.5,
    incorrect_ratio: float = 1.0,
    **sampling,
) -> dict:
    """Shortest rejection sampling from a running `RolloutEngine` into `out` (an SFT dataset: data.jsonl + images/),
    with the DPO pairs of the same samples in `out/dpo_pairs.jsonl` when `dpo_pairs`; returns the `sampling_stats`
    (also written to `out/stats.json`). `sampling` goes to `sample_groups`."""
    examples = [e if e.id else replace(e, id=f"example-{i:06d}") for i, e in enumerate(examples)]  # ids join the files
    result = shortest_rejection_sampling(engine, examples, n=n, **sampling)
    out = write_dataset(result.examples, out)
    stats = sampling_stats(result)
    if dpo_pairs:
        pairs = preference_pairs(examples, result.groups, correct_ratio=correct_ratio, incorrect_ratio=incorrect_ratio)
        write_preference_pairs(pairs, out)
        stats["dpo_pairs"] = len(pairs)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the (long-CoT) kimi_mm checkpoint to sample from")
    parser.add_argument("--data", required=True, help="problems: a dataset folder or file (data.loaders)")
    parser.add_argument("--out", required=True, help="output folder: data.jsonl + images/ (SFT), stats.json")
    parser.add_argument("--n", type=int, default=8, help="samples per problem (k1.5: 8)")
    parser.add_argument("--max-tokens", type=int, default=1024, help="response budget in tokens")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dpo-pairs", action="store_true", help=f"also write DPO pairs to OUT/{PAIRS_FILE}")
    parser.add_argument("--correct-ratio", type=float, default=1.5, help="correct negatives: at least this x chosen")
    parser.add_argument("--incorrect-ratio", type=float, default=1.0, help="incorrect negatives: over this x chosen")
    args = parser.parse_args(argv)

    from trainers.rollout import RolloutEngine

    loaded = load_examples(args.data)
    if not loaded.examples:
        raise SystemExit(f"no usable problems in {args.data} (skipped: {loaded.reasons})")
    engine = RolloutEngine(args.model, max_model_len=args.max_model_len, seed=args.seed)
    try:
        stats = write_long2short_data(
            engine,
            loaded.examples,
            args.out,
            n=args.n,
            dpo_pairs=args.dpo_pairs,
            correct_ratio=args.correct_ratio,
            incorrect_ratio=args.incorrect_ratio,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
        )
    finally:
        engine.shutdown()
    print(
        f"long2short: {stats['kept']} of {stats['problems']} problems kept (shortest correct of {args.n}), "
        f"{stats['no_correct']} with no correct response; mean tokens of the correct samples "
        f"{stats['mean_tokens_correct']:.1f} -> {stats['mean_tokens_kept']:.1f} kept"
        + (f"; {stats['dpo_pairs']} DPO pairs in {PAIRS_FILE}" if args.dpo_pairs else "")
        + f"; SFT data in {args.out}"
    )
    return stats


if __name__ == "__main__":
    main()
