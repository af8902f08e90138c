"""WTA-CRS (Winner-Take-All Column-Row Sampling): a linear layer that saves a sample of its input.

For ``y = x W^T + b`` over ``n`` token rows, the forward, the input gradient and the bias gradient are
exact. Only the weight gradient ``G = dY^T X = sum_t dy_t^T x_t`` is estimated, from k of the n rows:

    p_t  proportional to ||x_t|| * ||dy_t||  (||dy_t|| from this layer's cache of the previous backward
         at the same position; ||x_t|| alone while there is none), normalised to sum 1
    C    the |C| rows with the largest p ("winners"), kept exactly; |C| minimises (1 - P_C) / (k - |C|)
         over 1 <= |C| < k, and is 0 when that minimum is not below 1/k (then WTA cannot beat CRS)
    S    s = k - |C| rows drawn with replacement from the rest with probability p_t / (1 - P_C), each
         scaled by (1 - P_C) / (s * p_t)
    G^   = sum_{c in C} dy_c^T x_c + sum_{i in S} dy_i^T x_i * (1 - P_C) / (s p_i)

E[G^] = G for any fixed (C, p) with p > 0 on the support, so stale or missing gradient norms change
the variance, never the mean (unlike the reference implementation's epoch-0 path, which drops the
importance weights). k = max(floor(rho * n), k_min), capped at n; k = n keeps every row (exact).

Only the kept rows (pre-scaled) and their indices are saved, through ``save_for_backward`` so that
saved-tensor hooks see them. Backward's only side effect is recording its micro-batch's gradient
norms under the micro-batch's key, so it can be called more than once (zero-bubble schedules).

Tensor parallelism: every TP rank must use the same p and the same draws. The draws come from a
stream keyed by (seed, layer, step, first sample of the micro-batch); the norms are summed over the
TP group where a rank only sees a slice (row-parallel inputs, column-parallel output gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moetrain.dist.groups import rank_size
from moetrain.parallel.rng import stream_seed
from moetrain.parallel.weight_grad import weight_grad

__all__ = ["Sample", "choose_winners", "draw_sample", "importance_scale", "sampling_probs", "WTACRSConfig",
           "NormCache", "wtacrs_linear", "budget", "SampledWeightGrad", "norm_caches"]


@dataclass(frozen=True)
class WTACRSConfig:
    keep_ratio: float
    k_min: int = 10
    seed: int = 0


class NormCache:
    """Per-layer ``||dy||`` by sequence position: the mean over the previous step's whole global batch.

    Each backward records its micro-batch's per-position sums under the micro-batch's key (so a repeated
    backward overwrites rather than adds); ``finalize`` after the optimizer step sums them over the
    data-parallel group. The cache is therefore the same in every layout, and so are the draws.
    """

    def __init__(self):
        self.norms_S: torch.Tensor | None = None
        self._pending: dict[str, tuple[torch.Tensor, int]] = {}

    def record(self, key: str, sums_S: torch.Tensor, batch: int) -> None:
        self._pending[key] = (sums_S, batch)

    def finalize(self, group=None) -> None:
        """Fold the recorded micro-batches into ``norms_S`` (collective over ``group`` when given)."""
        if not self._pending:
            return
        total = torch.stack([v[0] for v in self._pending.values()]).sum(0)
        count = sum(v[1] for v in self._pending.values())
        t = torch.cat([total, torch.tensor([float(count)], dtype=total.dtype)])
        if dist.is_initialized() and rank_size(group)[1] > 1:
            dist.all_reduce(t, group=group)
        self.norms_S = t[:-1] / t[-1]
        self._pending.clear()

    def discard(self) -> None:
        """Drop the recorded micro-batches (a step whose update was skipped: its norms may not be finite)."""
        self._pending.clear()

    def lookup(self, seq_len: int, batch: int) -> torch.Tensor | None:
        if self.norms_S is None or self.norms_S.numel() != seq_len:
            return None
        return self.norms_S.repeat_interleave(batch)  # rows are [s, b] seq-major


@dataclass
class Sample:
    winners: torch.Tensor  # [|C|] row indices kept exactly
    drawn: torch.Tensor  # [s] row indices drawn with replacement
    scale: torch.Tensor  # [s] (1 - P_C) / (s p_i)
    p: torch.Tensor  # [n] float64 sampling probabilities


def budget(n: int, keep_ratio: float, k_min: int) -> int:
    return min(n, max(int(keep_ratio * n), k_min))


def sampling_probs(x_norm: torch.Tensor, g_norm: torch.Tensor | None = None) -> torch.Tensor:
    """p proportional to ||x_t|| (* ||dy_t||), float64, strictly positive where the product is."""
    a = x_norm.to(torch.float64)
    if g_norm is not None and float(g_norm.sum()) > 0:
        a = a * g_norm.to(torch.float64)
    total = a.sum()
    if not torch.isfinite(total) or total <= 0:
        return torch.full_like(a, 1.0 / a.numel())
    return a / total


def choose_winners(p: torch.Tensor, k: int) -> int:
    """|C| by the WTA rule: argmin over 1 <= c < k of (1 - P_C) / (k - c), if it beats CRS's 1/k."""
    if k <= 1:
        return 0
    top = torch.topk(p, k - 1).values
    mass = torch.cumsum(top, 0)
    c = torch.arange(1, k, dtype=torch.float64)
    score = (1.0 - mass) / (k - c)
    best = int(torch.argmin(score))
    return best + 1 if float(score[best]) < 1.0 / k else 0


def importance_scale(p: torch.Tensor, p_c: float, s: int, idx: torch.Tensor) -> torch.Tensor:
    """The weight of drawn row(s) ``idx``: (1 - P_C) / (s * p_i)."""
    return (1.0 - p_c) / (s * p[idx])


def draw_sample(p: torch.Tensor, k: int, generator: torch.Generator) -> Sample:
    n = p.numel()
    n_win = choose_winners(p, k)
    order = torch.argsort(p, descending=True, stable=True)
    winners = order[:n_win]
    rest = p.clone()
    rest[winners] = 0.0
    p_c = float(p[winners].sum()) if n_win else 0.0
    s = k - n_win
    if s == 0 or float(rest.sum()) <= 0:
        return Sample(winners, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64), p)
    drawn = torch.multinomial(rest, s, replacement=True, generator=generator)
    scale = importance_scale(p, p_c, s, drawn)
    assert n_win + s == k <= n
    return Sample(winners, drawn, scale, p)


def _sum_sq_over(t_N: torch.Tensor, group) -> torch.Tensor:
    if rank_size(group)[1] > 1:
        t_N = t_N.clone()
        dist.all_reduce(t_N, group=group)
    return t_N


class _WTACRSLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, cfg: WTACRSConfig, key: str, seq_len: int, cache: NormCache,
                x_group, g_group):
        y = F.linear(x, weight, bias)
        d_in = x.shape[-1]
        x2 = x.detach().reshape(-1, d_in)
        n = x2.shape[0]
        k = budget(n, cfg.keep_ratio, cfg.k_min)
        batch = n // seq_len if seq_len and n % seq_len == 0 else n
        ctx.seq_len, ctx.batch, ctx.cache, ctx.g_group, ctx.key = seq_len, batch, cache, g_group, key
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        if k >= n:  # exact: keep every row
            rows, idx = x2, torch.arange(n, device=x.device)
        else:
            x_sq = _sum_sq_over(x2.to(torch.float64).pow(2).sum(-1), x_group)
            g_norm = cache.lookup(seq_len, batch) if seq_len and n % seq_len == 0 else None
            p = sampling_probs(x_sq.sqrt().cpu(), g_norm)
            gen = torch.Generator().manual_seed(stream_seed(cfg.seed, key))
            sample = draw_sample(p, k, gen)
            idx = torch.cat([sample.winners, sample.drawn]).to(x.device)
            scale = torch.cat([torch.ones(sample.winners.numel(), dtype=torch.float64), sample.scale])
            rows = x2.index_select(0, idx) * scale.to(device=x.device, dtype=x.dtype).unsqueeze(-1)
        ctx.param = weight
        ctx.save_for_backward(rows, idx, weight)
        return y

    @staticmethod
    def backward(ctx, gy):
        rows, idx, weight = ctx.saved_tensors
        g2 = gy.reshape(-1, gy.shape[-1])
        grad_x = (gy @ weight).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g_rows = g2.index_select(0, idx)
            grad_w = weight_grad(ctx.param, lambda: g_rows.t() @ rows)
        grad_b = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.seq_len and g2.shape[0] == ctx.seq_len * ctx.batch:
            g_sq = _sum_sq_over(g2.detach().to(torch.float64).pow(2).sum(-1), ctx.g_group)
            ctx.cache.record(ctx.key, g_sq.sqrt().view(ctx.seq_len, ctx.batch).sum(1).cpu(), ctx.batch)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def wtacrs_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: WTACRSConfig, key: str,
                  *, seq_len: int = 0, cache: NormCache | None = None, x_group=None, g_group=None) -> torch.Tensor:
    """``F.linear`` whose weight gradient is the WTA-CRS estimate (see the module docstring).

    ``key`` names the draw's RNG stream (layer, step, micro-batch); ``x_group`` / ``g_group`` are the TP
    groups over which this rank holds only a slice of the input / output features (None: full).
    """
    return _WTACRSLinear.apply(x, weight, bias, cfg, key, seq_len, cache or NormCache(), x_group, g_group)


class SampledWeightGrad:
    """The weight-gradient strategy of one sampled linear, given to it at construction: its WTA-CRS
    config, the model's step streams (``step`` and ``sample_ids`` key each micro-batch's draw, the same on
    every TP rank and in the single-process run) and its own gradient-norm cache."""

    def __init__(self, cfg: WTACRSConfig, streams, name: str):
        self.cfg, self.streams, self.name = cfg, streams, name
        self.norm_cache = NormCache()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, *, x_group=None, g_group=None) -> torch.Tensor:
        first = self.streams.sample_ids[0] if len(self.streams.sample_ids) else 0
        return wtacrs_linear(x, weight, None, self.cfg, f"wtacrs/{self.name}/{self.streams.step}/{first}",
                             seq_len=x.shape[0], cache=self.norm_cache, x_group=x_group, g_group=g_group)


def norm_caches(model: torch.nn.Module) -> list[NormCache]:
    """The gradient-norm caches of every sampled linear in ``model`` (finalized after each optimizer step)."""
    return [m.wgrad.norm_cache for m in model.modules() if getattr(m, "wgrad", None) is not None]
