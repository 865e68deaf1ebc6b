"""The ``diffpo-train`` command line: ``sft``, ``rl``, ``distill``, ``eval`` and ``export`` subcommands built from
training.config."""

from __future__ import annotations

import argparse
import logging
import sys

from training.config import DistillConfig, EvalConfig, ExportConfig, RLConfig, SFTConfig, add_arguments, from_args


def say(result) -> None:
    """Print a command's result (the output directory) as one line in one write: the ranks of a multi-process run
    share stdout, often unbuffered, where ``print``'s separate writes of text and newline can interleave."""
    sys.stdout.write(f"{result}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffpo-train", description="Train and evaluate masked diffusion LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("sft", help="masked-diffusion supervised fine-tuning",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter), SFTConfig)
    add_arguments(sub.add_parser("rl", help="RL post-training: d1 or DiFFPO",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter), RLConfig)
    add_arguments(sub.add_parser("distill", help="self-distillation: fine-tune on the model's own full-step "
                                 "answers so that few-pass decoding keeps them",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter), DistillConfig)
    add_arguments(sub.add_parser("eval", help="accuracy and NFE on a task",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter), EvalConfig)
    add_arguments(sub.add_parser("export", help="write a checkpoint's model as a plain model directory (LoRA "
                                 "adapters merged into their base; loads without peft)",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter), ExportConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from diffpo_serve.dllm.loading import ModelLoadError
    from training.checkpoint import CheckpointError
    from training.tasks import DataFileError
    try:
        if args.command == "sft":
            from training.sft import train_sft
            say(train_sft(from_args(SFTConfig, args)))
        elif args.command == "rl":
            from training.rl import train_rl
            say(train_rl(from_args(RLConfig, args)).output_dir)
        elif args.command == "distill":
            from training.distill import train_distill
            say(train_distill(from_args(DistillConfig, args)))
        elif args.command == "eval":
            from training.evaluate import run_eval
            run_eval(from_args(EvalConfig, args))
        elif args.command == "export":
            from training.checkpoint import export_checkpoint
            cfg = from_args(ExportConfig, args)
            if not cfg.checkpoint or not cfg.output:
                raise ValueError("--checkpoint and --output are both required")
            say(export_checkpoint(cfg.checkpoint, cfg.output, cfg.base_model))
    except (ModelLoadError, CheckpointError, DataFileError) as e:
        print(f"diffpo-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"diffpo-train {args.command}: error: {e}", file=sys.stderr)
        return 2
    from training.distributed import exit_status
    return exit_status(0)  # a rank of a multi-process run exits here (training/distributed.py says why)


if __name__ == "__main__":
    sys.exit(main())
