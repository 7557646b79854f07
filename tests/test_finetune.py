"""Fine-tuning: masks hold after every step, selection on validation, test once, exact resume."""
import pytest
import torch

import autosculpt as asc
import autosculpt.finetune as ft
from autosculpt.finetune import FinetuneConfig, enforce_masks, evaluate, finetune
from autosculpt.models import get_model
from autosculpt.nn import PatternConv2d
from autosculpt.patterns import PAPER6
from autosculpt.plan import conv_layer_plan

# one torch thread per test (the shared fixture in conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data(n, seed, classes=4):
    """Learnable 1×8×8 images: the class decides which quadrant is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, 0, r * 4:(r + 1) * 4, q * 4:(q + 1) * 4] += 1.5
    return torch.utils.data.TensorDataset(x, y)


def sparse_model(seed=0):
    torch.manual_seed(seed)
    dense = get_model("digits_cnn", channels=(8, 16, 16, 8), num_classes=4)
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in dense.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
            layers[name] = conv_layer_plan(PAPER6, torch.randint(0, 6, (m.out_channels,), generator=g))
    return asc.sparsify(dense, {"version": 1, "layers": layers})


def pattern_layers(model):
    return [m for m in model.modules() if isinstance(m, PatternConv2d)]


def poison_dropped_taps(model):
    """Writes non-zero values at every dropped tap, as a careless weight load would."""
    with torch.no_grad():
        for m in pattern_layers(model):
            dropped = ~m.tap_mask[:, None].expand_as(m.weight)
            m.weight[dropped] = 0.7


def test_dropped_taps_exactly_zero_after_many_steps_with_momentum_and_weight_decay():
    model = sparse_model()
    poison_dropped_taps(model)
    before = [m.weight.detach().clone() for m in pattern_layers(model)]
    finetune(model, toy_data(96, 0), toy_data(32, 1), epochs=4, batch_size=8, lr=0.2, momentum=0.9,
             weight_decay=0.05, progress=False)  # 48 steps
    for m, w0 in zip(pattern_layers(model), before):
        keep = m.tap_mask[:, None].expand_as(m.weight)
        assert torch.count_nonzero(m.weight[~keep]) == 0  # exactly zero, not merely small
        assert not torch.equal(m.weight[keep], w0[keep])  # and the kept weights did train


def test_without_enforcement_the_poisoned_taps_would_survive(monkeypatch):
    # Control for the test above: the zeros come from enforce_masks, not from the optimizer.
    monkeypatch.setattr(ft, "enforce_masks", lambda model: None)
    model = sparse_model()
    poison_dropped_taps(model)
    finetune(model, toy_data(32, 0), toy_data(16, 1), epochs=1, batch_size=8, lr=0.1, progress=False)
    assert any(torch.count_nonzero(m.weight[~m.tap_mask[:, None].expand_as(m.weight)]) > 0 for m in pattern_layers(model))


def test_best_on_validation_and_test_evaluated_once(monkeypatch):
    train, val, test = toy_data(96, 0), toy_data(48, 1), toy_data(40, 2)
    calls = []
    real_evaluate = ft.evaluate
    monkeypatch.setattr(ft, "evaluate", lambda m, d, bs=256: calls.append(d) or real_evaluate(m, d, bs))
    model = sparse_model()
    res = finetune(model, train, val, test, epochs=4, batch_size=16, lr=0.05, progress=False)
    assert sum(d is test for d in calls) == 1 and calls[-1] is test  # test touched once, at the end
    assert sum(d is val for d in calls) == 4
    accs = [h["val_acc"] for h in res.history]
    assert res.best_val_acc == max(accs) and res.best_epoch == accs.index(max(accs)) + 1
    # The model holds the selected weights: its validation accuracy is the best one.
    assert evaluate(model, val) == res.best_val_acc
    assert res.test_acc == evaluate(model, test)
    assert res.best_val_acc > 0.5  # it learned something (4 balanced classes: chance is 0.25)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    train, val = toy_data(64, 0), toy_data(32, 1)
    cfg = FinetuneConfig(epochs=3, batch_size=8, lr=0.05, seed=5)
    reference = sparse_model()
    ref = finetune(reference, train, val, config=cfg, progress=False)

    real_collate, n = ft._collate, {"calls": 0}

    def interrupt_at_step_13(data, idx):
        n["calls"] += 1
        if n["calls"] == 13:  # epoch 2, step 5 (8 steps per epoch)
            raise KeyboardInterrupt
        return real_collate(data, idx)

    ckpt = tmp_path / "ft.pt"
    model = sparse_model()
    monkeypatch.setattr(ft, "_collate", interrupt_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, train, val, config=cfg, checkpoint_path=str(ckpt), progress=False)
    saved = torch.load(ckpt, weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 4)
    monkeypatch.setattr(ft, "_collate", real_collate)
    resumed = sparse_model()
    res = finetune(resumed, train, val, config=cfg, checkpoint_path=str(ckpt), resume=True, progress=False)
    assert res.resumed_from == {"epoch": 1, "step": 4}
    assert [h["val_acc"] for h in res.history] == [h["val_acc"] for h in ref.history]
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # Other settings cannot silently continue a checkpoint.
    with pytest.raises(ValueError, match="other settings"):
        finetune(sparse_model(), train, val, config=cfg, checkpoint_path=str(ckpt), resume=True, batch_size=4, progress=False)


def test_bad_settings():
    with pytest.raises(ValueError, match="epochs: expected a positive int"):
        finetune(sparse_model(), toy_data(8, 0), toy_data(8, 1), epochs=0, progress=False)
    with pytest.raises(TypeError, match="unknown settings"):
        finetune(sparse_model(), toy_data(8, 0), toy_data(8, 1), epochz=1, progress=False)
    with pytest.raises(ValueError, match="val_data: expected a non-empty"):
        finetune(sparse_model(), toy_data(8, 0), toy_data(0, 1), progress=False)


def test_enforce_masks_reaches_nested_layers():
    model = sparse_model()
    poison_dropped_taps(model)
    enforce_masks(model)
    for m in pattern_layers(model):
        assert torch.count_nonzero(m.weight * ~m.tap_mask[:, None]) == 0
