"""Synthetic visual reasoning problems with exact answers and worked long chains of thought.

    python -m data.synthetic --out DIR --n N --seed S [--tasks a,b] [--image-size 112]

Every image is drawn with Pillow from a scene description (shapes, digits, bars, a triangle) and the answer is
computed from that same description, so it is exact. Each example draws from its own `random.Random`, seeded from
(seed, index): the same seed gives the same dataset, pixel for pixel. Images are small (112 px by default) with
large, high-contrast shapes and digits in four colours and a built-in 5x7 block font (no system fonts), so that a
~2M-parameter model can learn some of the tasks in minutes on a CPU.

| task | question | answer |
|---|---|---|
| count_shapes | how many <colour> <shape>s, 1-6 of them among 0-9 distractors | integer |
| digit_arithmetic | sum, difference or product of two or three large digits | integer |
| bar_chart | tallest bar, a bar's value, a difference, the mean of two bars, the total | letter, integer, x.5 |
| triangle_angle | the third angle of a triangle with two angles written at its vertices | integer degrees |
| colour_choice | colour of the largest or smallest shape, multiple choice | letter |

The reasoning of each example is a plan, the observation, the computation, an explicit "Let me check: ..." and a
final "So the answer is X."; about 20% of the examples (seeded) also correct a slip along the way. With
`--short-rate R`, a share R of the examples gives the short form instead (observation and computation only);
`generate(..., form="text")` gives text-only twins (the observation written into the problem, no image), and
`form="observe"` the observation alone as the reasoning (image-description data: `scripts/pretrain_vision.py` aligns
the language model to the image tokens with it before SFT).
"""

import argparse
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .records import Example

COLOURS = {"red": (220, 30, 30), "green": (20, 150, 40), "blue": (40, 80, 230), "yellow": (235, 190, 0)}
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)  # digits, letters and axes
GRIDLINE = (190, 190, 190)
SHAPES = ("circle", "square", "triangle")
TASKS = ("count_shapes", "digit_arithmetic", "bar_chart", "triangle_angle", "colour_choice")
MIN_IMAGE_SIZE = 64
SLIP_RATE = 0.2  # share of examples whose reasoning corrects a slip
# The forms of an example: "long" (plan, observation, computation, check, sometimes a slip corrected), "short"
# (observation and computation), "text" (no image: the observation is written into the problem) and "observe"
# (the observation alone: image-description data).
FORMS = ("long", "short", "text", "observe")
MAX_BAR = 8  # bar values are 1..MAX_BAR, one gridline per unit
ROW_NAMES = ("top", "second", "third", "bottom")  # rows of the 4 x 4 layout of count_shapes
CELL_NAMES = "ABCDEFGHIJKLMNOP"  # the 16 cells of that layout, in reading order
MAX_ANGLE = 180
# Scene annotations (`Example.scene`): slot name -> number of classes. Class 0 means "nothing there", except for
# bar_colour (the COLOURS index); a shape's class is 1 + 4 * SHAPES index + COLOURS index.
SHAPE_CLASSES = 1 + len(SHAPES) * len(COLOURS)
SCENE_SLOTS = {
    **{f"cell{i}": SHAPE_CLASSES for i in range(16)},  # count_shapes: the 4 x 4 cells, row by row
    **{f"quad{i}": SHAPE_CLASSES for i in range(4)},  # colour_choice: the 2 x 2 cells
    **{f"quad_rank{i}": 5 for i in range(4)},  # colour_choice: the cell's shape by area, 1 for the largest
    **{f"digit{i}": 11 for i in range(3)},  # digit_arithmetic: 1 + the digits, left to right
    **{f"bar{i}": MAX_BAR + 1 for i in range(5)},  # bar_chart: the bar values, left to right
    "bar_colour": len(COLOURS),
    **{f"angle_cell{i}": MAX_ANGLE + 1 for i in range(16)},  # triangle_angle: the label centred in each of 4 x 4
    # cells: its degrees, or 1 for "?"
}

# A 5x7 block font ("°" is 3x3, drawn at the top): every glyph is drawn as scale x scale squares, so text is crisp at
# any size and identical on every machine. All digits and letters span the full 7 rows and are 8-connected.
GLYPHS = {
    "0": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "1": ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "2": (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    "3": (".###.", "#...#", "....#", "..##.", "....#", "#...#", ".###."),
    "4": ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    "5": ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    "6": ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    "7": ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    "8": (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    "9": (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "?": (".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."),
    "°": (".#.", "#.#", ".#."),
}
GLYPH_ROWS = 7


@dataclass(frozen=True)
class Shape:
    """A filled shape inside the square box with top-left corner (x, y) and side `size` px."""

    kind: str  # one of SHAPES
    colour: str  # a COLOURS name
    x: int
    y: int
    size: int


@dataclass(frozen=True)
class Label:
    """Text in the block font with its top-left corner at (x, y)."""

    text: str
    x: int
    y: int
    scale: int


@dataclass(frozen=True)
class BarChart:
    """Bars A, B, C, ... left to right with integer values 1..MAX_BAR, all in one colour."""

    values: tuple[int, ...]
    colour: str


@dataclass(frozen=True)
class TriangleScene:
    """A triangle outline (vertices in px) with the labels written at its vertices."""

    points: tuple[tuple[float, float], ...]
    colour: str
    labels: tuple[Label, ...]


# --- drawing ----------------------------------------------------------------------------------------------------


def text_width(text: str, scale: int) -> int:
    """Width in px of `text` in the block font (one empty column between glyphs)."""
    return sum(len(_glyph(char)[0]) + 1 for char in text) * scale - scale


def draw_text(draw: ImageDraw.ImageDraw, label: Label, fill: tuple[int, int, int] = INK) -> None:
    """Draw `label` in the block font."""
    x = label.x
    for char in label.text:
        glyph = _glyph(char)
        for row, line in enumerate(glyph):
            for col, cell in enumerate(line):
                if cell == "#":
                    left, top = x + col * label.scale, label.y + row * label.scale
                    draw.rectangle((left, top, left + label.scale - 1, top + label.scale - 1), fill=fill)
        x += (len(glyph[0]) + 1) * label.scale


def _glyph(char: str) -> tuple[str, ...]:
    if char not in GLYPHS:
        raise ValueError(f"the block font has no glyph for {char!r}; it has {''.join(GLYPHS)}")
    return GLYPHS[char]


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, fill: int | tuple[int, int, int] | None = None) -> None:
    """Draw a filled circle, square or (upward) triangle without anti-aliasing, in its colour unless `fill` is
    given: all its pixels are exactly that colour."""
    fill = COLOURS[shape.colour] if fill is None else fill
    x0, y0, x1, y1 = shape.x, shape.y, shape.x + shape.size - 1, shape.y + shape.size - 1
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    else:
        raise ValueError(f"unknown shape kind {shape.kind!r}; expected one of {SHAPES}")


def shape_area(shape: Shape) -> int:
    """Number of pixels the shape covers when drawn."""
    mask = Image.new("L", (shape.size, shape.size), 0)
    draw_shape(ImageDraw.Draw(mask), Shape(shape.kind, shape.colour, 0, 0, shape.size), fill=255)
    return mask.histogram()[255]


def render_shapes(shapes: Sequence[Shape], image_size: int) -> Image.Image:
    """A white RGB image with the shapes drawn in order."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image


def render_labels(labels: Sequence[Label], image_size: int) -> Image.Image:
    """A white RGB image with the labels written in black."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for label in labels:
        draw_text(draw, label)
    return image


def bar_chart_layout(image_size: int) -> dict[str, int]:
    """Pixel layout of a bar chart: the baseline row (value 0), px per unit, the y axis column, the right end of
    the plot and the scales of the tick labels and of the bar letters."""
    letter_scale, tick_scale = max(1, image_size // 56), max(1, image_size // 112)
    baseline = image_size - 1 - (GLYPH_ROWS + 2) * letter_scale - 2
    top = image_size // 16
    return {
        "baseline": baseline,
        "unit": (baseline - top) // MAX_BAR,
        "axis_x": 8 * tick_scale,
        "right": image_size - 3,
        "letter_scale": letter_scale,
        "tick_scale": tick_scale,
    }


def render_bar_chart(chart: BarChart, image_size: int) -> Image.Image:
    """Bars on a grid of light gridlines one unit apart, even ticks labelled, letters under the bars."""
    layout = bar_chart_layout(image_size)
    baseline, unit, axis_x, right = layout["baseline"], layout["unit"], layout["axis_x"], layout["right"]
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for value in range(1, MAX_BAR + 1):
        y = baseline - value * unit
        draw.line((axis_x + 1, y, right, y), fill=GRIDLINE)
        if value % 2 == 0:
            scale = layout["tick_scale"]
            draw_text(draw, Label(str(value), scale, y - GLYPH_ROWS * scale // 2, scale))
    slot = (right - axis_x) / len(chart.values)
    width = max(2, int(slot * 0.6))
    for index, value in enumerate(chart.values):
        left = axis_x + round(slot * index + (slot - width) / 2)
        draw.rectangle((left, baseline - value * unit, left + width - 1, baseline - 1), fill=COLOURS[chart.colour])
        letter, scale = _bar_letter(index), layout["letter_scale"]
        draw_text(draw, Label(letter, left + (width - text_width(letter, scale)) // 2, baseline + 2 * scale, scale))
    draw.line((axis_x, baseline, right, baseline), fill=INK)
    draw.line((axis_x, baseline - MAX_BAR * unit - 2, axis_x, baseline), fill=INK)
    return image


def render_triangle(scene: TriangleScene, image_size: int) -> Image.Image:
    """The triangle's outline in its colour (2 px at 112 px) and its vertex labels in black."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.polygon(scene.points, outline=COLOURS[scene.colour], width=max(1, image_size // 56))
    for label in scene.labels:
        draw_text(draw, label)
    return image


# --- task families ----------------------------------------------------------------------------------------------


def make_count_shapes(rng: random.Random, image_size: int = 112, difficulty: int = 1, form: str = "long") -> Example:
    """How many <colour> <shape>s: 1-6 of them among distractors (more, and more similar, with difficulty)."""
    kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    # Distractors are never the asked kind; from difficulty 4 on they share its colour or its shape.
    others = [
        (k, c)
        for k in SHAPES
        for c in COLOURS
        if (k, c) != (kind, colour) and (difficulty < 4 or k == kind or c == colour)
    ]
    items = [(kind, colour)] * rng.randint(1, 6)
    items += [rng.choice(others) for _ in range(2 * (difficulty - 1) + rng.randint(0, 1))]
    rng.shuffle(items)
    cell = image_size / 4
    sizes = [rng.randint(int(cell * 0.5), int(cell) - 6) for _ in items]
    shapes = _place_in_cells(rng, [(k, c, s) for (k, c), s in zip(items, sizes)], 4, image_size)
    slip = rng.random() < SLIP_RATE and form == "long"

    rows = [0, 0, 0, 0]
    scene = dict.fromkeys((f"cell{i}" for i in range(16)), 0)
    cells = ["empty"] * 16
    answer = 0
    for index, shape in sorted(((_shape_cell(shape, 4, image_size), shape) for shape in shapes), key=lambda p: p[0]):
        scene[f"cell{index}"] = _shape_class(shape)
        # Each attribute is checked against the asked one where it is written (+ it is, - it is not), so that the
        # count needs only the two marks just before it, not a comparison of both attributes at once
        # (docs/findings.md).
        cells[index] = f"{shape.colour}{_check(shape.colour == colour)} {shape.kind}{_check(shape.kind == kind)}"
        if (shape.kind, shape.colour) == (kind, colour):
            rows[index // 4] += 1
            answer += 1
            cells[index] += f" ({answer})"
    # Each cell is named by a letter (A-P, reading order) before what it holds: the name is what an attention head
    # can match against the image token's position embedding, so reading a cell is a lookup, not a count of commas.
    cells = [f"{name} {cell}" for name, cell in zip(CELL_NAMES, cells)]
    name = f"{colour} {kind}s"
    steps = [
        f"Plan: count the {name} cell by cell (A to P in reading order), marking each colour and shape + if it is"
        " the asked one, - if not."
    ]
    if slip:
        row = rng.choice([r for r, n in enumerate(rows) if n])
        steps.append(
            f"At first glance I counted {answer - 1}, but looking again at the {ROW_NAMES[row]} row there is one more."
        )
    row_texts = [", ".join(cells[r : r + 4]) for r in range(0, 16, 4)]
    # The total closes the observation (and so is in the image-description data): copying the last number is a
    # look-up of its own that the SFT data alone taught poorly (docs/findings.md).
    listing = " ".join(f"{row_name.capitalize()} row: {text}." for row_name, text in zip(ROW_NAMES, row_texts))
    steps.append(f"{listing} That makes {answer} {name if answer != 1 else name[:-1]}.")
    others = len(shapes) - answer
    if others:
        rest = "the other shape is not" if others == 1 else f"none of the other {others} shapes is"
        steps.append(f"Let me check: {rest} a {colour} {kind}, and a recount gives {answer}.")
    else:
        steps.append(f"Let me check: every shape here is a {colour} {kind}, and a recount gives {answer}.")
    return _example(
        "count_shapes",
        f"How many {name} are there in the image?",
        answer,
        render_shapes(shapes, image_size),
        steps,
        difficulty,
        scene,
        form,
    )


def make_digit_arithmetic(
    rng: random.Random, image_size: int = 112, difficulty: int = 1, form: str = "long"
) -> Example:
    """Two or three large digits on one line; their sum, difference, product or product-plus-sum, by difficulty.
    At levels 1-2 the digits sit centred in their slots on a centred line; from level 3 on, at a random height and
    offset."""
    count = 2 if difficulty <= 3 else 3
    low = 1 if difficulty in (3, 5) else 0  # no zeros in products
    digits = [rng.randint(low, 9) for _ in range(count)]
    if difficulty == 2:
        digits.sort(reverse=True)  # left minus right stays non-negative
    scale = max(2, image_size // 22)
    slot = image_size // count
    top = rng.randint(4, image_size - GLYPH_ROWS * scale - 4)  # one line of digits, at a random height
    lefts = [slot * i + rng.randint(2, slot - text_width(str(d), scale) - 2) for i, d in enumerate(digits)]
    # The easy levels: each digit centred in its slot, the line centred (the same image tokens every time). The
    # random places above are still drawn, so the rest of the example (the slip) is drawn as at the other levels.
    if difficulty <= 2:
        top = (image_size - GLYPH_ROWS * scale) // 2
        lefts = [slot * i + (slot - text_width(str(d), scale)) // 2 for i, d in enumerate(digits)]
    labels = [Label(str(digit), left, top, scale) for digit, left in zip(digits, lefts)]
    slip = rng.random() < SLIP_RATE and form == "long"

    a, b = digits[0], digits[1]
    if difficulty == 1:
        question, plan, answer = "What is their sum?", "add them", a + b
        work, check = f"{a} + {b} = {answer}.", f"{answer} - {b} = {a}"
    elif difficulty == 2:
        question, plan, answer = (
            "What is the left digit minus the right digit?",
            "subtract the right one from the left one",
            a - b,
        )
        work, check = f"{a} - {b} = {answer}.", f"{answer} + {b} = {a}"
    elif difficulty == 3:
        question, plan, answer = "What is their product?", "multiply them", a * b
        work, check = f"{a} × {b} = {answer}.", f"{answer} / {b} = {a}"
    elif difficulty == 4:
        c = digits[2]
        question, plan, answer = "What is their sum?", "add them up", a + b + c
        work, check = f"{a} + {b} = {a + b}, and {a + b} + {c} = {answer}.", f"{answer} - {c} - {b} = {a}"
    else:
        c = digits[2]
        question = "Multiply the left digit by the middle digit, then add the right digit. What is the result?"
        plan, answer = "multiply the first two and add the third", a * b + c
        work, check = (
            f"{a} × {b} = {a * b}, and {a * b} + {c} = {answer}.",
            f"{answer} - {c} = {a * b} and {a * b} / {b} = {a}",
        )
    words = "two" if count == 2 else "three"
    steps = [
        f"Plan: read the {words} digits from left to right, then {plan}.",
        f"The image shows {words} large black digits on a white background: {_join(digits)}.",
    ]
    if slip:
        wrong = answer + 1 if answer == 0 else answer + rng.choice((-1, 1))
        steps.append(f"I first got {wrong}, but redoing it carefully, {work}")
    else:
        steps.append(f"Working it out, {work}")
    steps.append(f"Let me check: {check}, which is the left digit.")
    scene = {f"digit{i}": 1 + digits[i] if i < count else 0 for i in range(3)}
    return _example(
        "digit_arithmetic",
        f"The image shows {words} digits. {question}",
        answer,
        render_labels(labels, image_size),
        steps,
        difficulty,
        scene,
        form,
    )


def make_bar_chart(rng: random.Random, image_size: int = 112, difficulty: int = 1, form: str = "long") -> Example:
    """A bar chart read against its gridlines: the tallest bar (1), a value (2), a difference (3), the mean of two
    bars (4, may be x.5) or the total (5)."""
    count = rng.randint(*{1: (3, 3), 2: (3, 4), 3: (3, 5), 4: (3, 5), 5: (4, 5)}[difficulty])
    while True:  # the tallest bar must be unique, and a difference needs two different values
        values = [rng.randint(1, MAX_BAR) for _ in range(count)]
        if values.count(max(values)) == 1:
            break
    chart = BarChart(tuple(values), rng.choice(list(COLOURS)))
    letters = [_bar_letter(i) for i in range(count)]
    slip = rng.random() < SLIP_RATE and form == "long"

    if difficulty == 1:
        top = values.index(max(values))
        focus, goal = [top], "compare the heights"
        question, answer = "Which bar in the chart is the tallest? Answer with its letter.", letters[top]
        work = f"The largest value is {values[top]}, for bar {letters[top]}."
        others = _join([f"{letters[i]} at {v}" for i, v in enumerate(values) if i != top])
        check = f"bar {letters[top]} at {values[top]} is higher than {others}"
    elif difficulty == 2:
        i = rng.randrange(count)
        focus, goal = [i], "report the asked bar"
        question, answer = f"What is the value of bar {letters[i]} in the chart?", values[i]
        work = f"Bar {letters[i]} is {values[i]}."
        check = f"the top of bar {letters[i]} is {_tick_position(values[i])}"
    elif difficulty == 3:
        i, j = sorted(rng.sample(range(count), 2), key=lambda k: -values[k])
        if values[i] == values[j]:  # compare with the (unique) tallest bar instead
            i = values.index(max(values))
        focus, goal = [i, j], "subtract"
        question = f"In the chart, how much taller is bar {letters[i]} than bar {letters[j]}?"
        answer = values[i] - values[j]
        work = f"{letters[i]} - {letters[j]} = {values[i]} - {values[j]} = {answer}."
        check = f"{values[j]} + {answer} = {values[i]}, the height of bar {letters[i]}"
    elif difficulty == 4:
        i, j = sorted(rng.sample(range(count), 2))
        focus, goal = [i, j], "average the two bars"
        question = f"What is the mean of the values of bars {letters[i]} and {letters[j]} in the chart?"
        total = values[i] + values[j]
        answer = format_number(total / 2)
        work = f"({values[i]} + {values[j]}) / 2 = {total} / 2 = {answer}."
        check = f"{answer} × 2 = {total} = {values[i]} + {values[j]}"
    else:
        focus, goal = list(range(count)), "add them all up"
        question, answer = "What is the total of the values of all bars in the chart?", sum(values)
        work = f"{' + '.join(map(str, values))} = {answer}."
        check = f"adding in reverse order, {' + '.join(map(str, reversed(values)))} = {answer}"
    steps = [f"Plan: read each bar's height on the gridlines, one unit apart, then {goal}."]
    if slip:
        k = rng.choice(focus)
        wrong = values[k] - 1 if values[k] == MAX_BAR else values[k] + rng.choice((-1, 1))
        steps.append(
            f"At first I read bar {letters[k]} as {wrong}, but its top lines up with gridline {values[k]}, "
            f"so it is {values[k]}."
        )
    steps.append(f"From left to right the bars read {_join([f'{ch} = {v}' for ch, v in zip(letters, values)])}.")
    steps.append(work)
    steps.append(f"Let me check: {check}.")
    scene = {f"bar{i}": values[i] if i < count else 0 for i in range(5)}
    scene["bar_colour"] = list(COLOURS).index(chart.colour)
    return _example("bar_chart", question, answer, render_bar_chart(chart, image_size), steps, difficulty, scene, form)


def make_triangle_angle(rng: random.Random, image_size: int = 112, difficulty: int = 1, form: str = "long") -> Example:
    """A triangle drawn with its true angles, two of them written at their vertices; the third is asked for.
    Difficulty: multiples of 10 (1), of 5 (2), any integers (3), an obtuse multiple of 5 (4), any obtuse (5)."""
    while True:
        if difficulty == 1:
            given = [10 * rng.randint(3, 8), 10 * rng.randint(3, 8)]
        elif difficulty == 2:
            given = [5 * rng.randint(5, 17), 5 * rng.randint(5, 17)]
        elif difficulty == 3:
            given = [rng.randint(21, 89), rng.randint(21, 89)]
        elif difficulty == 4:
            given = [5 * rng.randint(19, 26), 5 * rng.randint(4, 12)]
        else:
            given = [rng.randint(91, 130), rng.randint(20, 60)]
        third = 180 - sum(given)
        if third >= 20 and (difficulty != 2 or any(g % 10 for g in given)):
            break
    rng.shuffle(given)
    unknown = rng.randrange(3)
    angles = list(given)
    angles.insert(unknown, third)
    scene = _triangle_scene(rng, angles, unknown, image_size)
    slip = rng.random() < SLIP_RATE and form == "long"

    cells = [_label_cell(label, image_size) for label in scene.labels]
    a, b = (angles[k] for k in sorted(range(3), key=cells.__getitem__) if k != unknown)  # in reading order
    steps = [
        "Plan: the three angles of a triangle add up to 180 degrees, so subtract the two given angles from 180.",
        f"The two labelled vertices read {a}° and {b}°, and the third vertex is marked with a question mark.",
        f"Together the given angles make {a} + {b} = {a + b}.",
    ]
    if slip:
        wrong = third + rng.choice((-10, 10))
        steps.append(f"I first got {wrong}, but 180 - {a + b} is {third}, not {wrong}.")
    else:
        steps.append(f"So the third angle is 180 - {a + b} = {third}.")
    steps.append(f"Let me check: {a} + {b} + {third} = 180, as it must be.")
    problem = (
        "Two angles of the triangle are written at their vertices. "
        "What is the angle at the vertex marked '?', in degrees?"
    )
    labels = dict.fromkeys((f"angle_cell{i}" for i in range(16)), 0)
    labels.update({f"angle_cell{cell}": 1 if k == unknown else angles[k] for k, cell in enumerate(cells)})
    return _example(
        "triangle_angle", problem, third, render_triangle(scene, image_size), steps, difficulty, labels, form
    )


def make_colour_choice(rng: random.Random, image_size: int = 112, difficulty: int = 1, form: str = "long") -> Example:
    """Multiple choice: the colour of the largest (or, from difficulty 3, smallest) of 2-4 shapes, which differs
    from the runner-up by a side and area ratio that shrinks with difficulty (1.6 down to 1.15). The options come
    in the order of COLOURS at difficulties 1-2 and shuffled from 3 on (matching a colour to a shuffled letter is a
    step of its own)."""
    count = {1: 2, 2: 3, 3: 3, 4: 4, 5: 4}[difficulty]
    ratio = {1: 1.6, 2: 1.5, 3: 1.35, 4: 1.25, 5: 1.15}[difficulty]
    largest = difficulty < 3 or rng.random() < 0.5
    which = "largest" if largest else "smallest"
    colours = rng.sample(list(COLOURS), count)
    cell = image_size / 2
    while True:  # until the asked shape stands out from every other one, by side and by area
        sized = [(rng.choice(SHAPES), colour, rng.randint(int(cell * 0.3), int(cell) - 6)) for colour in colours]
        shapes = _place_in_cells(rng, sized, 2, image_size)
        first, second, *_ = sorted(shapes, key=shape_area, reverse=largest)
        pairs = [(first, other) if largest else (other, first) for other in shapes if other != first]
        if all(big.size >= ratio * small.size and shape_area(big) >= ratio * shape_area(small) for big, small in pairs):
            break
    options = list(COLOURS) if difficulty <= 2 else rng.sample(list(COLOURS), len(COLOURS))
    letter = "ABCD"[options.index(first.colour)]
    slip = rng.random() < SLIP_RATE and form == "long"

    by_area = sorted(shapes, key=shape_area, reverse=True)
    scene = {
        **dict.fromkeys((f"quad{i}" for i in range(4)), 0),
        **dict.fromkeys((f"quad_rank{i}" for i in range(4)), 0),
    }
    for shape in shapes:
        quad = _shape_cell(shape, 2, image_size)
        scene[f"quad{quad}"], scene[f"quad_rank{quad}"] = _shape_class(shape), 1 + by_area.index(shape)
    adjectives = {2: ("large", "small"), 3: ("large", "medium", "small"), 4: ("large", "medium", "small", "tiny")}
    size_word = {shape: adjectives[count][by_area.index(shape)] for shape in shapes}
    seen = _join([f"a {size_word[s]} {s.colour} {s.kind}" for s in sorted(shapes, key=lambda s: (s.y // cell, s.x))])
    steps = [
        f"Plan: compare the sizes of the {count} shapes, find the {which} one, and match its colour to an option.",
        f"I see {seen}.",
    ]
    if slip:
        steps.append(
            f"At first the {second.colour} {second.kind} looked {which}, but the {first.colour} {first.kind} is "
            f"clearly {'bigger' if largest else 'smaller'}."
        )
    steps.append(f"The {which} shape is the {first.colour} {first.kind}, so the colour is {first.colour}.")
    steps.append(
        f"Let me check: the {first.colour} {first.kind} is {'wider and taller' if largest else 'narrower and shorter'} "
        f"than every other shape, and {first.colour} is option ({letter})."
    )
    problem = f"What colour is the {which} shape?\n" + "\n".join(f"({'ABCD'[i]}) {c}" for i, c in enumerate(options))
    example = _example(
        "colour_choice", problem, letter, render_shapes(shapes, image_size), steps, difficulty, scene, form
    )
    example.choices = options
    return example


MAKERS: dict[str, Callable[[random.Random, int, int, str], Example]] = {
    "count_shapes": make_count_shapes,
    "digit_arithmetic": make_digit_arithmetic,
    "bar_chart": make_bar_chart,
    "triangle_angle": make_triangle_angle,
    "colour_choice": make_colour_choice,
}


# --- datasets ---------------------------------------------------------------------------------------------------


def generate(
    n: int,
    seed: int,
    tasks: list[str] | None = None,
    image_size: int = 112,
    difficulty_weights: Sequence[float] | None = None,
    start: int = 0,
    short_rate: float = 0.0,
    form: str = "long",
) -> list[Example]:
    """`n` examples cycling through `tasks` (all families by default; a family listed twice comes twice as often),
    with in-memory PIL images.

    `difficulty_weights` (five relative weights, for difficulties 1..5) skews the mix, e.g. towards easy examples
    for a small model; by default every family draws its difficulties uniformly.
    Example `i` depends only on (seed, i, its task, image_size, difficulty_weights): the same arguments give the
    same dataset, and `start` picks up where an earlier call of the same dataset stopped (examples start..start+n-1).
    `short_rate` is the share of examples (seeded, drawn apart from the scene) whose reasoning takes the short form:
    observation and computation only, no plan, no check, no slip. Long-CoT SFT data with some short examples makes a
    model whose samples vary in length, which long2short then selects from (`trainers.long2short`); 0 by default.
    `form="text"` gives text-only twins of the problems (see `FORMS`): the scene is described in the problem, and the
    reasoning is the rest of the short form (the computation: sums, differences, look-ups). Mixed into SFT data they
    teach a small language model those steps apart from reading the image, as language pretraining would.
    `form="observe"` gives the observation alone as the reasoning (what the image shows, no computation): the data of
    the image-description stage (`scripts.pretrain_vision.align_language_model`)."""
    tasks = list(tasks) if tasks else list(TASKS)
    unknown = [task for task in tasks if task not in MAKERS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the task families are {list(MAKERS)}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size {image_size} is too small to draw the tasks legibly; use {MIN_IMAGE_SIZE} or more"
        )
    if difficulty_weights is not None:
        _check_difficulty_weights(difficulty_weights, difficulty_weights)
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; the forms are {FORMS}")
    if not 0 <= short_rate <= 1:
        raise ValueError(f"short_rate is a share of the examples, between 0 and 1; got {short_rate}")
    if short_rate and form != "long":
        raise ValueError(f"short_rate turns long-form examples short; it does not go with form={form!r}")
    examples = []
    for index in range(start, start + n):
        task = tasks[index % len(tasks)]
        rng = random.Random(f"{seed}:{index}")
        if difficulty_weights is None:
            difficulty = rng.randint(1, 5)
        else:
            difficulty = rng.choices(range(1, 6), difficulty_weights)[0]
        short = short_rate > 0 and random.Random(f"{seed}:{index}:short").random() < short_rate
        example = MAKERS[task](rng, image_size, difficulty, "short" if short else form)
        example.id = f"{task}-{'text-' if form == 'text' else ''}{seed}-{index:06d}"
        examples.append(example)
    return examples


def write_dataset(examples: Sequence[Example], out_dir: str | Path) -> Path:
    """Write `out_dir/data.jsonl` (one JSON object per example: id, problem, answer, images, reasoning, task,
    difficulty, choices, and scene where the example has one) and the images as `out_dir/images/<id>_<k>.png`,
    referenced by relative path.

    Returns `out_dir`; `data.loaders.load_examples(out_dir)` and
    `datasets.load_dataset("json", data_files=str(out_dir / "data.jsonl"))` read it back."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    with open(out / "data.jsonl", "w", encoding="utf-8") as file:
        for index, example in enumerate(examples):
            example_id = example.id or f"example-{index:06d}"
            if not re.fullmatch(r"[A-Za-z0-9._-]+", example_id):
                raise ValueError(f"example {index}: id {example_id!r} cannot name an image file; use [A-Za-z0-9._-]")
            if example_id in seen:
                raise ValueError(f"example {index}: duplicate id {example_id!r} (ids name the image files)")
            seen.add(example_id)
            paths = []
            for k, image in enumerate(example.images):
                path = f"images/{example_id}_{k}.png"
                _save_png(image, out / path)
                paths.append(path)
            record = {
                "id": example_id,
                "problem": example.problem,
                "answer": example.answer,
                "images": paths,
                "reasoning": example.reasoning,
                "task": example.task,
                "difficulty": example.difficulty,
                "choices": example.choices,
            }
            if example.scene is not None:
                record["scene"] = example.scene
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return out


def format_number(value: float) -> str:
    """`4.0` -> "4", `4.5` -> "4.5"."""
    return str(int(value)) if float(value).is_integer() else str(value)


# --- helpers ----------------------------------------------------------------------------------------------------


def _example(
    task: str,
    problem: str,
    answer,
    image: Image.Image,
    steps: list[str],
    difficulty: int,
    scene: dict[str, int],
    form: str = "long",
) -> Example:
    """The example in one of the `FORMS`, from `steps`: the plan first, then the observation (what the image shows),
    the computation, and the check last. Every reasoning but the observe form's ends with "So the answer is X."."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; the forms are {FORMS}")
    if form == "text":  # the observation moves into the problem, the image goes
        reasoning = " ".join([*steps[2:-1], f"So the answer is {answer}."])
        return Example(f"{steps[1]} {problem}", str(answer), [], reasoning, task, difficulty)
    if form == "observe":  # what the image shows, nothing else: image-description data for aligning the LLM
        return Example(problem, str(answer), [image], steps[1], task, difficulty, scene=scene)
    reasoning = " ".join([*(steps if form == "long" else steps[1:-1]), f"So the answer is {answer}."])
    return Example(problem, str(answer), [image], reasoning, task, difficulty, scene=scene)


def _cell(x: float, y: float, grid: int, image_size: int) -> int:
    """Row-major index of the cell of a grid x grid layout that holds the point (x, y)."""
    cell = image_size / grid
    return grid * min(int(y // cell), grid - 1) + min(int(x // cell), grid - 1)


def _shape_cell(shape: Shape, grid: int, image_size: int) -> int:
    """The cell of a grid x grid layout that holds the centre of `shape`."""
    return _cell(shape.x + shape.size / 2, shape.y + shape.size / 2, grid, image_size)


def _label_cell(label: Label, image_size: int) -> int:
    """The cell of the 4 x 4 grid that holds the centre of `label`."""
    return _cell(
        label.x + text_width(label.text, label.scale) / 2, label.y + GLYPH_ROWS * label.scale / 2, 4, image_size
    )


def _shape_class(shape: Shape) -> int:
    """A shape's class in the scene annotations (`SCENE_SLOTS`)."""
    return 1 + len(COLOURS) * SHAPES.index(shape.kind) + list(COLOURS).index(shape.colour)


def _check(same: bool) -> str:
    """The mark after an attribute checked against the asked one."""
    return "+" if same else "-"


def _join(items: Sequence) -> str:
    """ "a", "a and b", "a, b and c"."""
    items = [str(item) for item in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _bar_letter(index: int) -> str:
    return "ABCDE"[index]


def _tick_position(value: int) -> str:
    if value % 2 == 0:
        return f"level with the tick labelled {value}"
    if value == 1:
        return "one gridline above the axis, below the tick labelled 2"
    return f"between the ticks labelled {value - 1} and {value + 1}"


def _place_in_cells(
    rng: random.Random, items: Sequence[tuple[str, str, int]], grid: int, image_size: int
) -> list[Shape]:
    """Each (kind, colour, size) in its own random cell of a grid x grid layout, jittered, at least 4 px apart."""
    cell = image_size / grid
    shapes = []
    for (kind, colour, size), index in zip(items, rng.sample(range(grid * grid), len(items))):
        row, col = divmod(index, grid)
        x_lo, y_lo = math.ceil(col * cell) + 2, math.ceil(row * cell) + 2
        x_hi, y_hi = math.floor((col + 1) * cell) - 2 - size, math.floor((row + 1) * cell) - 2 - size
        shapes.append(Shape(kind, colour, rng.randint(x_lo, max(x_lo, x_hi)), rng.randint(y_lo, max(y_lo, y_hi)), size))
    return shapes


def _triangle_scene(rng: random.Random, angles: list[int], unknown: int, image_size: int) -> TriangleScene:
    """A randomly rotated triangle with these angles (degrees, at vertices 0, 1, 2) and a label just outside each
    vertex, scaled as large as fits with its labels; another rotation is tried while the triangle would come out
    smaller than a third of the image, two labels would come close or two would be centred in one cell of a 4 x 4
    grid (`SCENE_SLOTS`)."""
    scale = max(1, image_size // 56)
    texts = ["?" if k == unknown else f"{angle}°" for k, angle in enumerate(angles)]
    a, b, c = (math.radians(angle) for angle in angles)
    # Law of sines with the side between vertices 0 and 1 of length 1.
    corners = [
        (0.0, 0.0),
        (1.0, 0.0),
        (math.sin(b) / math.sin(c) * math.cos(a), -math.sin(b) / math.sin(c) * math.sin(a)),
    ]
    colour = rng.choice(list(COLOURS))
    while True:
        turn = rng.uniform(0, 2 * math.pi)
        turned = [
            (x * math.cos(turn) - y * math.sin(turn), x * math.sin(turn) + y * math.cos(turn)) for x, y in corners
        ]
        extent = max(
            max(x for x, _ in turned) - min(x for x, _ in turned), max(y for _, y in turned) - min(y for _, y in turned)
        )
        fit = image_size / extent
        while True:  # shrink until the triangle and its labels fit, with 2 px to spare on each side
            points = [(fit * x, fit * y) for x, y in turned]
            centre = (sum(x for x, _ in points) / 3, sum(y for _, y in points) / 3)
            boxes = [_label_box(text, point, centre, scale) for text, point in zip(texts, points)]
            left = min([x for x, _ in points] + [box[0] for box in boxes])
            top = min([y for _, y in points] + [box[1] for box in boxes])
            right = max([x for x, _ in points] + [box[2] for box in boxes])
            bottom = max([y for _, y in points] + [box[3] for box in boxes])
            if right - left <= image_size - 4 and bottom - top <= image_size - 4:
                break
            fit *= 0.95
        if fit * extent < image_size / 3:
            continue
        shift_x, shift_y = (image_size - right - left) / 2, (image_size - bottom - top) / 2
        labels = tuple(
            Label(text, round(box[0] + shift_x), round(box[1] + shift_y), scale) for text, box in zip(texts, boxes)
        )
        if len({_label_cell(label, image_size) for label in labels}) == 3 and not any(
            _too_close(p, q, 5 * scale) for i, p in enumerate(labels) for q in labels[i + 1 :]
        ):
            return TriangleScene(tuple((x + shift_x, y + shift_y) for x, y in points), colour, labels)


def _label_box(
    text: str, vertex: tuple[float, float], centre: tuple[float, float], scale: int
) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of `text` placed just outside `vertex`, away from the triangle's centre."""
    width, height = text_width(text, scale), GLYPH_ROWS * scale
    dx, dy = vertex[0] - centre[0], vertex[1] - centre[1]
    norm = math.hypot(dx, dy)
    dx, dy = dx / norm, dy / norm
    # Distance from the label's centre to its box edge along (dx, dy), plus a gap.
    reach = min(width / 2 / abs(dx) if dx else math.inf, height / 2 / abs(dy) if dy else math.inf) + 2 * scale
    x, y = vertex[0] + dx * reach - width / 2, vertex[1] + dy * reach - height / 2
    return x, y, x + width, y + height


def _too_close(p: Label, q: Label, gap: int) -> bool:
    p_right, q_right = p.x + text_width(p.text, p.scale), q.x + text_width(q.text, q.scale)
    p_bottom, q_bottom = p.y + GLYPH_ROWS * p.scale, q.y + GLYPH_ROWS * q.scale
    return p.x < q_right + gap and q.x < p_right + gap and p.y < q_bottom + gap and q.y < p_bottom + gap


def _save_png(image, path: Path) -> None:
    """Save a PIL image, or the image at a file path, as PNG."""
    if isinstance(image, Image.Image):
        image.save(path, format="PNG")
        return
    with Image.open(image) as opened:
        (opened if opened.mode in ("RGB", "RGBA", "L", "LA", "P", "1") else opened.convert("RGB")).save(
            path, format="PNG"
        )


def parse_difficulty_weights(text: str) -> list[float] | None:
    """`"1,1,0,0,0"` → the `difficulty_weights` of `generate` (None for ""); a ValueError naming `text` otherwise."""
    if not text:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        weights = []
    _check_difficulty_weights(weights, text)
    return weights


def _check_difficulty_weights(weights: Sequence[float], shown) -> None:
    if len(weights) != 5 or min(weights) < 0 or not sum(weights) > 0:
        raise ValueError(f"difficulty weights {shown!r}: needs 5 non-negative weights (difficulty 1..5), not all zero")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (data.jsonl + images/)")
    parser.add_argument("--n", type=int, required=True, help="number of examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tasks", default="", help=f"comma-separated task families (default: all of {','.join(TASKS)})"
    )
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument(
        "--difficulty-weights",
        default="",
        help="five relative weights for difficulties 1..5, e.g. 1,1,0,0,0 for the two easiest (default: uniform)",
    )
    parser.add_argument(
        "--short-rate", type=float, default=0.0, help="share of examples with short-form reasoning (default: 0)"
    )
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] or None
    try:
        weights = parse_difficulty_weights(args.difficulty_weights)
    except ValueError as err:
        parser.error(str(err))
    try:
        examples = generate(args.n, args.seed, tasks, args.image_size, weights, short_rate=args.short_rate)
    except ValueError as err:
        parser.error(str(err))
    out = write_dataset(examples, args.out)
    counts = Counter(example.task for example in examples)
    print(
        f"wrote {len(examples)} examples ({', '.join(f'{t} {n}' for t, n in sorted(counts.items()))}) "
        f"to {out / 'data.jsonl'} (seed {args.seed}, {args.image_size} px)"
    )
    return out


if __name__ == "__main__":
    main()
