"""MathVista (Lu et al., ICLR 2024): loading, the official prompt, rule-based answer extraction, official scoring.

    problems = load("path/to/MathVista", split="testmini").examples
    rows, results = score(problems, {"1": "<think>\\n...</think>\\n\\nThe answer is \\\\boxed{14}."})

Layouts read (no download): the Hugging Face layout (`data/testmini-*.parquet` with `decoded_image`) and the
official repository's JSON (`testmini.json`, a dict keyed by pid, with `images/` next to it).

Fidelity to lupantech/MathVista `evaluation/`:
- prompt: the record's `query` (hint first, then question and choices, as `build_query.py` ships it in
  `query.json`), image first; `build_query` rebuilds that text for records without one;
- extraction: the official rules first (an exact choice; a bare integer or float), then, in place of the GPT-4
  extractor, rules: the final answer (`\\boxed{}` or "answer is ...", read by value when it is a number or a
  fraction), else the last option letter, option text, number or list in the answer;
- scoring: `normalize_extracted_answer` (letter -> choice text, else the closest choice by edit distance; int;
  float rounded to `int(precision)`, which also reads the Hugging Face layout's float precision 1.0 that a popular
  harness passes to `round` and so scores every float item wrong; list) and `safe_equal` (string equality);
- an empty extraction (no answer: an unclosed thinking block, or nothing found) is wrong, as the official
  `ignore_empty_extractions` option scores it, instead of the closest choice to "";
- accuracy overall and per question type, answer type, task, skill (an item counts in each of its skills),
  language, source, category, context and grade, each sorted by accuracy as `calculate_score.py` does.
"""

from __future__ import annotations

import re
from collections import Counter
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
from .verify import _clean, _number, extract_boxed

NAME = "MathVista"
HF_DATASET = "AI4Math/MathVista"
DEFAULT_SPLIT = "testmini"
QUESTION_TYPES = ("multi_choice", "free_form")
ANSWER_TYPES = ("text", "integer", "float", "list")
GROUP_KEYS = ("question_type", "answer_type", "task", "skills", "language", "source", "category", "context", "grade")
GROUP_TITLES = {
    "question_type": "By question type",
    "answer_type": "By answer type",
    "task": "By task",
    "skills": "By skill",
    "category": "By category",
    "grade": "By grade",
    "language": "By language",
    "context": "By context",
    "source": "By source",
}

# The hints of `build_query.py` (shot_type "solution").
HINTS = {
    "multi_choice": "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "integer": "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.",
    (
        "float",
        1,
    ): "Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    (
        "float",
        2,
    ): "Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    "list": "Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_LIST = re.compile(r"\[([^\[\]]*)\]")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_LEADING_LETTER = re.compile(r"([A-Za-z])(?:[.:)]\s*.*)?", re.DOTALL)  # "B", "b", "B.", "B: 102", "B) 102"
_LONE_LETTER = re.compile(r"(?<![\w\\$])([A-Z])(?![\w$])")


@dataclass
class MathVistaProblem:
    """One MathVista item, with the fields scoring needs and its metadata (task, skills, ...)."""

    pid: str
    question: str
    query: str  # the official prompt text
    image: object  # path string or lazily decoded PIL image
    question_type: str  # "multi_choice" | "free_form"
    answer_type: str  # "text" | "integer" | "float" | "list"
    answer: str  # the choice TEXT for multi_choice; "[2014, 2016]" for lists
    choices: list[str] | None = None
    unit: str | None = None
    precision: int | None = None  # decimal places of float answers
    metadata: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.pid

    @property
    def images(self) -> list:
        return [self.image]


def load(path: str | Path, split: str = DEFAULT_SPLIT, skip_invalid: bool = False) -> LoadResult:
    """The problems of a split, from a parquet file / Hugging Face folder or the official JSON (+ `images/`)."""
    return load_problems(split_files(path, split, (".parquet", ".json")), _problem, skip_invalid)


def _problem(record: dict, folder: Path) -> MathVistaProblem:
    pid = str(record.get("pid") or "").strip()
    if not pid:
        raise InvalidRecord("malformed", "a record without a pid")
    question_type, answer_type = record.get("question_type"), record.get("answer_type")
    if question_type not in QUESTION_TYPES or answer_type not in ANSWER_TYPES:
        raise InvalidRecord(
            "malformed",
            f"pid {pid}: question_type {question_type!r} / answer_type {answer_type!r} is not one of "
            f"{QUESTION_TYPES} / {ANSWER_TYPES}",
        )
    choices = [str(choice) for choice in record.get("choices") or []] or None
    if question_type == "multi_choice" and (not choices or len(choices) < 2):
        raise InvalidRecord("malformed", f"pid {pid}: a multi_choice question with choices {choices!r}")
    precision = record.get("precision")
    precision = None if precision is None else int(precision)
    if answer_type == "float" and precision is None:
        raise InvalidRecord("malformed", f"pid {pid}: a float answer without a precision")
    answer = record.get("answer")
    if answer is None or str(answer).strip() == "":
        raise InvalidRecord("no_answer", f"pid {pid}: no answer (the test split's labels are not public)")
    image = record.get("decoded_image") or record.get("image")
    problem = MathVistaProblem(
        pid=pid,
        question=str(record.get("question") or ""),
        query=str(record.get("query") or ""),
        image=record_image(image, folder, f"pid {pid}"),
        question_type=question_type,
        answer_type=answer_type,
        answer=str(answer),
        choices=choices,
        unit=record.get("unit") or None,
        precision=precision,
        metadata=dict(record.get("metadata") or {}),
    )
    problem.query = problem.query or build_query(problem)
    return problem


def build_query(problem: MathVistaProblem) -> str:
    """The zero-shot prompt text as the dataset ships it in `query`: hint, question (+ unit), choices."""
    hint_key = "multi_choice" if problem.question_type == "multi_choice" else problem.answer_type
    if hint_key == "float":
        hint_key = ("float", problem.precision)
    if hint_key not in HINTS:
        raise InvalidRecord("malformed", f"pid {problem.pid}: no official hint for {hint_key!r}")
    lines = [HINTS[hint_key], f"Question: {problem.question}" + (f" (Unit: {problem.unit})" if problem.unit else "")]
    if problem.choices:
        lines += ["Choices:"] + [f"({chr(ord('A') + i)}) {choice}" for i, choice in enumerate(problem.choices)]
    return "\n".join(lines)


def to_messages(problem: MathVistaProblem, instruction: str = "") -> list[dict]:
    """The chat for the model: the image, then the query (and an optional extra instruction on its own line)."""
    text = problem.query + (f"\n{instruction}" if instruction else "")
    return [{"role": "user", "content": [{"type": "image", "image": problem.image}, {"type": "text", "text": text}]}]


# -- extraction ----------------------------------------------------------------------------------------------------


def extract_answer(answer_text: str | None, problem: MathVistaProblem) -> tuple[str, str]:
    """The extracted answer of a response's answer part (the text after its thinking block; None for no answer),
    and the rule that found it: "exact", "final", "letter", "choice", "number", "list", or "none" (nothing found)."""
    if not answer_text or not answer_text.strip():
        return "", "none"
    text = answer_text.strip()
    # The official rules, before the official GPT extractor.
    if problem.question_type == "multi_choice" and text in problem.choices:
        return text, "exact"
    if problem.answer_type in ("integer", "float"):
        try:
            return str(int(text) if problem.answer_type == "integer" else float(text)), "exact"
        except ValueError:
            pass
    final = extract_boxed(text)
    final = _clean(final).strip("\"'") if final else None
    if problem.question_type == "multi_choice":
        return _choice(final, text, problem.choices)
    if problem.answer_type == "list":
        found, rule = _last_list(final or text) or (_numbers_as_list(final) if final else None), "list"
    elif final and _number(final) is not None:  # "14", "1,000", "\\frac{3}{4}", "x = 2.5", "45°"
        found, rule = str(float(_number(final))), "final"
    else:
        found, rule = _last_number(final or text), "number"
    if found is not None:
        return found, "final" if final else rule
    return (final, "final") if final else ("", "none")


def _choice(final: str | None, text: str, choices: list[str]) -> tuple[str, str]:
    """An option letter (for `normalize_extracted_answer`) or an option's text."""
    letters = "".join(chr(ord("A") + i) for i in range(len(choices)))
    if final:
        by_text = [choice for choice in choices if choice.strip().lower() == final.lower()]
        if by_text:
            return by_text[0], "final"
        parenthesized = [m for m in _PAREN_LETTER.findall(final) if m in letters]
        leading = _LEADING_LETTER.fullmatch(final)
        if parenthesized:
            return parenthesized[-1], "final"
        if leading and leading.group(1).upper() in letters:
            return leading.group(1).upper(), "final"
        return final, "final"  # option text in other words: the closest choice wins, as officially
    letter = _last_letter(text, letters)
    if letter:
        return letter, "letter"
    lowered = text.lower()
    mentioned = [(lowered.rfind(choice.lower()), choice) for choice in choices if choice.lower() in lowered]
    if mentioned:
        return max(mentioned)[1], "choice"
    return "", "none"


def _last_letter(text: str, letters: str) -> str | None:
    """The last option letter: "(B)" anywhere, else a lone capital ("B", "B." -- not the article in "A line")."""
    parenthesized = [m for m in _PAREN_LETTER.findall(text) if m in letters]
    if parenthesized:
        return parenthesized[-1]
    lone = [
        m.group(1)
        for m in _LONE_LETTER.finditer(text)
        if m.group(1) in letters and not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end() :]))
    ]
    return lone[-1] if lone else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text.replace("\u2212", "-"))
    return numbers[-1].replace(",", "") if numbers else None


def _last_list(text: str) -> str | None:
    """The last bracketed list, written as the gold answers are: "[2007, 2008]"."""
    lists = _LIST.findall(text)
    if not lists:
        return None
    return "[" + ", ".join(item.strip().strip("'\"") for item in lists[-1].split(",") if item.strip()) + "]"


def _numbers_as_list(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return "[" + ", ".join(n.replace(",", "") for n in numbers) + "]" if numbers else None


# -- official normalisation and scoring ----------------------------------------------------------------------------


def normalize_extracted_answer(
    extraction,
    choices: list[str] | None,
    question_type: str,
    answer_type: str,
    precision: int | float | None,
    ignore_empty_extractions: bool = True,
) -> str | None:
    """`calculate_score.py::normalize_extracted_answer`, with `int(precision)` (the Hugging Face layout stores
    precision as a float) and empty extractions scored as no prediction (its `ignore_empty_extractions`)."""
    if question_type == "multi_choice":
        extraction = (
            extraction.strip() if isinstance(extraction, str) else ("" if extraction is None else str(extraction))
        )
        if ignore_empty_extractions and not extraction:
            return None
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        options = [chr(ord("A") + i) for i in range(len(choices))]
        if extraction in options:
            return choices[options.index(extraction)]
        return get_most_similar(extraction, choices)
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError):
        return None
    return extraction


def safe_equal(prediction, answer) -> bool:
    """`calculate_score.py::safe_equal`: plain equality of the normalised prediction and the gold answer string."""
    return prediction is not None and prediction == answer


def get_most_similar(prediction: str, choices: list[str]) -> str:
    """The choice with the smallest Levenshtein distance to `prediction` (the first on ties)."""
    distances = [edit_distance(prediction, choice) for choice in choices]
    return choices[distances.index(min(distances))]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), as python-Levenshtein's `distance`."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def score(
    problems: list[MathVistaProblem], responses: dict[str, str], think_tags: tuple[str, str] = THINK_TAGS
) -> tuple[list[dict], dict]:
    """Score the responses (pid -> full response) of the problems that have one. Returns one row per scored
    problem (response, extraction, prediction, correctness, metadata) and the results (overall and grouped)."""
    rows = []
    for problem in problems:
        if problem.pid not in responses:
            continue
        response = responses[problem.pid]
        answer_text = strip_thinking(response, think_tags)
        extraction, rule = extract_answer(answer_text, problem)
        prediction = normalize_extracted_answer(
            extraction, problem.choices, problem.question_type, problem.answer_type, problem.precision
        )
        rows.append(
            {
                "id": problem.pid,
                "response": response,
                "answer_text": answer_text,
                "extraction": extraction,
                "rule": rule,
                "prediction": prediction,
                "answer": problem.answer,
                "correct": safe_equal(prediction, problem.answer),
                "question_type": problem.question_type,
                "answer_type": problem.answer_type,
                "precision": problem.precision,
                **{key: problem.metadata.get(key) for key in GROUP_KEYS if key in problem.metadata},
            }
        )
    by = {}
    for key in GROUP_KEYS:
        groups = grouped_accuracy(rows, key, multi_label=key == "skills")
        if groups:
            by[key] = dict(sorted(groups.items(), key=lambda item: -item[1]["accuracy"]))
    results = {
        **accuracy(row["correct"] for row in rows),
        "no_answer": sum(not (row["answer_text"] or "").strip() for row in rows),
        "extraction_rules": dict(Counter(row["rule"] for row in rows)),
        "by": by,
    }
    return rows, results


def markdown(results: dict) -> str:
    return markdown_report(f"{NAME} {results.get('split', '')}".strip(), results, GROUP_TITLES)
