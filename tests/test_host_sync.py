"""A live greedy step reads the device once: acceptance's transfer (engine/host.py); a batched step's
greedy acceptance reads it once for all its requests.

On CPU there is no sync to see, so every host read of a tensor (`.tolist()`, `.item()`, `int()`, `bool()`,
...) is counted through a TorchFunctionMode, outside the target's forward (on CPU the budgeted expert
loop reads routing on purpose: engine/moe_budget.py) and outside drafting (a draft model builds its tree
on the host, level by level). Tensors verify staged for the host (engine/host.stage) may be read, but only
after the step's one read: on a GPU that read drains the stream, so their copies have landed.
"""
import pytest
import torch
from tiny import tiny_moe
from torch.overrides import TorchFunctionMode

from moetune.engine import batch as batch_mod
from moetune.engine import generate as live
from moetune.engine import host, verify
from moetune.engine.batch import generate_batch
from moetune.engine.drafters import DraftModelDrafter, NgramDrafter
from moetune.engine.generate import generate
from moetune.policies.registry import make_policy
from moetune.step import PLAIN, StepConfig

PROMPT = [5, 17, 33, 9, 5, 17, 40, 9, 5, 17, 90, 9, 5, 17]  # "5 17" has three continuations: n-gram trees branch
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class HostReads(TorchFunctionMode):
    """Counts host reads while `on`; those of staged tensors apart, with whether one came before the step's
    first other read."""

    def __init__(self):
        super().__init__()
        self.on, self.staged, self.kept = True, set(), []  # kept: staged tensors stay alive (ids stay theirs)
        self.reads, self.early_staged, self.steps = 0, 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.on and getattr(func, "__name__", "") in READS and args and isinstance(args[0], torch.Tensor):
            if id(args[0]) in self.staged:
                self.early_staged += self.reads == 0
            else:
                self.reads += 1
        return func(*args, **(kwargs or {}))

    def step_done(self, _index, _stats):
        self.steps.append((self.reads, self.early_staged))
        self.reads = self.early_staged = 0


def off_during(reads: HostReads, fn):
    def wrapped(*args, **kwargs):
        was, reads.on = reads.on, False
        try:
            return fn(*args, **kwargs)
        finally:
            reads.on = was
    return wrapped


@pytest.fixture(scope="module")
def target():
    return tiny_moe("qwen3_moe")


CASES = {
    "plain": (None, PLAIN),
    "ngram chain": ("ngram", StepConfig(drafter="ngram", depth=4)),
    "ngram tree": ("ngram", StepConfig(drafter="ngram", depth=4, topk=3)),
    "draft-model tree": ("model", StepConfig(depth=3, topk=2)),
    "budgeted (substitute)": ("model", StepConfig(depth=3, topk=2, budgets=(3, 3))),
    "budgeted, eval mode": ("model", StepConfig(depth=3, topk=2, budgets=(3, 3), eval_agreement=True)),
    "eviction": ("model", StepConfig(depth=3, topk=2, budgets=(3, 3), budget_mode="evict")),
    "adaptive (routing captured)": ("both", "adaptive"),
}


@pytest.mark.parametrize("case", CASES)
def test_one_host_read_per_step(target, case, monkeypatch):
    kind, config = CASES[case]
    drafter = {None: None, "ngram": NgramDrafter(), "model": DraftModelDrafter(target),
               "both": {"ngram": NgramDrafter(), "draft_model": DraftModelDrafter(target)}}[kind]
    reads = HostReads()
    staging = host.stage

    def stage(tensor):
        out = staging(tensor)
        reads.staged.add(id(out))
        reads.kept.append(out)
        return out

    monkeypatch.setattr(verify, "stage", stage)
    monkeypatch.setattr(host, "stage", stage)  # budget reports stage through the module
    for phase in ("prefill", "draft", "lookahead"):
        monkeypatch.setattr(live.LiveBackend, phase, off_during(reads, getattr(live.LiveBackend, phase)))
    monkeypatch.setattr(target, "forward", off_during(reads, target.forward))
    kwargs = dict(policy=make_policy(config)) if isinstance(config, str) else dict(config=config)
    with reads:
        res = generate(target, None, [PROMPT], drafter=drafter, max_new_tokens=20, eos_token_id=-1,
                       on_step=reads.step_done, **kwargs)[0]
    assert len(reads.steps) == len(res.steps) >= 4
    assert [n for n, _ in reads.steps] == [1] * len(res.steps), "host reads per step outside forwards and drafting"
    assert sum(e for _, e in reads.steps) == 0, "a staged tensor was read before the step's transfer"
    if case.startswith("adaptive"):
        assert any(s.unique_experts for s in res.steps)
    if case.startswith("budgeted"):
        assert all(s.unique_experts_kept for s in res.steps if s.tree_size)


def test_batched_greedy_acceptance_reads_once_per_step(target, monkeypatch):
    """Four requests verifying draft-model trees in one forward: acceptance reads the device once a step, not
    once per request."""
    reads, counts = HostReads(), []
    reads.on = False
    accept = batch_mod.PackedBatch.accept

    def counting(self, logits, row_tokens, kept):
        reads.on, before = True, reads.reads
        try:
            return accept(self, logits, row_tokens, kept)
        finally:
            reads.on = False
            counts.append((len(self.active), reads.reads - before))

    monkeypatch.setattr(batch_mod.PackedBatch, "accept", counting)
    prompts = [PROMPT, PROMPT[3:], [7, 8, 9, 7, 8], PROMPT[:9]]
    with reads:
        generate_batch(target, None, prompts, drafter=DraftModelDrafter(target), config=StepConfig(depth=3, topk=2),
                       batch_size=4, max_new_tokens=10, eos_token_id=-1)
    assert max(b for b, _ in counts) == 4
    assert [n for _, n in counts] == [1] * len(counts)
