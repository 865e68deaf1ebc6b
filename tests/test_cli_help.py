"""``diffpo-train SUBCOMMAND --help`` reads common options first, then the research knobs in their own group, as
training/config.py's field metadata (``option(..., advanced=True)``) says; every config field is one flag, in
exactly one group."""

import contextlib
import dataclasses
import io
import re

import pytest

from training.cli import build_parser
from training.config import ADVANCED, DistillConfig, EvalConfig, ExportConfig, RLConfig, SFTConfig

COMMANDS = {"sft": SFTConfig, "rl": RLConfig, "distill": DistillConfig, "eval": EvalConfig, "export": ExportConfig}


def help_text(command: str) -> str:
    """What ``diffpo-train COMMAND --help`` prints (it exits with 0)."""
    with pytest.raises(SystemExit) as exit_:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    return out.getvalue()


def help_sections(command: str) -> tuple[str, dict[str, list[str]]]:
    """The usage line of ``diffpo-train COMMAND --help`` and, in order, each section title with the flags it lists."""
    text = help_text(command)
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):
            current = line[:-1]
            sections[current] = []
        elif current is not None:
            m = re.match(r"^  (-[-\w]+)", line)
            if m:
                sections[current].append(m.group(1))
    return text.splitlines()[0], sections


def flag(field) -> str:
    return "--" + field.name.replace("_", "-")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_common_options_then_the_advanced_group_and_every_field_once(command):
    cls = COMMANDS[command]
    usage, sections = help_sections(command)
    assert usage == f"usage: diffpo-train {command} [-h] [options]"
    advanced = [flag(f) for f in dataclasses.fields(cls) if f.metadata.get("advanced")]
    common = [flag(f) for f in dataclasses.fields(cls) if not f.metadata.get("advanced")]
    assert list(sections) == (["options", ADVANCED] if advanced else ["options"])
    assert sections["options"] == ["-h", *common]  # in field order, the help flag first
    assert sections.get(ADVANCED, []) == advanced
    listed = [f for flags in sections.values() for f in flags]
    assert sorted(listed) == sorted(["-h", *(flag(f) for f in dataclasses.fields(cls))])  # each exactly once
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


def test_rl_help_keeps_the_research_knobs_apart():
    """The research knobs ``diffpo-train rl --help`` sets apart, by name: the estimator's open choices, optimiser
    details and the learned samplers' warm-start and feature knobs; what a run needs (model, task, algorithm,
    p_mask, C, lr, G) is common and comes first, the algorithm before the model."""
    _, sections = help_sections("rl")
    assert sections[ADVANCED] == [
        "--is-numerator", "--tau-over", "--scale-std", "--weight-decay", "--max-grad-norm", "--model-reward",
        "--entropy-coef", "--head-features", "--policy-features", "--warm-start-prompts", "--warm-start-gamma",
        "--warm-start-label", "--warm-start-epochs", "--warm-start-rounds", "--warm-start-point"]
    assert sections["options"][:5] == ["-h", "--algo", "--train", "--model", "--output-dir"]
    for common in ("--tasks", "--p-mask", "--C", "--lr", "--num-generations", "--beta", "--max-steps"):
        assert common in sections["options"]


def test_advanced_options_still_parse():
    """Grouping changes the help only: an advanced flag parses into the config as before."""
    args = build_parser().parse_args(["rl", "--tau-over", "answer", "--warm-start-rounds", "3", "--no-scale-std"])
    assert (args.tau_over, args.warm_start_rounds, args.scale_std) == ("answer", 3, False)
    args = build_parser().parse_args(["sft", "--cache-loss", "dual"])
    assert args.cache_loss == "dual"


def help_entries(command: str) -> dict[str, str]:
    """Each flag of ``diffpo-train COMMAND --help`` with its help text (wrapped lines joined, spaces collapsed)."""
    entries: dict[str, str] = {}
    current = None
    for line in help_text(command).splitlines():
        m = re.match(r"^  (--[-\w]+)(?:, --[-\w]+)?(?: \S+)?(.*)$", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2)
        elif current is not None and line.startswith("   "):
            entries[current] += " " + line
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_flag_s_help_is_its_own_text_with_its_default(command):
    """``--help`` gives every flag the help text of its own config field and ``(default: ...)`` with the field's
    default."""
    entries = help_entries(command)
    for f in dataclasses.fields(COMMANDS[command]):
        entry = entries[flag(f)]
        assert "".join(f.metadata["help"].split()) in "".join(entry.split()), flag(f)  # argparse wraps at hyphens
        assert entry.endswith(f"(default: {f.default})"), (flag(f), entry[-60:])


def test_data_help_says_what_each_command_reads_from_the_file():
    """sft and rl read training examples from --data; distill reads the prompts its teacher answers."""
    assert help_entries("sft")["--data"].startswith("training examples from a data file instead of generated ones")
    assert help_entries("rl")["--data"].startswith("training examples from a data file")
    assert help_entries("distill")["--data"].startswith("the teacher's prompts from a data file instead of generated")
