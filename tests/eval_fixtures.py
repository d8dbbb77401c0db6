"""MathVista and MMMU fixtures in the official schemas, written on the fly (images drawn with Pillow).

MathVista: the Hugging Face layout (`data/testmini-00000-of-00001.parquet` with `decoded_image` and a `metadata`
struct) and the official repository's layout (`testmini.json` keyed by pid, `images/`). MMMU: the Hugging Face
layout (`<Subject>/{dev,validation}-00000-of-00001.parquet`, `options` as a Python-list string, `image_1` ...
`image_7`).
"""

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

HINT_MC = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
HINT_INT = "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end."
HINT_FLOAT1 = (
    "Hint: Please answer the question requiring a floating-point number with one decimal place and provide the "
    "final value, e.g., 1.2, 1.3, 1.4, at the end."
)
HINT_FLOAT2 = (
    "Hint: Please answer the question requiring a floating-point number with two decimal places and provide the "
    "final value, e.g., 1.23, 1.34, 1.45, at the end."
)
HINT_LIST = (
    "Hint: Please answer the question requiring a Python list as an answer and provide the final list, "
    "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end."
)
# pid 5 of testmini, `query` as the dataset ships it.
PID5_QUERY = f"{HINT_MC}\nQuestion: Find $m\\angle H$\nChoices:\n(A) 97\n(B) 102\n(C) 107\n(D) 122"

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
MATHVISTA_SCHEMA = pa.schema(
    [
        ("pid", pa.string()),
        ("question", pa.string()),
        ("image", pa.string()),
        ("decoded_image", IMAGE_STRUCT),
        ("choices", pa.list_(pa.string())),
        ("unit", pa.string()),
        ("precision", pa.float64()),
        ("answer", pa.string()),
        ("question_type", pa.string()),
        ("answer_type", pa.string()),
        (
            "metadata",
            pa.struct(
                [
                    ("category", pa.string()),
                    ("context", pa.string()),
                    ("grade", pa.string()),
                    ("img_height", pa.int64()),
                    ("img_width", pa.int64()),
                    ("language", pa.string()),
                    ("skills", pa.list_(pa.string())),
                    ("source", pa.string()),
                    ("split", pa.string()),
                    ("task", pa.string()),
                ]
            ),
        ),
        ("query", pa.string()),
    ]
)
MMMU_SCHEMA = pa.schema(
    [("id", pa.string()), ("question", pa.string()), ("options", pa.string()), ("explanation", pa.string())]
    + [(f"image_{n}", IMAGE_STRUCT) for n in range(1, 8)]
    + [
        ("img_type", pa.string()),
        ("answer", pa.string()),
        ("topic_difficulty", pa.string()),
        ("question_type", pa.string()),
        ("subfield", pa.string()),
    ]
)


def png(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    """A small deterministic PNG: a coloured background with a few shapes."""
    image = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    draw = ImageDraw.Draw(image)
    for i in range(3):
        x, y = (seed * 13 + i * 29) % (size[0] - 20), (seed * 7 + i * 17) % (size[1] - 20)
        draw.ellipse((x, y, x + 18, y + 18), fill=((i * 80) % 256, 200, (seed * 40) % 256))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# -- MathVista ----------------------------------------------------------------------------------------------------

TASKS = [
    "figure question answering",
    "geometry problem solving",
    "math word problem",
    "visual question answering",
    "textbook question answering",
]
SKILLS = [
    ["arithmetic reasoning"],
    ["geometry reasoning", "algebraic reasoning"],
    ["arithmetic reasoning", "statistical reasoning"],
    ["numeric commonsense"],
    ["scientific reasoning", "logical reasoning"],
]


def _mathvista_record(
    pid, question, answer, question_type, answer_type, query, choices=None, unit=None, precision=None
):
    index = int(pid)
    width, height = 80 + 8 * (index % 5), 60 + 6 * (index % 4)
    return {
        "pid": pid,
        "question": question,
        "image": f"images/{pid}.png",
        "decoded_image": {"bytes": png(index, (width, height)), "path": f"{pid}.png"},
        "choices": choices,
        "unit": unit,
        "precision": precision,
        "answer": answer,
        "question_type": question_type,
        "answer_type": answer_type,
        "metadata": {
            "category": "math-targeted-vqa" if question_type == "multi_choice" else "general-vqa",
            "context": ["geometry diagram", "bar chart", "synthetic scene"][index % 3],
            "grade": ["high school", "elementary school", "college", "not applicable"][index % 4],
            "img_height": height,
            "img_width": width,
            "language": "chinese" if index % 11 == 0 else "english",
            "skills": SKILLS[index % 5],
            "source": ["Geometry3K", "ChartQA", "CLEVR-Math", "TabMWP"][index % 4],
            "split": "testmini",
            "task": TASKS[index % 5],
        },
        "query": query,
    }


def mathvista_records() -> list[dict]:
    """24 testmini-style records: multi_choice (2-6 options, letters to F), integer (with and without unit),
    float with precision 1 and 2, and list answers."""
    records = [
        _mathvista_record(
            "5", "Find $m\\angle H$", "97", "multi_choice", "text", PID5_QUERY, choices=["97", "102", "107", "122"]
        ),
        _mathvista_record(
            "2",
            "what is the total volume of the measuring cup?",
            "1000",
            "free_form",
            "integer",
            f"{HINT_INT}\nQuestion: what is the total volume of the measuring cup? (Unit: g)",
            unit="g",
        ),
        _mathvista_record(
            "225",
            "Which years had the highest sales?",
            "[2014, 2016]",
            "free_form",
            "list",
            f"{HINT_LIST}\nQuestion: Which years had the highest sales?",
        ),
    ]
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    for i in range(7):  # multiple choice, 2..6 options
        pid, n = str(10 + i), 2 + i % 5
        choices = colours[:n]
        question = f"What colour is shape {i}?"
        query = f"{HINT_MC}\nQuestion: {question}\nChoices:\n" + "\n".join(
            f"({chr(65 + k)}) {c}" for k, c in enumerate(choices)
        )
        records.append(_mathvista_record(pid, question, choices[i % n], "multi_choice", "text", query, choices=choices))
    for i in range(6):  # integers, some with a unit
        pid, unit = str(20 + i), "years" if i % 2 else None
        question = f"How many circles are there in row {i}?"
        query = f"{HINT_INT}\nQuestion: {question}" + (f" (Unit: {unit})" if unit else "")
        records.append(_mathvista_record(pid, question, str(3 + 7 * i), "free_form", "integer", query, unit=unit))
    for i in range(4):  # floats, precision 1 and 2
        pid, precision = str(30 + i), 1.0 + i % 2
        answer = f"{0.6 + i:.1f}" if precision == 1 else f"{1.45 + i:.2f}"
        question = f"What is the value of bar {i}?"
        records.append(
            _mathvista_record(
                pid,
                question,
                answer,
                "free_form",
                "float",
                f"{HINT_FLOAT1 if precision == 1 else HINT_FLOAT2}\nQuestion: {question}",
                precision=precision,
            )
        )
    for i in range(4):  # more lists
        pid = str(40 + i)
        question = f"Which two years had equal values in chart {i}?"
        records.append(
            _mathvista_record(
                pid, question, f"[{2000 + i}, {2005 + i}]", "free_form", "list", f"{HINT_LIST}\nQuestion: {question}"
            )
        )
    return records


def write_mathvista_hf(root: Path, records: list[dict] | None = None) -> Path:
    """The Hugging Face layout: ROOT/data/testmini-00000-of-00001.parquet."""
    path = root / "data" / "testmini-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(records or mathvista_records(), schema=MATHVISTA_SCHEMA), path)
    return root


def write_mathvista_json(root: Path) -> Path:
    """The official repository's layout: ROOT/testmini.json (keyed by pid, integer precision) + ROOT/images/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    data = {}
    for record in mathvista_records():
        record = dict(record)
        (root / record["image"]).write_bytes(record.pop("decoded_image")["bytes"])
        if record["precision"] is not None:
            record["precision"] = int(record["precision"])
        data[record["pid"]] = record
    (root / "testmini.json").write_text(json.dumps(data, indent=2))
    return root


def mathvista_response(record: dict, correct: bool) -> str:
    """A long-CoT response in our chat format, right or wrong."""
    if record["question_type"] == "multi_choice":
        index = record["choices"].index(record["answer"])
        letter = chr(65 + (index if correct else (index + 1) % len(record["choices"])))
        return f"<think>\nLet me look at the figure.\n</think>\n\nThe answer is \\boxed{{{letter}}}."
    answer = record["answer"] if correct else "[1, 2]" if record["answer_type"] == "list" else "999"
    return f"<think>\nCounting carefully.\n</think>\n\nThe answer is \\boxed{{{answer}}}."


# -- MMMU ---------------------------------------------------------------------------------------------------------


def _mmmu_record(split, subject, number, question, options, answer, question_type="multiple-choice", images=()):
    record = {
        "id": f"{split}_{subject}_{number}",
        "question": question,
        "options": str(options),
        "explanation": "",
        "img_type": "['Diagrams']",
        "answer": answer,
        "topic_difficulty": "Medium",
        "question_type": question_type,
        "subfield": subject.replace("_", " "),
    }
    for n in range(1, 8):
        record[f"image_{n}"] = {"bytes": png(number * 10 + n, (70 + 10 * n, 64)), "path": None} if n in images else None
    return record


def mmmu_records(split: str = "validation") -> list[dict]:
    """24 records over 6 subjects of 4 disciplines: multiple choice with images in the question or in the options,
    several and repeated `<image n>` placeholders, open numeric answers and list-valued gold answers."""
    records = []
    subjects = ["Accounting", "Math", "Art", "Chemistry", "Geography", "Clinical_Medicine"]
    for s, subject in enumerate(subjects):
        records += [
            _mmmu_record(
                split,
                subject,
                1,
                f"<image 1> What does the figure of {subject} show?",
                ["a circle", "a square", "a triangle", "a line"],
                "ABCD"[s % 4],
                images=(1,),
            ),
            _mmmu_record(
                split,
                subject,
                2,
                "Which option matches <image 1>?",
                ["<image 2>", "<image 3>", "neither"],
                "ABC"[s % 3],
                images=(1, 2, 3),
            ),
            _mmmu_record(
                split,
                subject,
                3,
                "Compare <image 1> and <image 2>. Is <image 1> larger?",
                ["Yes", "No"],
                "AB"[s % 2],
                images=(1, 2),
            ),
            _mmmu_record(
                split, subject, 4, f"<image 1> What is the value in {subject} terms?", [], "12.97", "open", images=(1,)
            ),
        ]
    records[7]["answer"] = "['24/7', '3.429']"  # Math_4: an open question with several accepted answers
    records[19]["answer"] = "['Tampa', 'Florida']"  # Geography_4
    return records


def write_mmmu_hf(root: Path, records: list[dict] | None = None) -> Path:
    """The Hugging Face layout: ROOT/<Subject>/validation-00000-of-00001.parquet (+ one dev file)."""
    by_subject = {}
    for record in records or mmmu_records():
        by_subject.setdefault("_".join(record["id"].split("_")[1:-1]), []).append(record)
    for subject, subject_records in by_subject.items():
        (root / subject).mkdir(parents=True, exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(subject_records, schema=MMMU_SCHEMA),
            root / subject / "validation-00000-of-00001.parquet",
        )
    dev = [_mmmu_record("dev", "Math", 1, "<image 1> Dev question?", ["x", "y"], "A", images=(1,))]
    pq.write_table(pa.Table.from_pylist(dev, schema=MMMU_SCHEMA), root / "Math" / "dev-00000-of-00001.parquet")
    return root


def mmmu_response(record: dict, correct: bool) -> str:
    if record["question_type"] == "multiple-choice":
        letters = "ABCD"[: len(eval_list(record["options"]))]
        letter = record["answer"] if correct else letters[(letters.index(record["answer"]) + 1) % len(letters)]
        return f"<think>\nThe figure shows it.\n</think>\n\nThe answer is ({letter})."
    gold = eval_list(record["answer"]) if record["answer"].startswith("[") else [record["answer"]]
    return f"<think>\nWorking it out.\n</think>\n\nThe answer is {gold[-1] if correct else '55.5'}."


def eval_list(text: str) -> list:
    import ast

    return ast.literal_eval(text)


def evaluate(argv: list[str]) -> dict:
    """`python -m scripts.evaluate ARGV`, returning the results it writes."""
    from scripts.evaluate import parse_args, run

    return run(parse_args(argv))
