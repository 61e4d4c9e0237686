"""`moetune profile`: measure verification latency over (tokens, unique experts, context) and save a
fitted LatencyModel as JSON, from the embedded/given target or from a model config alone."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from moetune import DEFAULT_TARGET


def add_arguments(p) -> None:
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="target model path (default: embedded)")
    p.add_argument("--config", help="profile a randomly initialised model of this HF config.json instead "
                                    "(e.g. traces/configs/olmoe-1b-7b.json)")
    p.add_argument("--layers", type=int, help="with --config: build only the first N layers (fit is scaled "
                                              "back to the full depth)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--tokens", default="1,2,4,8,16,32", help="tokens verified per pass (comma list)")
    p.add_argument("--unique", default="0,0.25,0.5,1", help="unique experts per layer as fractions between "
                                                            "K (0) and E (1), comma list")
    p.add_argument("--contexts", default="64,512", help="context lengths (comma list)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="profile.json", help="where to write the profile JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--quiet", action="store_true")


def _ints(text: str, what: str) -> tuple:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--{what} must be a comma list of integers, got {text!r}") from None


def main(args) -> int:
    from moetune.outputs import output_lock
    from moetune.traces.profile import ProfileGrid

    try:
        fractions = tuple(float(x) for x in args.unique.split(","))
    except ValueError:
        raise ValueError(f"--unique must be a comma list of fractions, got {args.unique!r}") from None
    grid = ProfileGrid(tokens=_ints(args.tokens, "tokens"), unique_fractions=fractions,
                       contexts=_ints(args.contexts, "contexts"), repeats=args.repeats)
    if args.layers and not args.config:
        raise ValueError("--layers applies only with --config")
    with output_lock([args.out], args.force):
        return _profile(args, grid)


def _profile(args, grid) -> int:
    """Measure and fit under the output lock main holds; the JSON replaces --out only once complete."""
    import torch

    from moetune.engine.loader import load_target, moe_shape, resolve_device, resolve_dtype
    from moetune.outputs import atomic_output
    from moetune.traces.profile import fit_profile, hardware, measure, model_from_config

    device = resolve_device(args.device)
    if args.config:
        model, full = model_from_config(args.config, args.layers, str(device), resolve_dtype(args.dtype, device))
        name = Path(args.config).stem
    else:
        model, _ = load_target(args.target, str(device), args.dtype)
        full, name = None, Path(args.target).name
    torch.manual_seed(0)
    shape = moe_shape(model)
    t0 = time.perf_counter()
    rows = measure(model, grid, log=None if args.quiet else print)
    latency = fit_profile(rows, shape.num_layers, full, source=f"moetune profile {name}")
    out = dict(model=json.loads(latency.to_json()), measurements=rows, name=name, shape=shape.__dict__,
               layers_measured=shape.num_layers, hardware=hardware(device), seconds=time.perf_counter() - t0,
               command="moetune " + " ".join(sys.argv[1:]))
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(out, indent=1))
    err = latency.error
    print(f"{name}: {len(rows)} measurements in {out['seconds']:.1f}s; fit error {100 * err['mape']:.1f}% "
          f"(cross-validated {100 * err.get('cv_mape', float('nan')):.1f}%); wrote {args.out}")
    return 0
