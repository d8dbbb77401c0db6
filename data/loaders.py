"""Load problems from files and datasets into `Example`s, skipping and counting bad records.

Sources:
- a `.jsonl` / `.json` file (JSON lines, or one JSON array) or a `.parquet` file;
- a folder holding `data.jsonl` (what `data.synthetic.write_dataset` writes);
- a Hugging Face `datasets.Dataset` whose image columns (`image`, `images` or `decoded_image`) are `Image()`
  features, or a list of such columns;
- a list of records (dicts), as they would appear in a file.

Record schemas (`format`):
- "plain": `problem` (or `question`) and `answer`, images under `decoded_image`, `images` (a list) or `image`;
  optional `reasoning`, `task`, `difficulty`, `choices`, `id` and `scene`. This covers our synthetic `data.jsonl`,
  Geometry3K (its `<image>` tokens are removed from the problem; their number must match the images) and
  MathVista-style records (`choices` missing from the problem text are appended as "(A) ..." lines, and an
  answer given as an option's text becomes its letter).
- "chat": MM-Eureka-style: `message`, `messages` or `conversations` holds the chat turns (a list, or a JSON
  string of one); the user turns give the text and the images (`{"type": "image", "image": path}` blocks, else a
  record-level `image_urls` / `images` list); plus `answer`.
- "auto" (default): "chat" for records with one of the chat keys, "plain" otherwise.

An image is a file path (absolute, `file://...`, or relative to the file's folder or to `image_root`), raw bytes,
a `{"bytes": ..., "path": ...}` dict (how Hugging Face datasets store images) or a PIL image. Files are checked with
PIL's `verify()` (structure and checksums; pixels are decoded when used) and kept as path strings; bytes are
verified and kept as lazily decoded PIL images. Answers are stripped, and a `\\boxed{...}` or `$...$` around them
is removed.

Bad records never stop a load: they are skipped and counted in `LoadResult.reasons` under "bad_json",
"malformed", "no_problem", "no_answer", "missing_image", "corrupt_image" or "image_mismatch", and one warning
reports the counts with an example of each reason.
"""

import io
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .records import Example
from .verify import extract_boxed

logger = logging.getLogger(__name__)

FORMATS = ("auto", "plain", "chat")
CHAT_KEYS = ("message", "messages", "conversations")
IMAGE_KEYS = ("decoded_image", "images", "image")  # in order of preference
IMAGE_TOKEN = "<image>"


@dataclass
class LoadResult:
    """The examples that loaded, and why the others were skipped (reason -> count)."""

    examples: list[Example]
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())


class _Skip(Exception):
    """A record that cannot become an `Example`, with the reason it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class _BadJson:
    """Stands in for a line of a JSON-lines file that does not parse."""

    def __init__(self, error: json.JSONDecodeError):
        self.error = error


def load_examples(source, format: str = "auto", image_root: str | None = None) -> LoadResult:
    """Read `source` (a file, a dataset folder, a `datasets.Dataset` or a list of records) into `Example`s.

    Relative image paths are resolved against `image_root`, else the file's folder (else the working directory).
    Raises for a missing source or an unknown format; bad records are skipped and counted, never raised."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    datasets = sys.modules.get("datasets")  # a Dataset can only exist if the library is already imported
    if datasets is not None and isinstance(source, datasets.Dataset):
        name, records, base = "dataset", _dataset_records(source), Path(image_root or ".")
    elif isinstance(source, (str, Path)):
        path = _data_file(Path(source))
        name, records, base = str(path), _file_records(path), Path(image_root) if image_root else path.parent
    elif isinstance(source, (list, tuple)):
        name, records, base = "records", iter(source), Path(image_root or ".")
    else:
        raise TypeError(
            f"cannot load from a {type(source).__name__}; pass a path, a datasets.Dataset or a list of records"
        )

    examples, reasons, first = [], Counter(), {}
    for index, record in enumerate(records):
        try:
            examples.append(_to_example(record, format, base, f"{Path(name).stem}-{index}"))
        except _Skip as skip:
            reasons[skip.reason] += 1
            first.setdefault(skip.reason, f"record {index}: {skip}")
        except (AttributeError, KeyError, TypeError, ValueError) as error:  # a record of an unexpected shape
            reasons["malformed"] += 1
            first.setdefault("malformed", f"record {index}: {type(error).__name__}: {error}")
    total = len(examples) + sum(reasons.values())
    if reasons:
        details = "; ".join(f"{reason}: {count} (first: {first[reason]})" for reason, count in sorted(reasons.items()))
        logger.warning("loaded %d of %d records from %s, skipped %s", len(examples), total, name, details)
    else:
        logger.info("loaded %d records from %s", len(examples), name)
    return LoadResult(examples, dict(reasons))


def _data_file(path: Path) -> Path:
    if path.is_dir():
        path = path / "data.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    if path.suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet")
    return path


def _file_records(path: Path) -> Iterator:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
        return
    with open(path, encoding="utf-8") as file:
        text = file.read()
    if text.lstrip().startswith("["):  # one JSON array
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} starts like a JSON array but does not parse: {error}") from error
        yield from records
        return
    for line in text.splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                yield _BadJson(error)


def _dataset_records(dataset) -> Iterator[dict]:
    """Rows of a `datasets.Dataset` read through Arrow, so `Image()` columns stay undecoded `{"bytes", "path"}`
    dicts: one corrupt image is one skipped record, not an exception in the middle of the iteration."""
    table = dataset.with_format("arrow")
    for start in range(0, len(dataset), 256):
        yield from table[start : start + 256].to_pylist()


def _to_example(record, format: str, base: Path, default_id: str) -> Example:
    if isinstance(record, _BadJson):
        raise _Skip("bad_json", f"invalid JSON: {record.error}")
    chat = format == "chat" or (format == "auto" and any(key in record for key in CHAT_KEYS))
    problem, images = _chat_problem(record) if chat else _plain_problem(record)
    example_id = str(record.get("id") or default_id)
    problem, images = _strip_image_tokens(problem, images)
    if not problem:
        raise _Skip("no_problem", f"{example_id}: no problem text")
    answer = _answer(record.get("answer"))
    if not answer:
        raise _Skip("no_answer", f"{example_id}: no answer")
    choices = record.get("choices") or None
    if choices is not None:
        choices = [str(choice) for choice in choices]
        problem, answer = _with_options(problem, answer, choices)
    return Example(
        problem=problem,
        answer=answer,
        images=[_image(value, base, example_id) for value in images],
        reasoning=str(record.get("reasoning") or ""),
        task=str(record.get("task") or ""),
        difficulty=min(5, max(1, int(record.get("difficulty") or 1))),
        choices=choices,
        id=example_id,
        scene=_scene(record.get("scene"), example_id),
    )


def _scene(value, example_id: str) -> dict[str, int] | None:
    """A synthetic record's scene annotations (slot name -> class index), or None."""
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        raise _Skip("malformed", f"{example_id}: scene must map slot names to integer classes, got {value!r:.80}")
    return {str(name): label for name, label in value.items()}


def _plain_problem(record: dict) -> tuple[str, list]:
    problem = record.get("problem")
    if problem is None:
        problem = record.get("question")
    images = next((record[key] for key in IMAGE_KEYS if record.get(key) is not None), [])
    return str(problem or ""), images if isinstance(images, list) else [images]


def _chat_problem(record: dict) -> tuple[str, list]:
    turns = next((record[key] for key in CHAT_KEYS if record.get(key)), [])
    if isinstance(turns, str):
        turns = json.loads(turns)
    texts, images = [], []
    for turn in turns:
        if turn.get("role") != "user":
            continue
        content = turn.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for block in blocks:
            if block.get("type") == "image":
                images.append(block.get("image"))
            elif block.get("type") == "text":
                texts.append(str(block.get("text") or ""))
    if not images:
        images = record.get("image_urls") or record.get("images") or []
    return "\n".join(texts), images if isinstance(images, list) else [images]


def _strip_image_tokens(problem: str, images: list) -> tuple[str, list]:
    """Remove `<image>` placeholders (images always come first in the user turn); their count must match."""
    tokens = problem.count(IMAGE_TOKEN)
    if tokens and tokens != len(images):
        raise _Skip("image_mismatch", f"the problem has {tokens} {IMAGE_TOKEN} token(s) but {len(images)} image(s)")
    return re.sub(r"[ \t]*" + re.escape(IMAGE_TOKEN) + r"[ \t]*\n?", " ", problem).strip(), images


def _answer(value) -> str:
    """The answer as a clean string: lists of one are unwrapped, `\\boxed{}` and `$...$` removed."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None or isinstance(value, (list, dict)):
        return ""
    text = str(value).strip()
    if "\\boxed" in text:
        text = extract_boxed(text) or text
    if len(text) > 1 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    return text


def _with_options(problem: str, answer: str, choices: list[str]) -> tuple[str, str]:
    """List the options in the problem if it does not already, and turn an option-text answer into its letter."""
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if "(A)" not in problem:
        problem += "\n" + "\n".join(f"({letter}) {choice}" for letter, choice in zip(letters, choices))
    if answer.upper() not in letters and answer in choices:
        answer = letters[choices.index(answer)]
    return problem, answer


def _image(value, base: Path, example_id: str):
    """A checked image: a path string for files, a lazily decoded PIL image for bytes."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes"):
            return _image_from_bytes(value["bytes"], f"{example_id}: image bytes ({value.get('path') or 'no path'})")
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return _image_from_bytes(bytes(value), f"{example_id}: image bytes")
    if not value:
        raise _Skip("missing_image", f"{example_id}: empty image entry")
    if not isinstance(value, (str, Path)):
        raise _Skip("malformed", f"{example_id}: an image given as a {type(value).__name__}")
    path = Path(str(value).removeprefix("file://"))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise _Skip("missing_image", f"{example_id}: image file {path} not found")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for bad files (OSError, SyntaxError, struct.error, ...)
        raise _Skip("corrupt_image", f"{example_id}: image file {path} is unreadable ({error})") from error
    return str(path)


def _image_from_bytes(data: bytes, label: str) -> Image.Image:
    try:
        Image.open(io.BytesIO(data)).verify()
        return Image.open(io.BytesIO(data))  # verify() leaves its image unusable: reopen, decoded on first use
    except Exception as error:  # PIL raises many types for bad bytes (OSError, SyntaxError, struct.error, ...)
        raise _Skip("corrupt_image", f"{label} are unreadable ({error})") from error
