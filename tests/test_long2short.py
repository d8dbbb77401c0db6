"""trainers/long2short.py (pair builder, scoring, shortest rejection sampling) and scripts/token_efficiency.py.

The vLLM-backed tests share one engine serving a tiny model that was first overfitted (a few seconds of SFT) to
answer one problem with a short correct, a long correct or a wrong chain of thought, so sampling it gives groups with
correct and incorrect responses of different lengths.
"""

import json
import os
from dataclasses import replace

import pytest
from transformers import AutoModelForImageTextToText

from data.loaders import load_examples
from data.synthetic import generate
from scripts.token_efficiency import evaluate_checkpoint, write_report
from trainers.long2short import (
    RejectionSamplingResult,
    ScoredResponse,
    build_dpo_pairs,
    load_preference_pairs,
    sampling_stats,
    score_completion,
    shortest_correct,
    write_long2short_data,
)
from trainers.rollout import Completion
from trainers.sft import ChatSFTDataset, SFTConfig, SFTTrainer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def group(*samples: tuple[bool, int]) -> list[ScoredResponse]:
    """Responses from (correct, num_tokens) pairs; each text names its index."""
    return [ScoredResponse(f"response {i}", n, ok) for i, (ok, n) in enumerate(samples)]


def negatives(pairs, responses) -> list[int]:
    return [responses.index(rejected) for _, rejected in pairs]


# -- the pair builder --------------------------------------------------------------------------------------------


def test_negatives_are_longer_wrong_and_much_longer_correct_responses():
    responses = group((True, 10), (False, 8), (False, 12), (True, 10), (True, 15), (True, 14), (False, 10))
    pairs = build_dpo_pairs(responses)
    assert all(chosen is responses[0] for chosen, _ in pairs)
    # not 1 (wrong but shorter), 3 (tie for shortest), 5 (14 < 1.5 x 10), 6 (wrong, equally long)
    assert negatives(pairs, responses) == [2, 4]  # 4: exactly 1.5 x 10, the boundary is included


def test_ties_for_the_shortest_correct_response_take_the_first():
    responses = group((False, 30), (True, 20), (True, 20), (True, 30))
    assert shortest_correct(responses) == 1
    pairs = build_dpo_pairs(responses)
    assert all(chosen is responses[1] for chosen, _ in pairs) and negatives(pairs, responses) == [0, 3]


def test_no_correct_response_gives_no_pairs():
    responses = group((False, 5), (False, 50))
    assert shortest_correct(responses) is None and build_dpo_pairs(responses) == []
    assert build_dpo_pairs([]) == []


def test_all_correct_responses_pair_only_the_much_longer_ones():
    responses = group((True, 4), (True, 6), (True, 5), (True, 8), (True, 4))
    assert negatives(build_dpo_pairs(responses), responses) == [1, 3]


def test_the_1_5x_boundary_on_odd_lengths():
    responses = group((True, 7), (True, 10), (True, 11), (False, 8))
    assert negatives(build_dpo_pairs(responses), responses) == [2, 3]  # 10 < 10.5 <= 11


def test_thresholds_are_configurable_and_checked():
    responses = group((True, 10), (False, 12), (False, 16), (True, 15), (True, 20))
    pairs = build_dpo_pairs(responses, correct_ratio=2.0, incorrect_ratio=1.5)
    assert negatives(pairs, responses) == [2, 4]
    with pytest.raises(ValueError, match="correct_ratio must be above 1"):
        build_dpo_pairs(responses, correct_ratio=1.0)
    with pytest.raises(ValueError, match="incorrect_ratio must be non-negative"):
        build_dpo_pairs(responses, incorrect_ratio=-1)


# -- scoring -----------------------------------------------------------------------------------------------------


def completion(tokenizer, text: str, finish_reason: str = "stop") -> Completion:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return Completion(ids, [0.0] * len(ids), finish_reason, [0] * len(ids))


@pytest.mark.parametrize(
    ("text", "finish_reason", "correct"),
    [
        ("I count 3.\n</think>\n\n\\boxed{3}<|im_end|>", "stop", True),
        ("I count 3.\n</think>\n\nThe answer is 3.<|im_end|>", "stop", False),  # no \\boxed{}
        ("I count 3.\n</think>\n\n\\boxed{4}<|im_end|>", "stop", False),
        ("I count 3.\n</think>\n\n\\boxed{3}", "length", False),  # cut by the token budget
        ("So \\boxed{3}<|im_end|>", "stop", False),  # never closed the thinking block
        ("\\boxed{3} is wrong\n</think>\n\n\\boxed{5}<|im_end|>", "stop", False),  # only the final part counts
        ("I\n</think>\nI count 3.\n</think>\n\n\\boxed{3}<|im_end|>", "stop", False),  # closed twice
        ("I count 3.\n</think>\n\n\\boxed{3} or \\boxed{4}<|im_end|>", "stop", False),  # two answers
    ],
)
def test_score_completion(processor, text, finish_reason, correct):
    example = generate(1, seed=0)[0]
    example = replace(example, answer="3", choices=None)
    scored = score_completion(completion(processor.tokenizer, text, finish_reason), example, processor)
    assert scored.correct is correct
    assert scored.text == text and scored.num_tokens == len(
        processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def test_sampling_stats_count_problems_without_a_correct_response():
    groups = [group((True, 10), (False, 30), (True, 20)), group((False, 5), (False, 7), (False, 6))]
    stats = sampling_stats(RejectionSamplingResult([generate(1, seed=0)[0]], groups, ["p2"]))
    assert (stats["problems"], stats["kept"], stats["no_correct"], stats["no_correct_ids"]) == (2, 1, 1, ["p2"])
    assert stats["sample_accuracy"] == 2 / 6 and stats["mean_tokens_all"] == 13
    assert stats["mean_tokens_correct"] == 15 and stats["mean_tokens_kept"] == 10


def test_bad_pair_files_are_refused_or_counted(tmp_path):
    example = {"problem": "How many?", "answer": "3", "images": []}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(example | {"id": "a"}) + "\n" + json.dumps(example | {"id": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: duplicate id 'a'"):
        load_preference_pairs(path)
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: invalid JSON"):
        load_preference_pairs(path)
    rows = [
        example | {"chosen": "short", "rejected": ["long", "longer"]},
        example | {"chosen": "short", "rejected": "long"},
        example | {"rejected": "long"},  # no chosen text
        {"problem": "How many?", "chosen": "a", "rejected": "b"},  # no answer
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs, skipped = load_preference_pairs(path)
    assert [(p.chosen, p.rejected) for p in pairs] == [("short", "long"), ("short", "longer"), ("short", "long")]
    assert skipped == 2
    with pytest.raises(FileNotFoundError, match="no preference pairs file"):
        load_preference_pairs(tmp_path / "missing")


# -- on a real engine --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems():
    """A problem the model is overfitted to, and one it never saw."""
    trained, unseen = generate(2, seed=0)
    assert trained.answer not in (unseen.answer, "9")
    return [trained, unseen]


@pytest.fixture(scope="module")
def overfit_dir(tiny_dir, processor, problems, tmp_path_factory):
    trained = problems[0]
    variants = [
        (trained.answer, f"I see it. So the answer is {trained.answer}."),
        (
            trained.answer,
            "I look at the picture carefully and count every shape of that colour one by one. "
            f"Let me check it again. So the answer is {trained.answer}.",
        ),
        ("9", "I look at the picture and I guess the number. So the answer is 9."),
    ]
    examples = [replace(trained, answer=a, reasoning=r, id=f"v{i}") for i, (a, r) in enumerate(variants)] * 8
    out = tmp_path_factory.mktemp("overfit")
    args = SFTConfig(
        output_dir=str(out),
        max_steps=60,
        per_device_train_batch_size=6,
        learning_rate=3e-3,
        save_strategy="no",
        lr_scheduler_type="constant",
        warmup_steps=0,
        use_cpu=True,
        seed=0,
        report_to=[],
    )
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    trainer = SFTTrainer(
        model=model, args=args, processing_class=processor, train_dataset=ChatSFTDataset(examples, processor, 1024)
    )
    trainer.train()
    return trainer.save_final(out / "final")


@pytest.fixture(scope="module")
def engine(overfit_dir):
    from trainers.rollout import RolloutEngine

    engine = RolloutEngine(overfit_dir, max_model_len=1024, dtype="float32", enforce_eager=True, seed=0)
    yield engine
    engine.shutdown()


@pytest.mark.slow
@pytest.mark.vllm
def test_shortest_rejection_sampling_output_trains_with_sft(engine, problems, processor, tmp_path):
    out = tmp_path / "l2s"
    stats = write_long2short_data(engine, problems, out, n=8, dpo_pairs=True, max_tokens=96)
    saved = json.loads((out / "stats.json").read_text())
    assert saved == stats and stats["problems"] == 2 and stats["kept"] + stats["no_correct"] == 2
    assert stats["kept"] >= 1 and problems[0].id not in stats["no_correct_ids"]
    assert stats["mean_tokens_kept"] <= stats["mean_tokens_correct"]

    loaded = load_examples(out)
    assert loaded.skipped == 0 and len(loaded.examples) == stats["kept"]
    kept = loaded.examples[0]
    assert kept.id == problems[0].id and kept.answer == problems[0].answer and kept.reasoning
    assert (
        kept.reasoning in {"I see it. So the answer is 3.".replace("3", problems[0].answer)} or len(kept.reasoning) > 0
    )

    pairs, skipped = load_preference_pairs(out)
    assert skipped == 0 and len(pairs) == stats["dpo_pairs"] > 0
    assert all(p.rejected != p.chosen and p.example.id == kept.id for p in pairs)
    assert pairs[0].chosen.split("</think>")[0].strip() == kept.reasoning

    # The SFT trainer reads the folder as it is.
    dataset = ChatSFTDataset(loaded.examples, processor, 1024)
    assert len(dataset) == len(loaded.examples)
    model = AutoModelForImageTextToText.from_pretrained(engine.path)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=2,
        per_device_train_batch_size=2,
        save_strategy="no",
        use_cpu=True,
        report_to=[],
    )
    SFTTrainer(model=model, args=args, processing_class=processor, train_dataset=dataset).train()


@pytest.mark.slow
@pytest.mark.vllm
def test_token_efficiency_evaluation_and_report(engine, problems, tmp_path):
    full = evaluate_checkpoint(engine, problems, max_tokens=96)
    assert full == evaluate_checkpoint(engine, problems, max_tokens=96)  # greedy: deterministic
    rows = full["examples"]
    assert [row["id"] for row in rows] == [p.id for p in problems]
    assert full["mean_tokens"] == sum(row["num_tokens"] for row in rows) / 2
    assert full["accuracy"] == sum(row["correct"] for row in rows) / 2
    cut = evaluate_checkpoint(engine, problems, max_tokens=4)  # too short to answer
    assert cut["accuracy"] == 0 and cut["mean_tokens"] == 4

    out = write_report({"full budget": full, "4 tokens": cut}, tmp_path / "report")
    table = (out / "token_efficiency.md").read_text()
    assert "| 4 tokens | 0.0% | 4.0 |" in table and "| full budget |" in table
    assert json.loads((out / "token_efficiency.json").read_text())["4 tokens"]["mean_tokens"] == 4
    assert (out / "token_efficiency.png").read_bytes()[:4] == b"\x89PNG"
