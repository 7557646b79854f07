"""The run report: ``report.md`` with PNG plots (matplotlib, Agg) and ``summary.json``.

A run folder holds plain files that the report is rendered from, so ``autosculpt report RUN`` can
re-render it at any time:

- ``summary.json``: dense vs pruned numbers (accuracy, FLOPs, parameters, latency, speedup);
- ``search_result.json``: the search history (one record per evaluated plan) and the best plan;
- ``plan.json``: the chosen plan; ``layer_latency.json``: per-layer dense vs sparse latency.

Plots: reward / accuracy / latency over the search; accuracy vs latency of every evaluated plan with
the Pareto front and the chosen plan; the per-layer pattern mix; per-layer dense vs sparse latency.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

from ._atomic import atomic_write_text

__all__ = ["render_report", "write_json", "read_json", "pareto_front", "history_series", "PLOTS"]

PLOTS = ("search_progress.png", "pareto.png", "pattern_mix.png", "layer_latency.png")

# Field names of a search-history record (first present wins), so the report reads records written
# by any version of the search.
_ACC_KEYS = ("val_acc", "val_accuracy", "accuracy", "acc")
_MEASURED_KEYS = ("measured_latency_ms", "latency_measured_ms", "measured_ms")
_PREDICTED_KEYS = ("predicted_latency_ms", "latency_predicted_ms", "latency_ms", "predicted_ms")
_REWARD_KEYS = ("reward",)
_FLOPS_KEYS = ("flops", "macs")


def write_json(obj, path: str) -> None:
    """Writes JSON atomically (temporary file + rename)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def read_json(path: str, what: str):
    """Reads a JSON file of the run folder with a clear error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"report: {what} {path!r} is missing")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"report: {path!r} is not valid JSON ({e})") from None


def _first(rec: dict, keys: Sequence[str]) -> Optional[float]:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def history_series(history: List[dict]) -> Dict[str, List[Optional[float]]]:
    """Per-record reward, accuracy, predicted and measured latency, FLOPs (None where absent)."""
    return {
        "reward": [_first(r, _REWARD_KEYS) for r in history],
        "acc": [_first(r, _ACC_KEYS) for r in history],
        "predicted_ms": [_first(r, _PREDICTED_KEYS) for r in history],
        "measured_ms": [_first(r, _MEASURED_KEYS) for r in history],
        "flops": [_first(r, _FLOPS_KEYS) for r in history],
    }


def pareto_front(points: Sequence[tuple]) -> List[int]:
    """Indices of the (latency, accuracy) points not dominated by another (lower-or-equal latency and
    higher-or-equal accuracy, one strictly), sorted by latency."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _plot_search(plt, series, budget_ms, path):
    n = len(series["acc"])
    xs = list(range(1, n + 1))
    fig, axes = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True)
    for ax, key, label in ((axes[0], "reward", "reward"), (axes[1], "acc", "validation accuracy")):
        pts = [(x, v) for x, v in zip(xs, series[key]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), ".", alpha=0.5, label="each plan")
            best, run = [], float("-inf")
            for x, v in pts:
                run = max(run, v)
                best.append((x, run))
            ax.plot(*zip(*best), "-", color="C3", label="best so far")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax = axes[2]
    for key, label, style in (("predicted_ms", "predicted", "."), ("measured_ms", "measured", "x")):
        pts = [(x, v) for x, v in zip(xs, series[key]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), style, alpha=0.6, label=label)
    if budget_ms:
        ax.axhline(budget_ms, color="C3", ls="--", label="budget")
    ax.set_ylabel("latency (ms)")
    ax.set_xlabel("evaluated plan")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.suptitle("Search progress")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def budget_verdict(summary: dict) -> str:
    """One line: whether the final measurement meets the budget ("NOT met" whenever it does not)."""
    final = summary.get("met_budget_final")
    if not final:
        return f"Budget {summary.get('budget', '?')}: " + ("met in the search." if summary.get("met_budget_in_search")
                                                            else "NOT met by the chosen plan in the search.")
    got = f": {final['measured']:.3g} against {final['target']:g}" if final.get("measured") is not None else ""
    return (f"Budget {summary.get('budget', '?')}: **{'met' if final['met'] else 'NOT met'}** in the final "
            f"measurement ({final['what']}{got}).")


def user_budget_ms(summary: dict) -> Optional[float]:
    """The user's latency budget on the latency model's (predicted) scale, without the search's safety
    margin: dense predicted latency ÷ target speedup, or the target latency (None for FLOPs budgets)."""
    cfg, search = summary.get("config", {}), summary.get("search", {})
    if cfg.get("target_latency_ms") is not None:
        return float(cfg["target_latency_ms"])
    if cfg.get("target_speedup") is not None and search.get("dense_latency_ms") is not None:
        return float(search["dense_latency_ms"]) / float(cfg["target_speedup"])
    return None


def _plot_pareto(plt, series, chosen_idx, dense_point, budget_ms, path):
    """Accuracy against PREDICTED latency only (every plan has one; measured points would mix two
    scales), with the dense model and the user's budget on the same scale."""
    lat = series["predicted_ms"]
    pts = [(l, a) for l, a in zip(lat, series["acc"]) if l is not None and a is not None]
    fig, ax = plt.subplots(figsize=(7, 5))
    if pts:
        ax.scatter(*zip(*pts), s=14, alpha=0.5, label="evaluated plans")
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "-o", color="C1", ms=4, label="Pareto front")
    if chosen_idx is not None and 0 <= chosen_idx < len(lat) and lat[chosen_idx] is not None and series["acc"][chosen_idx] is not None:
        ax.scatter([lat[chosen_idx]], [series["acc"][chosen_idx]], marker="*", s=260, color="C3", zorder=5, label="chosen plan")
    if dense_point:
        ax.scatter([dense_point[0]], [dense_point[1]], marker="D", s=60, color="k", zorder=5, label="dense model")
    if budget_ms:
        ax.axvline(budget_ms, color="C3", ls="--", lw=1, label="your budget (no search margin)")
    ax.set_xlabel("predicted latency (ms, search batch, deployed form)")
    ax.set_ylabel("validation accuracy (before fine-tuning)")
    ax.set_title("Accuracy vs latency of every evaluated plan")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan_pattern_mix(plan: dict) -> List[tuple]:
    """(layer, {pattern name: fraction of filters}) for each conv layer of a plan; other kinds get
    {"kept": fraction} when their plan states it."""
    rows = []
    for name, layer in (plan or {}).get("layers", {}).items():
        if layer.get("kind") == "conv":
            names = layer["pattern_set"]["names"]
            ids = layer["pattern_ids"]
            counts = {n: 0 for n in names}
            for i in ids:
                counts[names[i]] += 1
            rows.append((name, {n: c / max(len(ids), 1) for n, c in counts.items()}))
        elif isinstance(layer.get("kept"), (int, float)):
            rows.append((name, {"kept": float(layer["kept"]), "pruned": 1 - float(layer["kept"])}))
    return rows


def _plot_mix(plt, plan, path):
    rows = plan_pattern_mix(plan)
    names: List[str] = []
    for _, mix in rows:
        names += [n for n in mix if n not in names]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(rows) + 1.2)))
    left = [0.0] * len(rows)
    cmap = plt.get_cmap("viridis")
    for j, n in enumerate(names):
        vals = [mix.get(n, 0.0) for _, mix in rows]
        ax.barh(range(len(rows)), vals, left=left, color=cmap(j / max(len(names) - 1, 1)), label=n)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("fraction of filters")
    ax.set_xlim(0, 1)
    ax.set_title("Pattern mix per layer (chosen plan)")
    if names:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(names), 6))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_layer_latency(plt, rows, path):
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.35 * len(rows) + 1.2)))
    ys = list(range(len(rows)))
    h = 0.4
    ax.barh([y - h / 2 for y in ys], [r["dense_ms"] for r in rows], height=h, label="dense conv")
    ax.barh([y + h / 2 for y in ys], [r["pruned_ms"] for r in rows], height=h,
            label="pruned layer (sparse kernel or dense fallback)")
    ax.set_yticks(ys, [f"{r['layer']} [{r.get('path', '?')}]" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median latency (ms)")
    ax.set_title("Per-layer latency, dense vs pruned")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, kind="") -> str:
    if v is None:
        return "–"
    if kind == "acc":
        return f"{100 * v:.2f}%"
    if kind == "ms":
        return f"{v:.3f} ms"
    if kind == "int":
        return f"{int(v):,}"
    if kind == "x":
        return f"{v:.2f}×"
    return str(v)


def summary_table(summary: dict) -> List[List[str]]:
    """Rows [metric, dense, pruned, ratio] of the summary (also printed by the CLI)."""
    d, p = summary["dense"], summary["pruned"]
    rows = [["validation accuracy", _fmt(d.get("val_acc"), "acc"), _fmt(p.get("val_acc"), "acc"), ""],
            ["test accuracy", _fmt(d.get("test_acc"), "acc"), _fmt(p.get("test_acc"), "acc"), ""],
            ["FLOPs (MACs / sample)", _fmt(d.get("flops"), "int"), _fmt(p.get("flops"), "int"),
             _fmt(d["flops"] / p["flops"] if p.get("flops") else None, "x")],
            ["parameters", _fmt(d.get("params"), "int"), _fmt(p.get("params"), "int"),
             _fmt(d["params"] / p["params"] if p.get("params") else None, "x")]]
    for b, lat in sorted(summary.get("latency_ms", {}).items(), key=lambda kv: int(kv[0])):
        rows.append([f"latency, batch {b}", _latency_cell(lat, "dense"), _latency_cell(lat, "pruned"),
                     _fmt(lat["dense"] / lat["pruned"], "x") + " speedup"
                     + (f" (load {lat['load_average']:.1f})" if lat.get("load_average") is not None else "")])
    return rows


def _latency_cell(lat: dict, which: str) -> str:
    """``1.234 ms (IQR 0.010, autosculpt)``: the median, its IQR and the deployed route when recorded."""
    text = _fmt(lat[which], "ms")
    extra = [f"IQR {lat[which + '_iqr']:.3f}"] if lat.get(which + "_iqr") is not None else []
    if lat.get(which + "_route"):
        extra.append(str(lat[which + "_route"]))
    return text + (f" ({', '.join(extra)})" if extra else "")


def format_table(rows: List[List[str]], header=("", "dense", "pruned", "")) -> str:
    """Plain-text table with aligned columns."""
    all_rows = [list(header)] + rows
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(header))]
    lines = []
    for j, r in enumerate(all_rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_report(run_dir: str) -> str:
    """Renders ``report.md`` and the PNG plots of a run folder; returns the report's path."""
    from ._optional import require

    matplotlib = require("matplotlib", what="the run report (its plots)")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"report: run folder {run_dir!r} does not exist")
    summary = read_json(os.path.join(run_dir, "summary.json"), "summary")
    search = read_json(os.path.join(run_dir, "search_result.json"), "search result")
    plan = read_json(os.path.join(run_dir, "plan.json"), "plan")
    layer_rows = read_json(os.path.join(run_dir, "layer_latency.json"), "layer latency")
    history = search.get("history", []) if isinstance(search, dict) else []
    plots = os.path.join(run_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    series = history_series(history)
    budget_ms = summary.get("search", {}).get("budget_latency_ms")
    chosen = summary.get("search", {}).get("chosen_index")
    dense_pt = None
    dl, da = summary.get("search", {}).get("dense_latency_ms"), summary["dense"].get("val_acc")
    if dl is not None and da is not None:
        dense_pt = (dl, da)
    _plot_search(plt, series, budget_ms, os.path.join(plots, PLOTS[0]))
    _plot_pareto(plt, series, chosen, dense_pt, user_budget_ms(summary), os.path.join(plots, PLOTS[1]))
    _plot_mix(plt, plan, os.path.join(plots, PLOTS[2]))
    _plot_layer_latency(plt, layer_rows, os.path.join(plots, PLOTS[3]))

    cfg = summary.get("config", {})
    lines = [
        f"# AutoSculpt run `{os.path.basename(os.path.abspath(run_dir))}`", "",
        f"Model **{cfg.get('model')}** on **{cfg.get('data')}**, budget: {summary.get('budget', '?')}, "
        f"seed {cfg.get('seed')}, device {summary.get('device', '?')}, {summary.get('threads', '?')} threads, "
        f"autosculpt {summary.get('versions', {}).get('autosculpt', '?')}, torch {summary.get('versions', {}).get('torch', '?')}.",
        "",
        "## Summary", "",
        "| | dense | pruned | |", "|---|---:|---:|---|",
    ]
    for r in summary_table(summary):
        lines.append("| " + " | ".join(r) + " |")
    s = summary.get("search", {})
    lines += [
        "",
        "Validation accuracy selected every plan and checkpoint; test accuracy was measured once per model, at the end. "
        "Latency is the median of interleaved repeats of whole-model forward passes on this machine"
        + (f", {summary['latency_timed_as']}." if summary.get("latency_timed_as") else "."),
        "", budget_verdict(summary), "",
        "## Search", "",
        f"{len(history)} plans evaluated in {s.get('episodes', '?')} episodes ({s.get('seconds') or 0:.0f} s). "
        f"Chosen plan: validation accuracy {_fmt(s.get('chosen_val_acc'), 'acc')} before fine-tuning, "
        f"predicted latency {_fmt(s.get('chosen_predicted_ms'), 'ms')}, measured {_fmt(s.get('chosen_measured_ms'), 'ms')}.",
        "", f"![search progress](plots/{PLOTS[0]})", "", f"![accuracy vs latency](plots/{PLOTS[1]})", "",
        "## Chosen plan", "", f"![pattern mix](plots/{PLOTS[2]})", "", f"![layer latency](plots/{PLOTS[3]})", "",
        "| layer | kept taps | path | dense ms | pruned ms | speedup |", "|---|---:|---|---:|---:|---:|",
    ]
    for r in layer_rows:
        lines.append(f"| {r['layer']} | {100 * r.get('kept', 0):.1f}% | {r.get('path', '?')} | {r['dense_ms']:.4f} | "
                     f"{r['pruned_ms']:.4f} | {r['dense_ms'] / r['pruned_ms']:.2f}× |")
    ft = summary.get("finetune", {})
    lines += [
        "", "## Fine-tuning", "",
        f"{ft.get('epochs', '?')} epochs, best validation accuracy {_fmt(ft.get('best_val_acc'), 'acc')} at epoch "
        f"{ft.get('best_epoch', '?')}; test accuracy of those weights {_fmt(ft.get('test_acc'), 'acc')}.",
        "", "## Files", "",
        "- `model.pt`: the pruned model (plan + weights). Load it with "
        f"`autosculpt.load('model.pt'{'' if ':' not in str(cfg.get('model')) else ', your_factory'})`.",
        "- `plan.json`, `search_result.json`, `summary.json`, `layer_latency.json`, `config.yaml`.", "",
    ]
    out = os.path.join(run_dir, "report.md")
    atomic_write_text(out, "\n".join(lines))
    return out
