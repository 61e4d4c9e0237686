"""`moetune run`: clean errors for bad flags, and a tiny end-to-end run."""
import json

import pytest
import torch
from test_loader import save_tiny_tokenizer
from tiny import tiny_dense, tiny_moe

from moetune.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    tiny_moe("olmoe").save_pretrained(root / "target")
    tiny_dense().save_pretrained(root / "draft")
    for name in ("target", "draft"):
        save_tiny_tokenizer(root / name)
    (root / "prompts.json").write_text(json.dumps(
        [{"kind": "code", "source": "t", "text": "w5 w9 w11 w5 w9"}, {"kind": "doc", "source": "t", "text": "w7"}]))
    return root


def flags(root, *extra):
    return ["run", "--target", str(root / "target"), "--draft", str(root / "draft"), "--prompts-file",
            str(root / "prompts.json"), "--prompts", "2", "--max-new-tokens", "6", "--device", "cpu",
            "--threads", "1", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--depth", "0"], "StepConfig.depth must be >= 1"),
    (["--topk", "0"], "StepConfig.topk must be >= 1"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--budget-mode", "evict"], "--budget-mode needs --budget"),
    (["--budget", "4,4,4"], "--budget has 3 entries but the target has 2 MoE layers"),
    (["--budget", "1"], "--budget: expert budget 1 is outside [2, 8]"),
    (["--batch-size", "2", "--budget", "4", "--budget-mode", "substitute"],
     "--batch-size > 1 applies eviction budgets only"),
    (["--arrival-rate", "5"], "--arrival-rate needs --batch-size >= 2"),
    (["--offload-gbps", "2"], "--offload-gbps needs --offload CAPACITY"),
    (["--offload", "100"], "--offload 100: capacity 100 is above the model's 8 experts per layer"),
    (["--offload", "2", "--offload-slow", "paced"], "give its rate with --offload-gbps"),
    (["--batch-size", "2", "--arrival-rate", "-1"], "--arrival-rate needs --batch-size >= 2 and a finite rate"),
])
def test_bad_values_exit_2_with_message(models, capsys, extra, message):
    assert main(flags(models, *extra)) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--drafter", "eagle"], ["--depth", "x"], ["--prompts", "0"], ["--budget", "x"],
                                   ["--budget", "4,0"], ["--budget", "4", "--budget-mode", "drop"]])
def test_bad_flags_are_argparse_errors(models, capsys, extra):
    with pytest.raises(SystemExit) as e:
        main(flags(models, *extra))
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--depth", "3", "--topk", "2", "--num-draft-tokens", "4"],
                                   ["--drafter", "ngram"], ["--depth", "3", "--topk", "2", "--budget", "3"],
                                   ["--depth", "3", "--budget", "2,3", "--budget-mode", "substitute"],
                                   ["--batch-size", "2", "--depth", "3"],
                                   ["--batch-size", "2", "--depth", "3", "--temperature", "0.8", "--top-p", "0.9"],
                                   ["--batch-size", "2", "--drafter", "ngram",
                                                                          "--arrival-rate", "50"],
                                   ["--batch-size", "2", "--depth", "3", "--topk", "2", "--budget", "3"],
                                   ["--batch-size", "2", "--depth", "3", "--budget", "3", "--offload", "2"],
                                   ["--offload", "2", "--depth", "3"],
                                   ["--offload", "3", "--offload-slow", "paced", "--offload-gbps", "2",
                                    "--offload-prefetch", "pregate", "--drafter", "ngram"]])
def test_tiny_end_to_end(models, capsys, extra):
    threads = torch.get_num_threads()
    try:
        assert main(flags(models, *extra)) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| plain | 12 |" in out and "| speculative | 12 |" in out and "1.00x" in out


@pytest.mark.parametrize("extra, message", [
    (["--auto", "--policy", "plain"], "--auto and --policy are alternatives"),
    (["--latency-target-ms", "5", "--policy", "cascade"], "--latency-target-ms needs the adaptive policy"),
    (["--latency-target-ms", "0"], "--latency-target-ms must be > 0"),
    (["--auto", "--depth", "3"], "--depth set a static config; they cannot be combined with a policy"),
    (["--policy", "adaptive:latency_target_ms=3", "--latency-target-ms", "4"], "the latency target is given twice"),
    (["--policy", "eagle"], "unknown policy 'eagle'"),
])
def test_bad_policy_combinations_exit_2_with_message(models, capsys, extra, message):
    assert main(flags(models, *extra)) == 2
    assert message in capsys.readouterr().err


def run_out(models, capsys, *extra) -> str:
    threads = torch.get_num_threads()
    try:
        assert main(flags(models, *extra, "--max-new-tokens", "16")) == 0  # the last --max-new-tokens wins
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_auto_considers_every_drafter_and_shows_configs_over_time(models, capsys):
    out = run_out(models, capsys, "--auto")
    assert "| plain | 32 |" in out and "| auto | 32 |" in out
    table = out.split("Configurations over time")[1]
    assert "| 0 |" in table and "| 1 |" in table  # one row per request
    for drafter in ("draft_model chain", "ngram chain", "self chain"):  # the n-gram and self drafters ran live
        assert drafter in table
    # calibration (no profile) starts with the cheapest configs: plain, then the draft model's shortest chain
    assert "Policy switches:" in out and "- request 0 step 1: -> draft_model chain d1" in out


def test_latency_target_reports_attainment_and_infeasibility(models, capsys):
    out = run_out(models, capsys, "--policy", "adaptive:warmup_steps=2,drafters=ngram", "--latency-target-ms", "0.001")
    assert "| adaptive:warmup_steps=2,drafters=ngram,latency_target_ms=0.001 | 32 |" in out
    assert "Latency target 0.001 ms/token: met by steps emitting 0% of tokens" in out
    assert "judged infeasible in 2 of 2 requests" in out and "is infeasible for this request" in out


def test_target_a_profile_proves_infeasible_is_a_clean_error_before_running(models, tmp_path, capsys):
    from moetune.traces.latency import LatencyModel
    profile = tmp_path / "profile.json"
    LatencyModel(verify=(1e-3, 1e-4, 1e-5, 0.0, 0.0), draft={"draft_model": (0.0, 1e-4, 0.0)}).to_json(profile)
    assert main(flags(models, "--policy", f"adaptive:profile={profile}", "--latency-target-ms", "0.01")) == 2
    captured = capsys.readouterr()
    assert "latency target 0.01 ms/token is infeasible" in captured.err and "| plain |" not in captured.out
