"""What MathVista and MMMU evaluation share: finding a split's files, reading records with their images, taking
the final answer out of a long-CoT response, and accuracy tables.

    strip_thinking("<think>\\nlet me see...</think>\\n\\nThe answer is \\\\boxed{B}.")  -> "\\n\\nThe answer is \\\\boxed{B}."
    strip_thinking("<think>\\nlet me see... (ran out of tokens)")                  -> None   (no answer)
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .loaders import LoadResult, _image, _Skip

logger = logging.getLogger(__name__)

THINK_TAGS = ("<think>", "</think>")


class InvalidRecord(ValueError):
    """A benchmark record that cannot be evaluated, with the reason it is counted under when skipped."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def strip_thinking(response: str | None, think_tags: tuple[str, str] = THINK_TAGS) -> str | None:
    """The answer part of a response: the text after the last closing tag, or the whole response when it has no
    thinking block. None when a thinking block is left open (the model ran out of tokens while thinking, so it gave
    no answer, even if the unfinished thoughts hold a candidate)."""
    if response is None:
        return None
    think_start, think_end = think_tags
    end = response.rfind(think_end)
    if response.rfind(think_start) > end:
        return None
    return response[end + len(think_end) :] if end >= 0 else response


def split_files(path: str | Path, split: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The data files of a split: `path` itself when it is a file, else the files below it named `{split}{suffix}`
    or `{split}-*{suffix}` (Hugging Face shards such as `data/testmini-00000-of-00001-725687bf7a18d64b.parquet`),
    sorted. The first suffix with any file wins."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in suffixes:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; expected {' or '.join(suffixes)}")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no data at {path}")
    for suffix in suffixes:
        files = sorted({*path.rglob(f"{split}{suffix}"), *path.rglob(f"{split}-*{suffix}")})
        if files:
            return files
    raise FileNotFoundError(
        f"no {split!r} split under {path}: expected files named {split}{suffixes[0]} or {split}-*{suffixes[0]}"
    )


def read_records(path: Path) -> Iterator[dict]:
    """The records of a parquet file (image columns stay `{"bytes", "path"}` dicts), a JSON list, or a JSON object
    keyed by id (the official MathVista `testmini.json`)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    yield from data.values() if isinstance(data, dict) else data


def record_image(value, base: Path, item: str):
    """A checked image of a record (a `{"bytes", "path"}` dict, bytes, or a path relative to `base`): a lazily
    decoded PIL image for bytes, the path for files. Raises InvalidRecord naming `item` if it is missing or
    unreadable."""
    try:
        return _image(value, base, item)
    except _Skip as error:
        raise InvalidRecord(error.reason, str(error)) from error


def load_problems(files: list[Path], parse: Callable[[dict, Path], object], skip_invalid: bool = False) -> LoadResult:
    """Parse every record of `files` with `parse(record, folder)`. An invalid record raises a ValueError naming it,
    or with `skip_invalid` is skipped and counted by reason (one warning reports the counts)."""
    problems, reasons, first = [], Counter(), {}
    for file in files:
        for index, record in enumerate(read_records(file)):
            try:
                problems.append(parse(record, file.parent))
            except (InvalidRecord, AttributeError, KeyError, TypeError, ValueError) as error:
                reason = getattr(error, "reason", "malformed")
                detail = f"{file.name} record {index}: {error}"
                if not skip_invalid:
                    raise ValueError(f"{detail} (pass skip_invalid / --skip-invalid to skip and count it)") from error
                reasons[reason] += 1
                first.setdefault(reason, detail)
    if reasons:
        details = "; ".join(f"{reason}: {count} (first: {first[reason]})" for reason, count in sorted(reasons.items()))
        logger.warning("skipped %d invalid records: %s", sum(reasons.values()), details)
    return LoadResult(problems, dict(reasons))


def accuracy(flags: Iterable[bool]) -> dict:
    flags = list(flags)
    correct = sum(flags)
    return {"accuracy": correct / len(flags) if flags else 0.0, "correct": correct, "total": len(flags)}


def grouped_accuracy(rows: list[dict], key: str, multi_label: bool = False) -> dict[str, dict]:
    """Accuracy of `rows` (dicts with a boolean "correct") per value of `key`; with `multi_label` the value is a
    list and a row counts in each of its values (MathVista's skills). Rows without the key are left out."""
    groups = defaultdict(list)
    for row in rows:
        value = row.get(key)
        if value is None:
            continue
        for label in value if multi_label else [value]:
            groups[str(label)].append(row["correct"])
    return {label: accuracy(flags) for label, flags in groups.items()}


def markdown_report(title: str, results: dict, group_titles: dict[str, str]) -> str:
    """A Markdown summary: the overall accuracy, then one table per group in `results["by"]`."""
    lines = [
        f"# {title}",
        "",
        f"Accuracy: **{results['accuracy']:.2%}** ({results['correct']}/{results['total']}); "
        f"{results['no_answer']} response(s) without an answer.",
    ]
    for key, heading in group_titles.items():
        groups = results["by"].get(key)
        if not groups:
            continue
        lines += ["", f"## {heading}", "", f"| {key} | accuracy | correct / total |", "|---|---|---|"]
        lines += [f"| {label} | {g['accuracy']:.2%} | {g['correct']} / {g['total']} |" for label, g in groups.items()]
    return "\n".join(lines) + "\n"
