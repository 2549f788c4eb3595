"""What a user types that the store keeps and shows to others (dataset and model names and notes, display
names): bidirectional controls (which reverse what follows them on screen) and other control characters
are dropped, a name is one line with single spaces, and both have a length limit. A refusal is a
``ValueError`` with the message to show (the service turns it into a :class:`~domain.records.UserError`).
How the pages show it (as text, never as Markdown) is :func:`ui.text.plain`'s part."""

from __future__ import annotations

import re

NAME_MAX = 120  # characters of a name (a dataset's, a model's, a display name)
NOTES_MAX = 10_000  # characters of notes

# LRE RLE PDF LRO RLO, LRI RLI FSI PDI, LRM RLM, ALM: they turn the text after them around
BIDI = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")  # all but tab and newline (\n)


def strip_controls(text: str, *, keep_lines: bool = False) -> str:
    """``text`` without bidirectional controls and control characters (tab and newline kept when
    ``keep_lines``; a Windows or old-Mac line end becomes a newline)."""
    text = BIDI.sub("", text or "")
    if keep_lines:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return _CONTROL.sub("", text)
    return _CONTROL.sub(" ", text.replace("\t", " ").replace("\n", " "))


def clean_name(name: str, what: str = "A name", *, cut: bool = False, limit: int = NAME_MAX) -> str:
    """A name as stored: no controls, whitespace collapsed to single spaces, at most ``limit`` characters.
    A longer one is refused with a message saying so (``cut``: shortened instead, for names that come
    from a file name or a sign-on provider, which the user did not type). May be empty."""
    cleaned = " ".join(strip_controls(name).split())
    if len(cleaned) > limit:
        if not cut:
            raise ValueError(f"{what} has at most {limit} characters (this one has {len(cleaned):,}).")
        cleaned = cleaned[:limit].rstrip()
    return cleaned


def clean_notes(notes: str, what: str = "Notes", *, limit: int = NOTES_MAX) -> str:
    """Notes as stored: no controls but tabs and line breaks, no trailing whitespace, at most ``limit``
    characters (a longer text is refused with a message saying so)."""
    cleaned = strip_controls(notes, keep_lines=True).strip()
    if len(cleaned) > limit:
        raise ValueError(f"{what} have at most {limit:,} characters (these have {len(cleaned):,}): "
                         "shorten them, or keep the long text elsewhere and note where.")
    return cleaned
