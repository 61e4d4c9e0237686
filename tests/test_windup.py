"""Long runs of one policy object (issue 11.1): the online estimators stay bounded, the speedup holds.

Why: one `auto` policy serving many requests used to wind up. Its latency fit's covariance grew by
1/forgetting per step in directions the data never varies (n-gram chains: depth == nodes), lost positive
definiteness near 7,000 steps, turned NaN near 11,700 (every later request ran plain) and raised
LinAlgError near 22,000. Replay reproduces that in seconds, so the long test is a replay of the sample
traces through one policy object; a shorter live test on the embedded model is marked slow.
"""
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS_DIR
from moetune.adaptive.acceptance import AcceptanceModel
from moetune.adaptive.experts import ExpertModel
from moetune.adaptive.fidelity import FidelityModel
from moetune.adaptive.health import EstimatorReset
from moetune.adaptive.latency import OnlineLatency
from moetune.adaptive.yields import DraftYield, YieldConfig
from moetune.policies.registry import make_policy
from moetune.step import PLAIN, ModelShape
from moetune.traces.latency import fit_trace
from moetune.traces.reader import read_trace
from moetune.traces.replay import replay

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "traces" / "samples").glob("*.trace"))
WINDOW = 5_000  # replayed steps per speedup window
LIVE_WINDOW = 600  # live steps per speedup window
FIRST = 2  # windows whose mean speedup is the reference


def windows(steps, time_s, plain_s, size):
    """Plain time / time per window of `size` steps (arrays [requests]; a request belongs to the window
    it starts in); a last window under half full is left out."""
    window = (np.cumsum(steps) - steps).astype(int) // size
    speedup = np.bincount(window, plain_s) / np.bincount(window, time_s)
    return speedup[np.bincount(window, steps) >= size / 2]


def fits(controller):
    """Every latency coefficient vector of a controller (verify, then one per drafter)."""
    return [controller.latency.verify.theta, *(f.theta for f in controller.latency.draft.values())]


def estimators(controller):
    """Every estimator of a controller that keeps a count of health resets."""
    c = controller
    return [c.acceptance, c.yields, c.experts, c.fidelity, c.fidelity.weights, c.latency.verify,
            *c.latency.draft.values()]


def test_latency_fit_stays_bounded_when_a_direction_never_varies():
    """n-gram chains: depth == nodes on every step, so only their sum's coefficient is identified; the
    rest must stay where the prior puts it instead of winding up (it overflowed within 12,000 steps)."""
    lat = OnlineLatency(("ngram",))
    rng = np.random.default_rng(0)
    fit = lat.draft["ngram"]
    prior, prior_std = fit.prior.copy(), lat.config.prior_scale * fit.prior
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(50_000):
            d = int(rng.integers(0, 9))
            lat.observe("ngram", d + 1, 24.0 + 3 * d, 500, 3e-3 + 2e-4 * d + rng.normal(0, 1e-4), depth=d, nodes=d,
                        t_draft=5e-5 + 1e-6 * d + rng.normal(0, 5e-6))
            if step % 64 == 63:
                lat.flush()
        pred = lat.predict_draft("ngram", np.array([[1.0, 0, 0], [1.0, 8, 8]]))
    assert np.all(np.isfinite(fit.theta)) and np.all(np.isfinite(lat.verify.theta))
    assert np.all(np.abs(fit.theta - prior) < 3 * prior_std)  # unexcited: within the prior's range
    assert pred == pytest.approx([5e-5, 5.8e-5], rel=0.1)  # excited: the data's
    x_max = np.array([1.0, 8.0, 8.0])  # the largest draft features observed: statistics stay bounded
    assert np.all(np.abs(fit.A) <= np.outer(x_max, x_max) / (1 - fit.forgetting))
    assert fit.resets == 0 and lat.verify.resets == 0


def replay_steps(policy, traces, latency, steps):
    """The traces' requests replayed in turn through one policy object until `steps` steps have run:
    arrays [requests] of steps, modelled time and plain decoding's time."""
    rows, total = [], 0
    while total < steps:
        for trace in traces:
            for r in replay(trace, policy, latency).requests:
                rows.append((r.steps, r.time_s, r.plain_time_s))
                total += r.steps
    return np.array(rows).T


@pytest.fixture(scope="module")
def samples():
    traces = [read_trace(p) for p in SAMPLES]
    return traces, fit_trace(traces[0])


def test_auto_replays_100k_steps_of_one_policy_without_winding_up(samples):
    traces, latency = samples
    policy = make_policy("auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        steps, time_s, plain_s = replay_steps(policy, traces, latency, 100_000)
    speedup = windows(steps, time_s, plain_s, WINDOW)
    assert len(speedup) >= 20
    ref = speedup[:FIRST].mean()
    assert ref > 1.3, speedup  # the sample traces' healthy speedup (about 1.8x)
    assert speedup.min() >= 0.9 * ref, speedup
    assert all(np.all(np.isfinite(t)) for t in fits(policy.controller))
    assert all(m.resets == 0 for m in estimators(policy.controller))


def test_a_fit_corrupted_mid_run_is_reset_once_and_decoding_goes_on(samples):
    traces, latency = samples
    policy = make_policy("auto")
    replay(traces, policy, latency)
    policy.controller.latency.draft["ngram"].A[1, 2] = np.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [replay(traces, policy, latency).total() for _ in range(3)]
    assert [w.category for w in caught] == [EstimatorReset]
    assert "latency fit of drafter 'ngram'" in str(caught[0].message)
    assert all(r.tokens == sum(t.num_tokens for t in traces) and r.speedup > 1.3 for r in results)
    assert all(np.all(np.isfinite(t)) for t in fits(policy.controller))


def live_steps(steps):
    """Held-out prompts decoded in turn by one `auto` policy object on the embedded model until `steps`
    steps have run, each right after plain decoding of the same prompt (paired, so a shared machine's
    load drifts out of the ratio): arrays [requests] of steps, time, plain time and speculative steps."""
    from moetune.engine.drafters import DraftModelDrafter
    from moetune.engine.generate import generate
    from moetune.engine.loader import load_draft, load_target

    target, tok = load_target(DEFAULT_TARGET, device="cpu")
    drafters = {"draft_model": DraftModelDrafter(load_draft(DEFAULT_DRAFT, tok, device="cpu")[0])}
    prompts = [p["text"] for p in json.loads((MODELS_DIR / "prompts.json").read_text())]
    policy = make_policy("auto")
    rows, total = [], 0
    while total < steps:
        for prompt in prompts:
            [plain] = generate(target, tok, prompt, config=PLAIN, max_new_tokens=64)
            [r] = generate(target, tok, prompt, drafter=drafters, policy=policy, max_new_tokens=64)
            assert r.token_ids == plain.token_ids  # lossless
            rows.append((len(r.steps), r.decode_time, plain.decode_time, sum(s.config.speculate for s in r.steps)))
            total += len(r.steps)
    return policy, np.array(rows).T


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_TARGET / "config.json").exists(), reason="embedded default models not trained yet")
def test_auto_decodes_3000_live_steps_of_one_policy_without_winding_up():
    """About 100 s on one torch thread (3,000 steps of auto, the same tokens decoded plain beside them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy, (steps, time_s, plain_s, speculative) = live_steps(3_000)
    assert not caught, [str(w.message) for w in caught]
    assert np.all(speculative > 0)  # no request ran plain only
    speedup = windows(steps, time_s, plain_s, LIVE_WINDOW)
    ref = speedup[:FIRST].mean()
    assert ref > 1.1 and speedup.min() >= 0.75 * ref, speedup  # wall time on a shared machine: wider noise
    assert all(np.all(np.isfinite(t)) for t in fits(policy.controller))
    assert all(m.resets == 0 for m in estimators(policy.controller))


SHAPE = ModelShape(num_layers=6, num_experts=32, top_k=4)


def latency_steps(lat):
    lat.observe("ngram", 5, 60.0, 300, 8e-3, depth=4, nodes=4, t_draft=1e-4)


def fidelity_steps(f):
    f.observe_agreement(np.full(6, 0.1), 0.8)
    f.observe_acceptance(0.05, 1.0, 3.0)


def set_nan(array_of, index=0):
    def corrupt(model):
        np.asarray(array_of(model)).flat[index] = np.nan
    return corrupt


def nan_in_yields(model):
    model._global[1][0] = float("nan")


# case -> (a fresh estimator, one observation, the corruption, what it predicts, its name in the warning)
CORRUPTIONS = {
    "latency theta": (lambda: OnlineLatency(("ngram",)), latency_steps, set_nan(lambda m: m.verify.theta, 1),
                      lambda m: m.predict_verify([1, 9], [24, 90], [100, 900]), "latency fit of verification"),
    "latency stats": (lambda: OnlineLatency(("ngram",)), latency_steps, set_nan(lambda m: m.draft["ngram"].A, 4),
                      lambda m: m.predict_draft("ngram", np.array([[1.0, 4, 4]])), "latency fit of drafter 'ngram'"),
    "expert stats": (lambda: ExpertModel(SHAPE, 20), lambda m: m.observe(9, (12,) * 6, (6,) * 6, (0.9,) * 6),
                     set_nan(lambda m: m.ratio, 2), lambda m: m.predict([9]), "unique-expert model"),
    "fidelity weights": (lambda: FidelityModel(6), fidelity_steps, set_nan(lambda m: m.weights.b, 3),
                         lambda m: m.w, "fidelity model's layer weights"),
    "fidelity lambda": (lambda: FidelityModel(6), fidelity_steps, lambda m: setattr(m, "_lam_den", np.nan),
                        lambda m: m.lam, "fidelity model's acceptance factor"),
    "acceptance counts": (AcceptanceModel, lambda m: m.observe(0, 0, 3, 5), set_nan(lambda m: m.global_f, 2),
                          lambda m: m.prior_mean(), "acceptance model"),
    "yield sums": (lambda: DraftYield(YieldConfig(families=2)), lambda m: m.observe(0, 1, 1, 4), nan_in_yields,
                   lambda m: m.fill(0), "draft-yield model"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_a_corrupted_estimator_resets_to_its_prior_with_one_warning(case):
    fresh, observe, corrupt, predict, name = CORRUPTIONS[case]
    model, prior = fresh(), fresh()
    for _ in range(50):
        observe(model)
    assert model.check() and not np.allclose(predict(model), predict(prior))  # healthy, and it learned
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # corrupted three times: reset three times, warned once
            corrupt(model)
            assert not model.check()
            assert np.allclose(predict(model), predict(prior))
        assert model.check()
    assert [w.category for w in caught] == [EstimatorReset]
    assert name in str(caught[0].message) and "reset to its prior" in str(caught[0].message)
