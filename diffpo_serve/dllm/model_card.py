"""What a model directory says about itself: the metadata of its model card (``README.md``).

A model card may start with a YAML front-matter block, the Hugging Face convention. Two of its keys
are read, so the server can tell a client what the model is for and what to send it:

``description``  a plain statement of what the model does and which prompts it understands;
``widget``       example inputs, a list of ``{text: ...}`` entries (the Hub's own key for the
                 prompts its inference widget offers).

A directory without a README, or a README without front matter, has neither. Malformed front matter
is an error naming the file: a model card that says something wrong is worse than none.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


class ModelCardError(ValueError):
    """A README.md whose front matter cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class CardInfo:
    description: str | None = None
    examples: tuple[str, ...] = ()


def read_card(directory: str | Path) -> CardInfo:
    """The ``description`` and example prompts of ``directory/README.md`` (empty if it has none)."""
    path = Path(directory) / "README.md"
    if not path.is_file():
        return CardInfo()
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return CardInfo()
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise ModelCardError(f"{path}: front matter opened with '---' is never closed") from None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end])) or {}
    except yaml.YAMLError as e:
        raise ModelCardError(f"{path}: front matter is not valid YAML ({e})") from None
    if not isinstance(meta, dict):
        raise ModelCardError(f"{path}: front matter must be a mapping, got {type(meta).__name__}")
    description = meta.get("description")
    if description is not None and not isinstance(description, str):
        raise ModelCardError(f"{path}: 'description' must be text, got {type(description).__name__}")
    widget = meta.get("widget") or []
    if not isinstance(widget, list):
        raise ModelCardError(f"{path}: 'widget' must be a list of {{text: ...}} entries")
    examples = []
    for i, entry in enumerate(widget):
        text_ = entry.get("text") if isinstance(entry, dict) else None
        if not isinstance(text_, str) or not text_:
            raise ModelCardError(f"{path}: widget entry {i} has no 'text'")
        examples.append(text_)
    return CardInfo(description=" ".join(description.split()) if description else None, examples=tuple(examples))
