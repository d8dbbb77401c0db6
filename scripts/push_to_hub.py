"""Upload a checkpoint to the Hugging Face Hub: weights, config, processor, remote code and model card.

    python -m scripts.push_to_hub --model DIR --repo-id user/name [--private] [--revision BRANCH] [--dry-run]

Only the files a user needs are uploaded (safetensors weights, configs, processor and tokenizer files, the chat
template, the `*_kimi_mm.py` modules that `trust_remote_code=True` loads, and README.md); training leftovers in DIR
are not. The checkpoint is checked first: weights present, every `auto_map` module present, a model card (write
one with `python -m scripts.model_card`). `--dry-run` lists what would be uploaded and touches no network. The
upload uses `HfApi.create_repo` and `HfApi.upload_folder` (log in with `hf auth login` or pass `--token`).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

FILES = {  # pattern -> what it is
    "*.safetensors": "weights",
    "model.safetensors.index.json": "weights",
    "config.json": "config",
    "generation_config.json": "config",
    "processor_config.json": "processor",
    "preprocessor_config.json": "processor",
    "tokenizer.json": "processor",
    "tokenizer_config.json": "processor",
    "special_tokens_map.json": "processor",
    "added_tokens.json": "processor",
    "vocab.json": "processor",
    "merges.txt": "processor",
    "tokenizer.model": "processor",
    "chat_template.jinja": "processor",
    "chat_template.json": "processor",
    "*_kimi_mm.py": "code",
    "README.md": "model card",
}


def upload_plan(model_dir: str | Path) -> list[tuple[str, str, int]]:
    """(file name, kind, bytes) of every file to upload, after checking that the checkpoint is complete."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"checkpoint {model_dir} is not a directory")
    plan = []
    for path in sorted(model_dir.iterdir()):
        kind = next((kind for pattern, kind in FILES.items() if fnmatch.fnmatch(path.name, pattern)), None)
        if kind and path.is_file():
            plan.append((path.name, kind, path.stat().st_size))
    names = {name for name, _, _ in plan}
    problems = []
    if not any(name.endswith(".safetensors") for name in names):
        problems.append("no safetensors weights (save with model.save_pretrained(DIR))")
    if "config.json" not in names:
        problems.append("no config.json")
    if not names & {"processor_config.json", "preprocessor_config.json"} or "tokenizer_config.json" not in names:
        problems.append("no processor files (save with processor.save_pretrained(DIR))")
    for config in ("config.json", "processor_config.json", "preprocessor_config.json"):
        if config in names:
            for module in sorted(_auto_map_modules(json.loads((model_dir / config).read_text()))):
                if f"{module}.py" not in names:
                    problems.append(f"{config} maps to {module}.py, which is missing (trust_remote_code users need it)")
    if "README.md" not in names:
        problems.append("no model card README.md (write it with python -m scripts.model_card --model DIR ...)")
    if problems:
        raise ValueError(f"checkpoint {model_dir} is not ready to upload: " + "; ".join(problems))
    return plan


def _auto_map_modules(config: dict) -> set[str]:
    """The module names that `auto_map` entries ("module.Class") point to, nested configs included."""
    modules = set()
    for key, value in config.items():
        if key == "auto_map" and isinstance(value, dict):
            modules |= {
                ref.split(".")[0]
                for refs in value.values()
                for ref in ([refs] if isinstance(refs, str) else refs)
                if ref
            }
        elif isinstance(value, dict):
            modules |= _auto_map_modules(value)
    return modules


def push(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload kimi_mm checkpoint",
    token: str | None = None,
    api=None,
):
    """Create the repository if needed and upload the planned files in one commit. Returns the commit info."""
    from huggingface_hub import HfApi

    plan = upload_plan(model_dir)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(model_dir),
        allow_patterns=[name for name, _, _ in plan],
        commit_message=commit_message,
        revision=revision,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--repo-id", required=True, help="hub repository, e.g. user/kimi-mm-7b")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to upload to (created if missing); default: main")
    parser.add_argument("--commit-message", default="Upload kimi_mm checkpoint")
    parser.add_argument("--token", help="default: the token saved by `hf auth login`")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    args = parser.parse_args(argv)

    plan = upload_plan(args.model)
    for name, kind, size in plan:
        print(f"{size / 1e6:10.2f} MB  {kind:<10}  {name}")
    total = sum(size for _, _, size in plan) / 1e6
    target = f"{args.repo_id}{' (private)' if args.private else ''}{f' @ {args.revision}' if args.revision else ''}"
    if args.dry_run:
        print(f"dry run: would upload {len(plan)} files ({total:.2f} MB) to {target}")
        return
    commit = push(
        args.model,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
    )
    print(f"uploaded {len(plan)} files ({total:.2f} MB) to {target}: {getattr(commit, 'commit_url', commit)}")


if __name__ == "__main__":
    main()
