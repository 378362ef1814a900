"""One CLI dialect: an option means one thing, with one default and one set of choices, in every command that
takes it; registries give the choices; deprecated spellings still parse, with a note; sweep lists fail in one line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from expertflow.cache.policies import POLICIES, POLICY_ALIASES, POLICY_NAMES, policy_class
from expertflow.cache.policies.plec import PLECPolicy
from expertflow.cache.policies.resident import AllResidentPolicy
from expertflow.cache.stores import STORES
from expertflow.cli import build_parser, main
from expertflow.cli.options import comma_list, count_or_share, engine_config, page_cache, positive_int, size_or_share
from expertflow.config import DTYPES, STORE_NAMES
from expertflow.errors import ExpertflowError
from expertflow.scheduler import SCHEDULERS, SERVE_SCHEDULERS

# Options whose meaning truly differs between commands, so their defaults (or choices) may too.
MAY_DIFFER = {
    # generate: one run's batch; bench / simulate / schedule-eval: each its own sweep of batch sizes;
    # train-predictor: the training minibatch; trace and eval-predictor: their config's batch.
    "--batch-size",
    # generate / serve: one run's slots (default: every expert resident); bench and simulate: the points of a sweep,
    # fewer in bench (each point a live run of every system) than in simulate (a replay).
    "--cache-experts",
    # generate and bench: the unit one run schedules; schedule-eval: a sweep of units.
    "--schedule-unit",
    # generate runs any scheduler; serve only those that run live (no exact); bench the expertflow system's (its
    # fifo run is the expertflow-no-ts system).
    "--scheduler",
    # bench-quick is the quick look: half bench's prompts.
    "--prompts",
    # bench and bench-quick time prompts (alpaca); perplexity scores held-out raw text (xsum's documents).
    "--dataset",
}
# Hidden spellings: each still parses and prints its note (see the deprecation tests below).
DEPRECATED = {"--disk-direct"}
SWEEP_COMMANDS = ("bench", "simulate", "schedule-eval")


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def _options() -> dict[str, list[tuple[str, argparse.Action]]]:
    """Every long option -> (command, its declaration) wherever it appears."""
    found: dict[str, list[tuple[str, argparse.Action]]] = defaultdict(list)
    for command, parser in _commands().items():
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    found[option].append((command, action))
    return found


def _choices(action: argparse.Action) -> tuple | None:
    return None if action.choices is None else tuple(action.choices)


@pytest.mark.parametrize("option", sorted(_options()))
def test_an_option_has_one_default_and_one_set_of_choices_in_every_command(option: str) -> None:
    uses = _options()[option]
    assert len({action.dest for _, action in uses}) == 1, f"{option} lands in different attributes"
    if option in MAY_DIFFER:
        return
    choices = {_choices(action) for _, action in uses}
    assert len(choices) == 1, f"{option} offers different choices: {[(c, _choices(a)) for c, a in uses]}"
    defaults = {repr(action.default) for _, action in uses if not action.required}  # a required one has none
    assert len(defaults) <= 1, f"{option} defaults differ: {[(c, a.default) for c, a in uses]}"


def test_the_allow_list_names_only_options_that_do_differ() -> None:
    options = _options()
    for option in MAY_DIFFER:
        uses = options[option]
        assert len({(repr(a.default), _choices(a)) for _, a in uses}) > 1, f"{option} no longer differs"


def test_threads_is_one_declaration_with_one_default() -> None:
    uses = _options()["--threads"]
    assert {c for c, _ in uses} >= {"generate", "serve", "bench", "bench-quick", "simulate", "schedule-eval",
                                    "train-predictor", "eval-predictor", "trace", "perplexity"}
    assert {a.default for _, a in uses} == {"auto"}
    assert len({a.type for _, a in uses}) == 1  # declared by one function, add_threads_option
    assert all("default auto" in a.help for _, a in uses)


def test_threads_auto_is_torchs_own_choice_and_bad_counts_are_one_line(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    assert parser.parse_args(["bench-quick"]).threads == torch.get_num_threads()
    assert parser.parse_args(["bench-quick", "--threads", "auto"]).threads == torch.get_num_threads()
    assert parser.parse_args(["bench-quick", "--threads", "1"]).threads == 1
    assert parser.parse_args(["simulate", "--traces", "t", "--threads", "3"]).threads == 3
    for value, needle in (("0", "--threads must be >= 1, got 0"), ("many", "--threads takes a number >= 1 or auto")):
        assert main(["bench-quick", "--threads", value]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"expertflow: error: {needle}")


def test_choices_come_from_the_registries() -> None:
    commands = _commands()

    def choices(command: str, option: str) -> tuple | None:
        return next(_choices(a) for a in commands[command]._actions if option in a.option_strings)

    assert STORE_NAMES == tuple(STORES)
    for command in ("generate", "serve", "bench"):
        assert choices(command, "--store") == STORE_NAMES
        assert choices(command, "--dtype") == ("auto", *DTYPES)
    for command in ("generate", "serve"):
        assert choices(command, "--policy") == POLICY_NAMES
    assert choices("generate", "--scheduler") == tuple(SCHEDULERS)
    assert choices("serve", "--scheduler") == SERVE_SCHEDULERS


def test_serve_lists_its_schedulers_without_importing_the_server() -> None:
    code = ("import sys; from expertflow.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'expertflow.server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"], ["bench"]])
def test_the_deprecated_spellings_parse_print_a_note_and_stay_out_of_help(command: list[str],
                                                                         capsys: pytest.CaptureFixture) -> None:
    parser = build_parser()
    help_text = _commands()[command[0]].format_help()
    assert all(old not in help_text for old in DEPRECATED)
    args = parser.parse_args([*command, "--disk-direct"])
    assert page_cache(args) is False  # what --disk-direct asked for is the default now
    err = capsys.readouterr().err.strip()
    assert err.startswith("expertflow: note: --disk-direct ") and "will be removed" in err and "\n" not in err
    assert page_cache(parser.parse_args(command)) is False and capsys.readouterr().err == ""


def test_every_hidden_option_is_a_known_deprecation() -> None:
    hidden = {option for option, uses in _options().items() for _, a in uses if a.help == argparse.SUPPRESS}
    assert hidden == DEPRECATED


# Sweeps: one parser for comma lists, one-line errors.

def test_the_sweep_parser_reads_ints_counts_shares_and_sizes() -> None:
    assert comma_list("--batch-size", positive_int)("1, 4,16") == (1, 4, 16)
    assert comma_list("--cache-experts", count_or_share)("26,10%,12.5%") == ("26", "10%", "12.5%")
    assert comma_list("--memory-budget", size_or_share)("200MiB,25%") == ("200MiB", "25%")
    assert comma_list("--systems")("lru, expertflow") == ("lru", "expertflow")
    args = build_parser().parse_args(["bench"])  # string defaults are read by the same parser
    assert (args.batch_size, args.cache_experts, args.memory_budget) == ((1, 4, 16), ("10%", "25%"), None)
    args = build_parser().parse_args(["schedule-eval", "--traces", "t"])
    assert (args.batch_size, args.schedule_unit) == ((4, 8, 16), (2, 4))


def test_every_sweep_command_reads_its_lists_with_the_shared_parser() -> None:
    sweeps = {"--batch-size", "--cache-experts", "--memory-budget", "--schedule-unit"}
    for option, uses in _options().items():
        for command, action in uses:
            single = command == "bench" and option == "--schedule-unit"  # one unit per bench run
            if command in SWEEP_COMMANDS and option in sweeps and not single:
                assert action.type.__qualname__ == comma_list.__qualname__ + ".<locals>.parse", (command, option)


@pytest.mark.parametrize("argv, needle", [
    (["bench", "--batch-size", "1,x"], "--batch-size takes positive whole numbers, comma-separated like 1,4,16; "
                                       "got 'x'"),
    (["bench", "--cache-experts", "150%"], "--cache-experts '150%': a percentage must be in (0, 100]"),
    (["bench", "--cache-experts", "ten"], "--cache-experts takes slot counts or shares of every expert"),
    (["bench", "--memory-budget", "lots"], "--memory-budget takes sizes or shares of the all-in-memory footprint"),
    (["bench", "--systems", ","], "--systems is empty"),
    (["simulate", "--traces", "t", "--batch-size", "0"], "--batch-size takes positive whole numbers"),
    (["simulate", "--traces", "t", "--cache-experts", "0%"], "a percentage must be in (0, 100]"),
    (["schedule-eval", "--traces", "t", "--schedule-unit", "2,-1"], "--schedule-unit takes positive whole numbers"),
    (["schedule-eval", "--traces", "t", "--batch-size", ""], "--batch-size is empty"),
])
def test_sweep_list_errors_are_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("expertflow: error: ") and needle in lines[0], captured.err
    assert captured.out == ""


def test_a_sweep_error_is_an_expertflow_error_for_callers_of_the_parser() -> None:
    with pytest.raises(ExpertflowError, match="--batch-size takes positive whole numbers"):
        build_parser().parse_args(["simulate", "--traces", "t", "--batch-size", "1,,two"])


# Policy names: canonical names that say what they are, the old ones as aliases for good.

def test_policy_aliases_resolve_to_the_same_class() -> None:
    assert POLICY_ALIASES == {"none": "all-resident", "expertflow": "plec"}
    assert policy_class("expertflow") is policy_class("plec") is PLECPolicy
    assert policy_class("none") is policy_class("all-resident") is AllResidentPolicy
    assert set(POLICIES) >= {"all-resident", "plec"} and not set(POLICY_ALIASES) & set(POLICIES)
    with pytest.raises(ExpertflowError, match="unknown policy 'nope'; choose one of all-resident, .*expertflow = plec"):
        policy_class("nope")


def test_policy_help_lists_canonical_names_and_aliases() -> None:
    text = " ".join(_commands()["generate"].format_help().split())
    assert "all-resident, lru, lfu, ring, pregated, plec, belady" in text
    assert "none = all-resident" in text and "expertflow = plec" in text


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_every_policy_name_parses_as_given_without_a_note(name: str, capsys: pytest.CaptureFixture) -> None:
    args = build_parser().parse_args(["generate", "--prompt", "x", "--policy", name, "--cache-experts", "64"])
    assert args.policy == name
    assert engine_config(args).policy == name  # what generate --json reports: the name the user gave
    assert capsys.readouterr().err == ""


def test_without_a_policy_the_config_reports_none_as_it_always_has() -> None:
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert engine_config(args).policy == "none"


@pytest.mark.parametrize("name", ["expertflow", "plec"])
def test_generate_json_reports_the_policy_name_given(name: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "2", "--cache-experts", "26",
                 "--policy", name, "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["policy"] == name
    assert "note" not in captured.err


def test_simulate_takes_either_name_for_plec_and_refuses_all_resident(tmp_path, capsys: pytest.CaptureFixture) -> None:
    for name in ("none", "all-resident"):
        assert main(["simulate", "--traces", str(tmp_path / "t"), "--policies", f"lru,{name}"]) == 2
        err = capsys.readouterr().err.strip()
        assert f"unknown policy '{name}' for simulate" in err and "\n" not in err
