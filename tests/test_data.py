import io
import json
import logging
import re
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data.loaders import load_examples
from data.records import Example, to_messages
from data.synthetic import (
    COLOURS,
    GLYPH_ROWS,
    GLYPHS,
    GRIDLINE,
    SCENE_SLOTS,
    SHAPES,
    TASKS,
    Label,
    Shape,
    generate,
    render_labels,
    render_shapes,
    write_dataset,
)
from data.synthetic import main as synthetic_main
from data.verify import extract_boxed, is_correct

from .conftest import ROOT

# --- reading answers back from the pixels ------------------------------------------------------------------------


def components(mask: np.ndarray) -> list[tuple[int, int, int, int, int]]:
    """(top, left, bottom, right, pixel count) of each 8-connected component of a boolean mask."""
    pixels = set(zip(*(axis.tolist() for axis in np.nonzero(mask))))
    found = []
    while pixels:
        stack = [pixels.pop()]
        ys, xs = [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for neighbour in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if neighbour in pixels:
                    pixels.remove(neighbour)
                    stack.append(neighbour)
        found.append((min(ys), min(xs), max(ys), max(xs), len(ys)))
    return found


def _trimmed(glyph: tuple[str, ...]) -> tuple[str, ...]:
    lit = [col for col in range(len(glyph[0])) if any(row[col] == "#" for row in glyph)]
    return tuple(row[lit[0] : lit[-1] + 1] for row in glyph)


FULL_HEIGHT = {_trimmed(glyph): char for char, glyph in GLYPHS.items() if len(glyph) == GLYPH_ROWS}


def read_text(rgb: np.ndarray) -> list[tuple[int, int, int, str, int]]:
    """(top, left, right, char, scale) of each full-height block-font glyph drawn in black, by position."""
    ink = np.all(rgb == 0, axis=-1)
    found = components(ink)
    scale = max(bottom - top + 1 for top, _, bottom, _, _ in found) // GLYPH_ROWS
    chars = []
    for top, left, bottom, right, _ in found:
        if bottom - top + 1 == GLYPH_ROWS * scale:
            cells = ink[top + scale // 2 : bottom + 1 : scale, left + scale // 2 : right + 1 : scale]
            bitmap = tuple("".join("#" if cell else "." for cell in row) for row in cells)
            chars.append((top, left, right, FULL_HEIGHT[bitmap], scale))
    return sorted(chars)


def read_numbers(rgb: np.ndarray) -> list[int]:
    """Numbers written in the block font: glyphs on the same row at most 3 glyph cells apart join up."""
    numbers, previous = [], None
    for top, left, right, char, scale in read_text(rgb):
        if previous and previous[0] == top and left - previous[2] <= 3 * scale + 1:
            numbers[-1] += char
        else:
            numbers.append(char)
        previous = (top, left, right)
    return [int(number) for number in numbers]


def shape_kind(top: int, left: int, bottom: int, right: int, count: int) -> str:
    fill = count / ((bottom - top + 1) * (right - left + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"


def colour_mask(rgb: np.ndarray, colour) -> np.ndarray:
    return np.all(rgb == np.array(colour, dtype=np.uint8), axis=-1)


def pixels(example: Example) -> np.ndarray:
    return np.asarray(example.images[0])


def recount_shapes(example: Example) -> str:
    colour, kind = re.fullmatch(r"How many (\w+) (\w+)s are there in the image\?", example.problem).groups()
    found = components(colour_mask(pixels(example), COLOURS[colour]))
    return str(sum(shape_kind(*c) == kind for c in found))


def recompute_digits(example: Example) -> str:
    digits = [int(char) for _, _, _, char, _ in sorted(read_text(pixels(example)), key=lambda c: c[1])]
    assert len(digits) == (2 if "two digits" in example.problem else 3)
    if "sum" in example.problem:
        return str(sum(digits))
    if "minus" in example.problem:
        return str(digits[0] - digits[1])
    if "product" in example.problem:
        return str(digits[0] * digits[1])
    assert "Multiply the left digit by the middle digit, then add the right digit" in example.problem
    return str(digits[0] * digits[1] + digits[2])


def read_bars(rgb: np.ndarray) -> dict[str, int]:
    """Bar letter -> value, from the axis row, the gridline spacing, the bars' tops and the letters below."""
    baseline = int(np.argmax(np.all(rgb == 0, axis=-1).sum(axis=1)))
    grid_rows = [int(y) for y in np.nonzero(colour_mask(rgb, GRIDLINE).any(axis=1))[0]]
    unit = baseline - max(grid_rows)
    assert np.diff(grid_rows).tolist() == [unit] * (len(grid_rows) - 1)
    (colour,) = [c for c in COLOURS.values() if colour_mask(rgb, c).any()]
    bars = colour_mask(rgb, colour)
    columns = np.nonzero(bars.any(axis=0))[0]
    runs = np.split(columns, np.nonzero(np.diff(columns) > 1)[0] + 1)
    values = []
    for run in runs:
        height = baseline - int(np.nonzero(bars[:, run].any(axis=1))[0].min())
        assert height % unit == 0
        values.append(height // unit)
    letters = [char for _, _, _, char, _ in sorted(read_text(rgb[baseline + 1 :]), key=lambda c: c[1])]
    assert len(letters) == len(values)
    return dict(zip(letters, values))


def recompute_bar_chart(example: Example) -> str:
    bars = read_bars(pixels(example))
    assert list(bars) == list("ABCDE"[: len(bars)])
    problem = example.problem
    if "tallest" in problem:
        return max(bars, key=bars.get)
    if match := re.search(r"value of bar (\w)", problem):
        return str(bars[match[1]])
    if match := re.search(r"how much taller is bar (\w) than bar (\w)", problem):
        return str(bars[match[1]] - bars[match[2]])
    if match := re.search(r"mean of the values of bars (\w) and (\w)", problem):
        mean = (bars[match[1]] + bars[match[2]]) / 2
        return str(int(mean)) if mean.is_integer() else str(mean)
    assert "total of the values of all bars" in problem
    return str(sum(bars.values()))


def recompute_triangle(example: Example) -> str:
    given = read_numbers(pixels(example))
    assert len(given) == 2
    return str(180 - sum(given))


def recompute_colour_choice(example: Example) -> str:
    which = re.match(r"What colour is the (largest|smallest) shape\?", example.problem)[1]
    for letter, colour in zip("ABCD", example.choices):
        assert f"({letter}) {colour}" in example.problem
    areas = {name: int(colour_mask(pixels(example), rgb).sum()) for name, rgb in COLOURS.items()}
    present = {name: area for name, area in areas.items() if area}
    colour = (max if which == "largest" else min)(present, key=present.get)
    return "ABCD"[example.choices.index(colour)]


RECOMPUTE = {
    "count_shapes": recount_shapes,
    "digit_arithmetic": recompute_digits,
    "bar_chart": recompute_bar_chart,
    "triangle_angle": recompute_triangle,
    "colour_choice": recompute_colour_choice,
}


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return generate(200, seed=11)


# --- the pixel readers themselves --------------------------------------------------------------------------------


def test_pixel_readers_on_known_scenes():
    shapes = [
        Shape("circle", "red", 5, 5, 20),
        Shape("square", "red", 40, 5, 15),
        Shape("triangle", "red", 70, 5, 22),
        Shape("circle", "blue", 5, 60, 14),
        Shape("circle", "red", 40, 60, 16),
    ]
    found = components(colour_mask(np.asarray(render_shapes(shapes, 112)), COLOURS["red"]))
    assert Counter(shape_kind(*c) for c in found) == {"circle": 2, "square": 1, "triangle": 1}
    image = render_labels([Label("12", 4, 10, 2), Label("7", 60, 10, 2), Label("ABCDE", 4, 60, 3)], 112)
    assert read_numbers(np.asarray(image)[:50]) == [12, 7]
    assert "".join(char for *_, char, _ in read_text(np.asarray(image)[50:])) == "ABCDE"
    assert len(FULL_HEIGHT) == sum(len(glyph) == GLYPH_ROWS for glyph in GLYPHS.values())  # glyphs are distinct


# --- the generator ----------------------------------------------------------------------------------------------


def test_same_seed_same_dataset_other_seed_differs():
    first, again, other = generate(15, seed=5), generate(15, seed=5), generate(15, seed=6)

    def key(example):
        return (example.id, example.problem, example.answer, example.reasoning, example.difficulty, example.choices)

    assert [key(e) for e in first] == [key(e) for e in again]
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, again))
    assert [e.answer for e in first] != [e.answer for e in other]
    assert not any(np.array_equal(pixels(a), pixels(b)) for a, b in zip(first, other))
    rest = generate(6, seed=5, start=9)  # the same dataset, picked up at example 9
    assert [key(e) for e in rest] == [key(e) for e in first[9:]] and rest[0].scene == first[9].scene


def test_tasks_are_balanced_and_ids_unique():
    examples = generate(12, seed=0)
    assert Counter(e.task for e in examples) == {t: 3 if i < 2 else 2 for i, t in enumerate(TASKS)}
    assert len({e.id for e in examples}) == 12
    assert {e.task for e in generate(4, seed=0, tasks=["bar_chart", "colour_choice"])} == {"bar_chart", "colour_choice"}
    weighted = generate(9, seed=0, tasks=["count_shapes", "count_shapes", "bar_chart"])  # a family named twice
    assert Counter(e.task for e in weighted) == {"count_shapes": 6, "bar_chart": 3}
    assert len({e.id for e in weighted}) == 9
    with pytest.raises(ValueError, match="count_circles"):
        generate(2, seed=0, tasks=["count_circles"])
    with pytest.raises(ValueError, match="image_size 32"):
        generate(2, seed=0, image_size=32)


@pytest.mark.parametrize("image_size", [64, 112, 224])
def test_images_are_rgb_of_the_configured_size(image_size):
    for example in generate(10, seed=3, image_size=image_size):
        (image,) = example.images
        assert image.mode == "RGB" and image.size == (image_size, image_size)


@pytest.mark.parametrize("task", TASKS)
def test_answers_recomputed_from_pixels(examples, task):
    family = [e for e in examples if e.task == task]
    assert len(family) == 40
    for example in family:
        assert RECOMPUTE[task](example) == example.answer, example.id


def read_scene(example: Example) -> dict:
    """The scene annotation (`SCENE_SLOTS`) read back from the pixels: shapes by colour, kind and cell; digits, bar
    values and angle labels left to right."""
    rgb, size = pixels(example), example.images[0].size[0]
    if example.task in ("count_shapes", "colour_choice"):
        grid, prefix = (4, "cell") if example.task == "count_shapes" else (2, "quad")
        scene, areas = dict.fromkeys((f"{prefix}{i}" for i in range(grid * grid)), 0), {}
        for c, rgb_colour in enumerate(COLOURS.values()):
            for top, left, bottom, right, count in components(colour_mask(rgb, rgb_colour)):
                cell = grid * int((top + bottom + 1) / 2 // (size / grid)) + int(
                    (left + right + 1) / 2 // (size / grid)
                )
                scene[f"{prefix}{cell}"] = 1 + 4 * SHAPES.index(shape_kind(top, left, bottom, right, count)) + c
                areas[cell] = count
        if prefix == "quad":
            ranked = sorted(areas, key=areas.get, reverse=True)
            scene |= {f"quad_rank{i}": 1 + ranked.index(i) if i in areas else 0 for i in range(4)}
        return scene
    if example.task == "digit_arithmetic":
        digits = [int(char) for _, _, _, char, _ in sorted(read_text(rgb), key=lambda c: c[1])]
        return {f"digit{i}": 1 + digits[i] if i < len(digits) else 0 for i in range(3)}
    if example.task == "bar_chart":
        values = list(read_bars(rgb).values())
        (colour,) = [c for c, rgb_colour in enumerate(COLOURS.values()) if colour_mask(rgb, rgb_colour).any()]
        return {f"bar{i}": values[i] if i < len(values) else 0 for i in range(5)} | {"bar_colour": colour}
    # triangle_angle: each number's label centre (its digits' centre, moved right by half the "°"), approximately
    cell, found = size / 4, []
    for (x, y), number in zip(number_centres(rgb), read_numbers(rgb)):
        near_edge = min(abs(v - cell * round(v / cell)) for v in (x, y)) < 4
        found.append((number, None if near_edge else 4 * int(y // cell) + int(x // cell)))
    return {"numbers": found}


def number_centres(rgb: np.ndarray) -> list[tuple[float, float]]:
    """The centre of the text box of each number `read_numbers` finds (with a trailing "°"), in the same order."""
    boxes, previous = [], None
    for top, left, right, _, scale in read_text(rgb):
        if previous and previous[0] == top and left - previous[2] <= 3 * scale + 1:
            boxes[-1][1] = right
        else:
            boxes.append([left, right, top, scale])
        previous = (top, left, right)
    return [((left + right) / 2 + 2 * scale, top + GLYPH_ROWS * scale / 2) for left, right, top, scale in boxes]


def test_scene_annotations_match_the_pixels(examples):
    for example in examples:
        scene = example.scene
        assert all(0 <= scene[name] < SCENE_SLOTS[name] for name in scene), example.id
        read = read_scene(example)
        if example.task == "triangle_angle":  # "?" (1) and the two numbers, each in its cell, in reading order
            labelled = {int(name[len("angle_cell") :]): value for name, value in scene.items() if value}
            numbers = read["numbers"]
            assert sorted(labelled.values()) == [1, *sorted(n for n, _ in numbers)], example.id
            for number, cell in numbers:
                assert cell is None or labelled.get(cell) == number, example.id
            first, second = (value for _, value in sorted(labelled.items()) if value != 1)
            assert f"read {first}° and {second}°" in example.reasoning
        elif example.task == "colour_choice" and example.difficulty >= 4:  # sizes can be close: ranks may tie
            assert {k: v for k, v in read.items() if "rank" not in k} == {
                k: v for k, v in scene.items() if "rank" not in k
            }, example.id
        else:
            assert read == scene, example.id


@pytest.mark.parametrize("task", ["digit_arithmetic", "bar_chart", "triangle_angle"])
def test_text_stays_readable_at_other_sizes(task):
    for image_size in (64, 224):
        for example in generate(5, seed=2, tasks=[task], image_size=image_size):
            assert RECOMPUTE[task](example) == example.answer, (image_size, example.id)


def test_answer_formats(examples):
    for example in examples:
        if example.task in ("bar_chart", "colour_choice") and not example.answer[0].isdigit():
            assert re.fullmatch(r"[A-E]", example.answer)
        else:
            assert re.fullmatch(r"-?\d+(\.5)?", example.answer), example.answer
        assert (example.choices is not None) == (example.task == "colour_choice")
    assert any("." in e.answer for e in examples)  # the mean of two bars can be x.5


def test_count_reasoning_reads_every_cell_with_a_running_count():
    """count_shapes reasons cell by cell: each row's four cells, named A to P, as the scene has them, each colour and
    shape checked against the asked one, the asked shapes numbered."""
    for example in generate(40, seed=5, tasks=["count_shapes"], difficulty_weights=[1, 1, 1, 1, 1]):
        colour, kind = re.fullmatch(r"How many (\w+) (\w+)s are there in the image\?", example.problem).groups()
        rows = re.findall(r"(?:Top|Second|Third|Bottom) row: ([^.]*)\.", example.reasoning)
        assert len(rows) == 4, example.reasoning
        cells = [c for row in rows for c in row.split(", ")]
        assert len(cells) == 16, example.reasoning
        counted = 0
        for index, (cell, name) in enumerate(zip(cells, "ABCDEFGHIJKLMNOP")):
            label = example.scene[f"cell{index}"]
            if label == 0:
                assert cell == f"{name} empty", (example.id, index)
                continue
            shape_colour, shape_kind = list(COLOURS)[(label - 1) % 4], SHAPES[(label - 1) // 4]
            # each attribute marked + when it is the asked one, - when not; the count after two +
            shape = f"{shape_colour}{'+-'[shape_colour != colour]} {shape_kind}{'+-'[shape_kind != kind]}"
            if (shape_colour, shape_kind) == (colour, kind):
                counted += 1
                shape += f" ({counted})"
            assert cell == f"{name} {shape}", (example.id, index, cell, shape)
        assert str(counted) == example.answer == recount_shapes(example)


def test_reasoning_is_a_checked_chain_of_thought(examples):
    for example in examples:
        text = example.reasoning
        assert text.startswith("Plan:") and "Let me check:" in text
        assert text.endswith(f"So the answer is {example.answer}.")
        assert extract_boxed(text) == example.answer
        assert 40 <= len(text.split()) <= 150, (example.id, len(text.split()))
        assert "<think>" not in text and "<image>" not in example.problem
    slips = [("I first" in e.reasoning or "At first" in e.reasoning) for e in examples]
    assert 0.1 <= sum(slips) / len(slips) <= 0.3
    for task in TASKS:
        family = [slip for slip, e in zip(slips, examples) if e.task == task]
        assert any(family) and not all(family), task


def test_short_rate_gives_short_form_reasoning_on_the_same_problems():
    long, mixed = generate(100, seed=4), generate(100, seed=4, short_rate=0.3)
    short = {m.id: m.task for m in mixed if not m.reasoning.startswith("Plan:")}
    assert 0.15 <= len(short) / len(mixed) <= 0.45 and set(short.values()) == set(TASKS)
    for a, b in zip(long, mixed):  # the same problems, scenes and answers; only the reasoning's form differs
        assert (a.problem, a.answer, a.scene) == (b.problem, b.answer, b.scene)
        assert np.array_equal(pixels(a), pixels(b))
        if b.id in short:
            assert "Let me check:" not in b.reasoning and "first" not in b.reasoning  # no check, no slip
            assert b.reasoning.endswith(f"So the answer is {b.answer}.")
            assert len(b.reasoning.split()) < 0.75 * len(a.reasoning.split()), b.id
        else:
            assert b.reasoning == a.reasoning
    assert all(not e.reasoning.startswith("Plan:") for e in generate(10, seed=4, short_rate=1.0))
    with pytest.raises(ValueError, match="short_rate"):
        generate(1, seed=0, short_rate=1.5)
    with pytest.raises(ValueError, match="unknown form 'brief'"):
        generate(1, seed=0, form="brief")
    with pytest.raises(ValueError, match="does not go with form='text'"):
        generate(1, seed=0, short_rate=0.5, form="text")
    with pytest.raises(SystemExit):
        synthetic_main(["--out", "unused", "--n", "1", "--short-rate", "-0.1"])


def test_text_form_writes_the_observation_into_the_problem():
    visual, texts = generate(10, seed=4, short_rate=1.0), generate(10, seed=4, form="text")
    for short, text in zip(visual, texts):
        assert text.images == [] and text.scene is None and text.answer == short.answer and "-text-" in text.id
        # The short form is observation + computation; the observation moves into the problem.
        assert short.reasoning.endswith(" " + text.reasoning)
        observation = short.reasoning[: -len(text.reasoning)].strip()
        assert observation and text.problem == f"{observation} {short.problem}"
        assert text.answer == RECOMPUTE[short.task](short)  # the visual twin's answer, read back from its pixels


def test_observe_form_is_the_observation_alone():
    longs, observed = generate(10, seed=4), generate(10, seed=4, form="observe")
    for long, seen in zip(longs, observed):
        assert (seen.problem, seen.answer, seen.scene) == (long.problem, long.answer, long.scene)
        assert list(seen.images[0].getdata()) == list(long.images[0].getdata())
        # The long form is plan, observation, computation, check: the observation follows the plan's sentence.
        assert seen.reasoning and "answer is" not in seen.reasoning and long.reasoning.startswith("Plan: ")
        assert f". {seen.reasoning} " in long.reasoning, long.id
    messages = to_messages(observed[0], with_answer=False)
    assert messages[-1] == {"role": "assistant", "reasoning_content": observed[0].reasoning, "content": ""}


def test_difficulty_covers_1_to_5(examples):
    for task in TASKS:
        assert {e.difficulty for e in examples if e.task == task} == {1, 2, 3, 4, 5}, task


def test_difficulty_weights_pick_the_levels_and_answers_still_check():
    easy = generate(60, seed=3, difficulty_weights=[1, 1, 0, 0, 0])
    assert {e.difficulty for e in easy} == {1, 2}
    for example in easy:
        assert RECOMPUTE[example.task](example) == example.answer, example.id
    hardest = generate(10, seed=3, tasks=["count_shapes"], difficulty_weights=[0, 0, 0, 0, 1])
    assert {e.difficulty for e in hardest} == {5}
    with pytest.raises(ValueError, match="5 non-negative weights"):
        generate(5, seed=0, difficulty_weights=[1, 1, 0])
    for bad in ("1,x", "1,1", "0,0,0,0,0", "1,1,-1,0,0"):
        with pytest.raises(SystemExit):
            synthetic_main(["--out", "unused", "--n", "1", "--difficulty-weights", bad])


def test_to_messages():
    example = generate(1, seed=0)[0]
    user, assistant = to_messages(example)
    assert user == {
        "role": "user",
        "content": [{"type": "image", "image": example.images[0]}, {"type": "text", "text": example.problem}],
    }
    assert assistant == {
        "role": "assistant",
        "reasoning_content": example.reasoning,
        "content": f"\\boxed{{{example.answer}}}",
    }
    assert to_messages(example, with_response=False) == [user]
    two = Example(problem="Compare.", answer="B", images=["a.png", "b.png"])
    assert [b["type"] for b in to_messages(two)[0]["content"]] == ["image", "image", "text"]


# --- writing and loading ----------------------------------------------------------------------------------------


def test_cli_dataset_reads_with_datasets_and_round_trips(tmp_path):
    out = tmp_path / "synthetic"
    proc = subprocess.run(
        [sys.executable, "-m", "data.synthetic", "--out", str(out), "--n", "6", "--seed", "4",
         "--tasks", "count_shapes,bar_chart", "--image-size", "96"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 1 and "wrote 6 examples" in proc.stdout
    expected = generate(6, seed=4, tasks=["count_shapes", "bar_chart"], image_size=96)

    table = datasets.load_dataset("json", data_files=str(out / "data.jsonl"), cache_dir=str(tmp_path / "cache"))
    rows = table["train"]
    assert rows.num_rows == 6
    assert rows["answer"] == [e.answer for e in expected]
    assert rows[0]["images"] == [f"images/{expected[0].id}_0.png"]

    loaded = load_examples(out)
    assert loaded.skipped == 0
    for example, original in zip(loaded.examples, expected):
        assert (example.id, example.answer, example.problem, example.reasoning) == (
            original.id, original.answer, original.problem, original.reasoning,
        )  # fmt: skip
        assert (example.task, example.difficulty, example.choices, example.scene) == (
            original.task, original.difficulty, original.choices, original.scene,
        )  # fmt: skip
        with Image.open(example.images[0]) as image:
            assert np.array_equal(np.asarray(image), pixels(original))


def test_write_dataset_refuses_duplicate_ids(tmp_path):
    example = Example(problem="q", answer="1", id="same")
    with pytest.raises(ValueError, match="duplicate id 'same'"):
        write_dataset([example, example], tmp_path)


def png_bytes(colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def image_dir(tmp_path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(png_bytes())
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return tmp_path / "img"


def write_jsonl(path: Path, records: list) -> Path:
    lines = [record if isinstance(record, str) else json.dumps(record) for record in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plain_jsonl_with_bad_records(tmp_path, image_dir, caplog):
    source = write_jsonl(
        tmp_path / "plain.jsonl",
        [
            {"id": "rel", "problem": "How many?", "answer": "3", "images": ["img/ok.png"]},
            {"question": "Single image?", "answer": 4, "image": str(image_dir / "ok.png")},
            {"problem": "file url", "answer": "5", "images": [f"file://{image_dir / 'ok.png'}"]},
            {"problem": "Boxed answer", "answer": "\\boxed{\\frac{1}{2}}", "images": []},
            {"problem": "Missing image", "answer": "1", "images": ["img/nope.png"]},
            {"problem": "Corrupt image", "answer": "1", "images": ["img/broken.png"]},
            {"problem": "No answer", "images": ["img/ok.png"]},
            {"problem": "Empty answer", "answer": "  ", "images": ["img/ok.png"]},
            {"problem": "", "answer": "1"},
            {"problem": "<image><image> two tokens", "answer": "1", "images": ["img/ok.png"]},
            ["not", "a", "record"],
            "{not json",
            {"problem": "Bad scene", "answer": "1", "scene": {"cell0": "red"}},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="data.loaders"):
        result = load_examples(source)
    assert [e.answer for e in result.examples] == ["3", "4", "5", "\\frac{1}{2}"]
    assert result.examples[0].id == "rel" and result.examples[1].id == "plain-1"
    assert result.examples[0].images == [str(image_dir / "ok.png")]
    assert result.examples[1].problem == "Single image?"
    assert result.reasons == {
        "missing_image": 1,
        "corrupt_image": 1,
        "no_answer": 2,
        "no_problem": 1,
        "image_mismatch": 1,
        "malformed": 2,
        "bad_json": 1,
    }
    assert result.skipped == 9
    (message,) = [r.getMessage() for r in caplog.records if r.name == "data.loaders"]
    assert "loaded 4 of 13 records" in message and "missing_image: 1" in message and "nope.png" in message


def test_image_root_and_geometry3k_records(tmp_path, image_dir):
    (tmp_path / "elsewhere").mkdir()
    source = write_jsonl(
        tmp_path / "elsewhere" / "geo.jsonl",
        [
            {"images": ["ok.png"], "problem": "<image>Find x.", "answer": "3"},
            {"images": ["ok.png", "ok.png"], "problem": "Compare <image> and <image>\nwhich is larger?", "answer": "2"},
        ],
    )
    result = load_examples(source, image_root=str(image_dir))
    assert [e.problem for e in result.examples] == ["Find x.", "Compare and which is larger?"]
    assert [len(e.images) for e in result.examples] == [1, 2]
    assert load_examples(source).reasons == {"missing_image": 2}  # relative to the file's folder without image_root


def test_choices_are_listed_and_option_answers_become_letters():
    records = [
        {"question": "Which colour?", "choices": ["red", "blue"], "answer": "blue"},
        {"question": "Pick one.\n(A) 3\n(B) 4", "choices": ["3", "4"], "answer": "A"},
    ]
    first, second = load_examples(records).examples
    assert first.problem == "Which colour?\n(A) red\n(B) blue" and first.answer == "B"
    assert first.choices == ["red", "blue"]
    assert second.problem == "Pick one.\n(A) 3\n(B) 4" and second.answer == "A"


def test_parquet_with_bytes_and_dict_images(tmp_path):
    table = pa.table(
        {
            "image": [
                {"bytes": png_bytes(), "path": "a.png"},
                {"bytes": b"garbage", "path": "b.png"},
                {"bytes": None, "path": None},
                {"bytes": png_bytes((0, 0, 255)), "path": None},
            ],
            "problem": ["red?", "corrupt", "empty", "blue?"],
            "answer": ["yes", "no", "no", "yes"],
        }
    )
    pq.write_table(table, tmp_path / "data.parquet")
    result = load_examples(tmp_path / "data.parquet")
    assert [e.problem for e in result.examples] == ["red?", "blue?"]
    assert result.examples[1].images[0].convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert result.reasons == {"corrupt_image": 1, "missing_image": 1}
    raw = load_examples([{"problem": "raw bytes", "answer": "1", "images": [png_bytes(), b"\x89PNG truncated"]}])
    assert raw.reasons == {"corrupt_image": 1}


def test_mm_eureka_chat_records(tmp_path, image_dir):
    def user(*blocks):
        return {"role": "user", "content": list(blocks)}

    image = {"type": "image", "image": f"file://{image_dir / 'ok.png'}"}
    records = [
        {"message": json.dumps([{"role": "system", "content": "Think."}, user(image, {"type": "text", "text": "Q1?"})]),
         "answer": "$5$"},
        {"messages": [user(image, image, {"type": "text", "text": "Q2?"})], "answer": "\\boxed{7}"},
        {"conversations": [{"role": "user", "content": "<image>Q3?"}], "image_urls": ["img/ok.png"], "answer": "1"},
        {"message": json.dumps([user({"type": "image", "image": "img/missing.png"}, {"type": "text", "text": "Q4"})]),
         "answer": "2"},
        {"message": "[{broken json", "answer": "2"},
        {"message": json.dumps([user(image, {"type": "text", "text": "Q6?"})]), "answer": ""},
    ]  # fmt: skip
    source = write_jsonl(tmp_path / "eureka.jsonl", records)
    result = load_examples(source)
    assert [(e.problem, e.answer, len(e.images)) for e in result.examples] == [
        ("Q1?", "5", 1),
        ("Q2?", "7", 2),
        ("Q3?", "1", 1),
    ]
    assert result.reasons == {"missing_image": 1, "malformed": 1, "no_answer": 1}
    assert load_examples(source, format="plain").reasons == {"no_problem": 6}


def test_hf_dataset_with_image_features(tmp_path):
    good = Image.new("RGB", (40, 30), (0, 200, 0))
    single = datasets.Dataset.from_dict(
        {
            "image": [good, png_bytes(), b"not an image"],
            "question": ["green?", "red?", "bad"],
            "answer": ["1", "", "2"],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
        ),
    )
    result = load_examples(single)
    assert [e.problem for e in result.examples] == ["green?"]
    assert result.examples[0].images[0].convert("RGB").size == (40, 30)
    assert result.reasons == {"no_answer": 1, "corrupt_image": 1}

    several = datasets.Dataset.from_dict(
        {"images": [[good, good]], "problem": ["<image><image>Which is bigger?"], "answer": ["A"]},
        features=datasets.Features(
            {
                "images": datasets.List(datasets.Image()),
                "problem": datasets.Value("string"),
                "answer": datasets.Value("string"),
            }
        ),
    )
    (example,) = load_examples(several).examples
    assert example.problem == "Which is bigger?" and len(example.images) == 2

    mathvista = datasets.Dataset.from_dict(
        {"decoded_image": [good], "image": ["images/1.jpg"], "question": ["Colour?"], "choices": [["red", "green"]],
         "answer": ["green"]},
        features=datasets.Features(
            {"decoded_image": datasets.Image(), "image": datasets.Value("string"), "question": datasets.Value("string"),
             "choices": datasets.List(datasets.Value("string")), "answer": datasets.Value("string")}
        ),
    )  # fmt: skip
    (example,) = load_examples(mathvista.select([0])).examples
    assert example.answer == "B" and example.choices == ["red", "green"] and isinstance(example.images[0], Image.Image)


def test_loader_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_examples(tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match="unknown format 'csv'"):
        load_examples([], format="csv")
    with pytest.raises(TypeError, match="int"):
        load_examples(3)


# --- answer checking --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{4}", "4"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{a_{1} + {b}} and later \\boxed{ {x}^{2} }", "{x}^{2}"),
        ("\\boxed{3} then a cut-off \\boxed{4", "3"),
        ("Let me check: 2 + 2 = 4. So the answer is 4.", "4"),
        ("The answer is: (B) red", "(B) red"),
        ("no final answer here", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "prediction, answer, choices, expected",
    [
        ("12.50", "12.5", None, True),
        ("12.4", "12.5", None, False),
        ("\\boxed{\\frac{1}{2}}", "0.5", None, True),
        ("1/2", "\\dfrac{1}{2}", None, True),
        ("-\\frac{3}{4}", "-0.75", None, True),
        ("1,000", "1000", None, True),
        ("70°", "70", None, True),
        ("x = 4", "4", None, True),
        ("5", "4", None, False),
        ("b", "B", None, True),
        ("(B)", "B", None, True),
        ("C", "B", None, False),
        ("(B) blue", "B", ["red", "blue"], True),
        ("blue", "B", ["red", "blue"], True),
        ("red", "B", ["red", "blue"], False),
        ("B", "blue", ["red", "blue"], True),
        ("\\sqrt{12}", "2\\sqrt{3}", None, True),
        ("x + 1", "1 + x", None, True),
        ("\\sqrt{2}", "2", None, False),
        ("Yellow", "yellow", None, True),
        ("red", "der", None, False),
        ("", "4", None, False),
        ("Working... So the answer is 4.", "4", None, True),
    ],
)
def test_is_correct(prediction, answer, choices, expected):
    assert is_correct(prediction, answer, choices) is expected


def test_is_correct_in_worker_threads():
    # RL reward workers call it from threads, where math-verify's signal-based timeout cannot run.
    with ThreadPoolExecutor(2) as pool:
        assert list(pool.map(is_correct, ["\\sqrt{12}", "x + 2"], ["2\\sqrt{3}", "2 + x"])) == [True, True]


def test_easy_digits_sit_in_fixed_places():
    """Levels 1-2 centre each digit in its half on a centred line (each digit falls on the same image tokens);
    from level 3 on the line sits at a random height."""

    def ink_rows(example):
        rows = np.flatnonzero((np.asarray(example.images[0].convert("L")) < 128).any(axis=1))
        return rows.min(), rows.max()

    easy = generate(20, 3, tasks=["digit_arithmetic"], difficulty_weights=[1, 1, 0, 0, 0])
    assert {ink_rows(e) for e in easy} == {ink_rows(easy[0])}
    size = easy[0].images[0].size[0]
    top, bottom = ink_rows(easy[0])
    assert abs((top + bottom) / 2 - (size - 1) / 2) <= 1
    for example in easy:  # the ink of each digit is centred in its half of the image
        columns = np.flatnonzero((np.asarray(example.images[0].convert("L")) < 128).any(axis=0))
        for half in (columns[columns < size // 2], columns[columns >= size // 2]):
            centre = (half.min() + half.max()) / 2 % (size // 2)
            assert abs(centre - (size // 2 - 1) / 2) <= 3, example.id
    hard = generate(20, 3, tasks=["digit_arithmetic"], difficulty_weights=[0, 0, 1, 0, 0])
    assert len({ink_rows(e) for e in hard}) > 1
