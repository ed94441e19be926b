"""Drift statistics (deepspark/drift.py) against values computed by hand, and the tests'
behaviour on samples with and without a shift."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepspark.drift import jensen_shannon, mmd_test, normed_wasserstein, psi, reference_edges, shares


def test_psi_of_two_known_distributions():
    # (0.9 - 0.5) ln(0.9/0.5) + (0.1 - 0.5) ln(0.1/0.5) = 0.2351 + 0.6438
    assert psi(np.array([0.5, 0.5]), np.array([0.9, 0.1])) == pytest.approx(0.8789, abs=1e-3)
    assert psi(np.array([0.2, 0.3, 0.5]), np.array([0.2, 0.3, 0.5])) == 0.0


def test_an_empty_bin_costs_but_does_not_explode():
    value = psi(np.array([0.5, 0.5, 0.0]), np.array([0.4, 0.4, 0.2]))
    assert 0.5 < value < 3.0 and math.isfinite(value)


def test_jensen_shannon_distance_is_0_for_equal_and_1_for_disjoint_distributions():
    assert jensen_shannon(np.array([0.25, 0.75]), np.array([0.25, 0.75])) == pytest.approx(0.0, abs=1e-6)
    assert jensen_shannon(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0, abs=1e-3)
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4); JS = 1/2 KL(p||m) + 1/2 KL(q||m) in bits
    p_m = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    q_m = math.log2(1 / 0.75)
    assert jensen_shannon(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(
        math.sqrt(0.5 * p_m + 0.5 * q_m), abs=1e-3)


def test_normed_wasserstein_measures_a_shift_in_reference_standard_deviations():
    reference = np.array([0.0, 2.0])  # standard deviation 1
    assert normed_wasserstein(reference, reference + 0.5) == pytest.approx(0.5)
    assert normed_wasserstein(np.array([3.0, 3.0]), np.array([4.0, 4.0])) == pytest.approx(1.0)  # constant: own units


def test_reference_bins_hold_equal_shares_and_catch_values_outside_the_reference():
    values = np.arange(1000.0)
    edges = reference_edges(values, 10)
    assert len(edges) == 11 and np.isinf(edges[0]) and np.isinf(edges[-1])
    assert np.allclose(shares(values, edges), 0.1, atol=0.002)
    outside = shares(np.array([-5.0, 5000.0]), edges)
    assert outside[0] == 0.5 and outside[-1] == 0.5


def test_mmd_flags_a_shifted_sample_and_not_a_second_sample_of_the_same_distribution():
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(100, 8))
    same = rng.normal(size=(100, 8))
    shifted = rng.normal(size=(100, 8)) + np.array([0.8] + [0.0] * 7)
    assert mmd_test(reference, shifted).p_value < 0.01
    assert mmd_test(reference, same).p_value > 0.05
    with pytest.raises(ValueError, match="at least 2 vectors"):
        mmd_test(reference, same[:1])
