"""Brute-force references for tree routing (models/hierarchical.py, moe/tree.py): every root-to-leaf path
of every token enumerated in plain Python, no search and no vectorisation. Used by test_hierarchical.py
and the contract tests. Node i's branch c is expert b·i + c and leads to node b·i + c + 1."""

from __future__ import annotations

import itertools
import math

import torch


def all_paths(b: int, depth: int) -> list[tuple[int, ...]]:
    """Every path as its experts, root to leaf, in leaf order."""
    paths = []
    for digits in itertools.product(range(b), repeat=depth):
        node, path = 0, []
        for c in digits:
            path.append(b * node + c)
            node = b * node + c + 1
        paths.append(tuple(path))
    return paths


def node_probs(row: list[float], b: int) -> list[float]:
    """Softmax over each node's b logits, for one token's (E,) logits."""
    out = []
    for i in range(0, len(row), b):
        m = max(row[i : i + b])
        ex = [math.exp(v - m) for v in row[i : i + b]]
        out += [v / sum(ex) for v in ex]
    return out


def reference_select(logits, b, depth, k, bias=None, exclude=(), force=None):
    """(ids (T, k·L) long, weights (T, k·L) float64) by enumerating all b^L paths per token."""
    T, E = logits.shape
    bias = [0.0] * E if bias is None else [float(v) for v in bias]
    paths = all_paths(b, depth)
    ids_out, w_out = [], []
    for row in logits.double().tolist():
        q = node_probs(row, b)  # unbiased: mixing weights
        qs = node_probs([v + bb for v, bb in zip(row, bias)], b)  # biased: selection
        allowed = [p for p in paths if not set(p) & set(exclude) and (force is None or force in p)]
        ranked = sorted(allowed, key=lambda p: -math.prod(qs[e] for e in p))[:k]
        order, weight = [], {}
        for p in ranked:
            prefix = 1.0
            for e in p:
                prefix *= q[e]
                weight[e] = weight.get(e, 0.0) + prefix
                if e not in order:
                    order.append(e)
        if force is not None and force in order:
            order.remove(force)
            order.insert(0, force)
        pad = k * depth - len(order)
        ids_out.append(order + [-1] * pad)
        w_out.append([weight[e] for e in order] + [0.0] * pad)
    return torch.tensor(ids_out, dtype=torch.long), torch.tensor(w_out, dtype=torch.float64)


def reference_balance(logits, b, depth, k, valid=None):
    """(load_balance, router_z) of one layer: per node b·Σ_c f_c·P_c over the real tokens reaching it,
    weighted by how many reach it; z = mean over real tokens and nodes of logsumexp(node logits)²."""
    T, E = logits.shape
    valid = [1] * T if valid is None else [int(v) for v in valid.reshape(-1).tolist()]
    paths = all_paths(b, depth)
    n_nodes = E // b
    taken = [[0] * b for _ in range(n_nodes)]
    reach = [[] for _ in range(n_nodes)]  # probabilities of the tokens reaching each node
    z, n_real = 0.0, 0
    for row, real in zip(logits.double().tolist(), valid):
        if not real:
            continue
        n_real += 1
        q = node_probs(row, b)
        z += sum(math.log(sum(math.exp(v) for v in row[i : i + b])) ** 2 for i in range(0, E, b)) / n_nodes
        ranked = sorted(paths, key=lambda p: -math.prod(q[e] for e in p))[:k]
        nodes = set()
        for p in ranked:
            for e in p:
                taken[e // b][e % b] += 1
                nodes.add(e // b)
        for n in nodes:
            reach[n].append(q[n * b : n * b + b])
    num = den = 0.0
    for n in range(n_nodes):
        if reach[n]:
            f = [t / sum(taken[n]) for t in taken[n]]
            P = [sum(r[c] for r in reach[n]) / len(reach[n]) for c in range(b)]
            num += len(reach[n]) * b * sum(fc * pc for fc, pc in zip(f, P))
            den += len(reach[n])
    return num / den, z / n_real
