"""Problem sampling for RL (k1.5 §2.3.4): curriculum by difficulty and prioritised sampling by success rate.

    sampler = ProblemSampler(ids, difficulties, curriculum=["0:1-2", "10:1-5"], prioritized=True)
    batch = sampler.sample(16, iteration=3)          # problem ids, no repeats
    sampler.update("p17", successes=3, attempts=8)   # after a group of 8 samples is scored

- Curriculum: stages "ITERATION:MIN-MAX" — from that iteration on, only problems with MIN <= difficulty <= MAX are
  drawn (k1.5's ablation warms up on everything, then keeps only hard problems: ["0:1-5", "50:4-5"]).
- Prioritised: problem i is drawn with probability ∝ max(1 − s_i, floor), s_i its tracked success rate: an
  exponential moving average of its groups' success rates (weight `ema` on the newest group), starting at `prior`
  for unseen problems. The floor keeps solved problems in play. The paper leaves the estimator open; this is ours.

The state (success rates, attempts, RNG) is a JSON-able dict saved with checkpoints.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    start: int
    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> Stage:
        try:
            start, span = text.split(":")
            low, high = span.split("-")
            stage = cls(int(start), int(low), int(high))
        except ValueError:
            raise ValueError(f"curriculum stage {text!r} is not 'ITERATION:MIN-MAX' (e.g. '0:1-2')") from None
        if stage.low > stage.high or stage.start < 0:
            raise ValueError(f"curriculum stage {text!r}: need 0 <= ITERATION and MIN <= MAX")
        return stage


class ProblemSampler:
    def __init__(
        self,
        ids: Sequence[str],
        difficulties: Sequence[int],
        *,
        curriculum: Sequence[str] | None = None,
        prioritized: bool = True,
        prior: float = 0.5,
        floor: float = 0.05,
        ema: float = 0.5,
        seed: int = 0,
    ):
        if len(ids) != len(difficulties):
            raise ValueError(f"{len(ids)} problem ids but {len(difficulties)} difficulties")
        duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
        if duplicates:
            raise ValueError(f"problem ids must be unique; repeated: {duplicates[:5]}")
        if not 0 < ema <= 1 or not 0 <= prior <= 1 or not 0 < floor <= 1:
            raise ValueError("need 0 < ema <= 1, 0 <= prior <= 1 and 0 < floor <= 1")
        self.ids = list(ids)
        self.difficulty = dict(zip(ids, difficulties))
        self.stages = sorted((Stage.parse(s) for s in curriculum or []), key=lambda s: s.start)
        if self.stages and self.stages[0].start != 0:
            self.stages.insert(0, Stage(0, min(difficulties), max(difficulties)))
        self.prioritized, self.prior, self.floor, self.ema = prioritized, prior, floor, ema
        self.success: dict[str, float] = {}
        self.attempts: dict[str, int] = {}
        self.rng = random.Random(seed)

    def stage(self, iteration: int) -> Stage | None:
        current = None
        for stage in self.stages:
            if stage.start <= iteration:
                current = stage
        return current

    def eligible(self, iteration: int, exclude: Iterable[str] = ()) -> list[str]:
        stage, excluded = self.stage(iteration), set(exclude)
        return [
            i
            for i in self.ids
            if i not in excluded and (stage is None or stage.low <= self.difficulty[i] <= stage.high)
        ]

    def weight(self, problem_id: str) -> float:
        if not self.prioritized:
            return 1.0
        return max(1.0 - self.success.get(problem_id, self.prior), self.floor)

    def sample(self, n: int, iteration: int, exclude: Iterable[str] = ()) -> list[str]:
        """Up to `n` distinct problem ids for this iteration (fewer if fewer are eligible), never one in `exclude`
        (e.g. problems whose previous group is still being rolled out)."""
        pool = self.eligible(iteration, exclude)
        if not pool and n and not self.eligible(iteration):
            stage = self.stage(iteration)
            raise ValueError(f"no problem has difficulty {stage.low}-{stage.high} (curriculum, iteration {iteration})")
        weights = [self.weight(i) for i in pool]
        chosen = []
        for _ in range(min(n, len(pool))):  # weighted sampling without replacement
            k = self.rng.choices(range(len(pool)), weights=weights)[0]
            chosen.append(pool.pop(k))
            weights.pop(k)
        return chosen

    def update(self, problem_id: str, successes: float, attempts: int) -> None:
        """Record a scored group: `successes` correct out of `attempts` samples."""
        if attempts <= 0:
            return
        rate = successes / attempts
        previous = self.success.get(problem_id, self.prior)
        self.success[problem_id] = (1 - self.ema) * previous + self.ema * rate
        self.attempts[problem_id] = self.attempts.get(problem_id, 0) + attempts

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {
            "success": self.success,
            "attempts": self.attempts,
            "rng": [version, list(internal), gauss],
        }

    def load_state_dict(self, state: dict) -> None:
        self.success = {k: float(v) for k, v in state["success"].items()}
        self.attempts = {k: int(v) for k, v in state["attempts"].items()}
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
