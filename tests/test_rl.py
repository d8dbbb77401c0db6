"""trainers/rl.py end to end on the tiny model with a real vLLM engine: partial rollouts carried over and finished
in metrics.jsonl, atomic checkpoints and resume with the replay buffer intact, and a 2-process torchrun run."""

import json
import os
import subprocess
import sys

import pytest

from data.synthetic import generate, write_dataset

from .conftest import ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# A random model never emits EOS, so every sample needs ceil(48 / 16) = 3 segments: carried over twice, then done.
ARGS = [
    "--config", str(ROOT / "configs" / "rl_tiny.yaml"),
    "--prompts_per_iteration", "4", "--num_generations", "2", "--steps_per_iteration", "2",
    "--max_response_length", "48", "--rollout_budget", "16", "--save_every", "1",
    "--curriculum", "0:1-5", "--vllm_max_model_len", "512", "--learning_rate", "1e-3",
]  # fmt: skip


@pytest.fixture(scope="module")
def problems(tmp_path_factory):
    return write_dataset(generate(24, seed=5), tmp_path_factory.mktemp("rl") / "problems")


def run(cmd, out, *extra, launcher=()):
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [*launcher, str(ROOT / "trainers" / "rl.py"), *cmd, "--output_dir", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_partial_rollouts_checkpoint_and_resume(tiny_dir, problems, tmp_path):
    out = tmp_path / "run"
    data = ["--model_name_or_path", str(tiny_dir), "--train_data", str(problems), "--epochs_per_iteration", "2"]
    run([*ARGS, *data, "--num_iterations", "2"], out, launcher=(sys.executable,))
    first = metrics(out)
    assert [m["iteration"] for m in first] == [0, 1]
    # (a random model rarely emits EOS, so nearly every sample is carried over until its 3rd segment)
    assert first[0]["samples_carried"] + first[0]["samples_finished"] == 8 and first[0]["samples_carried"] >= 4
    assert first[1]["samples_continued"] == first[0]["samples_carried"]
    saved = json.loads((out / "checkpoint-2" / "replay_buffer-rank0.json").read_text())
    unfinished = [s for g in saved["groups"] for s in g["samples"] if s["end"] is None]
    assert len(unfinished) == first[1]["samples_carried"] > 0
    assert all(len(s["versions"]) == len(s["token_ids"]) == len(s["logprobs"]) for s in unfinished)
    (out / "checkpoint-7.tmp").mkdir()  # a save that crashed half way must not be picked up

    result = run([*ARGS, *data, "--num_iterations", "4", "--resume"], out, launcher=(sys.executable,))
    assert "4 iterations" in result.stdout
    lines = metrics(out)
    assert [m["iteration"] for m in lines] == [0, 1, 2, 3]
    resumed = lines[2]
    assert resumed["samples_continued"] == first[1]["samples_carried"]  # the saved buffer went on
    assert resumed["groups_trained"] >= 4  # every group started at iteration 0 ends by its 3rd segment
    assert sum(m["samples_finished"] for m in lines) >= 16 and sum(m["truncated"] for m in lines) > 0
    assert resumed["logprob_diff"] is None or resumed["logprob_diff"] < 1e-2  # vLLM and trainer agree
    assert resumed["policy_version"] > first[1]["policy_version"]
    assert resumed["train_s"] > 0 and resumed["rollout_s"] > 0 and resumed["sync_s"] > 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["iteration"] == 4 and state["global_step"] == 16  # 2 passes x 2 steps per iteration
    assert (out / "checkpoint-4" / "model.safetensors").is_file()
    assert (out / "checkpoint-4" / "preprocessor_config.json").is_file() or (
        out / "checkpoint-4" / "processor_config.json"
    ).is_file()
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= {p.name for p in (out / "final").iterdir()}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"iteration", "problem_id", "answer", "reward", "text"} <= set(samples[0])


def test_two_process_torchrun(tiny_dir, problems, tmp_path):
    out = tmp_path / "ddp"
    data = ["--model_name_or_path", str(tiny_dir), "--train_data", str(problems)]
    result = run(
        [*ARGS, *data, "--num_iterations", "3", "--algorithm", "grpo", "--beta", "0.04"],
        out,
        launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"),
    )
    assert "on 2 process(es)" in result.stdout
    lines = metrics(out)
    assert [m["iteration"] for m in lines] == [0, 1, 2]
    assert lines[2]["groups_trained"] >= 4 and lines[2]["samples_finished"] >= 8
    for rank in (0, 1):
        assert (out / "checkpoint-3" / f"replay_buffer-rank{rank}.json").is_file()
