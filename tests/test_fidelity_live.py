"""The controller's fidelity model learns live: EvalSampler picks eval-mode steps among lossy budgeted ones,
and the per-layer weights fitted from their measured agreement recover a known ground truth."""
import numpy as np
import pytest

from moetune.adaptive.fidelity import EvalSampler, FidelityModel
from moetune.step import StepConfig

TRUE_W = np.array([0.1, 0.5, 0.2, 0.8, 0.3, 0.1])  # agreement lost per unit of router mass dropped, per layer
ROWS = 17  # verified rows per step: agreement is measured over them, so it moves in steps of 1/17
LEVELS = [StepConfig(depth=5, topk=2, num_draft_tokens=16, budgets=(b,), budget_mode="substitute")
          for b in (10, 12, 14, 16)]
PLAIN = StepConfig(depth=5, topk=2, num_draft_tokens=16)


def step(rng, config: StepConfig):
    """A lossy step at `config`'s level: router mass dropped per layer (L,) and its measured agreement."""
    scale = (17 - config.budgets[0]) / 7 * 0.15  # tighter budgets drop more
    drop = np.clip(scale * rng.uniform(0.2, 1.8, len(TRUE_W)), 0.0, 1.0)
    loss = min(float(TRUE_W @ drop), 1.0)
    return drop, rng.binomial(ROWS, 1.0 - loss) / ROWS, 1.0 - loss


def controller_stream(n: int):
    """Configs as a controller might choose them: budget levels in a fixed rotation, plain steps between."""
    for i in range(n):
        yield PLAIN if i % 3 == 2 else LEVELS[i % len(LEVELS)]


def test_sampler_rate_and_which_steps():
    sampler = EvalSampler(every=32)
    picked = [cfg for cfg in controller_stream(30000) if sampler.want(cfg)]
    lossy = sum(cfg.budgets is not None for cfg in controller_stream(30000))
    assert picked[0] in LEVELS and all(cfg.budgets is not None for cfg in picked)
    assert len(picked) == pytest.approx(lossy / 32, rel=0.1)
    counts = [sum(cfg is level for cfg in picked) for level in LEVELS]
    assert min(counts) > 0.7 * max(counts)  # the rotation's period divides 32: a fixed period would see one level
    evict = StepConfig(budgets=(8,), budget_mode="evict")
    assert not any(EvalSampler(every=1).want(evict) for _ in range(5))
    assert all(EvalSampler(every=1).want(LEVELS[0]) for _ in range(5))


@pytest.mark.parametrize("every", [0, -3, 2.5])
def test_sampler_rejects_bad_rates(every):
    with pytest.raises(ValueError, match="EvalSampler.every must be an int >= 1"):
        EvalSampler(every)


def test_fidelity_model_fitted_from_sampled_eval_steps_recovers_ground_truth():
    rng = np.random.default_rng(0)
    model, sampler = FidelityModel(len(TRUE_W)), EvalSampler(every=32)
    prior_w = model.w.copy()
    for cfg in controller_stream(30000):
        if sampler.want(cfg):  # the engine would verify twice and report StepStats.agreement
            drop, agreement, _ = step(rng, cfg)
            model.observe_agreement(drop, agreement)
    assert np.abs(model.w - TRUE_W).max() < 0.15 < np.abs(prior_w - TRUE_W).max()  # ~2 standard errors
    assert int(np.argmax(model.w)) == 3

    # against measured agreement on fresh lossy steps: as close as the true model, far closer than the prior
    fresh = [step(rng, LEVELS[i % len(LEVELS)]) for i in range(2000)]
    drops = np.array([d for d, _, _ in fresh]).T  # (L, n)
    measured = np.array([a for _, a, _ in fresh])
    truth = np.array([t for _, _, t in fresh])
    fitted_err = np.abs(1.0 - model.agreement_loss(drops) - measured).mean()
    true_err = np.abs(truth - measured).mean()
    prior_err = np.abs(1.0 - FidelityModel(len(TRUE_W)).agreement_loss(drops) - measured).mean()
    assert fitted_err < 1.05 * true_err and prior_err > 1.3 * true_err
