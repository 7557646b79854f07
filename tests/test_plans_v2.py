"""Plans v2: channel removal and per-layer structures in one plan ({"version": 2, "channels", "layers"}).

Channel removal is applied first, then the layer plans (named as in the channel-pruned model). Checked
against outputs: sparsify, save / load (rebuilt from the dense model + plan, weights equal, outputs
equal), the fused and deployed forms, dense_equivalent and export; version-1 plans are unchanged, and
bad input gives errors that name the argument.
"""
import json

import pytest
import torch
from torch import nn

import autosculpt as asc
from autosculpt.channels import remove_channels
from autosculpt.export import dense_equivalent
from autosculpt.io import plan_from_model, read
from autosculpt.models import get_model
from autosculpt.nn import PatternConv2d
from autosculpt.nn.linear import linear_layer_plan
from autosculpt.patterns import PAPER6
from autosculpt.plan import (
    ChannelPlan,
    channel_plan_of,
    make_plan,
    parse_plan,
    plan_channels,
    plan_for_mac_cut,
    uniform_plan,
    validate_plan,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {"resnet20": {}, "mobilenetv2": {}, "vit_tiny": {"depth": 2}}
SHAPES = {"resnet20": (2, 3, 32, 32), "mobilenetv2": (2, 3, 16, 16), "vit_tiny": (2, 3, 32, 32)}


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def planned():
    """{name: (dense model, example input, channel plan at a 2x MAC cut)}."""
    torch.manual_seed(0)
    out = {}
    for name, kwargs in CASES.items():
        dense = _randomise(get_model(name, **kwargs))
        x = torch.randn(*SHAPES[name])
        out[name] = (dense, x, plan_for_mac_cut(dense, x[:1], 2.0))
    return out


def _pattern_layers(small: nn.Module) -> dict:
    """Pattern plans for a channel-pruned model (names and sizes of that model): its 3x3 convs, or for
    a model without any (the ViT), block patterns on the MLPs' first linears (every other block kept)."""
    layers = uniform_plan(small, PAPER6, 0.5)["layers"]
    if not layers:
        for name, m in small.named_modules():
            if isinstance(m, nn.Linear) and name.endswith("mlp.fc1"):
                layers[name] = linear_layer_plan(8, out_blocks=range(0, -(-m.out_features // 8), 2))
    return layers


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_v2_plan_applies_channels_then_layers(planned):
    dense, x, channels = planned["resnet20"]
    small = channels.apply(dense, x[:1])
    layers = _pattern_layers(small)
    plan = json.loads(json.dumps(make_plan(layers, channels)))
    assert plan["version"] == 2 and plan_channels(plan) == channels and set(parse_plan(plan)) == set(layers)
    got = asc.sparsify(dense, plan, example_input=x[:1], backend="torch")
    want = asc.sparsify(small, make_plan(layers), backend="torch")
    assert make_plan(layers)["version"] == 1  # no channel removal: still a version-1 plan
    assert sum(isinstance(m, PatternConv2d) for m in got.modules()) == len(layers)
    with torch.no_grad():
        _close(got(x), want(x))
    # channels only; and without example_input, zeros of the recorded input_shape find the same groups
    only = asc.sparsify(dense, make_plan({}, channels), backend="torch")
    with torch.no_grad():
        _close(only(x), small(x))
    assert channel_plan_of(got) == channels and channel_plan_of(dense) is None


def test_v2_with_null_channels_is_the_v1_plan(planned):
    dense, x, _ = planned["resnet20"]
    layers = _pattern_layers(dense)
    v1 = asc.sparsify(dense, {"version": 1, "layers": layers}, backend="torch")
    v2 = asc.sparsify(dense, {"version": 2, "channels": None, "layers": layers}, backend="torch", inplace=False)
    with torch.no_grad():
        _close(v1(x), v2(x))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("with_patterns", [False, True])
def test_save_load_round_trip(tmp_path, planned, name, with_patterns):
    dense, x, channels = planned[name]
    small = channels.apply(dense, x[:1])
    layers = _pattern_layers(small) if with_patterns else {}
    assert layers or not with_patterns
    model = asc.sparsify(dense, make_plan(layers, channels), example_input=x[:1], backend="torch").eval()
    with torch.no_grad():  # non-trivial weights that the dense model does not have (the file must carry them)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, PatternConv2d):  # keep dropped taps zero (the plan says they are)
                m.weight.mul_(m.tap_mask[:, None].to(m.weight.dtype))
    meta = {"model": name, "model_args": CASES[name]}
    path = asc.save(model, tmp_path / "m.pt", meta=meta)  # the plan is reconstructed, channels included
    saved = read(path)
    assert saved.plan["version"] == 2 and plan_channels(saved.plan) == channels
    assert set(saved.plan["layers"]) == set(layers)
    assert saved.versions["plan"] == 2
    assert torch.load(path, weights_only=True)["format_version"] == 2
    with torch.no_grad():
        want = model(x)
        for loaded in (asc.load(path, backend="torch"),  # the built-in model named in the file
                       asc.load(path, lambda: get_model(name, **CASES[name]), backend="torch")):
            loaded.eval()
            assert torch.equal(loaded(x), want)
            for (k1, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
                assert k1 == k2 and torch.equal(a, b)
            assert plan_from_model(loaded) == saved.plan  # and it saves again the same way
    # the smaller architecture: fewer parameters than the dense model
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters())


def test_version_1_files_still_load_unchanged(tmp_path, planned):
    dense, x, _ = planned["resnet20"]
    plan = {"version": 1, "layers": _pattern_layers(dense)}
    model = asc.sparsify(dense, plan, backend="torch")
    path = asc.save(model, tmp_path / "v1.pt", plan=plan, meta={"model": "resnet20"})
    assert read(path).plan == plan  # written as version 1, file format 1 (readable by older releases)
    assert torch.load(path, weights_only=True)["format_version"] == 1
    with torch.no_grad():
        assert torch.equal(asc.load(path, backend="torch").eval()(x), model(x))
    assert plan_from_model(model)["version"] == 1 and "channels" not in plan_from_model(model)


@pytest.mark.parametrize("name", ["resnet20", "vit_tiny"])
def test_fused_deployed_dense_equivalent_and_export(tmp_path, planned, name):
    dense, x, channels = planned[name]
    small = channels.apply(dense, x[:1])  # the ViT's attention: PrunedMultiheadAttention (a leaf for fx)
    model = asc.sparsify(dense, make_plan(_pattern_layers(small), channels), example_input=x[:1]).eval()
    with torch.no_grad():
        want = model(x)
        _close(asc.fuse_for_inference(model, x)(x), want)
        from autosculpt.deploy import deployed_form

        _close(deployed_form(model, x, "autosculpt")(x), want)
        deployed = asc.optimize_for_inference(model, x, routes=("autosculpt", "autosculpt_channels_last"), rounds=1)
        _close(deployed(x), want)
        # dense_equivalent: the channel-pruned model with standard layers, pattern-free
        de = dense_equivalent(model).eval()
        assert not any(isinstance(m, PatternConv2d) for m in de.modules())
        assert [tuple(m.weight.shape) for m in de.modules() if isinstance(m, nn.Conv2d)] == \
               [tuple(m.weight.shape) for m in small.modules() if isinstance(m, nn.Conv2d)]
        _close(de(x), want)
    from autosculpt.export import export_model

    paths = export_model(model, x, str(tmp_path / "exported"), onnx=False)
    with torch.no_grad():
        for kind in ("deployed_pt2", "pruned_pt2", "dense_equivalent_pt2"):
            _close(torch.export.load(paths[kind]).module()(x), want)


def test_cli_export_of_a_channel_pruned_file(tmp_path, planned):
    from autosculpt.cli import main

    dense, x, channels = planned["resnet20"]
    model = asc.sparsify(dense, make_plan({}, channels), example_input=x[:1]).eval()
    path = asc.save(model, tmp_path / "m.pt", meta={"model": "resnet20", "input_shape": [3, 32, 32]})
    out = tmp_path / "exported"
    assert main(["export", str(path), "--out", str(out), "--no-onnx", "--batch", "2"]) == 0
    with torch.no_grad():
        _close(torch.export.load(str(out / "pruned.pt2")).module()(x), model(x))


def test_errors_name_the_argument(planned):
    dense, x, channels = planned["resnet20"]
    no_shape = ChannelPlan(dict(channels.keep), dict(channels.group_sizes), dict(channels.members), ())
    with pytest.raises(ValueError, match="example_input"):
        asc.sparsify(dense, make_plan({}, no_shape))
    with pytest.raises(ValueError, match="inplace"):
        asc.sparsify(dense, make_plan({}, channels), example_input=x[:1], inplace=True)
    data = channels.to_dict()
    for plan, needle in (({"version": 3, "layers": {}}, "version"),
                         ({"version": 2, "channels": {**data, "version": 9}, "layers": {}}, "channels: .*version"),
                         ({"version": 2, "channels": [], "layers": {}}, "channels: .*expected a dict"),
                         ({"version": 2, "channels": None, "layers": {}, "extra": 1}, "unknown field"),
                         ({"version": 2, "channels": data, "layers": []}, "layers")):
        with pytest.raises(ValueError, match=needle):
            validate_plan(plan)
    # a layer name that the channel-pruned model lacks
    with pytest.raises(KeyError, match="after channel removal"):
        asc.sparsify(dense, make_plan({"nope": _pattern_layers(dense)["conv1"]}, channels), example_input=x[:1])
    # a model of another architecture than the one the channel plan was made for
    with pytest.raises(ValueError, match="not the group the plan was made for"):
        asc.sparsify(_randomise(get_model("resnet56")), make_plan({}, channels), example_input=x[:1])


def test_load_errors_and_channel_pruned_twice(tmp_path, planned):
    dense, x, channels = planned["resnet20"]
    model = channels.apply(dense, x[:1])
    path = asc.save(model, tmp_path / "m.pt", meta={"model": "resnet20"})
    with pytest.raises(ValueError, match="does not match the model"):
        asc.load(path, lambda: get_model("resnet56"))
    with torch.no_grad():  # an explicit example_input for the tracing (instead of the recorded shape's zeros)
        assert torch.equal(asc.load(path, example_input=x).eval()(x), model(x))
    twice = plan_for_mac_cut(model, x[:1], 1.5).apply(model, x[:1])
    with pytest.raises(ValueError, match="more than once.*pass plan="):
        asc.save(twice, tmp_path / "twice.pt")
    # channels removed without a plan leave no record: the model saves as version 1 and cannot be rebuilt
    bare = remove_channels(dense, x[:1], dict(channels.keep))
    assert channel_plan_of(bare) is None
