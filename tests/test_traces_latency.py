"""Latency model: fit recovers known coefficients, states its error, and round-trips through JSON."""
import numpy as np
import pytest

from moetune.step import ModelShape
from moetune.traces.latency import LatencyModel

SHAPE = ModelShape(num_layers=4, num_experts=16, top_k=2)


def test_fit_recovers_known_model(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 64, 60)
    unique = rng.integers(8, 64, 60)
    context = rng.integers(16, 2048, 60)
    truth = (2e-3, 1e-5, 4e-5, 1e-7, 0.0)
    seconds = LatencyModel(verify=truth).verify_time(tokens, unique, context) * rng.normal(1, 0.01, 60)
    model = LatencyModel.fit(tokens, unique, context, seconds, draft={"ngram": (1e-4, 0.0, 0.0)}, num_layers=4)
    assert model.error["n"] == 60 and model.error["mape"] < 0.02 and model.error["cv_mape"] < 0.03
    assert model.verify[0] == pytest.approx(2e-3, rel=0.05) and model.verify[2] == pytest.approx(4e-5, rel=0.1)
    back = LatencyModel.from_json(model.to_json(tmp_path / "p.json"))
    assert back == model and LatencyModel.from_json(str(tmp_path / "p.json")) == model


def test_plain_time_and_validation():
    m = LatencyModel.analytic(SHAPE)
    assert m.plain_time(SHAPE, 100) == pytest.approx(m.verify_time(1, 8, 100) + m.step_overhead)
    assert m.verify_time(8, 30, 100) > m.verify_time(8, 10, 100)  # more unique experts cost more
    with pytest.raises(ValueError, match="non-negative"):
        LatencyModel(verify=(1.0, -1.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="not a latency profile"):
        LatencyModel.from_json('{"nothing": 1}')
    with pytest.raises(ValueError, match="at least 5"):
        LatencyModel.fit([1], [1], [1], [1.0])


def test_one_feature_definition_for_the_profile_and_the_online_fit():
    """LatencyModel's written-out times are the shared features' dot product, and the controller's online
    fit, seeded from a profile (per token) and asked in tokens, predicts the profile's step times."""
    from moetune.adaptive.latency import OnlineLatency
    from moetune.features import draft_features, verify_features

    profile = LatencyModel(verify=(2e-3, 1e-5, 4e-5, 1e-7, 3e-9), draft={"ngram": (1e-4, 2e-5, 3e-6)},
                           step_overhead=5e-5)
    tokens, unique, context = np.array([1, 5, 17]), np.array([8, 40, 90]), np.array([10, 900, 3500])
    assert np.allclose(profile.verify_time(tokens, unique, context),
                       verify_features(tokens, unique, context) @ profile.verify, rtol=1e-12)
    assert np.allclose(profile.draft_time("ngram", tokens, unique),
                       draft_features(tokens, unique) @ profile.draft["ngram"], rtol=1e-12)
    online = OnlineLatency(("ngram",))
    online.seed(profile)
    assert np.allclose(online.predict_verify(tokens, unique, context), profile.verify_time(tokens, unique, context),
                       rtol=1e-12)
    assert online.overhead.value == profile.step_overhead
    assert np.allclose(online.predict_draft("ngram", draft_features(tokens, unique)),
                       profile.draft_time("ngram", tokens, unique), rtol=1e-12)
