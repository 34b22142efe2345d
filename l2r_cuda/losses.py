"""Auxiliary losses and regularizers for MoE routers (pure PyTorch, any device).

Every function takes plain tensors, so they work with the L2R router, the linear baseline router and
any router that fills a :class:`l2r_cuda.RouteOutput`. With several MoE layers, compute the
loss per layer and sum (or average) over layers.

- ``load_balancing_loss``: Switch Transformer load-balancing loss over one micro-batch
- ``sequence_load_balancing_loss``: DeepSeek-V3 sequence-wise balance loss (per sequence, averaged)
- ``global_load_balancing_loss``: the Switch loss over the global batch of a process group
- ``router_z_loss``: ST-MoE router z-loss
- ``update_expert_bias_``: DeepSeek-V3 auxiliary-loss-free balancing (in-place bias update)
- ``spectral_norm``, ``spectral_norm_penalty``: SR-MoE, the router weight's largest singular value
- ``stable_rank``, ``stable_rank_penalty``: SR-MoE, keep the router weight's stable rank high
- ``apply_spectral_norm_constraint_``: SR-MoE, rescale a weight in place so that sigma_max <= c
- ``dense_routing_weights``: ``[T, k]`` top-k weights scattered to ``[T, E]`` (RoMA input)
- ``roma_loss``: RoMA routing-manifold alignment
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "load_balancing_loss",
    "sequence_load_balancing_loss",
    "global_load_balancing_loss",
    "router_z_loss",
    "update_expert_bias_",
    "spectral_norm",
    "spectral_norm_penalty",
    "stable_rank",
    "stable_rank_penalty",
    "apply_spectral_norm_constraint_",
    "dense_routing_weights",
    "roma_loss",
]


def _as_float(t: Tensor) -> Tensor:
    # float32 math for every input dtype, except float64 stays float64 (gradcheck, analysis).
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------------
# Load balancing
# --------------------------------------------------------------------------------------------------


def _check_statistics(fn: str, tokens_per_expert: Tensor, mean_probs: Tensor, dim: int, shape: str) -> None:
    if tokens_per_expert.shape != mean_probs.shape or tokens_per_expert.dim() != dim:
        raise ValueError(f"{fn}(): tokens_per_expert and mean_probs must both be {shape}, got "
                         f"{tuple(tokens_per_expert.shape)} and {tuple(mean_probs.shape)}")


def _switch_loss_rows(counts: Tensor, mean_probs: Tensor) -> Tensor:
    """``E * sum_e f_e P_e`` per row of ``[..., E]`` statistics, ``f_e = n_e / sum_e n_e`` (0 for a
    row without tokens). ``counts`` is already in ``mean_probs``' float dtype and detached."""
    # fp32 counts are exact up to 2^24 per expert; beyond that f_e only loses ~1e-7 relative.
    # Counts may be fractional (e.g. averaged over gradient-accumulation steps): guard 0, not < 1.
    total = counts.sum(-1, keepdim=True)
    fraction = counts / torch.where(total > 0, total, torch.ones_like(total))
    return mean_probs.shape[-1] * torch.sum(fraction * mean_probs, dim=-1)


def load_balancing_loss(tokens_per_expert: Tensor, mean_probs: Tensor) -> Tensor:
    r"""Switch Transformer load-balancing loss (Fedus et al., 2021, arXiv 2101.03961, eq. 4-6) of
    one micro-batch.

    .. math::  L = E \sum_e f_e P_e, \qquad f_e = \frac{n_e}{T k}, \qquad P_e = \frac{1}{T}\sum_t \hat p_{t,e}

    ``tokens_per_expert`` ``[E]`` (integer) holds ``n_e``, the number of tokens that picked expert
    ``e`` among their top-k; ``T k = sum_e n_e``, so ``f_e`` sums to 1. ``mean_probs`` ``[E]`` holds
    ``P_e`` (differentiable; the gradient flows only through it, ``f_e`` is a count). Pass the
    router's ``RouteOutput.tokens_per_expert`` and ``RouteOutput.mean_probs``.

    The *balancing probability* :math:`\hat p` is the routing probability ``p`` for
    ``score="softmax"`` and ``p / sum_e p`` for ``score="sigmoid"`` (the router's ``mean_probs``
    holds it; Megatron-Core normalises sigmoid scores the same way for its aux losses): raw sigmoid
    scores do not sum to 1, and with them the loss would start near ``E/2`` instead of 1.

    Padding: route with ``padding_mask`` and both statistics cover the real tokens only (``T`` is
    then the number of real tokens), as Megatron-Core's padding-aware aux loss.

    The loss is 1 for perfectly uniform routing (``f_e = P_e = 1/E``) and grows toward ``E`` as
    routing collapses. With no tokens (``sum n_e = 0``) it is 0. Returns a float32 scalar (float64
    for float64 input). See :func:`sequence_load_balancing_loss` and
    :func:`global_load_balancing_loss` for the other balancing scopes.
    """
    _check_statistics("load_balancing_loss", tokens_per_expert, mean_probs, 1, "[E]")
    mean_probs = _as_float(mean_probs)
    return _switch_loss_rows(tokens_per_expert.detach().to(mean_probs.dtype), mean_probs)


def sequence_load_balancing_loss(tokens_per_expert: Tensor, mean_probs: Tensor) -> Tensor:
    r"""DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eq. 17-20),
    without its coefficient :math:`\alpha`.

    For each sequence ``b`` of ``T_b`` tokens,

    .. math::  L_b = E \sum_e f_{b,e} P_{b,e}, \qquad f_{b,e} = \frac{n_{b,e}}{T_b k}, \qquad
               P_{b,e} = \frac{1}{T_b} \sum_{t \in b} \hat p_{t,e}

    (DeepSeek-V3 writes :math:`f_i = \frac{E}{k T}\sum_t 1(\cdot)`, the same product), and the loss
    is the mean of :math:`L_b` over the sequences. ``tokens_per_expert`` ``[B, E]`` (integer) and
    ``mean_probs`` ``[B, E]`` are the per-sequence statistics the router returns with
    ``seq_len=S`` (one fused pass over all ``B*S`` tokens, ``x`` of shape ``[B, S, d]`` or
    ``[B*S, d]``); :math:`\hat p` is the balancing probability of :func:`load_balancing_loss`
    (``p / sum_e p`` for sigmoid scores, as DeepSeek-V3's normalised affinities).

    Padding (route with ``padding_mask``): ``T_b`` counts the real tokens of sequence ``b`` and the
    mean runs over the sequences that have at least one (an all-padding sequence has no balance to
    measure). Without padding this is exactly Megatron-Core's ``seq_aux_loss``; with padding
    Megatron-Core instead normalises every sequence by the batch's mean real length and divides by
    the batch size. Returns a float32 scalar (float64 for float64 input); 0 without tokens.
    """
    _check_statistics("sequence_load_balancing_loss", tokens_per_expert, mean_probs, 2, "[B, E]")
    mean_probs = _as_float(mean_probs)
    counts = tokens_per_expert.detach().to(mean_probs.dtype)
    per_sequence = _switch_loss_rows(counts, mean_probs)  # [B], 0 for a sequence without tokens
    num_sequences = (counts.sum(-1) > 0).sum().clamp_min(1)
    return per_sequence.sum() / num_sequences


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) over ``group`` whose backward needs no communication.

    The gradient of a sum over ranks with respect to one rank's term is the sum over ranks of the
    upstream gradients. :func:`global_load_balancing_loss` gives every rank the same value, so
    every rank gets the same upstream gradient and that sum is ``world_size`` times the local one.
    """

    @staticmethod
    def forward(ctx, local: Tensor, group) -> Tensor:
        ctx.world_size = dist.get_world_size(group)
        total = local.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.world_size, None


def global_load_balancing_loss(tokens_per_expert: Tensor, mean_probs: Tensor, group=None) -> Tensor:
    r"""The Switch load-balancing loss of the *global* batch: the micro-batches of every rank of
    ``group`` (a ``torch.distributed`` process group, ``None``: the default group) taken together
    (Qiu et al., "Demons in the Detail", arXiv 2501.11873; Megatron-Core's ``global_aux_loss``).

    Each rank passes its own router statistics (``[E]``, as for :func:`load_balancing_loss`). With
    ``N_r = sum_e n^r_e`` (``k`` times rank ``r``'s real tokens),

    .. math::  n_e = \sum_r n^r_e, \qquad P_e = \frac{\sum_r N_r P^r_e}{\sum_r N_r}, \qquad
               L = E \sum_e \frac{n_e}{\sum_{e'} n_{e'}} P_e

    which is :func:`load_balancing_loss` of the concatenated batch (padding excluded as there).
    Communication: one all-reduce of ``2E`` float64 numbers in the forward (the counts, exact up to
    2^53, and the token-weighted probabilities ``N_r P^r``), none in the backward. Every rank
    returns the same value ``L`` and must call this together (a collective). The backward gives
    rank ``r`` the gradient ``world_size * dL/dP^r``: averaged over the ranks, as data-parallel
    training does with gradients, that is exactly the gradient of ``L``, i.e. single-process
    training on the global batch (scale the loss by ``1/world_size`` if your gradients are summed
    rather than averaged). Megatron-Core attaches to each rank only its share of ``L`` (its value
    is ``L`` split over the ranks) and also averages the counts over gradient-accumulation steps,
    which is left to the caller here. Returns a float32 scalar (float64 for float64 input).
    """
    _check_statistics("global_load_balancing_loss", tokens_per_expert, mean_probs, 1, "[E]")
    num_experts = mean_probs.shape[0]
    mean_probs = _as_float(mean_probs)
    counts = tokens_per_expert.detach().to(torch.float64)
    weighted_probs = counts.sum() * mean_probs.to(torch.float64)  # N_r P^r_e, differentiable
    total = _SumOverGroup.apply(torch.cat([counts, weighted_probs]), group)
    global_counts, global_weighted = total[:num_experts], total[num_experts:]
    num_slots = global_counts.sum()
    global_mean_probs = global_weighted / torch.where(num_slots > 0, num_slots, torch.ones_like(num_slots))
    return _switch_loss_rows(global_counts, global_mean_probs).to(mean_probs.dtype)


def router_z_loss(lse: Tensor) -> Tensor:
    r"""Router z-loss (Zoph et al., ST-MoE, 2022, arXiv 2202.08906, eq. 5).

    .. math::  L_z = \frac{1}{T} \sum_t \Big(\log \sum_e e^{l_{t,e}}\Big)^2

    ``lse`` ``[T]`` is ``RouteOutput.lse``, the per-token log-sum-exp of the router logits.
    Penalises large logits, which keeps the softmax out of its saturated, round-off-prone regime.
    Returns a float32 scalar (float64 for float64 input; 0 for ``T = 0``).
    """
    lse = _as_float(lse)
    if lse.numel() == 0:
        return lse.sum()  # zero, still attached to the graph
    return lse.pow(2).mean()


@torch.no_grad()
def update_expert_bias_(expert_bias: Tensor, tokens_per_expert: Tensor, rate: float = 1e-3) -> Tensor:
    r"""Auxiliary-loss-free load balancing: one in-place update of the selection bias.

    DeepSeek-V3 (arXiv 2412.19437, sec. 2.1.2): after each step, with ``n_e`` the number of tokens
    routed to expert ``e`` and :math:`\bar n = \frac1E \sum_e n_e`,

    .. math::  b_e \leftarrow b_e + \gamma \,\operatorname{sign}(\bar n - n_e)

    so overloaded experts become less likely to be selected and underloaded ones more likely. The
    bias only enters top-k *selection*, never the routing weights (``route(..., expert_bias=b)``).

    ``expert_bias`` must be a float32 ``[E]`` tensor (the router's buffer) and is modified in place
    without autograd; ``tokens_per_expert`` ``[E]`` is an integer count (all-reduce it over data
    parallel ranks first if the bias must stay identical across ranks). The sign is computed in exact
    integer arithmetic as ``sign(sum_e n_e - E n_e)``, so ties with the mean give exactly 0.
    Returns ``expert_bias``.
    """
    if expert_bias.dtype != torch.float32:
        raise TypeError(f"update_expert_bias_(): expert_bias must be float32 state, got {expert_bias.dtype}")
    if tokens_per_expert.shape != expert_bias.shape or expert_bias.dim() != 1:
        raise ValueError(
            "update_expert_bias_(): expert_bias and tokens_per_expert must both be [E], got "
            f"{tuple(expert_bias.shape)} and {tuple(tokens_per_expert.shape)}"
        )
    if tokens_per_expert.is_floating_point() or tokens_per_expert.is_complex():
        raise TypeError(f"update_expert_bias_(): tokens_per_expert must be integer counts, got {tokens_per_expert.dtype}")
    counts = tokens_per_expert.to(device=expert_bias.device, dtype=torch.int64)
    num_experts = counts.shape[0]
    direction = torch.sign(counts.sum() - num_experts * counts)  # int64, in {-1, 0, 1}
    expert_bias.add_(direction.to(torch.float32), alpha=rate)
    return expert_bias


# --------------------------------------------------------------------------------------------------
# SR-MoE: spectral regularization of the router weight
# --------------------------------------------------------------------------------------------------


def spectral_norm(weight: Tensor) -> Tensor:
    r"""Exact largest singular value :math:`\sigma_{\max}(W)` of ``weight`` (``[..., m, n]``), float32
    (float64 for float64 input).

    Computed with ``torch.linalg.matrix_norm(ord=2)`` (an SVD): the router projection is only
    ``r x d`` (or ``E x d`` for a linear router), so no power-iteration estimate is needed.
    Differentiable (gradient ``u_1 v_1^T``, well defined when the top singular value is simple).
    """
    return torch.linalg.matrix_norm(_as_float(weight), ord=2)


def spectral_norm_penalty(weight: Tensor, max_norm: float = 0.0) -> Tensor:
    r"""SR-MoE (arXiv 2601.03889) spectral-norm penalty on a router weight ``W`` (e.g. ``router.proj``).

    .. math::  L_\sigma = \max\big(0,\ \sigma_{\max}(W) - c\big)^2

    The router's Lipschitz constant in its input is bounded by :math:`\sigma_{\max}(W)` (times the
    bounded SIPS factors), so penalising it bounds how much a small input change can move the
    routing. ``max_norm = c = 0`` (default) gives the plain :math:`\sigma_{\max}(W)^2` penalty; ``c > 0``
    only penalises the part above the bound (a soft version of
    :func:`apply_spectral_norm_constraint_`). Batched weights ``[..., m, n]`` are summed.
    """
    sigma = spectral_norm(weight)
    return torch.clamp(sigma - max_norm, min=0.0).pow(2).sum()


def stable_rank(weight: Tensor) -> Tensor:
    r"""Stable rank :math:`\|W\|_F^2 / \|W\|_2^2` of ``weight`` ``[..., m, n]`` (float32).

    A smooth lower bound of the rank: 1 when ``W`` is rank one, ``min(m, n)`` when all singular
    values are equal. (SR-MoE, arXiv 2601.03889.)
    """
    w = _as_float(weight)
    frobenius_sq = w.pow(2).sum(dim=(-2, -1))
    return frobenius_sq / spectral_norm(w).pow(2)


def stable_rank_penalty(weight: Tensor) -> Tensor:
    r"""SR-MoE (arXiv 2601.03889) stable-rank penalty: :math:`L_{sr} = -\|W\|_F^2 / \|W\|_2^2`.

    Minimising it raises the stable rank of the router weight, so the routing space keeps several
    useful directions instead of collapsing onto the top singular vector (feature diversity).
    Batched weights ``[..., m, n]`` are summed. Scale-invariant in ``W``; combine with
    :func:`spectral_norm_penalty` or :func:`apply_spectral_norm_constraint_` to also bound the norm.
    """
    return -stable_rank(weight).sum()


@torch.no_grad()
def apply_spectral_norm_constraint_(weight: Tensor, max_norm: float = 1.0) -> Tensor:
    r"""SR-MoE hard constraint: rescale ``weight`` in place so that :math:`\sigma_{\max}(W) \le c`.

    .. math::  W \leftarrow W \cdot \min\big(1,\ c / \sigma_{\max}(W)\big)

    Call it after ``optimizer.step()`` (a projection onto the constraint set). For a batched
    ``[..., m, n]`` weight each matrix is rescaled on its own. Runs without autograd; the SVD is done
    in float32 (float64 input stays float64). Returns the singular values before rescaling.
    """
    if max_norm <= 0:
        raise ValueError(f"apply_spectral_norm_constraint_(): max_norm must be > 0, got {max_norm}")
    sigma = spectral_norm(weight)
    factor = torch.clamp(max_norm / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), max=1.0)
    weight.mul_(factor[..., None, None].to(weight.dtype))
    return sigma


# --------------------------------------------------------------------------------------------------
# RoMA: routing manifold alignment
# --------------------------------------------------------------------------------------------------


def dense_routing_weights(weights: Tensor, indices: Tensor, num_experts: int) -> Tensor:
    """Scatter top-k routing ``weights [T, k]`` at ``indices [T, k]`` into a dense ``[T, E]`` tensor.

    Unselected experts get 0. Differentiable with respect to ``weights``. Average over a sample's
    tokens (and concatenate over layers) to build the per-sample routing vector of :func:`roma_loss`.
    """
    dense = weights.new_zeros(weights.shape[0], num_experts)
    return dense.scatter_add(1, indices.long(), weights)


def roma_loss(
    routing: Tensor,
    embeddings: Tensor,
    success: Optional[Tensor] = None,
    *,
    k: int = 3,
    sigma: Optional[float] = 1.0,
    weight: float = 1.0,
    detach_neighbors: bool = True,
) -> Tensor:
    r"""RoMA routing-manifold alignment loss (arXiv 2511.07419).

    For sample ``i`` with routing vector :math:`r_i` (``routing[i]``, the routing weights of all
    regularized layers concatenated, ``[N, L*E]``) and task embedding :math:`E_i` (``embeddings[i]``,
    ``[N, D]``), let :math:`\mathcal N_i` be its ``k`` nearest neighbours in embedding space among the
    samples ``j != i`` with ``success[j]`` true. Then

    .. math::

        w_{ij} = \frac{\exp(-\|E_i - E_j\|^2 / 2\sigma^2)}{\sum_{j' \in \mathcal N_i}
                 \exp(-\|E_i - E_{j'}\|^2 / 2\sigma^2)}, \qquad
        L = \lambda \cdot \frac{1}{|I|} \sum_{i \in I} \sum_{j \in \mathcal N_i} w_{ij}\,\|r_i - r_j\|^2

    where ``weight`` is :math:`\lambda` and :math:`I` is the set of samples that have at least one
    eligible neighbour.

    Decisions (the paper leaves them open):

    * **mean over i**, over the samples that have a neighbour (so the loss scale does not depend on
      the batch size nor on how many samples had no successful neighbour); 0 if there are none.
      Every sample ``i`` is pulled, successful or not; only successful samples serve as neighbours.
      Fewer than ``k`` eligible neighbours: all of them are used.
    * **neighbours are targets**: ``detach_neighbors=True`` (default) detaches :math:`r_j`, so the
      gradient moves only :math:`r_i` toward the successful routing patterns and never drags a
      successful sample's routing toward an unsuccessful one.
    * **embeddings are constants**: distances and :math:`w_{ij}` are computed from detached
      embeddings (the task embedding is a fixed feature, not trained by this loss).
    * ``sigma=None``: bandwidth from the median heuristic, :math:`\sigma` = median distance of the
      selected neighbour pairs (detached).

    RoMA trains only router parameters with this loss: give the optimizer step that uses it only
    the routers' parameters (see :func:`l2r_cuda.routers.router_parameters`).
    ``success`` ``[N]`` bool (None: all samples are eligible). Returns a float32 scalar (float64
    for float64 ``routing``).
    """
    if routing.dim() != 2 or embeddings.dim() != 2 or routing.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"roma_loss(): routing must be [N, L*E] and embeddings [N, D] with the same N, got "
            f"{tuple(routing.shape)} and {tuple(embeddings.shape)}"
        )
    if k < 1:
        raise ValueError(f"roma_loss(): k must be >= 1, got {k}")
    n = routing.shape[0]
    device = routing.device
    routing_f = _as_float(routing)
    if n == 0:
        return routing_f.sum() * 0.0
    emb = embeddings.detach().to(device=device, dtype=routing_f.dtype)
    sq_dist = torch.cdist(emb, emb).pow(2)  # [N, N]
    eligible = torch.ones(n, n, dtype=torch.bool, device=device)
    if success is not None:
        if success.shape != (n,):
            raise ValueError(f"roma_loss(): success must be [N] = [{n}], got {tuple(success.shape)}")
        eligible &= success.to(device=device, dtype=torch.bool)[None, :]
    eligible &= ~torch.eye(n, dtype=torch.bool, device=device)
    num_neighbors = min(k, n)
    masked = sq_dist.masked_fill(~eligible, float("inf"))
    nn_sq_dist, nn_index = torch.topk(masked, num_neighbors, dim=1, largest=False, sorted=True)
    valid = torch.isfinite(nn_sq_dist)  # [N, k']: fewer than k eligible -> trailing slots invalid
    if sigma is None:
        chosen = nn_sq_dist[valid]
        bandwidth_sq = chosen.sqrt().median().pow(2) if chosen.numel() else nn_sq_dist.new_tensor(1.0)
        bandwidth_sq = bandwidth_sq.clamp_min(torch.finfo(nn_sq_dist.dtype).tiny)
    else:
        if sigma <= 0:
            raise ValueError(f"roma_loss(): sigma must be > 0 or None, got {sigma}")
        bandwidth_sq = nn_sq_dist.new_tensor(float(sigma) ** 2)
    # Softmax over the valid neighbours of -d^2 / 2 sigma^2 is the normalised Gaussian kernel, and
    # stays finite where every raw kernel value underflows.
    logits = (-nn_sq_dist / (2.0 * bandwidth_sq)).masked_fill(~valid, float("-inf"))
    has_neighbor = valid.any(dim=1)
    kernel = torch.softmax(logits.masked_fill(~has_neighbor[:, None], 0.0), dim=1) * valid
    targets = routing_f.detach() if detach_neighbors else routing_f
    neighbor_routing = targets[nn_index]  # [N, k', L*E]
    sq_gap = (routing_f[:, None, :] - neighbor_routing).pow(2).sum(-1)  # [N, k']
    per_sample = (kernel * sq_gap).sum(1)  # [N]; samples without neighbours give 0
    count = has_neighbor.sum().clamp_min(1)
    return weight * per_sample.sum() / count
