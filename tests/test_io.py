"""Save / load of pruned models: exact round trip, safety (no code runs on load), clear errors."""
import json
import os

import pytest
import torch

import autosculpt as asc
from autosculpt.models import get_model
from autosculpt.nn import PatternConv2d
from autosculpt.patterns import PAPER6
from autosculpt.plan import conv_layer_plan

# one torch thread per test (the shared fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def small_cnn():
    return get_model("digits_cnn", channels=(8, 16, 16, 8))


def random_plan(model, seed=0, allowed=(0, 1, 2, 3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            ids = torch.tensor(allowed)[torch.randint(len(allowed), (m.out_channels,), generator=g)]
            layers[name] = conv_layer_plan(PAPER6, ids)
    return {"version": 1, "layers": layers}


def pruned_model(seed=0):
    torch.manual_seed(seed)
    dense = small_cnn()
    plan = random_plan(dense, seed)
    model = asc.sparsify(dense, plan)
    with torch.no_grad():  # non-trivial BN statistics and weights
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval(), plan


def test_round_trip_exact(tmp_path):
    model, plan = pruned_model()
    path = asc.save(model, tmp_path / "m.pt", plan=plan, meta={"model": "digits_cnn", "model_args": {"channels": [8, 16, 16, 8]}})
    loaded = asc.load(path, small_cnn).eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (n1, a), (n2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(a, b)
    assert sum(isinstance(m, PatternConv2d) for m in loaded.modules()) == len(plan["layers"])
    # The built-in model named in the file's metadata is enough, without a factory.
    again = asc.load(path).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_plan_reconstructed_from_model(tmp_path):
    model, _ = pruned_model(seed=3)
    asc.save(model, tmp_path / "m.pt")
    saved = asc.io.read(tmp_path / "m.pt")
    assert saved.plan is not None and saved.versions["autosculpt"] == asc.__version__
    loaded = asc.load(tmp_path / "m.pt", small_cnn)
    for (name, a), b in zip(model.named_modules(), loaded.modules()):
        if isinstance(a, PatternConv2d):
            assert torch.equal(a.tap_mask, b.tap_mask), name


def test_dense_model_round_trip(tmp_path):
    torch.manual_seed(0)
    dense = small_cnn().eval()
    asc.save(dense, tmp_path / "d.pt")
    assert asc.io.read(tmp_path / "d.pt").plan is None
    loaded = asc.load(tmp_path / "d.pt", small_cnn).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), dense(x))


def test_mismatched_model_is_a_clear_error(tmp_path):
    model, plan = pruned_model()
    asc.save(model, tmp_path / "m.pt", plan=plan)
    with pytest.raises(ValueError, match="does not match the model.*shape mismatches.*classifier.weight"):
        asc.load(tmp_path / "m.pt", lambda: get_model("digits_cnn", channels=(8, 16, 16, 8), num_classes=5))
    with pytest.raises(ValueError, match="does not match the model: pattern_ids: expected 16 ids, got 8"):
        asc.load(tmp_path / "m.pt", lambda: get_model("digits_cnn", channels=(8, 16, 16, 16)))
    with pytest.raises(ValueError, match="does not match the model"):
        asc.load(tmp_path / "m.pt", lambda: get_model("resnet20"))


def test_user_model_needs_explicit_factory(tmp_path):
    model, plan = pruned_model()
    asc.save(model, tmp_path / "m.pt", plan=plan, meta={"model": "evil.module:factory"})
    with pytest.raises(ValueError, match="not built in; pass the function"):
        asc.load(tmp_path / "m.pt")


def test_corrupt_and_foreign_files(tmp_path):
    model, plan = pruned_model()
    good = tmp_path / "m.pt"
    asc.save(model, good, plan=plan)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or not a model file"):
        asc.load(tmp_path / "trunc.pt", small_cnn)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not an AutoSculpt model file"):
        asc.load(tmp_path / "plain.pt", small_cnn)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        asc.load(tmp_path / "missing.pt", small_cnn)


def _tampered(tmp_path, **changes):
    model, plan = pruned_model()
    asc.save(model, tmp_path / "m.pt", plan=plan)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload.update(changes)
    torch.save(payload, tmp_path / "t.pt")
    return tmp_path / "t.pt"


def test_invalid_plan_and_newer_format(tmp_path):
    bad_plan = '{"version": 1, "layers": {"features.0.0": {"kind": "rootkit"}}}'
    with pytest.raises(ValueError, match="invalid plan.*unknown kind 'rootkit'"):
        asc.load(_tampered(tmp_path, plan_json=bad_plan), small_cnn)
    with pytest.raises(ValueError, match="upgrade autosculpt"):
        asc.load(_tampered(tmp_path, format_version=99), small_cnn)


def test_mask_weights_disagreeing_with_plan(tmp_path):
    model, plan = pruned_model()
    asc.save(model, tmp_path / "m.pt", plan=plan)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    key = next(k for k in payload["state_dict"] if k.endswith("tap_mask"))
    payload["state_dict"][key] = ~payload["state_dict"][key]
    torch.save(payload, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="checksum mismatch for tensor 'features.0.0.tap_mask'"):
        asc.load(tmp_path / "t.pt", small_cnn)  # the checksum catches the edit first
    del payload["checksums_json"]  # as a file written before checksums: the plan check still catches it
    torch.save(payload, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="disagrees with its plan"):
        asc.load(tmp_path / "t.pt", small_cnn)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    model, plan = pruned_model()
    asc.save(model, tmp_path / "m.pt", plan=plan)
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["meta_json"] = _RunsCode(marker)
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a safe AutoSculpt model file"):
        asc.load(tmp_path / "evil.pt", small_cnn)
    assert not marker.exists()


def test_save_is_atomic_and_checks_arguments(tmp_path):
    model, plan = pruned_model()
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        asc.save("not a model", tmp_path / "x.pt")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        asc.save(model, tmp_path / "x.pt", plan=plan, meta={"f": object()})
    assert not (tmp_path / "x.pt").exists()
    asc.save(model, tmp_path / "x.pt", plan=plan)
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary files left behind


def test_vit_with_attention_and_mlp_plans_round_trips(tmp_path):
    from autosculpt.attention_patterns import ATTN6
    from autosculpt.models.vit import vit_attention_names, vit_mlp_pairs
    from autosculpt.nn.attention import attention_layer_plan
    from autosculpt.nn.linear import mlp_pair_plan

    args = dict(num_classes=10, image_size=8, patch_size=2, in_chans=1, embed_dim=48, depth=2, num_heads=3)
    torch.manual_seed(0)
    dense = get_model("vit_tiny", **args).eval()
    layers = {n: attention_layer_plan(ATTN6, [0, 1 + i, 5], block_size=4) for i, n in enumerate(vit_attention_names(dense))}
    for i, (fc1, fc2) in enumerate(vit_mlp_pairs(dense)):
        layers.update(mlp_pair_plan(fc1, fc2, [0, 2 + i], block_size=16))
    plan = {"version": 1, "layers": layers}
    sparse = asc.sparsify(dense, plan).eval()
    asc.save(sparse, tmp_path / "vit.pt", plan=plan, meta={"model": "vit_tiny", "model_args": args})
    assert asc.io.read(tmp_path / "vit.pt").extra_state  # the head patterns travel as JSON
    loaded = asc.load(tmp_path / "vit.pt").eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), sparse(x))
    # A plan with other head patterns cannot silently take these weights.
    other = json.loads(json.dumps(plan))
    first = vit_attention_names(dense)[0]
    other["layers"][first] = attention_layer_plan(ATTN6, [5, 1, 0], block_size=4)
    payload = torch.load(tmp_path / "vit.pt", weights_only=True)
    payload["plan_json"] = json.dumps(other)
    torch.save(payload, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="does not match the model"):
        asc.load(tmp_path / "t.pt")


def test_item9_metadata_asking_for_a_huge_model_is_refused_before_building(tmp_path, monkeypatch):
    import autosculpt.models as models

    model, plan = pruned_model()
    path = tmp_path / "m.pt"
    # A small file whose metadata asks for 4096-channel layers (~1.2 GB of weights if it were built).
    asc.save(model, path, plan=plan, meta={"model": "digits_cnn", "model_args": {"channels": [4096, 4096, 4096, 4096]}})
    assert path.stat().st_size < 2_000_000
    devices, real = [], models.get_model

    def recording_get_model(*a, **k):
        devices.append(torch.get_default_device().type)
        return real(*a, **k)

    monkeypatch.setattr(models, "get_model", recording_get_model)
    with pytest.raises(ValueError, match=r"m\.pt.*does not match the model it describes.*refused before building"):
        asc.load(path)
    assert devices == ["meta"]  # only ever built on the meta device: nothing was allocated
    with pytest.raises(ValueError, match="refused before building"):
        asc.load(path, "digits_cnn")
    # the honest metadata still loads
    asc.save(model, path, plan=plan, meta={"model": "digits_cnn", "model_args": {"channels": [8, 16, 16, 8]}})
    assert isinstance(asc.load(path), torch.nn.Module)


def test_item9_bit_flip_in_a_tensor_is_detected(tmp_path):
    import struct
    import zipfile

    model, plan = pruned_model()
    path = tmp_path / "m.pt"
    asc.save(model, path, plan=plan)
    sums = json.loads(torch.load(path, weights_only=True)["checksums_json"])
    assert sums["algorithm"] == "sha256" and set(sums["tensors"]) == set(model.state_dict())
    with zipfile.ZipFile(path) as z:  # flip one bit inside the largest tensor's stored bytes
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[big.header_offset + 26:big.header_offset + 30])
    data[big.header_offset + 30 + name_len + extra_len + big.file_size // 2] ^= 0x10
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"flipped\.pt.*checksum mismatch for tensor"):
        asc.load(bad, small_cnn)
    # a file written before checksums existed (no checksum record) still loads
    payload = torch.load(path, weights_only=True)
    del payload["checksums_json"]
    torch.save(payload, tmp_path / "old.pt")
    loaded = asc.load(tmp_path / "old.pt", small_cnn).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
