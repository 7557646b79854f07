"""PatternConv2d (the layer) and sparsify (plans) for convolutions."""
import pytest
import torch
from conftest import requires_ext
from torch import nn

import autosculpt as asc
from autosculpt.nn import PatternConv2d
from autosculpt.patterns import PAPER6
from autosculpt.plan import conv_layer_plan, dense_plan, validate_plan
from autosculpt.reference import pattern_conv2d_ref


def _masked_conv(conv, mask):
    ref = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        ref.weight.copy_(conv.weight * mask[:, None])
        if conv.bias is not None:
            ref.bias.copy_(conv.bias)
    return ref


@pytest.mark.parametrize("path", ["sparse", "dense", "auto"])
@pytest.mark.parametrize("stride", [1, 2])
def test_from_dense_equals_masked_conv(path, stride):
    conv = nn.Conv2d(12, 20, 3, stride=stride, padding=1)
    mask = PAPER6.masks[torch.randint(0, 6, (20,))]
    layer = PatternConv2d.from_dense(conv, mask, path=path)
    x = torch.randn(3, 12, 15, 13)
    torch.testing.assert_close(layer(x), _masked_conv(conv, mask)(x), rtol=1e-5, atol=1e-5)
    assert layer.active_path(x) in ("sparse", "dense")
    assert f"path={layer.active_path()}" in repr(layer)


def test_to_dense_round_trip_and_dropped_weights_are_zero():
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    mask = torch.rand(6, 3, 3) > 0.5
    layer = PatternConv2d.from_dense(conv, mask)
    assert torch.equal(layer.weight * ~mask[:, None], torch.zeros_like(layer.weight))
    dense = layer.to_dense()
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip():
    layer = PatternConv2d(5, 7, 3, padding=1, tap_mask=torch.rand(7, 3, 3) > 0.5)
    other = PatternConv2d(5, 7, 3, padding=1)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.tap_mask, layer.tap_mask)
    x = torch.randn(1, 5, 6, 6)
    torch.testing.assert_close(other(x), layer(x))


def test_in_sequential_under_no_grad():
    model = nn.Sequential(PatternConv2d(3, 8, 3, padding=1, tap_mask=torch.rand(8, 3, 3) > 0.5), nn.ReLU(),
                          PatternConv2d(8, 4, 3, stride=2, padding=1, tap_mask=torch.rand(4, 3, 3) > 0.5))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        y = model(x)
    ref = nn.Sequential(model[0].to_dense(), nn.ReLU(), model[2].to_dense())(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["sparse", "dense"])
def test_training_keeps_dropped_taps_exactly_zero(path):
    torch.manual_seed(1)
    layer = PatternConv2d(4, 6, 3, padding=1, tap_mask=torch.rand(6, 3, 3) > 0.5, path=path)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(20):
        opt.zero_grad()
        loss = layer(torch.randn(2, 4, 8, 8)).pow(2).mean()
        loss.backward()
        opt.step()
    dropped = layer.weight * ~layer.tap_mask[:, None]
    assert torch.equal(dropped, torch.zeros_like(dropped))
    assert layer.weight.abs().sum() > 0


def test_replacing_the_weight_repacks():
    layer = PatternConv2d(3, 4, 3, padding=1, tap_mask=torch.ones(4, 3, 3, dtype=torch.bool), path="sparse")
    x = torch.randn(1, 3, 5, 5)
    before = layer(x)
    layer.weight = nn.Parameter(layer.weight.detach() * 3)
    torch.testing.assert_close(layer(x), before * 3 - 2 * layer.bias[None, :, None, None], rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph():
    model = nn.Sequential(PatternConv2d(3, 8, 3, padding=1, tap_mask=torch.rand(8, 3, 3) > 0.5, path="sparse"),
                          nn.ReLU())
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))
    compiled_inductor = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled_inductor(x), model(x), rtol=1e-5, atol=1e-5)


def test_calibrate_chooses_a_path_and_auto_forward_uses_it():
    layer = PatternConv2d(8, 8, 3, padding=1, tap_mask=PAPER6.masks[torch.full((8,), 5)])
    x = torch.randn(1, 8, 6, 6)
    assert layer.active_path(x) == "undecided"
    choice = layer.calibrate(x, reps=3)
    assert choice in ("sparse", "dense") and layer.active_path(x) == choice


def test_constructor_errors():
    with pytest.raises(ValueError, match="path"):
        PatternConv2d(3, 4, 3, path="fast")
    with pytest.raises(ValueError, match="groups"):
        PatternConv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="tap_mask: expected shape"):
        PatternConv2d(3, 4, 3, tap_mask=torch.ones(3, 3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="conv"):
        PatternConv2d.from_dense(nn.Linear(3, 4), torch.ones(4, 3, 3, dtype=torch.bool))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_sparsify_applies_plan_to_a_copy():
    model = _net()
    ids = torch.randint(0, 6, (8,))
    plan = {"version": 1, "layers": {"3": conv_layer_plan(PAPER6, ids)}}
    pruned = asc.sparsify(model, plan)
    assert isinstance(pruned[3], PatternConv2d) and isinstance(model[3], nn.Conv2d)
    assert torch.equal(pruned[3].tap_mask, PAPER6.masks[ids])
    x = torch.randn(2, 3, 6, 6)
    ref = _net()
    with torch.no_grad():
        ref[3].weight.mul_(PAPER6.masks[ids][:, None])
    torch.testing.assert_close(pruned(x), ref(x), rtol=1e-5, atol=1e-5)


def test_dense_plan_is_identity():
    model = _net()
    plan = dense_plan(model, PAPER6)
    assert sorted(plan["layers"]) == ["0", "3"]
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(asc.sparsify(model, plan)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "plan,err",
    [
        ([], "expected a dict"),
        ({"version": 3, "layers": {}}, "version"),
        ({"version": 1, "layers": []}, "layers"),
        ({"version": 1, "layers": {"3": {"kind": "magic"}}}, "unknown kind"),
    ],
)
def test_bad_plans(plan, err):
    with pytest.raises(ValueError, match=err):
        validate_plan(plan)


def test_sparsify_errors_name_the_problem():
    model = _net()
    with pytest.raises(KeyError, match="nope"):
        asc.sparsify(model, {"version": 1, "layers": {"nope": conv_layer_plan(PAPER6, [5] * 8)}})
    with pytest.raises(ValueError, match="pattern_ids"):
        asc.sparsify(model, {"version": 1, "layers": {"3": conv_layer_plan(PAPER6, [5] * 3)}})
    with pytest.raises(TypeError, match="nn.Conv2d"):
        asc.sparsify(model, {"version": 1, "layers": {"1": conv_layer_plan(PAPER6, [5] * 8)}})


def test_faster_path_picks_the_cheaper_callable():
    import time

    from autosculpt.nn.conv import faster_path

    slow, fast = (lambda: time.sleep(0.004)), (lambda: None)
    assert faster_path(slow, fast, reps=3) == "dense"
    assert faster_path(fast, slow, reps=3) == "sparse"


@requires_ext
def test_eager_inference_shortcut_follows_setting_changes_and_layouts(poison_outputs):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 16, 3, padding=1)
    layer = PatternConv2d.from_dense(conv, torch.rand(16, 3, 3) < 0.5, path="sparse").eval().freeze()
    x = torch.randn(2, 6, 9, 9)

    def ref(mod, inp):
        out = pattern_conv2d_ref(inp, mod.weight, mod.tap_mask, mod.bias, mod.stride, mod.padding, mod.dilation, 1)
        return torch.relu(out) if mod.activation == "relu" else out

    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(2, 3)):  # NCHW, NHWC, strided
            for _ in range(3):  # validated call, then the shortcut twice
                out = layer(inp)
                torch.testing.assert_close(out, ref(layer, inp))
            assert out.is_contiguous(memory_format=torch.channels_last) == (inp.stride()[1] == 1)
        layer.stride = (2, 2)  # settings the shortcut depends on: it must not survive them
        torch.testing.assert_close(layer(x), ref(layer, x))
        layer.activation = "relu"
        torch.testing.assert_close(layer(x), ref(layer, x))
        assert (layer(x) >= 0).all()


def test_eager_inference_shortcut_follows_weight_changes_and_copies():
    import copy

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    mask = torch.rand(8, 3, 3) < 0.5
    layer = PatternConv2d.from_dense(conv, mask, path="sparse").eval()
    x = torch.randn(2, 6, 9, 9)

    def ref(mod):
        return pattern_conv2d_ref(x, mod.weight, mod.tap_mask, mod.bias, (1, 1), (1, 1), (1, 1), 1)

    with torch.no_grad():
        layer(x)  # the first call validates and remembers the direct kernel call
        assert layer._fast, "eager CPU inference should cache a direct kernel call"
        torch.testing.assert_close(layer(x), ref(layer))
        twin = copy.deepcopy(layer)
        assert twin._cache_key != layer._cache_key and not twin._fast
        twin.weight.mul_(2.0)  # in place: the packed weights must be rebuilt
        layer.load_state_dict({k: v * -1 for k, v in layer.state_dict().items() if k != "tap_mask"} | {"tap_mask": layer.tap_mask})
        for _ in range(2):  # alternate: neither may run with the other's packed weights
            torch.testing.assert_close(twin(x), ref(twin))
            torch.testing.assert_close(layer(x), ref(layer))
        layer.bias = None  # a structural change takes the validated path again
        torch.testing.assert_close(layer(x), ref(layer))
        layer.double()
        with pytest.raises(TypeError, match="dtype"):
            layer(x)
