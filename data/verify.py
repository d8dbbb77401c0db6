"""Final-answer extraction and answer checking, for evaluation and RL rewards.

extract_boxed("... so the answer is \\boxed{\\frac{1}{2}}")  -> "\\frac{1}{2}"
is_correct("\\frac{1}{2}", "0.5")                             -> True
is_correct("(b) blue", "B", choices=["red", "blue"])         -> True
"""

import re
import threading
from fractions import Fraction

_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:]?")  # "B", "(b)", "B.", "B:"
_LETTER_WITH_TEXT = re.compile(r"(?:\(([A-Za-z])\)|([A-Za-z])[.:)])\s+\S.*")  # "(B) blue", "B. blue", "B) blue"
_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+)", re.IGNORECASE)
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")
_UNITS = re.compile(r"\^\s*\{?\\circ\}?|°|\\%|%|\\,|\\!|\\ ")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")
_MATH = re.compile(r"[\d\\^=+*/]")  # strings that math-verify may parse as mathematics


def extract_boxed(text: str) -> str | None:
    """The final answer in a model response.

    The content of the last complete `\\boxed{...}` (nested braces kept, e.g. `\\boxed{\\frac{1}{2}}` gives
    `\\frac{1}{2}`); without one, the text after the last "answer is" on its line, without a trailing period
    ("So the answer is 4." gives "4"); otherwise None."""
    start = text.rfind("\\boxed")
    while start != -1:
        content = _braced(text, start + len("\\boxed"))
        if content is not None:
            return content.strip()
        start = text.rfind("\\boxed", 0, start)
    matches = [m for line in text.splitlines() for m in _ANSWER_IS.finditer(line)]
    if matches:
        answer = matches[-1].group(1).strip().rstrip(".").strip()
        return answer or None
    return None


def is_correct(prediction: str, answer: str, choices: list[str] | None = None) -> bool:
    """Whether `prediction` gives the reference `answer`.

    `prediction` is an extracted final answer; a whole response is accepted too (its `extract_boxed` answer is used).
    - Multiple choice (`answer` is a letter, or the text of one of `choices`): the predicted letter ("b", "(B)",
      "B. blue") or option text ("blue") must name the same option; letters compare case-insensitively.
    - Numbers compare exactly by value: "12.50" == "12.5", "\\frac{1}{2}" == "0.5" == "1/2", "1,000" == "1000";
      degree and percent signs and a leading "x =" are ignored.
    - Anything else: math-verify's symbolic equivalence when it is installed and both sides look mathematical,
      else normalised string equality (case, spaces, `$`, `\\text{}` and a trailing period ignored).

    math-verify's timeouts use signals, which only work in the main thread; other threads run it without a timeout."""
    prediction = _clean(extract_boxed(prediction) or prediction)
    answer = _clean(answer)
    if not prediction or not answer:
        return False
    if choices or _letter(answer) is not None:
        expected = _option(answer, choices)
        if expected is not None:
            return _option(prediction, choices) == expected
    predicted_number, expected_number = _number(prediction), _number(answer)
    if predicted_number is not None and expected_number is not None:
        return predicted_number == expected_number
    symbolic = _math_verify(answer, prediction)
    if symbolic is not None:
        return symbolic
    return _normalise(prediction) == _normalise(answer)


def _braced(text: str, index: int) -> str | None:
    """The content of the brace group opening at `text[index]` (after optional spaces), or None if unbalanced."""
    while index < len(text) and text[index] == " ":
        index += 1
    if index >= len(text) or text[index] != "{":
        return None
    depth = 0
    for end in range(index, len(text)):
        if text[end] == "{":
            depth += 1
        elif text[end] == "}":
            depth -= 1
            if depth == 0:
                return text[index + 1 : end]
    return None


def _clean(text: str) -> str:
    """Strip spaces, `$...$`, `\\(...\\)`, markdown bold, `\\text{...}` wrappers and a trailing period."""
    text = text.strip().replace("**", "")
    text = re.sub(r"^\\\(|\\\)$", "", text).strip()
    text = text.strip("$").strip()
    while True:
        unwrapped = _WRAPPERS.sub(r"\1", text)
        if unwrapped == text:
            break
        text = unwrapped
    return text.rstrip(".").strip()


def _letter(text: str) -> str | None:
    """The option letter a short answer names ("B", "(b)", "B.", "(B) blue", "B) blue"), upper-cased."""
    match = _LETTER.fullmatch(text) or _LETTER_WITH_TEXT.fullmatch(text)
    if match is None:
        return None
    return next(group for group in match.groups() if group).upper()


def _option(text: str, choices: list[str] | None) -> int | None:
    """The index of the option `text` names, by letter or by option text."""
    letter = _letter(text)
    if letter is not None and (not choices or ord(letter) - ord("A") < len(choices)):
        return ord(letter) - ord("A")
    for index, choice in enumerate(choices or []):
        if _same_value(text, _clean(str(choice))):
            return index
    return None


def _same_value(a: str, b: str) -> bool:
    number_a, number_b = _number(a), _number(b)
    if number_a is not None and number_b is not None:
        return number_a == number_b
    return _normalise(a) == _normalise(b)


def _number(text: str) -> Fraction | None:
    """The exact value of an integer, decimal, fraction (`3/4`, `\\frac{3}{4}`) or thousands-separated number."""
    text = _UNITS.sub("", text).replace(" ", "")
    text = re.sub(r"^[A-Za-z]\w*=", "", text)  # "x=4"
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    text = _FRAC.sub(r"(\1)/(\2)", text)
    match = re.fullmatch(r"([+-]?)\(?([^()]+)\)?/\(?([^()]+)\)?", text)
    try:
        if match:
            sign, numerator, denominator = match.groups()
            value = Fraction(numerator) / Fraction(denominator)
            return -value if sign == "-" else value
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _math_verify(answer: str, prediction: str) -> bool | None:
    """math-verify's verdict, or None when it is not installed, a side does not look mathematical (math-verify
    would read plain words as products of symbols) or a side does not parse."""
    if not (_MATH.search(answer) and _MATH.search(prediction)):
        return None
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(f"${answer}$", parsing_timeout=timeout)
    predicted = parse(f"${prediction}$", parsing_timeout=timeout)
    if not gold or not predicted:
        return None
    return bool(verify(gold, predicted, timeout_seconds=timeout))


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", _clean(text)).lower()
