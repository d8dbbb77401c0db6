"""Model cards with evaluation results as model-index, and the hub upload plan (no network)."""

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from scripts import model_card, push_to_hub

from .eval_fixtures import (
    evaluate,
    mathvista_records,
    mathvista_response,
    mmmu_records,
    mmmu_response,
    write_mathvista_hf,
    write_mmmu_hf,
)


@pytest.fixture()
def checkpoint(tiny_dir, tmp_path):
    """A copy of the tiny checkpoint (same layout as the demo's final checkpoint: save_pretrained + processor)."""
    return shutil.copytree(tiny_dir, tmp_path / "ckpt")


@pytest.fixture(scope="module")
def results_files(tmp_path_factory):
    """results.json of scripts/evaluate.py for both benchmarks, from re-scored predictions."""
    root = tmp_path_factory.mktemp("results")
    files = []
    for name, write, records, respond in [
        ("mathvista", write_mathvista_hf, mathvista_records(), mathvista_response),
        ("mmmu", write_mmmu_hf, mmmu_records(), mmmu_response),
    ]:
        predictions = root / f"{name}.jsonl"
        key = "pid" if name == "mathvista" else "id"
        predictions.write_text(
            "".join(
                json.dumps({"id": r[key], "response": respond(r, i % 3 != 0)}) + "\n" for i, r in enumerate(records)
            )
        )
        out = root / name
        evaluate(
            [
                "--benchmark",
                name,
                "--data",
                str(write(root / f"{name}_data")),
                "--predictions",
                str(predictions),
                "--out",
                str(out),
            ]
        )
        files.append(out / "results.json")
    return files


def test_card_for_the_checkpoint_validates_and_holds_the_results(checkpoint, results_files):
    model_card.main(
        ["--model", str(checkpoint), "--results", *map(str, results_files), "--repo-id", "someone/kimi-mm-tiny"]
        + ["--base-model", "Qwen/Qwen2.5-0.5B-Instruct", "--datasets", "hiyouga/geometry3k"]
    )
    path = checkpoint / "README.md"
    card = model_card.validate_card(path)
    data = card.data
    assert (data.license, data.library_name, data.pipeline_tag) == ("apache-2.0", "transformers", "image-text-to-text")
    assert data.base_model == "Qwen/Qwen2.5-0.5B-Instruct" and data.datasets == ["hiyouga/geometry3k"]
    assert {"kimi_mm", "custom_code"} <= set(data.tags) and data.model_name == "kimi-mm-tiny"
    results = [json.loads(f.read_text()) for f in results_files]
    index = {(r.dataset_type, r.dataset_split): r for r in data.eval_results}
    assert set(index) == {("AI4Math/MathVista", "testmini"), ("MMMU/MMMU", "validation")}
    for result in results:
        entry = index[(result["dataset"], result["split"])]
        assert entry.metric_type == "accuracy" and entry.metric_value == round(100 * result["accuracy"], 1)
    text = path.read_text()
    assert text.startswith("---\n") and "model-index:" in text
    assert 'from_pretrained("someone/kimi-mm-tiny", trust_remote_code=True)' in text
    assert "| MathVista | testmini |" in text and "### MMMU by discipline" in text
    assert "| figure question answering |" in text  # the MathVista breakdown by task
    assert "1.8M" in text  # parameters counted from the safetensors header
    # the card on disk parses back to the same model-index
    assert ModelCard.load(path).data.to_dict()["model-index"] == data.to_dict()["model-index"]


def test_card_without_results(checkpoint):
    model_card.main(["--model", str(checkpoint)])
    path = checkpoint / "README.md"
    card = model_card.validate_card(path)
    assert card.data.eval_results is None and "No evaluation results were given" in path.read_text()


def test_validation_names_what_is_wrong(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n---\n# m\n")
    with pytest.raises(ValueError, match="no 'license'"):
        model_card.validate_card(path)
    path.write_text("---\nlicense: mit\nmodel-index:\n- name: m\n  results: [{task: 1}]\n---\n# m\n")
    with pytest.raises(ValueError):
        model_card.validate_card(path)


def test_results_must_come_from_evaluate(results_files, tmp_path):
    with pytest.raises(ValueError, match="are both MathVista testmini"):
        model_card.read_results([results_files[0], results_files[0]])
    bad = tmp_path / "results.json"
    bad.write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ValueError, match="no \\['benchmark', 'dataset', 'split', 'correct', 'total'\\]"):
        model_card.read_results([bad])


def test_push_dry_run_lists_what_a_user_needs(checkpoint, results_files, capsys):
    model_card.main(["--model", str(checkpoint), "--results", *map(str, results_files)])
    for junk in ("optimizer.pt", "trainer_state.json", "results.json"):
        (checkpoint / junk).write_text("{}")
    push_to_hub.main(["--model", str(checkpoint), "--repo-id", "someone/kimi-mm-tiny", "--dry-run"])
    printed = capsys.readouterr().out
    assert "dry run: would upload 12 files" in printed and "someone/kimi-mm-tiny" in printed
    kinds = {name: kind for name, kind, _ in push_to_hub.upload_plan(checkpoint)}
    assert all(name in printed for name in kinds)
    assert kinds["model.safetensors"] == "weights" and kinds["README.md"] == "model card"
    assert {name for name, kind in kinds.items() if kind == "code"} == {
        "configuration_kimi_mm.py",
        "modeling_kimi_mm.py",
        "processing_kimi_mm.py",
        "image_processing_kimi_mm.py",
    }
    assert {"config.json", "tokenizer.json", "processor_config.json", "chat_template.jinja"} <= set(kinds)
    assert not {"optimizer.pt", "trainer_state.json", "results.json"} & set(kinds)


def test_push_refuses_an_incomplete_checkpoint(checkpoint):
    with pytest.raises(ValueError, match="no model card README.md"):
        push_to_hub.upload_plan(checkpoint)
    (checkpoint / "README.md").write_text("card")
    (checkpoint / "modeling_kimi_mm.py").unlink()
    with pytest.raises(ValueError, match="config.json maps to modeling_kimi_mm.py, which is missing"):
        push_to_hub.upload_plan(checkpoint)


class RecordingApi:
    """Stands in for HfApi in this test only: records the calls instead of sending them."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_push_creates_the_repository_and_uploads_the_plan(checkpoint):
    (checkpoint / "README.md").write_text("card")
    (checkpoint / "optimizer.pt").write_text("{}")
    api = RecordingApi()
    push_to_hub.push(checkpoint, "someone/kimi-mm-tiny", private=True, revision="v1", api=api)
    (create, args, kwargs), branch, upload = api.calls
    assert create == "create_repo" and args == ("someone/kimi-mm-tiny",) and kwargs["private"] is True
    assert branch[0] == "create_branch" and branch[2]["branch"] == "v1"
    assert upload[0] == "upload_folder" and upload[2]["revision"] == "v1"
    assert set(upload[2]["allow_patterns"]) == {name for name, _, _ in push_to_hub.upload_plan(checkpoint)}
    assert "optimizer.pt" not in upload[2]["allow_patterns"]
