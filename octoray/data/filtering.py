"""``octoray filter``: CommitPack rows (``commits/``) -> CommitPackFT instruction data (``sft/``).

Pipeline (Ray Data, streaming; rules in :mod:`octoray.data.rules`):

1. *Read* every pending input shard with ``include_paths`` so each row knows its shard.
2. *Rules 1-7* (tasks): the subject is normalised (``pr_suffix``/``emoji_prefix``,
   :mod:`octoray.data.subjects`), then vectorised Arrow predicates; each row gets ``_drop``, the
   number of the first rule it fails (0 = kept). Dropped rows lose their big columns but keep
   flowing, so the driver can count the funnel and knows when a shard is whole.
3. *Rules 8-10 + decontamination* (an actor pool): the tokenizer and the HumanEvalPack n-gram
   index load once per actor; only rows still alive are tokenized. Kept rows whose subject was
   normalised get ``_rescued`` when the paper's rules would drop their raw subject.
4. *Write* (driver): when all rows of input shard i of n have come back, its kept rows get their
   ``prompt``/``completion`` and are written atomically as ``OUT/data/train-i-of-N.parquet`` (a
   Hub-style dataset folder, :mod:`octoray.storage.layout`; N = n, plus one for the OASST shard), with the
   shard's funnel in ``OUT/_funnel/<input shard name>.json``; a rerun skips shards that have both.
   OASST rows (``oasst_file``) become the last shard. ``stats.json``, the ``README.md`` dataset
   card and, last, ``manifest.json``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

from octoray.config import to_dict
from octoray.data import dataset_card, rules, subjects
from octoray.data.filter_config import FilterConfig
from octoray.errors import UserError
from octoray.modeling import ANSWER, COMMIT_AFTER, COMMIT_BEFORE, COMMIT_MSG, QUESTION, octocoder_prompt
from octoray.progress import progress_bar
from octoray.resumable import StageRun
from octoray.storage import layout
from octoray.storage.layout import MANIFEST
from octoray.storage.locations import Location, display, fs_path, location, rmtree
from octoray.storage.stage_dirs import (RESOLVED_CONFIG, STATS, atomic_write_json, atomic_write_text, iter_jsonl,
                                        parquet_file, require_stage_output, stage_listing, write_parquet_atomic,
                                        write_resolved_config)

STAGE = "filter"
FUNNEL_DIR = "_funnel"  # resume sidecars, outside data/ (and "_": Parquet dataset readers skip it)
#: Keys of the funnel in stats.json: rows left after each rule, in order.
FUNNEL_KEYS = ("input", *rules.RULES)
#: Columns dropped rows keep (the rest are nulled before they travel back to the driver).
_SKINNY = ("path", "lang", "_drop")
#: Helper columns the stages add: the subject before normalisation (null when unchanged), and
#: whether a kept row was rescued by the normalisation (the paper's rules would drop it).
_SUBJECT_WAS, _RESCUED = "_subject_was", "_rescued"
#: Config fields that change speed, not results: they may differ when resuming.
_RUNTIME_ONLY = {"actors", "batch_size", "tokenizer_batch_size", "progress", "commits", "out"}


#: The command line (octoray.stage_cli): ``octoray filter COMMITS_DIR --out sft/``.
CONFIG = FilterConfig
INPUT = "commits"


# ---------------------------------------------------------------------------------------------
# The stage


def run(cfg: FilterConfig) -> Location:
    """Filter ``cfg.commits`` into ``cfg.out``; returns the output directory."""
    in_dir, out = location(cfg.commits), location(cfg.out)
    in_manifest = require_stage_output(in_dir, "mine", "commits")
    if display(out) == display(in_dir):
        raise UserError("--out must differ from the input directory (the filter would overwrite its input)")
    shards = _input_shards(in_dir, in_manifest)
    expected = {path.name: _num_rows(path) for path in shards}
    if sum(expected.values()) == 0:
        raise UserError(f"{in_dir} holds no commits: nothing to filter")
    # The input is its content fingerprint (octoray.storage.fingerprint): a re-mined input with
    # other rows makes a finished output stale; one mined again to the same bytes does not.
    source = {"dir": display(in_dir.resolve()), "rows": in_manifest.get("rows"), "fingerprint": in_manifest.get("fingerprint")}
    stage = StageRun(STAGE, out, cfg, inputs={"commits": source})
    if stage.reusable(same=lambda previous: _config_change(previous.get("config", {}), to_dict(cfg))):
        return out

    # Everything a worker would choke on is checked here first, as one-line errors.
    tables = rules.load_tables(cfg.verbs_file, cfg.bad_subjects_file)
    from octoray.data.languages import language_table

    lang_table = language_table(cfg.languages_file)
    oasst = _read_oasst(location(cfg.oasst_file), cfg.oasst_limit) if cfg.oasst_file else None
    if cfg.tokenizer_rule:
        from octoray.modeling import load_tokenizer

        load_tokenizer(cfg.model)
    if cfg.decontam:
        _check_problems(cfg)

    stage.start(write_config=False)  # _prepare_out writes it, once the old output is judged
    _prepare_out(out, cfg, source)
    # Output shard i of N for input shard i (N counts the OASST shard too): fixed by the input and
    # the config, so a resumed run names every shard as the first attempt did.
    count = len(shards) + (oasst is not None)
    out_names = {path.name: layout.shard_name(i, count) for i, path in enumerate(shards)}
    done = {name for name in expected if _shard_done(out, name, out_names[name])}
    pending = [path for path in shards if path.name not in done]
    schema = _output_schema(shards[0])
    if pending:
        _filter_shards(cfg, pending, expected, out_names, out, schema, tables, lang_table)
    files = list(out_names.values())
    if oasst is not None:
        files.append(layout.shard_name(len(shards), count))
        if not (out / files[-1]).is_file():  # written once; a resumed run keeps it
            write_parquet_atomic(_oasst_table(oasst, schema), out / files[-1])
    stats = _aggregate(out, list(expected), len(oasst or ()), cfg)
    atomic_write_json(out / STATS, stats)
    card = dataset_card.filter_card(cfg, stats, dataset_card.summarize(out / f for f in files),
                                    columns=schema.names, source=source)
    atomic_write_text(out / layout.CARD, card)
    manifest = stage.finish(rows=stats["rows"], files=files,
                            extra={"tables": tables.source, "languages": cfg.languages_file or "linguist (go-enry)"})
    _print_summary(stage, stats, manifest["seconds"])
    return out


def _config_change(before: dict[str, Any], now: dict[str, Any]) -> "bool | str":
    """True when the keys that decide the rows are the same, else which changed (the stale reason)."""
    before, now = _result_config(before), _result_config(now)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    return f"the filter config changed: {', '.join(changed)}" if changed else True


def _input_shards(in_dir: Location, manifest: dict[str, Any]) -> list[Location]:
    """The mine output's shards, in either layout (``data/train-*`` or octoray 0.1's flat one)."""
    shards = [in_dir / name for name in layout.data_files(manifest, stage_listing(in_dir))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise UserError(f"{in_dir} lacks shards its manifest lists ({', '.join(missing[:3])}): rerun 'octoray mine'")
    if not shards:
        raise UserError(f"{in_dir} holds no Parquet shards: nothing to filter")
    return shards


def _num_rows(path: Location) -> int:
    try:
        return parquet_file(path).metadata.num_rows
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a torn file
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _result_config(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _RUNTIME_ONLY}


def _prepare_out(out: Location, cfg: FilterConfig, source: dict[str, Any]) -> None:
    """Resume an output begun with the same rules on the same input; otherwise start it over.

    An output in octoray 0.1's flat layout (shards beside manifest.json) is started over too: its
    shards are named differently, and the new ones go under data/.
    """
    import yaml

    previous, marker = out / RESOLVED_CONFIG, out / FUNNEL_DIR / "_input.json"
    if previous.is_file() or marker.is_file():
        try:
            old = yaml.safe_load(previous.read_text(encoding="utf-8")) or {}
            old_source = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, json.JSONDecodeError):
            old, old_source = {}, {}
        listing = stage_listing(out)
        legacy = any(layout.is_legacy_data_file(name) for name in listing)
        if _result_config(old) != _result_config(to_dict(cfg)) or old_source != source or legacy:
            why = "in octoray 0.1's layout" if legacy else "from another input or config"
            print(f"octoray {STAGE}: {out} was written {why}; starting over", file=sys.stderr)
            (out / MANIFEST).unlink(missing_ok=True)
            (out / layout.CARD).unlink(missing_ok=True)
            rmtree(out / FUNNEL_DIR)
            for stale in layout.all_shards(listing):
                (out / stale).unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_config(out, cfg)
    atomic_write_json(marker, source)


def _shard_done(out: Location, name: str, out_name: str) -> bool:
    """Input shard ``name`` is filtered when its sidecar (written after its output shard) is whole."""
    sidecar = out / FUNNEL_DIR / f"{name}.json"
    if not sidecar.is_file():
        return False
    try:
        json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return False
    return (out / out_name).is_file()


def _output_schema(first_shard: Location) -> Any:
    import pyarrow as pa

    schema = parquet_file(first_shard).schema_arrow
    schema = pa.schema([f for f in schema if f.name not in ("prompt", "completion", "source")])
    for name in ("prompt", "completion", "source"):
        schema = schema.append(pa.field(name, pa.string()))
    return schema.remove_metadata()


# ---------------------------------------------------------------------------------------------
# Ray Data


def _filter_shards(cfg: FilterConfig, pending: list[Location], expected: dict[str, int], out_names: dict[str, str],
                   out: Location, schema: Any, tables: rules.Tables, lang_table: Any) -> None:
    """Run the pending shards through Ray Data and write each one as soon as it is whole."""
    from octoray.cluster.connection import ensure_ray
    from octoray.cluster.resources import require_feasible

    ray = ensure_ray()  # quiet Ray Data: our bar counts rows, Ray's counts blocks per operator
    require_feasible("filter", [{"CPU": 1}], what="tasks of 1 CPU")
    filesystem, _ = fs_path(pending[0])
    ds = ray.data.read_parquet([fs_path(p)[1] for p in pending], include_paths=True, filesystem=filesystem)
    ds = ds.map_batches(_first_rules, batch_format="pyarrow", batch_size=cfg.batch_size,
                        fn_kwargs={"extensions_for": lang_table.extensions_for, "pr_suffix": cfg.pr_suffix,
                                   "emoji_prefix": cfg.emoji_prefix})
    ds = ds.map_batches(
        _LaterRules, batch_format="pyarrow", batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.actors),
        fn_constructor_kwargs={"cfg": cfg, "tables": tables},
    )

    seen: Counter = Counter()
    kept: dict[str, list[Any]] = defaultdict(list)
    codes: dict[str, Counter] = defaultdict(Counter)  # shard -> (lang, code) -> rows
    rescued: dict[str, Counter] = defaultdict(Counter)  # shard -> lang -> kept rows rescued
    remaining = {p.name for p in pending}
    bar = progress_bar(sum(expected[p.name] for p in pending), desc="filtering", unit="row", enabled=cfg.progress)
    for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        names = [Path(p).name for p in block.column("path").to_pylist()]
        for name, lang, code, saved in zip(names, block.column("lang").to_pylist(), block.column("_drop").to_pylist(),
                                           block.column(_RESCUED).to_pylist()):
            codes[name][(lang, code)] += 1
            seen[name] += 1
            if saved:
                rescued[name][lang or ""] += 1
        _collect_kept(block, names, kept)
        bar.update(block.num_rows)
        for name in [n for n in remaining if seen[n] == expected[n]]:
            _write_shard(out, name, out_names[name], kept.pop(name, []), codes.pop(name), expected[name], schema,
                         cfg.template, rescued.pop(name, Counter()))
            remaining.discard(name)
    bar.close()
    if remaining:
        raise RuntimeError(f"octoray bug: rows of {sorted(remaining)} never came back from the pipeline")


def _first_rules(batch: Any, extensions_for: Any, pr_suffix: str = "keep", emoji_prefix: str = "keep") -> Any:
    """Rules 1-7 on one batch, after the subject normalisation (``strip``/``keep``): adds ``_drop``,
    ``_subject_was`` and the normalised, cleaned ``subject``; slims dropped rows."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    raw = batch.column("subject")
    subject = subjects.normalise(raw, pr_suffix == "strip", emoji_prefix == "strip")
    # Kept for the rescued count (later stage); null where the normalisation changed nothing.
    was = pc.if_else(pc.fill_null(pc.not_equal(raw, subject), False), raw, pa.scalar(None, pa.string()))
    cleaned = rules.clean_subject(subject)
    masks = [
        ("content", lambda: rules.rule_content(batch.column("old_contents"), batch.column("new_contents"))),
        ("no_hash", lambda: rules.rule_no_hash(subject)),
        ("extension", lambda: rules.rule_extension(batch.column("new_file"), batch.column("lang"), extensions_for)),
        ("no_file_name", lambda: rules.rule_no_file_name(batch.column("new_file"), subject)),
        ("subject_length", lambda: rules.rule_subject_length(subject)),
        ("clean_subject", lambda: rules.rule_subject_length(cleaned)),
        ("capitalized", lambda: rules.rule_capitalized(cleaned)),
    ]
    drop = _apply(pa.array(np.zeros(batch.num_rows, dtype=np.int8)), masks)
    batch = batch.set_column(batch.schema.get_field_index("subject"), "subject", cleaned)
    return _slim(batch.append_column("_drop", drop).append_column(_SUBJECT_WAS, was))


def _apply(drop: Any, masks: Iterable[tuple[str, Any]]) -> Any:
    """Set ``drop`` to the rule's code where a still-alive row fails it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name, mask in masks:
        alive = pc.equal(drop, 0)
        if not pc.any(alive).as_py():
            break
        drop = pc.if_else(pc.and_(alive, pc.invert(mask())), pa.scalar(rules.CODE[name], pa.int8()), drop)
    return drop


def _slim(batch: Any) -> Any:
    """Null the columns of dropped rows the driver does not need (they are only counted)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    alive = pc.equal(batch.column("_drop"), 0)
    n_alive = pc.sum(alive).as_py() or 0
    if n_alive == batch.num_rows:
        return batch
    live, dead = batch.filter(alive), batch.filter(pc.invert(alive))
    dead = pa.table({f.name: dead.column(f.name) if f.name in _SKINNY else pa.nulls(dead.num_rows, f.type)
                     for f in batch.schema}, schema=batch.schema)
    return pa.concat_tables([live, dead])


class _LaterRules:
    """Rules 8-10 and decontamination, in an actor: the tokenizer and n-gram index load once."""

    def __init__(self, cfg: FilterConfig, tables: rules.Tables) -> None:
        self.cfg, self.tables = cfg, tables
        # Built here rather than shipped from the driver: ~100k n-grams are cheaper to rebuild
        # than to pass through the object store as constructor arguments.
        self.index = _decontam_index(cfg) if cfg.decontam else None
        self.tokenizer = None
        if cfg.tokenizer_rule:
            from octoray.modeling import load_tokenizer

            self.tokenizer = load_tokenizer(cfg.model)
            self.eos = self.tokenizer.eos_token or ""

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        alive = pc.equal(batch.column("_drop"), 0)
        if not pc.any(alive).as_py():
            return batch.append_column(_RESCUED, pa.nulls(batch.num_rows, pa.bool_()))
        live, dead = batch.filter(alive), batch.filter(pc.invert(alive))
        subject = live.column("subject")
        masks = []
        if self.tokenizer is not None:
            masks.append(("token_length", lambda: rules.token_length_ok(
                self._token_lengths(live), self.cfg.min_tokens, self.cfg.max_tokens)))
        masks += [
            ("imperative", lambda: rules.rule_imperative(subject, self.tables)),
            ("second_pass", lambda: rules.rule_second_pass(subject, live.column("commit"), self.cfg.seed)),
        ]
        if self.index is not None:
            masks.append(("decontam", lambda: rules.rule_decontam(
                live.column("old_contents"), live.column("new_contents"), self.index, self.cfg.decontam_threshold)))
        drop = _apply(live.column("_drop"), masks)
        live = live.set_column(live.schema.get_field_index("_drop"), "_drop", drop)
        live = live.set_column(live.schema.get_field_index("subject"), "subject", rules.second_pass_subject(subject))
        live = live.append_column(_RESCUED, self._rescued(live))
        dead = dead.append_column(_RESCUED, pa.nulls(dead.num_rows, pa.bool_()))
        return _slim(pa.concat_tables([live, dead]))

    def _rescued(self, live: Any) -> Any:
        """Kept rows with a normalised subject that the paper's rules would drop on the raw one.

        Only the subject differs between the two decisions, so only the subject rules are rerun,
        and only on the (few) kept rows whose subject the normalisation changed.
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        candidate = pc.and_(pc.equal(live.column("_drop"), 0), pc.is_valid(live.column(_SUBJECT_WAS)))
        if not pc.any(candidate).as_py():
            return pa.array([False] * live.num_rows, pa.bool_())
        rows = live.filter(candidate)
        raw_keep = iter(rules.subject_rules_keep(rows.column(_SUBJECT_WAS), rows.column("new_file"),
                                                 rows.column("commit"), self.tables, self.cfg.seed).to_pylist())
        return pa.array([bool(c) and not next(raw_keep) for c in candidate.to_pylist()], pa.bool_())

    def _token_lengths(self, live: Any) -> list[int]:
        """Token counts of ``old + eos + new`` (no special tokens added, as for StarCoder)."""
        texts = [f"{o}{self.eos}{n}" for o, n in zip(live.column("old_contents").to_pylist(),
                                                     live.column("new_contents").to_pylist())]
        lengths: list[int] = []
        step = self.cfg.tokenizer_batch_size
        for start in range(0, len(texts), step):
            ids = self.tokenizer(texts[start:start + step], add_special_tokens=False,
                                 return_attention_mask=False)["input_ids"]
            lengths.extend(len(x) for x in ids)
        return lengths


# ---------------------------------------------------------------------------------------------
# Writing


def _collect_kept(block: Any, names: list[str], kept: dict[str, list[Any]]) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    alive = pc.equal(block.column("_drop"), 0)
    if not pc.any(alive).as_py():
        return
    live = block.filter(alive)
    live_names = pc.filter(pa.array(names), alive).to_pylist()
    for name in set(live_names):
        kept[name].append(live.filter(pc.equal(pa.array(live_names), name)))


def _write_shard(out: Location, name: str, out_name: str, parts: list[Any], codes: Counter, n_input: int, schema: Any,
                 template: str, rescued: Counter) -> None:
    """Write one input shard's kept rows as ``out_name`` and then its funnel sidecar (``rescued``:
    kept rows per language that only the subject normalisation saved).

    A shard that keeps no rows is still written (empty, with the schema): shard i of N must exist
    for every i, as the Hub's naming promises.
    """
    import pyarrow as pa

    rows = sum(t.num_rows for t in parts)
    if rows:
        table = pa.concat_tables(parts).drop_columns(["path", "_drop"]).sort_by("commit")
        table = add_prompts(table, template).select(schema.names).cast(schema)
    else:
        table = schema.empty_table()
    write_parquet_atomic(table, out / out_name)
    funnel, by_lang = _funnel(codes, n_input)
    atomic_write_json(out / FUNNEL_DIR / f"{name}.json",
                      {"file": out_name, "rows": rows, "funnel": funnel, "funnel_by_language": by_lang,
                       "rescued_by_language": dict(sorted(rescued.items()))})


def add_prompts(table: Any, template: str) -> Any:
    """Add ``prompt``, ``completion`` (the OctoCoder or commit-tag template) and ``source``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    subject, old, new = table.column("subject"), table.column("old_contents"), table.column("new_contents")
    if template == "octocoder":
        prompt = pc.binary_join_element_wise(QUESTION, subject, "\n", old, ANSWER, "")
    else:
        prompt = pc.binary_join_element_wise(COMMIT_BEFORE, old, COMMIT_MSG, subject,
                                             COMMIT_AFTER, "")
    table = table.append_column("prompt", pc.cast(prompt, pa.string()))
    table = table.append_column("completion", pc.cast(new, pa.string()))
    return table.append_column("source", pa.array(["commitpackft"] * table.num_rows, pa.string()))


def _funnel(codes: Counter, n_input: int) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Rows left after each rule, overall and per language, from first-failing-rule counts."""
    def left(counter: dict[int, int], total: int) -> dict[str, int]:
        funnel, remaining = {"input": total}, total
        for name in rules.RULES:
            remaining -= counter.get(rules.CODE[name], 0)
            funnel[name] = remaining
        return funnel

    per_lang: dict[str, Counter] = defaultdict(Counter)
    for (lang, code), count in codes.items():
        per_lang[lang or ""][code] += count
    overall: Counter = Counter()
    for counter in per_lang.values():
        overall.update(counter)
    return left(overall, n_input), {lang: left(c, sum(c.values())) for lang, c in sorted(per_lang.items())}


def _aggregate(out: Location, names: list[str], oasst_rows: int, cfg: FilterConfig) -> dict[str, Any]:
    """Sum the per-shard funnels (and rescued counts) into stats.json."""
    funnel: Counter = Counter()
    by_lang: dict[str, Counter] = defaultdict(Counter)
    rescued: Counter = Counter()
    for name in names:
        shard = json.loads((out / FUNNEL_DIR / f"{name}.json").read_text(encoding="utf-8"))
        funnel.update(shard["funnel"])
        for lang, counts in shard["funnel_by_language"].items():
            by_lang[lang].update(counts)
        rescued.update(shard.get("rescued_by_language", {}))
    order = lambda c: {k: c.get(k, 0) for k in FUNNEL_KEYS}  # noqa: E731 - keep rule order
    commits = funnel.get(rules.RULES[-1], 0)
    normalisation = {"pr_suffix": cfg.pr_suffix, "emoji_prefix": cfg.emoji_prefix, "rescued": sum(rescued.values()),
                     "rescued_by_language": dict(sorted(rescued.items()))}
    return {"funnel": order(funnel), "funnel_by_language": {lang: order(c) for lang, c in sorted(by_lang.items())},
            "subject_normalisation": normalisation,
            "commitpackft_rows": commits, "oasst_rows": oasst_rows, "rows": commits + oasst_rows}


# ---------------------------------------------------------------------------------------------
# Decontamination index, OASST rows


def _check_problems(cfg: FilterConfig) -> None:
    """Load the HumanEvalPack problems once in the driver, so a bad path fails as one line."""
    from octoray.evaluation.humanevalpack import load_problems

    for language in cfg.decontam_languages:
        load_problems(language, cfg.humanevalpack_dir)


def _decontam_index(cfg: FilterConfig) -> rules.NgramIndex:
    """N-grams of every HumanEvalPack problem: prompt + canonical solution, declaration + buggy one."""
    from octoray.evaluation.humanevalpack import load_problems

    texts = []
    for language in cfg.decontam_languages:
        for problem in load_problems(language, cfg.humanevalpack_dir):
            texts.append((problem["task_id"], f"{problem['prompt']}\n{problem['canonical_solution']}\n"
                                              f"{problem['declaration']}\n{problem['buggy_solution']}"))
    return rules.build_ngram_index(texts, cfg.decontam_ngram)


def _read_oasst(path: Location, limit: int | None) -> list[tuple[str, str]]:
    """``(input, output)`` pairs of a JSONL file, with a one-line error naming the bad line."""
    if not path.is_file():
        raise UserError(f"oasst_file not found: {path}")
    pairs: list[tuple[str, str]] = []
    for where, row in iter_jsonl(path):
        if limit is not None and len(pairs) >= limit:
            break
        if not (isinstance(row, dict) and isinstance(row.get("input"), str) and isinstance(row.get("output"), str)):
            raise UserError(f"{where}: expected an object with string fields 'input' and 'output'")
        pairs.append((row["input"], row["output"]))
    return pairs


def _oasst_table(pairs: list[tuple[str, str]], schema: Any) -> Any:
    import pyarrow as pa

    n = len(pairs)
    columns = {f.name: pa.nulls(n, f.type) for f in schema}
    columns["prompt"] = pa.array([octocoder_prompt(q) for q, _ in pairs], pa.string())
    columns["completion"] = pa.array([a for _, a in pairs], pa.string())
    columns["source"] = pa.array(["oasst"] * n, pa.string())
    return pa.table(columns, schema=schema)


# ---------------------------------------------------------------------------------------------
# Reporting


def _print_summary(stage: StageRun, stats: dict[str, Any], seconds: float) -> None:
    funnel = stats["funnel"]
    print()
    stage.say(f"filtered {funnel['input']:,} commits in {seconds:.1f} s -> {stage.out}")
    print(f"  {'rule':<16}{'rows left':>11}{'dropped':>10}")
    previous = funnel["input"]
    for key in FUNNEL_KEYS:
        print(f"  {key:<16}{funnel[key]:>11,}{previous - funnel[key] if key != 'input' else 0:>10,}")
        previous = funnel[key]
    langs = sorted(stats["funnel_by_language"].items(), key=lambda kv: -kv[1][rules.RULES[-1]])[:8]
    if langs:
        print("  kept per language: " + ", ".join(f"{lang or '?'} {c[rules.RULES[-1]]:,}" for lang, c in langs))
    norm = stats["subject_normalisation"]
    if "strip" in (norm["pr_suffix"], norm["emoji_prefix"]):
        print(f"  rescued by subject normalisation (pr_suffix={norm['pr_suffix']}, "
              f"emoji_prefix={norm['emoji_prefix']}): {norm['rescued']:,} of the kept rows")
    if stats["oasst_rows"]:
        print(f"  + {stats['oasst_rows']:,} OASST rows")
    print(f"  rows written {stats['rows']:,}")
