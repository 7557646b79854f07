"""Training utilities shared by the search and fine-tuning: train, evaluate, recalibrate BN.

Everything is seeded and uses the data order given by a seeded generator, so runs on the CPU are
reproducible.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["train_classifier", "evaluate", "recalibrate_bn", "make_loader", "enforce_masks"]


def _check_dataset(data, name: str) -> None:
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(f"{name}: expected a torch Dataset, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name}: the dataset is empty")


def _check_positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def make_loader(data: Dataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """A single-process DataLoader; shuffling uses its own seeded generator (reproducible)."""
    gen = torch.Generator().manual_seed(int(seed)) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=0)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def enforce_masks(model: nn.Module) -> None:
    """Calls ``enforce_mask()`` on every pattern-sparse submodule, so pruned weights stay exactly zero
    after an optimizer step (the reference code's fine-tuning let them grow back)."""
    for m in model.modules():
        fn = getattr(m, "enforce_mask", None)
        if callable(fn) and m is not model:
            fn()


def train_classifier(
    model: nn.Module,
    train_data: Dataset,
    val_data: Optional[Dataset] = None,
    epochs: int = 10,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    *,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    label_smoothing: float = 0.0,
    progress: bool = False,
    on_epoch_end: Optional[Callable[[int, dict], None]] = None,
) -> dict:
    """Trains a classifier with SGD + Nesterov momentum and a cosine learning-rate schedule.

    Pattern masks are re-applied after every optimizer step (:func:`enforce_masks`), so the same
    function fine-tunes sparsified models. Returns ``{"train_loss": [...], "val_acc": [...],
    "best_val_acc": float}``; the model is left with its final weights (no selection on any split).

    Args:
        model: the ``nn.Module`` to train in place.
        train_data, val_data: datasets of (input, label); val may be None.
        epochs, lr, batch_size, seed: the usual; ``seed`` fixes initial shuffling and dropout.
        on_epoch_end: optional callback ``fn(epoch, stats)`` (e.g. for checkpointing).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _check_dataset(train_data, "train_data")
    epochs = _check_positive_int(epochs, "epochs")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr: expected a positive number, got {lr!r}")
    torch.manual_seed(seed)
    device = _device_of(model)
    loader = make_loader(train_data, batch_size, shuffle=True, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    history = {"train_loss": [], "val_acc": []}
    bar = None
    if progress:
        from ._optional import tqdm

        bar = tqdm(total=epochs, desc="train", unit="epoch")
    for epoch in range(epochs):
        model.train()
        loss_sum, n = 0.0, 0
        for xb, yb in loader:
            xb, yb = xb.to(device), yb.to(device)
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            enforce_masks(model)
            sched.step()
            loss_sum += float(loss.detach()) * len(yb)
            n += len(yb)
        history["train_loss"].append(loss_sum / n)
        stats = {"train_loss": loss_sum / n}
        if val_data is not None:
            acc = evaluate(model, val_data)
            history["val_acc"].append(acc)
            stats["val_acc"] = acc
        if bar is not None:
            bar.set_postfix(stats)
            bar.update(1)
        if on_epoch_end is not None:
            on_epoch_end(epoch, stats)
    if bar is not None:
        bar.close()
    history["best_val_acc"] = max(history["val_acc"]) if history["val_acc"] else float("nan")
    return history


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode; the model's mode is restored)."""
    _check_dataset(data, "data")
    batch_size = _check_positive_int(batch_size, "batch_size")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    for xb, yb in make_loader(data, batch_size, shuffle=False):
        pred = model(xb.to(device)).argmax(1)
        correct += int((pred.cpu() == yb).sum())
        total += len(yb)
    model.train(was_training)
    return correct / total


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Dataset, batches: int = 4, batch_size: int = 128, seed: int = 0) -> nn.Module:
    """Re-estimates BatchNorm running statistics on ``batches`` training batches (cumulative average).

    Pruning shifts each layer's output distribution; fresh BN statistics recover much of the
    accuracy that one-shot pruning loses, without any gradient step. No-op for models without BN.
    """
    _check_dataset(data, "data")
    batches = _check_positive_int(batches, "batches")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = {m: m.momentum for m in bns}
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
    was_training = model.training
    model.train()
    device = _device_of(model)
    for i, (xb, _) in enumerate(make_loader(data, batch_size, shuffle=True, seed=seed)):
        if i >= batches:
            break
        model(xb.to(device))
    for m, mom in saved.items():
        m.momentum = mom
    model.train(was_training)
    return model
