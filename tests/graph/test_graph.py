"""Model → graph: node/edge counts, real data flow (residual adds, concatenations, branches),
deterministic features, sparsified models, and a clear error for untraceable models."""
import pytest
import torch
from torch import nn

from autosculpt.graph import GraphBuildError, build_graph
from autosculpt.models import get_model
from autosculpt.patterns import PAPER6
from autosculpt.plan import conv_layer_plan, sparsify


def _in_edges(g, node_name):
    i = g.node_names.index(node_name)
    src = g.data.edge_index[0][g.data.edge_index[1] == i]
    return sorted(g.node_names[j] for j in src.tolist())


def test_digits_cnn_is_a_chain():
    m = get_model("digits_cnn")
    g = build_graph(m, torch.randn(2, 1, 8, 8))
    # placeholder + 4×(conv, bn, relu) + avgpool + flatten + linear + output = 17 nodes, a chain
    assert g.num_nodes == 17 and g.num_edges == 16
    assert g.prunable == ["features.0.0", "features.1.0", "features.2.0", "features.3.0"]
    assert g.layers["features.2.0"]["in_shape"] == [2, 128, 8, 8] and g.layers["features.2.0"]["stride"] == [2, 2]
    assert g.layers["features.3.0"]["in_shape"] == [2, 128, 4, 4]
    assert g.layers["features.1.0"]["flops"] == 2 * 128 * 8 * 8 * 64 * 9


def test_resnet20_has_residual_edges():
    g = build_graph(get_model("resnet20"), torch.randn(1, 3, 32, 32))
    assert len(g.prunable) == 19
    adds = [n for n in g.node_names if n.startswith("add")]
    assert len(adds) == 9  # one residual add per BasicBlock
    # the first block's add joins the block's bn2 with its identity input (the stem's relu)
    assert _in_edges(g, adds[0]) == ["layer1_0_bn2", "relu"]
    # a downsampling block's add joins bn2 with the 1×1 shortcut's BN
    assert "layer2_0_shortcut_1" in _in_edges(g, adds[3])
    # the residual input of block 1 has two consumers: conv1 and the add
    relu = g.node_names.index("relu")
    assert int((g.data.edge_index[0] == relu).sum()) == 2
    assert g.data.x[g.data.prunable_index].shape[0] == 19


def test_mobilenetv2_depthwise_convs_are_prunable_and_shortcuts_present():
    g = build_graph(get_model("mobilenetv2"), torch.randn(1, 3, 32, 32))
    assert len(g.prunable) == 18  # stem 3×3 + 17 depthwise 3×3
    assert sum(n.startswith("add") for n in g.node_names) == 10


class Branchy(nn.Module):
    """An inception-ish user model: two branches concatenated, then a residual add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Conv2d(4, 8, 3, padding=1)
        self.merge = nn.Conv2d(16, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([self.a(x), self.b2(self.b1(x))], dim=1)
        y = self.merge(y) + x
        return self.head(y.mean((2, 3)))


def test_branchy_user_model_graph_follows_data_flow():
    g = build_graph(Branchy(), torch.randn(2, 3, 12, 12))
    assert g.prunable == ["stem", "a", "b2"]
    assert _in_edges(g, "cat") == ["a", "b2"]
    assert _in_edges(g, "add") == ["merge", "relu"]
    relu = g.node_names.index("relu")
    consumers = sorted(g.node_names[j] for j in g.data.edge_index[1][g.data.edge_index[0] == relu].tolist())
    assert consumers == ["a", "add", "b1"]  # a branch point
    # x, stem, relu, a, b1, b2, cat, merge, add, mean, head, output; 13 data-flow edges
    assert g.num_nodes == 12 and g.num_edges == 13


def test_features_are_deterministic_and_reflect_state():
    m = get_model("resnet20")
    x = torch.randn(1, 3, 32, 32)
    g1, g2 = build_graph(m, x), build_graph(m, x.clone())
    assert torch.equal(g1.data.x, g2.data.x) and torch.equal(g1.data.edge_index, g2.data.edge_index)
    col = g1.feature_names.index
    assert torch.allclose(g1.data.x[:, col("flops_share")].sum(), torch.tensor(1.0))
    # a sparsified model traces too, and its pattern mix and kept fraction show up in the features
    ids = [1] * 8 + [5] * 8
    pruned = sparsify(m, {"version": 1, "layers": {"layer1.0.conv1": conv_layer_plan(PAPER6, ids)}}, backend="torch")
    g3 = build_graph(pruned, x)
    node = g3.data.prunable_index[g3.prunable.index("layer1.0.conv1")]
    mix = g3.data.x[node, col("mix_0"):col("mix_0") + 6]
    assert torch.allclose(mix, torch.tensor([0, 0.5, 0, 0, 0, 0.5]))
    assert g3.data.x[node, col("kept_fraction")] == pytest.approx(0.5 * 3 / 9 + 0.5)
    assert g3.prunable == g1.prunable
    # with_state overwrites only the requested layer
    d = g1.with_state({"conv1": [0, 0, 0, 1, 0, 0]}, {"conv1": 0.25})
    i = int(g1.data.prunable_index[0])
    assert d.x[i, col("kept_fraction")] == pytest.approx(6 / 9) and d.x[i, col("latency_share")] == 0.25
    changed = (d.x != g1.data.x).any(1).nonzero().flatten().tolist()
    assert changed == [i]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            return self.conv(x)
        return x


def test_untraceable_model_gets_a_clear_error():
    with pytest.raises(GraphBuildError, match="torch.fx could not trace Untraceable.*control flow"):
        build_graph(Untraceable(), torch.randn(1, 3, 8, 8))
    with pytest.raises(GraphBuildError, match="example_input"):
        build_graph(get_model("resnet20"), torch.randn(1, 5, 32, 32))
    with pytest.raises(TypeError, match="example_input"):
        build_graph(get_model("resnet20"), [1, 2])


class TinyAttentionBlock(nn.Module):
    """A pre-norm transformer block written out (qkv projection, scores, softmax, residual adds)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(x)


def test_attention_block_graph():
    g = build_graph(TinyAttentionBlock(), torch.randn(2, 5, 16))
    assert g.prunable == []  # no 3×3 convs; attention patterns are planned by their own plan kind
    col = g.feature_names.index
    ops = {t: int(g.data.x[:, col(f"op_{t}")].sum()) for t in ("matmul", "softmax", "add", "linear", "norm")}
    assert ops == {"matmul": 2, "softmax": 1, "add": 2, "linear": 4, "norm": 2}
    # the softmax feeds the attention-times-values matmul, whose other input comes from the qkv split
    sm = g.node_names.index("softmax")
    consumer = g.node_names[int(g.data.edge_index[1][g.data.edge_index[0] == sm][0])]
    assert consumer == "matmul_1"
    assert len(_in_edges(g, "matmul_1")) == 2
