"""MMMU (Yue et al., CVPR 2024): loading, the official prompt with interleaved images, official parsing and scoring.

    problems = load("path/to/MMMU", split="validation").examples
    rows, results = score(problems, {"validation_Accounting_1": "<think>\\n...</think>\\n\\nThe answer is (B)."})

Layout read (no download): the Hugging Face layout, one folder per subject holding `dev` / `validation` / `test`
parquet files (`id`, `question` with `<image n>` placeholders, `options` as a Python-list string, `image_1` ...
`image_7`, `answer`, `question_type`, ...), or merged parquet files with the same columns.

Fidelity to MMMU-Benchmark/MMMU (`eval/utils/eval_utils.py`, `data_utils.py`, `configs/llava1.5.yaml`):
- prompt: `construct_prompt` with the llava1.5 config: options lettered "(A) ..." one per line, then "Answer with
  the option's letter from the given choices directly." (or "Answer the question using a single word or
  phrase."); each `<image n>` placeholder is replaced by image n where it stands (its first occurrence);
- parsing: `parse_multi_choice_response` (bracketed letter, lone letter, option text in responses of more than 5
  words, the latest mention wins, else a random letter from `random.Random(42)`) and `parse_open_response`
  (key sub-responses after "is", "so", "therefore", ..., numbers, normalisation), kept in behaviour; a long-CoT
  final answer (`\\boxed{}` or "answer is ...") is parsed first when the response has one;
- scoring: `eval_multi_choice` and `eval_open` over the LIST of parsed predictions (a popular harness passes
  one prediction as a string, so `eval_open` walks its characters and every numeric open answer scores wrong);
  gold answers written as a Python list (e.g. "['24/7', '3.429']") are read as several accepted answers;
- a response with no answer (an unclosed thinking block, or nothing after it) is wrong, with no random letter;
- accuracy is micro-averaged overall, per discipline and per subject, as `main_eval_only.py` reports it.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .eval_common import (
    THINK_TAGS,
    InvalidRecord,
    accuracy,
    grouped_accuracy,
    load_problems,
    markdown_report,
    record_image,
    split_files,
    strip_thinking,
)
from .loaders import LoadResult
from .verify import _clean, extract_boxed

NAME = "MMMU"
HF_DATASET = "MMMU/MMMU"
DEFAULT_SPLIT = "validation"
MAX_IMAGES = 7
GROUP_TITLES = {"discipline": "By discipline", "subject": "By subject", "question_type": "By question type"}

DOMAIN_CAT2SUB_CAT = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": [
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ],
}
DISCIPLINE = {subject: domain for domain, subjects in DOMAIN_CAT2SUB_CAT.items() for subject in subjects}

MULTI_CHOICE_FORMAT = "{}\n\n{}\n\nAnswer with the option's letter from the given choices directly."
SHORT_ANSWER_FORMAT = "{}\n\nAnswer the question using a single word or phrase."
_IMAGE_PLACEHOLDER = re.compile(r"<image (\d+)>")


@dataclass
class MMMUProblem:
    """One MMMU item. `answer` is a letter for multiple choice, a string or a list of accepted strings for open."""

    id: str  # "validation_Accounting_1"
    question: str
    options: list[str]
    answer: str | list[str]
    question_type: str  # "multiple-choice", or anything else for open questions (official)
    images: dict[int, object] = field(default_factory=dict)  # n -> image n (path or lazily decoded PIL image)
    subfield: str = ""

    @property
    def subject(self) -> str:
        return "_".join(self.id.split("_")[1:-1])

    @property
    def discipline(self) -> str:
        return DISCIPLINE[self.subject]

    @property
    def multiple_choice(self) -> bool:
        return self.question_type == "multiple-choice"

    @property
    def all_choices(self) -> list[str]:
        return [chr(ord("A") + i) for i in range(len(self.options))]

    @property
    def index2ans(self) -> dict[str, str]:
        return dict(zip(self.all_choices, self.options))


def load(path: str | Path, split: str = DEFAULT_SPLIT, skip_invalid: bool = False) -> LoadResult:
    """The problems of a split, in the official order: by subject, then number."""
    result = load_problems(split_files(path, split, (".parquet",)), _problem, skip_invalid)
    result.examples.sort(key=lambda p: (p.subject, int(p.id.rsplit("_", 1)[1])))
    return result


def select_subjects(problems: list[MMMUProblem], subjects: list[str]) -> list[MMMUProblem]:
    """The problems of some subjects (official names, e.g. "Math", "Basic_Medical_Science")."""
    unknown = sorted(set(subjects) - set(DISCIPLINE))
    if unknown:
        raise ValueError(f"unknown MMMU subject(s) {unknown}; known: {sorted(DISCIPLINE)}")
    return [p for p in problems if p.subject in subjects]


def _problem(record: dict, folder: Path) -> MMMUProblem:
    problem_id = str(record.get("id") or "").strip()
    parts = problem_id.split("_")
    if len(parts) < 3 or not parts[-1].isdigit() or "_".join(parts[1:-1]) not in DISCIPLINE:
        raise InvalidRecord("malformed", f"id {problem_id!r} is not '<split>_<Subject>_<number>' with an MMMU subject")
    options = record.get("options") or "[]"
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (SyntaxError, ValueError) as error:
            raise InvalidRecord("malformed", f"{problem_id}: options {record.get('options')!r} do not parse") from error
    problem = MMMUProblem(
        id=problem_id,
        question=str(record.get("question") or ""),
        options=[str(option) for option in options],
        answer=_gold(record.get("answer")),
        question_type=str(record.get("question_type") or ""),
        subfield=str(record.get("subfield") or ""),
    )
    if not problem.answer or problem.answer == "?":
        raise InvalidRecord("no_answer", f"{problem_id}: no answer (the test split's labels are not public)")
    if problem.multiple_choice:
        golds = problem.answer if isinstance(problem.answer, list) else [problem.answer]
        if len(problem.options) < 2 or any(gold not in problem.all_choices for gold in golds):
            raise InvalidRecord(
                "malformed",
                f"{problem_id}: answer {problem.answer!r} is not a letter of its {len(problem.options)} options",
            )
    for n in sorted({int(n) for n in _IMAGE_PLACEHOLDER.findall(construct_prompt(problem))}):
        value = record.get(f"image_{n}")
        if not 1 <= n <= MAX_IMAGES or value is None:
            raise InvalidRecord("missing_image", f"{problem_id}: <image {n}> is referenced but image_{n} is empty")
        problem.images[n] = record_image(value, folder, f"{problem_id} image_{n}")
    return problem


def _gold(answer) -> str | list[str]:
    """The gold answer; one written as a Python list ("['24/7', '3.429']") is a list of accepted answers."""
    if isinstance(answer, list):
        return [str(a) for a in answer]
    answer = str(answer or "").strip()
    if answer.startswith("[") and answer.endswith("]"):
        try:
            parsed = ast.literal_eval(answer)
        except (SyntaxError, ValueError):
            return answer
        if isinstance(parsed, list) and parsed:
            return [str(a) for a in parsed]
    return answer


def construct_prompt(problem: MMMUProblem) -> str:
    """The official prompt text (`construct_prompt` with the llava1.5 config), `<image n>` placeholders kept."""
    if problem.multiple_choice:
        options = "".join(f"({letter}) {option}\n" for letter, option in problem.index2ans.items())
        return MULTI_CHOICE_FORMAT.format(problem.question, options)
    return SHORT_ANSWER_FORMAT.format(problem.question)


def to_messages(problem: MMMUProblem, instruction: str = "") -> list[dict]:
    """The chat for the model: the prompt text with each image at its first `<image n>` placeholder (a repeated
    placeholder stays as text), then an optional extra instruction on its own line."""
    text = construct_prompt(problem) + (f"\n{instruction}" if instruction else "")
    content, placed, start = [], set(), 0
    for match in _IMAGE_PLACEHOLDER.finditer(text):
        n = int(match.group(1))
        if n in placed:
            continue
        if text[start : match.start()]:
            content.append({"type": "text", "text": text[start : match.start()]})
        content.append({"type": "image", "image": problem.images[n]})
        placed.add(n)
        start = match.end()
    if text[start:]:
        content.append({"type": "text", "text": text[start:]})
    return [{"role": "user", "content": content}]


# -- official parsing ----------------------------------------------------------------------------------------------


def parse_multi_choice_response(
    response: str, all_choices: list[str], index2ans: dict[str, str], rng: random.Random | None = None
) -> str:
    """The predicted letter of a response (`eval_utils.parse_multi_choice_response`); a random letter when none
    is found, drawn from `rng` (the official code seeds the global generator with 42 at import)."""
    letter = match_multi_choice(response, all_choices, index2ans)
    return letter if letter is not None else (rng or random.Random(42)).choice(all_choices)


def match_multi_choice(response: str, all_choices: list[str], index2ans: dict[str, str]) -> str | None:
    """`parse_multi_choice_response` without its random fallback: None when no option is found."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "  # add space to avoid partial match
    index_ans, ans_with_brack = True, False
    candidates = [choice for choice in all_choices if f"({choice})" in response]  # (A) (B) (C) (D)
    if candidates:
        ans_with_brack = True
    else:
        candidates = [choice for choice in all_choices if f" {choice} " in response]  # A B C D
    if not candidates and len(response.split()) > 5:  # the option's content, in longer responses
        candidates = [index for index, ans in index2ans.items() if ans.lower() in response.lower()]
        index_ans = False
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    if index_ans:
        starts = [response.rfind(f"({can})" if ans_with_brack else f" {can} ") for can in candidates]
    else:
        starts = [response.lower().rfind(index2ans[can].lower()) for can in candidates]
    return candidates[starts.index(max(starts))]  # the latest mention (np.argmax: the first on ties)


def check_is_number(string: str) -> bool:
    try:
        float(string.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(string: str) -> list:
    """A number becomes a float rounded to 2 decimals; a string is lower-cased (one character -> padded forms)."""
    string = string.strip()
    if check_is_number(string):
        return [round(float(string.replace(",", "")), 2)]
    string = string.lower()
    if len(string) == 1:
        return [" " + string, string + " "]  # avoid trivial matches
    return [string]


def extract_numbers(string: str) -> list[str]:
    """Numbers with thousands commas, in scientific notation, and simple ones, in that order."""
    pattern_commas = r"-?\b\d{1,3}(?:,\d{3})+\b"
    pattern_scientific = r"-?\d+(?:\.\d+)?[eE][+-]?\d+"
    pattern_simple = r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"
    return (
        re.findall(pattern_commas, string) + re.findall(pattern_scientific, string) + re.findall(pattern_simple, string)
    )


def parse_open_response(response: str) -> list:
    """The candidate answers of an open response (`eval_utils.parse_open_response`): the shortest tail after a key
    phrase in each line, the numbers in those tails, normalised, without duplicates (in first-seen order; the official set's order is arbitrary)."""
    key_responses = _key_subresponses(response)
    pred_list = key_responses + [number for resp in key_responses for number in extract_numbers(resp)]
    return list(dict.fromkeys(normalized for pred in pred_list for normalized in normalize_str(pred)))


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # The official split pattern looks for a capital after ". " in the lower-cased text, so it splits on lines only.
    sub_responses = re.split(r"\.\s(?=[A-Z])|\n", response)
    indicators_of_keys = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
    key_responses = []
    for index, resp in enumerate(sub_responses):
        if index == len(sub_responses) - 1:
            indicators_of_keys.extend(["="])  # the last sentence may be an equation
        shortest = None  # the shortest tail after a key phrase
        for indicator in indicators_of_keys:
            if indicator in resp:
                tail = resp.split(indicator)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            key_responses.append(shortest)
    return key_responses or [response]


def eval_multi_choice(gold: str | list[str], pred: str | None) -> bool:
    """`eval_utils.eval_multi_choice`: the predicted letter equals the gold letter (or one of them)."""
    return pred in gold if isinstance(gold, list) else pred == gold


def eval_open(gold: str | list[str], pred_list: list) -> bool:
    """`eval_utils.eval_open`: a string prediction is right if it contains a (normalised) string gold answer, a
    number if it equals a gold number. `pred_list` is `parse_open_response`'s list, never a string."""
    if isinstance(pred_list, str):
        raise TypeError("eval_open takes the list parse_open_response returns; a string would be compared by character")
    golds = gold if isinstance(gold, list) else [gold]
    norm_answers = [normalized for answer in golds for normalized in normalize_str(answer)]
    for pred in pred_list:
        if isinstance(pred, str):
            if any(isinstance(answer, str) and answer in pred for answer in norm_answers):
                return True
        elif pred in norm_answers:
            return True
    return False


# -- scoring -------------------------------------------------------------------------------------------------------


def score(
    problems: list[MMMUProblem], responses: dict[str, str], think_tags: tuple[str, str] = THINK_TAGS
) -> tuple[list[dict], dict]:
    """Score the responses (id -> full response) of the problems that have one, in order (the random fallback
    draws from one `random.Random(42)`). Returns one row per scored problem and the results (overall, per
    discipline, per subject)."""
    rng = random.Random(42)
    rows = []
    for problem in problems:
        if problem.id not in responses:
            continue
        response = responses[problem.id]
        answer_text = strip_thinking(response, think_tags)
        final = extract_boxed(answer_text) if answer_text else None
        final = _clean(final) if final else None
        guessed = False
        if not (answer_text or "").strip():
            parsed, correct = None, False
        elif problem.multiple_choice:
            parsed = match_multi_choice(final, problem.all_choices, problem.index2ans) if final else None
            if parsed is None:
                parsed = match_multi_choice(answer_text, problem.all_choices, problem.index2ans)
            if parsed is None:
                parsed, guessed = rng.choice(problem.all_choices), True
            correct = eval_multi_choice(problem.answer, parsed)
        else:
            parsed = parse_open_response(final or answer_text)
            correct = eval_open(problem.answer, parsed)
        rows.append(
            {
                "id": problem.id,
                "response": response,
                "answer_text": answer_text,
                "final": final,
                "parsed_pred": parsed,
                "random_guess": guessed,
                "answer": problem.answer,
                "correct": correct,
                "question_type": problem.question_type,
                "subject": problem.subject,
                "discipline": problem.discipline,
            }
        )
    order = {subject: i for i, subject in enumerate(DISCIPLINE)}
    by = {
        "discipline": _ordered(grouped_accuracy(rows, "discipline"), list(DOMAIN_CAT2SUB_CAT)),
        "subject": _ordered(grouped_accuracy(rows, "subject"), sorted(order, key=order.get)),
        "question_type": grouped_accuracy(rows, "question_type"),
    }
    results = {
        **accuracy(row["correct"] for row in rows),
        "no_answer": sum(row["parsed_pred"] is None for row in rows),
        "random_guesses": sum(row["random_guess"] for row in rows),
        "by": by,
    }
    return rows, results


def _ordered(groups: dict[str, dict], order: list[str]) -> dict[str, dict]:
    return {label: groups[label] for label in order if label in groups}


def markdown(results: dict) -> str:
    return markdown_report(f"{NAME} {results.get('split', '')}".strip(), results, GROUP_TITLES)
