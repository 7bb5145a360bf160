"""STELLAR's pretraining losses and masking, as small pure torch functions.

Everything here follows section 4 of the STELLAR spec:

- `sinkhorn_knopp`: balanced soft cluster targets for every token of the global batch
  (distributed-aware, CAPI-style `stable_exp` and reduced column sums); `clustering_targets`
  applies it to head logits.
- `clustering_cross_entropy`: cross-entropy between those targets and the tempered head logits.
- `match_tokens` and `gather_matched_targets`: entropic optimal transport that pairs each
  masked-view sparse token with one sparse token of the main image, and the target lookup
  through that pairing; `matched_clustering_loss` chains them with the cross-entropy.
- `koleo_loss`: the Kozachenko-Leonenko regulariser, per image, over its sparse tokens.
- `masking_noise` and `kept_patch_indices`: MAE-style masking with optional "focal" noise, all
  randomness coming from an explicit `torch.Generator`.

Symbols in shapes: B images, V views (or B × views, rows image-major), r sparse tokens,
d width, C prototypes, T tokens, N patches.

The module imports nothing beyond torch, so it can travel with the model's remote code.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "all_reduce_if_distributed",
    "clustering_cross_entropy",
    "clustering_targets",
    "gather_matched_targets",
    "kept_patch_indices",
    "koleo_loss",
    "masking_noise",
    "match_tokens",
    "matched_clustering_loss",
    "num_kept_patches",
    "sinkhorn_knopp",
    "stable_exp",
]

# Constant added after subtracting the column maximum, before `exp`: large values keep
# small probabilities representable in wide dtypes; fp16 cannot hold exp(50), so it gets 0.
# (The original's table, inherited from CAPI; parity depends on it through the 1e-8 eps.)
_EXP_SHIFT = {torch.float16: 0.0}
_DEFAULT_EXP_SHIFT = 50.0


def _distributed_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_if_distributed(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce `tensor` in place across processes when `torch.distributed` is initialised.

    Args:
        tensor: any shape; must be identical in shape on every process.
        op: "sum" or "max".

    Returns:
        The same tensor object (reduced, or untouched in a single process).
    """
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
    if _distributed_ready():
        reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(tensor, op=reduce_op)
    return tensor


def stable_exp(scores: torch.Tensor) -> torch.Tensor:
    """Column-wise shifted exponential, the first step of Sinkhorn-Knopp.

    Each column (prototype) is shifted by its maximum over all rows (tokens) of the global
    batch, so the largest entry of every column becomes exp(50) (exp(0) in fp16).

    Args:
        scores: (..., T, C) in any floating dtype. Not modified.

    Returns:
        (..., T, C), same dtype as `scores`.
    """
    column_max = scores.amax(dim=-2, keepdim=True)
    # Every process must shift a column by the same amount, or the reduced column sums below
    # would mix differently scaled rows.
    all_reduce_if_distributed(column_max, op="max")
    shift = _EXP_SHIFT.get(scores.dtype, _DEFAULT_EXP_SHIFT)
    return (scores - column_max + shift).exp()


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, num_iterations: int = 3, eps: float = 1e-8) -> torch.Tensor:
    """Sinkhorn-Knopp soft assignments of tokens to prototypes (the clustering targets).

    The caller divides the logits by the target temperature (0.06 in STELLAR) first. In a
    distributed run each process passes its own rows; column statistics are all-reduced, so
    the result equals a single-process run on the concatenated rows.

    The original's order is kept: columns are normalised first, rows last, with `eps` added to
    every sum. Rows whose mass underflows in `exp` therefore do not sum to one; parity with
    the original's targets depends on reproducing that.

    Args:
        scores: (T, C) logits / temperature; rows are tokens, columns prototypes. Extra
            leading dimensions are treated as independent problems (columns are still
            reduced over the rows only). Not modified.
        num_iterations: number of (column, row) normalisation rounds.
        eps: added to every column and row sum.

    Returns:
        (T, C) assignments whose rows sum to ~1, computed in `scores`' dtype and returned in
        at least float32.
    """
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating tensor, got {scores.dtype}")
    if scores.dim() < 2:
        raise ValueError(f"scores must have shape (T, C), got {tuple(scores.shape)}")
    plan = stable_exp(scores)
    for _ in range(num_iterations):
        column_sums = all_reduce_if_distributed(plan.sum(dim=-2, keepdim=True), op="sum")
        plan = plan / (column_sums + eps)
        plan = plan / (plan.sum(dim=-1, keepdim=True) + eps)
    return plan.to(torch.promote_types(plan.dtype, torch.float32))


def clustering_targets(logits: torch.Tensor, temperature: float = 0.06, num_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp targets of head logits, over every token of the global batch.

    Args:
        logits: (B, T, C) prototype scores (any leading dimensions); not differentiated.
        temperature: the target temperature (0.06 in STELLAR), applied before Sinkhorn-Knopp.
        num_iterations: Sinkhorn-Knopp rounds.

    Returns:
        (B, T, C) float32 assignments: each token is a row of one (B * T, C) problem.
    """
    scores = logits.detach().flatten(0, -2) / temperature
    return sinkhorn_knopp(scores, num_iterations).view_as(logits).float()


def clustering_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 0.12) -> torch.Tensor:
    """Cross-entropy between soft targets and softmax(logits / temperature), averaged over tokens.

    Args:
        logits: (..., C) prototype scores of the predicting tokens.
        targets: (..., C) soft targets (e.g. Sinkhorn-Knopp assignments), same shape.
        temperature: prediction temperature (0.12 in STELLAR).

    Returns:
        Scalar tensor: mean over all leading positions of -sum_c targets * log_softmax.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same shape")
    log_probabilities = F.log_softmax(logits / temperature, dim=-1)
    return -(targets * log_probabilities).sum(dim=-1).mean()


@torch.no_grad()
def match_tokens(
    predictions: torch.Tensor,
    targets: torch.Tensor,
    epsilon: float = 0.1,
    num_iterations: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair each predicted token with a target token by entropic optimal transport.

    The cost is the plain (not squared) Euclidean distance; both marginals are all ones. The
    log-domain dual updates start from zero and alternate u (predictions) then v (targets);
    the plan is not renormalised afterwards, and the hard index is the argmax of each plan
    row, so two predictions may pick the same target (kept from the original, whose targets
    depend on this exact index).

    Args:
        predictions: (V, r, d) tokens of each masked view.
        targets: (V, r', d) the tokens to match against, one set per row of `predictions`
            (expand each image's tokens to all of its views before calling).
        epsilon: entropic regularisation.
        num_iterations: number of (u, v) dual update rounds.

    Returns:
        index: (V, r) int64, the target chosen for every prediction.
        plan: (V, r, r') float32 transport plan exp((u + v - cost) / epsilon).
    """
    if predictions.dim() != 3 or targets.dim() != 3:
        raise ValueError(
            f"predictions and targets must be (V, r, d) and (V, r', d), got {tuple(predictions.shape)} "
            f"and {tuple(targets.shape)}"
        )
    if predictions.shape[0] != targets.shape[0] or predictions.shape[2] != targets.shape[2]:
        raise ValueError(
            f"predictions {tuple(predictions.shape)} and targets {tuple(targets.shape)} must share their "
            "first and last dimensions (expand the targets to one copy per view first)"
        )
    # Distances in fp32 even for low-precision tokens: the duals are exponentiated at 1/epsilon.
    cost = torch.cdist(predictions.float(), targets.float(), p=2)  # (V, r, r')
    u = cost.new_zeros(cost.shape[:2])  # (V, r)
    v = cost.new_zeros(cost.shape[0], cost.shape[2])  # (V, r')
    for _ in range(num_iterations):
        u = -epsilon * torch.logsumexp((v.unsqueeze(1) - cost) / epsilon, dim=2)
        v = -epsilon * torch.logsumexp((u.unsqueeze(2) - cost) / epsilon, dim=1)
    plan = torch.exp((u.unsqueeze(2) + v.unsqueeze(1) - cost) / epsilon)
    return plan.argmax(dim=2), plan


def gather_matched_targets(assignments: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Look up, for every masked-view token, the target of the main-image token it matched.

    Args:
        assignments: (B, r', C) targets of the main images' tokens.
        index: (B * V, r) int64 from `match_tokens`, rows image-major (image 0 view 0,
            image 0 view 1, ..., image 1 view 0, ...), values in [0, r').

    Returns:
        (B * V, r, C): row k, token t holds assignments[k // V, index[k, t]].
    """
    batch_size, _, num_prototypes = assignments.shape
    if index.dim() != 2 or index.shape[0] % batch_size != 0:
        raise ValueError(
            f"index must be (B * V, r) with B = {batch_size}, got {tuple(index.shape)}"
        )
    num_views = index.shape[0] // batch_size
    num_targets = assignments.shape[1]
    # One lookup into the (B * r', C) rows, without materialising a per-view copy of the assignments.
    image = torch.arange(index.shape[0], device=index.device) // num_views
    return assignments.reshape(-1, num_prototypes)[image.unsqueeze(1) * num_targets + index]


def matched_clustering_loss(
    predicted_tokens: torch.Tensor,
    predicted_logits: torch.Tensor,
    target_tokens: torch.Tensor,
    assignments: torch.Tensor,
    *,
    temperature: float = 0.12,
    epsilon: float = 0.1,
    num_iterations: int = 5,
) -> torch.Tensor:
    """Each predicted token learns the clustering target of the target token it is matched to.

    The tokens of each view are matched to their image's target tokens (`match_tokens`), the
    targets looked up through that match (`gather_matched_targets`), and the cross-entropy taken
    against the tempered logits (`clustering_cross_entropy`).

    Args:
        predicted_tokens: (B * V, r, d) tokens of V views per image, rows image-major.
        predicted_logits: (B * V, r, C) their head logits.
        target_tokens: (B, r', d) the tokens to match against (no gradient flows to them).
        assignments: (B, r', C) the targets of those tokens.
        temperature: prediction temperature; epsilon, num_iterations: the matcher's.

    Returns:
        Scalar tensor, averaged over every predicted token.
    """
    num_views = predicted_tokens.shape[0] // target_tokens.shape[0]
    index, _ = match_tokens(
        predicted_tokens,
        target_tokens.repeat_interleave(num_views, dim=0),
        epsilon=epsilon,
        num_iterations=num_iterations,
    )
    return clustering_cross_entropy(predicted_logits, gather_matched_targets(assignments, index), temperature)


def koleo_loss(tokens: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy regulariser over the sparse tokens of each image.

    Tokens are L2-normalised; each one's nearest neighbour is searched among the other
    tokens of the same image only (largest dot product, on detached tensors). The loss
    pushes neighbours apart: -mean log(0.5 * ||x - nn(x)|| + eps). Computed in float32 with
    autocast disabled, since log of small distances is unreliable in half precision.

    With r = 1 a token has no other token and is its own neighbour: the loss is then a
    constant with zero gradient (as in the original).

    Args:
        tokens: (B, r, d).
        eps: used for the normalisation, inside the pairwise distance (as
            `nn.PairwiseDistance(2, eps=1e-8)`) and inside the log.

    Returns:
        Scalar float32 tensor (without the 0.1 weight STELLAR applies).
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, r, d), got {tuple(tokens.shape)}")
    device_type = tokens.device.type
    autocast_off = (
        torch.autocast(device_type=device_type, enabled=False)
        if torch.amp.is_autocast_available(device_type)
        else contextlib.nullcontext()
    )
    with autocast_off:
        normalized = F.normalize(tokens.float(), p=2, dim=-1, eps=eps)  # (B, r, d)
        with torch.no_grad():
            similarity = torch.bmm(normalized, normalized.transpose(1, 2))  # (B, r, r)
            # -1 (not -inf) excludes a token from its own search, as the original does; it only
            # differs for exactly antipodal neighbours.
            similarity.diagonal(dim1=1, dim2=2).fill_(-1.0)
            neighbour = similarity.argmax(dim=-1)  # (B, r)
        neighbours = normalized.gather(1, neighbour.unsqueeze(-1).expand_as(normalized))  # (B, r, d)
        distances = 0.5 * F.pairwise_distance(normalized, neighbours, p=2, eps=eps)  # (B, r)
        return -torch.log(distances + eps).mean()


def masking_noise(
    batch_size: int,
    grid_height: int,
    grid_width: int,
    focal_probability: float = 0.5,
    sigma_range: Sequence[float] = (0.1, 0.5),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-patch noise for `kept_patch_indices`, optionally "focal" (lowered around one patch).

    Uniform noise in [0, 1); for each row, with probability `focal_probability`, a Gaussian
    bump of height 1 is subtracted around a random patch, so the lowest-noise (kept) patches
    cluster around it. The bump's sigma is drawn uniformly in `sigma_range` as a fraction of
    the grid side; on a non-square grid the fraction applies to each side along its own axis
    (sigma_y = s * grid_height, sigma_x = s * grid_width), which keeps the bump covering the
    same fraction of the image in both directions and reduces to the original on square grids.

    All randomness comes from `generator` (the global RNG when it is None). The draws are
    made on the generator's device and then moved to `device`, so a CPU generator gives the
    same masks on any accelerator.

    Args:
        batch_size: number of rows B.
        grid_height, grid_width: patch grid (h, w); patches are numbered row-major.
        focal_probability: probability that a row gets the Gaussian bump.
        sigma_range: (low, high) bounds of the relative sigma.
        generator: source of all random numbers.
        device: where the result lives (default: the generator's device, else CPU).

    Returns:
        (B, h * w) float32 noise; lower means more likely to be kept.
    """
    if batch_size < 0 or grid_height < 1 or grid_width < 1:
        raise ValueError(f"invalid sizes: batch {batch_size}, grid {grid_height} x {grid_width}")
    if not 0.0 <= focal_probability <= 1.0:
        raise ValueError(f"focal_probability must be in [0, 1], got {focal_probability}")
    sigma_low, sigma_high = sigma_range
    if not 0.0 < sigma_low <= sigma_high:
        raise ValueError(f"sigma_range must satisfy 0 < low <= high, got {tuple(sigma_range)}")
    draw_device = generator.device if generator is not None else (device if device is not None else "cpu")
    num_patches = grid_height * grid_width

    noise = torch.rand(batch_size, num_patches, generator=generator, device=draw_device)
    center_x = torch.randint(0, grid_width, (batch_size, 1), generator=generator, device=draw_device)
    center_y = torch.randint(0, grid_height, (batch_size, 1), generator=generator, device=draw_device)
    relative_sigma = sigma_low + (sigma_high - sigma_low) * torch.rand(
        batch_size, 1, generator=generator, device=draw_device
    )
    focal = torch.rand(batch_size, 1, generator=generator, device=draw_device) < focal_probability

    rows = torch.arange(grid_height, device=draw_device).repeat_interleave(grid_width)  # (N,)
    cols = torch.arange(grid_width, device=draw_device).repeat(grid_height)  # (N,)
    dy2 = (rows.unsqueeze(0) - center_y).float().square() / (relative_sigma * grid_height).square()  # (B, N)
    dx2 = (cols.unsqueeze(0) - center_x).float().square() / (relative_sigma * grid_width).square()  # (B, N)
    bump = torch.exp(-0.5 * (dy2 + dx2))  # (B, N)
    noise = noise - bump * focal.float()
    return noise.to(device) if device is not None else noise


def num_kept_patches(num_patches: int, mask_ratio: float) -> int:
    """How many of `num_patches` patches masking keeps at `mask_ratio` (at least one).

    Truncates like the original (`int(N * (1 - ratio))`), floating-point error included, so
    sequence lengths match its checkpoints' training.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, int(num_patches * (1 - mask_ratio)))


def kept_patch_indices(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """MAE-style masking: the patches each row keeps, the lowest-noise ones.

    Args:
        noise: (B, N) per-patch noise, e.g. from `masking_noise`.
        mask_ratio: fraction of patches to remove; `num_kept_patches` gives the kept count.

    Returns:
        (B, N_keep) int64 patch indices (row-major in the patch grid), in increasing noise order.
    """
    if noise.dim() != 2:
        raise ValueError(f"noise must be (B, N), got {tuple(noise.shape)}")
    num_kept = num_kept_patches(noise.shape[1], mask_ratio)
    # A stable sort makes ties (e.g. hand-made noise) resolve the same way on every device.
    return torch.argsort(noise, dim=1, stable=True)[:, :num_kept]


def random_masking(
    sequence: torch.Tensor, noise: torch.Tensor, mask_ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deprecated: `kept_patch_indices`, which the models use. MAE-style masking of a sequence.

    Args:
        sequence: (B, N, D) patch embeddings (position embeddings already added).
        noise: (B, N) per-patch noise, e.g. from `masking_noise`.
        mask_ratio: fraction of patches to remove.

    Returns:
        kept: (B, N_keep, D) the kept patches, in increasing noise order.
        mask: (B, N) float32, 0 for kept and 1 for removed patches, in the original order.
        ids_restore: (B, N) int64, the permutation that undoes the noise sort.
    """
    warnings.warn(
        "random_masking is deprecated: use kept_patch_indices(noise, mask_ratio)", FutureWarning, stacklevel=2
    )
    batch_size, num_patches, width = sequence.shape
    if noise.shape != (batch_size, num_patches):
        raise ValueError(f"noise must be {(batch_size, num_patches)}, got {tuple(noise.shape)}")
    noise = noise.to(sequence.device)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = kept_patch_indices(noise, mask_ratio)
    kept = sequence.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, width))
    mask = torch.ones(batch_size, num_patches, device=sequence.device)
    mask[:, : ids_keep.shape[1]] = 0
    return kept, mask.gather(1, ids_restore), ids_restore
