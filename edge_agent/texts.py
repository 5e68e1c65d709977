"""Rules every entry point applies to an input text (pure: the protocol layer uses it too)."""

from __future__ import annotations

from .errors import EmptyText, InvalidArgument

__all__ = ["check_text"]


def check_text(index: int, text: object) -> str:
    """``text`` if it is a string with something besides white space, else a typed error that
    names its position (``texts[index]``)."""
    if not isinstance(text, str):
        raise InvalidArgument(f"texts[{index}] is {type(text).__name__}, not a string", index=index)
    if not text.strip():
        raise EmptyText(f"texts[{index}] is empty", index=index)
    return text
