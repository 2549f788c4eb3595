"""User-given text (dataset and model names, notes, user and display names, a package's source) in the
pages' Markdown-rendering calls (``st.markdown``, ``st.write``, captions, alerts, flashes, tooltips and
widget labels, which render images and links too): :func:`plain` makes Streamlit show the very characters
typed, so ``![x](http://…)`` is text, not an image another user's browser would load. Selectbox options
and table cells are plain text already and need nothing. :func:`plain_html` does the same for Plotly's
titles and labels (a subset of HTML). :func:`cells` keeps a table's text from running as a spreadsheet formula
once downloaded."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping

# bidirectional controls (they reverse what follows them on screen) and control characters but \t and \n
_INVISIBLE = re.compile("[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c\x00-\x08\x0b-\x1f\x7f-\x9f]")
# what Markdown (CommonMark, GitHub's, Streamlit's LaTeX and colour directives) reads as syntax; & < > are
# written as HTML character references instead (text in Markdown, and in HTML where HTML is allowed)
_MARKDOWN = re.compile(r"([\\`*_\[\]()!#|~${}])")
# what starts a list item, a heading underline or a rule only at the start of a line: "- ", "+ ", "1. ", "==="
_LINE_START = re.compile(r"^([ \t]*)(?:([-+=])|(\d+)\.)", re.MULTILINE)
# what GitHub's Markdown turns into a link with no brackets at all: "http://…", "www.…", "a@b.org", "mailto:…";
# a word joiner (invisible) goes before the ":", "." or "@" (a backslash does not do: Streamlit's remark-gfm
# finds these links in the text after its escapes are read)
_AUTOLINK = re.compile(r"(?i)(?<=[a-z0-9])(:)(?=//)|(?<=\bwww)(\.)|(@)|(?<=\bmailto)(:)|(?<=\bxmpp)(:)")
JOINER = "\u2060"


def plain(text: object) -> str:
    """``text`` for a Markdown-rendering call, shown literally: every Markdown metacharacter
    backslash-escaped, ``& < >`` as character references, bidirectional and control characters dropped."""
    cleaned = _INVISIBLE.sub("", "" if text is None else str(text))
    escaped = _MARKDOWN.sub(r"\\\1", html.escape(cleaned, quote=False))
    escaped = _AUTOLINK.sub(lambda m: JOINER + m[0], escaped)
    return _LINE_START.sub(lambda m: m[1] + ("\\" + m[2] if m[2] else m[3] + "\\."), escaped)


def said_by_job(error: str | None) -> str:
    """What a failed or stopped job said (the last line of its recorded error), shown literally: a foreign
    model's own exception text chooses it, and every user of the dataset sees it."""
    last = (error or "").strip().splitlines()[-1:]
    return plain(last[0]) if last else "no reason recorded"


_FORMULA = re.compile(r"[(!|=@\"']")  # what a formula after a leading + or - needs (a call, a link, a pipe)


def cell(value: object) -> object:
    """A table cell as the table's "Download as CSV" may write it: text that a spreadsheet would run as a
    formula gets a leading ``'``, as OWASP advises (it shows on the page too): text that starts with =, @, a
    tab or a return, or with + or - and holds what a formula needs (a call's bracket, ``!``, ``|``, ``=``,
    ``@``, quotes). "-ve control", "+3" or "-1,5" are left as they are."""
    if not isinstance(value, str) or not value:
        return value
    if value[0] in "=@\t\r" or (value[0] in "+-" and _FORMULA.search(value)):
        return "'" + value
    return value


def cells(rows: Iterable[Mapping[str, object]]) -> list[dict[str, object]]:
    """:func:`cell` over every cell of ``rows`` (a table's rows as mappings of column to value)."""
    return [{column: cell(value) for column, value in row.items()} for row in rows]


def plain_html(text: object) -> str:
    """``text`` for Plotly's titles, trace names and hover labels (which read a subset of HTML)."""
    return html.escape(_INVISIBLE.sub("", "" if text is None else str(text)), quote=True)
