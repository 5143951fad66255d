"""The CommitPackFT rules as small pure predicates over Arrow columns, plus the shipped tables.

Each ``rule_*`` function takes whole columns (``pyarrow`` arrays) and returns a boolean "keep"
mask of the same length, so a Ray Data batch is filtered with a handful of vectorised Arrow
kernels instead of a Python loop per row. The rules, their order and thresholds are those of
``COMMITPACKFT.md`` (OctoPack's ``commitpackft_filters1.py`` and ``commitpackft_filters2.py``);
where octoray implements the intent rather than the original code, the function says so.

:func:`reference_decision` is the same rule set written the plain way, one row at a time, close
to the original scripts. It is the baseline of ``benchmarks/bench_filter.py`` and the oracle
the vectorised rules are tested against.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from octoray.errors import UserError

#: The CommitPackFT rules in the order they are applied; ``stats.json`` funnel keys.
RULES: tuple[str, ...] = (
    "content",           # 1. old < 50k chars, new not empty, old != new
    "no_hash",           # 2. no '#' in the subject
    "extension",         # 3. the file's extension belongs to the row's language
    "no_file_name",      # 4. the file's base name is not in the subject
    "subject_length",    # 5. 10 < chars < 1000 and 4 < words < 1000
    "clean_subject",     # 6. strip tags/prefixes, then rule 5 again
    "capitalized",       # 7. subject starts with a capital letter
    "token_length",      # 8. min_tokens <= tokens(old + eos + new) <= max_tokens
    "imperative",        # 9. imperative verb start, no bad subject / version / hash
    "second_pass",       # 10. cherry-picks, SHAs, bumps, "I", issue refs, WIP, URLs ...
    "decontam",          # octoray: no n-gram overlap with HumanEvalPack (absent in the original)
)
#: Code of the first failing rule per row: 0 = kept, i + 1 = ``RULES[i]``.
CODE = {name: i + 1 for i, name in enumerate(RULES)}

MAX_OLD_CHARS = 50_000
BUMP_PREFIXES = ("Bump", "Set version", "Update version")
#: Fraction of version-bump subjects the original drops (``random.random() < 0.9``, unseeded).
BUMP_DROP_FRACTION = 0.9
#: Exact joke subjects the original's second pass drops (``rmv_specific``).
SECOND_PASS_EXACT = (
    "fix that bug where things didn't work but now they should",
    "put the thingie in the thingie",
    "add a beter commit message",
)
#: Substrings of the lower-cased subject the second pass drops.
SECOND_PASS_SUBSTRINGS = ("code review", "cdpcp", "//codereview", "work in progress", "http://",
                          "https://", "| leetcode", " i ", "i've", "i'm")
# RE2 has no look-ahead: "(?=$|\S)" after a greedy \d+ is equivalent to consuming "($|\S)".
VERSION_RE = r"^v?\d+\.\d+\.\d+(?:$|\S)"
HASH_RE = r"^[a-f0-9]+(?:-[a-f0-9]+)*$"
SHA_RE = r"[a-f0-9]{40}"
ISSUE_RE = r"(?:issue|bug|feature)\s*\d+"
WIP_RE = r"\bwip\b"  # the original matched "wip" anywhere, dropping "wipe"; octoray: a word


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class Tables:
    """Word lists of rule 9: imperative verbs, exact bad subjects, bad substrings (lower-case)."""

    verbs: frozenset[str]
    bad_exact: frozenset[str]
    bad_substrings: tuple[str, ...]
    source: str = "octoray"


def load_tables(verbs_file: str | Path | None = None, bad_subjects_file: str | Path | None = None) -> Tables:
    """The shipped tables, or the files given (OctoPack's formats) to reproduce the original."""
    if verbs_file is None:
        verbs_text = resources.files("octoray").joinpath("data/imperative_verbs.txt").read_text("utf-8")
    else:
        verbs_text = _read_text(verbs_file, "verbs file")
    verbs = frozenset(line.strip().lower() for line in verbs_text.splitlines()
                      if line.strip() and not line.lstrip().startswith("#"))
    if not verbs:
        raise UserError(f"verbs file {verbs_file} lists no verbs (one per line expected)")
    if bad_subjects_file is None:
        bad_text = resources.files("octoray").joinpath("data/bad_subjects.json").read_text("utf-8")
        where = "shipped bad_subjects.json"
    else:
        bad_text, where = _read_text(bad_subjects_file, "bad subjects file"), str(bad_subjects_file)
    try:
        bad = json.loads(bad_text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    keys = ("bad_subject_exact", "bad_subject_substrings")
    if not isinstance(bad, dict) or not all(
        isinstance(bad.get(k), list) and all(isinstance(s, str) for s in bad[k]) for k in keys
    ):
        raise UserError(f"{where} must hold string lists 'bad_subject_exact' and 'bad_subject_substrings'")
    source = "octoray" if verbs_file is None and bad_subjects_file is None else f"{verbs_file}, {bad_subjects_file}"
    return Tables(verbs, frozenset(s.lower() for s in bad[keys[0]]),
                  tuple(s.lower() for s in bad[keys[1]] if s), source)


def _read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None


# --------------------------------------------------------------------------- vectorised rules
# Every rule gets Arrow arrays (or chunked arrays) and returns a boolean keep-mask; nulls count
# as "drop" via fill_null(False) so a null subject never slips through.


def _pc() -> Any:
    import pyarrow.compute as pc  # lazy: `import octoray` stays light

    return pc


def _words(subject: Any) -> Any:
    """Number of whitespace-separated words, like ``len(s.split())``."""
    pc = _pc()
    trimmed = pc.utf8_trim_whitespace(subject)
    count = pc.list_value_length(pc.utf8_split_whitespace(trimmed))
    return pc.if_else(pc.equal(pc.utf8_length(trimmed), 0), 0, count)


def _keep(mask: Any) -> Any:
    return _pc().fill_null(mask, False)


def rule_content(old: Any, new: Any, max_old_chars: int = MAX_OLD_CHARS) -> Any:
    """Rule 1: ``old_contents`` under 50,000 characters, ``new_contents`` not empty, old != new."""
    pc = _pc()
    # Characters <= bytes, and byte lengths are free (Arrow offsets): count characters only
    # when some file is that large in bytes.
    short = pc.less(pc.binary_length(old), max_old_chars)
    if not pc.all(short).as_py():
        short = pc.less(pc.utf8_length(old), max_old_chars)
    return _keep(pc.and_(pc.and_(short, pc.greater(pc.binary_length(new), 0)), pc.not_equal(old, new)))


def rule_no_hash(subject: Any) -> Any:
    """Rule 2: the subject holds no ``#`` (issue references such as "Fix #12")."""
    pc = _pc()
    return _keep(pc.invert(pc.match_substring(subject, "#")))


def file_suffixes(path: str) -> list[str]:
    """Every lower-cased suffix of the base name from a dot: ``a.min.js`` -> ``.min.js``, ``.js``."""
    name = path.rsplit("/", 1)[-1]
    return [name[i:].lower() for i, ch in enumerate(name) if ch == "."]


def rule_extension(new_file: Any, lang: Any, extensions_for: Callable[[str], frozenset[str]]) -> Any:
    """Rule 3: the file's extension is one of ``lang``'s extensions.

    The original compared ``new_file.split(".")[-1]`` (no dot) to dotted extensions, and the
    check ended up commented out; octoray implements the intent. The last one, two or three
    dotted suffixes count, so multi-part extensions (``.d.ts``) match. No extension: dropped.
    """
    import pyarrow as pa

    pc = _pc()
    name = pc.utf8_lower(_basename(new_file))
    languages = [v for v in pc.unique(lang).to_pylist() if v is not None]
    # One vectorised set lookup of "language NUL suffix" pairs for the whole batch.
    pairs = pa.array(sorted(f"{language}\0{ext}" for language in languages for ext in extensions_for(language)),
                     pa.string())
    keep = None
    for parts in (1, 2, 3):
        suffix = pc.struct_field(pc.extract_regex(name, r"(?P<s>(?:\.[^.]*){%d})$" % parts), [0])
        hit = pc.is_in(pc.binary_join_element_wise(lang, suffix, "\0"), value_set=pairs)
        keep = hit if keep is None else pc.or_kleene(keep, hit)
    return _keep(keep)


def _basename(path: Any) -> Any:
    return _pc().replace_substring_regex(path, r"^.*/", "", max_replacements=1)


def file_stem(path: str) -> str:
    """The base name without its last extension: ``src/app.test.js`` -> ``app.test``."""
    return os.path.splitext(path.rsplit("/", 1)[-1])[0]


def rule_no_file_name(new_file: Any, subject: Any) -> Any:
    """Rule 4: the file's base name (without extension) does not occur in the subject.

    Case-sensitive, as in the original. The original took the part between the last two dots
    (``a.b.py`` -> ``b``) and, for ``.bashrc``, the empty string (dropping every such row);
    octoray uses the whole name before the last dot (``os.path.splitext``) and never matches
    an empty name.
    """
    import pyarrow as pa

    pc = _pc()
    # splitext: drop the last ".ext" unless the name is only leading dots before it (".bashrc").
    stems = pc.replace_substring_regex(_basename(new_file), r"^(\.*[^.].*)\.[^.]*$", r"\1", max_replacements=1)
    # A needle that differs per row has no Arrow kernel; the Python `in` is the cheap part.
    keep = [stem is not None and subj is not None and (not stem or stem not in subj)
            for stem, subj in zip(stems.to_pylist(), subject.to_pylist())]
    return pa.array(keep, type=pa.bool_())


def rule_subject_length(subject: Any) -> Any:
    """Rule 5: ``10 < len(subject) < 1000`` characters and ``4 < words < 1000``."""
    pc = _pc()
    chars, words = pc.utf8_length(subject), _words(subject)
    return _keep(pc.and_(pc.and_(pc.greater(chars, 10), pc.less(chars, 1000)),
                         pc.and_(pc.greater(words, 4), pc.less(words, 1000))))


def clean_subject(subject: Any) -> Any:
    """Rule 6's cleaning: drop ``[skip ci]``, a leading ``[...]`` word, then a leading word ending
    in ``:``, then a trailing ``[...]`` word; words are re-joined with single spaces."""
    pc = _pc()
    s = pc.replace_substring(subject, "[skip ci]", "")
    s = pc.binary_join(pc.utf8_split_whitespace(pc.utf8_trim_whitespace(s)), " ")
    # After the join words are separated by exactly one space, so "[^ ]" is "inside one word".
    s = pc.replace_substring_regex(s, r"^\[[^ ]*\](?: |$)", "", max_replacements=1)
    s = pc.replace_substring_regex(s, r"^[^ ]*:(?: |$)", "", max_replacements=1)
    return pc.replace_substring_regex(s, r"(?:^| )\[[^ ]*\]$", "", max_replacements=1)


def rule_capitalized(subject: Any) -> Any:
    """Rule 7: the (cleaned) subject starts with an upper-case letter."""
    pc = _pc()
    first = pc.utf8_slice_codeunits(pc.utf8_trim_whitespace(subject), 0, 1)
    return _keep(pc.utf8_is_upper(first))


def token_length_ok(lengths: Sequence[int], min_tokens: int, max_tokens: int) -> Any:
    """Rule 8 on precomputed token counts of ``old + eos + new``: ``min <= n <= max``."""
    import pyarrow as pa

    return pa.array([min_tokens <= n <= max_tokens for n in lengths], type=pa.bool_())


def _any_substring(text: Any, needles: Iterable[str]) -> Any:
    """Does ``text`` contain any of ``needles``? One RE2 alternation: one pass, one kernel call."""
    return _pc().match_substring_regex(text, "|".join(re.escape(n) for n in needles))


def verb_regex(verbs: Iterable[str]) -> str:
    """One anchored alternation: the subject starts with a verb followed by a space."""
    return "^(?:" + "|".join(re.escape(v) for v in sorted(verbs, key=lambda v: (-len(v), v))) + ") "


def rule_imperative(subject: Any, tables: Tables) -> Any:
    """Rule 9: starts with an imperative verb + space; not an exact bad subject; no bad
    substring; not a version string; not a hash-like subject (all on the lower-cased subject)."""
    import pyarrow as pa

    pc = _pc()
    lower = pc.utf8_lower(subject)
    keep = pc.match_substring_regex(lower, verb_regex(tables.verbs))
    keep = pc.and_(keep, pc.invert(pc.is_in(lower, value_set=pa.array(sorted(tables.bad_exact), pa.string()))))
    if tables.bad_substrings:
        keep = pc.and_(keep, pc.invert(_any_substring(lower, tables.bad_substrings)))
    keep = pc.and_(keep, pc.invert(pc.match_substring_regex(lower, f"{VERSION_RE}|{HASH_RE}")))
    return _keep(keep)


def bump_drawn(commit: str, seed: int) -> bool:
    """The seeded, per-commit coin of the 90% version-bump drop (True = drop).

    A hash of (seed, sha) instead of the original's unseeded ``random.random()``, so the
    decision does not depend on shard order, worker count or reruns.
    """
    digest = hashlib.blake2b(f"{seed}:{commit}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < BUMP_DROP_FRACTION


def second_pass_subject(subject: Any) -> Any:
    """The subject after the second pass's ``[ci skip]`` removal (stripped)."""
    pc = _pc()
    return pc.utf8_trim_whitespace(pc.replace_substring(subject, "[ci skip]", ""))


def rule_second_pass(subject: Any, commit: Any, seed: int) -> Any:
    """Rule 10 on the rule-9 subject: no cherry-pick note or 40-hex SHA; after removing
    ``[ci skip]``: 90% of "Bump"/"Set version"/"Update version" subjects (seeded per commit),
    first person ("i", "i've", "i'm"), "thanks to" + "for", code review, issue/bug/feature
    numbers, cdpcp, //codereview, WIP, URLs, "| leetcode", the joke subjects, < 4 words."""
    import pyarrow as pa

    pc = _pc()
    drop = pc.match_substring_regex(subject, "cherry picked from commit|" + SHA_RE)
    s = second_pass_subject(subject)
    bumpish = _any_starts_with(s, BUMP_PREFIXES)
    if pc.any(bumpish).as_py():  # hash only the few candidate rows
        coins = [bool(b) and bump_drawn(c, seed) for b, c in zip(bumpish.to_pylist(), commit.to_pylist())]
        drop = pc.or_(drop, pa.array(coins, type=pa.bool_()))
    lower = pc.utf8_lower(s)
    # Substrings, issue numbers and WIP in one regex pass (the subject is already lower-case,
    # which is what the original's IGNORECASE issue regex amounts to).
    pattern = "|".join([*(re.escape(n) for n in SECOND_PASS_SUBSTRINGS), ISSUE_RE, WIP_RE])
    drop = pc.or_(drop, pc.match_substring_regex(lower, pattern))
    # "for" is checked on the original-case subject, as in the original.
    drop = pc.or_(drop, pc.and_(pc.match_substring(lower, "thanks to"), pc.match_substring(s, "for")))
    drop = pc.or_(drop, pc.is_in(lower, value_set=pa.array(SECOND_PASS_EXACT, pa.string())))
    drop = pc.or_(drop, pc.less(_words(s), 4))
    return _keep(pc.invert(drop))


def subject_rules_keep(subject: Any, new_file: Any, commit: Any, tables: Tables, seed: int) -> Any:
    """Every rule that reads the subject (2, 4, 5, 6, 7, 9, 10), and-ed, on ``subject`` as given.

    Rules 1, 3, 8 and decontamination do not read the subject, so a row the filter kept with a
    normalised subject would also have been kept with ``subject`` exactly when this mask holds:
    the filter counts kept rows that fail it on the raw subject as *rescued* by the normalisation.
    """
    pc = _pc()
    cleaned = clean_subject(subject)
    keep = pc.and_(rule_no_hash(subject), rule_no_file_name(new_file, subject))
    for mask in (rule_subject_length(subject), rule_subject_length(cleaned), rule_capitalized(cleaned),
                 rule_imperative(cleaned, tables), rule_second_pass(cleaned, commit, seed)):
        keep = pc.and_(keep, mask)
    return _keep(keep)


def _any_starts_with(text: Any, prefixes: Iterable[str]) -> Any:
    pc = _pc()
    hit = None
    for prefix in prefixes:
        m = pc.fill_null(pc.starts_with(text, prefix), False)
        hit = m if hit is None else pc.or_(hit, m)
    return hit


# --------------------------------------------------------------------------- decontamination


@dataclass(frozen=True)
class NgramIndex:
    """Whitespace-token n-grams of benchmark problems: n-gram -> problem numbers, plus sizes."""

    n: int
    grams: Mapping[str, tuple[int, ...]]
    sizes: tuple[int, ...]  # distinct n-grams per problem
    names: tuple[str, ...]  # task ids


def ngrams(text: str, n: int) -> set[str]:
    """The distinct whitespace-token ``n``-grams of ``text`` (each joined by single spaces)."""
    tokens = text.split()
    return {" ".join(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def build_ngram_index(problems: Iterable[tuple[str, str]], n: int) -> NgramIndex:
    """Index ``(task_id, text)`` pairs; problems shorter than ``n`` tokens are skipped."""
    grams: dict[str, list[int]] = defaultdict(list)
    sizes, names = [], []
    for name, text in problems:
        own = ngrams(text, n)
        if not own:
            continue
        for gram in own:
            grams[gram].append(len(names))
        sizes.append(len(own))
        names.append(name)
    return NgramIndex(n, {g: tuple(ids) for g, ids in grams.items()}, tuple(sizes), tuple(names))


def overlap(texts: Iterable[str], index: NgramIndex) -> tuple[float, str | None]:
    """The largest fraction of one problem's n-grams found in ``texts``, and that problem."""
    hits: dict[int, int] = defaultdict(int)
    seen: set[str] = set()
    for text in texts:
        seen |= ngrams(text, index.n)
    for gram in seen:
        for pid in index.grams.get(gram, ()):
            hits[pid] += 1
    if not hits:
        return 0.0, None
    pid = max(hits, key=lambda p: hits[p] / index.sizes[p])
    return hits[pid] / index.sizes[pid], index.names[pid]


def rule_decontam(old: Any, new: Any, index: NgramIndex, threshold: float) -> Any:
    """Drop rows whose old or new code covers ``>= threshold`` of one problem's n-grams."""
    import pyarrow as pa

    keep = [overlap((o or "", w or ""), index)[0] < threshold for o, w in zip(old.to_pylist(), new.to_pylist())]
    return pa.array(keep, type=pa.bool_())


# --------------------------------------------------------------------------- reference (per row)


def reference_clean_subject(subject: str) -> str:
    """Rule 6's cleaning as the original wrote it, on one subject."""
    words = subject.strip().replace("[skip ci]", "").split()
    if words and words[0].startswith("[") and words[0].endswith("]"):
        words = words[1:]
    if words and words[0].endswith(":"):
        words = words[1:]
    if words and words[-1].startswith("[") and words[-1].endswith("]"):
        words = words[:-1]
    return " ".join(words).strip()


def reference_decision(row: Mapping[str, Any], tables: Tables, extensions_for: Callable[[str], frozenset[str]],
                       seed: int = 0, verbs: tuple[str, ...] | None = None, *, pr_suffix: bool = False,
                       emoji_prefix: bool = False) -> tuple[int, str]:
    """Rules 1-7, 9, 10 on one row the plain Python way: (code of the first failing rule or 0,
    final subject). Rule 8 (tokenizer) and decontamination are not included. ``pr_suffix`` /
    ``emoji_prefix`` normalise the subject first (:mod:`octoray.data.subjects`); off, as in the paper."""
    from octoray.data.subjects import reference_normalise

    old, new, path, lang = row["old_contents"], row["new_contents"], row["new_file"], row["lang"]
    subject = reference_normalise(row["subject"], pr_suffix, emoji_prefix)
    if not (len(old) < MAX_OLD_CHARS and len(new) != 0 and old != new):
        return CODE["content"], subject
    if "#" in subject:
        return CODE["no_hash"], subject
    if not any(s in extensions_for(lang) for s in file_suffixes(path)):
        return CODE["extension"], subject
    stem = file_stem(path)
    if stem and stem in subject:
        return CODE["no_file_name"], subject

    def length_ok(s: str) -> bool:
        return 10 < len(s) < 1000 and 4 < len(s.split()) < 1000

    if not length_ok(subject):
        return CODE["subject_length"], subject
    subject = reference_clean_subject(subject)
    if not length_ok(subject):
        return CODE["clean_subject"], subject
    if not subject.strip()[0].isupper():
        return CODE["capitalized"], subject
    lower = subject.lower()
    starts = verbs or tuple(v + " " for v in tables.verbs)
    if (not lower.startswith(starts) or lower in tables.bad_exact
            or any(b in lower for b in tables.bad_substrings)
            or re.match(r"(?:v)?\d+\.\d+\.\d+(?=$|\S)", lower) or re.match(HASH_RE, lower)):
        return CODE["imperative"], subject
    if "cherry picked from commit" in subject or re.search(SHA_RE, subject):
        return CODE["second_pass"], subject
    subject = subject.replace("[ci skip]", "").strip()
    lower = subject.lower()
    if ((subject.startswith(BUMP_PREFIXES) and bump_drawn(row["commit"], seed))
            or any(b in lower for b in SECOND_PASS_SUBSTRINGS)
            or ("thanks to" in lower and "for" in subject)
            or lower in SECOND_PASS_EXACT
            or re.search(ISSUE_RE, lower, re.IGNORECASE)
            or re.search(WIP_RE, lower)
            or len(subject.split()) < 4):
        return CODE["second_pass"], subject
    return 0, subject
