"""Fine-tuning (and training) of dense or pattern-sparse models, on one process or with DDP.

- Masks hold: every pattern-sparse module's ``enforce_mask()`` runs after **every** optimizer step,
  so dropped taps stay exactly zero under momentum and weight decay (the reference code masked
  before the step and let pruned weights grow back).
- Selection on validation only: the weights of the epoch with the best validation accuracy are
  kept; the test split is evaluated once, at the very end, on those weights.
- Checkpoint / resume: a checkpoint (atomic write) after every epoch and on Ctrl-C records the
  epoch *and* the step inside it; the data order of each epoch is a pure function of (seed, epoch),
  so ``resume=True`` continues at the exact batch where training stopped.
- Data parallel: when ``torch.distributed`` is initialised (e.g. under ``torchrun``, see
  :func:`init_distributed`), the model is wrapped in ``DistributedDataParallel`` (gloo on CPU, nccl
  on GPU), each rank trains on its shard of every epoch's permutation, and evaluation is sharded and
  summed. Only rank 0 writes files and shows progress.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "enforce_masks", "evaluate", "init_distributed",
           "is_main_process", "world_info", "shutdown_distributed", "broadcast_text"]

CKPT_KIND = "autosculpt-finetune-checkpoint"


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune` (SGD + Nesterov momentum, cosine learning rate)."""

    epochs: int = 10
    """Passes over the training split."""
    lr: float = 0.01
    """Peak learning rate (per process; the global batch is ``batch_size × world_size``)."""
    batch_size: int = 64
    """Samples per optimizer step on each process."""
    momentum: float = 0.9
    """SGD momentum (Nesterov)."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    seed: int = 0
    """Seeds the data order of every epoch and the augmentation RNG."""
    eval_batch_size: int = 256
    """Batch size for validation and test evaluation."""

    def check(self) -> "FinetuneConfig":
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        for name in ("lr",):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name}: expected a positive number, got {v!r}")
        for name in ("momentum", "weight_decay", "label_smoothing"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {v!r}")
        return self


@dataclass
class FinetuneResult:
    """What :func:`finetune` did: per-epoch ``history`` (train_loss, val_acc, lr, seconds), the best
    validation accuracy and its epoch, and the test accuracy of those weights (None without test data)."""

    best_val_acc: float
    best_epoch: int
    test_acc: Optional[float]
    history: List[dict] = field(default_factory=list)
    resumed_from: Optional[dict] = None
    world_size: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- distributed helpers


def world_info():
    """(rank, world_size) of the current process (0, 1 without an initialised process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    return world_info()[0] == 0


def init_distributed() -> Optional[torch.device]:
    """Initialises ``torch.distributed`` from torchrun's environment (``WORLD_SIZE`` > 1).

    Uses nccl when CUDA is available (one GPU per local rank), else gloo. Returns the device this
    rank should use, or None when not launched by torchrun.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def shutdown_distributed() -> None:
    """Ends the process group :func:`init_distributed` started (after a barrier, so no rank leaves
    while another still talks to it); a no-op without one. Afterwards every process is on its own
    (``world_info()`` is (0, 1))."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_text(text: Optional[str], src: int = 0) -> str:
    """Rank ``src``'s ``text`` on every rank (the others pass None; without a process group: ``text``).
    Sent as UTF-8 bytes, never pickled."""
    import torch.distributed as dist

    if world_info()[1] == 1:
        return text if text is not None else ""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    raw = text.encode("utf-8") if dist.get_rank() == src and text is not None else b""
    size = torch.tensor([len(raw)], dtype=torch.long, device=dev)
    dist.broadcast(size, src=src)
    n = int(size)
    if n == 0:
        return ""
    buf = (torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(dev) if raw
           else torch.empty(n, dtype=torch.uint8, device=dev))
    dist.broadcast(buf, src=src)
    return buf.cpu().numpy().tobytes().decode("utf-8")


def _all_reduce_sum(values: List[float], device) -> List[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_info()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------- core helpers


@torch.no_grad()
def enforce_masks(model: nn.Module) -> None:
    """Re-zeroes the dropped weights of every pattern-sparse submodule (``enforce_mask()``)."""
    for m in model.modules():
        fn = getattr(m, "enforce_mask", None)
        if callable(fn) and m is not model:
            fn()


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> float:
    """Top-1 accuracy on ``data``; sharded over ranks and summed when distributed."""
    if len(data) == 0:
        raise ValueError("data: the dataset is empty")
    rank, world = world_info()
    device = _device_of(model)
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(data, list(range(rank, len(data), world)))
    correct = total = 0
    for xb, yb in DataLoader(shard, batch_size=batch_size, shuffle=False):
        pred = model(xb.to(device)).argmax(1)
        correct += int((pred == yb.to(device)).sum())
        total += len(yb)
    model.train(was_training)
    correct, total = _all_reduce_sum([correct, total], device)
    return correct / total


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> List[List[int]]:
    """This rank's batches of indices for ``epoch``: a permutation fixed by (seed, epoch), padded to a
    multiple of ``world`` and sharded, so every rank runs the same number of steps."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    if world > 1:
        perm += perm[: (-len(perm)) % world]
        perm = perm[rank::world]
    batches = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:  # a batch of one breaks BatchNorm in training mode
        batches.pop()
    return batches


def _collate(data: Dataset, idx: List[int]):
    if isinstance(data, torch.utils.data.TensorDataset) and len(data.tensors) == 2:
        t = torch.as_tensor(idx)
        return data.tensors[0][t], data.tensors[1][t].long()
    xs, ys = zip(*(data[i] for i in idx))
    return torch.stack(xs), torch.as_tensor([int(y) for y in ys])


def _sync_buffers(model: nn.Module) -> None:
    """Copies rank 0's buffers (BN running statistics) to every rank. DDP broadcasts them at the
    start of each forward, but each rank's last forward then updates its own copy; without this the
    ranks would evaluate (and keep) slightly different models."""
    import torch.distributed as dist

    if world_info()[1] > 1:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def _cosine_lr(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _state_copy(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- fine-tuning


def finetune(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    test_data: Optional[Dataset] = None,
    config: Optional[FinetuneConfig] = None,
    *,
    checkpoint_path: Optional[str] = None,
    resume: bool = False,
    progress: bool = True,
    desc: str = "fine-tune",
    **overrides,
) -> FinetuneResult:
    """Trains ``model`` in place and leaves it holding the best-on-validation weights.

    Args:
        model: a dense or sparsified model (its device is used; under DDP, put it on this rank's device).
        train_data, val_data, test_data: datasets of (input, label); test is evaluated once at the end.
        config: a :class:`FinetuneConfig`; keyword ``overrides`` (e.g. ``epochs=3``) replace its fields.
        checkpoint_path: where to write the checkpoint after each epoch and on Ctrl-C (rank 0).
        resume: continue from ``checkpoint_path`` if it exists (same settings required).
        progress: show a tqdm bar per epoch (rank 0 only).
    Raises KeyboardInterrupt after saving a checkpoint when interrupted.
    """
    from .io import atomic_torch_save

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    unknown = sorted(set(overrides) - set(FinetuneConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"finetune: unknown settings {unknown}")
    cfg = dataclasses.replace(config or FinetuneConfig(), **overrides)
    cfg.check()
    for name, d in (("train_data", train_data), ("val_data", val_data)):
        if d is None or len(d) == 0:
            raise ValueError(f"{name}: expected a non-empty dataset")
    rank, world = world_info()
    main = rank == 0
    device = _device_of(model)
    base = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(base, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        net = base
    opt = torch.optim.SGD(base.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                          weight_decay=cfg.weight_decay)
    steps_per_epoch = len(_epoch_batches(len(train_data), cfg.batch_size, cfg.seed, 0, rank, world))
    total_steps = cfg.epochs * steps_per_epoch
    signature = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "world_size": world, "seed": cfg.seed,
                 "n_train": len(train_data), "lr": cfg.lr}

    start_epoch, start_step, history = 0, 0, []
    best_acc, best_epoch, best_state, resumed_from = -1.0, -1, None, None
    torch.manual_seed(cfg.seed + rank)
    if resume and checkpoint_path and os.path.exists(checkpoint_path):
        ck = _read_checkpoint(checkpoint_path, device)
        if ck["signature"] != signature:
            diff = {k: (ck["signature"].get(k), v) for k, v in signature.items() if ck["signature"].get(k) != v}
            raise ValueError(f"resume: checkpoint {checkpoint_path!r} was made with other settings "
                             f"(saved vs now: {diff}); use the same settings or start without --resume")
        base.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        start_epoch, start_step, history = ck["epoch"], ck["step"], ck["history"]
        best_acc, best_epoch, best_state = ck["best_val_acc"], ck["best_epoch"], ck["best_state"]
        torch.set_rng_state(ck["rng"])
        resumed_from = {"epoch": start_epoch, "step": start_step}
        if main and progress:
            print(f"{desc}: resuming at epoch {start_epoch + 1}, step {start_step}/{steps_per_epoch}", flush=True)

    def save_checkpoint(epoch: int, step: int) -> None:
        if not (main and checkpoint_path):
            return
        atomic_torch_save({
            "kind": CKPT_KIND, "signature": signature, "epoch": epoch, "step": step,
            "model": _state_copy(base), "optimizer": opt.state_dict(), "history": history,
            "best_val_acc": best_acc, "best_epoch": best_epoch, "best_state": best_state,
            "rng": torch.get_rng_state(),
        }, checkpoint_path)

    bar = None
    epoch, step = start_epoch, start_step
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            batches = _epoch_batches(len(train_data), cfg.batch_size, cfg.seed, epoch, rank, world)
            first = start_step if epoch == start_epoch else 0
            if main and progress:
                from ._optional import tqdm

                bar = tqdm(total=len(batches), initial=first, desc=f"{desc} {epoch + 1}/{cfg.epochs}", unit="step",
                           leave=False, dynamic_ncols=True)
            net.train()
            loss_sum, seen = 0.0, 0
            for step in range(first, len(batches)):
                lr = _cosine_lr(cfg.lr, epoch * steps_per_epoch + step, total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                xb, yb = _collate(train_data, batches[step])
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                loss = F.cross_entropy(net(xb), yb, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                enforce_masks(base)
                loss_sum += float(loss.detach()) * len(yb)
                seen += len(yb)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr:.2g}", refresh=False)
                step += 1
            if bar is not None:
                bar.close()
                bar = None
            loss_sum, seen = _all_reduce_sum([loss_sum, seen], device)
            _sync_buffers(base)
            val_acc = evaluate(base, val_data, cfg.eval_batch_size)
            record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_acc": val_acc,
                      "lr": _cosine_lr(cfg.lr, (epoch + 1) * steps_per_epoch, total_steps),
                      "seconds": time.perf_counter() - t0}
            history.append(record)
            if val_acc > best_acc:
                best_acc, best_epoch, best_state = val_acc, epoch + 1, _state_copy(base)
            if main and progress:
                print(f"{desc} epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f}  "
                      f"val acc {val_acc:.4f}  (best {best_acc:.4f} @ {best_epoch})", flush=True)
            save_checkpoint(epoch + 1, 0)
            step = 0
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        save_checkpoint(epoch, step)
        raise
    if best_state is not None:
        base.load_state_dict(best_state)
    test_acc = evaluate(base, test_data, cfg.eval_batch_size) if test_data is not None else None
    return FinetuneResult(best_acc, best_epoch, test_acc, history, resumed_from, world)


def _read_checkpoint(path: str, device) -> dict:
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means the file cannot be resumed from
        raise ValueError(f"resume: checkpoint {path!r} is unreadable ({type(e).__name__}); delete it to start over") from None
    if not isinstance(ck, dict) or ck.get("kind") != CKPT_KIND:
        raise ValueError(f"resume: {path!r} is not a fine-tuning checkpoint")
    return ck
