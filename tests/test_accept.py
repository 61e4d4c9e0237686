"""Greedy acceptance equals a brute-force reference on random trees and chains (the chain fast path too), and
a packed batch's one-transfer acceptance equals each request's own, evicted rows included."""
import random

import torch

from moetune.engine.accept import accept_greedy, accept_greedy_packed
from moetune.engine.tree import DraftTree, chain, depths, path_to


def reference(parents, tokens, target):
    """Deepest node whose whole path agrees with the target's argmax at each parent (first such on ties)."""
    best, best_depth = None, 0
    for i, d in enumerate(depths(parents)):
        path = path_to(parents, i)
        if d > best_depth and all(tokens[j] == target[parents[j] + 1] for j in path):
            best, best_depth = i, d
    if best is None:
        return (), (target[0],)
    path = path_to(parents, best)
    return tuple(path), tuple(tokens[j] for j in path) + (target[best + 1],)


def test_greedy_acceptance_matches_reference():
    rng = random.Random(0)
    for trial in range(300):
        n = rng.randint(0, 9)
        parents = chain(n) if trial % 2 else tuple(rng.randint(-1, i - 1) for i in range(n))
        target = [rng.randint(0, 3) for _ in range(n + 1)]  # argmax per row, small vocab for agreements
        tokens = [rng.randint(0, 3) for _ in range(n)]
        logits = torch.nn.functional.one_hot(torch.tensor(target), 4).float()  # [N+1, V]
        tree = DraftTree(parents, torch.tensor(tokens, dtype=torch.long), torch.ones(n))
        acc = accept_greedy(tree, logits)
        assert (acc.path, acc.tokens) == reference(parents, tokens, target), (parents, tokens, target)


def test_packed_acceptance_equals_each_requests_own():
    rng = random.Random(1)
    for trial in range(60):
        requests, row_tokens, target, expected = [], [], [], []
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(0, 7)
            parents = chain(n) if rng.random() < 0.5 else tuple(rng.randint(-1, i - 1) for i in range(n))
            tokens = [rng.randint(0, 3) for _ in range(n)]
            rows = [rng.randint(0, 3) for _ in range(n + 1)]
            alive = None
            if n and rng.random() < 0.4:  # an eviction budget kept a set of rows closed under ancestors
                keep = {0}
                for i, p in enumerate(parents):
                    if p + 1 in keep and rng.random() < 0.6:
                        keep.add(i + 1)
                alive = keep
            mask = None if alive is None else torch.tensor([i in alive for i in range(n + 1)])
            tree = DraftTree(parents, torch.tensor(tokens, dtype=torch.long), torch.ones(n))
            expected.append(accept_greedy(tree, torch.nn.functional.one_hot(torch.tensor(rows), 4).float(), mask))
            requests.append((parents, len(row_tokens), alive))
            row_tokens += [rng.randint(0, 3), *tokens]
            target += rows
        logits = torch.nn.functional.one_hot(torch.tensor(target), 4).float()  # [T, V]
        assert accept_greedy_packed(requests, row_tokens, logits) == expected
