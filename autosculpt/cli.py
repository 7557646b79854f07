"""The ``autosculpt`` command line (also ``python -m autosculpt``).

    autosculpt prune                      # the offline default: digits CNN on scikit-learn digits, 2× faster
    autosculpt prune --model resnet20 --data cifar10:~/data/cifar-10-batches-py --target-speedup 1.5
    autosculpt prune --config run.yaml --episodes 40      # flags override the file
    autosculpt prune --resume runs/NAME                   # continue after Ctrl-C
    autosculpt finetune runs/NAME/model.pt --finetune-epochs 20
    torchrun --nproc_per_node 2 -m autosculpt finetune runs/NAME/model.pt
    torchrun --nproc_per_node 2 -m autosculpt prune ...  # the search's evaluations shared out over 2 processes
    autosculpt bench kernels | autosculpt bench model runs/NAME/model.pt
    autosculpt export runs/NAME/model.pt --out exported/
    autosculpt report runs/NAME
    autosculpt info

Errors in the arguments or inputs end the command with one line on stderr and exit status 2
(set ``AUTOSCULPT_DEBUG=1`` for the traceback); Ctrl-C saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

__all__ = ["main", "build_parser"]

EXAMPLES = """examples:
  autosculpt prune                                   offline default (digits CNN, 2x speedup)
  autosculpt prune --model resnet20 --data cifar10:PATH --target-speedup 1.5 --episodes 60
  autosculpt prune --model mypkg.models:make_net --data imagefolder:PATH --weights dense.pt
  autosculpt prune --config run.yaml --seed 3         flags override the config file
  autosculpt prune --resume runs/NAME                 continue an interrupted run
"""


class UsageError(Exception):
    """Bad command-line usage (reported as one line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _kv(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        import yaml
    except ModuleNotFoundError:  # lean install (no pyyaml): JSON values, else the text itself
        import json

        try:
            return key.strip(), json.loads(value)
        except ValueError:
            return key.strip(), value
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        return key.strip(), value


def _positive_int(text: str) -> int:
    """A positive integer argument of a command that is not a run setting (bench, export)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if not 1 <= v <= 1_000_000:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _batch_int(text: str) -> int:
    """A batch size of bench / export: positive, at most ``config.MAX_BATCH``."""
    from .config import MAX_BATCH

    v = _positive_int(text)
    if v > MAX_BATCH:
        raise argparse.ArgumentTypeError(f"expected a positive integer (at most {MAX_BATCH}), got {text!r}")
    return v


def _setting(key: str, parse=str):
    """The argument converter of run setting ``key``: parses the text with ``parse`` and checks the
    value with :func:`autosculpt.config.check_setting` (the one place run settings are validated)."""

    def convert(text: str):
        from .config import SettingError, check_setting

        try:
            value = parse(text)
        except (TypeError, ValueError):
            value = text  # check_setting says what was expected
        try:
            if key == "latency_batches":  # nargs="+": one element at a time
                return check_setting(key, [value])[0]
            return check_setting(key, value)
        except SettingError as e:
            raise argparse.ArgumentTypeError(e.detail) from None

    convert.__name__ = key
    return convert


def _add_setting(group, key: str) -> None:
    """Adds run setting ``key``'s flag to ``group``, entirely from its entry in
    ``autosculpt.config.SETTINGS``: flag name, help text with the default, parsing and checking. The flag's
    argparse default is None ("not given"): ``resolve_config`` fills in the setting's default."""
    from .config import SETTINGS, flag_help, flag_of

    s = SETTINGS[key]
    kw = {"dest": key, "help": flag_help(key)}
    if s.cli == "off_switch":
        group.add_argument(flag_of(key), action="store_const", const=False, **kw)
        return
    if s.cli == "key_value":
        group.add_argument(flag_of(key), action="append", type=_kv, metavar=s.metavar, **kw)
        return
    if s.choices is not None:
        kw["choices"] = list(s.choices)
    elif s.parse is not None:
        kw["type"] = _setting(key, s.parse)
    if s.metavar is not None:
        kw["metavar"] = s.metavar
    if s.nargs is not None:
        kw["nargs"] = s.nargs
    group.add_argument(flag_of(key), **kw)


def _add_settings(p: argparse.ArgumentParser, command: str, before=None, after=None) -> None:
    """Adds the flags of every run setting that ``command`` takes, in argument groups as the settings
    name them (budgets mutually exclusive). ``before`` / ``after``: ``{group title: fn(group)}`` adding a
    group's other (non-setting) options before / after its settings."""
    from .budget import BUDGET_KEYS
    from .config import FLAG_GROUPS, SETTINGS

    groups = {}
    for title in FLAG_GROUPS:
        keys = [k for k, s in SETTINGS.items() if s.group == title and command in s.commands]
        if not keys:
            continue
        g = p if title is None else p.add_argument_group(title)
        if before and title in before:
            before[title](g)
        target = g.add_mutually_exclusive_group() if set(keys) <= set(BUDGET_KEYS) else g
        for key in keys:
            _add_setting(target, key)
        groups[title] = g
    for title, add in (after or {}).items():
        add(groups[title])


def _add_config_option(g) -> None:
    g.add_argument("--config", metavar="FILE", help="YAML or TOML file of settings (flags override it)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autosculpt`` command."""
    from ._version import __version__

    parser = _Parser(prog="autosculpt", description="Pattern-based pruning with a GNN + PPO search and the kernels "
                     "that make pruned models faster.", formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Run 'autosculpt COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"autosculpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("prune", help="search a pruning plan, fine-tune, save, measure and report",
                       description="Search a pattern-pruning plan under a speed budget, fine-tune it, save the "
                       "model and write a report. With no arguments: the offline default (digits CNN on "
                       "scikit-learn's digits, 2x measured speedup).", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)

    def add_output_options(o) -> None:
        o.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                       help="continue an interrupted run (its folder, or the one named by --name)")
        o.add_argument("--trust-config-factory", action="store_true",
                       help="allow a 'package.module:factory' model spec read from a config file (--config, or the "
                       "run folder's config.yaml on --resume) to be imported and called; built-in model names and "
                       "--model need no consent")

    _add_settings(p, "prune", before={"model and data": _add_config_option}, after={"output": add_output_options})

    f = sub.add_parser("finetune", help="fine-tune a saved pruned model (torchrun for several processes)",
                       description="Fine-tune a model file written by 'autosculpt prune' or autosculpt.save. "
                       "Data, model and seed default to those recorded in the file. Data-parallel with "
                       "'torchrun --nproc_per_node N -m autosculpt finetune FILE' (gloo on CPU, nccl on GPU).")
    f.add_argument("model_file", metavar="MODEL_FILE")
    _add_settings(f, "finetune", before={"model and data": _add_config_option})
    f.add_argument("--out", metavar="FILE", help="output model file [MODEL_FILE stem + '-finetuned.pt']")
    f.add_argument("--checkpoint", metavar="FILE", help="checkpoint file [OUT stem + '-checkpoint.pt']")
    f.add_argument("--resume", action="store_true", help="continue from the checkpoint")

    bp = sub.add_parser("bench", help="time kernels, or a whole model dense vs pruned",
                        description="'bench kernels': pattern conv kernel vs dense conv on a few layer shapes. "
                        "'bench model FILE': a saved pruned model vs its dense equivalent, whole-model latency.")
    bp.add_argument("what", choices=["kernels", "model"])
    bp.add_argument("model_file", nargs="?", metavar="MODEL_FILE", help="for 'bench model'")
    bp.add_argument("--model", help="model spec for files of user models ('package.module:factory')")
    bp.add_argument("--batches", type=_batch_int, nargs="+", default=[1, 8], metavar="B", help="batch sizes [1 8]")
    bp.add_argument("--reps", type=_positive_int, default=30, help="timed repeats [30]")
    bp.add_argument("--threads", type=_positive_int, help="torch threads")
    bp.add_argument("--all-routes", action="store_true",
                    help="'bench model': also race the inductor routes (torch.compile, tens of seconds per model)")
    bp.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")

    e = sub.add_parser("export", help="write torch.export programs and an ONNX file",
                       description="Writes deployed.pt2 (the deployed form: BatchNorm folded, epilogues fused; "
                       "runs AutoSculpt kernels; dynamic batch; autosculpt.load_deployed runs it through the graph executor), pruned.pt2, dense_equivalent.pt2 and "
                       "dense_equivalent.onnx (standard layers, pruned weights as zeros) for other engines; "
                       "with --aoti also deployed_aoti.pt2 (AOTInductor: runs without the model's Python class).")
    e.add_argument("model_file", metavar="MODEL_FILE")
    e.add_argument("--model", help="model spec for files of user models ('package.module:factory')")
    e.add_argument("--out", metavar="DIR", help="output folder [MODEL_FILE stem + '-export']")
    e.add_argument("--batch", type=_batch_int, default=1, help="example batch size [1]")
    e.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX file")
    e.add_argument("--aoti", action="store_true", help="also compile deployed_aoti.pt2 with AOTInductor (minutes)")
    e.add_argument("--input-shape", type=_input_shape, metavar="C,H,W",
                   help="input shape of one sample [the shape recorded in MODEL_FILE]")

    rp = sub.add_parser("report", help="re-render report.md and plots of a run folder")
    rp.add_argument("run_dir", metavar="RUN_DIR")

    sub.add_parser("info", help="version, built and usable kernel backends")
    return parser


def _cli_values(args) -> dict:
    from .config import SETTINGS

    values = {k: getattr(args, k) for k in SETTINGS if hasattr(args, k)}
    if values.get("model_args") is not None:
        values["model_args"] = dict(values["model_args"])
    return values


def _resolve(args, extra_file: Optional[dict] = None) -> dict:
    from .config import load_config_file, resolve_config

    file_values = dict(extra_file or {})
    if getattr(args, "config", None):
        file_values.update(load_config_file(args.config))
    return resolve_config(file_values, _cli_values(args))


def _say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- commands


def _check_factory_consent(cfg: dict, args, files: List[str]) -> None:
    """A 'package.module:factory' model spec that comes from a file (not from --model) is imported
    and called only with --trust-config-factory: a config file must not run code on its own."""
    spec = cfg.get("model")
    if not isinstance(spec, str) or ":" not in spec or getattr(args, "model", None) is not None:
        return
    if getattr(args, "trust_config_factory", False):
        return
    where = " or ".join(repr(f) for f in files) or "a config file"
    raise UsageError(f"model: {spec!r} in {where} names code to import and run; pass --trust-config-factory "
                     f"if you trust that file (or give --model {spec} yourself)")


def _cmd_prune(args) -> int:
    from ._optional import ensure

    ensure("autosculpt prune", "torch_geometric", "scipy", "yaml", "matplotlib")
    from .config import load_config_file, validate_config
    from .pipeline import Interrupted, new_run_dir, run_prune
    from .report import format_table, summary_table

    resume = args.resume is not None and args.resume is not False
    files = [args.config] if getattr(args, "config", None) else []
    if resume:
        if isinstance(args.resume, str):
            run_dir = args.resume
        elif args.name:
            run_dir = os.path.join(args.runs_dir or "runs", args.name)  # --name is checked by its converter
        else:
            raise UsageError("--resume needs the run folder (--resume runs/NAME) or --name")
        saved = os.path.join(run_dir, "config.yaml")
        if not os.path.isfile(saved):
            raise UsageError(f"--resume: {run_dir!r} is not a run folder (no config.yaml)")
        cfg = _resolve(args, extra_file=load_config_file(saved))
        files.insert(0, saved)
    else:
        cfg = _resolve(args)
    # Every setting is checked before the run folder is named, created or written.
    validate_config(cfg)
    _check_factory_consent(cfg, args, files)
    if ":" in cfg["model"]:  # a user factory (consented to): import and check it before the run folder exists
        from .models.pretrained import import_factory

        import_factory(cfg["model"])
    # torchrun: one process group for the whole run; rank 0 names the run folder and alone reports
    from .finetune import broadcast_text, init_distributed, world_info

    init_distributed()
    main = world_info()[0] == 0
    say = _say if main else (lambda msg: None)
    if not resume:
        if main:
            run_dir = new_run_dir(cfg)
            if cfg.get("name") and os.path.exists(os.path.join(run_dir, "config.yaml")):
                raise UsageError(f"run folder {run_dir!r} exists; choose another --name or continue it with --resume")
        run_dir = broadcast_text(run_dir if main else None)
    say(f"autosculpt prune -> {run_dir}")
    try:
        summary = run_prune(cfg, run_dir, resume=resume, log=say)
    except (Interrupted, KeyboardInterrupt) as e:
        raise Interrupted(f"{str(e) or 'interrupted'}; continue with 'autosculpt prune --resume {run_dir}'") from None
    if summary is None:  # another rank than 0 of a torchrun: rank 0 reports
        return 0
    _say("")
    _say(format_table(summary_table(summary), header=("", "dense", "pruned", "dense/pruned")))
    _say(f"latency: {summary.get('latency_timed_as', 'eager models')}")
    _say("")
    t = summary["stage_seconds"]
    final = summary.get("met_budget_final") or {}
    verdict = ("met" if final.get("met") else "NOT met") if final else ""
    if final.get("measured") is not None:
        verdict += f" in the final measurement ({final['what']}: {final['measured']:.3g}, target {final['target']:g})"
    elif final:
        verdict += f" ({final['what']})"
    _say(f"budget: {summary['budget']} at batch {cfg['search_batch']}: {verdict}; "
         f"run time {t['total']:.0f} s (search {t['search']:.0f} s, fine-tune {t['finetune']:.0f} s)")
    if final and not final.get("met"):
        _say("WARNING: the pruned model does NOT meet the budget in the final measurement (see report.md)")
    _say(f"run folder: {summary['run_dir']}")
    _say(f"  report  : {os.path.join(summary['run_dir'], 'report.md')}")
    _say(f"  model   : {summary['pruned']['file']}   ({_load_hint(summary['pruned']['file'])} rebuilds it)")
    return 0


def _load_hint(path: str) -> str:
    """The Python call that rebuilds the model saved at ``path``: a built-in model needs nothing more,
    a user model (``--model pkg.mod:factory``) needs its dense model, built as the run built it."""
    from .io import read
    from .models import MODEL_NAMES

    try:
        meta = read(path).meta
    except (OSError, ValueError):
        meta = {}
    spec = meta.get("model")
    if not isinstance(spec, str) or spec in MODEL_NAMES or ":" not in spec:
        return "autosculpt.load(path)"
    module, _, attr = spec.partition(":")
    kwargs = meta.get("model_args") or {}
    if all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        call_args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    else:
        call_args = f"**{kwargs!r}"
    return f"import {module}; autosculpt.load(path, {module}.{attr}({call_args}))"


def _cmd_finetune(args) -> int:
    from .config import load_config_file
    from .finetune import is_main_process
    from .pipeline import run_finetune

    file_values = load_config_file(args.config) if args.config else {}
    cfg = _resolve(args)
    # The data set recorded in the model file is used unless the flag or the config file names one.
    data_given = args.data or file_values.get("data")
    res = run_finetune(args.model_file, cfg, data_spec=data_given, out=args.out, checkpoint=args.checkpoint,
                       resume=args.resume, model_spec=args.model,
                       image_size_given=args.image_size or file_values.get("image_size"),
                       log=_say if os.environ.get("RANK", "0") == "0" else (lambda msg: None))
    if res is not None and is_main_process():
        _say(f"fine-tuned on {res['data']} with {res['world_size']} process(es): best val acc {res['best_val_acc']:.4f} "
             f"(epoch {res['best_epoch']}), test acc {res['test_acc']:.4f}")
        _say(f"saved: {res['out']}")
    return 0


def _load_for_cli(path: str, spec: Optional[str]):
    from .io import load, read
    from .models.pretrained import resolve_model

    saved = read(path)
    shape = saved.meta.get("input_shape")
    if spec:
        if not shape:
            raise ValueError(f"{path!r} does not record its input shape; it was not written by 'autosculpt prune'")
        factory, _ = resolve_model(spec, saved.meta.get("num_classes", 10), tuple(shape), saved.meta.get("model_args"))
        model = load(path, factory)
    else:
        model = load(path)
    if not shape:
        raise ValueError(f"{path!r} does not record its input shape (meta 'input_shape'); save it with meta={{'input_shape': [C, H, W]}}")
    return model.eval(), tuple(shape)


def _input_shape(text: str) -> tuple:
    """``C,H,W`` (or any comma-separated positive sizes of one sample) as a tuple of ints."""
    try:
        dims = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 3,32,32, got {text!r}") from None
    if not dims or min(dims) < 1 or max(dims) > 65536:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes in 1..65536 like 3,32,32, got {text!r}")
    return dims


def _cmd_bench(args) -> int:
    import torch

    from .timing import set_threads

    if args.threads:
        set_threads(args.threads)
    if args.what == "kernels":
        if args.model_file:
            raise UsageError("'bench kernels' takes no model file")
        from .benchmark import bench_kernels

        _say(bench_kernels(reps=args.reps, progress=args.progress))
        return 0
    if not args.model_file:
        raise UsageError("'bench model' needs a MODEL_FILE")
    from .deploy import QUICK_ROUTES, ROUTES
    from .export import dense_equivalent
    from .measure import count_flops, measure_latency_stats
    from .report import format_table

    model, shape = _load_for_cli(args.model_file, args.model)
    model.eval()
    dense = dense_equivalent(model).eval()
    rows = []
    x1 = torch.randn(1, *shape)
    rows.append(["FLOPs (MACs / sample)", f"{count_flops(dense, x1):,}", f"{count_flops(model, x1):,}", ""])
    routes = ROUTES if args.all_routes else QUICK_ROUTES
    for b in args.batches:
        x = torch.randn(b, *shape)
        t = measure_latency_stats({"dense": dense, "pruned": model}, x, reps=args.reps, progress=args.progress,
                                  desc=f"batch {b}", routes=routes)
        rows.append([f"latency, batch {b}"]
                    + [f"{t[k].median_ms:.3f} ms (IQR {t[k].iqr_ms:.3f}, {t[k].route})" for k in ("dense", "pruned")]
                    + [f"{t['dense'].median_ms / t['pruned'].median_ms:.2f}x (load {t['pruned'].load_average:.1f})"])
    _say(f"{args.model_file}: dense-equivalent vs pruned, {torch.get_num_threads()} threads, median (IQR) of "
         f"{args.reps} interleaved repeats; each model in its fastest deployed form (autosculpt.optimize_for_inference "
         f"over {', '.join(routes)})")
    _say(format_table(rows, header=("", "dense", "pruned", "speedup")))
    return 0


def _cmd_export(args) -> int:
    import torch

    from .export import export_model

    model, shape = _load_for_cli(args.model_file, args.model)
    shape = args.input_shape or shape
    out = args.out or os.path.splitext(args.model_file)[0] + "-export"
    try:
        paths = export_model(model, torch.randn(args.batch, *shape), out, onnx=args.onnx, aoti=args.aoti)
    except RuntimeError as e:
        if "ONNX export needs" in str(e):
            raise ValueError(str(e)) from None
        raise
    for kind, p in paths.items():
        _say(f"{kind:22s} {p}")
    for note in getattr(paths, "notes", ()):
        _say(note)
    if getattr(paths, "executor_ok", False):
        shape_txt = ", ".join(str(d) for d in (args.batch, *shape))
        _say(f"run deployed.pt2 at graph-executor speed (no model class needed): import autosculpt, torch; "
             f"m = autosculpt.load_deployed({paths['deployed_pt2']!r}, torch.randn({shape_txt})); y = m(x)")
    return 0


def _cmd_report(args) -> int:
    from .report import render_report

    _say(f"report: {render_report(args.run_dir)}")
    return 0


def _cmd_info(args) -> int:
    from .info import report

    _say(report())
    return 0


def _terminate_like_ctrl_c():
    """SIGTERM (a scheduler's or torchrun's stop) saves a checkpoint like Ctrl-C does. Returns the
    previous handler (restored when ``main`` returns), or None where handlers cannot be set."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # not allowed here (embedded interpreters)
        return None


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``autosculpt`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("AUTOSCULPT_DEBUG", "") not in ("", "0")
    previous_sigterm = _terminate_like_ctrl_c()
    try:
        return _run(argv, debug)
    finally:
        if previous_sigterm is not None:
            import signal

            signal.signal(signal.SIGTERM, previous_sigterm)


def _run(argv: List[str], debug: bool) -> int:
    from .pipeline import Interrupted

    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        handler = {"prune": _cmd_prune, "finetune": _cmd_finetune, "bench": _cmd_bench, "export": _cmd_export,
                   "report": _cmd_report, "info": _cmd_info}[args.command]
        return handler(args)
    except UsageError as e:
        print(f"autosculpt: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # an optional package is missing: name the extra, no traceback
        from ._optional import from_error

        msg = from_error(e, f"autosculpt {argv[0]}" if argv else "autosculpt")
        if msg is None or debug:
            raise
        print(f"autosculpt: error: {msg}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        msg = str(e) or "interrupted"
        hint = ""
        if "--resume" in msg:
            pass
        elif argv and argv[0] == "prune":
            hint = "; continue with 'autosculpt prune --resume RUN_DIR'"
        elif argv and argv[0] == "finetune":
            hint = "; continue with the same command plus --resume"
        print(f"\nautosculpt: {msg}{hint}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError, OSError) as e:
        if debug:
            raise
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        text = " ".join(text.split())  # one line
        print(f"autosculpt: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
