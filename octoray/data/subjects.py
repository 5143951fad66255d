"""Subject normalisation before the CommitPackFT rules: pull-request suffixes and emoji prefixes.

Most projects on GitHub squash-merge pull requests, and the merged commit's subject ends with
the PR number (``Fix tokenizer padding side (#1234)``), so the paper's rule 2 ("no ``#`` in the
subject") drops almost every commit of a recent repository. Many also start subjects with a
gitmoji (``🐛 Fix ...``, ``:sparkles: Add ...``), which rule 7 ("starts with an upper-case
letter") then drops. This module removes exactly those two decorations and nothing else:

* a trailing pull-request reference: ``(#123)``, ``(#123, #456)``, ``(#123) (#456)``,
  ``[#123]``, ``(GH-123)``, ``(!123)`` (GitLab merge requests);
* a leading run of emoji or ``:emoji_code:`` shortcodes.

A ``#`` anywhere else stays (and still drops the commit); a subject that is only an emoji and a
PR number becomes empty (and is still too short). The patterns are written once and used by both
regex engines octoray runs: RE2 (Arrow's ``replace_substring_regex``, the vectorised stage) and
Python's :mod:`re` (:func:`reference_normalise`, the per-row oracle). Both see the same text:
whitespace is spelled ``[ \\t]`` and digits ``[0-9]`` (RE2's ``\\s``/``\\d`` are ASCII-only,
Python's are Unicode), and emoji are literal code point ranges, which both engines accept.
"""

from __future__ import annotations

import re
from typing import Any

#: One pull-request reference: GitHub ``#123`` / ``GH-123``, GitLab ``!123``.
_REF = r"(?:#|[Gg][Hh]-|!)[0-9]+"
_REFS = rf"{_REF}(?:[ \t]*,[ \t]*{_REF})*"
_GROUP = rf"(?:\({_REFS}\)|\[{_REFS}\])"
#: Trailing PR references (one or more bracketed groups) and the blanks before them.
PR_SUFFIX_RE = rf"(?:^|[ \t]+){_GROUP}(?:[ \t]*{_GROUP})*[ \t]*$"

#: Unicode blocks that hold the emoji used as commit prefixes (gitmoji and the like): arrows
#: (↩ ⬆ ⬇), misc technical (⏪ ⌛), geometric shapes (▶), misc symbols and dingbats (✨ ✅ ❌ ➕ ⚡
#: ♻ ✏), misc symbols and arrows (⬆ ⭐), and the supplementary pictograph planes (🐛 🎉 🔥 🚀,
#: skin tones, regional-indicator flags). Letters, digits and punctuation are in none of them.
EMOJI_RANGES: tuple[tuple[int, int], ...] = (
    (0x203C, 0x203C), (0x2049, 0x2049), (0x2139, 0x2139), (0x2190, 0x21FF), (0x2300, 0x23FF),
    (0x24C2, 0x24C2), (0x25A0, 0x25FF), (0x2600, 0x27BF), (0x2B00, 0x2BFF), (0x3030, 0x3030),
    (0x303D, 0x303D), (0x3297, 0x3297), (0x3299, 0x3299), (0x1F000, 0x1FAFF),
)
#: Joiners and modifiers that continue an emoji: variation selectors, ZWJ, keycap, tag characters.
EMOJI_JOINERS: tuple[tuple[int, int], ...] = ((0xFE0E, 0xFE0F), (0x200D, 0x200D), (0x20E3, 0x20E3),
                                               (0xE0020, 0xE007F))


def _char_class(ranges: tuple[tuple[int, int], ...]) -> str:
    return "[" + "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges) + "]"


#: A ``:shortcode:`` as GitHub and gitmoji write them (``:bug:``, ``:arrow_up:``, ``:+1:``).
_SHORTCODE = r":[a-z0-9_+\-]+:"
#: A leading run of emoji and shortcodes, with the blanks around them.
EMOJI_PREFIX_RE = (rf"^[ \t]*(?:(?:{_char_class(EMOJI_RANGES)}|{_SHORTCODE}){_char_class(EMOJI_JOINERS)}*"
                   r"[ \t]*)+")


def normalise(subject: Any, pr_suffix: bool, emoji_prefix: bool) -> Any:
    """The subjects (an Arrow string array) without a trailing PR reference and/or a leading
    emoji prefix; unchanged when both switches are off."""
    import pyarrow.compute as pc  # lazy: `import octoray` stays light

    if pr_suffix:
        subject = pc.replace_substring_regex(subject, PR_SUFFIX_RE, "", max_replacements=1)
    if emoji_prefix:
        subject = pc.replace_substring_regex(subject, EMOJI_PREFIX_RE, "", max_replacements=1)
    return subject


def reference_normalise(subject: str, pr_suffix: bool, emoji_prefix: bool) -> str:
    """:func:`normalise` on one subject with Python's :mod:`re` (the per-row reference)."""
    if pr_suffix:
        subject = re.sub(PR_SUFFIX_RE, "", subject, count=1)
    if emoji_prefix:
        subject = re.sub(EMOJI_PREFIX_RE, "", subject, count=1)
    return subject
