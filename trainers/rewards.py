"""Verifiable rewards for RL, as plain callables `(prompts, completions, **kwargs) -> list[float]`.

`completions` are response texts (the model's output after the chat template's `<think>\\n`: the reasoning, the
closing `</think>`, then the answer). Keyword arguments carry one value per completion: `answer`, `choices`, `task`,
`difficulty`, `id` (the fields of `data.records.Example`).

    accuracy_reward   1 if the final answer (after the thinking block) is correct, else 0 (math-verify + exact rules)
    format_reward     1 if the thinking block is closed once and one final `\\boxed{}` answer follows, else 0
    length_penalty    k1.5 §2.3.3, for the responses of one problem

`RewardRunner` calls reward functions so that one that raises or hangs never kills a run: the failing completions
score 0 and are counted.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence

from data.verify import extract_boxed, is_correct

logger = logging.getLogger(__name__)
THINK_END = "</think>"
THINK_START = "<think>"

RewardFunc = Callable[..., list[float]]


def final_answer_text(completion: str, think_end: str = THINK_END) -> str | None:
    """The text after the thinking block, or None if the block is not closed (an unfinished thought is no answer)."""
    if think_end not in completion:
        return None
    return completion.rsplit(think_end, 1)[1]


def accuracy_reward(prompts, completions: Sequence[str], answer: Sequence[str], choices=None, **kwargs) -> list[float]:
    """1.0 if the answer after the thinking block (its last `\\boxed{}`, else "the answer is ...") is correct."""
    choices = choices if choices is not None else [None] * len(completions)
    rewards = []
    for text, reference, options in zip(completions, answer, choices):
        tail = final_answer_text(text)
        prediction = extract_boxed(tail) if tail is not None else None
        rewards.append(float(prediction is not None and is_correct(prediction, str(reference), options)))
    return rewards


def format_reward(prompts, completions: Sequence[str], **kwargs) -> list[float]:
    """1.0 if the thinking block is closed exactly once (and not reopened) and exactly one `\\boxed{}` follows it."""
    rewards = []
    for text in completions:
        tail = final_answer_text(text)
        ok = tail is not None and text.count(THINK_END) == 1 and THINK_START not in tail and tail.count("\\boxed") == 1
        rewards.append(float(ok and extract_boxed(tail) is not None))
    return rewards


REWARD_FUNCS: dict[str, RewardFunc] = {"accuracy": accuracy_reward, "format": format_reward}


def length_penalty(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """The k1.5 length reward (§2.3.3) for the k responses of ONE problem.

        λ_i = 0.5 − (len_i − min_len) / (max_len − min_len);   reward_i = λ_i if correct_i else min(0, λ_i)

    and 0 for every response when all lengths are equal. Short correct answers gain up to +0.5; long ones lose up to
    0.5; wrong answers are only ever penalised."""
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    if high == low:
        return [0.0] * len(lengths)
    rewards = []
    for length, ok in zip(lengths, correct):
        lam = 0.5 - (length - low) / (high - low)
        rewards.append(lam if ok else min(0.0, lam))
    return rewards


def length_penalty_weight(iteration: int, weight: float, start: int) -> float:
    """k1.5's warm-up for the length penalty: weight 0 before iteration `start`, then the constant `weight`."""
    return weight if iteration >= start else 0.0


class RewardRunner:
    """Calls reward functions with a timeout. A function that raises or exceeds `timeout` seconds on the whole batch
    is retried one completion at a time, so only the failing completions score 0; each is counted in `failures`
    (by function name) and logged. Runs stay alive: a hung call is left in a daemon thread."""

    def __init__(
        self, funcs: Sequence[RewardFunc | str], weights: Sequence[float] | None = None, timeout: float = 10.0
    ):
        unknown = [f for f in funcs if isinstance(f, str) and f not in REWARD_FUNCS]
        if unknown:
            raise ValueError(f"unknown reward function(s) {unknown}; built in: {sorted(REWARD_FUNCS)}")
        self.funcs = [REWARD_FUNCS[f] if isinstance(f, str) else f for f in funcs]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.funcs)
        if len(self.weights) != len(self.funcs):
            raise ValueError(f"{len(self.weights)} reward weights for {len(self.funcs)} reward functions")
        self.names = [getattr(f, "__name__", type(f).__name__) for f in self.funcs]
        self.timeout = timeout
        self.failures: Counter = Counter()

    def __call__(self, prompts: list, completions: list[str], **kwargs) -> list[list[float]]:
        """One list of scores per reward function (unweighted), each with one float per completion."""
        return [self._scores(name, func, prompts, completions, kwargs) for name, func in zip(self.names, self.funcs)]

    def combine(self, scores: list[list[float]]) -> list[float]:
        return [sum(w * s[i] for w, s in zip(self.weights, scores)) for i in range(len(scores[0]))] if scores else []

    def _scores(self, name: str, func: RewardFunc, prompts, completions, kwargs) -> list[float]:
        try:
            scores = _call_with_timeout(func, self.timeout, prompts, completions, **kwargs)
            if len(scores) != len(completions):
                raise ValueError(f"returned {len(scores)} scores for {len(completions)} completions")
            return [float(s) for s in scores]
        except Exception as err:  # noqa: BLE001  (a reward function's bug must not end the run)
            if len(completions) == 1:
                self.failures[name] += 1
                logger.warning("reward %s failed on a completion (scored 0): %s", name, err)
                return [0.0]
            logger.warning("reward %s failed on a batch of %d (%s); scoring one by one", name, len(completions), err)
        scores = []
        for i in range(len(completions)):
            one = {k: [v[i]] if isinstance(v, list | tuple) else v for k, v in kwargs.items()}
            scores.extend(self._scores(name, func, prompts[i : i + 1], completions[i : i + 1], one))
        return scores


def _call_with_timeout(func: RewardFunc, timeout: float, *args, **kwargs):
    result: dict = {}

    def target():
        try:
            result["value"] = func(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True, name=f"reward-{getattr(func, '__name__', 'func')}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no result after {timeout:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]
