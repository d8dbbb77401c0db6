"""The record every data source is turned into, and its chat-message form.

`Example` is the contract between the data layer and the trainers: loaders produce it, the synthetic generator
produces it, SFT and RL consume it through `to_messages`, and evaluation scores `answer` with `data.verify`.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Example:
    """One multimodal problem with its exact answer and (for SFT) a worked long chain of thought."""

    problem: str  # question text (no image placeholders; images come first in the user turn)
    answer: str  # short exact final answer, e.g. "4", "12.5", "B"
    images: list = field(default_factory=list)  # PIL.Image.Image objects or file paths (str), in order
    reasoning: str = ""  # worked long chain of thought for SFT, WITHOUT think tags
    task: str = ""  # task family name, e.g. "count_shapes"
    difficulty: int = 1  # 1 (easiest) .. 5, for curriculum sampling
    choices: list[str] | None = None  # multiple-choice options (the problem text already lists them as "(A) ..")
    id: str = ""
    # Synthetic data only: what the image shows, as a class index per named slot (`data.synthetic.SCENE_SLOTS`);
    # `scripts/pretrain_vision.py` trains a vision encoder on it.
    scene: dict[str, int] | None = None


def to_messages(example: Example, with_response: bool = True, with_answer: bool = True) -> list[dict]:
    """The example as chat messages for `processor.apply_chat_template`.

    User turn: one {"type": "image", "image": img} block per image, then {"type": "text", "text": problem}.
    If with_response: an assistant turn {"role": "assistant", "reasoning_content": example.reasoning,
    "content": f"\\boxed{{{example.answer}}}"}; the chat template renders the reasoning inside the thinking block.
    With `with_answer=False` the assistant turn is the reasoning alone (empty content: image-description data).
    """
    content = [{"type": "image", "image": image} for image in example.images]
    content.append({"type": "text", "text": example.problem})
    messages = [{"role": "user", "content": content}]
    if with_response:
        messages.append(
            {
                "role": "assistant",
                "reasoning_content": example.reasoning,
                "content": f"\\boxed{{{example.answer}}}" if with_answer else "",
            }
        )
    return messages


def read_jsonl(path) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) for each non-blank line of a JSON-lines file; a bad line raises a ValueError
    naming the file and line."""
    import json

    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err})") from err
