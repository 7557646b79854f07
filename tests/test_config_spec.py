"""Config once: every run setting's CLI flag, its help text and its default come from the one table in
``autosculpt.config`` (``SETTINGS``), and ``autosculpt.search()``'s Python defaults are the same values."""
import argparse
import inspect

import pytest

import autosculpt as asc
from autosculpt import config
from autosculpt.cli import _cli_values, build_parser


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _actions_by_dest(p: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in p._actions}


@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_every_setting_has_a_flag_with_help_and_default_from_the_spec(command):
    actions = _actions_by_dest(_subparser(command))
    for key, s in config.SETTINGS.items():
        if command not in s.commands:
            assert key not in actions, (command, key)
            continue
        assert key in actions, f"{command}: setting {key!r} has no flag"
        a = actions[key]
        assert config.flag_of(key) in a.option_strings, (key, a.option_strings)
        # the help text is the spec's (or the spec's flag_help), followed by the spec's default
        assert a.help == config.flag_help(key), (key, a.help)
        assert (s.flag_help or s.help) in a.help
        shown = config.default_text(key)
        if shown is not None:
            assert a.help.endswith(f"[{shown}]"), (key, a.help)
        # the flag itself defaults to "not given": the spec's default applies (resolve_config)
        assert a.default is None, (key, a.default)
        if s.choices is not None:
            assert list(a.choices) == list(s.choices), key


def test_prune_takes_every_setting():
    assert all("prune" in s.commands for s in config.SETTINGS.values())


def test_no_flags_resolve_to_the_spec_defaults():
    for command, argv in (("prune", ["prune"]), ("finetune", ["finetune", "model.pt"])):
        args = build_parser().parse_args(argv)
        values = _cli_values(args)
        assert all(v is None for v in values.values()), (command, values)
        cfg = config.resolve_config({}, values)
        assert cfg == {**config.DEFAULTS, "target_speedup": 2.0}  # 2x when no budget is given


def test_flags_parse_as_the_spec_says():
    args = build_parser().parse_args(["prune", "--episodes", "7", "--margin", "0.2", "--latency-batches", "1", "4",
                                      "--backend", "torch", "--no-progress", "--model-arg", "width=4"])
    values = _cli_values(args)
    assert values["episodes"] == 7 and values["margin"] == 0.2 and values["latency_batches"] == [1, 4]
    assert values["backend"] == "torch" and values["progress"] is False and values["model_args"] == {"width": 4}


def test_cli_source_retypes_no_default():
    """cli.py builds the settings' flags from the spec: no help string there is a setting's help plus a
    default typed again."""
    import pathlib
    import re

    import autosculpt.cli as cli

    src = pathlib.Path(cli.__file__).read_text()
    assert "HELP[" not in src
    assert not re.search(r'help=[^)]*\+ " \[', src)
    for key, s in config.SETTINGS.items():
        assert s.help not in src, key


# search() parameter -> config setting with the same meaning (and therefore the same default)
SEARCH_PARAMS = {
    "target_speedup": "target_speedup",
    "target_latency_ms": "target_latency_ms",
    "target_flops_ratio": "target_flops_ratio",
    "episodes": "episodes",
    "seed": "seed",
    "progress": "progress",
    "margin": "margin",
    "latency_batch_size": "search_batch",
}
# Documented exceptions (see search()'s docstring): none today. A search() default that deliberately
# differs from the CLI's would be listed here, as {parameter: reason}.
DOCUMENTED_EXCEPTIONS: dict = {}


def test_search_defaults_equal_the_spec_defaults():
    params = inspect.signature(asc.search).parameters
    for param, key in SEARCH_PARAMS.items():
        if param in DOCUMENTED_EXCEPTIONS:
            assert param in asc.search.__doc__
            continue
        assert params[param].default == config.DEFAULTS[key], (param, params[param].default, config.DEFAULTS[key])
    # every search() parameter that shares a setting's name is covered above
    shared = {p for p, v in params.items() if v.default is not inspect.Parameter.empty} & set(config.SETTINGS)
    assert shared <= set(SEARCH_PARAMS), shared - set(SEARCH_PARAMS)
    # the selection defaults are the search's
    sel = asc.SelectionSettings()
    assert (params["verify_top"].default, params["verify_tolerance"].default, params["margin"].default) == (
        sel.verify_top, sel.tolerance, sel.margin)
    assert sel.margin == config.DEFAULTS["margin"]
