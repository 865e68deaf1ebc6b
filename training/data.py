"""The trainers' examples and their tokens: each task's examples (generated, or read from ``--data`` /
``--eval-data`` files), the SFT pool, and the left-padded batches.

``--data`` and ``--eval-data`` (sft, distill, rl) name a data file per task (:func:`data_files`): a single
FILE when there is one task, else ``TASK=FILE`` pairs, comma-separated; a task without a file keeps its
generator (gsm8k and math500 have none, so they need one). A file gives its first ``--train-examples``
(``--eval-examples``) rows; its format and fields are the task's ``load_file``'s (training/tasks).

A training sequence is ``[left padding | prompt | completion]`` where the completion is the answer's
tokens followed by EOS up to ``gen_length`` (LLaDA trains on the EOS padding too, which is how the
model learns where to stop). A model that reads chat prompts (training/prompting.py) learns d1's format,
``<reasoning>...</reasoning>\n<answer>...</answer>`` (:func:`chat_target`): the file's worked solution
(GSM8K's text before ``####``, MATH's ``solution``; empty for the generated puzzles), then the final answer.
"""

from __future__ import annotations

import logging

import datasets
import torch
from datasets import concatenate_datasets

from training.tasks import TASKS, get_task
from training.tasks.common import NoGeneratorError

log = logging.getLogger(__name__)


def data_files(value: str | None, tasks: list[str], flag: str = "--data") -> dict[str, str]:
    """Task -> data file of a ``--data`` / ``--eval-data`` value: ``FILE`` (only with one task) or
    ``TASK=FILE`` pairs, comma-separated; tasks left out are absent. A bad value is a ValueError naming
    ``flag``."""
    if not value:
        return {}
    items = [item.strip() for item in value.split(",") if item.strip()]
    files: dict[str, str] = {}
    for item in items:
        name, is_pair, path = (part.strip() for part in item.partition("="))
        if not (is_pair and name in TASKS):  # a bare FILE (whose name may hold '=')
            if len(tasks) == 1 and len(items) == 1:
                return {tasks[0]: item}
            raise ValueError(f"{flag} {value!r}: with several --tasks ({','.join(tasks)}) name each file's task, "
                             f"e.g. {flag} {tasks[0]}=FILE (a task without a file keeps its generator)")
        if name not in tasks:
            raise ValueError(f"{flag}: {name} is not one of --tasks {','.join(tasks)}")
        if name in files or not path:
            raise ValueError(f"{flag}: {name} " + ("is given twice" if path else "has no file after '='"))
        files[name] = path
    return files


def task_examples(name: str, split: str, n: int, seed: int, path: str | None = None) -> datasets.Dataset:
    """A task's examples: the first ``n`` rows of its data file ``path``, else ``n`` generated ones of
    ``split`` (a task with no generator raises :class:`NoGeneratorError`)."""
    task = get_task(name)
    if path is None:
        return task.make_dataset(split, n, seed)
    data = task.load_file(path)
    return data.select(range(min(n, len(data))))


def example_pool(tasks: list[str], n_per_task: int, seed: int, data: str | None = None) -> list[dict]:
    """The training examples of each task (``data``: the ``--data`` value), each with its ``task``."""
    files = data_files(data, tasks)
    return [{**ex, "task": name} for name in tasks
            for ex in task_examples(name, "train", n_per_task, seed, files.get(name))]


def eval_sets(tasks: list[str], n: int, eval_data: str | None = None) -> dict[str, datasets.Dataset]:
    """Task -> the held-out examples of ``--eval-every``: the first ``n`` rows of its ``--eval-data`` file,
    else ``n`` of its generated test split (seed 0); a task with neither is a ValueError."""
    files, sets = data_files(eval_data, tasks, "--eval-data"), {}
    for name in tasks:
        try:
            sets[name] = task_examples(name, "test", n, 0, files.get(name))
        except NoGeneratorError:
            raise ValueError(f"--eval-every: {name} has no generated test split; give its held-out examples "
                             f"with --eval-data FILE (or {name}=FILE among several tasks)") from None
    return sets


def chat_target(example: dict) -> str:
    """The completion a chat model learns for ``example``: d1's ``<reasoning>`` then ``<answer>`` format."""
    return f"<reasoning>{example.get('reasoning') or ''}</reasoning>\n<answer>{example['answer']}</answer>"


def sft_examples(tasks: list[str], n_per_task: int, seed: int, data: str | None = None) -> dict:
    """Task -> its SFT training examples (see :func:`task_examples`); a file row without a reference answer
    (d1's countdown files hold only numbers and target) is a ValueError: there is nothing to learn."""
    files, parts = data_files(data, tasks), {}
    for name in tasks:
        parts[name] = task_examples(name, "train", n_per_task, seed, files.get(name))
        empty = [i for i, a in enumerate(parts[name]["answer"]) if not str(a).strip()]
        if empty:
            raise ValueError(f"{files.get(name, name)}: {len(empty)} of {len(parts[name])} examples have no "
                             f"reference answer to learn (the first: example {empty[0] + 1}); sft needs one "
                             "(train on such a file with rl)")
    return parts


def sft_pool(tasks: list[str], n_per_task: int, seed: int, data: str | None = None, prompt_text=None,
             examples: dict | None = None):
    """A shuffled dataset of ``prompt`` and ``answer`` texts mixing ``n_per_task`` training examples of each
    task (``examples``: :func:`sft_examples`' result, read here when None). ``prompt_text(task, example)``:
    the chat prompt of a model that reads one (training/prompting.py); the answer is then
    :func:`chat_target`. Without it, the raw prompt and the bare answer."""
    parts = []
    for name, part in (examples or sft_examples(tasks, n_per_task, seed, data)).items():
        if prompt_text is not None:
            part = datasets.Dataset.from_dict({"prompt": [prompt_text(name, ex) for ex in part],
                                               "answer": [chat_target(ex) for ex in part]})
        parts.append(part.select_columns(["prompt", "answer"]))
    return concatenate_datasets(parts).shuffle(seed=seed)


def encode_examples(encode, prompts: list[str], answers: list[str], gen_length: int, eos_id: int):
    """Token lists of prompts and EOS-padded completions; answers longer than gen_length are cut."""
    prompt_ids, completion_ids = [], []
    cut = 0
    for p, a in zip(prompts, answers):
        full = encode(a)
        cut += len(full) > gen_length
        c = full[:gen_length]
        prompt_ids.append(encode(p))
        completion_ids.append(c + [eos_id] * (gen_length - len(c)))
    if cut:
        log.warning("%d answers longer than gen_length=%d were truncated", cut, gen_length)
    return prompt_ids, completion_ids


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, P) ids and bool attention mask, prompts aligned to the right edge."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.as_tensor(p)
            attn[i, width - len(p):] = True
    return ids, attn
