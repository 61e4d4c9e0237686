"""The profile and replay commands end to end on tiny inputs, and forced expert sets for profiling."""
import json

import torch

from moetune.cli import main
from moetune.engine.routing import capture_routing
from moetune.step import ModelShape
from moetune.traces.latency import LatencyModel
from moetune.traces.profile import force_experts
from moetune.traces.synthetic import synthetic_trace
from moetune.traces.writer import write_trace
from tiny import tiny_moe, tiny_moe_config


def test_force_experts_gives_exactly_u_unique():
    model = tiny_moe("olmoe")
    with force_experts(model, 5), capture_routing(model) as routing:
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    assert routing.unique_experts().tolist() == [5, 5]
    with capture_routing(model) as routing:  # hooks are gone afterwards
        model(input_ids=torch.tensor([[3]]))
    assert routing.unique_experts().tolist() == [2, 2]


def test_profile_from_config(tmp_path):
    cfg = tiny_moe_config("qwen3_moe").to_dict()
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "p.json"
    rc = main(["profile", "--config", str(tmp_path / "cfg.json"), "--layers", "1", "--device", "cpu",
               "--tokens", "1,2,4", "--unique", "0,1", "--contexts", "8,16", "--repeats", "1", "--quiet",
               "--out", str(out)])
    assert rc == 0
    prof = json.loads(out.read_text())
    assert prof["layers_measured"] == 1 and len(prof["measurements"]) == 10
    model = LatencyModel.from_json(out)
    assert model.num_layers == 2 and model.error["scaled_from_layers"] == 1


def test_replay_command_writes_table_json_and_plots(tmp_path, capsys):
    shape = ModelShape(num_layers=2, num_experts=8, top_k=2)
    path = tmp_path / "s.trace"
    write_trace(synthetic_trace(shape, n_requests=2, n_tokens=24, seed=1), path)
    prof = tmp_path / "lat.json"
    LatencyModel.analytic(shape).to_json(prof)
    rc = main(["replay", str(path), "--policy", "plain", "--policy", "static:depth=3,topk=2,budgets=2/2,budget_mode=substitute",
               "--profile", str(prof), "--latency-target-ms", "5", "--out", str(tmp_path / "out")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| plain |" in printed and "static:depth=3,topk=2,budgets=2/2,budget_mode=substitute" in printed
    report = json.loads((tmp_path / "out" / "replay.json").read_text())
    assert [r["policy"] for r in report["overall"]] == ["plain", "static:depth=3,topk=2,budgets=2/2,budget_mode=substitute"]
    assert abs(report["overall"][0]["speedup"] - 1.0) < 1e-9 and report["overall"][1]["fidelity"] < 1.0
    for png in ("goodput_vs_fidelity.png", "budgets_over_time.png", "acceptance_over_time.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    assert main(["replay", str(path), "--policy", "nonsense"]) == 2


def test_replay_command_reports_a_malformed_trace_in_one_line(tmp_path, capsys):
    shape = ModelShape(num_layers=2, num_experts=8, top_k=2)
    good = tmp_path / "good.trace"
    write_trace(synthetic_trace(shape, n_requests=1, n_tokens=8, seed=2), good)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a record: its checksum no longer matches
    (tmp_path / "flipped.trace").write_bytes(bytes(data))
    (tmp_path / "garbage.trace").write_bytes(b"not a trace at all")
    for bad, why in (("garbage.trace", "bad magic bytes"), ("flipped.trace", "bad checksum"),
                     ("missing.trace", "cannot read")):
        capsys.readouterr()
        rc = main(["replay", str(good), str(tmp_path / bad), "--policy", "plain", "--policy", "static:depth=2"])
        err = capsys.readouterr().err
        assert rc == 2
        assert err.startswith("moetune replay: error: ") and why in err and bad in err
        assert err.count("\n") == 1 and "Traceback" not in err
