"""pass@k with the unbiased estimator of Chen et al. (2021), and the metrics table.

pass@k = E_problems[1 - C(n - c, k) / C(n, k)] for n samples of which c pass. The binomials
overflow floats for n in the hundreds, so :func:`pass_at_k` uses the product form
``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which needs no factorials.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

#: The k values octoray reports (the OctoPack paper reports pass@1; pass@10 needs n >= 10).
KS = (1, 10)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` correct (requires n >= k)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    result = 1.0
    for i in range(n - c + 1, n + 1):
        result *= 1.0 - k / i
    return 1.0 - result


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float | None:
    """Mean pass@k over problems given ``(n, c)`` per problem; None unless every n >= k."""
    if not counts or any(n < k for n, _ in counts):
        return None
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def cell_metrics(counts: Sequence[tuple[int, int]], ks: Iterable[int] = KS) -> dict[str, float | int | None]:
    """One task x language entry of metrics.json: pass@k for each k, n_problems, n_samples."""
    out: dict[str, float | int | None] = {f"pass@{k}": mean_pass_at_k(counts, k) for k in ks}
    out["n_problems"] = len(counts)
    out["n_samples"] = sum(n for n, _ in counts)
    return out


def format_table(metrics: Mapping[str, Mapping[str, Mapping[str, float | int | None]]],
                 ks: Iterable[int] = KS) -> str:
    """metrics.json as a markdown table: one row per task, one column per language and k, in %."""
    ks = tuple(ks)
    languages: list[str] = []
    for per_language in metrics.values():
        languages += [lang for lang in per_language if lang not in languages]
    header = ["task"] + [f"{lang} pass@{k}" for lang in languages for k in ks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, per_language in metrics.items():
        cells = [task]
        for lang in languages:
            for k in ks:
                value = per_language.get(lang, {}).get(f"pass@{k}")
                cells.append("-" if value is None else f"{100 * value:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
