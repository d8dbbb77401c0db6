"""trainers/dpo.py: the DPO loss, response-only labels, reference modes and a few steps on the tiny model."""

import math

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from data.synthetic import generate, write_dataset
from trainers.dpo import (
    DPOConfig,
    DPOTrainer,
    PreferenceCollator,
    PreferenceDataset,
    dpo_loss,
    main,
    parse_config,
    sequence_logps,
)
from trainers.long2short import PreferencePair, load_preference_pairs, write_preference_pairs
from trainers.sft import IGNORE_INDEX


def response(reasoning: str, answer: str) -> str:
    return f"{reasoning}\n</think>\n\n\\boxed{{{answer}}}<|im_end|>"


@pytest.fixture(scope="module")
def pairs():
    """Per problem: a short correct response preferred to a long one and to a long wrong one."""
    pairs = []
    for example in generate(4, seed=3):
        short = response(f"So the answer is {example.answer}.", example.answer)
        long = response(f"First I look at every part of the picture, twice. So the answer is {example.answer}.", "7")
        pairs += [PreferencePair(example, short, long), PreferencePair(example, short, long.replace("7", "9"))]
    return pairs


@pytest.fixture(scope="module")
def dataset(pairs, processor):
    return PreferenceDataset(pairs, processor, max_length=1024)


def config(tmp_path, **overrides) -> DPOConfig:
    values = dict(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        learning_rate=2e-3,
        beta=0.5,
        logging_steps=1,
        save_strategy="no",
        lr_scheduler_type="constant",
        use_cpu=True,
        seed=0,
        report_to=[],
    )
    return DPOConfig(**(values | overrides))


def test_dpo_loss_matches_the_hand_computed_value():
    loss, chosen, rejected = dpo_loss(
        torch.tensor([-1.0, -4.0]),
        torch.tensor([-3.0, -4.0]),
        torch.tensor([-2.0, -4.0]),
        torch.tensor([-2.0, -4.0]),
        0.5,
    )
    # pair 1: rewards 0.5 and -0.5, -log sigmoid(1) = log(1 + e^-1); pair 2: equal rewards, log 2.
    assert math.isclose(loss.item(), (math.log1p(math.exp(-1)) + math.log(2)) / 2, rel_tol=1e-6)
    assert chosen.tolist() == [0.5, 0.0] and rejected.tolist() == [-0.5, 0.0]


def test_sequence_logps_sum_the_labelled_tokens(dataset, processor, tiny_model):
    batch = PreferenceCollator(processor.tokenizer.pad_token_id, 1024)([dataset[0], dataset[1]])
    with torch.no_grad():
        out = tiny_model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")})
    logps = sequence_logps(out.logits, batch["labels"])
    n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    loss = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(-logps.sum() / n_tokens, loss)


def test_labels_cover_only_the_response(dataset, pairs, processor):
    item = dataset[0]
    for side in ("chosen", "rejected"):
        labelled = item[side]["input_ids"][item[side]["labels"] != IGNORE_INDEX]
        assert processor.decode(labelled) == getattr(pairs[0], side)
        assert (item[side]["input_ids"] == processor.image_token_id).sum() > 0  # expanded image tokens
    assert torch.equal(item["chosen"]["pixel_values"], item["rejected"]["pixel_values"])
    batch = PreferenceCollator(processor.tokenizer.pad_token_id, 1024)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 4  # chosen x2, rejected x2


def test_long_responses_are_cut_and_bad_pairs_skipped(pairs, processor):
    prompt_length = len(PreferenceDataset(pairs[:1], processor, 4096)[0]["chosen"]["labels"]) - len(
        processor.tokenizer(pairs[0].chosen, add_special_tokens=False)["input_ids"]
    )
    cut = PreferenceDataset(pairs[:1], processor, max_length=prompt_length + 3)
    assert cut.truncated == 2 and len(cut[0]["rejected"]["input_ids"]) == prompt_length + 3
    skipped = PreferenceDataset(pairs[:2], processor, max_length=prompt_length)
    assert len(skipped) == 0 and skipped.skip_reasons == {"prompt too long": 2}
    with_image_token = PreferencePair(pairs[0].example, pairs[0].chosen, "<image>" + pairs[0].rejected)
    dataset = PreferenceDataset([with_image_token, pairs[1]], processor, max_length=1024)
    assert len(dataset) == 1 and dataset.skip_reasons == {"image token in a response": 1}


def margins(trainer) -> list[float]:
    return [log["rewards/margins"] for log in trainer.state.log_history if "rewards/margins" in log]


def test_a_few_dpo_steps_raise_the_chosen_vs_rejected_margin(tiny_dir, processor, dataset, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    trainer = DPOTrainer(model=model, args=config(tmp_path), processing_class=processor, train_dataset=dataset)
    assert trainer.ref_model is not None  # a frozen copy of the initial policy
    trainer.train()
    history = margins(trainer)
    assert abs(history[0]) < 1e-4  # the policy starts as the reference
    assert sum(history[-3:]) / 3 > 0.5
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert math.isclose(losses[0], math.log(2), rel_tol=1e-3) and losses[-1] < 0.5 * losses[0]
    # The trained policy prefers the chosen response more than the frozen reference does.
    batch = trainer._prepare_inputs(trainer.data_collator([dataset[i] for i in range(len(dataset))]))
    with torch.no_grad():
        chosen, rejected = trainer._logps(trainer.model.eval(), batch)
        ref_chosen, ref_rejected = trainer._reference_logps(batch)
    assert ((chosen - rejected) - (ref_chosen - ref_rejected)).min() > 0


def test_precomputed_reference_log_probs_give_the_same_first_loss(tiny_dir, processor, pairs, tmp_path):
    dataset = PreferenceDataset(pairs, processor, max_length=1024)
    args = config(tmp_path, max_steps=1, precompute_ref_log_probs=True)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    trainer = DPOTrainer(model=model, args=args, processing_class=processor, train_dataset=dataset)
    assert trainer.ref_model is None and len(dataset.ref_logps) == len(dataset)
    batch = trainer.data_collator([dataset[0], dataset[1]])
    assert batch["ref_chosen_logps"].shape == (2,)
    trainer.train()
    assert abs(margins(trainer)[0]) < 1e-4
    # A dataset that already carries them needs no reference model at all.
    again = DPOTrainer(
        model=AutoModelForImageTextToText.from_pretrained(tiny_dir),
        args=config(tmp_path, max_steps=1),
        processing_class=processor,
        train_dataset=dataset,
    )
    assert again.ref_model is None


def test_lora_uses_the_base_policy_as_reference(tiny_dir, processor, dataset, tmp_path):
    args = config(tmp_path, use_lora=True, lora_r=4, max_steps=3, learning_rate=1e-2)
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    trainer = DPOTrainer(model=model, args=args, processing_class=processor, train_dataset=dataset)
    assert trainer.ref_model is None
    trainer.train()
    assert abs(margins(trainer)[0]) < 1e-4 and margins(trainer)[-1] > 0
    out = trainer.save_final(tmp_path / "merged")
    assert not any("lora" in n for n, _ in AutoModelForImageTextToText.from_pretrained(out).named_parameters())


def test_bad_config_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match="packing is not supported"):
        config(tmp_path, packing=True)
    with pytest.raises(ValueError, match="beta must be positive"):
        config(tmp_path, beta=0)


def test_cli_reads_the_pairs_file_written_by_long2short(tiny_dir, pairs, tmp_path, capsys):
    examples = [pairs[0].example, pairs[2].example]
    data_dir = write_dataset(examples, tmp_path / "data")
    written = write_preference_pairs(pairs[:4], data_dir)
    loaded, skipped = load_preference_pairs(data_dir)
    assert skipped == 0 and [(p.chosen, p.rejected) for p in loaded] == [(p.chosen, p.rejected) for p in pairs[:4]]
    assert isinstance(loaded[0].example.images[0], str)  # paths into data_dir/images
    values = {"model_name_or_path": str(tiny_dir), "train_data": str(written), "output_dir": str(tmp_path / "out")}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump(values | {"max_steps": 2, "use_cpu": True, "beta": 0.2}))
    argv = ["--config", str(tmp_path / "dpo.yaml"), "--per_device_train_batch_size", "2", "--report_to", "none"]
    assert parse_config(argv).beta == 0.2 and parse_config(argv).per_device_train_batch_size == 2
    out = main(argv)
    assert (out / "model.safetensors").is_file() and (out / "processor_config.json").is_file()
    assert "dpo: 2 steps on 1 process(es), 4 pairs" in capsys.readouterr().out
