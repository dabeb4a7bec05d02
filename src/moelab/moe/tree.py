"""Tree routing: experts on the edges of a perfect b-ary tree, tokens routed along root-to-leaf paths.

Layout (heap order). Internal nodes 0 .. n_nodes-1, level ℓ holding the b^ℓ nodes from (b^ℓ-1)/(b-1) on;
child c of node i is node b·i + c + 1. One expert per edge: expert e = b·i + c leads from node i to node
e + 1, so the experts of each depth d (1 = the root's children) are contiguous, and E = b·n_nodes
= b·(b^L - 1)/(b - 1) for L decision levels. Every node has a softmax over its b branches.

Scores. A path's score is the product of its branch probabilities (a sum of log-probabilities here). A
token takes its top_k best paths; an expert's mixing weight is the product of the (unbiased) branch
probabilities from the root down to it, summed over the selected paths through it.

Exact search without enumerating the b^L paths (`topk_paths`). Let B(n) be the best log-score of a
completion from node n to a leaf (B = 0 at leaves), computed bottom-up:
B(n) = max_c [log q(n,c) + B(b·n+c+1)].
For a prefix p ending at node n, v(p) = s(p) + B(n) is the score of the best path through p. The search
goes level by level and keeps the k prefixes with the largest v (fewer while fewer exist). Exactness:
let π_k be the k-th best path score and p a prefix of a top-k path, so v(p) ≥ π_k. If k other prefixes
of p's level had v > v(p), their best completions would be k distinct paths (distinct prefixes) scoring
more than π_k, which is impossible; so p is among the k kept (up to exact ties in v, broken by topk).
By induction every prefix of every top-k path survives, and the last level ranks the complete paths by
their exact scores. Cost per token: O(E) for B plus O(L·k·b) for the search, vectorised over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.moe.routing import RoutingInfo


def tree_nodes(branches: int, depth: int) -> int:
    """Internal nodes of a perfect b-ary tree with `depth` decision levels: (b^L - 1)/(b - 1)."""
    return (branches**depth - 1) // (branches - 1)


def tree_experts(branches: int, depth: int) -> int:
    """Edges (experts) of the tree: b·(b^L - 1)/(b - 1)."""
    return branches * tree_nodes(branches, depth)


def expert_depths(branches: int, depth: int) -> list[int]:
    """Depth (1 = the root's children) of each expert, in expert order: b^d experts at depth d."""
    return [d for d in range(1, depth + 1) for _ in range(branches**d)]


def tree_widths(branches: int, depth: int, d_expert: int) -> list[int]:
    """Hidden width of each expert: d_expert // b^d at depth d (integer arithmetic)."""
    return [d_expert // branches**d for d in expert_depths(branches, depth)]


def node_log_probs(logits: torch.Tensor, branches: int) -> torch.Tensor:
    """(T, E) logits -> (T, E) log branch probabilities: a log-softmax over each node's b edges."""
    T, E = logits.shape
    return logits.float().view(T, E // branches, branches).log_softmax(-1).view(T, E)


def best_completion(logq: torch.Tensor, branches: int, depth: int) -> torch.Tensor:
    """(T, E) log branch scores -> (T, E + 1) B(n) for every node n (internal and leaves; leaves 0)."""
    T, E = logq.shape
    best = logq.new_zeros(T, E + 1)  # nodes 0 .. E: the internal ones and the b^L leaves
    for level in reversed(range(depth)):
        lo, hi = tree_nodes(branches, level), tree_nodes(branches, level + 1)  # nodes of this level
        edges = slice(lo * branches, hi * branches)  # their experts; children are experts + 1
        children = slice(lo * branches + 1, hi * branches + 1)
        best[:, lo:hi] = (logq[:, edges] + best[:, children]).view(T, hi - lo, branches).amax(-1)
    return best


@torch.no_grad()
def topk_paths(logq: torch.Tensor, branches: int, depth: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k paths of each token (see the module docstring for why a beam of k suffices).

    logq: (T, E) log branch scores (-inf = edge not allowed). Returns experts (T, k, L) long, the path's
    expert at each depth, and scores (T, k) log path scores, best first (-inf = no such path).
    """
    T = logq.shape[0]
    best = best_completion(logq, branches, depth)  # (T, E + 1)
    node = torch.zeros(T, 1, dtype=torch.long, device=logq.device)  # (T, w) prefix end nodes
    score = logq.new_zeros(T, 1)  # (T, w) prefix log-scores
    path = node.new_empty(T, 1, 0)  # (T, w, ℓ) experts taken so far
    offsets = torch.arange(branches, device=logq.device)
    for _ in range(depth):
        w = node.shape[1]
        edges = (node[:, :, None] * branches + offsets).flatten(1)  # (T, w·b) candidate experts
        s = score.repeat_interleave(branches, dim=1) + logq.gather(1, edges)  # (T, w·b)
        v = s + best.gather(1, edges + 1)  # best path score through each candidate
        keep = v.topk(min(k, w * branches), dim=-1).indices  # (T, w')
        parent = keep // branches
        path = torch.cat([path.gather(1, parent[:, :, None].expand(-1, -1, path.shape[2])),
                          edges.gather(1, keep)[:, :, None]], dim=2)  # fmt: skip
        node, score = edges.gather(1, keep) + 1, s.gather(1, keep)
    return path, score


def paths_to_routing(
    paths: torch.Tensor, scores: torch.Tensor, logp: torch.Tensor, force: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts of the selected paths and their mixing weights.

    paths (T, k, L), scores (T, k) from `topk_paths`; logp (T, E) unbiased log branch probabilities
    (gradients flow through it). Slots list the experts path by path (best first), root to leaf, each
    expert once, then -1 with weight 0; width k·L. A `force`d expert goes to slot 0. Weight of expert e =
    Π (branch probabilities root..e) × the number of selected paths through e.
    """
    T, k, L = paths.shape
    ids = paths.flatten(1)  # (T, S), S = k·L
    S = ids.shape[1]
    valid = (scores > float("-inf"))[:, :, None].expand(T, k, L).flatten(1)  # (T, S)
    prefix = logp.gather(1, ids).view(T, k, L).cumsum(-1).exp().flatten(1)  # (T, S) Π probs root..e
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (T, S, S)
    earlier = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril(-1)
    keep = valid & ~(same & earlier).any(-1)  # first occurrence of each valid expert
    weights = torch.where(keep, prefix * same.sum(-1), 0.0)  # (T, S)
    key = torch.arange(S, device=ids.device) + S * (~keep)  # kept in order, the rest at the end
    if force is not None:
        key = torch.where(keep & (ids == force), -1, key)
    order = key.argsort(dim=-1, stable=True)
    return torch.where(keep, ids, -1).gather(1, order), weights.gather(1, order)


def tree_balance_loss(
    router_logits: list[torch.Tensor], branches: int, depth: int, k: int, valid: torch.Tensor | None
) -> torch.Tensor:
    """b · Σ_c f_c · P_c at every node, from the unbiased logits; 1 at perfect balance.

    At node n, among the real tokens reaching it (≥ 1 selected path through n): f_c = share of their
    selected paths through n that take branch c, P_c = their mean probability of branch c. A layer's
    loss is the mean of the node losses weighted by R_n, the tokens reaching n (the root weighs T; a
    node no token reaches weighs 0); layers are averaged. f has no gradient; P carries it.
    """
    per_layer = []
    for logits in router_logits:
        T, E = logits.shape
        w = torch.ones(T, device=logits.device) if valid is None else valid.reshape(-1).float()
        logp = node_log_probs(logits, branches)  # (T, E)
        edges = topk_paths(logp.detach(), branches, depth, k)[0].flatten(1)  # (T, k·L), all valid
        taken = torch.zeros(E, device=logits.device).scatter_add_(
            0, edges.flatten(), w[:, None].expand_as(edges).flatten()
        )  # (E,) (token, path) pairs through each edge
        reach = torch.zeros(T, E // branches, device=logits.device).scatter_(1, edges // branches, 1.0)
        reach = reach * w[:, None]  # (T, n_nodes) real tokens reaching each node
        probs = logp.exp().view(T, -1, branches)  # (T, n_nodes, b)
        tokens = reach.sum(0)  # (n_nodes,) R_n
        f = taken.view(-1, branches) / taken.view(-1, branches).sum(-1, keepdim=True).clamp(min=1)
        p = (reach[:, :, None] * probs).sum(0) / tokens.clamp(min=1)[:, None]  # (n_nodes, b)
        node_loss = branches * (f * p).sum(-1)  # (n_nodes,)
        per_layer.append((tokens * node_loss).sum() / tokens.sum().clamp(min=1))
    return torch.stack(per_layer).mean()


def tree_z_loss(router_logits: list[torch.Tensor], branches: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens and nodes of logsumexp(node logits)², averaged over layers."""
    per_layer = []
    for logits in router_logits:
        T = logits.shape[0]
        w = torch.ones(T, device=logits.device) if valid is None else valid.reshape(-1).float()
        z = logits.float().view(T, -1, branches).logsumexp(-1).square().mean(-1)  # (T,)
        per_layer.append((z * w).sum() / w.sum().clamp(min=1))
    return torch.stack(per_layer).mean()


class TreeRouter(nn.Module):
    """All node routers as one bias-free Linear(D → E), E = b·n_nodes; the router protocol of
    moe/routing.py with top_k paths.

    Loss-free balancing adds `balance_bias` (E,) to the node logits before each node's softmax, for
    selection only (so biased scores stay probabilities and the search's bound holds); |bias| is
    clamped to `bias_clamp`. Mixing weights and `RoutingInfo.router_logits` are unbiased.
    """

    def __init__(self, d_model: int, branches: int, depth: int, top_k: int, bias_clamp: float = 1.0):
        super().__init__()
        self.branches, self.depth, self.top_k, self.bias_clamp = branches, depth, top_k, bias_clamp
        self.n_experts = tree_experts(branches, depth)
        self.weight = nn.Parameter(torch.empty(self.n_experts, d_model))  # (E, D)
        self.register_buffer("balance_bias", torch.zeros(self.n_experts))  # (E,) fp32, saved

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # keep the bias fp32 under .to(bf16): ±rate steps must not vanish
        self.balance_bias.data = self.balance_bias.data.float()
        return self

    def forward(self, x: torch.Tensor) -> RoutingInfo:  # x: (T, D)
        logits = F.linear(x, self.weight).float()  # (T, E) unbiased
        topk_ids, topk_weights = self.select(logits)
        return RoutingInfo(logits, topk_ids, topk_weights.to(x.dtype))

    def select(
        self, logits: torch.Tensor, exclude: torch.Tensor | None = None, force: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The top_k paths under the biased scores; ids (T, k·L) and unbiased weights (T, k·L) fp32.

        exclude: (n,) experts whose edges cannot be taken (paths through them are dropped; a token with
        fewer than k paths left gets -1 slots). force: only paths through that edge are allowed (every
        other expert of its depth is excluded), and it is listed in slot 0; if an excluded ancestor
        leaves no such path, the token gets no routed expert.
        """
        b = self.branches
        scores = node_log_probs(logits.detach() + self.balance_bias, b)  # (T, E) selection scores
        blocked = torch.zeros(self.n_experts, dtype=torch.bool, device=logits.device)
        if exclude is not None and exclude.numel():
            blocked[exclude.to(logits.device)] = True
        if force is not None:
            d = expert_depths(b, self.depth)[force]
            blocked[tree_experts(b, d - 1) : tree_experts(b, d)] = True
            blocked[force] = False
        scores = scores.masked_fill(blocked, float("-inf"))
        paths, path_scores = topk_paths(scores, b, self.depth, self.top_k)
        return paths_to_routing(paths, path_scores, node_log_probs(logits, b), force)

    @torch.no_grad()
    def update_balance_bias(self, counts: torch.Tensor, rate: float) -> None:
        """Move each branch's bias by ±rate toward the mean count of its node's b branches.

        counts: (E,) tokens routed to each expert since the last update (padding excluded).
        """
        c = counts.to(self.balance_bias.device, torch.float32).view(-1, self.branches)  # (n_nodes, b)
        step = rate * torch.sign(c.mean(-1, keepdim=True) - c)
        self.balance_bias.add_(step.flatten()).clamp_(-self.bias_clamp, self.bias_clamp)
