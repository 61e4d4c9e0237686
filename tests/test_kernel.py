"""Triton budgeted-MoE kernel against the PyTorch reference, and the reference against a naive loop.

The kernel runs under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is
imported, and another test module may already have imported it). The subprocess is the running
interpreter (sys.executable) with the caller's environment, started in the repository root, with CUDA
hidden (the interpreter runs CPU tensors; on a GPU box it must not see the device), and it reports each
case's error separately, so one failing case fails one test instead of erroring all of them. Tolerances, as max |kernel - ref|
over max |ref|: fp32 1e-5 (IEEE dots), fp16 5e-3, bf16 2e-2 (the kernel keeps the SwiGLU product in
fp32 before rounding, the reference rounds gate/up first). On CUDA the same bounds apply.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moetune.engine.kernels.reference import budgeted_moe_reference

TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}
# (T, K, E, H, I, selected experts): one token; dropped slots; ragged T, H and I past one tile; an
# expert with no tokens selected; slots of unselected experts ignored; K not a power of two; T above
# SMALL_T (the grouped large-T path, several token blocks).
CASES = [(1, 2, 8, 32, 16, [3, 5]), (5, 2, 8, 40, 24, [3, 1, 5, 0, 6]), (37, 4, 16, 72, 80, list(range(0, 16, 2))),
         (9, 2, 6, 64, 64, [0, 1, 2, 3, 4, 5]), (6, 3, 8, 144, 136, [7, 2, 4]), (70, 2, 6, 24, 20, [1, 4, 5, 2])]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(T, K, E, H, I, selected, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    gate_up = torch.randn(E, 2 * I, H, generator=g) / H ** 0.5
    down = torch.randn(E, H, I, generator=g) / I ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, K]
    ids[::3, -1] = -1  # some dropped slots
    w = torch.rand(T, K, generator=g)
    to = dict(device=device)
    return (x.to(dtype=dtype, **to), ids.to(**to), w.to(dtype=dtype, **to), gate_up.to(dtype=dtype, **to),
            down.to(dtype=dtype, **to), torch.tensor(selected, **to))


def rel_error(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def test_reference_matches_naive_loop():
    x, ids, w, gu, dn, sel = make_inputs(*CASES[2], torch.float64)
    ids[1] = -1  # a token with every slot dropped gets no expert output
    out = budgeted_moe_reference(x, ids, w, gu, dn, sel)
    naive = torch.zeros_like(x)
    I = dn.shape[2]
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = ids[t, k].item()
            if e in sel.tolist():
                h = gu[e] @ x[t]
                naive[t] += w[t, k] * (dn[e] @ (torch.nn.functional.silu(h[:I]) * h[I:]))
    torch.testing.assert_close(out, naive, atol=1e-10, rtol=1e-10)
    assert out[1].abs().sum() == 0


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Max relative error (or the error message) per (case, dtype) from one interpreter subprocess."""
    out = tmp_path_factory.mktemp("kernel") / "results.json"
    code = textwrap.dedent(f"""
        import json, sys, traceback, torch
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_kernel import CASES, make_inputs, rel_error
        from moetune.engine.kernels.budgeted_moe import budgeted_moe
        from moetune.engine.kernels.reference import budgeted_moe_reference
        torch.set_num_threads(1)
        res = {{}}
        for i, case in enumerate(CASES):
            for name in ("float32", "float16", "bfloat16"):
                args = make_inputs(*case, getattr(torch, name))
                try:
                    out = budgeted_moe(*args)
                    assert out.shape == args[0].shape and out.dtype == args[0].dtype, (out.shape, out.dtype)
                    res[f"{{i}}-{{name}}"] = rel_error(out, budgeted_moe_reference(*args))
                except Exception:
                    res[f"{{i}}-{{name}}"] = traceback.format_exc(limit=-3)
        with open(sys.argv[1], "w") as f:
            json.dump(res, f)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=900)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"interpreter subprocess ({sys.executable}) exited {proc.returncode}:\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference_interpreted(interpreted, case, dtype):
    err = interpreted[f"{case}-{dtype}"]
    assert not isinstance(err, str), err
    assert err <= TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(TOL))
def test_kernel_matches_reference_cuda(dtype):
    from moetune.engine.kernels.budgeted_moe import budgeted_moe
    for case in CASES + [(64, 8, 64, 2048, 1024, list(range(48)))]:
        args = make_inputs(*case, getattr(torch, dtype), device="cuda")
        assert rel_error(budgeted_moe(*args), budgeted_moe_reference(*args)) <= TOL[dtype]
