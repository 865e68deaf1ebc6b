"""Typed configuration of every ``diffpo-train`` command, with help text; argparse is built from it.

Field names are the CLI flags (``gen_length`` -> ``--gen-length``); nothing parses argv at import. A field made
with ``option(..., advanced=True)`` is a research knob: ``--help`` lists it in its own group after the common
options (:func:`add_arguments`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import get_type_hints

from diffpo_serve.dllm.sampler import SAMPLERS
from diffpo_serve.dllm.step_policy import FEATURE_SETS
from diffpo_serve.dllm.threshold_head import FEATURES
from training.commit_policy import WARM_START_LABELS
from training.likelihood import IS_NUMERATORS, TAU_OVER
from training.tasks import REWARD_KINDS, get_task


def option(default, help: str, advanced: bool = False, **kw):
    """A config field with its ``--help`` text; ``advanced``: listed under :data:`ADVANCED` (research knobs a
    user rarely sets), after the common options; ``kw``: more argparse keywords (``choices``)."""
    return field(default=default, metadata={"help": help, "advanced": advanced, **kw})


ADVANCED = "advanced / research options"  # the help's second group; the first is argparse's own "options"


def check_choices(cfg) -> None:
    """A ValueError naming the flag where a field with ``choices`` holds another value (a config built in code,
    where argparse did not check it; None passes where it is the field's default), or where ``tasks`` / ``task``
    names a task that does not exist (before any model loads or data is generated)."""
    for f in dataclasses.fields(cfg):
        value, choices = getattr(cfg, f.name), f.metadata.get("choices")
        flag = f"--{f.name.replace('_', '-')}"
        if choices is not None and value not in choices and not (value is None and f.default is None):
            raise ValueError(f"{flag} {value!r}: expected one of {', '.join(map(str, choices))}")
        if f.name == "lam":
            lam_by_task(value, getattr(cfg, "tasks", ""))
        if f.name in ("tasks", "task") and isinstance(value, str):
            for name in value.split(","):
                try:
                    get_task(name)
                except ValueError as e:
                    raise ValueError(f"{flag} {value!r}: {e}") from None


def lam_by_task(lam: str | float, tasks: str) -> dict[str, float]:
    """``--lam`` per task of ``tasks`` (comma-separated): a number applies to every task; ``TASK=VALUE`` pairs set
    single tasks, a bare number among them the rest (default 0.5). A ValueError names the flag and the problem
    (not a number, negative, or a task that is not trained)."""
    names = [t for t in str(tasks).split(",") if t]
    default, per_task = 0.5, {}
    for item in [x.strip() for x in str(lam).split(",") if x.strip()] or ["0.5"]:
        task, _, text = (part.strip() for part in item.rpartition("="))
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--lam {lam!r}: {text!r} is not a number") from None
        if not value >= 0:
            raise ValueError(f"--lam {lam!r}: lambda must be >= 0; got {value}")
        if not task:
            default = value
        elif task not in names:
            raise ValueError(f"--lam {lam!r}: {task!r} is not one of the trained tasks ({', '.join(names)})")
        else:
            per_task[task] = value
    return {t: per_task.get(t, default) for t in names}


class Checked:
    """Base of every command's config: :func:`check_choices` runs when one is built (from flags or in code)."""

    def __post_init__(self):
        check_choices(self)


CACHE_LOSS_MODES = ["off", "prefix", "dual", "both"]
CACHE_LOSS_HELP = ("also train for the sampler's KV cache: a second loss on block k as a cached decode computes it "
                   "mid-block, with the prompt's and earlier blocks' keys/values from the block's first step "
                   "(prefix: the later blocks are recomputed; dual: they are cached too; both: alternate by step); "
                   "makes a small model's cached decode lose less (training/sft.py cached_view_loss)")
DATA_HELP = ("training examples from a data file instead of generated ones: FILE with one task, else TASK=FILE pairs, "
             "comma-separated (a task without one keeps its generator; gsm8k and math500 have none); JSONL, CSV "
             "or Parquet by extension, with the task's fields (gsm8k: question, answer ending '#### 72'; math500: "
             "problem, answer or the last \\boxed{} of solution; countdown/cd3: d1's input/output or nums/target; "
             "sudoku: Puzzle,Solution); its first --train-examples rows")
EVAL_DATA_HELP = ("held-out examples of --eval-every, given as --data (its first --eval-examples rows); a task "
                  "without one is evaluated on its generated test split, so gsm8k and math500 need it (nothing "
                  "is held out of --data)")


@dataclass
class SFTConfig(Checked):
    """Masked-diffusion supervised fine-tuning (LLaDA, arXiv 2502.09992, sec. 2.3)."""

    output_dir: str = option("runs/sft", "directory for the trained model and its checkpoints")
    model: str | None = option(None, "model directory to fine-tune; default: a new tiny model from --hidden-size etc.")
    tasks: str = option("sudoku,cd3", "comma-separated tasks mixed in equal parts")
    train_examples: int = option(50_000, "examples generated per task for the training pool")
    data: str | None = option(None, DATA_HELP)
    eval_data: str | None = option(None, EVAL_DATA_HELP)
    chat_template: bool = option(True, "a --model whose tokenizer has a chat template reads each task's "
                                       "instruction in it and learns d1's <reasoning>...</reasoning> <answer>..."
                                       "</answer> completion (the file's worked solution, then its answer); "
                                       "--no-chat-template: the raw prompt and the bare answer")
    gen_length: int = option(16, "completion length in tokens (answer + EOS padding)")
    max_steps: int = option(6000, "optimiser steps")
    batch_size: int = option(128, "sequences per step (per process)")
    lr: float = option(2e-3, "peak learning rate (AdamW)")
    warmup_steps: int = option(200, "linear warm-up steps", advanced=True)
    min_lr_ratio: float = option(0.1, "cosine decay ends at lr * min_lr_ratio", advanced=True)
    weight_decay: float = option(0.0, "AdamW weight decay", advanced=True)
    max_grad_norm: float = option(1.0, "gradient clipping norm", advanced=True)
    loss_weighting: str = option("inv_t", "inv_t: LLaDA's sum of masked CE / t over all completion tokens; "
                                 "masked_mean: mean CE over masked positions", choices=["inv_t", "masked_mean"],
                                 advanced=True)
    seed: int = option(0, "seed for data order, masking and initialisation")
    save_every: int = option(500, "steps between checkpoints (OUTPUT_DIR/checkpoint, for --resume); the model "
                             "itself is written to OUTPUT_DIR at the end")
    log_every: int = option(50, "steps between metric lines")
    eval_every: int = option(0, "steps between greedy full-step evaluations on each task's test split, logged "
                             "to metrics.jsonl (0: off)")
    eval_examples: int = option(256, "test prompts per task for --eval-every")
    resume: bool = option(False, "continue from OUTPUT_DIR/checkpoint")
    cache_loss: str = option("off", CACHE_LOSS_HELP, choices=CACHE_LOSS_MODES, advanced=True)
    cache_loss_weight: float = option(1.0, "--cache-loss: the cached-view loss is added to the SFT loss times this",
                                      advanced=True)
    cache_block_length: int = option(4, "--cache-loss: the block length of the cached decode trained for",
                                     advanced=True)
    targets: str = option("tokens", "what the losses score: tokens: cross-entropy on the completions' tokens; "
                          "model: KL from a frozen copy of --model's own uncached predictions at the same masked "
                          "positions (with --cache-loss: trains the cached decode to match the uncached one without "
                          "moving the latter)", choices=["tokens", "model"], advanced=True)
    hidden_size: int = option(128, "new model: width")
    num_hidden_layers: int = option(4, "new model: layers")
    num_attention_heads: int = option(4, "new model: attention heads")
    intermediate_size: int = option(352, "new model: SwiGLU hidden width")


@dataclass
class RLConfig(Checked):
    """RL post-training with verifiable rewards: d1's diffu-GRPO or DiFFPO (arXiv 2510.02212).

    Defaults are d1's published LLaDA settings scaled to the tiny model: G = 8 (theirs 6),
    mu = 4 (theirs 8-12), eps = 0.5, beta = 0.04, p_mask = 0.15; lr 3e-5 was stable on the tiny model.
    """

    algo: str = option("diffpo", "likelihood surrogate: d1 (one-pass mean-field) or diffpo "
                       "(two-stage with truncated importance weights)", choices=["d1", "diffpo"])
    train: str = option("model", "what to train: model (the dLLM), sampler (only the learned sampler, model "
                        "frozen) or joint (both, from the same rollouts)", choices=["model", "sampler", "joint"])
    model: str | None = option(None, "model directory to post-train; default: the bundled model")
    output_dir: str = option("runs/rl", "directory for the trained model, checkpoints and metrics.jsonl")
    tasks: str = option("cd3", "comma-separated tasks; each step draws its prompts from their train splits")
    data: str | None = option(None, DATA_HELP)
    eval_data: str | None = option(None, EVAL_DATA_HELP)
    train_examples: int = option(20_000, "training prompts generated per task")
    reward: str = option("correctness", "the rollouts' reward: correctness (the task's, as d1's evaluator judges "
                         "answers; sudoku's is the fraction of blanks right), exact (1 only for a fully right "
                         "answer) or d1 (d1's training reward: on gsm8k correctness x2 plus its integer, strict and "
                         "soft format and XML-count terms, on math500 correctness x2 plus its format term; the other "
                         "tasks' correctness); accuracy is logged from correctness either way",
                         choices=list(REWARD_KINDS))
    max_steps: int = option(300, "RL steps (each: rollouts, then mu optimiser steps)")
    num_generations: int = option(8, "G: completions per prompt (one group)")
    prompts_per_step: int = option(16, "prompts per step (per process)")
    num_iterations: int = option(4, "mu: inner optimisation steps on each batch of rollouts")
    lr: float = option(3e-5, "learning rate (AdamW)")
    epsilon: float = option(0.5, "eps: ratio clip range [1 - eps, 1 + eps]")
    beta: float = option(0.04, "beta: weight of the k3 KL to the frozen reference model (0: no reference)")
    p_mask: float = option(0.15, "p_mask: probability of masking each prompt token in the likelihood passes")
    C: float = option(2.0, "C: cap of the truncated importance weight (diffpo)")
    temperature: float = option(1.0, "rollout sampling temperature (0: greedy tokens; rows still draw their gamma "
                                "from the head, so with --train sampler a group compares gammas on one prompt "
                                "without sampling noise)")
    top_p: float = option(1.0, "rollout nucleus: tokens are drawn from the top-p nucleus (the importance "
                          "weight divides by that distribution)")
    sampler: str = option("steps", "rollout sampler (sampler/joint training always use learned or policy; policy "
                          "with --train model: the model's own step policy, frozen, its commits drawn)",
                          choices=list(SAMPLERS))
    threshold: float | None = option(None, "rollout sampler threshold (confidence / eb)")
    sampler_kind: str = option("head", "the learned sampler of --train sampler/joint: head (the per-prompt "
                               "threshold head, sampler `learned`) or policy (the per-step commit policy, sampler "
                               "`policy`)", choices=["head", "policy"])
    lam: str | float = option(0.5, "lambda: NFE penalty of the sampler reward r = reward * (1 - lambda * NFE / "
                              "NFE_max); one number for every task, or per task TASK=VALUE pairs, comma-separated "
                              "(a bare number among them: the tasks not named; else 0.5), e.g. cd3=2,sudoku=0.25")
    head_lr: float = option(3e-3, "learning rate of the threshold head or step policy (AdamW)")
    gen_length: int | None = option(None, "tokens per completion (default: the task's; 256 through a chat template)")
    block_length: int | None = option(None, "rollout block length (default: gen_length; 32 through a chat template)")
    steps: int | None = option(None, "rollout forward passes for the steps sampler (default: gen_length; half of it "
                               "through a chat template, as d1's rollouts)")
    chat_template: bool = option(True, "a model whose tokenizer has a chat template reads each task's instruction in "
                                       "it, as in eval; --no-chat-template sends the raw prompts")
    cache: str = option("off", "rollout KV cache (native models): off, prefix or dual; the behaviour log-probs are "
                        "then those of the cached sampler, the distribution actually sampled from",
                        choices=["off", "prefix", "dual"])
    seed: int = option(0, "seed for prompts, rollouts, masks and tau")
    save_every: int = option(50, "steps between checkpoints (OUTPUT_DIR/checkpoint: what --resume needs; with "
                             "--lora-r the adapters and trainer state only, never the base weights); the model "
                             "itself (LoRA merged) is written to OUTPUT_DIR once, at the end; `diffpo-train export` "
                             "writes it for any checkpoint")
    log_every: int = option(1, "steps between metric lines")
    eval_every: int = option(0, "steps between evaluations on the test split (0: off): greedy; a canvas model "
                             "with fixed seeds")
    eval_examples: int = option(256, "test prompts per task for --eval-every")
    lora_r: int = option(0, "LoRA rank (0: train all weights; needs peft)")
    lora_alpha: int = option(16, "LoRA alpha")
    gradient_checkpointing: bool = option(False, "recompute each transformer layer's activations in the backward "
                                                 "pass instead of keeping them (less memory, about one more forward)")
    dtype: str | None = option(None, "dtype of the trained model's weights (default: the checkpoint's); with LoRA "
                                     "the adapters and their AdamW state stay float32, and the loss is float32 "
                                     "in any case", choices=["float32", "bfloat16", "float16"])
    resume: bool = option(False, "continue from OUTPUT_DIR/checkpoint (and an unfinished step-policy warm "
                          "start from OUTPUT_DIR/warm_start)")
    device: str | None = option(None, "torch device (default: accelerate's choice)")
    is_numerator: str = option("masked", "diffpo: the prompt the importance weight's numerator pi_old sees: "
                               "masked (d1's prompt with p_mask masking, the clipped ratio's surrogate) or unmasked "
                               "(the whole prompt: one more no-grad forward pass per inner step while p_mask > 0); "
                               "d1 has no weight", choices=list(IS_NUMERATORS), advanced=True)
    tau_over: str = option("all", "diffpo: the passes tau is drawn among: all (every pass 1..K of the rollout) or "
                           "answer (only the passes that commit at least one scored token, so z_tau holds part of the "
                           "answer, not only its EOS tail); d1 draws no tau", choices=list(TAU_OVER), advanced=True)
    scale_std: bool = option(False, "divide advantages by the group std", advanced=True)
    weight_decay: float = option(0.0, "AdamW weight decay", advanced=True)
    max_grad_norm: float = option(1.0, "gradient clipping norm", advanced=True)
    model_reward: str = option("task", "reward of the dLLM's loss: task (correctness only) or sampler (the NFE-"
                               "penalised sampler reward, so correct-and-fast rollouts count most; joint training)",
                               choices=["task", "sampler"], advanced=True)
    entropy_coef: float = option(0.01, "entropy bonus of the threshold head's REINFORCE loss", advanced=True)
    head_features: str = option("prompt", "a new threshold head's input: prompt (mean prompt hidden state), "
                                "prompt+answer (also the mean over the all-mask answer region) or prompt+answer+eb "
                                "(also the fraction of the answer EB would commit in the first pass at each gamma)",
                                choices=list(FEATURES), advanced=True)
    policy_features: str = option("basic", "a new step policy's input: basic (12 per-token features of the pass) "
                                  "or basic+hidden (also the token's final hidden state)", choices=list(FEATURE_SETS),
                                  advanced=True)
    warm_start_prompts: int = option(4000, "a new step policy: training prompts (per task) of its supervised warm "
                                     "start (labels: --warm-start-label; 0: no warm start)", advanced=True)
    warm_start_gamma: float = option(0.1, "EB gamma of the behaviour decodes the warm start's features come from",
                                     advanced=True)
    warm_start_label: str = option("trajectory", "the warm start's label of a masked token: full_steps (its argmax "
                                   "equals the full-step greedy answer's token), trajectory (it equals the token "
                                   "the behaviour decode itself ends with there: final in that trajectory) or "
                                   "continuation (it equals the token a full-step decode puts there when it "
                                   "completes the answer as it stood before that pass)",
                                   choices=list(WARM_START_LABELS), advanced=True)
    warm_start_epochs: int = option(5, "epochs of the warm start's binary cross-entropy fit", advanced=True)
    warm_start_rounds: int = option(1, "rounds of the warm start: each round after the first decodes the same "
                                    "prompts with the policy so far (greedy, at its operating point), adds those "
                                    "states with their labels to the data and refits a new policy on all of it "
                                    "(DAgger, Ross et al. 2011: it learns on the states it visits itself)",
                                    advanced=True)
    warm_start_point: float | None = option(0.9, "after the warm start, fold this threshold into the policy "
                                            "(p >= point becomes p >= 0.5, its new operating point), so RL rollouts "
                                            "sample around that rule (0: keep 0.5)", advanced=True)


@dataclass
class DistillConfig(Checked):
    """Self-distillation: fine-tune a model on its own full-step answers so few-pass decoding keeps them.

    Defaults: a constant learning rate of 1e-4 (about 1/20 of SFT's peak), the masked-mean loss, 1,500
    steps of 128 sequences; on the bundled pipeline this moved the countdown accuracy-vs-NFE front
    about 1.8 passes to the left (gamma 0.215: 5.66 -> 3.85 passes) without losing full-step accuracy
    (docs/benchmarks.md).
    """

    output_dir: str = option("runs/distill", "directory for the distilled model, its data and checkpoints")
    model: str | None = option(None, "model directory to distill (teacher and student); default: the bundled model")
    tasks: str = option("sudoku,cd3", "comma-separated tasks whose training prompts the teacher answers")
    train_examples: int = option(20_000, "training prompts decoded by the teacher per task")
    data: str | None = option(None, DATA_HELP.replace("training examples", "the teacher's prompts"))
    eval_data: str | None = option(None, EVAL_DATA_HELP)
    eval_every: int = option(0, "steps between greedy full-step evaluations of the student on each task's test "
                             "split, logged to metrics.jsonl (0: off)")
    eval_examples: int = option(256, "test prompts per task for --eval-every")
    min_reward: float = option(1.0, "keep a teacher answer only if its reward is at least this (1.0: correct "
                               "answers only; 0: every answer)")
    teacher_steps: int | None = option(None, "teacher forward passes per answer (default: gen_length, one token "
                                       "per pass)")
    teacher_batch_size: int = option(256, "prompts the teacher decodes together")
    gen_length: int | None = option(None, "completion length in tokens (default: the task's)")
    max_steps: int = option(1500, "optimiser steps")
    batch_size: int = option(128, "sequences per step (per process)")
    lr: float = option(1e-4, "learning rate (AdamW, constant after warm-up)")
    warmup_steps: int = option(0, "linear warm-up steps", advanced=True)
    weight_decay: float = option(0.0, "AdamW weight decay", advanced=True)
    max_grad_norm: float = option(1.0, "gradient clipping norm", advanced=True)
    loss_weighting: str = option("masked_mean", "as for sft", choices=["inv_t", "masked_mean"], advanced=True)
    seed: int = option(0, "seed of the training prompts, data order and masking")
    save_every: int = option(250, "steps between checkpoints (OUTPUT_DIR/checkpoint, for --resume); the model "
                             "itself is written to OUTPUT_DIR at the end")
    log_every: int = option(50, "steps between metric lines")
    resume: bool = option(False, "continue from OUTPUT_DIR/checkpoint (the teacher's answers are read back "
                          "from OUTPUT_DIR/distill_data.jsonl, not decoded again)")
    cache_loss: str = option("off", CACHE_LOSS_HELP, choices=CACHE_LOSS_MODES, advanced=True)
    cache_loss_weight: float = option(1.0, "as for sft", advanced=True)
    cache_block_length: int = option(4, "as for sft", advanced=True)
    targets: str = option("tokens", "as for sft (model: KL from the teacher's own uncached predictions, with the "
                          "teacher's answers as contexts)", choices=["tokens", "model"], advanced=True)
    device: str = option("cpu", "torch device of the teacher's decoding")


@dataclass
class EvalConfig(Checked):
    """Accuracy and NFE of a model on a task's test split or data file."""

    task: str = option("cd3", "task name (sudoku, cd3, countdown, gsm8k, math500; sudoku_easy and sudoku_hard: "
                                      "sudoku with 4-8 and 9-12 blanks)")
    data: str | None = option(None, "data file of --task, JSONL, CSV or Parquet by extension, with the task's "
                                    "fields (as for rl --data); default: the generated test split")
    model: str | None = option(None, "model directory; default: the bundled model")
    sampler: str | None = option(None, "unmasking strategy (learned: the model's threshold head picks gamma; policy: "
                                 "the model's step policy commits each pass); default: steps, and for a canvas "
                                 "model (DiffusionGemma) learned if it has a threshold head, else eb",
                                 choices=list(SAMPLERS))
    threshold: float | None = option(None, "confidence threshold, EB gamma or the policy's minimum commit "
                                     "probability (default per sampler); a canvas model: its entropy bound "
                                     "(default: its checkpoint's)")
    gen_length: int | None = option(None, "tokens to generate (default: the task's; 256 through a chat template)")
    block_length: int | None = option(None, "semi-autoregressive block length (default: gen_length; 32 through a "
                                            "chat template; a canvas model's is fixed: its canvas_length)")
    steps: int | None = option(None, "`steps` sampler: forward passes (default: gen_length; half of it through a "
                                     "chat template, d1's evaluation setting); a canvas model: the "
                                     "most denoising steps per block (default: its checkpoint's)")
    cache: str = option("off", "KV cache (native models): off, prefix (the prompt's and finished blocks' keys/"
                        "values reused within a block) or dual (also the masked suffix's)",
                        choices=["off", "prefix", "dual"])
    temperature: float = option(0.0, "sampling temperature (0: greedy); a canvas model samples with its own "
                                      "schedule (--t-min/--t-max) and refuses any other than 0")
    t_min: float | None = option(None, "canvas models only: the temperature schedule's floor (default: the "
                                       "checkpoint's)")
    t_max: float | None = option(None, "canvas models only: the temperature at a block's first denoising step")
    stability_threshold: int | None = option(None, "canvas models only: steps the draft must stay unchanged before "
                                                   "a block may stop early")
    confidence_threshold: float | None = option(None, "canvas models only: mean entropy below which a stable block "
                                                      "stops early (0: never early)")
    chat_template: bool = option(True, "a model whose tokenizer has a chat template reads each task's instruction "
                                       "(d1's reasoning/answer format) in that template; --no-chat-template sends "
                                       "the raw prompts")
    batch_size: int = option(64, "prompts decoded together")
    limit: int | None = option(None, "evaluate only the first N examples")
    num_examples: int = option(1000, "size of the generated test split when --data is not given")
    seed: int = option(0, "seed of the generated test split and of sampling")
    mask_id: int | None = option(None, "override the model's mask token id", advanced=True)
    pad_id: int | None = option(None, "override the model's padding token id", advanced=True)
    eos_id: str | None = option(None, "override the model's end-of-sequence ids (comma-separated; the first fills "
                                      "a finished row; default: every eos_token_id of its generation config, "
                                      "config and tokenizer)", advanced=True)
    trust_remote_code: bool = option(False, "allow model directories that ship their own code (LLaDA, Dream)")
    device: str = option("cpu", "torch device")
    dtype: str | None = option(None, "decode in this dtype (default: the checkpoint's; on the AVX-512 CPU measured, "
                                     "bfloat16 decoded countdown at 1.5-1.8x float32's tokens/s, sudoku 1.0-1.2x)",
                                     choices=["float32", "bfloat16", "float16"])
    compile: bool = option(False, "compile the model's transformer layers with torch.compile first (faster "
                                  "decoding after a warm-up; on a CPU it needs a C++ compiler)")
    output: str | None = option(None, "also write per-example results as JSONL here")


@dataclass
class ExportConfig(Checked):
    """The plain model of a training checkpoint: LoRA adapters merged into their base, loadable without peft."""

    checkpoint: str | None = option(None, "checkpoint directory (a run's OUTPUT_DIR/checkpoint); required")
    output: str | None = option(None, "directory to write the model to (created; model files in it are "
                                      "replaced); required")
    base_model: str | None = option(None, "LoRA checkpoints: the base model directory (default: the one the "
                                          "checkpoint's lora_base.json names, where the run loaded it from)")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--flag`` per dataclass field, typed and with the field's help text: the common fields in the parser's
    own options group, the ``advanced`` ones in a group of their own, :data:`ADVANCED`, listed after it; the usage
    line names no flags."""
    hints = get_type_hints(cls)
    parser.usage = "%(prog)s [-h] [options]"  # fifty flags spelled out in the usage line would bury the groups
    advanced = None
    for f in dataclasses.fields(cls):
        target = parser
        if f.metadata.get("advanced"):
            advanced = advanced or parser.add_argument_group(
                ADVANCED, "the estimator's open choices, optimiser details and the learned samplers' warm-start and "
                          "feature knobs; the defaults are the project's tested settings")
            target = advanced
        flag = "--" + f.name.replace("_", "-")
        kw = {"help": f.metadata.get("help", ""), "default": f.default}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        typ = hints[f.name]
        if typ is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            base = [t for t in getattr(typ, "__args__", (typ,)) if t is not type(None)][0]
            kw["type"] = base
        target.add_argument(flag, **kw)


def from_args(cls, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
