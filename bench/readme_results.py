"""Regenerates the README's results section from the committed benchmark files (no hand-typed numbers).

Reads ``bench/results/compare.json`` (``python -m bench.compare``), ``bench/results/models-cpu.json``
(``python -m bench.bench_models``) and, when present, the summary lines of ``cpu-conv.md`` and
``cpu-attention.md``, and rewrites the text between ``<!-- results:start -->`` and
``<!-- results:end -->`` in README.md (appending the markers at the end when absent). Only the text
between the markers changes; running it twice gives the same file.

    python -m bench.readme_results [--readme README.md] [--results bench/results]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

START = "<!-- results:start -->"
END = "<!-- results:end -->"
METHOD_ORDER = ("autosculpt", "paper_reward", "random", "uniform", "l1_filter")


def _mean_std(vals) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "—"
    s = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.3f} ± {s:.3f}"


def compare_section(records: List[dict]) -> List[str]:
    """The comparison table: one row per (model, target, method), mean ± std over seeds."""
    if not records:
        return []
    machine = records[0].get("machine", "unknown CPU")
    threads = records[0].get("threads", "?")
    bb = records[0].get("budget_batch", 8)
    # records from before the search's selection settings were shared allowed 5% (no budget_tolerance field)
    tolerances = sorted({r.get("budget_tolerance", 0.05) for r in records})
    at_least = " or ".join(f"{1 - t:g} ×" for t in tolerances)
    seeds = sorted({r["seed"] for r in records})
    groups = {}
    for r in records:
        groups.setdefault((r["model"], float(r["target_speedup"])), {}).setdefault(r["method"], []).append(r)
    out = [
        "### AutoSculpt vs baselines at the same measured-latency budget",
        "",
        f"Same dense model, data, latency budget (target speedup at batch {bb}) and fine-tuning for every method; "
        f"{len(seeds)} seed(s); accuracies mean ± std; speedups measured beside the dense model ({threads} thread(s)) "
        f"on {machine}. *met* = budget met by the method's own end-to-end check, *final* = by the final side-by-side timing "
        f"(speedup ≥ {at_least} target at batch {bb}; both are noisy on a shared machine). Details and settings: "
        "[bench/results/compare.md](bench/results/compare.md).",
        "",
        "| model | target | method | test acc | val acc | speedup b1 | speedup b8 | met | final | search s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, target), by_method in sorted(groups.items()):
        first = next(iter(by_method.values()))[0]
        if first.get("dense_test_acc") is not None:
            out.append(f"| {model} | {target:g}× | *dense* | {first['dense_test_acc']:.3f} | {first['dense_val_acc']:.3f} "
                       "| 1 | 1 | | | |")
        for method in sorted(by_method, key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99):
            rs = by_method[method]
            out.append(
                f"| {model} | {target:g}× | {method} | {_mean_std([r['test_acc'] for r in rs])} "
                f"| {_mean_std([r['val_acc'] for r in rs])} | {_mean_std([r['speedup_b1'] for r in rs])} "
                f"| {_mean_std([r['speedup_b8'] for r in rs])} | {sum(bool(r['met_budget']) for r in rs)}/{len(rs)} "
                f"| {sum(bool(r.get('met_budget_final')) for r in rs)}/{len(rs)} "
                f"| {statistics.fmean(r['search_seconds'] for r in rs):.0f} |")
    out.append("")
    for (model, target), by_method in sorted(groups.items()):
        ok = {m: rs for m, rs in by_method.items() if 2 * sum(bool(r["met_budget"]) for r in rs) > len(rs)}
        if ok:
            best = max(ok, key=lambda m: statistics.fmean(r["test_acc"] for r in ok[m]))
            out.append(f"- {model} at {target:g}×: methods meeting the budget in most seeds: {', '.join(sorted(ok))}; "
                       f"most accurate of them: **{best}** "
                       f"(test {statistics.fmean(r['test_acc'] for r in ok[best]):.3f}).")
        else:
            out.append(f"- {model} at {target:g}×: no method met the budget in most seeds.")
    minutes = sum(r.get("wall_seconds", 0.0) for r in records) / 60
    out += ["", f"Reproduce: `python -m bench.compare` (the records above took {minutes:.0f} min of run time in all, "
                "dense training excluded; `--quick` for a smoke run).", ""]
    return out


def models_section(data) -> List[str]:
    """The whole-model speedup table from models-cpu.json (a list of rows, or {"machine", "records"})."""
    summary, load = None, None
    if isinstance(data, dict):
        machine, threads, rows, notes = data.get("machine"), data.get("threads"), data.get("records", []), data.get("notes", [])
        summary, load = data.get("summary"), data.get("loadavg_start_end")
    else:
        machine, threads, rows, notes = None, None, data, []
    if not rows and not notes:
        return []
    out = [
        "### Whole pruned models on the CPU",
        "",
        "Uniform pattern plans at 2× / 3× whole-model MAC reduction; the pruned model runs fused for inference "
        "(BatchNorm folded, shortcut add and ReLU in the pattern conv's epilogue, 2×2 max-pools rewritten). Speedups "
        "against the dense eager model as written, the dense model through the same rewrites (*dense+fold*: BatchNorm "
        "folded, max-pools rewritten), and the dense model under `torch.compile`"
        + (f", {threads} thread(s) on {machine}" if machine else "") + ". ideal = dense MACs ÷ pruned "
        "MACs. Details: [bench/results/models-cpu.md](bench/results/models-cpu.md).",
        "",
        "| model | MAC cut | batch | ideal | speedup | ÷ ideal | vs dense+fold | ÷ ideal | vs compiled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, ideal=None):
        return "—" if v is None else f"{v / (ideal or 1.0):.2f}"

    for r in rows:
        fold = r.get("speedup_vs_bn_folded")
        out.append(f"| {r['model']} | {r['target']:g}× | {r['batch']} | {r['ideal']:.2f} | {r['speedup']:.2f} "
                   f"| {r['speedup'] / r['ideal']:.2f} | {fmt(fold)} | {fmt(fold, r['ideal'])} "
                   f"| {fmt(r.get('speedup_vs_compiled'))} |")
    extra = ([summary] if summary else []) + notes
    if load and load[0] is not None:
        extra.append(f"load average during the run {load[0]:.1f} / {load[1]:.1f} (shared machine)")
    out += [""] + [f"- {n}" for n in extra] + ([""] if extra else [])
    out += ["Reproduce: `python -m bench.bench_models`.", ""]
    return out


def kernel_summaries(results: Path) -> List[str]:
    """Summary lines of the kernel benchmark reports, when they exist."""
    out = []
    for name, title in (("cpu-conv.md", "Pattern conv kernel (CPU)"), ("cpu-attention.md", "Block-sparse attention (CPU)")):
        path = results / name
        if not path.exists():
            continue
        lines = [l.strip() for l in path.read_text().splitlines()]
        keep = [l for l in lines if l.startswith(("- machine:", "- threads:", "Machine:"))]
        if "## Summary" in lines:  # the report's own summary section: its bullet lines
            i = lines.index("## Summary") + 1
            while i < len(lines) and not lines[i].startswith("#"):
                if lines[i].startswith("- "):
                    keep.append(lines[i])
                i += 1
        else:
            keep += [l for l in lines if "median" in l.lower() and not l.startswith("|")]
        keep = keep[:8]
        out.append(f"**{title}** ([bench/results/{name}](bench/results/{name})):")
        out.append("")
        out += [l if l.startswith("- ") else f"- {l}" for l in keep]
        out.append("")
    if out:
        out = ["### Kernels", ""] + out
    return out


def engines_section(data: dict) -> List[str]:
    """Whole models against the best inference engine (``bench/results/engines-cpu.json``): the summary
    per (batch, threads) and, per model, the pruned deployed form's speedup over the best engine."""
    m = data["machine"]
    out = ["### Against the best inference engine (CPU)", "",
           f"`python -m bench.bench_engines` on {m['cpu']} ({m['cores']} cores; load average at start "
           f"{data['loadavg_start'][0]:.1f}); FMA peak " + ", ".join(f"{g:.0f} GFLOP/s at {t} thread(s)"
                                                                for t, g in data["fma_peak"]["gflops"].items())
           + ". best engine = fastest of ONNX Runtime, OpenVINO and inductor (freezing, channels_last) on the "
           "same line; ideal = dense MACs ÷ pruned MACs.", "",
           "| batch | threads | plans | pruned ÷ ideal vs best engine: median | worst | our dense vs best engine: median | worst |",
           "|---|---|---|---|---|---|---|"]
    for r in data["summary"]:
        def f(v):
            return "—" if v is None else f"{v:.2f}"
        out.append(f"| {r['batch']} | {r['threads']} | {r.get('plans', 'patterns')} | {f(r['pruned_of_ideal_median'])} "
                   f"| {f(r['pruned_of_ideal_worst'])} | {f(r['dense_vs_best_median'])} | {f(r['dense_vs_best_worst'])} |")
    pruned = sorted({r["provider"] for r in data["records"] if "cut" in r})  # autosculpt 2×, ... channels 2×
    out += ["", "| model | batch | threads | best engine (ms) | ours dense (ms) | "
            + " | ".join(f"{p.removeprefix('autosculpt ')} (ms, vs best, ÷ ideal)" for p in pruned) + " |",
            "|---|---|---|---|---|" + "---|" * len(pruned)]
    lines = {}
    for r in data["records"]:
        if "failed" in r:
            continue
        lines.setdefault((r["model"], r["batch"], r["threads"]), {})[r["provider"]] = r
    for (model, b, t), rows in lines.items():
        best = next(iter(rows.values())).get("best_engine_ms")
        best_name = next(iter(rows.values())).get("best_engine")

        def cell(p):
            r = rows.get(p)
            if r is None:
                return "—"
            if "cut" not in r:
                return f"{r['median_ms']:.2f}"
            return f"{r['median_ms']:.2f}, {r['speedup_vs_best_engine']:.2f}×, {r['of_ideal']:.2f}"

        out.append(f"| {model} | {b} | {t} | {best:.2f} ({best_name}) | {cell('autosculpt dense')} | "
                   + " | ".join(cell(p) for p in pruned) + " |")
    return out + [""]


def build_section(results: Path) -> str:
    """The Markdown that goes between the markers."""
    parts = ["", "## Results", "",
             "_Generated by `python -m bench.readme_results` from the files in `bench/results/`; do not edit by hand._", ""]
    cmp_path, models_path = results / "compare.json", results / "models-cpu.json"
    body = []
    if cmp_path.exists():
        body += compare_section(json.loads(cmp_path.read_text()))
    if models_path.exists():
        body += models_section(json.loads(models_path.read_text()))
    engines_path = results / "engines-cpu.json"
    if engines_path.exists():
        body += engines_section(json.loads(engines_path.read_text()))
    body += kernel_summaries(results)
    if not body:
        body = ["No results yet: run `python -m bench.compare` and `python -m bench.bench_models`.", ""]
    return "\n".join(parts + body) + "\n"


def update_readme(readme: Path, section: str) -> bool:
    """Replaces the text between the markers with ``section`` (markers appended at the end when
    absent). Returns whether the file changed."""
    text = readme.read_text() if readme.exists() else ""
    if text.count(START) > 1 or text.count(END) > 1:
        raise ValueError(f"{readme}: the results markers appear more than once; keep one {START} ... {END} pair")
    if (START in text) != (END in text):
        raise ValueError(f"{readme}: found only one of {START} / {END}; add the missing marker")
    if START not in text:
        new = text.rstrip("\n") + ("\n\n" if text.strip() else "") + f"{START}\n{END}\n"
    else:
        new = text
    i, j = new.index(START) + len(START), new.index(END)
    if j < i:
        raise ValueError(f"{readme}: {END} comes before {START}")
    new = new[:i] + "\n" + section.strip("\n") + "\n" + new[j:]
    if new != text:
        readme.write_text(new)
        return True
    return False


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args(argv)
    changed = update_readme(args.readme, build_section(args.results))
    print(f"[readme_results] {args.readme}: {'updated' if changed else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
