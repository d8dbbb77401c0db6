"""scripts/evaluate.py end to end through vLLM: the tiny model answers the MathVista and MMMU fixtures.

One engine serves both benchmarks (start-up costs ~25 s on the CI machine).
"""

import json
import os

import pytest

from data import mathvista, mmmu
from scripts.evaluate import parse_args, run
from trainers.rollout import RolloutEngine

from .eval_fixtures import evaluate, mathvista_records, write_mathvista_hf, write_mmmu_hf

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

FIXTURES = {"mathvista": (mathvista, write_mathvista_hf), "mmmu": (mmmu, write_mmmu_hf)}


@pytest.fixture(scope="module")
def engine(tiny_dir):
    engine = RolloutEngine(tiny_dir, max_model_len=2048, max_images_per_prompt=3, dtype="float32", enforce_eager=True)
    yield engine
    engine.shutdown()


def evaluate_args(benchmark, data, tiny_dir, out, *extra):
    return parse_args(
        ["--benchmark", benchmark, "--data", str(data), "--model", str(tiny_dir), "--out", str(out)]
        + ["--max-new-tokens", "24", "--batch-size", "10", *extra]
    )


@pytest.mark.parametrize("benchmark", list(FIXTURES))
def test_generate_score_and_rescore(benchmark, engine, tiny_dir, tmp_path):
    bench, write = FIXTURES[benchmark]
    data = write(tmp_path / "data")
    problems = bench.load(data).examples
    prompt = engine.encode(bench.to_messages(problems[0]))  # the official prompt text, one image token per image
    assert prompt.token_ids.count(engine.image_token_id) == len(problems[0].images)
    first_text = next(b["text"] for b in bench.to_messages(problems[0])[0]["content"] if b["type"] == "text")
    assert first_text.strip() in engine.tokenizer.decode(prompt.token_ids)

    out = tmp_path / "out"
    results = run(evaluate_args(benchmark, data, tiny_dir, out), engine=engine)
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert results["total"] == len(rows) == 24 and results["model"] == str(tiny_dir)
    assert results["generation"]["max_new_tokens"] == 24 and results["generation"]["temperature"] == 0.0
    assert all(row["response"].startswith("<think>\n") for row in rows)  # the block the chat template opened
    unclosed = sum("</think>" not in row["response"] for row in rows)
    assert results["no_answer"] >= unclosed  # a random model mostly runs out of tokens while "thinking"
    assert results["correct"] == sum(row["correct"] for row in rows)

    again = evaluate(
        ["--benchmark", benchmark, "--data", str(data), "--predictions", str(out / "responses.jsonl")]
        + ["--out", str(tmp_path / "again")]
    )
    assert (again["correct"], again["no_answer"], again["by"]) == (
        results["correct"],
        results["no_answer"],
        results["by"],
    )


def test_too_long_prompt_names_the_problem(engine, tiny_dir, tmp_path):
    records = mathvista_records()[:3]
    records[1]["query"] = "Question: " + "how many circles are there " * 1000
    data = write_mathvista_hf(tmp_path / "data", records)
    with pytest.raises(
        ValueError, match=f"MathVista problem '{records[1]['pid']}': prompt 1: .* max_model_len is 2048"
    ):
        run(evaluate_args("mathvista", data, tiny_dir, tmp_path / "out"), engine=engine)
