"""Invalid arguments get clear ValueErrors: every policy config, the registry and the controller config."""
import pytest

from moetune.adaptive.acceptance import AcceptanceConfig
from moetune.adaptive.controller import Controller, ControllerConfig
from moetune.adaptive.latency import LatencyConfig
from moetune.policies.adaptive import Adaptive
from moetune.policies.cascade import Cascade, CascadeConfig
from moetune.policies.moesd import MoESD, MoESDConfig
from moetune.policies.moespec import MoESpec, MoESpecConfig
from moetune.policies.registry import make_policy
from moetune.policies.static import Static
from moetune.step import PLAIN, DecodeState, ModelShape, Sampling, StepConfig
from moetune.traces.latency import LatencyModel
from moetune.traces.profile import ProfileGrid


@pytest.mark.parametrize("kwargs, match", [
    (dict(budget=0), "budget must be >= 1"),
    (dict(drafter="eagle"), "drafter must be one of"),
    (dict(selection="best"), "selection must be one of"),
    (dict(substitution="drop"), "substitution must be one of"),
    (dict(depth=0), "depth must be >= 1"),
    (dict(topk=0), "topk must be >= 1"),
])
def test_moespec_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoESpecConfig(**kwargs)


def test_moespec_needs_setup_and_config():
    with pytest.raises(ValueError, match="before setup"):
        MoESpec().decide(DecodeState(0, 0, 1, 0, 1))
    with pytest.raises(ValueError, match="MoESpecConfig"):
        MoESpec(config={"budget": 4})


@pytest.mark.parametrize("kwargs, match", [
    (dict(topk=1000), "grows 3001000 candidate nodes .* lower topk"),
    (dict(topk=100), "verifies up to 30100 draft nodes .* set num_draft_tokens"),
    (dict(depth=1025), "depth must be <= 1024"),
    (dict(tree=(-1,) * 1025), "tree has 1025 nodes"),
])
def test_step_config_bounds_a_steps_cost(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepConfig(**kwargs)


def test_step_config_max_nodes_is_the_trees_growth():
    """A dynamic tree grows topk nodes, then topk * topk per further level (EAGLE-2), capped by the budget."""
    assert StepConfig(depth=6, topk=4).max_nodes == 4 + 5 * 16
    assert StepConfig(depth=4, topk=100, num_draft_tokens=16).max_nodes == 16
    assert StepConfig(depth=5).max_nodes == 5 and PLAIN.max_nodes == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "--temperature must be >= 0 and finite"),
    (dict(temperature=float("inf")), "--temperature must be >= 0 and finite"),
    (dict(temperature=-1.0), "--temperature must be >= 0"),
    (dict(top_p=float("nan")), r"--top-p must be in \(0, 1\]"),
    (dict(top_p=0.0), r"--top-p must be in \(0, 1\]"),
])
def test_sampling(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


@pytest.mark.parametrize("budget", [1, 9, 100])
def test_budgets_outside_top_k_to_num_experts_are_refused_not_clamped(budget):
    """One rule live and in replay: the engine refuses such budgets, so policies refuse them at setup."""
    shape = ModelShape(num_layers=2, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=rf"moespec budget: expert budget {budget} is outside \[2, 8\]"):
        MoESpec(MoESpecConfig(budget=budget)).setup(shape)
    with pytest.raises(ValueError, match=rf"static budgets: expert budget {budget} is outside \[2, 8\]"):
        Static(StepConfig(budgets=(4, budget))).setup(shape)
    MoESpec(MoESpecConfig(budget=8)).setup(shape)


@pytest.mark.parametrize("kwargs, match", [
    (dict(verify=(float("nan"), 0.0, 0.0, 0.0, 0.0)), "finite non-negative"),
    (dict(verify=(1e-3, 0.0, 0.0, 0.0, float("inf"))), "finite non-negative"),
    (dict(verify=(1e-3, 0.0, 0.0, 0.0, 0.0), draft={"ngram": (float("nan"), 0.0, 0.0)}), "finite non-negative"),
    (dict(verify=(1e-3, 0.0, 0.0, 0.0, 0.0), step_overhead=float("nan")), "finite and >= 0"),
])
def test_latency_model_rejects_nan_and_infinity(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LatencyModel(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(tokens=(1, 100000)), "tokens must be <= 1025"),
    (dict(unique_fractions=(float("nan"),)), "unique_fractions in"),
    (dict(unique_fractions=()), "unique_fractions in"),
    (dict(repeats=100000), "forward passes, above the limit"),
])
def test_profile_grid_is_bounded(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProfileGrid(**kwargs)


def test_profile_grid_must_fit_the_models_positions():
    ProfileGrid(tokens=(1, 64), contexts=(192,)).check_positions(256)
    ProfileGrid().check_positions(None)
    with pytest.raises(ValueError, match="needs 257 positions, but the model has 256 .* at most 192"):
        ProfileGrid(tokens=(1, 64), contexts=(193,)).check_positions(256)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ks=()), "distinct draft lengths"),
    (dict(ks=(0, 2, 2)), "distinct draft lengths"),
    (dict(ks=(0, -1)), "distinct draft lengths"),
    (dict(ks=(1, 2)), "must include 0"),
    (dict(test_steps=0), "test_steps and set_steps"),
    (dict(set_steps=0), "test_steps and set_steps"),
    (dict(topk=0), "topk must be >= 1"),
    (dict(drafter="x"), "drafter must be one of"),
    (dict(ks=(0, 2000)), "depth must be <= 1024"),
])
def test_cascade_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadeConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_depth=0), "max_depth must be in"),
    (dict(max_depth=33), "max_depth must be in"),
    (dict(calibration_reps=0), "calibration_reps"),
    (dict(alpha_prior=1.0), "alpha_prior"),
    (dict(alpha_decay=0.0), "alpha_decay"),
    (dict(drafter="x"), "drafter must be one of"),
])
def test_moesd_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoESDConfig(**kwargs)


@pytest.mark.parametrize("cls, name", [(Cascade, "CascadeConfig"), (MoESD, "MoESDConfig"),
                                       (Adaptive, "ControllerConfig"), (Static, "StepConfig")])
def test_policies_reject_wrong_config_type(cls, name):
    with pytest.raises(ValueError, match=name):
        cls({"depth": 4})


@pytest.mark.parametrize("kwargs, match", [
    (dict(drafters=()), "drafters must be a non-empty subset"),
    (dict(drafters=("eagle",)), "drafters must be a non-empty subset"),
    (dict(drafters=("ngram", "ngram")), "duplicates"),
    (dict(widths=()), "widths must be distinct integers"),
    (dict(widths=(0,)), "widths must be distinct integers"),
    (dict(widths=(1, 1)), "widths must be distinct integers"),
    (dict(max_depth=0), "max_depth must be in"),
    (dict(max_agreement_loss=1.0), "max_agreement_loss"),
    (dict(loss_levels=()), "loss_levels must be strictly increasing"),
    (dict(loss_levels=(0.1, 0.05)), "loss_levels must be strictly increasing"),
    (dict(loss_levels=(0.0,)), "loss_levels must be strictly increasing"),
    (dict(latency_target_ms=0.0), "latency_target_ms must be > 0"),
    (dict(latency_target_ms=-5.0), "latency_target_ms must be > 0"),
    (dict(latency_target_ms=float("nan")), "latency_target_ms must be > 0 and finite"),
    (dict(latency_target_ms=float("inf")), "latency_target_ms must be > 0 and finite"),
    (dict(ucb_c=float("nan")), "ucb_c must be a finite number"),
    (dict(hysteresis=float("inf")), "hysteresis must be a finite number"),
    (dict(prior_strength=float("nan")), "prior_strength must be a finite number"),
    (dict(widths=(1, 100)), "widths up to 100 at max_depth=8 .* lower widths or max_depth"),
    (dict(target_margin=0.5), "target_margin"),
    (dict(exploration="epsilon"), "exploration must be one of"),
    (dict(ucb_c=-1.0), "ucb_c"),
    (dict(explore_slack=1.5), "explore_slack"),
    (dict(hysteresis=-0.1), "hysteresis"),
    (dict(min_dwell=-1), "min_dwell"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(refresh_every=0), "refresh_every"),
    (dict(decide_every=0), "decide_every must be >= 1"),
    (dict(prior_strength=-1.0), "prior_strength"),
    (dict(request_decay=0.0), "request_decay"),
    (dict(idle_decay=1.5), "idle_decay"),
    (dict(global_decay=2.0), "global_decay"),
    (dict(latency_forgetting=0.5), "forgetting"),
    (dict(probe="yes"), "probe must be True or False"),
])
def test_controller_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ControllerConfig(**kwargs)


def test_estimator_configs():
    with pytest.raises(ValueError, match="families"):
        AcceptanceConfig(families=0)
    with pytest.raises(ValueError, match="verify_prior needs 5"):
        LatencyConfig(verify_prior=(1.0,))
    with pytest.raises(ValueError, match="noise_s"):
        LatencyConfig(noise_s=0.0)


def test_controller_rejects_non_profile():
    with pytest.raises(ValueError, match="latency profile"):
        Controller(ControllerConfig(), profile=3.0)


def test_adaptive_rejects_unreadable_profile(tmp_path):
    with pytest.raises(ValueError, match="cannot read latency profile"):
        Adaptive(profile=str(tmp_path / "missing.json"))


@pytest.mark.parametrize("spec, match", [
    ("", "non-empty string"),
    ("eagle", "unknown policy 'eagle'; valid names: adaptive, cascade"),
    ("plain:depth=4", "has no parameter 'depth'; valid parameters: none"),
    ("static:dpth=4", "no parameter 'dpth'; valid parameters: speculate, drafter, depth"),
    ("static:depth", "is not key=value"),
    ("static:depth=four", "depth='four' is invalid; expected an integer"),
    ("static:depth=0", "depth must be >= 1"),
    ("static:budgets=8/x", "expected integers separated by '/'"),
    ("static:speculate=perhaps", "expected one of"),
    ("moespec:budget=none", "expected an integer"),
    ("moespec:budget=0", "budget must be >= 1"),
    ("cascade:ks=1/2", "must include 0"),
    ("moesd:alpha_prior=high", "expected a number"),
    ("adaptive:latency_target_ms=-1", "latency_target_ms must be > 0"),
    ("auto:exploration=random", "exploration must be one of"),
    ("auto:drafters=eagle", "drafters must be a non-empty subset"),
    ("adaptive:profile=/no/such/profile.json", "cannot read latency profile"),
])
def test_registry(spec, match):
    with pytest.raises(ValueError, match=match):
        make_policy(spec)


def test_registry_rejects_non_string():
    with pytest.raises(ValueError, match="non-empty string"):
        make_policy(None)


@pytest.mark.parametrize("passive", [StepConfig(drafter="draft_model", depth=3), StepConfig(drafter="ngram", topk=2)])
def test_engine_rejects_a_passive_draft_that_is_not_a_model_free_chain(passive):
    from moetune.engine.generate import generate
    from tiny import tiny_moe

    policy = Static(PLAIN)
    policy.passive_draft = passive
    with pytest.raises(ValueError, match="Policy.passive_draft must be a chain"):
        generate(tiny_moe("qwen3_moe", seed=0), None, [[1, 2, 3]], policy=policy, max_new_tokens=2)
