"""The end-to-end demo (the README's first command), on CPU with a tiny model:

    generate verifiable visual-reasoning data → build a tiny kimi_mm model and pretrain its vision encoder on the
    generator's scene annotations (scripts/pretrain_vision.py; it stands in for the pretrained encoder a real model
    starts from) → long-CoT SFT of the language model → k1.5 RL with partial rollouts through vLLM → evaluate on a
    held-out split (untrained, after SFT, after RL) → long2short: shortest rejection sampling from the RL policy, SFT
    on what it kept, then RL with the length penalty, evaluated the same way → save the checkpoints (safetensors +
    processor) → reload the final one with AutoModelForImageTextToText and answer one image question.

    python -m scripts.demo [--out outputs/demo] [--train 1200] [--test 500] [--epochs 12] [--vision-steps 800]
                           [--align-steps 500] [--rl-iterations 12] [--long2short-epochs 4] [--long2short-iterations 6]

Writes `OUT/report.md` with the numbers and PNG plots (SFT loss curve, RL curves, accuracy per task family, token
efficiency) and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import kimi_mm  # noqa: F401  (Auto classes)
from data.loaders import load_examples
from data.records import to_messages
from data.synthetic import generate, parse_difficulty_weights, write_dataset
from scripts.make_tiny import make_tiny
from scripts.plot_rl import plot_curves, read_metrics
from scripts.pretrain_vision import align_language_model, pretrain_vision
from scripts.token_efficiency import evaluate_checkpoint
from scripts.token_efficiency import write_report as write_token_efficiency
from trainers.long2short import write_long2short_data
from trainers.rl import RLConfig, RLTrainer
from trainers.rollout import RolloutEngine
from trainers.sft import ChatSFTDataset, SFTConfig, SFTTrainer

# The demo's problems: the two easiest levels of every family (levels 3-5 need more than a ~2M-parameter model
# trained for minutes on a CPU; pass --difficulty-weights 1,1,1,1,1 for all of them).
DIFFICULTY_WEIGHTS = "1,1,0,0,0"
# Share of SFT examples whose reasoning takes the short form (data.synthetic.generate): the tiny model only writes
# what its SFT data showed it, so this is what makes its samples vary in length for long2short to select from.
SHORT_RATE = 0.3


def evaluate(engine: RolloutEngine, examples, max_tokens: int = 224) -> dict:
    """Greedy answers for held-out examples through the rollout engine (whatever weights it serves now); accuracy
    overall and per task family, the mean response length and the per-example results. A response counts when it
    finished, closed its thinking block and its `\\boxed{}` answer after the block is correct (as the RL reward and
    `scripts/token_efficiency.py` score it)."""
    result = evaluate_checkpoint(engine, examples, max_tokens=max_tokens)
    per_task = defaultdict(list)
    for row in result["examples"]:
        per_task[row["task"]].append(row["correct"])
    return {**result, "per_task": {task: sum(v) / len(v) for task, v in sorted(per_task.items())}}


def plot(out: Path, losses: list[tuple[int, float]], stages: dict[str, dict]) -> None:
    """loss.png (SFT loss) and accuracy.png (accuracy per task family for each stage: label -> `evaluate` result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*losses))
    ax.set(xlabel="step", ylabel="training loss (assistant tokens)", title="SFT loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)

    tasks = sorted({t for result in stages.values() for t in result["per_task"]})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x, width = range(len(tasks)), 0.8 / len(stages)
    for k, (label, result) in enumerate(stages.items()):
        offset = (k - (len(stages) - 1) / 2) * width
        ax.bar([i + offset for i in x], [result["per_task"].get(t, 0) for t in tasks], width, label=label)
    ax.set_xticks(list(x), tasks, rotation=20)
    ax.set(ylabel="held-out accuracy", ylim=(0, 1), title="Accuracy per task family")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--train", type=int, default=1200, help="training examples")
    parser.add_argument(
        "--test", type=int, default=500, help="held-out examples (500: about ±2.2 points of sampling error)"
    )
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"], help="model size (scripts/make_tiny.py)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rl-iterations", type=int, default=12, help="RL iterations after SFT (0: no RL)")
    parser.add_argument("--rl-problems", type=int, default=400, help="RL problems (a split of their own)")
    parser.add_argument("--rl-lr", type=float, default=1e-5)
    parser.add_argument("--rl-prompts", type=int, default=16, help="RL problems per iteration (x 8 samples each)")
    parser.add_argument(
        "--long2short-epochs",
        type=float,
        default=4,
        help="long2short: epochs of SFT on the shortest correct of 8 samples per RL problem (0: none)",
    )
    parser.add_argument("--long2short-lr", type=float, default=1e-3)
    parser.add_argument(
        "--long2short-iterations",
        type=int,
        default=6,
        help="long2short: RL iterations with the length penalty (0: none)",
    )
    parser.add_argument("--long2short-rl-lr", type=float, default=1e-4)
    parser.add_argument(
        "--short-rate", type=float, default=SHORT_RATE, help="share of SFT examples with short-form reasoning"
    )
    parser.add_argument(
        "--difficulty-weights",
        default=DIFFICULTY_WEIGHTS,
        help="relative weights of difficulty levels 1..5 in every split (data.synthetic.generate)",
    )
    parser.add_argument(
        "--vision-steps",
        type=int,
        default=800,
        help="steps of vision pretraining on scene annotations before SFT (scripts/pretrain_vision.py; 0: none)",
    )
    parser.add_argument(
        "--align-steps",
        type=int,
        default=500,
        help="steps of image-description training of the language model before SFT (32 fresh images each; 0: none)",
    )
    parser.add_argument("--align-batch", type=int, default=32, help="image descriptions per step")
    parser.add_argument(
        "--align-tasks",
        default="count_shapes,count_shapes,bar_chart",
        help="comma-separated task families to describe in that stage, a family named twice getting twice the images "
        "('all': every family once)",
    )
    parser.add_argument("--align-text-batch", type=int, default=0, help="text-only worked problems per step")
    parser.add_argument(
        "--train-vision",
        action="store_true",
        help="also train the vision encoder and projector during SFT and RL (by default they stay fixed: "
        "docs/findings.md)",
    )
    args = parser.parse_args(argv)
    try:
        weights = parse_difficulty_weights(args.difficulty_weights)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    torch.manual_seed(args.seed)

    print("1/8 generating data")
    train_dir = write_dataset(
        generate(args.train, args.seed, difficulty_weights=weights, short_rate=args.short_rate), out / "data" / "train"
    )
    test_dir = write_dataset(
        generate(args.test, args.seed + 1_000_003, difficulty_weights=weights), out / "data" / "test"
    )
    problems = write_dataset(generate(args.rl_problems, args.seed + 7, difficulty_weights=weights), out / "data" / "rl")
    train, test, problems = load_examples(train_dir), load_examples(test_dir), load_examples(problems).examples

    print(
        "2/8 building a tiny model"
        + (" and pretraining its vision encoder" if args.vision_steps else "")
        + (", then training its language model to describe images" if args.align_steps else "")
    )
    base = make_tiny(out / "base", seed=args.seed, size=args.size)
    processor = AutoProcessor.from_pretrained(base)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    vision = alignment = None
    if args.vision_steps:
        vision = pretrain_vision(
            model, processor.image_processor, steps=args.vision_steps, seed=args.seed, difficulty_weights=weights
        )
    if args.align_steps:
        alignment = align_language_model(
            model,
            processor,
            steps=args.align_steps,
            seed=args.seed,
            difficulty_weights=weights,
            batch_size=args.align_batch,
            text_batch_size=args.align_text_batch,
            tasks=None if args.align_tasks == "all" else args.align_tasks.split(","),
        )
    if args.vision_steps or args.align_steps:
        model.save_pretrained(base)  # the base checkpoint: pretrained vision side, language model aligned to it

    print("3/8 evaluating the untrained model (through vLLM: one engine serves every stage, new weights are pushed)")
    engine = RolloutEngine(base, max_model_len=1024, dtype="float32", seed=args.seed)
    before = evaluate(engine, test.examples)

    print("4/8 long-CoT SFT")
    trainer, dataset = fine_tune(model, processor, train.examples, out / "sft", args.epochs, args.lr, args)
    losses = [(log["step"], log["loss"]) for log in trainer.state.log_history if "loss" in log]
    losses = losses or [(trainer.state.global_step, trainer.state.log_history[-1]["train_loss"])]  # short runs

    print("5/8 evaluating after SFT and saving")
    final = trainer.save_final(out / "sft_final")
    engine.update_weights(trainer.model)
    stages = {"untrained": before, "after SFT": evaluate(engine, test.examples)}

    rl = None
    if args.rl_iterations:
        print(f"6/8 RL: {args.rl_iterations} iterations of k1.5 mirror descent with partial rollouts through vLLM")
        rl = reinforce(trainer.model, processor, engine, problems, out / "rl", args)
        stages["after RL"] = evaluate(engine, test.examples)  # the engine holds the last push: the RL policy
        final = rl.save_final(out / "final")
        plot_curves(read_metrics(out / "rl" / "metrics.jsonl"), out / "rl_curves.png")

    long2short = None
    if args.long2short_epochs or args.long2short_iterations:
        long = list(stages)[-1]
        print(f"7/8 long2short from the model {long}: shortest rejection sampling + SFT, then RL with a length penalty")
        long2short = shorten(trainer.model, processor, engine, problems, test.examples, out, args, stages)
        write_token_efficiency({label: stages[label] for label in stages if label != "untrained"}, out)
    engine.shutdown()
    after = stages["after SFT"]

    print("8/8 reloading the saved checkpoint")
    reloaded = AutoModelForImageTextToText.from_pretrained(final).eval()
    reprocessor = AutoProcessor.from_pretrained(final)
    question = test.examples[0]
    text = reprocessor.apply_chat_template(to_messages(question, with_response=False), add_generation_prompt=True)
    inputs = reprocessor(images=question.images, text=text, return_tensors="pt")
    with torch.inference_mode():
        reply = reprocessor.decode(
            reloaded.generate(**inputs, max_new_tokens=224, do_sample=False)[0, inputs["input_ids"].shape[1] :],
            skip_special_tokens=True,
        )

    plot(out, losses, stages)
    summary = {
        "train_examples": len(dataset),
        "test_examples": len(test.examples),
        "skipped": train.skipped + test.skipped + dataset.skipped,
        "accuracy_untrained": round(before["accuracy"], 3),
        "accuracy_sft": round(after["accuracy"], 3),
        "per_task_untrained": before["per_task"],
        "per_task_sft": after["per_task"],
        "accuracy_rl": round(stages["after RL"]["accuracy"], 3) if rl else None,
        "per_task_rl": stages["after RL"]["per_task"] if rl else None,
        "stages": {
            label: {
                "accuracy": round(r["accuracy"], 3),
                "mean_tokens": round(r["mean_tokens"], 1),
                "per_task": r["per_task"],
            }
            for label, r in stages.items()
        },
        "long2short_sampling": long2short,
        "long2short_epochs": args.long2short_epochs,
        "long2short_iterations": args.long2short_iterations,
        "short_rate": args.short_rate,
        "rl_iterations": args.rl_iterations,
        "rl_prompts": args.rl_prompts,
        "rl_lr": args.rl_lr,
        "difficulty_weights": weights,
        "vision_trained": args.train_vision,
        "vision_pretraining": vision,
        "image_description": alignment,
        "rl_metrics": read_metrics(out / "rl" / "metrics.jsonl") if rl else [],
        "final_loss": losses[-1][1] if losses else None,
        "steps": trainer.state.global_step,
        "weight_files": sorted(p.name for p in final.glob("*.safetensors")),
        "example_question": question.problem,
        "example_answer": question.answer,
        "example_reply": reply,
        "minutes": round((time.time() - start) / 60, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_report(out, summary)
    accuracies = " → ".join(f"{r['accuracy']:.1%} {label}" for label, r in stages.items())
    print(
        f"demo: held-out accuracy {accuracies} ({len(dataset)} SFT examples, {summary['steps']} SFT steps, "
        f"{args.rl_iterations} RL iterations, {summary['minutes']} min; mean response tokens "
        + " → ".join(f"{r['mean_tokens']:.0f}" for r in stages.values())
        + f"); report {out / 'report.md'}, checkpoint {final}"
    )
    return summary


def shorten(model, processor, engine: RolloutEngine, problems, test, out: Path, args, stages: dict) -> dict:
    """The long2short stage (k1.5 §2.4), from `model` (served by `engine`): shortest rejection sampling (8 samples
    per problem, the shortest correct one kept) and `--long2short-epochs` of SFT on what it kept, then
    `--long2short-iterations` of RL with the k1.5 length penalty on from the first iteration and the maximum rollout
    length cut to 128 tokens (configs/long2short_rl.yaml does the same for trainers/rl.py). Each part is
    evaluated on `test` into `stages`; the result is saved to OUT/long2short_final (the final checkpoint stays the
    long-CoT one). Returns the sampling stats."""
    stats = write_long2short_data(engine, problems, out / "data" / "long2short", n=8, max_tokens=224, temperature=1.0)
    kept = load_examples(out / "data" / "long2short").examples
    last = None
    if args.long2short_epochs and kept:
        last, _ = fine_tune(
            model, processor, kept, out / "long2short_sft", args.long2short_epochs, args.long2short_lr, args
        )
        engine.update_weights(last.model)
        stages["rejection SFT"] = evaluate(engine, test)
    elif args.long2short_epochs:
        print("long2short: no problem had a correct sample, nothing to fine-tune on")
    if args.long2short_iterations:
        last = reinforce(
            model,
            processor,
            engine,
            problems,
            out / "long2short_rl",
            args,
            num_iterations=args.long2short_iterations,
            learning_rate=args.long2short_rl_lr,
            length_penalty_weight=0.5,
            length_penalty_start=0,
            epochs_per_iteration=1,  # one pass over every group at temperature 1: lengths must vary
            skip_uniform_groups=False,
            temperature=1.0,
            max_response_length=128,  # cut from 224: long-form answers to the longer problems no longer finish
            rollout_budget=0,
        )
        stages["long2short RL"] = evaluate(engine, test)
    if last:
        last.save_final(out / "long2short_final")
    return stats


def fine_tune(model, processor, examples, out: Path, epochs: float, lr: float, args) -> tuple[SFTTrainer, object]:
    """SFT of `model` on `examples` (packed, cosine schedule, the vision side fixed unless --train-vision): the
    long-CoT SFT stage and the long2short one. Returns the trainer (trained) and its dataset."""
    config = SFTConfig(
        output_dir=str(out),
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=10,
        weight_decay=0.0,
        logging_steps=5,
        save_strategy="no",
        use_cpu=True,
        seed=args.seed,
        max_length=1024,
        packing=True,
        freeze_vision_tower=not args.train_vision,
        freeze_projector=not args.train_vision,
    )
    dataset = ChatSFTDataset(examples, processor, config.max_length)
    trainer = SFTTrainer(model=model, args=config, processing_class=processor, train_dataset=dataset)
    trainer.train()
    return trainer, dataset


def reinforce(model, processor, engine: RolloutEngine, problems: list, out: Path, args, **overrides) -> RLTrainer:
    """k1.5 RL from the SFT model, on the running engine: mirror descent with the iteration's policy as reference,
    accuracy + format rewards, `--rl-prompts` problems x 8 samples per iteration at temperature 0.7, 2 passes of 2
    steps over the groups whose rewards differ, and partial rollouts (128 new tokens per sample per iteration, up
    to 224 in all, so the longest responses are carried over in the replay buffer). `overrides` replace `RLConfig`
    fields (the long2short RL stage)."""
    settings = dict(
        output_dir=str(out),
        algorithm="mirror_descent",
        tau=0.1,
        num_iterations=args.rl_iterations,
        prompts_per_iteration=args.rl_prompts,
        num_generations=8,
        steps_per_iteration=2,
        epochs_per_iteration=2,
        skip_uniform_groups=True,  # all-equal rewards carry no advantage: the time goes to a second pass instead
        temperature=0.7,  # samples nearer the greedy answers the evaluation scores (docs/findings.md)
        max_response_length=224,
        rollout_budget=128,
        learning_rate=args.rl_lr,
        max_grad_norm=1.0,
        reward_funcs=["accuracy", "format"],
        reward_weights=[1.0, 0.1],
        save_total_limit=1,
        vllm_max_model_len=1024,
        use_cpu=True,
        report_to="none",
        seed=args.seed,
        freeze_vision_tower=not args.train_vision,
        freeze_projector=not args.train_vision,
    )
    settings.update(overrides)
    config = RLConfig(**settings, save_every=settings["num_iterations"])  # one checkpoint, at the end
    trainer = RLTrainer(model=model, args=config, processing_class=processor, train_dataset=problems, engine=engine)
    trainer.train()
    return trainer


def write_report(out: Path, s: dict) -> None:
    rl, stages = s["accuracy_rl"] is not None, s["stages"]
    overall = "\n".join(f"| {label} | {r['accuracy']:.1%} | {r['mean_tokens']:.1f} |" for label, r in stages.items())
    rows = "\n".join(
        f"| {task} | " + " | ".join(f"{r['per_task'].get(task, 0):.1%}" for r in stages.values()) + " |"
        for task in s["per_task_sft"]
    )
    rl_section = ""
    if rl:
        first, last = s["rl_metrics"][0], s["rl_metrics"][-1]
        carried = sum(m["samples_continued"] for m in s["rl_metrics"])
        trained = sum(m["groups_trained"] for m in s["rl_metrics"])
        uniform = sum(m.get("uniform_groups_skipped", 0) for m in s["rl_metrics"])
        rl_section = f"""
## RL

{s["rl_iterations"]} iterations of k1.5 online mirror descent from the SFT checkpoint ({s["rl_prompts"]} problems x 8 samples
per iteration at temperature 0.7, learning rate {s["rl_lr"]:g}, partial rollouts with a 128-token budget per iteration, 2
passes over the groups whose rewards differ: {trained} groups trained, {uniform} left out): training reward {first["reward_mean"]:.2f} →
{last["reward_mean"]:.2f}, training accuracy {first["accuracy"]:.1%} → {last["accuracy"]:.1%}, mean response length
{first["response_length_mean"]:.0f} → {last["response_length_mean"]:.0f} tokens (prioritised sampling draws more of the
problems the model fails as the run goes on, so the training numbers fall); {carried} sample segments were continued
from the replay buffer. Per-iteration numbers: `rl/metrics.jsonl`.

![RL curves](rl_curves.png)
"""
    long2short_section = ""
    if s["long2short_sampling"]:
        sampling, long = s["long2short_sampling"], "after RL" if rl else "after SFT"
        short = list(stages)[-1]
        change = stages[short]["mean_tokens"] / stages[long]["mean_tokens"] - 1
        long2short_section = f"""
## long2short

From the model {long} (k1.5 §2.4): shortest rejection sampling, 8 samples per problem on the {sampling["problems"]} RL
problems with the shortest correct one kept ({sampling["kept"]} kept, {sampling["no_correct"]} with no correct sample;
mean tokens of the correct samples {sampling["mean_tokens_correct"]:.1f}, of the kept ones {sampling["mean_tokens_kept"]:.1f}),
{s["long2short_epochs"]:g} epochs of SFT on them, then {s["long2short_iterations"]} iterations of RL with the k1.5 length
penalty from the first iteration and the maximum rollout length cut from 224 to 128 tokens. {s["short_rate"]:.0%} of the
long-CoT SFT examples had short-form reasoning, so the model's samples vary in length. Held-out ({short}): accuracy {stages[long]["accuracy"]:.1%} → {stages[short]["accuracy"]:.1%},
mean response tokens {stages[long]["mean_tokens"]:.1f} → {stages[short]["mean_tokens"]:.1f} ({change:+.0%}). Checkpoint:
`long2short_final`.

![token efficiency](token_efficiency.png)
"""
    pretrained = s["vision_pretraining"]
    vision_text = (
        f"The vision encoder and projector were pretrained on scene annotations first "
        f"({pretrained['seconds']:.0f} s; held-out slot accuracy per family: "
        + ", ".join(f"{task} {acc:.0%}" for task, acc in pretrained["slot_accuracy_after"].items())
        + ")"
        if pretrained
        else "The vision encoder and projector were left random"
    )
    vision_text += ", then trained with the language model." if s["vision_trained"] else ", then kept fixed."
    described = s["image_description"]
    if described:
        vision_text += (
            f" Before SFT the language model was trained to describe fresh images ({described['seconds']:.0f} s; "
            "held-out observations written exactly: "
            + ", ".join(f"{task} {acc:.0%}" for task, acc in described["observations_exact_after"].items())
            + ")."
        )
    (out / "report.md").write_text(f"""# kimi_mm demo report

Tiny kimi_mm model (CPU), long-CoT SFT on {s["train_examples"]} synthetic visual-reasoning examples
({s["steps"]} steps, final loss {s["final_loss"]:.3f}){", then RL" if rl else ""}, evaluated greedily on \
{s["test_examples"]} held-out examples. Total time {s["minutes"]} min. Difficulty weights (levels 1-5):
{s["difficulty_weights"]}. {vision_text}

| | held-out accuracy | mean response tokens |
|---|---|---|
{overall}

| task family | {" | ".join(stages)} |
|---|{"---|" * len(stages)}
{rows}

![loss](loss.png)
![accuracy](accuracy.png)
{rl_section}{long2short_section}
Saved checkpoint: {", ".join(s["weight_files"])} + processor, reloaded with `AutoModelForImageTextToText`.
Question: {s["example_question"]!r} (answer {s["example_answer"]!r}). Reply of the reloaded model:

```
{s["example_reply"]}
```
""")


if __name__ == "__main__":
    main()
