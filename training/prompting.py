"""How a task example becomes the tokens a model reads: raw prompt, or d1's prompt in a chat template.

The project's own models were trained on the tasks' terse prompts (``sudoku 3020...``,
``countdown 69,59,53=181``) and read them as they are. An instruction-tuned model, recognised by a
chat template on its tokenizer (LLaDA-8B-Instruct, Dream-v0-Instruct-7B), reads instead d1's prompt for
the task, word for word (:mod:`training.tasks.d1_prompts`, from d1's repository, Apache-2.0): the task's
``instruction(example, stage)`` as one user turn, rendered by the model's own chat template with the
assistant's turn opened, then whatever d1 appends after the template. As in d1 the ``stage`` decides which:

- ``train`` (RL rollouts, SFT's prompts): d1's training prompt (``diffu-grpo/data_utils.py``), nothing after
  the template;
- ``eval`` (``diffpo-train eval`` and RL's ``--eval-every``): d1's evaluation prompt (``eval/*.py``), with
  ``<reasoning>`` prefilled after the template, as d1's published accuracies were measured.

Both ask for the reasoning inside ``<reasoning>...</reasoning>`` and the answer inside ``<answer>...</answer>``
(gsm8k's and countdown's eval prompts as ``\\boxed{...}`` there), which every task's reward parses. An example
without a task (no ``task`` name) is sent as its raw ``prompt`` inside the template. ``chat_template=False``
(CLI ``--no-chat-template``) sends the raw prompt to any model.

Instruction-tuned models reason before answering, so their default generation is d1's evaluation
setting: 256 tokens in blocks of 32, with the ``steps`` sampler in 128 passes (half the length; Zhao et al. 2025,
arXiv 2504.12216).
"""

from __future__ import annotations

from diffpo_serve.dllm.loading import LoadedModel
from training.tasks import d1_prompts, get_task

CHAT_GEN_LENGTH = 256
CHAT_BLOCK_LENGTH = 32


def generation_lengths(chat: bool, task_gen_length: int, gen_length: int | None = None,
                       block_length: int | None = None) -> tuple[int, int | None]:
    """``(gen_length, block_length)`` to decode with: the given ones, else d1's 256 in blocks of 32 through a
    chat template, else the task's length in one block (``None``). Eval and RL rollouts both use this."""
    gen = gen_length or (CHAT_GEN_LENGTH if chat else task_gen_length)
    return gen, block_length or (min(CHAT_BLOCK_LENGTH, gen) if chat else None)


def default_steps(chat: bool, gen_length: int, steps: int | None = None) -> int | None:
    """The ``steps`` sampler's passes: the given ones, else d1's setting through a chat template (half the answer
    length: 128 passes for 256 tokens, as d1's evaluation and its RL rollouts decode), else None (one per token).
    Eval and RL rollouts both use this."""
    return steps or (max(1, gen_length // 2) if chat else None)


def uses_chat_template(loaded: LoadedModel, chat_template: bool = True) -> bool:
    """Whether prompts go through the model's chat template: asked for, and the tokenizer has one."""
    return bool(chat_template and getattr(loaded.tokenizer, "chat_template", None))


def prompt_text(loaded: LoadedModel, task_name: str | None, example: dict, chat_template: bool = True,
                stage: str = "eval") -> str:
    """The text the model reads for ``example`` (a row of a task's dataset, with its ``prompt``): the raw
    prompt, or through the chat template d1's ``stage`` prompt (``train`` for RL rollouts, ``eval``)."""
    d1_prompts.check_stage(stage)
    if not uses_chat_template(loaded, chat_template):
        return example["prompt"]
    if task_name is None:
        content, after = example["prompt"], ""
    else:
        content, after = get_task(task_name).instruction(example, stage), d1_prompts.after_template(stage)
    return loaded.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True) + after


def prompt_ids(loaded: LoadedModel, task_name: str | None, example: dict, chat_template: bool = True,
               stage: str = "eval") -> list[int]:
    """Token ids of :func:`prompt_text` (a rendered template already holds its special tokens)."""
    return loaded.encode(prompt_text(loaded, task_name, example, chat_template, stage))
