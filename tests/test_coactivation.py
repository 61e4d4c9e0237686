"""Co-activation statistics: exact on hand-built routing, i.i.d. curve near MoESD's N(t), round trip."""
import json

import numpy as np
import pytest

from moetune.engine.coactivation import CoactivationStats, iid_unique_experts


def test_first_step_is_exact_and_later_steps_are_exponentially_weighted():
    s = CoactivationStats(num_layers=1, num_experts=4, top_k=2, alpha=0.5)
    s.observe([np.array([[0, 1], [0, 2], [1, -1]])])  # [T=3, K=2], -1 = no expert
    np.testing.assert_allclose(s.frequency[0], [2 / 3, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(np.diag(s.coactivation[0]), s.frequency[0])
    assert s.coactivation[0, 0, 1] == pytest.approx(1 / 3) and s.coactivation[0, 1, 0] == s.coactivation[0, 0, 1]
    assert s.coactivation[0, 1, 2] == 0
    s.observe([np.array([[3, 2]])])
    np.testing.assert_allclose(s.frequency[0], [1 / 3, 1 / 3, 2 / 3, 0.5])
    assert s.top_pairs(0, 1)[0][:2] == (2, 3)


def test_unique_curve_prefixes():
    s = CoactivationStats(num_layers=2, num_experts=8, top_k=2)
    s.observe([np.array([[0, 1], [0, 1], [2, 3]]), np.array([[0, 1], [2, 3], [4, 5]])])
    s.observe([np.array([[4, 5]]), np.array([[6, 7]])])
    t, observed, iid = s.unique_curve(layer=0)
    assert t.tolist() == [1, 2, 3]
    np.testing.assert_allclose(observed, [2, 2, 4])
    np.testing.assert_allclose(s.unique_curve(layer=1)[1], [2, 4, 6])
    np.testing.assert_allclose(iid, 8 * (1 - (1 - 2 / 8) ** np.array([1, 2, 3])))


def test_iid_routing_follows_moesd_prediction():
    rng = np.random.default_rng(0)
    E, K, T = 32, 4, 24
    s = CoactivationStats(num_layers=1, num_experts=E, top_k=K)
    for _ in range(200):
        s.observe([np.stack([rng.choice(E, K, replace=False) for _ in range(T)])])
    t, observed, iid = s.unique_curve()
    np.testing.assert_allclose(observed, iid, rtol=0.03)
    assert iid_unique_experts(10 ** 6, E, K) == pytest.approx(E)


def test_skewed_routing_is_concentrated():
    s = CoactivationStats(num_layers=1, num_experts=16, top_k=2)
    for _ in range(5):
        s.observe([np.array([[0, 1]] * 9 + [[7, 9]])])
    assert s.expected_slot_coverage(0, 2) == pytest.approx(0.9)
    assert s.unique_curve()[1][-1] < s.unique_curve()[2][-1]


def test_round_trip_through_json():
    s = CoactivationStats(num_layers=2, num_experts=6, top_k=2, alpha=0.2)
    s.observe([np.array([[0, 1], [2, 3]]), np.array([[4, 5], [0, 5]])])
    back = CoactivationStats.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back.steps == 1 and back.alpha == 0.2
    np.testing.assert_array_equal(back.coactivation, s.coactivation)
    np.testing.assert_array_equal(back.unique_curve(1)[1], s.unique_curve(1)[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        CoactivationStats(1, 4, 2, alpha=0.0)
    with pytest.raises(ValueError, match="top_k"):
        CoactivationStats(1, 4, 5)
    with pytest.raises(ValueError, match="2 layers"):
        CoactivationStats(1, 4, 2).observe([np.zeros((1, 2)), np.zeros((1, 2))])
