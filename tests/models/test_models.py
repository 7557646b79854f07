"""Built-in models, the digits splits and the training utilities."""
import pytest
import torch
from torch import nn

from autosculpt.data.digits import load_digits_splits
from autosculpt.models import MODEL_NAMES, get_model
from autosculpt.train import evaluate, recalibrate_bn, train_classifier

# Tiny networks: one thread avoids OpenMP fork/join overhead, which dominates on 2 shared cores.
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.mark.parametrize("name,shape,n3x3", [
    ("digits_cnn", (3, 1, 8, 8), 4), ("resnet20", (2, 3, 32, 32), 19), ("resnet56", (2, 3, 32, 32), 55),
    ("vgg16", (2, 3, 32, 32), 13), ("mobilenetv2", (2, 3, 32, 32), 18),
])
def test_builtin_models_run_and_have_expected_3x3_convs(name, shape, n3x3):
    m = get_model(name, num_classes=7).eval()
    assert m(torch.randn(shape)).shape == (shape[0], 7)
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    assert len(convs) == n3x3


def test_registry_rejects_unknown_names():
    assert "vit_tiny" in MODEL_NAMES
    with pytest.raises(ValueError, match="name"):
        get_model("resnet9000")


def test_digits_splits_are_stratified_disjoint_and_seeded():
    tr, va, te = load_digits_splits(seed=0)
    assert len(tr) + len(va) + len(te) == 1797
    assert tr.tensors[0].shape[1:] == (1, 8, 8) and tr.tensors[0].dtype == torch.float32
    assert tr.tensors[1].dtype == torch.long
    # normalised with the training split's statistics
    assert abs(float(tr.tensors[0].mean())) < 1e-4 and abs(float(tr.tensors[0].std()) - 1) < 1e-2
    for split in (tr, va, te):  # stratified: every class present in roughly equal share
        counts = torch.bincount(split.tensors[1], minlength=10).float()
        assert counts.min() / counts.max() > 0.8
    rows = lambda d: {tuple(r.flatten().tolist()) for r in d.tensors[0]}  # noqa: E731
    assert len(rows(tr) & rows(te)) < 5  # digits has a few duplicate images; splits are otherwise disjoint
    tr2, _, te2 = load_digits_splits(seed=0)
    assert torch.equal(te.tensors[0], te2.tensors[0])
    _, _, te3 = load_digits_splits(seed=1)
    assert not torch.equal(te.tensors[0], te3.tensors[0])
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits_splits(val_fraction=1.5)


def test_small_digits_cnn_trains_and_bn_recalibration_restores_stats():
    tr, va, _ = load_digits_splits()
    m = get_model("digits_cnn", channels=(16, 32, 32, 32))
    hist = train_classifier(m, tr, va, epochs=4, lr=0.05, batch_size=64, seed=0)
    assert hist["val_acc"][-1] >= 0.9
    acc = evaluate(m, va)
    assert acc == pytest.approx(hist["val_acc"][-1])
    bn = m.features[0][1]
    ref = bn.running_mean.clone()
    bn.running_mean.add_(5.0)  # corrupt the statistics
    assert evaluate(m, va) < acc - 0.2
    recalibrate_bn(m, tr, batches=4)
    assert torch.allclose(bn.running_mean, ref, atol=0.3)
    assert evaluate(m, va) >= acc - 0.03


def test_train_rejects_bad_arguments():
    tr, va, _ = load_digits_splits()
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(get_model("digits_cnn"), tr, va, epochs=0)
    with pytest.raises(TypeError, match="model"):
        train_classifier("not a model", tr, va)
