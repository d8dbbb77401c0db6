"""MMMU: the Hugging Face layout, the official prompt with interleaved images, official parsing and scoring."""

import json
import random

import pytest

from data import mmmu
from data.mmmu import eval_multi_choice, eval_open, parse_multi_choice_response, parse_open_response

from .eval_fixtures import evaluate, mmmu_records, mmmu_response, write_mmmu_hf


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_mmmu_hf(tmp_path_factory.mktemp("mmmu"))


@pytest.fixture(scope="module")
def problems(root):
    return mmmu.load(root).examples


def test_loads_the_split_in_official_order(root, problems):
    assert len(problems) == 24
    assert [p.subject for p in problems] == sorted(p.subject for p in problems)
    assert problems[0].id == "validation_Accounting_1" and problems[0].discipline == "Business"
    assert [p.id for p in mmmu.load(root, split="dev").examples] == ["dev_Math_1"]
    assert {p.subject for p in mmmu.select_subjects(problems, ["Math", "Art"])} == {"Math", "Art"}
    with pytest.raises(ValueError, match="unknown MMMU subject"):
        mmmu.select_subjects(problems, ["Maths"])
    by_id = {p.id: p for p in problems}
    assert by_id["validation_Math_4"].answer == ["24/7", "3.429"]  # a list-valued gold answer
    assert by_id["validation_Accounting_4"].answer == "12.97" and not by_id["validation_Accounting_4"].multiple_choice
    assert by_id["validation_Accounting_2"].options == ["<image 2>", "<image 3>", "neither"]
    assert sorted(by_id["validation_Accounting_2"].images) == [1, 2, 3]


def test_official_prompt(problems):
    by_id = {p.id: p for p in problems}
    assert mmmu.construct_prompt(by_id["validation_Art_3"]) == (
        "Compare <image 1> and <image 2>. Is <image 1> larger?\n\n(A) Yes\n(B) No\n\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert mmmu.construct_prompt(by_id["validation_Art_4"]) == (
        "<image 1> What is the value in Art terms?\n\nAnswer the question using a single word or phrase."
    )


def test_images_are_interleaved_at_their_placeholders(problems):
    by_id = {p.id: p for p in problems}
    art3 = by_id["validation_Art_3"]
    content = mmmu.to_messages(art3)[0]["content"]
    assert [block["type"] for block in content] == ["text", "image", "text", "image", "text"]
    assert content[0]["text"] == "Compare " and content[2]["text"] == " and "
    assert content[1]["image"] is art3.images[1] and content[3]["image"] is art3.images[2]
    assert content[4]["text"].startswith(". Is <image 1> larger?")  # a repeated placeholder stays text
    options = mmmu.to_messages(by_id["validation_Art_2"], instruction="Think first.")[0]["content"]
    assert [b["type"] for b in options] == ["text", "image", "text", "image", "text", "image", "text"]
    assert options[2]["text"] == "?\n\n(A) " and options[-1]["text"].endswith("directly.\nThink first.")


def test_missing_or_bad_records_are_named_or_skipped(tmp_path):
    records = mmmu_records()
    records[1]["image_3"] = None  # referenced in an option
    records[2]["options"] = "['Yes', 'No'"
    records[5]["answer"] = "?"  # as in the test split
    root = write_mmmu_hf(tmp_path, records)
    with pytest.raises(ValueError, match="validation_Accounting_2: <image 3> is referenced but image_3 is empty"):
        mmmu.load(root)
    result = mmmu.load(root, skip_invalid=True)
    assert len(result.examples) == 21
    assert result.reasons == {"missing_image": 1, "malformed": 1, "no_answer": 1}


CHOICES, INDEX2ANS = ["A", "B", "C", "D"], {"A": "a circle", "B": "a square", "C": "a triangle", "D": "a line"}


@pytest.mark.parametrize(
    "response, expected",
    [
        ("(B)", "B"),
        ("The answer is B.", "B"),
        ("A and C are wrong, so the answer is B", "B"),  # several letters: the latest mention
        ("I prefer (A) over (C)", "C"),  # bracketed letters come first, then the latest
        ("The figure clearly shows a square shape here", "B"),  # option text, in more than 5 words
        ("It shows a triangle, not a line at all here", "D"),  # the latest option text
    ],
)
def test_parse_multi_choice_response(response, expected):
    assert parse_multi_choice_response(response, CHOICES, INDEX2ANS) == expected


def test_multi_choice_random_fallback_is_seeded_like_the_official_code():
    rng, reference = random.Random(42), random.Random(42)
    guesses = [parse_multi_choice_response("a square", CHOICES, INDEX2ANS, rng) for _ in range(5)]  # <= 5 words
    assert guesses == [reference.choice(CHOICES) for _ in range(5)]


@pytest.mark.parametrize(
    "gold, response, right",
    [
        ("12.97", "The answer is 12.97", True),  # a popular harness scores this wrong (see eval_open)
        ("12.97", "So the price is $12.97 per unit.", True),  # a number in a sentence
        ("12.97", "12.970", True),
        ("12.97", "The answer is 12.9", False),
        (["24/7", "3.429"], "Therefore x = 3.429", True),  # one of several accepted answers
        (["Tampa", "Florida"], "It is Tampa, in the west", True),
        ("Paris", "The city is London", False),
        ("1,000", "the total is 1000", True),
    ],
)
def test_open_answers(gold, response, right):
    assert eval_open(gold, parse_open_response(response)) is right


def test_eval_open_refuses_a_string_prediction():
    with pytest.raises(TypeError, match="list"):
        eval_open("12.97", "12.97")
    assert eval_multi_choice(["A", "B"], "B") and not eval_multi_choice("A", None)


def test_score(problems):
    records = {r["id"]: r for r in mmmu_records()}
    responses = {p.id: mmmu_response(records[p.id], correct=True) for p in problems}
    ids = [p.id for p in problems]
    responses[ids[0]] = "<think>\nthe answer is (A) maybe"  # unclosed: no answer, no random letter
    responses[ids[1]] = "<think>\nhmm\n</think>\n\nThe answer is \\boxed{" + records[ids[1]]["answer"] + "}."
    responses[ids[2]] = "<think>\nhmm\n</think>\n\nNo idea."  # nothing to parse: the official random letter
    rows, results = mmmu.score(problems, responses)
    assert results["no_answer"] == 1 and results["random_guesses"] == 1
    assert rows[0]["correct"] is False and rows[0]["parsed_pred"] is None
    assert rows[1]["correct"] is True and rows[1]["final"] == records[ids[1]]["answer"]
    assert results["total"] == 24 and results["correct"] == 22 + rows[2]["correct"]
    by = results["by"]
    assert list(by["discipline"]) == ["Art and Design", "Business", "Science", "Health and Medicine"]
    assert by["discipline"]["Science"]["total"] == 12
    assert by["discipline"]["Science"]["correct"] == sum(
        by["subject"][s]["correct"] for s in ["Chemistry", "Geography", "Math"]
    )
    assert list(by["subject"])[:3] == ["Art", "Accounting", "Chemistry"]  # the official table order


def test_a_boxed_option_text_falls_back_to_the_whole_answer():
    problem = mmmu.MMMUProblem(
        id="validation_Math_9",
        question="q",
        options=["a circle", "a square"],
        answer="B",
        question_type="multiple-choice",
    )
    response = "</think>The figure has four equal sides, so it is a square: \\boxed{square}"
    rows, _ = mmmu.score([problem], {problem.id: response})
    assert rows[0]["parsed_pred"] == "B" and rows[0]["random_guess"] is False


def test_evaluate_rescores_predictions(root, tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(
        "".join(
            json.dumps({"id": r["id"], "response": mmmu_response(r, i % 2 == 0)}) + "\n"
            for i, r in enumerate(mmmu_records())
        )
    )
    out = tmp_path / "out"
    results = evaluate(
        ["--benchmark", "mmmu", "--data", str(root), "--predictions", str(predictions), "--out", str(out)]
    )
    assert (results["correct"], results["total"], results["split"]) == (12, 24, "validation")
    saved = json.loads((out / "results.json").read_text())
    assert saved["by"]["subject"]["Math"] == results["by"]["subject"]["Math"]
    assert "## By discipline" in (out / "results.md").read_text()
    assert len((out / "responses.jsonl").read_text().splitlines()) == 24
    partial = evaluate(
        [
            "--benchmark",
            "mmmu",
            "--data",
            str(root),
            "--predictions",
            str(predictions),
            "--out",
            str(out),
            "--subjects",
            "Math",
        ]
    )
    assert partial["total"] == 4 and partial["missing_responses"] == 0
