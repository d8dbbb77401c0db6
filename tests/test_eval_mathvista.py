"""MathVista: both local layouts, the official prompt, rule-based extraction and the official scoring."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data import mathvista
from data.eval_common import strip_thinking
from data.mathvista import MathVistaProblem, extract_answer, normalize_extracted_answer, safe_equal

from .eval_fixtures import (
    MATHVISTA_SCHEMA,
    PID5_QUERY,
    evaluate,
    mathvista_records,
    mathvista_response,
    write_mathvista_hf,
    write_mathvista_json,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_mathvista_hf(tmp_path_factory.mktemp("mathvista_hf"))


@pytest.fixture(scope="module")
def problems(hf_dir):
    return {p.pid: p for p in mathvista.load(hf_dir).examples}


def problem(question_type="free_form", answer_type="integer", answer="14", choices=None, precision=None):
    return MathVistaProblem(
        pid="0",
        question="q",
        query="q",
        image=None,
        question_type=question_type,
        answer_type=answer_type,
        answer=answer,
        choices=choices,
        precision=precision,
    )


def is_right(response: str, p: MathVistaProblem) -> bool:
    extraction, _ = extract_answer(strip_thinking(response), p)
    return safe_equal(
        normalize_extracted_answer(extraction, p.choices, p.question_type, p.answer_type, p.precision), p.answer
    )


def test_both_layouts_load_the_same_problems(hf_dir, tmp_path):
    from_hf = mathvista.load(hf_dir).examples
    from_json = mathvista.load(write_mathvista_json(tmp_path)).examples
    assert len(from_hf) == len(from_json) == 24
    for a, b in zip(from_hf, from_json):
        assert (a.pid, a.query, a.answer, a.choices, a.precision, a.unit, a.metadata) == (
            b.pid,
            b.query,
            b.answer,
            b.choices,
            b.precision,
            b.unit,
            b.metadata,
        )
        assert a.image.size == (a.metadata["img_width"], a.metadata["img_height"])  # decoded_image bytes
        assert b.image.endswith(f"images/{b.pid}.png")  # the JSON layout's image path
    assert {p.precision for p in from_hf if p.answer_type == "float"} == {1, 2}  # 1.0 / 2.0 read as integers


def test_query_is_the_official_prompt(problems):
    assert problems["5"].query == PID5_QUERY
    for p in problems.values():  # the rebuilt text equals the shipped `query` field for every question kind
        assert mathvista.build_query(p) == p.query
    messages = mathvista.to_messages(problems["2"], instruction="Put the final answer in \\boxed{}.")
    image, text = messages[0]["content"]
    assert image == {"type": "image", "image": problems["2"].image}  # image first
    assert text["text"].startswith("Hint: Please answer the question requiring an integer answer")
    assert text["text"].endswith("(Unit: g)\nPut the final answer in \\boxed{}.")


def test_records_without_a_query_get_the_official_one(tmp_path):
    records = mathvista_records()
    for record in records:
        record["query"] = None
    problems = mathvista.load(write_mathvista_hf(tmp_path, records)).examples
    assert {p.pid: p.query for p in problems} == {r["pid"]: q["query"] for r, q in zip(records, mathvista_records())}


@pytest.mark.parametrize(
    "response, answer, precision, right",
    [
        ("<think>\nhmm</think>\n\nThe answer is \\boxed{1.45}.", "1.45", 2, True),
        ("</think>So the value is about 1.449.", "1.45", 2, True),  # rounded to the item's precision
        ("</think>\\boxed{0.60}", "0.6", 1, True),
        ("</think>\\boxed{0.64}", "0.6", 1, True),
        ("</think>\\boxed{0.66}", "0.6", 1, False),
        ("</think>\\boxed{\\frac{29}{20}}", "1.45", 2, True),  # a fraction, by value
        ("</think>1.5", "1.5", 1.0, True),  # the HF layout's float precision (a popular harness crashes on it)
    ],
)
def test_float_answers_round_to_the_precision(response, answer, precision, right):
    assert is_right(response, problem(answer_type="float", answer=answer, precision=precision)) is right


@pytest.mark.parametrize(
    "response, right",
    [
        ("</think>The answer is 1,000.", True),
        ("</think>\\boxed{1000.0}", True),
        ("</think>It holds 1000 g of flour.", True),  # a number in a sentence
        ("</think>1000", True),  # the official exact rule
        ("</think>There are 999 or 1000? I say 990.", False),  # the last number counts
        ("</think>\\boxed{x}", False),
    ],
)
def test_integer_answers(response, right):
    assert is_right(response, problem(answer="1000")) is right


@pytest.mark.parametrize(
    "response, right",
    [
        ("</think>\\boxed{[2014, 2016]}", True),
        ("</think>The years are [2014,2016].", True),  # spacing normalised to the gold's
        ("</think>The answer is 2014 and 2016.", True),
        ("</think>\\boxed{[2016, 2014]}", False),
    ],
)
def test_list_answers(response, right):
    assert is_right(response, problem(answer_type="list", answer="[2014, 2016]")) is right


CHOICES = ["97", "102", "107", "122"]


@pytest.mark.parametrize(
    "response, right",
    [
        ("</think>\\boxed{A}", True),
        ("</think>The answer is (A) 97.", True),
        ("</think>\\boxed{97}", True),  # the choice given as its text
        ("</think>The answer is 97 degrees.", True),  # text in other words: the closest choice
        ("</think>\\boxed{\\text{A}}", True),
        ("</think>97", True),  # the official exact-choice rule
        ("</think>B is too small and C too large, so A.", True),  # several letters: the last one
        ("</think>Not (C), not (D): (A).", True),
        ("</think>A triangle's angles sum to 180.", False),  # the article "A" is no option letter
        ("</think>\\boxed{B}", False),
        ("<think>\nThe answer is \\boxed{A}, I think, but", False),  # unclosed thinking: no answer
        ("</think>", False),  # no answer: wrong, not the closest choice to ""
    ],
)
def test_multiple_choice_answers(response, right):
    p = problem("multi_choice", "text", "97", choices=CHOICES)
    assert is_right(response, p) is right


def test_unclosed_thinking_is_no_answer_even_when_the_thoughts_hold_one():
    p = problem("multi_choice", "text", "97", choices=CHOICES)
    assert extract_answer(strip_thinking("<think>\nso \\boxed{A} ... wait"), p) == ("", "none")
    assert normalize_extracted_answer("", CHOICES, "multi_choice", "text", None) is None
    # with the official default, "" would be mapped to the closest (here: shortest) choice, a free guess
    assert normalize_extracted_answer("", CHOICES, "multi_choice", "text", None, ignore_empty_extractions=False) == "97"
    # a closed block: the answer after it counts, not the draft inside
    assert is_right("<think>\n\\boxed{B}? no.\n</think>\n\nThe answer is \\boxed{A}.", p)


def test_official_normalisation():
    assert normalize_extracted_answer("(b) 102", CHOICES, "multi_choice", "text", None) == "102"
    assert normalize_extracted_answer("C", CHOICES, "multi_choice", "text", None) == "107"
    assert normalize_extracted_answer("121", CHOICES, "multi_choice", "text", None) == "122"  # edit distance
    assert normalize_extracted_answer("14.0", None, "free_form", "integer", None) == "14"
    assert normalize_extracted_answer("1.456", None, "free_form", "float", 2.0) == "1.46"
    assert normalize_extracted_answer("abc", None, "free_form", "float", 1) is None
    assert mathvista.edit_distance("kitten", "sitting") == 3


def test_score_reports_every_grouping(problems):
    records = {r["pid"]: r for r in mathvista_records()}
    order = sorted(problems)
    responses = {pid: mathvista_response(records[pid], correct=i % 3 != 0) for i, pid in enumerate(order)}
    responses[order[1]] = "<think>\nstill thinking"  # truncated: no answer
    rows, results = mathvista.score(list(problems.values()), responses)
    expected = sum(i % 3 != 0 for i in range(len(order))) - 1
    assert (results["correct"], results["total"], results["no_answer"]) == (expected, 24, 1)
    assert set(results["by"]) == {*mathvista.GROUP_KEYS}
    assert sum(g["total"] for g in results["by"]["task"].values()) == 24
    skills = results["by"]["skills"]  # multi-label: an item counts in each of its skills
    assert sum(g["total"] for g in skills.values()) == sum(len(p.metadata["skills"]) for p in problems.values())
    accuracies = [g["accuracy"] for g in results["by"]["question_type"].values()]
    assert accuracies == sorted(accuracies, reverse=True)  # sorted as calculate_score.py does
    assert all(row["correct"] is (row["prediction"] == row["answer"]) for row in rows)


def test_bad_records_are_named_or_skipped_and_counted(tmp_path):
    records = mathvista_records()
    records[3]["answer_type"] = "fraction"
    records[4]["decoded_image"] = {"bytes": b"not an image", "path": "x.png"}
    records[5]["answer"] = None  # as in the test split
    root = write_mathvista_hf(tmp_path, records)
    with pytest.raises(ValueError, match=f"pid {records[3]['pid']}: .*'fraction'"):
        mathvista.load(root)
    result = mathvista.load(root, skip_invalid=True)
    assert len(result.examples) == 21
    assert result.reasons == {"malformed": 1, "corrupt_image": 1, "no_answer": 1}
    with pytest.raises(FileNotFoundError, match="no 'test' split"):
        mathvista.load(root, split="test")


def test_evaluate_rescores_predictions(hf_dir, tmp_path):
    records = mathvista_records()
    predictions = tmp_path / "predictions.jsonl"
    with open(predictions, "w") as file:
        for i, record in enumerate(records):
            file.write(json.dumps({"pid": record["pid"], "response": mathvista_response(record, i % 2 == 0)}) + "\n")
    out = tmp_path / "out"
    results = evaluate(
        ["--benchmark", "mathvista", "--data", str(hf_dir), "--predictions", str(predictions), "--out", str(out)]
    )
    assert (results["correct"], results["total"], results["split"]) == (12, 24, "testmini")
    assert json.loads((out / "results.json").read_text())["by"]["task"] == results["by"]["task"]
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and {"id", "response", "extraction", "prediction", "answer", "correct"} <= set(rows[0])
    assert "| figure question answering |" in (out / "results.md").read_text()
    # its own responses.jsonl re-scores to the same numbers
    again = evaluate(
        [
            "--benchmark",
            "mathvista",
            "--data",
            str(hf_dir),
            "--predictions",
            str(out / "responses.jsonl"),
            "--out",
            str(tmp_path / "again"),
        ]
    )
    assert again["by"] == results["by"]


def test_evaluate_names_a_bad_prediction(hf_dir, tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        json.dumps({"id": "5", "response": "A"}) + "\n" + json.dumps({"id": "9999", "response": "B"})
    )
    with pytest.raises(ValueError, match="line 2: id '9999' is not a \\(valid\\) problem"):
        evaluate(
            [
                "--benchmark",
                "mathvista",
                "--data",
                str(hf_dir),
                "--predictions",
                str(predictions),
                "--out",
                str(tmp_path),
            ]
        )


def test_parquet_file_path_and_schema(hf_dir):
    path = next((hf_dir / "data").glob("testmini-*.parquet"))
    assert pq.read_schema(path).equals(MATHVISTA_SCHEMA, check_metadata=False)
    assert len(mathvista.load(path).examples) == 24
    assert pa.types.is_struct(pq.read_schema(path).field("decoded_image").type)
