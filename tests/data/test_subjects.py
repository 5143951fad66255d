"""Subject normalisation (``pr_suffix``, ``emoji_prefix``): every suffix and prefix form, what it
must leave alone, and its place before the CommitPackFT rules, run through the filter stage's own
batch functions (rules 1-7, then 9-10 in the actor class, called here without Ray)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from octoray.config import ConfigError, load_config
from octoray.data import rules, subjects
from octoray.data.filtering import _RESCUED, FilterConfig, _first_rules, _LaterRules

PR_SUFFIXES = {  # subject -> normalised subject
    "Fix the tokenizer padding side (#1234)": "Fix the tokenizer padding side",
    "Fix the tokenizer padding side (#123, #456)": "Fix the tokenizer padding side",
    "Fix the tokenizer padding side (#123,#456)": "Fix the tokenizer padding side",
    "Fix the tokenizer padding side (#123) (#456)": "Fix the tokenizer padding side",
    "Fix the tokenizer padding side [#123]": "Fix the tokenizer padding side",
    "Fix the tokenizer padding side (GH-123)": "Fix the tokenizer padding side",
    "Fix the tokenizer padding side (gh-123)": "Fix the tokenizer padding side",
    "Fix the tokenizer padding side (!123)": "Fix the tokenizer padding side",
    "Fix the tokenizer padding side (#12) [#13]  ": "Fix the tokenizer padding side",
    "Support C# files in the scanner (#77)": "Support C# files in the scanner",  # only the suffix goes
}
EMOJI_PREFIXES = {
    "🐛 Fix the tokenizer padding side": "Fix the tokenizer padding side",
    "✨ Add streaming to the loader": "Add streaming to the loader",
    "⬆️ Upgrade the lint dependencies": "Upgrade the lint dependencies",        # with U+FE0F
    "🧑‍💻 Improve the developer shell": "Improve the developer shell",          # ZWJ sequence
    "👍🏽 Accept empty configs": "Accept empty configs",                        # skin tone
    "🐛🔥 Remove the dead retry path": "Remove the dead retry path",            # a run of emoji
    "🐛Fix the off-by-one in paging": "Fix the off-by-one in paging",            # no blank after
    ":sparkles: Add streaming to the loader": "Add streaming to the loader",
    ":bug::memo: Fix and document paging": "Fix and document paging",
    ":arrow_up: :heavy_plus_sign: Add the retry dependency": "Add the retry dependency",
    "🐛 :bug: Fix paging twice over": "Fix paging twice over",
}
UNTOUCHED = [  # a '#' or bracket elsewhere, emoji elsewhere, look-alikes: nothing else is removed
    "Fix #12 crash in the parser", "Fix (#12) crash in the parser", "Fix crash in the parser (#12).",
    "Fix crash in the parser (see #12)", "Fix crash in the parser (#12a)", "Fix crash in the parser 🐛",
    "Fix: crash in the parser", "::1 is a valid host now", "Fix crash [skip ci]", "Réduire la taille",
    "Fix crash in the parser (12)", "Fix crash in the parser #12",
]


def col(*values: object) -> pa.Array:
    return pa.array(list(values), pa.string())


def normalised(texts: list[str], pr_suffix: bool = True, emoji_prefix: bool = True) -> list[str]:
    """The vectorised (RE2) result, checked against the per-row Python ``re`` one."""
    out = subjects.normalise(col(*texts), pr_suffix, emoji_prefix).to_pylist()
    assert out == [subjects.reference_normalise(t, pr_suffix, emoji_prefix) for t in texts]
    return out


def test_every_pr_suffix_form_is_removed() -> None:
    assert normalised(list(PR_SUFFIXES)) == list(PR_SUFFIXES.values())
    assert normalised(list(PR_SUFFIXES), pr_suffix=False) == list(PR_SUFFIXES)  # switch off: untouched


def test_every_emoji_prefix_form_is_removed() -> None:
    assert normalised(list(EMOJI_PREFIXES)) == list(EMOJI_PREFIXES.values())
    assert normalised(list(EMOJI_PREFIXES), emoji_prefix=False) == list(EMOJI_PREFIXES)
    both = "✨ Add streaming to the loader (#12, #13)"
    assert normalised([both]) == ["Add streaming to the loader"]
    assert normalised([both], pr_suffix=False) == ["Add streaming to the loader (#12, #13)"]
    assert normalised([both], emoji_prefix=False) == ["✨ Add streaming to the loader"]


def test_nothing_else_is_removed() -> None:
    assert normalised(UNTOUCHED) == UNTOUCHED
    assert normalised([""]) == [""]
    assert subjects.normalise(col(None), True, True).to_pylist() == [None]


# --------------------------------------------------------------------------- before the rules

TABLES = rules.load_tables()
EXT = {"Python": frozenset({".py"})}
BODY_OLD = "def f(x):\n    return x\n"
BODY_NEW = "def f(x):\n    return x + 1\n"


def run_rules(texts: list[str], strip: bool = True, commits: list[str] | None = None) -> tuple[list[int], list[str | None], list[bool]]:
    """The filter stage's rules 1-7, 9, 10 on one batch of Python rows with these subjects:
    (first failing rule code per row, stored subject, rescued flag)."""
    n = len(texts)
    commits = commits or [f"{i:040x}" for i in range(n)]
    batch = pa.table({"commit": col(*commits), "subject": col(*texts), "new_file": col(*["src/app.py"] * n),
                      "lang": col(*["Python"] * n), "old_contents": col(*[BODY_OLD] * n),
                      "new_contents": col(*[BODY_NEW] * n), "path": col(*commits)})
    mode = "strip" if strip else "keep"
    first = _first_rules(batch, lambda lang: EXT.get(lang, frozenset()), pr_suffix=mode, emoji_prefix=mode)
    later = _LaterRules(FilterConfig(tokenizer_rule=False, decontam=False, pr_suffix=mode, emoji_prefix=mode), TABLES)
    out = {r["path"]: r for r in later(first).to_pylist()}
    rows = [out[c] for c in commits]
    for row, text, commit in zip(rows, texts, commits):  # the stage agrees with the per-row reference
        reference = rules.reference_decision({"commit": commit, "subject": text, "old_contents": BODY_OLD,
                                              "new_contents": BODY_NEW, "new_file": "src/app.py", "lang": "Python"},
                                             TABLES, lambda lang: EXT[lang], pr_suffix=strip, emoji_prefix=strip)
        assert reference[0] == row["_drop"], text
        if row["_drop"] == 0:
            assert reference[1] == row["subject"]
    return [r["_drop"] for r in rows], [r["subject"] for r in rows], [bool(r[_RESCUED]) for r in rows]


def test_normalised_subjects_are_kept_and_stored_and_counted_as_rescued() -> None:
    texts = ["Fix the tokenizer padding side (#1234)", "🐛 Fix the tokenizer padding side", ":bug: Fix the tokenizer padding side",
             "Fix the tokenizer padding side (GH-12)", "Fix the tokenizer padding side"]
    codes, stored, rescued = run_rules(texts)
    assert codes == [0, 0, 0, 0, 0] and stored == ["Fix the tokenizer padding side"] * 5
    # The paper's rules drop the first two ('#', lower-case start); rule 6 already removes a lone
    # ':bug:' word and '(GH-12)' holds no '#': those two were normalised but not rescued.
    assert rescued == [True, True, False, False, False]
    codes, stored, rescued = run_rules(texts, strip=False)
    assert codes == [rules.CODE["no_hash"], rules.CODE["capitalized"], 0, 0, 0] and not any(rescued)
    assert stored[2:] == ["Fix the tokenizer padding side", "Fix the tokenizer padding side (GH-12)", "Fix the tokenizer padding side"]


def test_a_hash_elsewhere_still_drops_the_commit() -> None:
    texts = ["Fix #12 crash in the parser (#13)", "Fix crash in the parser (#12) again", "🐛 Fix #12 crash in the parser"]
    codes, _, rescued = run_rules(texts)
    assert codes == [rules.CODE["no_hash"]] * 3 and not any(rescued)


@pytest.mark.parametrize("text", ["🎉 (#12)", "✨ :tada: (#1, #2)", "(#12)", "🐛 Fix (#12)"])
def test_an_emoji_and_a_pr_number_alone_are_still_too_short(text: str) -> None:
    codes, _, rescued = run_rules([text])
    assert codes == [rules.CODE["subject_length"]] and rescued == [False]


def test_a_version_bump_is_still_a_bump_after_stripping() -> None:
    n = 400
    commits = [f"{i:040x}" for i in range(n)]
    bumps = ["Bump lodash from 4.17.20 to 4.17.21 (#99)", "⬆️ Bump lodash from 4.17.20 to 4.17.21 (#99)"]
    for text in bumps:
        codes, stored, rescued = run_rules([text] * n, commits=commits)
        # Rule 10's seeded 90% drop applies to the stripped subject, commit by commit.
        expected = [rules.CODE["second_pass"] if rules.bump_drawn(c, 0) else 0 for c in commits]
        assert codes == expected and 0.05 < codes.count(0) / n < 0.15
        assert {s for s, c in zip(stored, codes) if c == 0} == {"Bump lodash from 4.17.20 to 4.17.21"}
        assert rescued == [c == 0 for c in codes]  # the survivors: '#' would have dropped them
    # Unstripped, the '#' drops every one of them at rule 2 (before rule 10 sees them).
    codes, _, _ = run_rules([bumps[0]] * n, strip=False, commits=commits)
    assert set(codes) == {rules.CODE["no_hash"]}


def test_config_names_and_values() -> None:
    cfg = FilterConfig()
    assert (cfg.pr_suffix, cfg.emoji_prefix) == ("strip", "strip")  # on for users
    cfg = load_config(FilterConfig, None, ["pr_suffix=keep", "emoji_prefix=keep"], values={"commits": "c", "out": "o"})
    assert (cfg.pr_suffix, cfg.emoji_prefix) == ("keep", "keep")
    with pytest.raises(ConfigError) as err:
        load_config(FilterConfig, None, ["pr_suffix=remove", "emoji_prefix=false"], values={"commits": "c", "out": "o"})
    assert "pr_suffix" in str(err.value) and "emoji_prefix" in str(err.value)


def test_the_paper_preset_keeps_and_the_demo_strips() -> None:
    from tests.helpers import REPO_ROOT

    paper = load_config(FilterConfig, REPO_ROOT / "jobs/octocoder.yaml", section="filter", values={"commits": "c", "out": "o"})
    demo = load_config(FilterConfig, REPO_ROOT / "jobs/demo.yaml", section="filter", values={"commits": "c", "out": "o"})
    assert (paper.pr_suffix, paper.emoji_prefix) == ("keep", "keep")
    assert (demo.pr_suffix, demo.emoji_prefix) == ("strip", "strip")
