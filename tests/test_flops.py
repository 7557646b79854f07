import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt.flops import count_macs, count_params
from autosculpt.patterns import PAPER6
from autosculpt.plan import level_counts, uniform_plan


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1),
                         nn.Flatten(), nn.Linear(6 * 4 * 4, 5))


def test_count_macs_dense_and_pruned():
    model, x = _net(), torch.randn(2, 3, 8, 8)
    macs = count_macs(model, x)
    want = {"0": 8 * 3 * 9 * 64 * 2, "2": 6 * 8 * 9 * 16 * 2, "4": 96 * 5 * 2}
    assert macs["layers"] == want and macs["total"] == sum(want.values())
    ids = torch.tensor([0, 1, 2, 3, 4, 5])
    pruned = asc.sparsify(model, {"version": 1, "layers": {"2": asc.plan.conv_layer_plan(PAPER6, ids)}})
    kept = (0 + 3 + 3 + 6 + 6 + 9) * 8 * 16 * 2
    assert count_macs(pruned, x)["layers"]["2"] == kept


@pytest.mark.parametrize("n,frac", [(10, 0.5), (7, 1 / 3), (9, 0.9), (12, 0.2), (5, 1.0), (4, 0.0)])
def test_level_counts_hits_the_fraction(n, frac):
    counts = level_counts(PAPER6, n, frac)
    assert sum(counts) == n and min(counts) >= 0
    got = sum(c * f for c, f in zip(counts, PAPER6.kept_fractions().tolist())) / n
    assert abs(got - frac) <= 1 / (3 * n) + 1e-9  # closest with whole filters


def test_uniform_plan_reaches_the_mac_ratio_and_counts_params():
    model, x = _net(), torch.randn(1, 3, 8, 8)
    pruned = asc.sparsify(model, uniform_plan(model, PAPER6, 0.5))
    conv_macs = lambda m: sum(v for k, v in count_macs(m, x)["layers"].items() if k in ("0", "2"))  # noqa: E731
    assert conv_macs(pruned) / conv_macs(model) == pytest.approx(0.5, abs=0.05)
    assert count_params(pruned) < count_params(model) == count_params(model, nonzero=False)
    with pytest.raises(ValueError, match="kept_fraction"):
        uniform_plan(model, PAPER6, 1.5)


def test_multihead_attention_counts_projections_and_pairs_once():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    b, length, e = 2, 10, 16
    macs = count_macs(Net(), torch.randn(b, length, e))
    assert macs["layers"] == {"attn": b * (4 * length * e * e + 2 * length * length * e)}
