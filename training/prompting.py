"""How a task example becomes the tokens a model reads: raw prompt, or instruction in a chat template.

The project's own models were trained on the tasks' terse prompts (``sudoku 3020...``,
``countdown 69,59,53=181``) and read them as they are. An instruction-tuned model, recognised by a
chat template on its tokenizer (LLaDA-8B-Instruct, Dream-v0-Instruct-7B), reads instead the task's
*instruction*: the same problem in words, in d1's answer format (reason inside
``<reasoning>...</reasoning>``, then the final answer inside ``<answer>...</answer>``, which is what
every task's reward parses), sent as one user turn rendered by the model's own chat template with
the assistant's turn opened. ``chat_template=False`` (CLI ``--no-chat-template``) sends the raw
prompt to any model.

Instruction-tuned models reason before answering, so their default generation is d1's evaluation
setting: 256 tokens in blocks of 32 (Zhao et al. 2025, arXiv 2504.12216).
"""

from __future__ import annotations

from diffpo_serve.dllm.loading import LoadedModel
from training.tasks import get_task

CHAT_GEN_LENGTH = 256
CHAT_BLOCK_LENGTH = 32


def generation_lengths(chat: bool, task_gen_length: int, gen_length: int | None = None,
                       block_length: int | None = None) -> tuple[int, int | None]:
    """``(gen_length, block_length)`` to decode with: the given ones, else d1's 256 in blocks of 32 through a
    chat template, else the task's length in one block (``None``). Eval and RL rollouts both use this."""
    gen = gen_length or (CHAT_GEN_LENGTH if chat else task_gen_length)
    return gen, block_length or (min(CHAT_BLOCK_LENGTH, gen) if chat else None)


def uses_chat_template(loaded: LoadedModel, chat_template: bool = True) -> bool:
    """Whether prompts go through the model's chat template: asked for, and the tokenizer has one."""
    return bool(chat_template and getattr(loaded.tokenizer, "chat_template", None))


def prompt_text(loaded: LoadedModel, task_name: str | None, example: dict, chat_template: bool = True) -> str:
    """The text the model reads for ``example`` (a row of a task's dataset, with its ``prompt``)."""
    if not uses_chat_template(loaded, chat_template):
        return example["prompt"]
    task = get_task(task_name) if task_name else None
    content = task.instruction(example) if task is not None and hasattr(task, "instruction") else example["prompt"]
    return loaded.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                add_generation_prompt=True)


def prompt_ids(loaded: LoadedModel, task_name: str | None, example: dict, chat_template: bool = True) -> list[int]:
    """Token ids of :func:`prompt_text` (a rendered template already holds its special tokens)."""
    return loaded.encode(prompt_text(loaded, task_name, example, chat_template))
