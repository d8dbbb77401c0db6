"""The RL building blocks without an engine: losses (values and gradients against hand computation), rewards and
the length penalty, reward timeouts, samplers, repetition detection and the replay buffer's carry-over logic."""

import json
import math
import time

import pytest
import torch

from trainers import losses
from trainers.partial_rollout import (
    LENGTH,
    REPETITION,
    STOP,
    ReplayBuffer,
    RolloutSettings,
    collect,
    find_repetition,
)
from trainers.rewards import (
    RewardRunner,
    accuracy_reward,
    format_reward,
    length_penalty,
    length_penalty_weight,
)
from trainers.rollout import Completion, Prompt
from trainers.sampling import ProblemSampler

# -- losses ---------------------------------------------------------------------------------------------------

LOGPROBS = [[-1.0, -2.0], [-0.5, -0.5], [-1.0, -1.0], [-3.0, 0.0]]
REF = [[-1.0, -1.0], [-0.5, -1.0], [-2.0, -1.0], [-3.0, -1.0]]
MASK = [[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
REWARDS = [1.0, 0.0, 1.0, 1.0]  # groups of 2: means 0.5 and 1.0


def test_mirror_descent_loss_value_and_gradient_by_hand():
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    loss = losses.mirror_descent_loss(
        logprobs, torch.tensor(REF), torch.tensor(REWARDS), torch.tensor(MASK), group_size=2, tau=0.5
    )
    # s = [-3, -0.5, -2, -3], s_ref = [-2, -0.5, -3, -4], r - r̄ = [0.5, -0.5, 0, 0]
    # terms: 1.5 + 0.25·1, -0.25 + 0, 0 + 0.25·1, 0 + 0.25·1  → mean 0.5
    assert loss.item() == pytest.approx(0.5)
    loss.backward()
    # d/d logprob_jt = mask_jt · (−(r_j − r̄) + τ (s_j − s_ref_j)) / B
    expected = torch.tensor([[-0.25, -0.25], [0.125, 0.0], [0.125, 0.125], [0.125, 0.125]])
    torch.testing.assert_close(logprobs.grad, expected)


def test_mirror_descent_gradient_is_minus_eq3():
    """The gradient w.r.t. the sequence log-probs is minus the paper's Eq. 3 estimator (divided by the group
    count), for random values."""
    g = torch.Generator().manual_seed(0)
    k, groups, tau = 4, 3, 0.3
    s = torch.randn(k * groups, generator=g, dtype=torch.float64, requires_grad=True)
    s_ref = torch.randn(k * groups, generator=g, dtype=torch.float64)
    r = torch.randint(0, 2, (k * groups,), generator=g).double()
    loss = losses.mirror_descent_loss(s[:, None], s_ref[:, None], r, torch.ones(k * groups, 1), k, tau)
    loss.backward()
    rbar = r.view(groups, k).mean(1).repeat_interleave(k)
    eq3 = (r - rbar) - tau * (s.detach() - s_ref)  # d/ds_j of the Eq. 3 objective, per sample (÷k per group)
    torch.testing.assert_close(s.grad, -eq3 / (k * groups))


def test_mirror_descent_token_normalised_and_bad_groups():
    logprobs = torch.tensor(LOGPROBS)
    loss = losses.mirror_descent_loss(
        logprobs, logprobs, torch.tensor(REWARDS), torch.tensor(MASK), 2, tau=1.0, token_normalize=True
    )
    # means: [-1.5, -0.5, -1, -1.5]; only the advantage term: -(0.5·-1.5) - (-0.5·-0.5) = 0.75 - 0.25 → /4
    assert loss.item() == pytest.approx(0.125)
    with pytest.raises(ValueError, match="groups of 3"):
        losses.mirror_descent_loss(logprobs, logprobs, torch.tensor(REWARDS), torch.tensor(MASK), 3, tau=1.0)


def test_grpo_loss_by_hand_with_clipping_and_kl():
    rewards = torch.tensor([1.0, 0.0])
    adv = losses.group_advantages(rewards, 2)
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([a, -a]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)
    old = logprobs.detach() - math.log(1.5)  # ratio 1.5 everywhere, above 1 + ε
    loss = losses.grpo_loss(logprobs, old, rewards, mask, 2, clip_epsilon=0.2)
    # positive advantage: clipped at 1.2 (no gradient); negative: min(1.5A, 1.2A) = 1.5A (gradient flows)
    assert loss.item() == pytest.approx(0.5 * (-1.2 * a + 1.5 * a))
    loss.backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0], [0.5 * 1.5 * a, 0.0]]))
    # KL (k3) at equal policies is 0 with zero gradient; with ref lower by 1: e^-1 + 1 - 1
    same = losses.grpo_loss(logprobs, logprobs, rewards, mask, 2, beta=0.1, ref_logprobs=logprobs - 1.0)
    assert same.item() == pytest.approx(0.1 * math.exp(-1.0), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logprobs"):
        losses.grpo_loss(logprobs, logprobs, rewards, mask, 2, beta=0.1)


def test_grpo_aggregation_modes():
    token_losses = torch.tensor([[1.0, 3.0], [2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert losses.aggregate(token_losses, mask, "sequence_mean").item() == pytest.approx((2.0 + 2.0) / 2)
    assert losses.aggregate(token_losses, mask, "token_mean").item() == pytest.approx(6.0 / 3)
    with pytest.raises(ValueError, match="aggregation"):
        losses.aggregate(token_losses, mask, "sum")


# -- rewards --------------------------------------------------------------------------------------------------


def test_length_penalty_cases():
    # λ = 0.5 − (len − 10) / 30 for lengths 10, 25, 40
    assert length_penalty([10, 25, 40], [True, True, True]) == pytest.approx([0.5, 0.0, -0.5])
    assert length_penalty([10, 25, 40], [False, False, False]) == pytest.approx([0.0, 0.0, -0.5])
    assert length_penalty([10, 20, 40], [True, False, True]) == pytest.approx([0.5, 0.0, -0.5])
    assert length_penalty([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]
    assert length_penalty([], []) == []
    with pytest.raises(ValueError):
        length_penalty([1, 2], [True])
    assert [length_penalty_weight(i, 0.3, start=5) for i in (0, 4, 5, 50)] == [0.0, 0.0, 0.3, 0.3]


def test_accuracy_and_format_rewards():
    completions = [
        "count: 3 red.\n</think>\n\n\\boxed{3}<|im_end|>",
        "so it is 3\n</think>\n\nThe answer is 3.",
        "thinking \\boxed{3} but never closing",
        "</think>\\boxed{4}",
        "</think>\\boxed{3} or \\boxed{4}",
        "</think>\\boxed{(B) blue}",
    ]
    answers = ["3", "3", "3", "3", "3", "B"]
    choices = [None] * 5 + [["red", "blue"]]
    assert accuracy_reward(None, completions, answer=answers, choices=choices) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert format_reward(None, completions) == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]


def test_reward_runner_survives_raising_and_hanging_functions():
    def picky(prompts, completions, **kw):
        if any("boom" in c for c in completions):
            raise RuntimeError("boom")
        return [1.0] * len(completions)

    def sleepy(prompts, completions, **kw):
        if any("slow" in c for c in completions):
            time.sleep(30)
        return [0.5] * len(completions)

    runner = RewardRunner([picky, sleepy], weights=[1.0, 2.0], timeout=0.5)
    completions = ["fine", "boom", "slow", "fine too"]
    start = time.monotonic()
    scores = runner([None] * 4, completions, answer=["1"] * 4)
    assert time.monotonic() - start < 10
    assert scores == [[1.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.0, 0.5]]
    assert runner.failures == {"picky": 1, "sleepy": 1}
    assert runner.combine(scores) == [2.0, 1.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="unknown reward"):
        RewardRunner(["accuracy", "vibes"])
    with pytest.raises(ValueError, match="weights"):
        RewardRunner(["accuracy"], weights=[1.0, 2.0])


# -- sampling -------------------------------------------------------------------------------------------------


def test_curriculum_stages():
    ids = [f"p{i}" for i in range(10)]
    sampler = ProblemSampler(ids, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5], curriculum=["0:1-2", "3:4-5"], prioritized=False)
    assert set(sampler.sample(10, iteration=0)) == {"p0", "p1", "p2", "p3"}
    assert set(sampler.sample(10, iteration=5)) == {"p6", "p7", "p8", "p9"}
    assert set(sampler.sample(10, iteration=5, exclude=["p6"])) == {"p7", "p8", "p9"}
    assert sampler.sample(10, iteration=5, exclude=["p6", "p7", "p8", "p9"]) == []  # all in flight: nothing new
    with pytest.raises(ValueError, match="difficulty 9-9"):
        ProblemSampler(ids, [1] * 10, curriculum=["0:9-9"]).sample(1, iteration=0)
    with pytest.raises(ValueError, match="ITERATION:MIN-MAX"):
        ProblemSampler(ids, [1] * 10, curriculum=["easy"])
    with pytest.raises(ValueError, match="unique"):
        ProblemSampler(["a", "a"], [1, 1])
    late = ProblemSampler(ids[:2], [1, 5], curriculum=["2:5-5"])  # before the first stage: everything
    assert set(late.sample(2, iteration=0)) == {"p0", "p1"}


def test_prioritized_sampling_follows_one_minus_success_with_floor_and_state():
    sampler = ProblemSampler(["easy", "hard", "new"], [1, 1, 1], prior=0.5, floor=0.05, ema=1.0, seed=0)
    sampler.update("easy", successes=8, attempts=8)
    sampler.update("hard", successes=0, attempts=8)
    assert [sampler.weight(i) for i in ("easy", "hard", "new")] == [0.05, 1.0, 0.5]
    counts = {"easy": 0, "hard": 0, "new": 0}
    for _ in range(3000):
        counts[sampler.sample(1, iteration=0)[0]] += 1
    total = 0.05 + 1.0 + 0.5
    for key, weight in (("easy", 0.05), ("hard", 1.0), ("new", 0.5)):
        assert counts[key] / 3000 == pytest.approx(weight / total, abs=0.03)
    state = sampler.state_dict()
    twin = ProblemSampler(["easy", "hard", "new"], [1, 1, 1])
    twin.load_state_dict(state)
    assert twin.sample(2, 0) == sampler.sample(2, 0)  # same statistics and RNG → same draws
    ema = ProblemSampler(["a"], [1], prior=0.5, ema=0.5)
    ema.update("a", 1, 1)
    assert ema.success["a"] == pytest.approx(0.75)


# -- repetition and partial rollouts ----------------------------------------------------------------------------


def test_find_repetition():
    assert find_repetition(list(range(200))) is None
    looping = list(range(40)) + [7, 8, 9] * 30
    cut = find_repetition(looping, max_period=8, min_repeats=4, min_tokens=24)
    assert cut == 40 + 24  # cut right after the loop has covered 24 tokens
    assert find_repetition(looping, start=100, max_period=8, min_repeats=4, min_tokens=24) == 101
    assert find_repetition([5] * 31, min_tokens=32) is None  # shorter than min_tokens
    assert find_repetition([5] * 32, min_tokens=32) == 32


class ScriptedEngine:
    """Answers rollout requests with deterministic tokens: problem p's responses are `lengths[p]` tokens long
    (token = 10 + position), so the carry-over logic can be checked exactly. The real engine is in test_rl.py."""

    def __init__(self, lengths, eos=2):
        self.lengths, self.eos, self.version, self.calls = lengths, eos, 1, []

    def rollout(self, prompts, partials, n, max_tokens, **sampling):
        self.calls.append(list(max_tokens))
        out = []
        for prompt, partial, budget in zip(prompts, partials, max_tokens):
            target = self.lengths[prompt.token_ids[0]]
            done = len(partial.token_ids) if partial else 0
            new = list(range(10 + done, 10 + min(target, done + budget)))
            if done + budget >= target:
                new[-1] = self.eos
            finish = STOP if new[-1] == self.eos else "length"
            old = partial or Completion([], [], "length", [])
            copies = 1 if partial else n
            out.append(
                [
                    Completion(
                        old.token_ids + new,
                        old.logprobs + [-1.0] * len(new),
                        finish,
                        old.versions + [self.version] * len(new),
                    )
                    for _ in range(copies)
                ]
            )
        self.version += 1
        return out


def test_partial_rollouts_carry_over_and_finish_groups():
    engine = ScriptedEngine({0: 5, 1: 25, 2: 100})
    prompts = {"short": Prompt([0]), "mid": Prompt([1]), "long": Prompt([2])}
    settings = RolloutSettings(n=2, max_response_length=60, budget=10, repetition_check=False)
    buffer = ReplayBuffer()
    done, stats = collect(engine, buffer, prompts, ["short", "mid", "long"], 0, settings)
    assert [g.problem_id for g in done] == ["short"] and stats.finished == 2 and stats.carried == 4
    assert engine.calls[-1] == [10, 10, 10]
    done, stats = collect(engine, buffer, prompts, [], 1, settings)
    assert done == [] and stats.continued == 4 and stats.carried == 4
    done, stats = collect(engine, buffer, prompts, [], 2, settings)
    assert [g.problem_id for g in done] == ["mid"]
    mid = done[0].samples[0]
    assert len(mid.token_ids) == 25 and mid.end == STOP and mid.segments == 3
    assert mid.versions == [1] * 10 + [2] * 10 + [3] * 5  # each segment keeps the version that produced it
    for it in range(3, 6):
        done, stats = collect(engine, buffer, prompts, [], it, settings)
    assert [g.problem_id for g in done] == ["long"] and stats.truncated == 2
    assert len(done[0].samples[0].token_ids) == 60 and done[0].samples[0].end == LENGTH
    assert engine.calls[-1] == [10, 10] and len(buffer) == 0
    # the buffer round-trips through its JSON state
    buffer2 = ReplayBuffer()
    collect(engine, buffer2, prompts, ["long"], 6, settings)
    restored = ReplayBuffer()
    restored.load_state_dict(buffer2.state_dict())
    assert restored.state_dict() == buffer2.state_dict() and len(restored.unfinished()) == 2
    with pytest.raises(ValueError, match="already has a group"):
        collect(engine, buffer2, prompts, ["long"], 7, settings)


def test_without_budget_every_sample_runs_to_the_end_and_loops_are_cut():
    engine = ScriptedEngine({0: 5, 1: 100})
    prompts = {"a": Prompt([0]), "b": Prompt([1])}
    settings = RolloutSettings(n=2, max_response_length=60, budget=None)
    done, stats = collect(engine, ReplayBuffer(), prompts, ["a", "b"], 0, settings)
    assert len(done) == 2 and stats.carried == 0 and engine.calls[-1] == [60, 60]

    class Looping(ScriptedEngine):
        def rollout(self, prompts, partials, n, max_tokens, **sampling):
            c = Completion([1, 2, 3, 4] * 20, [-0.1] * 80, "length", [1] * 80)
            return [[c] * n for _ in prompts]

    looped, stats = collect(Looping({}), ReplayBuffer(), {"a": Prompt([0])}, ["a"], 0, settings)
    sample = looped[0].samples[0]
    assert sample.end == REPETITION and len(sample.token_ids) == 32 and stats.repetition_stops == 2


def test_plot_rl_curves(tmp_path):
    from scripts.plot_rl import main as plot_main

    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {
            "iteration": i,
            "reward_mean": i / 4,
            "accuracy": i / 5,
            "response_length_mean": 50 + i,
            "response_length_max": 90,
        }
        for i in range(4)
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_main([str(metrics)])
    assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics.write_text('{"iteration": 0}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        plot_main([str(metrics)])


@pytest.mark.parametrize("name", ["rl_tiny.yaml", "long2short_rl.yaml"])
def test_shipped_rl_configs_parse(name):
    from trainers.rl import parse_config

    from .conftest import ROOT

    config = parse_config(["--config", str(ROOT / "configs" / name), "--resume"])
    assert config.resume == "latest" and config.num_generations >= 2
    if name.startswith("long2short"):
        assert config.length_penalty_weight > 0 and config.length_penalty_start == 0
        assert (
            config.max_response_length
            < parse_config(["--config", str(ROOT / "configs" / "rl_tiny.yaml")]).max_response_length
        )


def test_step_plan_passes_over_whole_groups_and_uniform_groups_are_left_out():
    import random

    from trainers.rl import TrainItem, informative_groups, parse_config, plan_steps

    def group(advantages):
        return [
            TrainItem(torch.tensor([1]), 1, None, None, torch.ones(1), a, torch.zeros(1), torch.ones(1))
            for a in advantages
        ]

    # 8 rewards of 0.1 (format only) are uniform though r - mean(r) is -7e-9 in float32
    scored = [(f"g{i}", [1.1, 0.1, 1.0, 0.1], None, None) for i in range(3)] + [("g3", [0.0, 0.35] * 4, None, None)]
    scored += [("flat0", [0.1] * 8, None, None), ("flat1", [1.1] * 8, None, None), ("flat2", [0.0] * 8, None, None)]
    kept, skipped = informative_groups(scored)
    assert skipped == 3 and [entry[0] for entry in kept] == ["g0", "g1", "g2", "g3"]
    groups = [group([0.5, -0.5]) for _ in range(4)]
    owner = {id(item): g for g, samples in enumerate(groups) for item in samples}
    plan = plan_steps(groups, steps=2, epochs=3, rng=random.Random(0))
    assert len(plan) == 6 and all(len(step) == 4 for step in plan)  # 2 groups of 2 samples per step
    for epoch in range(3):  # each pass trains every sample once, a group's samples in the same step
        passed = plan[2 * epoch : 2 * epoch + 2]
        assert sorted(id(item) for step in passed for item in step) == sorted(owner)
        for step in passed:
            assert owner[id(step[0])] == owner[id(step[1])] and owner[id(step[2])] == owner[id(step[3])]
    assert len({tuple(owner[id(item)] for item in step) for step in plan}) > 2  # each pass is shuffled anew
    with pytest.raises(ValueError, match="epochs_per_iteration=0 must be at least 1"):
        parse_config(["--model_name_or_path", "x", "--train_data", "y", "--epochs_per_iteration", "0"])
    with pytest.raises(ValueError, match=r"vllm_weight_transfer='nccl' is not one of \('auto', 'ipc', 'shm'\)"):
        parse_config(["--model_name_or_path", "x", "--train_data", "y", "--vllm_weight_transfer", "nccl"])
