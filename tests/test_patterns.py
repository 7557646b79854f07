import dataclasses
import itertools

import pytest
import torch

from autosculpt.patterns import PAPER6, PatternSet, assign, conv_flops, kept_fraction, masks_from_ids


def test_paper6_matches_method_table():
    m = PAPER6.masks.int()
    assert PAPER6.kernel_size == (3, 3) and len(PAPER6) == 6
    assert m[0].sum() == 0
    assert m[1].tolist() == [[0, 0, 1], [0, 0, 1], [0, 0, 1]]
    assert m[2].tolist() == [[0, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert m[3].tolist() == [[0, 1, 1], [0, 1, 1], [0, 1, 1]]
    assert m[4].tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert m[5].sum() == 9
    assert PAPER6.kept_fractions().tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])


def test_pattern_set_is_immutable_and_copies_its_input():
    src = torch.ones(2, 3, 3, dtype=torch.bool)
    ps = PatternSet(src, ["a", "b"])
    src[0] = False
    assert bool(ps.masks.all())
    with pytest.raises(dataclasses.FrozenInstanceError):
        ps.masks = src  # type: ignore[misc]


@pytest.mark.parametrize(
    "masks,names,err",
    [
        (torch.ones(3, 3, dtype=torch.bool), ["a"], "masks"),
        (torch.full((1, 3, 3), 2), ["a"], "masks"),
        (torch.ones(2, 3, 3, dtype=torch.bool), ["a"], "names"),
        (torch.ones(2, 3, 3, dtype=torch.bool), ["a", "a"], "names"),
    ],
)
def test_pattern_set_validation(masks, names, err):
    with pytest.raises(ValueError, match=err):
        PatternSet(masks, names)


def test_json_round_trip_and_lookup():
    again = PatternSet.from_json(PAPER6.to_json())
    assert again == PAPER6 and hash(again) == hash(PAPER6)
    assert PAPER6.index("full") == 5
    with pytest.raises(KeyError):
        PAPER6.index("nope")


def test_flops_helpers():
    ids = torch.tensor([0, 1, 5, 5])
    mask = masks_from_ids(PAPER6, ids)
    assert kept_fraction(mask) == pytest.approx((0 + 3 + 9 + 9) / 36)
    assert conv_flops(mask, c_in_per_group=4, out_h=5, out_w=6, batch=2) == 21 * 4 * 30 * 2
    with pytest.raises(ValueError, match="ids"):
        masks_from_ids(PAPER6, [7])


def _brute_force(weight, ps, counts):
    energy = weight.double().pow(2).sum(1).flatten(1)
    gain = energy @ ps.masks.flatten(1).double().T
    slots = [p for p, c in enumerate(counts) for _ in range(c)]
    best = -1.0
    for perm in set(itertools.permutations(slots)):
        best = max(best, sum(float(gain[f, p]) for f, p in enumerate(perm)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_assign_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    c_out = 6
    weight = torch.randn(c_out, 3, 3, 3, generator=g) * torch.rand(c_out, 1, 3, 3, generator=g)
    counts = torch.multinomial(torch.ones(6), c_out, replacement=True, generator=g).bincount(minlength=6).tolist()
    ids = assign(weight, PAPER6, counts)
    assert ids.bincount(minlength=6).tolist() == counts
    energy = weight.double().pow(2).sum(1).flatten(1)
    got = float((energy * PAPER6.masks[ids].flatten(1).double()).sum())
    assert got == pytest.approx(_brute_force(weight, PAPER6, counts), rel=1e-9)


def test_assign_gives_strongest_filter_the_dense_pattern():
    weight = torch.ones(3, 2, 3, 3)
    weight[1] *= 10
    ids = assign(weight, PAPER6, [2, 0, 0, 0, 0, 1])
    assert ids.tolist() == [0, 5, 0]


def test_assign_bad_input():
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="counts"):
        assign(w, PAPER6, [1, 1, 1])
    with pytest.raises(ValueError, match="counts"):
        assign(w, PAPER6, [1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="weight"):
        assign(torch.randn(4, 2, 5, 5), PAPER6, [4, 0, 0, 0, 0, 0])


@pytest.mark.parametrize("counts", [[0, 16, 16, 16, 16, 0], [0, 13, 19, 7, 25, 0], [3, 40, 1, 0, 0, 20],
                                    [0, 5, 4, 30, 34, 1], [0, 0, 0, 0, 0, 7]])
def test_block_friendly_counts_keep_every_levels_taps_in_whole_blocks(counts):
    from autosculpt.patterns import KERNEL_BLOCK, block_friendly_counts

    out = block_friendly_counts(PAPER6, counts)
    taps = PAPER6.kept_taps().tolist()
    for level in set(taps):  # the same filters per kept-tap count: the same MACs
        members = [p for p, t in enumerate(taps) if t == level]
        assert sum(out[p] for p in members) == sum(counts[p] for p in members)
        total = sum(counts[p] for p in members)
        ragged = [out[p] % (KERNEL_BLOCK // 2) for p in members if out[p] % (KERNEL_BLOCK // 2)]
        assert len(ragged) <= 1 and sum(ragged) == total % (KERNEL_BLOCK // 2)  # at most one part block
        halves = [out[p] for p in members if out[p] % KERNEL_BLOCK >= KERNEL_BLOCK // 2]
        assert len(halves) <= 1
    assert min(out) >= 0


def test_block_friendly_counts_rejects_bad_arguments():
    from autosculpt.patterns import block_friendly_counts

    with pytest.raises(ValueError, match="counts: expected 6 entries"):
        block_friendly_counts(PAPER6, [1, 2])
    with pytest.raises(ValueError, match="block: expected an even int"):
        block_friendly_counts(PAPER6, [0] * 6, block=7)
