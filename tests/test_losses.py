"""Tests for `stellar_hf.losses_stellar`: parity with the original's loss pieces, then behaviour."""

import math

import pytest
import torch
import torch.nn.functional as F

from stellar_hf.losses_stellar import (
    all_reduce_if_distributed,
    clustering_cross_entropy,
    clustering_targets,
    gather_matched_targets,
    kept_patch_indices,
    koleo_loss,
    masking_noise,
    match_tokens,
    matched_clustering_loss,
    num_kept_patches,
    random_masking,
    sinkhorn_knopp,
)

ATOL = 1e-5
TARGET_TEMPERATURE = 0.06  # the original's Sinkhorn temperature; callers divide by it
VIEWS_PER_IMAGE = 2  # `match_predictions` holds two copies per image, rows image-major


@pytest.fixture
def expected(stellar_parity_dir):
    from safetensors.torch import load_file

    return load_file(str(stellar_parity_dir / "expected.safetensors"))


# ----------------------------------------------------------------------------- parity


def test_parity_sinkhorn(expected):
    # The fixture stores the raw input; "Sinkhorn-Knopp of the input / 0.06" means the
    # temperature is applied by the caller, as the clustering head does.
    output = sinkhorn_knopp(expected["sinkhorn_input"] / TARGET_TEMPERATURE, num_iterations=3)
    torch.testing.assert_close(output, expected["sinkhorn_output"], rtol=0, atol=ATOL)
    # The fixture exercises the underflow quirk: some rows do not sum to one.
    assert (output.sum(-1) < 0.5).any()


@pytest.mark.parametrize("prefix", ["", "cls_"])
def test_parity_clustering(expected, prefix):
    logits = expected[f"{prefix}clustering_logits"]  # (B, r, C) or (B, 1, C)
    assignments = expected[f"{prefix}clustering_assignments"]
    recomputed = sinkhorn_knopp(logits.flatten(0, 1) / TARGET_TEMPERATURE, num_iterations=3).view_as(logits)
    torch.testing.assert_close(recomputed, assignments, rtol=0, atol=ATOL)
    loss = clustering_cross_entropy(logits, assignments, temperature=0.12)
    torch.testing.assert_close(loss, expected[f"{prefix}clustering_loss"].squeeze(), rtol=0, atol=ATOL)


def test_parity_matching(expected):
    targets = expected["sparse"].repeat_interleave(VIEWS_PER_IMAGE, dim=0)  # (B * V, r, d)
    index, plan = match_tokens(expected["match_predictions"], targets, epsilon=0.1, num_iterations=5)
    assert torch.equal(index, expected["match_index"])
    torch.testing.assert_close(plan, expected["match_plan"], rtol=0, atol=ATOL)


def test_parity_masked_view_loss(expected):
    targets = gather_matched_targets(expected["clustering_assignments"], expected["match_index"])
    loss = clustering_cross_entropy(expected["masked_view_logits"], targets, temperature=0.12)
    torch.testing.assert_close(loss, expected["masked_view_loss"].squeeze(), rtol=0, atol=ATOL)


def test_parity_clustering_targets(expected):
    # The model's targets: Sinkhorn-Knopp of the head logits over every token of the batch, at temperature 0.06.
    for prefix in ("", "cls_"):
        targets = clustering_targets(expected[f"{prefix}clustering_logits"], TARGET_TEMPERATURE, num_iterations=3)
        torch.testing.assert_close(targets, expected[f"{prefix}clustering_assignments"], rtol=0, atol=ATOL)


def test_parity_matched_clustering_loss(expected):
    # Matching, target lookup and cross-entropy in one: the masked-view loss from the tokens themselves.
    loss = matched_clustering_loss(
        expected["match_predictions"],
        expected["masked_view_logits"],
        expected["sparse"],
        expected["clustering_assignments"],
        temperature=0.12,
        epsilon=0.1,
        num_iterations=5,
    )
    torch.testing.assert_close(loss, expected["masked_view_loss"].squeeze(), rtol=0, atol=ATOL)


def test_parity_koleo(expected):
    loss = koleo_loss(expected["sparse"])
    torch.testing.assert_close(loss, expected["koleo_loss"].squeeze(), rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------- Sinkhorn-Knopp


def test_sinkhorn_rows_and_columns():
    torch.manual_seed(0)
    scores = torch.randn(64, 8)
    num_tokens, num_prototypes = scores.shape
    assignments = sinkhorn_knopp(scores, num_iterations=3)
    assert assignments.shape == scores.shape and assignments.dtype == torch.float32
    torch.testing.assert_close(assignments.sum(-1), torch.ones(num_tokens), rtol=0, atol=1e-5)
    # Three rounds already nearly balance the prototypes; more rounds converge to T / C each.
    torch.testing.assert_close(
        assignments.sum(0), torch.full((num_prototypes,), num_tokens / num_prototypes), rtol=0.05, atol=0
    )
    converged = sinkhorn_knopp(scores, num_iterations=50)
    torch.testing.assert_close(
        converged.sum(0), torch.full((num_prototypes,), num_tokens / num_prototypes), rtol=1e-4, atol=0
    )


def test_sinkhorn_does_not_modify_input():
    scores = torch.randn(16, 5)
    before = scores.clone()
    sinkhorn_knopp(scores)
    assert torch.equal(scores, before)


def test_sinkhorn_is_shift_invariant_per_column():
    # The column-max shift must not change the result (it only guards against overflow).
    scores = torch.randn(20, 6, dtype=torch.float64)
    shifted = scores + torch.randn(1, 6, dtype=torch.float64) * 100
    torch.testing.assert_close(sinkhorn_knopp(scores), sinkhorn_knopp(shifted))
    assert sinkhorn_knopp(scores).dtype == torch.float64


def test_sinkhorn_fp16():
    torch.manual_seed(0)
    scores = torch.randn(32, 8) * 3
    half = sinkhorn_knopp(scores.half())
    assert half.dtype == torch.float32  # computed in fp16, returned in at least float32
    assert torch.isfinite(half).all()  # exp(+50) would overflow fp16; the fp16 shift is 0
    torch.testing.assert_close(half, sinkhorn_knopp(scores), rtol=0, atol=5e-3)


def test_sinkhorn_no_grad():
    scores = torch.randn(8, 4, requires_grad=True)
    assert not sinkhorn_knopp(scores).requires_grad


def test_all_reduce_single_process_is_identity():
    tensor = torch.arange(4.0)
    assert all_reduce_if_distributed(tensor) is tensor
    assert torch.equal(tensor, torch.arange(4.0))
    with pytest.raises(ValueError):
        all_reduce_if_distributed(tensor, op="mean")


def _sinkhorn_worker(rank, world_size, init_file, scores, split, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rows = scores[:split] if rank == 0 else scores[split:]
        torch.save(sinkhorn_knopp(rows, num_iterations=3), f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_sinkhorn_distributed_matches_single_process(tmp_path):
    torch.manual_seed(0)
    scores = torch.randn(37, 11) * 4  # odd row count: the two processes hold 18 and 19 rows
    split = 18
    torch.multiprocessing.spawn(
        _sinkhorn_worker,
        args=(2, str(tmp_path / "init"), scores, split, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    gathered = torch.cat([torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)])
    torch.testing.assert_close(gathered, sinkhorn_knopp(scores, num_iterations=3), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- cross-entropy


def test_clustering_cross_entropy_matches_soft_cross_entropy():
    logits = torch.randn(3, 5, 7)
    targets = torch.softmax(torch.randn(3, 5, 7), dim=-1)
    expected_loss = F.cross_entropy((logits / 0.12).flatten(0, 1), targets.flatten(0, 1))
    torch.testing.assert_close(clustering_cross_entropy(logits, targets, 0.12), expected_loss)
    with pytest.raises(ValueError):
        clustering_cross_entropy(logits, targets[:, :4])


# ----------------------------------------------------------------------------- matching


def test_match_recovers_permutations():
    generator = torch.Generator().manual_seed(0)
    num_views, num_tokens, width = 6, 8, 32
    targets = torch.randn(num_views, num_tokens, width, generator=generator)
    permutation = torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(num_views)])
    predictions = targets.gather(1, permutation.unsqueeze(-1).expand(-1, -1, width))
    predictions = predictions + 0.01 * torch.randn(predictions.shape, generator=generator)
    index, plan = match_tokens(predictions, targets)
    assert index.dtype == torch.int64 and index.shape == (num_views, num_tokens)
    assert torch.equal(index, permutation)
    assert plan.shape == (num_views, num_tokens, num_tokens)
    assert (plan >= 0).all() and not plan.requires_grad


def test_match_soft_plan_marginals():
    # The fixture's plan is nearly one-hot (distances >> epsilon); close tokens give a soft
    # plan whose target marginals are exact after the final v update.
    generator = torch.Generator().manual_seed(0)
    predictions = 0.05 * torch.randn(3, 5, 8, generator=generator)
    targets = 0.05 * torch.randn(3, 5, 8, generator=generator)
    _, plan = match_tokens(predictions, targets)
    assert plan.max() < 0.9
    torch.testing.assert_close(plan.sum(1), torch.ones(3, 5), rtol=0, atol=1e-5)
    torch.testing.assert_close(plan.sum(2), torch.ones(3, 5), rtol=0, atol=1e-2)


def test_match_allows_different_target_counts():
    predictions, targets = torch.randn(3, 4, 8), torch.randn(3, 6, 8)
    index, plan = match_tokens(predictions, targets)
    assert index.shape == (3, 4) and plan.shape == (3, 4, 6) and int(index.max()) < 6
    with pytest.raises(ValueError):
        match_tokens(predictions, torch.randn(2, 6, 8))


def test_gather_matched_targets_is_image_major():
    batch_size, num_views, num_tokens, num_prototypes = 2, 3, 4, 5
    assignments = torch.randn(batch_size, num_tokens, num_prototypes)
    index = torch.randint(0, num_tokens, (batch_size * num_views, num_tokens))
    gathered = gather_matched_targets(assignments, index)
    assert gathered.shape == (batch_size * num_views, num_tokens, num_prototypes)
    for row in range(batch_size * num_views):
        for token in range(num_tokens):
            assert torch.equal(gathered[row, token], assignments[row // num_views, index[row, token]])


# ----------------------------------------------------------------------------- KoLeo


def _koleo_reference(tokens, eps=1e-8):
    losses = []
    for image in F.normalize(tokens.double(), dim=-1, eps=eps):
        for i, token in enumerate(image):
            others = [j for j in range(len(image)) if j != i]
            j = max(others, key=lambda k: float(token @ image[k]))
            losses.append(-math.log(0.5 * float((token - image[j] + eps).norm()) + eps))
    return sum(losses) / len(losses)


def test_koleo_matches_reference_and_has_gradients():
    tokens = torch.randn(3, 5, 16, requires_grad=True)
    loss = koleo_loss(tokens)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_koleo_reference(tokens.detach()), abs=1e-5)
    loss.backward()
    assert torch.isfinite(tokens.grad).all() and tokens.grad.abs().sum() > 0


def test_koleo_under_autocast():
    tokens = torch.randn(2, 6, 16)
    reference = koleo_loss(tokens)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast_loss = koleo_loss(tokens)
        bf16_loss = koleo_loss(tokens.bfloat16())
    assert autocast_loss.dtype == torch.float32 and bf16_loss.dtype == torch.float32
    torch.testing.assert_close(autocast_loss, reference)  # autocast did not lower the precision
    torch.testing.assert_close(bf16_loss, koleo_loss(tokens.bfloat16().float()))


def test_koleo_pushes_tokens_apart():
    spread = torch.eye(4).unsqueeze(0)  # orthogonal tokens
    clumped = torch.ones(1, 4, 4) + 0.01 * torch.randn(1, 4, 4)  # nearly identical tokens
    assert koleo_loss(clumped) > koleo_loss(spread)


# ----------------------------------------------------------------------------- masking


def test_masking_noise_is_reproducible():
    def noise(seed):
        return masking_noise(8, 7, 7, generator=torch.Generator().manual_seed(seed))

    assert noise(0).shape == (8, 49) and noise(0).dtype == torch.float32
    assert torch.equal(noise(0), noise(0))
    assert not torch.equal(noise(0), noise(1))
    assert torch.equal(kept_patch_indices(noise(3), 0.8), kept_patch_indices(noise(3), 0.8))


def test_masking_noise_focal_probability_bounds():
    generator = torch.Generator().manual_seed(0)
    uniform = masking_noise(16, 5, 5, focal_probability=0.0, generator=generator)
    assert (uniform >= 0).all() and (uniform < 1).all()
    focal = masking_noise(16, 5, 5, focal_probability=1.0, generator=generator)
    assert (focal.min(dim=1).values < 0).all()  # every row got its bump (height 1 at the centre)


@pytest.mark.parametrize(
    ("num_patches", "mask_ratio", "expected_kept"),
    [(196, 0.8, 39), (16, 0.75, 4), (49, 0.0, 49), (16, 0.99, 1), (10, 0.9, 1)],
)
def test_kept_patch_indices_are_the_lowest_noise_patches(num_patches, mask_ratio, expected_kept):
    assert num_kept_patches(num_patches, mask_ratio) == expected_kept
    noise = torch.rand(3, num_patches, generator=torch.Generator().manual_seed(0))
    kept = kept_patch_indices(noise, mask_ratio)
    assert kept.shape == (3, expected_kept) and kept.dtype == torch.int64
    for row in range(3):
        assert kept[row].tolist() == noise[row].argsort()[:expected_kept].tolist()  # in increasing noise order


def test_kept_patch_indices_break_ties_in_patch_order():
    noise = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.5]])
    assert kept_patch_indices(noise, 0.4).tolist() == [[1, 3, 0]]


@pytest.mark.parametrize(
    ("num_patches", "mask_ratio", "expected_kept"),
    [(196, 0.8, 39), (16, 0.75, 4), (49, 0.0, 49), (16, 0.99, 1), (10, 0.9, 1)],
)
def test_deprecated_random_masking_counts(num_patches, mask_ratio, expected_kept):
    generator = torch.Generator().manual_seed(0)
    sequence = torch.randn(3, num_patches, 6)
    noise = torch.rand(3, num_patches, generator=generator)
    with pytest.warns(FutureWarning, match="kept_patch_indices"):
        kept, mask, ids_restore = random_masking(sequence, noise, mask_ratio)
    assert kept.shape == (3, expected_kept, 6)
    assert mask.shape == (3, num_patches) and mask.dtype == torch.float32
    assert torch.equal(mask.sum(1), torch.full((3,), float(num_patches - expected_kept)))
    # The kept patches are the lowest-noise ones, and exactly those with mask 0.
    lowest = noise.argsort(dim=1)[:, :expected_kept]
    assert torch.equal(kept, sequence.gather(1, lowest.unsqueeze(-1).expand(-1, -1, 6)))
    for row in range(3):
        assert torch.equal(kept[row], sequence[row][noise[row].argsort()[:expected_kept]])
        assert set((mask[row] == 0).nonzero().flatten().tolist()) == set(lowest[row].tolist())
    # ids_restore puts the kept patches back in place after appending the removed ones.
    filler = torch.zeros(3, num_patches - expected_kept, 6)
    restored = torch.cat([kept, filler], dim=1).gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, 6))
    torch.testing.assert_close(restored, sequence * (1 - mask).unsqueeze(-1))


def test_masking_validates():
    with pytest.raises(ValueError), pytest.warns(FutureWarning):
        random_masking(torch.randn(2, 9, 3), torch.rand(2, 8), 0.5)
    with pytest.raises(ValueError):
        kept_patch_indices(torch.rand(2, 8, 1), 0.5)
    with pytest.raises(ValueError):
        num_kept_patches(9, 1.0)


def _mean_pairwise_distance_of_kept(kept_indices, grid_height, grid_width):
    rows = torch.arange(grid_height).repeat_interleave(grid_width).float()
    cols = torch.arange(grid_width).repeat(grid_height).float()
    coordinates = torch.stack([rows, cols], dim=-1)
    distances = []
    for row in kept_indices:
        kept = coordinates[row]
        distances.append(torch.cdist(kept, kept).sum() / (len(kept) * (len(kept) - 1)))
    return torch.stack(distances).mean()


def test_focal_masking_clusters_kept_patches():
    grid, batch_size, mask_ratio = 14, 64, 0.8
    spreads = {}
    for focal_probability in (0.0, 1.0):
        generator = torch.Generator().manual_seed(0)
        noise = masking_noise(batch_size, grid, grid, focal_probability=focal_probability, generator=generator)
        spreads[focal_probability] = _mean_pairwise_distance_of_kept(kept_patch_indices(noise, mask_ratio), grid, grid)
    assert spreads[1.0] < 0.8 * spreads[0.0]


def test_masking_noise_non_square_grid():
    grid_height, grid_width, batch_size = 3, 12, 16
    seed = 5
    noise = masking_noise(batch_size, grid_height, grid_width, focal_probability=1.0,
                          generator=torch.Generator().manual_seed(seed))
    assert noise.shape == (batch_size, grid_height * grid_width)
    # The uniform part is the generator's first draw, so the bump can be recovered exactly.
    uniform = torch.rand(batch_size, grid_height * grid_width, generator=torch.Generator().manual_seed(seed))
    bump = (uniform - noise).view(batch_size, grid_height, grid_width).double()
    for row_bump in bump:
        center = int(row_bump.argmax())
        cy, cx = divmod(center, grid_width)
        assert row_bump[cy, cx] == pytest.approx(1.0, abs=1e-6)
        # sigma scales with each side along its own axis: one step down costs (w / h)^2 times
        # as much log-height as one step across.
        ny = cy + 1 if cy + 1 < grid_height else cy - 1
        nx = cx + 1 if cx + 1 < grid_width else cx - 1
        step_y, step_x = -math.log(row_bump[ny, cx]), -math.log(row_bump[cy, nx])
        assert step_y / step_x == pytest.approx((grid_width / grid_height) ** 2, rel=1e-3)


def test_masking_noise_moves_to_device():
    noise = masking_noise(2, 4, 4, generator=torch.Generator().manual_seed(0), device="cpu")
    assert noise.device.type == "cpu"
    with pytest.raises(ValueError):
        masking_noise(2, 4, 4, focal_probability=1.5)
