"""Partial rollouts (k1.5 §2.6.2): a per-iteration output-token budget, a replay buffer of unfinished samples, and
repetition detection.

Each iteration, `collect` asks the engine, in one call, for (a) the next segment of every unfinished sample in the
buffer (prompt + partial response + the same images) and (b) k fresh samples for each new problem, every request
capped at `budget` new tokens. A sample ends when it emits EOS, reaches `max_response_length`, or starts looping
(`find_repetition`); otherwise it waits in the buffer for the next iteration. A group (the k samples of one problem)
leaves the buffer for training once all its samples have ended. Every token keeps the policy version that produced
it, so a trainer can mask older segments out of the loss.

Without a budget (`budget=None`) every sample runs to the end in the iteration that starts it: plain synchronous
rollouts, whose iteration lasts as long as its longest sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from trainers.rollout import Completion, Prompt

# Why a sample ended: EOS/stop token, max_response_length (or the engine's max_model_len), a detected loop, or the
# engine aborted the request.
STOP, LENGTH, REPETITION, ABORT = "stop", "length", "repetition", "abort"


@dataclass
class Sample:
    """One response being built across iterations. `versions[i]` is the policy version of token i."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    end: str | None = None  # None while unfinished, else STOP / LENGTH / REPETITION / ABORT
    segments: int = 0

    @property
    def finished(self) -> bool:
        return self.end is not None

    def completion(self) -> Completion:
        return Completion(self.token_ids, self.logprobs, self.end or LENGTH, self.versions)


@dataclass
class Group:
    """The k samples of one problem, started at iteration `started`."""

    problem_id: str
    samples: list[Sample]
    started: int

    @property
    def complete(self) -> bool:
        return all(s.finished for s in self.samples)


@dataclass
class RolloutStats:
    new_groups: int = 0
    continued: int = 0  # samples that got another segment this iteration
    finished: int = 0  # samples that ended this iteration
    carried: int = 0  # samples still unfinished after this iteration
    repetition_stops: int = 0
    truncated: int = 0  # samples cut at max_response_length
    tokens: int = 0  # new tokens generated this iteration


def find_repetition(
    token_ids: Sequence[int], start: int = 0, max_period: int = 64, min_repeats: int = 4, min_tokens: int = 32
) -> int | None:
    """Where a looping response should be cut, or None.

    The tail ending at position e is a loop when its last L = max(min_repeats·p, min_tokens) tokens repeat with some
    period p <= max_period (tokens[i] == tokens[i − p] over the last L − p positions). Returns the smallest such end
    e (exclusive) with e > start, i.e. the response is cut right after the loop is first seen; positions before
    `start` were checked earlier."""
    tokens = np.asarray(token_ids)
    best = None
    for p in range(1, min(max_period, len(tokens) // 2) + 1):
        need = max(min_repeats * p, min_tokens) - p  # consecutive matches tokens[i] == tokens[i - p]
        if need > len(tokens) - p:
            continue
        match = tokens[p:] == tokens[:-p]  # match[j] compares positions j + p and j
        run = _run_lengths(match)
        ends = np.nonzero(run >= need)[0] + p + 1  # match[j] is about position j + p; cut after it
        ends = ends[ends > start]
        if len(ends) and (best is None or ends[0] < best):
            best = int(ends[0])
    return best


def _run_lengths(match: np.ndarray) -> np.ndarray:
    """For a boolean array, the length of the run of Trues ending at each position (0 where False)."""
    idx = np.arange(len(match))
    last_false = np.maximum.accumulate(np.where(~match, idx, -1))
    return np.where(match, idx - last_false, 0)


class ReplayBuffer:
    """Groups whose samples are still being rolled out, by problem id (one group per problem at a time)."""

    def __init__(self):
        self.groups: dict[str, Group] = {}

    def __len__(self) -> int:
        return len(self.groups)

    def add(self, group: Group) -> None:
        if group.problem_id in self.groups:
            raise ValueError(f"problem {group.problem_id!r} already has a group in the replay buffer")
        self.groups[group.problem_id] = group

    def unfinished(self) -> list[tuple[Group, Sample]]:
        return [(g, s) for g in self.groups.values() for s in g.samples if not s.finished]

    def pop_complete(self) -> list[Group]:
        done = [g for g in self.groups.values() if g.complete]
        for g in done:
            del self.groups[g.problem_id]
        return done

    def state_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups.values()]}

    def load_state_dict(self, state: dict) -> None:
        self.groups = {}
        for g in state["groups"]:
            self.add(Group(g["problem_id"], [Sample(**s) for s in g["samples"]], g["started"]))


@dataclass
class RolloutSettings:
    n: int  # samples per problem (the group size k)
    max_response_length: int
    budget: int | None = None  # new tokens per sample per iteration (partial rollouts); None = run to the end
    repetition_check: bool = True
    repetition_max_period: int = 64
    repetition_min_repeats: int = 4
    repetition_min_tokens: int = 32


def collect(
    engine,
    buffer: ReplayBuffer,
    prompts: dict[str, Prompt],
    new_problem_ids: Sequence[str],
    iteration: int,
    settings: RolloutSettings,
    **sampling,
) -> tuple[list[Group], RolloutStats]:
    """One iteration's rollout phase: continue the buffer's unfinished samples and start `new_problem_ids`, all in
    one engine call, then return the groups that are complete (removed from the buffer) and the phase's counts."""
    stats = RolloutStats(new_groups=len(new_problem_ids))
    for pid in new_problem_ids:
        buffer.add(Group(pid, [Sample() for _ in range(settings.n)], iteration))
    pending = buffer.unfinished()
    fresh = [g for g in buffer.groups.values() if g.started == iteration and not any(s.segments for s in g.samples)]
    continuing = [(g, s) for g, s in pending if s.segments]
    stats.continued = len(continuing)

    budget = settings.budget or settings.max_response_length
    request_prompts = [prompts[g.problem_id] for g, _ in continuing] + [prompts[g.problem_id] for g in fresh]
    partials = [s.completion() for _, s in continuing] + [None] * len(fresh)
    max_tokens = [min(budget, settings.max_response_length - len(s.token_ids)) for _, s in continuing] + [
        min(budget, settings.max_response_length)
    ] * len(fresh)
    results = (
        engine.rollout(request_prompts, partials, n=settings.n, max_tokens=max_tokens, **sampling)
        if request_prompts
        else []
    )
    updates = [(s, r[0], m) for (_, s), r, m in zip(continuing, results, max_tokens)]
    for g, r, m in zip(fresh, results[len(continuing) :], max_tokens[len(continuing) :]):
        updates.extend((s, c, m) for s, c in zip(g.samples, r))
    for sample, completion, requested in updates:
        before = len(sample.token_ids)
        _advance(sample, completion, requested, settings)
        stats.tokens += len(sample.token_ids) - before
        if sample.finished:
            stats.finished += 1
            stats.repetition_stops += sample.end == REPETITION
            stats.truncated += sample.end == LENGTH
    stats.carried = len(buffer.unfinished())
    return buffer.pop_complete(), stats


def _advance(sample: Sample, completion: Completion, requested: int, settings: RolloutSettings) -> None:
    """Take an engine result (partial tokens + the new segment) into `sample` and decide whether it has ended."""
    before = len(sample.token_ids)
    sample.token_ids, sample.logprobs, sample.versions = (
        list(completion.token_ids),
        list(completion.logprobs),
        list(completion.versions),
    )
    sample.segments += 1
    new = len(sample.token_ids) - before
    if settings.repetition_check:
        cut = find_repetition(
            sample.token_ids,
            start=before,
            max_period=settings.repetition_max_period,
            min_repeats=settings.repetition_min_repeats,
            min_tokens=settings.repetition_min_tokens,
        )
        if cut is not None:
            del sample.token_ids[cut:], sample.logprobs[cut:], sample.versions[cut:]
            sample.end = REPETITION
            return
    if completion.finish_reason == STOP:
        sample.end = STOP
    elif completion.finish_reason == "abort":
        sample.end = ABORT
    elif len(sample.token_ids) >= settings.max_response_length or new < requested:
        sample.end = LENGTH  # the response cap, or the engine's max_model_len stopped it early
