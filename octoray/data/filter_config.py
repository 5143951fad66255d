"""The config of ``octoray filter`` (a leaf: imports nothing from octoray.data)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from octoray.config import option
from octoray.evaluation.config import LANGUAGES


@dataclass(frozen=True)
class FilterConfig:
    """Options of ``octoray filter`` (``key=value`` on the command line, or a ``filter:`` YAML section)."""

    commits: str = option("", "input directory written by 'octoray mine' (commits/)")
    out: str = option("", "output directory (sft/)")
    model: str = option("bigcode/starcoder", "hub id or local path of the model whose tokenizer rule 8 uses "
                                             "(the default is gated: accept its licence on the Hub and log in, "
                                             "or name another)")
    tokenizer_rule: bool = option(True, "apply rule 8 (token length of old + eos + new)")
    min_tokens: int = option(50, "rule 8: fewest tokens kept (inclusive)")
    max_tokens: int = option(768, "rule 8: most tokens kept (inclusive)")
    verbs_file: str | None = option(None, "imperative verbs, one per line (default: octoray's table; "
                                          "OctoPack's good_starts_en.txt reproduces the original)")
    bad_subjects_file: str | None = option(None, "JSON with bad_subject_exact / bad_subject_substrings "
                                                 "(default: octoray's table, same format as OctoPack's)")
    languages_file: str | None = option(None, "JSON {language: [extensions]} for rule 3 instead of Linguist "
                                              "(e.g. CommitPack's programming_languages.json)")
    pr_suffix: Literal["strip", "keep"] = option(
        "strip", "before the rules, remove a trailing pull-request reference from the subject: (#123), "
                 "(#1, #2), (#1) (#2), [#123], (GH-123), (!123); 'keep' = the paper's rules as published")
    emoji_prefix: Literal["strip", "keep"] = option(
        "strip", "before the rules, remove a leading emoji or :emoji_code: prefix from the subject "
                 "('keep' = the paper's rules as published)")
    seed: int = option(0, "seed of the per-commit 90% version-bump drop")
    decontam: bool = option(True, "drop commits whose code overlaps HumanEvalPack prompts or solutions")
    decontam_ngram: int = option(13, "decontamination: n of the whitespace-token n-grams")
    decontam_threshold: float = option(0.2, "decontamination: drop when a commit holds at least this "
                                            "fraction of one problem's n-grams")
    decontam_languages: tuple[str, ...] = option(LANGUAGES,
                                                 "HumanEvalPack languages to decontaminate against")
    humanevalpack_dir: str | None = option(None, "directory of HumanEvalPack <language>.jsonl files "
                                                 "(default: the hub dataset bigcode/humanevalpack)")
    template: Literal["octocoder", "commit_tags"] = option(
        "octocoder", "prompt/completion format: OctoCoder 'Question: ...\\n\\nAnswer:\\n' or "
                     "<commit_before>/<commit_msg>/<commit_after> tags")
    oasst_file: str | None = option(None, "JSONL of OASST-style rows {input, output} mixed into the output")
    oasst_limit: int | None = option(None, "keep only the first N OASST rows")
    actors: int = option(1, "most actors of the tokenizer/decontamination pool (it scales from 1)")
    batch_size: int = option(8192, "rows per Ray Data batch (bigger batches amortise per-kernel overhead)")
    tokenizer_batch_size: int = option(256, "texts per tokenizer call")
    progress: bool = option(True, "show a progress bar")

    def problems(self) -> list[str]:
        """Every invalid value, as messages."""
        found = []
        if not self.commits:
            found.append("the input directory (COMMITS_DIR) is required")
        if not self.out:
            found.append("out: required (--out DIR)")
        if not 0 <= self.min_tokens <= self.max_tokens:
            found.append("need 0 <= min_tokens <= max_tokens")
        if self.decontam_ngram < 1:
            found.append("decontam_ngram must be >= 1")
        if not 0 < self.decontam_threshold <= 1:
            found.append("decontam_threshold must be in (0, 1]")
        bad = [lang for lang in self.decontam_languages if lang not in LANGUAGES]
        if bad:
            found.append(f"decontam_languages: unknown {', '.join(bad)} (choose from {', '.join(LANGUAGES)})")
        if self.oasst_limit is not None and self.oasst_limit < 0:
            found.append("oasst_limit must be >= 0")
        for name in ("actors", "batch_size", "tokenizer_batch_size"):
            if getattr(self, name) < 1:
                found.append(f"{name} must be >= 1")
        return found
