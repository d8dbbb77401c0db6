"""Long-CoT RL for kimi_mm: Kimi k1.5 online policy mirror descent (or GRPO) with partial rollouts through vLLM.

    python trainers/rl.py --config configs/rl_tiny.yaml [--key value ...] [--resume [CHECKPOINT]]
    torchrun --nproc_per_node 2 trainers/rl.py --config ...                 # CPU, 2 processes
    accelerate launch --config_file configs/accelerate/fsdp2.yaml trainers/rl.py --config ...   # GPUs

One iteration (k1.5 §2.3, §2.6):
    sample problems (curriculum + prioritised by success rate)
    → roll out k samples each through vLLM with a per-iteration token budget; unfinished samples wait in the replay
      buffer and are continued next iteration; looping samples are cut (repetition detection)
    → score the groups whose samples have all finished (verifiable rewards + k1.5 length penalty)
    → train on them: `epochs_per_iteration` passes of `steps_per_iteration` optimizer steps (mini-batches of
      groups), the iteration's policy π_θi as the reference, the optimizer reset at the start of the iteration
      (both switchable); optionally only the groups whose rewards differ
    → push the new weights into vLLM in place → log a line to `metrics.jsonl` → checkpoint (atomically).

Every process runs its own engine (colocated, like vLLM's data-parallel rollouts): all processes draw the same
problems, each rolls out and trains on its share, gradients are averaged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from trainers import cli, losses
from trainers.partial_rollout import REPETITION, Group, ReplayBuffer, RolloutSettings, Sample, collect
from trainers.rewards import RewardRunner, length_penalty, length_penalty_weight
from trainers.rollout import TRANSPORTS
from trainers.sampling import ProblemSampler
from trainers.sft import packed_attention

logger = logging.getLogger(__name__)
ALGORITHMS = ("mirror_descent", "grpo")


@dataclass
class RLConfig(TrainingArguments):
    model_name_or_path: str = field(default="", metadata={"help": "kimi_mm checkpoint to start from (SFT output)"})
    train_data: str = field(default="", metadata={"help": "problems with answers: a dataset dir/jsonl/parquet"})
    algorithm: str = field(default="mirror_descent", metadata={"help": "mirror_descent (k1.5) or grpo (R1)"})
    tau: float = field(default=0.1, metadata={"help": "mirror descent: strength of the (τ/2)(log π/π_ref)² term"})
    token_normalize: bool = field(default=False, metadata={"help": "mirror descent: mean log-prob over tokens"})
    clip_epsilon: float = field(default=0.2, metadata={"help": "grpo: ratio clip"})
    clip_epsilon_high: float | None = field(default=None, metadata={"help": "grpo: upper clip (DAPO clip-higher)"})
    beta: float = field(default=0.0, metadata={"help": "grpo: KL weight to the frozen starting model"})
    scale_rewards: bool = field(default=True, metadata={"help": "grpo: divide advantages by the group's std"})
    loss_aggregation: str = field(default="sequence_mean", metadata={"help": "grpo: sequence_mean or token_mean"})
    reference_per_iteration: bool = field(
        default=True, metadata={"help": "mirror descent: reference = this iteration's policy (else the start model)"}
    )
    reset_optimizer_each_iteration: bool = field(default=True, metadata={"help": "k1.5: fresh optimizer state"})
    num_iterations: int = field(default=10, metadata={"help": "RL iterations"})
    prompts_per_iteration: int = field(default=16, metadata={"help": "new problems per iteration (all processes)"})
    num_generations: int = field(default=8, metadata={"help": "samples per problem (group size k)"})
    steps_per_iteration: int = field(
        default=1, metadata={"help": "optimizer steps per pass over each iteration's groups (one mini-batch each)"}
    )
    epochs_per_iteration: int = field(
        default=1, metadata={"help": "passes over each iteration's groups (the τ term keeps later ones near π_θi)"}
    )
    skip_uniform_groups: bool = field(
        default=False, metadata={"help": "train only on groups whose rewards differ (DAPO's dynamic sampling)"}
    )
    max_response_length: int = field(default=1024, metadata={"help": "longest response in tokens"})
    rollout_budget: int = field(
        default=0, metadata={"help": "partial rollouts: new tokens per sample per iteration (0 = off)"}
    )
    mask_old_segments: bool = field(
        default=False, metadata={"help": "partial rollouts: train only on tokens of the current policy version"}
    )
    temperature: float = field(default=1.0, metadata={"help": "rollout temperature (the trained policy is π^(1/T))"})
    top_p: float = field(default=1.0, metadata={"help": "rollout top-p"})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"],
        metadata={"help": "built-in reward names; the FIRST decides correctness (length penalty, success rates)"},
    )
    reward_weights: list[float] | None = field(default=None, metadata={"help": "one weight per reward function"})
    reward_timeout: float = field(default=10.0, metadata={"help": "seconds before a reward call is abandoned"})
    length_penalty_weight: float = field(default=0.0, metadata={"help": "weight of the k1.5 length reward"})
    length_penalty_start: int = field(default=0, metadata={"help": "iteration from which the length reward is on"})
    repetition_check: bool = field(default=True, metadata={"help": "cut looping samples"})
    repetition_max_period: int = field(default=64, metadata={"help": "longest repeating block looked for"})
    repetition_min_repeats: int = field(default=4, metadata={"help": "repeats of the block that make a loop"})
    repetition_min_tokens: int = field(default=32, metadata={"help": "shortest looping span"})
    repetition_penalty: float = field(default=-0.5, metadata={"help": "added to the reward of a cut sample"})
    curriculum: list[str] = field(
        default_factory=list, metadata={"help": "stages ITERATION:MIN-MAX difficulty, e.g. 0:1-2 5:1-5"}
    )
    prioritized_sampling: bool = field(default=True, metadata={"help": "draw problems ∝ 1 − success rate"})
    success_prior: float = field(default=0.5, metadata={"help": "success rate assumed for unseen problems"})
    success_floor: float = field(default=0.05, metadata={"help": "smallest sampling weight (solved problems)"})
    success_ema: float = field(default=0.5, metadata={"help": "weight of the newest group in the success rate"})
    max_tokens_per_microbatch: int = field(default=8192, metadata={"help": "packed tokens per training forward"})
    freeze_vision_tower: bool = field(default=False, metadata={"help": "keep the vision encoder fixed"})
    freeze_projector: bool = field(default=False, metadata={"help": "keep the vision-to-text projector fixed"})
    log_completions: int = field(default=2, metadata={"help": "completions per iteration written to samples.jsonl"})
    save_every: int = field(default=1, metadata={"help": "checkpoint every N iterations (and at the end)"})
    resume: str = field(default="", metadata={"help": "'latest' (in output_dir) or a checkpoint dir to resume"})
    vllm_max_model_len: int = field(default=4096, metadata={"help": "engine context length"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": "engine share of the GPU"})
    vllm_dtype: str = field(
        default="auto", metadata={"help": "engine dtype; auto = the trained model's (vLLM's own auto casts fp32 down)"}
    )
    vllm_weight_transfer: str = field(
        default="auto",
        metadata={"help": "weight pushes: auto (ipc for a one-GPU engine on CUDA, else shm), ipc (CUDA IPC) or shm"},
    )
    lr_scheduler_type: str = field(default="constant", metadata={"help": "learning-rate schedule over all steps"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "unused: RL builds its own batches"})

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r} is not one of {ALGORITHMS}")
        if self.rollout_budget < 0 or self.rollout_budget > self.max_response_length:
            raise ValueError(f"rollout_budget={self.rollout_budget} must be in 0..max_response_length")
        if self.num_generations < 2:
            raise ValueError("num_generations must be at least 2 (the baseline is the group's mean reward)")
        if self.vllm_weight_transfer not in TRANSPORTS:
            raise ValueError(f"vllm_weight_transfer={self.vllm_weight_transfer!r} is not one of {TRANSPORTS}")
        for name in ("steps_per_iteration", "epochs_per_iteration"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")


@dataclass
class TrainItem:
    """One sample ready for the training forward: expanded prompt ids + response ids, images, and the loss inputs."""

    input_ids: torch.Tensor  # [prompt + response]
    prompt_length: int
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    mask: torch.Tensor  # [response] 1 = trained
    advantage: float
    rollout_logprobs: torch.Tensor  # [response], from vLLM
    current: torch.Tensor  # [response] bool: produced by the policy being trained (for the health check)
    old_logprobs: torch.Tensor | None = None  # π_θi, filled before the first step
    ref_logprobs: torch.Tensor | None = None  # frozen start model (GRPO β > 0, or a fixed mirror-descent reference)

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.prompt_length


class RLTrainer(Trainer):
    """k1.5-style RL on a `Trainer`: the accelerator, optimizer, scheduler, logging callbacks (`report_to`) and
    distributed setup are Trainer's; `train()` runs the iteration loop described in the module docstring.

    `train_dataset`: a list of `data.records.Example` (problems with `answer`, optional `difficulty` and `id`).
    `reward_funcs`: names of built-in rewards or callables `(prompts, completions, **kw) -> list[float]`; defaults
    to the config's. `engine`: a running `RolloutEngine` serving the same weights (else one is started)."""

    def __init__(self, model, args: RLConfig, processing_class, train_dataset, reward_funcs=None, engine=None, **kw):
        cli.freeze_vision(model, args.freeze_vision_tower, args.freeze_projector)
        super().__init__(model=model, args=args, processing_class=processing_class, **kw)
        for callback in (PrinterCallback, ProgressCallback):  # the RL loop draws its own progress bar
            self.remove_callback(callback)
        self.examples = {}
        for i, example in enumerate(train_dataset):
            key = example.id or f"problem-{i}"
            if key in self.examples:
                raise ValueError(f"problem id {key!r} appears twice in the training data; ids must be unique")
            self.examples[key] = example
        self.rewards = RewardRunner(
            reward_funcs if reward_funcs is not None else args.reward_funcs, args.reward_weights, args.reward_timeout
        )
        self.engine = engine
        self.image_token_id = processing_class.image_token_id
        self.merge = processing_class.image_processor.merge_size
        self.output = Path(args.output_dir)

    # -- the loop --------------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | None = None, **kwargs):
        args = self.args
        resume = _find_checkpoint(self.output, resume_from_checkpoint or args.resume or None)
        frozen = self._frozen_reference(resume is not None)  # the starting model, before any resumed weights are loaded
        if resume is not None:
            _load_weights(self.model, resume)
        if self.engine is None:
            from trainers.rollout import RolloutEngine

            source = resume or args.model_name_or_path or getattr(self.model, "name_or_path", "")
            if not source or not Path(source).is_dir():
                raise ValueError(
                    "the rollout engine starts from a checkpoint folder: set model_name_or_path (the folder the "
                    f"model was loaded from), or pass a running engine; got {str(source)!r}"
                )
            self.engine = RolloutEngine(
                source,
                max_model_len=args.vllm_max_model_len,
                dtype=str(self.model.dtype).removeprefix("torch.") if args.vllm_dtype == "auto" else args.vllm_dtype,
                seed=args.seed + self.args.process_index,
                gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                logprobs_mode="processed_logprobs",
                weight_transfer=args.vllm_weight_transfer,
            )
        prompts, skipped = self._prompts()
        self._prompt_cache = prompts
        sampler = ProblemSampler(
            list(prompts),
            [self.examples[i].difficulty for i in prompts],
            curriculum=args.curriculum,
            prioritized=args.prioritized_sampling,
            prior=args.success_prior,
            floor=args.success_floor,
            ema=args.success_ema,
            seed=args.seed,
        )
        buffer = ReplayBuffer()
        settings = RolloutSettings(
            n=args.num_generations,
            max_response_length=args.max_response_length,
            budget=args.rollout_budget or None,
            repetition_check=args.repetition_check,
            repetition_max_period=args.repetition_max_period,
            repetition_min_repeats=args.repetition_min_repeats,
            repetition_min_tokens=args.repetition_min_tokens,
        )
        total_steps = args.num_iterations * self._steps_per_iteration
        self.create_optimizer()
        self.create_scheduler(num_training_steps=total_steps, optimizer=self.optimizer)
        self.model_wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        start = 0
        if resume is not None:
            start = self._load_state(resume, sampler, buffer)
            logger.info("resumed from %s at iteration %d", resume, start)
        self.engine.update_weights(self.model_wrapped)  # the engine serves exactly the weights being trained
        self.state.global_step = start * self._steps_per_iteration
        self.callback_handler.on_train_begin(args, self.state, self.control)
        metrics_path = self.output / "metrics.jsonl"
        if self.is_world_process_zero():
            self.output.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_path, start)
        bar = tqdm(range(start, args.num_iterations), desc="RL", disable=not self.is_world_process_zero())
        for iteration in bar:
            metrics = self._iteration(iteration, prompts, sampler, buffer, settings, frozen)
            metrics["skipped_prompts"] = skipped
            if self.is_world_process_zero():
                with metrics_path.open("a") as f:
                    f.write(json.dumps(metrics) + "\n")
                bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics['accuracy']:.2f}")
            self.log({k: v for k, v in metrics.items() if isinstance(v, int | float) and k != "iteration"})
            if (iteration + 1) % args.save_every == 0 or iteration + 1 == args.num_iterations:
                self._save_checkpoint_atomic(iteration + 1, sampler, buffer)
        self.callback_handler.on_train_end(args, self.state, self.control)
        return self.state

    def _iteration(self, iteration, prompts, sampler, buffer, settings, frozen) -> dict:
        args, world, rank = self.args, self.args.world_size, self.args.process_index
        t0 = time.perf_counter()
        in_flight = set().union(*_gather(set(buffer.groups)))
        new = sampler.sample(args.prompts_per_iteration, iteration, exclude=in_flight)
        groups, stats = collect(
            self.engine,
            buffer,
            prompts,
            new[rank::world],
            iteration,
            settings,
            temperature=args.temperature,
            top_p=args.top_p,
        )
        t1 = time.perf_counter()
        scored, records = self._score(groups, iteration, prompts)
        for problem_id, successes, attempts in [r for part in _gather(records) for r in part]:
            sampler.update(problem_id, successes, attempts)
        if self.engine.sleep_mode:
            self.engine.sleep()
        train = self._train_on(scored, frozen)
        t2 = time.perf_counter()
        self.engine.update_weights(self.model_wrapped)
        t3 = time.perf_counter()
        return self._metrics(iteration, scored, stats, train, (t1 - t0, t2 - t1, t3 - t2))

    # -- prompts and rewards ---------------------------------------------------------------------------------

    def _prompts(self) -> tuple[dict, int]:
        """Every problem's rollout prompt, checked once against the engine's limits; bad ones are skipped, counted."""
        from data.records import to_messages

        prompts, skipped = {}, Counter()
        for key, example in tqdm(
            self.examples.items(), desc="prompts", disable=len(self.examples) < 64 or not self.is_world_process_zero()
        ):
            try:
                prompt = self.engine.encode(to_messages(example, with_response=False))
                self.engine.check(prompt)
            except (ValueError, OSError) as err:
                logger.warning("skipping problem %r: %s", key, err)
                skipped[type(err).__name__] += 1
                continue
            if example.answer in (None, ""):
                skipped["no answer"] += 1
                continue
            prompts[key] = prompt
        if not prompts:
            raise ValueError(f"no usable problem in the training data ({dict(skipped)} skipped)")
        return prompts, skipped.total()

    def _score(self, groups: list[Group], iteration: int, prompts: dict) -> tuple[list, list]:
        """Rewards for complete groups → [(group, rewards, correct, texts)], and (id, successes, attempts) records."""
        args = self.args
        if not groups:
            return [], []
        samples = [(g, s) for g in groups for s in g.samples]
        texts = [self.processing_class.tokenizer.decode(s.token_ids, skip_special_tokens=False) for _, s in samples]
        examples = [self.examples[g.problem_id] for g, _ in samples]
        scores = self.rewards(
            [prompts[g.problem_id] for g, _ in samples],
            texts,
            answer=[e.answer for e in examples],
            choices=[e.choices for e in examples],
            task=[e.task for e in examples],
            difficulty=[e.difficulty for e in examples],
            id=[g.problem_id for g, _ in samples],
        )
        combined = self.rewards.combine(scores)
        correct = [s >= 0.5 for s in scores[0]]
        weight = length_penalty_weight(iteration, args.length_penalty_weight, args.length_penalty_start)
        scored, records, k = [], [], args.num_generations
        for gi, group in enumerate(groups):
            part = slice(gi * k, (gi + 1) * k)
            rewards = combined[part]
            if weight:
                lengths = [len(s.token_ids) for s in group.samples]
                bonus = length_penalty(lengths, correct[part])
                rewards = [r + weight * b for r, b in zip(rewards, bonus)]
            rewards = [
                r + (args.repetition_penalty if s.end == REPETITION else 0.0) for r, s in zip(rewards, group.samples)
            ]
            scored.append((group, rewards, correct[part], texts[part]))
            records.append((group.problem_id, sum(correct[part]), k))
        return scored, records

    # -- training --------------------------------------------------------------------------------------------

    def _frozen_reference(self, resuming: bool = False):
        """A frozen copy of the starting model, when a loss needs it (GRPO's KL, or a fixed mirror-descent ref)."""
        args = self.args
        needed = (args.algorithm == "grpo" and args.beta > 0) or (
            args.algorithm == "mirror_descent" and not args.reference_per_iteration
        )
        if not needed:
            return None
        if resuming and Path(self.args.model_name_or_path).is_dir():
            # a resumed run's model already holds trained weights: the reference is the run's starting checkpoint
            frozen = AutoModelForImageTextToText.from_pretrained(self.args.model_name_or_path, dtype=self.model.dtype)
            frozen = frozen.to(self.model.device).eval()
        else:
            frozen = copy.deepcopy(self.model).eval()
        frozen.requires_grad_(False)
        return frozen

    def _items(self, scored) -> list[list[TrainItem]]:
        """Training items, one list per group, with advantages from each group's rewards."""
        args, version = self.args, self.engine.version
        image_processor = self.processing_class.image_processor
        groups = []
        for group, rewards, _, _ in scored:
            prompt = self._prompt_cache[group.problem_id]
            rewards_t = torch.tensor(rewards, dtype=torch.float32)
            if args.algorithm == "grpo":
                advantages = losses.group_advantages(rewards_t, len(rewards), scale=args.scale_rewards)
            else:
                advantages = rewards_t - losses.group_baseline(rewards_t, len(rewards))
            pixel_values = grid = None
            prompt_ids = torch.tensor(prompt.token_ids)
            if prompt.images:
                processed = image_processor(images=prompt.images, return_tensors="pt")
                pixel_values, grid = processed["pixel_values"], processed["image_grid_thw"]
                prompt_ids = _expand_image_tokens(prompt_ids, self.image_token_id, grid, self.merge)
            items = []
            for sample, advantage in zip(group.samples, advantages.tolist()):
                versions = torch.tensor(sample.versions, dtype=torch.long)
                current = versions == version
                mask = current.float() if args.mask_old_segments else torch.ones(len(versions))
                items.append(
                    TrainItem(
                        input_ids=torch.cat([prompt_ids, torch.tensor(sample.token_ids, dtype=torch.long)]),
                        prompt_length=len(prompt_ids),
                        pixel_values=pixel_values,
                        image_grid_thw=grid,
                        mask=mask,
                        advantage=advantage,
                        rollout_logprobs=torch.tensor(sample.logprobs, dtype=torch.float32),
                        current=current,
                    )
                )
            groups.append(items)
        return groups

    @property
    def _steps_per_iteration(self) -> int:
        return self.args.steps_per_iteration * self.args.epochs_per_iteration

    def _train_on(self, scored, frozen) -> dict:
        """`epochs_per_iteration` passes over this iteration's groups, each split into `steps_per_iteration`
        mini-batches of whole groups, one optimizer step each (every process takes part, with or without groups of
        its own, since gradient averaging is collective)."""
        args = self.args
        model = self.model_wrapped
        if args.reset_optimizer_each_iteration:
            _reset_optimizer(self.optimizer)
        uniform = 0
        if args.skip_uniform_groups:
            scored, uniform = informative_groups(scored)
        groups = self._items(scored)
        items = [item for g in groups for item in g]
        rng = random.Random(args.seed + self.state.global_step)
        steps = plan_steps(groups, args.steps_per_iteration, args.epochs_per_iteration, rng)
        needs_pre_pass = len(steps) > 1
        # Items are packed into rows of up to max_tokens_per_microbatch tokens: attention per item, not per row.
        kernels = packed_attention(self.accelerator.unwrap_model(model), *([frozen] if frozen is not None else []))
        with kernels:
            if needs_pre_pass or frozen is not None:
                self._pre_pass(items, model, frozen, needs_pre_pass)
            loss_sum, diffs = self._steps(model, steps, items, needs_pre_pass)
        if needs_pre_pass:
            diffs = [d for item in items for d in _item_diff(item)]
        return {
            "loss": loss_sum / max(len(items) * args.epochs_per_iteration, 1),
            "trained_samples": len(items),
            "uniform_groups_skipped": uniform,
            "logprob_diff": float(np.mean(diffs)) if diffs else None,
        }

    def _steps(self, model, steps: list[list[TrainItem]], items: list[TrainItem], needs_pre_pass: bool):
        """One optimizer step per entry of `steps`; returns the summed loss terms and, when the first forward ran
        on π_θi itself, the log-prob differences to the rollout engine's."""
        args = self.args
        loss_sum, diffs = 0.0, []
        model.train()
        for step_items in steps:
            n_global = _all_reduce(len(step_items), "sum")
            batches = _microbatches(step_items, args.max_tokens_per_microbatch)
            n_batches = _all_reduce(len(batches), "max")
            for b in range(n_batches):
                batch = batches[b] if b < len(batches) else None
                loss, logprobs, terms = self._loss(model, batch or [self._dummy(items)], n_global, float(bool(batch)))
                self.accelerator.backward(loss)
                if batch is not None:
                    loss_sum += terms
                    if not needs_pre_pass:  # one step: this forward ran on π_θi itself
                        diffs.extend(_logprob_diffs(batch, logprobs))
            if args.max_grad_norm:
                self.accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.global_step += 1
        return loss_sum, diffs

    @torch.no_grad()
    def _pre_pass(self, items, model, frozen, old: bool) -> None:
        """Log-probs under π_θi (before any step of this iteration) and/or under the frozen starting model."""
        model.eval()
        for batch in _microbatches(items, self.args.max_tokens_per_microbatch):
            if old:
                for item, lp in zip(batch, self._logprobs(model, batch)):
                    item.old_logprobs = lp
            if frozen is not None:
                for item, lp in zip(batch, self._logprobs(frozen, batch)):
                    item.ref_logprobs = lp

    def _logprobs(self, model, batch: list[TrainItem]) -> list[torch.Tensor]:
        """Per-token log-probs of each item's response tokens under `model` (at the rollout temperature), from ONE
        packed forward: the items are concatenated into a row, position ids restart at each item (no cross-item
        attention), and logits are computed only at the positions that predict response tokens."""
        device = self.accelerator.device
        ids = torch.cat([item.input_ids for item in batch]).unsqueeze(0).to(device)
        positions = torch.cat([torch.arange(len(item.input_ids)) for item in batch]).unsqueeze(0).to(device)
        keep, offset = [], 0
        for item in batch:
            keep.append(torch.arange(offset + item.prompt_length - 1, offset + len(item.input_ids) - 1))
            offset += len(item.input_ids)
        keep = torch.cat(keep).to(device)
        inputs = {"input_ids": ids, "position_ids": positions, "logits_to_keep": keep, "use_cache": False}
        with_images = [item for item in batch if item.pixel_values is not None]
        if with_images:
            inputs["pixel_values"] = torch.cat([i.pixel_values for i in with_images]).to(device)
            inputs["image_grid_thw"] = torch.cat([i.image_grid_thw for i in with_images]).to(device)
        logits = model(**inputs).logits[0].float() / self.args.temperature
        targets = ids[0, keep + 1]
        token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        return list(token_logprobs.split([item.response_length for item in batch]))

    def _loss(self, model, batch: list[TrainItem], n_global: int, weight: float) -> tuple[torch.Tensor, list, float]:
        """The batch's per-sample loss terms summed and scaled so that the step's gradient is the mean over all
        `n_global` samples of the step (gradients are averaged over processes); also the log-probs and the raw sum."""
        args = self.args
        logprobs = self._logprobs(model, batch)
        lp = torch.nn.utils.rnn.pad_sequence(logprobs, batch_first=True)
        device = lp.device
        mask = torch.nn.utils.rnn.pad_sequence([i.mask for i in batch], batch_first=True).to(device)
        old = torch.nn.utils.rnn.pad_sequence(
            [i.old_logprobs if i.old_logprobs is not None else x.detach() for i, x in zip(batch, logprobs)],
            batch_first=True,
        ).to(device)
        advantages = torch.tensor([i.advantage for i in batch], device=device)
        if args.algorithm == "mirror_descent":
            ref = old
            if batch[0].ref_logprobs is not None:
                ref = torch.nn.utils.rnn.pad_sequence([i.ref_logprobs for i in batch], batch_first=True).to(device)
            s = losses.sequence_logprobs(lp, mask, args.token_normalize)
            s_ref = losses.sequence_logprobs(ref, mask, args.token_normalize)
            terms = losses.mirror_descent_terms(s, s_ref, advantages, args.tau)
        else:
            ref = None
            if args.beta:
                ref = torch.nn.utils.rnn.pad_sequence([i.ref_logprobs for i in batch], batch_first=True).to(device)
            token_terms = losses.grpo_token_terms(
                lp, old, advantages, args.clip_epsilon, args.clip_epsilon_high, args.beta, ref
            )
            if args.loss_aggregation == "token_mean":
                tokens = _all_reduce(int(sum(i.mask.sum().item() for i in batch)), "sum")
                terms = (token_terms * mask).sum(-1) * (n_global / max(tokens, 1))
            else:
                terms = (token_terms * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = weight * terms.sum() * self.args.world_size / max(n_global, 1)
        return loss, logprobs, weight * terms.sum().item()

    def _dummy(self, items: list[TrainItem]) -> TrainItem:
        """A stand-in micro-batch for a process with fewer micro-batches than the others (its loss is weighted 0)."""
        if items:
            return items[0]
        eos = Sample([self.processing_class.tokenizer.eos_token_id], [0.0], [self.engine.version], "stop")
        fake = Group(next(iter(self._prompt_cache)), [eos, eos], 0)
        return self._items([(fake, [0.0, 0.0], [False, False], ["", ""])])[0][0]

    # -- logging and checkpoints -----------------------------------------------------------------------------

    def save_final(self, output_dir: str | Path) -> Path:
        """A standalone checkpoint (weights + processor, no training state): what vLLM and `from_pretrained` load."""
        output_dir = Path(output_dir)
        state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        if self.is_world_process_zero():
            self.accelerator.unwrap_model(self.model_wrapped).save_pretrained(output_dir, state_dict=state_dict)
            self.processing_class.save_pretrained(output_dir)
        _barrier()
        return output_dir

    def _metrics(self, iteration, scored, stats, train, seconds) -> dict:
        local = {
            "rewards": [r for _, rewards, _, _ in scored for r in rewards],
            "correct": [c for _, _, correct, _ in scored for c in correct],
            "lengths": [len(s.token_ids) for g, _, _, _ in scored for s in g.samples],
            "stats": asdict(stats),
            "diff": train["logprob_diff"],
            "loss": train["loss"],
            "uniform": train["uniform_groups_skipped"],
            "examples": [
                {
                    "problem_id": g.problem_id,
                    "answer": self.examples[g.problem_id].answer,
                    "reward": rewards[0],
                    "text": texts[0],
                }
                for g, rewards, _, texts in scored[: self.args.log_completions]
            ],
        }
        parts = _gather(local)
        rewards = [r for p in parts for r in p["rewards"]]
        correct = [c for p in parts for c in p["correct"]]
        lengths = [n for p in parts for n in p["lengths"]]
        totals = Counter()
        for p in parts:
            totals.update(p["stats"])
        diffs = [p["diff"] for p in parts if p["diff"] is not None]
        if self.is_world_process_zero() and self.args.log_completions:
            with (self.output / "samples.jsonl").open("a") as f:
                for p in parts:
                    for example in p["examples"]:
                        f.write(json.dumps({"iteration": iteration, **example}) + "\n")
        return {
            "iteration": iteration,
            "reward_mean": float(np.mean(rewards)) if rewards else 0.0,
            "accuracy": float(np.mean(correct)) if correct else 0.0,
            "response_length_mean": float(np.mean(lengths)) if lengths else 0.0,
            "response_length_max": int(max(lengths)) if lengths else 0,
            "groups_trained": len(rewards) // self.args.num_generations - sum(p["uniform"] for p in parts),
            "uniform_groups_skipped": sum(p["uniform"] for p in parts),
            "samples_finished": totals["finished"],
            "samples_carried": totals["carried"],
            "samples_continued": totals["continued"],
            "repetition_stops": totals["repetition_stops"],
            "truncated": totals["truncated"],
            "rollout_tokens": totals["tokens"],
            "loss": float(np.mean([p["loss"] for p in parts])),
            "logprob_diff": float(np.mean(diffs)) if diffs else None,
            "reward_failures": self.rewards.failures.total(),
            "length_penalty_weight": length_penalty_weight(
                iteration, self.args.length_penalty_weight, self.args.length_penalty_start
            ),
            "policy_version": self.engine.version,
            "rollout_s": round(seconds[0], 3),
            "train_s": round(seconds[1], 3),
            "sync_s": round(seconds[2], 3),
        }

    def _save_checkpoint_atomic(self, iteration: int, sampler, buffer) -> Path:
        """checkpoint-N: weights (safetensors) + processor, optimizer, scheduler, sampler, replay buffer(s), RNG and
        the iteration counter. Written to checkpoint-N.tmp and renamed when complete, so a crash mid-save leaves the
        previous checkpoint as the latest usable one."""
        final = self.output / f"checkpoint-{iteration}"
        tmp = self.output / f"checkpoint-{iteration}.tmp"
        rank = self.args.process_index
        if self.is_world_process_zero():
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        state_dict = self.accelerator.get_state_dict(self.model_wrapped)
        if self.is_world_process_zero():
            self.accelerator.unwrap_model(self.model_wrapped).save_pretrained(tmp, state_dict=state_dict)
            self.processing_class.save_pretrained(tmp)
            (tmp / "sampler.json").write_text(json.dumps(sampler.state_dict()))
            (tmp / "scheduler.json").write_text(json.dumps(self.lr_scheduler.state_dict()))
        torch.save(self.optimizer.state_dict(), tmp / f"optimizer-rank{rank}.pt")
        (tmp / f"replay_buffer-rank{rank}.json").write_text(json.dumps(buffer.state_dict()))
        (tmp / f"rng-rank{rank}.json").write_text(json.dumps(_rng_state()))
        _barrier()
        if self.is_world_process_zero():
            state = {
                "iteration": iteration,
                "global_step": self.state.global_step,
                "policy_version": self.engine.version,
                "world_size": self.args.world_size,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate_checkpoints()
        _barrier()
        return final

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if not limit:
            return
        for old in _checkpoints(self.output)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_state(self, path: Path, sampler, buffer) -> int:
        state = json.loads((path / "trainer_state.json").read_text())
        if state["world_size"] != self.args.world_size:
            raise ValueError(
                f"{path} was saved by {state['world_size']} process(es); resume with the same number "
                f"(this run has {self.args.world_size}): each process's replay buffer is saved separately"
            )
        rank = self.args.process_index
        self.optimizer.load_state_dict(torch.load(path / f"optimizer-rank{rank}.pt", weights_only=True))
        self.lr_scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        sampler.load_state_dict(json.loads((path / "sampler.json").read_text()))
        buffer.load_state_dict(json.loads((path / f"replay_buffer-rank{rank}.json").read_text()))
        missing = [pid for pid in buffer.groups if pid not in self._prompt_cache]
        if missing:
            raise ValueError(f"the replay buffer in {path} holds problems not in the training data: {missing[:5]}")
        _set_rng_state(json.loads((path / f"rng-rank{rank}.json").read_text()))
        self.engine.version = state["policy_version"]
        return state["iteration"]


# -- helpers ---------------------------------------------------------------------------------------------------


def _expand_image_tokens(ids: torch.Tensor, image_token_id: int, grid: torch.Tensor, merge: int) -> torch.Tensor:
    """Replace the i-th image placeholder by as many image tokens as image i has features (the processor's rule)."""
    counts = (grid.prod(-1) // merge**2).tolist()
    positions = (ids == image_token_id).nonzero().flatten().tolist()
    if len(positions) != len(counts):
        raise ValueError(f"{len(positions)} image placeholders for {len(counts)} images")
    pieces, last = [], 0
    for pos, count in zip(positions, counts):
        pieces += [ids[last:pos], ids.new_full((count,), image_token_id)]
        last = pos + 1
    pieces.append(ids[last:])
    return torch.cat(pieces)


def _microbatches(items: list[TrainItem], max_tokens: int) -> list[list[TrainItem]]:
    """Consecutive items packed into forwards of at most `max_tokens` tokens (an item longer than that alone)."""
    batches, current, size = [], [], 0
    for item in items:
        n = len(item.input_ids)
        if current and size + n > max_tokens:
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += n
    if current:
        batches.append(current)
    return batches


def informative_groups(scored: list[tuple]) -> tuple[list[tuple], int]:
    """The scored groups `(group, rewards, correct, texts)` whose rewards differ, and how many were left out (DAPO's
    dynamic sampling: a group whose rewards are all equal has no advantage and teaches nothing but the τ term's pull
    to π_θi). Decided on the rewards themselves: r − mean(r) of equal rewards is not always exactly 0 in floats."""
    kept = [entry for entry in scored if max(entry[1]) > min(entry[1])]
    return kept, len(scored) - len(kept)


def plan_steps(groups: list[list[TrainItem]], steps: int, epochs: int, rng: random.Random) -> list[list[TrainItem]]:
    """The items of each optimizer step: `epochs` passes over `groups`, each pass shuffled and split into `steps`
    mini-batches of whole groups (a group's samples share its baseline, so they stay together)."""
    plan = []
    for _ in range(epochs):
        order = list(range(len(groups)))
        rng.shuffle(order)
        plan += [[item for g in order[s::steps] for item in groups[g]] for s in range(steps)]
    return plan


def _logprob_diffs(batch: list[TrainItem], logprobs: list[torch.Tensor]) -> list[float]:
    """|vLLM − trainer| log-prob on tokens the current weights produced: a weight-sync health check."""
    out = []
    for item, lp in zip(batch, logprobs):
        if item.current.any():
            out.append((lp.detach().cpu() - item.rollout_logprobs)[item.current].abs().mean().item())
    return out


def _item_diff(item: TrainItem) -> list[float]:
    if item.old_logprobs is None or not item.current.any():
        return []
    return [(item.old_logprobs.cpu() - item.rollout_logprobs)[item.current].abs().mean().item()]


def _reset_optimizer(optimizer) -> None:
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state.clear()


def _dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather(obj) -> list:
    if not _dist():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _all_reduce(value: int, op: str) -> int:
    if not _dist():
        return value
    values = _gather(value)
    return sum(values) if op == "sum" else max(values)


def _barrier() -> None:
    if _dist():
        torch.distributed.barrier()


def _checkpoints(output: Path) -> list[Path]:
    found = [p for p in output.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)


def _find_checkpoint(output: Path, resume: str | None) -> Path | None:
    if not resume:
        return None
    if resume in ("latest", "True", "true"):
        found = _checkpoints(output)
        if not found:
            raise FileNotFoundError(f"--resume: no complete checkpoint-N in {output}")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete RL checkpoint (no trainer_state.json)")
    return path


def _load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in missing if own[k].data_ptr() not in loaded]  # tied weights are saved once
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _truncate_metrics(path: Path, start: int) -> None:
    """On resume, drop lines of iterations after the checkpoint (their work is redone)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["iteration"] < start]
    path.write_text("".join(line + "\n" for line in lines))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def parse_config(argv: list[str] | None = None) -> RLConfig:
    """`--config FILE.yaml` sets the defaults, further `--key value` flags override them; a bare `--resume` means
    the latest checkpoint in output_dir."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in argv:
        i = argv.index("--resume")
        if i + 1 == len(argv) or argv[i + 1].startswith("--"):
            argv.insert(i + 1, "latest")
    return cli.parse_config(RLConfig, argv)


def main(argv: list[str] | None = None) -> Path:
    import kimi_mm  # noqa: F401  (Auto classes)
    from data.loaders import load_examples

    config = parse_config(argv)
    if not config.model_name_or_path or not config.train_data:
        raise SystemExit("set model_name_or_path and train_data (in the YAML config or as flags)")
    processor = AutoProcessor.from_pretrained(config.model_name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(config.model_name_or_path, dtype=torch.float32)
    loaded = load_examples(config.train_data)
    trainer = RLTrainer(model=model, args=config, processing_class=processor, train_dataset=loaded.examples)
    state = trainer.train()
    final = trainer.save_final(Path(config.output_dir) / "final")
    if trainer.is_world_process_zero():
        print(
            f"rl: {config.num_iterations} iterations ({state.global_step} steps) on {config.world_size} process(es), "
            f"{len(loaded.examples)} problems ({loaded.skipped} skipped by the loader); "
            f"metrics {Path(config.output_dir) / 'metrics.jsonl'}, final model {final}"
        )
    trainer.engine.shutdown()
    return Path(config.output_dir)


if __name__ == "__main__":
    main()
