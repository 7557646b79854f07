"""Dense test accuracy of the built-in models on ``digits-clutter`` (issue 15, item 4).

The benchmark is meant to be *not saturated*: dense ResNet-20, trained exactly as ``autosculpt
prune`` trains a dense model when no weights are given (:func:`autosculpt.finetune.finetune` with
the CLI defaults ``dense_epochs``, ``dense_lr``, ``batch_size``; the best-on-validation weights),
must land between 80% and 95% test accuracy, so that pruning visibly costs accuracy.

    python -m bench.digits_clutter_accuracy                                   # resnet20, seed 0
    python -m bench.digits_clutter_accuracy --models resnet20 digits_cnn mobilenetv2 --seeds 0 1 \\
        --out bench/results/digits-clutter.md
    python -m bench.digits_clutter_accuracy --set noise=0.2 --set fragments=2,5   # tuning the generator

``--set KEY=VALUE`` overrides a :class:`autosculpt.data.clutter.ClutterConfig` field (tuples as
``a,b``); without it the data set is ``get_dataset("digits-clutter", seed)``, the CLI's path.
"""
from __future__ import annotations

import argparse
import dataclasses
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def parse_overrides(items):
    from autosculpt.data.clutter import ClutterConfig

    fields = {f.name: f for f in dataclasses.fields(ClutterConfig)}
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set: expected KEY=VALUE with KEY one of {', '.join(fields)}, got {item!r}")
        default = getattr(ClutterConfig(), key)
        if isinstance(default, tuple):
            out[key] = tuple(type(d)(v) for d, v in zip(default, value.split(",")))
        else:
            out[key] = type(default)(value)
    return out


def load_splits(seed: int, overrides: dict):
    from autosculpt.data import DataSplits, get_dataset
    from autosculpt.data.clutter import CLUTTER_CLASSES, load_clutter_splits

    if not overrides:
        return get_dataset("digits-clutter", seed)
    tr, va, te = load_clutter_splits(seed, **overrides)
    return DataSplits(tr, va, te, CLUTTER_CLASSES, tuple(tr.tensors[0].shape[1:]), "digits-clutter")


def train_dense(model_name: str, splits, seed: int, epochs: int, lr: float, batch_size: int) -> dict:
    """What ``autosculpt.models.pretrained.dense_model`` does on a cache miss, plus the test accuracy."""
    from autosculpt.finetune import finetune
    from autosculpt.models.pretrained import resolve_model

    factory, _ = resolve_model(model_name, splits.num_classes, splits.input_shape, {})
    torch.manual_seed(seed)
    model = factory()
    t0 = time.perf_counter()
    res = finetune(model, splits.train, splits.val, splits.test, epochs=epochs, lr=lr, batch_size=batch_size,
                   seed=seed, progress=False, desc="dense training")
    return {"model": model_name, "seed": seed, "epochs": epochs, "val_acc": res.best_val_acc, "best_epoch": res.best_epoch,
            "test_acc": res.test_acc, "last_train_loss": res.history[-1].get("train_loss"),
            "seconds": time.perf_counter() - t0}


def _table(rows) -> str:
    head = ("| model | epochs | seed | test acc | best val acc (epoch) | train time (s) |\n"
            "|---|---|---|---|---|---|\n")
    return head + "".join(f"| {r['model']} | {r['epochs']} | {r['seed']} | {r['test_acc']:.4f} | {r['val_acc']:.4f} "
                          f"({r['best_epoch']}) | {r['seconds']:.0f} |\n" for r in rows)


def main(argv=None) -> int:
    from autosculpt.config import DEFAULTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["resnet20"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=DEFAULTS["dense_epochs"], help="default: the CLI's dense_epochs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a ClutterConfig field")
    ap.add_argument("--out", help="write the table as markdown here")
    ap.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = parse_overrides(args.set)
    lr, bs = DEFAULTS["dense_lr"], DEFAULTS["batch_size"]
    rows = []
    old = Path(args.out).read_text() + "\n" if args.out and args.append and Path(args.out).exists() else ""
    cmd = "python -m bench.digits_clutter_accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = (f"CPU: {cpu_model()}; torch {torch.__version__}; {args.threads} thread(s); lr {lr}, batch {bs} "
            f"(CLI defaults); settings: {overrides or 'defaults'}\n\n`{cmd}`\n\n")
    for seed in args.seeds:
        t0 = time.perf_counter()
        splits = load_splits(seed, overrides)
        gen = time.perf_counter() - t0
        print(f"seed {seed}: digits-clutter {splits.input_shape}, train/val/test {len(splits.train)}/{len(splits.val)}/"
              f"{len(splits.test)} canvases from {len(splits.train.source_indices)}/{len(splits.val.source_indices)}/"
              f"{len(splits.test.source_indices)} source images, generated in {gen:.1f} s", flush=True)
        for name in args.models:
            r = train_dense(name, splits, seed, args.epochs, lr, bs)
            rows.append(r)
            print(f"  {name}: test {r['test_acc']:.4f}  val {r['val_acc']:.4f} (epoch {r['best_epoch']})  "
                  f"last train loss {r['last_train_loss']:.3f}  {r['seconds']:.0f} s", flush=True)
            if args.out:  # after every row, so a run cut short keeps what it measured
                Path(args.out).write_text(old + meta + _table(rows))
    print(_table(rows))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
