"""Prompt lookup (n-gram) index: the context predicts itself. Torch-free, so the engine's n-gram
drafter (engine/drafters/ngram.py) and trace replay (traces/replay.py) look up the very same drafts.

The longest recent n-gram (max_n down to min_n) ending the context is searched for earlier in the
context; what followed it is proposed. With topk > 1 up to topk distinct continuations (most recent
match first) are merged into a trie by the drafter, so shared prefixes are verified once.

The lookup runs every decode step (also as a passive probe while another drafter drafts), so it
uses an index instead of rescanning the context: for each n in [min_n, max_n] a dict from n-gram
tuple to its start positions (ascending), an n-gram at s being indexed once a token follows it
(s + n < len(context)), which leaves out the suffix itself. The index syncs lazily with the context
it is given. Assumption: within one request the context only grows, so a context at least as long
as the indexed one that agrees on its first and last indexed token extends it, and only the new
tokens are indexed; anything else rebuilds. `prefill` (a new request) always rebuilds, since two
requests can pass that check. Results are identical to a brute-force scan of the context.

Cost (L = len(context), m = max_n - min_n + 1): memory L * m positions; sync m tuple builds per new
token; lookup at most m dict probes, then a walk over the matched n-gram's occurrences, most recent
first, until `count` distinct continuations are found (one step for count == 1; all occurrences
only when fewer than `count` distinct ones exist).

`lookahead` tells a policy, before it decides a step, what an n-gram chain would draft there: the
order of the matched n-gram (0: no match) and the chain. Acceptance depends strongly on the order
(on the sample traces the first drafted token was right 25% of the time after a 1-gram match and 92%
after a 4-gram match), which is why the order is worth knowing before choosing a drafter.
"""
from __future__ import annotations

MAX_N, MIN_N = 4, 1  # the n-gram orders the drafter matches unless told otherwise (traces record theirs)


def check_orders(max_n: int, min_n: int) -> None:
    """The one rule for n-gram orders, for the drafter and for a trace's header alike."""
    if not 1 <= min_n <= max_n:
        raise ValueError(f"the n-gram drafter needs 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")


class NgramIndex:
    """n-gram -> start positions, per n in [min_n, max_n], kept in sync with a growing context."""

    def __init__(self, max_n: int = MAX_N, min_n: int = MIN_N):
        check_orders(max_n, min_n)
        self.max_n, self.min_n = max_n, min_n
        self._reset()

    def _reset(self) -> None:
        self._index: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: {} for n in range(self.min_n, self.max_n + 1)}
        self._len = 0  # length of the indexed context; _first/_last are its first and last token
        self._first = self._last = None

    def _sync(self, context: list[int]) -> None:
        """Index the tokens of `context` not indexed yet (rebuild unless it extends the indexed one)."""
        end, old = len(context), self._len
        if old and not (end >= old and context[0] == self._first and context[old - 1] == self._last):
            self._reset()
            old = 0
        if end == old:
            return
        for n, grams in self._index.items():
            for s in range(max(0, old - n), end - n):
                key = tuple(context[s:s + n])
                starts = grams.get(key)
                if starts is None:
                    grams[key] = [s]
                else:
                    starts.append(s)
        self._len, self._first, self._last = end, context[0], context[-1]

    def prefill(self, prompt_ids: list[int]) -> None:
        self._reset()
        self._sync(list(prompt_ids))

    def continuations(self, context: list[int], length: int, count: int) -> list[list[int]]:
        """Up to `count` distinct continuations of at most `length` tokens, longest n-gram match first."""
        self._sync(context)
        found: list[list[int]] = []
        end = len(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            for start in reversed(self._index[n].get(tuple(context[end - n:]), ())):
                cont = context[start + n:start + n + length]
                if cont and cont not in found:
                    found.append(cont)
                    if len(found) == count:
                        return found
            if found:
                return found
        return found

    def lookahead(self, context: list[int], length: int) -> tuple[int, list[int]]:
        """(order, chain): the longest n-gram order that matches the end of `context` (0: none) and
        the most recent continuation after it, at most `length` tokens: the count-1 draft."""
        self._sync(context)
        end = len(context)
        for n in range(min(self.max_n, end - 1), self.min_n - 1, -1):
            starts = self._index[n].get(tuple(context[end - n:]))
            if starts:
                return n, context[starts[-1] + n:starts[-1] + n + length]
        return 0, []
