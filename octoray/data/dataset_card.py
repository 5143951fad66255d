"""The dataset card (``README.md``) of a data stage directory (``commits/``, ``sft/``).

The YAML header is Hub dataset-card metadata: ``configs`` names the split's data files
(:data:`octoray.storage.layout.DATA_FILES_PATTERN`), so ``datasets.load_dataset(DIR)`` reads exactly the
shards and nothing of octoray's own files; ``license``, ``language``, ``size_categories``,
``task_categories`` and ``tags`` are what the Hub indexes. The body says how the data was made:
octoray version, the command and resolved config, the funnel with the rows each rule dropped, the
languages, and the source repositories with their licenses.

The text is built from what the stage already has in hand (config, ``stats.json``, a summary of a
few small columns), so writing the card never reads the big columns again.
"""

from __future__ import annotations

import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from octoray import __version__
from octoray.config import dump_yaml
from octoray.data.filter_config import FilterConfig
from octoray.data.mine_config import MineConfig
from octoray.storage.layout import DATA_DIR, DATA_FILES_PATTERN, DATA_GLOB, SPLIT

#: The Hub's size categories: (upper bound, label), the first bound above the row count wins.
_SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
                    (10_000_000_000, "1B<n<10B"), (100_000_000_000, "10B<n<100B"), (10**12, "100B<n<1T"))

#: What each column holds, as the cards document it (CommitPack's columns, then octoray's).
COLUMN_DOCS = {
    "commit": "commit SHA",
    "old_file": "path of the file before the commit",
    "new_file": "path of the file after the commit (the same: renames are not mined)",
    "old_contents": "file contents before the commit",
    "new_contents": "file contents after the commit",
    "subject": "first line of the commit message (in sft/: the cleaned subject)",
    "message": "full commit message",
    "lang": "programming language of the file (Linguist name)",
    "license": "SPDX id of the repository's license ('' when unlicensed rows were allowed)",
    "repos": "comma-separated repositories holding the commit (forks joined)",
    "repo": "the repository the row was mined from",
    "parent": "parent commit SHA",
    "author_date": "author date (UTC)",
    "prompt": "the training prompt in the chosen template",
    "completion": "the training target (the new file contents, or the OASST answer)",
    "source": "'commitpackft' or 'oasst'",
}


@dataclass(frozen=True)
class DataSummary:
    """Counts over a stage's rows that the card reports (read from a few small columns)."""

    rows: int = 0
    languages: Mapping[str, int] = field(default_factory=dict)   # lang -> rows
    licenses: Mapping[str, int] = field(default_factory=dict)    # license id ('' = none) -> rows
    repos: Mapping[str, tuple[str, int]] = field(default_factory=dict)  # repo -> (license, rows)


def summarize(shards: Iterable[Any]) -> DataSummary:
    """Row, language, license and repository counts of Parquet ``shards`` (paths or object-store
    locations), column-wise."""
    from octoray.storage.stage_dirs import parquet_file

    rows, langs, licenses, repos = 0, Counter(), Counter(), Counter()
    repo_license: dict[str, str] = {}
    for shard in shards:
        parquet = parquet_file(shard)  # one open, one footer read
        wanted = [c for c in ("lang", "license", "repo") if c in parquet.schema_arrow.names]
        table = parquet.read(columns=wanted)
        rows += table.num_rows
        for name, counter in (("lang", langs), ("license", licenses)):
            if name in wanted:
                counter.update(_value_counts(table.column(name)))
        if "repo" in wanted and "license" in wanted:
            # Nulls (OASST rows) are left out: they have no repository.
            grouped = table.group_by(["repo", "license"]).aggregate([("repo", "count")]).to_pylist()
            for group in grouped:
                if group["repo"] is not None:
                    repos[group["repo"]] += group["repo_count"]
                    repo_license.setdefault(group["repo"], group["license"] or "")
    return DataSummary(rows, dict(langs), dict(licenses),
                       {repo: (repo_license[repo], n) for repo, n in sorted(repos.items())})


def _value_counts(column: Any) -> dict[str, int]:
    import pyarrow.compute as pc

    counts = pc.value_counts(column).to_pylist()
    return {c["values"]: c["counts"] for c in counts if c["values"] is not None}


def size_category(rows: int) -> str:
    """The Hub's ``size_categories`` label for ``rows`` rows."""
    for bound, label in _SIZE_CATEGORIES:
        if rows < bound:
            return label
    return "n>1T"


def hub_license(licenses: Iterable[str]) -> str | list[str]:
    """The card's ``license`` value: one id, or a list when the rows carry several.

    CommitPack's license ids are lower-case SPDX ids, which is what the Hub's license list uses;
    rows without a recognised license make it ``unknown``.
    """
    ids = sorted({lic or "unknown" for lic in licenses}) or ["unknown"]
    return ids[0] if len(ids) == 1 else ids


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as a user would type it (``octoray mine … --out commits``)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "(unknown)"
    prog = Path(argv[0]).name
    if prog == "octoray" or Path(argv[0]).as_posix().endswith("octoray/cli.py"):
        prog = "octoray"  # the console script, or ``python -m octoray.cli``
    return shlex.join([prog, *argv[1:]])


# ---------------------------------------------------------------------------------------------
# The two cards


def mine_card(cfg: MineConfig, stats: Mapping[str, Any], summary: DataSummary, *, columns: Iterable[str],
              failed: Mapping[str, str]) -> str:
    """The card of a ``commits/`` directory written by ``octoray mine``."""
    funnel = [("commits seen", stats["commits_seen"], None)]
    left = stats["commits_seen"]
    for rule, dropped in stats["dropped"].items():
        left -= dropped
        funnel.append((rule, left, dropped))
    repos = ["| repository | source | license | commits seen | rows kept |", "|---|---|---|---:|---:|"]
    for name, repo in sorted(stats["repos"].items()):
        license_id = repo.get("license") or ("(error: " + repo["error"] + ")" if repo.get("error") else "none found")
        repos.append(f"| {_cell(name)} | {_cell(repo.get('source', ''))} | {_cell(license_id)} | "
                     f"{repo.get('commits_seen', 0):,} | {repo.get('kept', 0):,} |")
    body = [
        "CommitPack-style commits mined from git history: one row per commit that changed exactly one "
        "file in place, with the file before and after and the commit message, in CommitPack's columns.",
        _made_by("mine"),
        "## Funnel\n\nCommits left after each CommitPack rule, in the order applied "
        "(`stats.json` holds the same counts per repository).\n\n" + _funnel_table(funnel, "commits left"),
        "## Source repositories and licenses\n\n" + "\n".join(repos),
        ("Rows kept per repository are counted before commits shared by forks are deduplicated."
         + (f" Failed (retried by a rerun): {', '.join(f'{n} ({e})' for n, e in failed.items())}." if failed else "")),
    ]
    return _render("CommitPack-style commits (octoray mine)", ["code"], summary, columns, body, cfg)


def filter_card(cfg: FilterConfig, stats: Mapping[str, Any], summary: DataSummary, *, columns: Iterable[str],
                source: Mapping[str, Any]) -> str:
    """The card of an ``sft/`` directory written by ``octoray filter``."""
    off = {"token_length": not cfg.tokenizer_rule, "decontam": not cfg.decontam}  # rules switched off keep all
    funnel, previous = [], None
    for rule, left in stats["funnel"].items():
        name = "CommitPack rows" if rule == "input" else f"{rule} (off)" if off.get(rule) else rule
        funnel.append((name, left, None if previous is None else previous - left))
        previous = left
    repos = ["| repository | license | rows |", "|---|---|---:|"]
    repos += [f"| {_cell(name)} | {_cell(lic or 'none found')} | {n:,} |" for name, (lic, n) in summary.repos.items()]
    if stats.get("oasst_rows"):
        repos.append(f"| OASST rows from `{_cell(str(cfg.oasst_file))}` | not recorded | {stats['oasst_rows']:,} |")
    body = [
        "CommitPackFT-style instruction data: commits that pass the CommitPackFT rules of the OctoPack "
        f"paper, each rendered as a `prompt`/`completion` pair in the `{cfg.template}` template "
        f"(`source` = `commitpackft`; {_rows(stats.get('oasst_rows', 0))} from OASST with `source` = `oasst`).",
        _made_by("filter"),
        f"Input: the `octoray mine` output `{_cell(str(source.get('dir', '')))}` ({_rows(source.get('rows') or 0)}).",
        *_normalisation(stats),
        "## Funnel\n\nRows left after each CommitPackFT rule, in the order applied "
        "(`stats.json` also holds it per language).\n\n" + _funnel_table(funnel, "rows left"),
        "## Source repositories and licenses\n\n" + "\n".join(repos),
    ]
    return _render("CommitPackFT-style instruction data (octoray filter)", ["code", "en"], summary, columns, body, cfg)


# ---------------------------------------------------------------------------------------------
# Pieces


def _render(title: str, language: list[str], summary: DataSummary, columns: Iterable[str], body: list[str],
            cfg: MineConfig | FilterConfig) -> str:
    meta = {
        "pretty_name": title,
        "license": hub_license(summary.licenses) if summary.licenses else "unknown",
        "language": language,
        "size_categories": [size_category(summary.rows)],
        "task_categories": ["text-generation"],
        "tags": ["code", "commits", "octopack", "octoray"],
        "configs": [{"config_name": "default", "data_files": [{"split": SPLIT, "path": DATA_FILES_PATTERN}]}],
    }
    langs = sorted(summary.languages.items(), key=lambda kv: (-kv[1], kv[0]))
    lang_table = ["| language | rows |", "|---|---:|", *(f"| {_cell(lang)} | {n:,} |" for lang, n in langs)]
    column_table = ["| column | contents |", "|---|---|",
                    *(f"| `{c}` | {COLUMN_DOCS.get(c, '')} |" for c in columns)]
    parts = [
        f"# {title}",
        body[0],
        f"{_rows(summary.rows)} in one split, `{SPLIT}`: the Parquet shards `{DATA_GLOB}`. Open the folder as it is:",
        "```python\n"
        "import datasets, pandas\n"
        f'datasets.load_dataset("path/to/this/folder", split="{SPLIT}")   # or the Hub repo after uploading it\n'
        f'pandas.read_parquet("path/to/this/folder/{DATA_DIR}")\n'
        f"# duckdb: SELECT * FROM 'path/to/this/folder/{DATA_GLOB}'\n"
        "```",
        "`manifest.json`, `config.yaml`, `stats.json` and octoray's resume files sit beside `data/` "
        "and are not data. Upload the folder as it is: `hf upload USER/NAME path/to/this/folder "
        "--repo-type dataset` (`huggingface-cli upload --repo-type dataset …` with huggingface_hub < 1.0).",
        "## Columns\n\n" + "\n".join(column_table),
        "## Languages\n\n" + ("\n".join(lang_table) if langs else "No rows with a programming language."),
        *body[1:],
        "## Resolved config\n\n```yaml\n" + dump_yaml(cfg) + "```",
    ]
    header = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"
    return header + "\n" + "\n\n".join(part.strip("\n") for part in parts) + "\n"


def _rows(n: int) -> str:
    return f"{n:,} row{'' if n == 1 else 's'}"


def _made_by(stage: str) -> str:
    return ("## How it was made\n\n"
            f"Written by `octoray {stage}` (octoray {__version__}, the OctoPack recipe on Ray) with\n\n"
            f"```\n{command_line()}\n```\n\nand the resolved config at the end of this card (also in `config.yaml`).")


def _normalisation(stats: Mapping[str, Any]) -> list[str]:
    """The subject normalisation applied before the rules, when stats.json records one."""
    norm = stats.get("subject_normalisation")
    if not norm:
        return []
    return [f"Subjects were normalised before the rules (`pr_suffix={norm.get('pr_suffix')}`, "
            f"`emoji_prefix={norm.get('emoji_prefix')}`); that rescued {norm.get('rescued', 0):,} kept rows "
            "the paper's rules as published would drop."]


def _funnel_table(steps: list[tuple[str, int, int | None]], left_label: str) -> str:
    lines = [f"| step | {left_label} | dropped |", "|---|---:|---:|"]
    lines += [f"| {name} | {left:,} | {'' if dropped is None else f'{dropped:,}'} |" for name, left, dropped in steps]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")
