"""Data for kimi_mm: the `Example` record, synthetic problems, loaders for public datasets and answer checking."""

from .loaders import LoadResult, load_examples
from .records import Example, to_messages
from .synthetic import generate, write_dataset
from .verify import extract_boxed, is_correct

__all__ = [
    "Example",
    "LoadResult",
    "extract_boxed",
    "generate",
    "is_correct",
    "load_examples",
    "to_messages",
    "write_dataset",
]
