"""The unbiased pass@k estimator against the binomial definition."""

from __future__ import annotations

import math

import pytest

from octoray.evaluation.passk import cell_metrics, format_table, mean_pass_at_k, pass_at_k


def _exact(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 20, 37])
def test_matches_math_comb_for_every_c_and_k(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_exact(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_fraction_correct() -> None:
    assert pass_at_k(20, 7, 1) == pytest.approx(7 / 20)


def test_large_n_stays_finite_and_exact() -> None:
    # C(1000, 500) overflows a float; the product form does not.
    value = pass_at_k(1000, 3, 500)
    assert value == pytest.approx(float(1 - math.comb(997, 500) / math.comb(1000, 500)))
    assert 0.0 < value < 1.0


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 1, 10)


def test_mean_is_null_unless_every_problem_has_k_samples() -> None:
    assert mean_pass_at_k([(10, 1), (10, 0)], 10) == pytest.approx(0.5)
    assert mean_pass_at_k([(10, 1), (9, 0)], 10) is None
    assert mean_pass_at_k([], 1) is None


def test_cell_metrics_contract() -> None:
    cell = cell_metrics([(1, 1), (1, 0), (1, 1)])
    assert cell == {"pass@1": pytest.approx(2 / 3), "pass@10": None, "n_problems": 3, "n_samples": 3}
    table = format_table({"fix": {"python": cell}})
    assert "| fix | 66.7 | - |" in table
