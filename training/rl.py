"""``diffpo-train rl``: RL post-training of a masked dLLM, d1 (diffu-GRPO) or DiFFPO, in one trainer.

Each step: draw prompts, sample G completions per prompt with the shared sampler (recording commit
steps and behaviour log-probs), score them with the task reward, centre the rewards per group, then
take mu optimiser steps on the clipped objective of :mod:`training.loss`.

``--train`` picks what learns (DiFFPO's "fast" half): ``model`` the dLLM as above; ``sampler`` only
the threshold head (model frozen), by group-relative REINFORCE on r = reward * (1 - lambda NFE/NFE_max)
over the G rollouts of a prompt, each of which drew its own gamma, or, with ``--sampler-kind policy``,
the per-step commit policy by the same REINFORCE on the Bernoulli commit decisions of every pass
(:mod:`training.commit_policy`; a new policy first gets a supervised warm start, from the starting model);
``joint`` the model and the head or the policy from the same rollouts, all decoded before either update: the
model's loss reads each rollout's commit steps and behaviour log-probs, which come from its own gamma (head)
or its own Bernoulli commits (policy), the learned sampler takes exactly the step ``--train sampler`` would
take on that batch, and with ``--model-reward sampler`` the model gets the same NFE-penalised reward, so
among correct rollouts it is pushed toward those that decoded in fewer passes. ``--train model --sampler
policy`` rolls out with the model's own step policy, frozen, its commits drawn. The two algorithms differ
only in the likelihood surrogate (:mod:`training.likelihood`) and the importance weight:

  d1      one-pass mean-field log-probs, w = 1;
  diffpo  two-stage log-probs at a tau drawn from the rollout's own steps, w = min(C, pi_old/q), q the
          distribution the sampler drew each token from (temperature, top-p; :mod:`training.loss` says
          what the weight corrects). Two open choices are options: ``--tau-over all|answer`` (tau among every
          pass, or among the passes that commit scored tokens) and ``--is-numerator masked|unmasked`` (pi_old
          under the p_mask-masked prompt, as the ratio's, or under the whole prompt: one more no-grad pass
          per inner step when a prompt token is masked).

Both score each completion's tokens up to and including its first EOS, as d1 does (not the EOS tail a dLLM
commits; :func:`training.likelihood.scored`), and average over the batch's scored tokens. The learned
samplers' REINFORCE losses (head, step policy) are per rollout and take no token mask.

A fresh prompt mask (and tau) is drawn for each inner step and shared by the current, old and
reference models. Every random draw is seeded by (seed, step, process), so ``--resume`` after a kill
replays exactly the steps after the last checkpoint. Runs under accelerate (DDP on CPU via gloo with
``accelerate launch --multi_gpu --num_processes 2``, which falls back to gloo on a machine without
GPUs); optional LoRA adapters via peft.

Real architectures (native LLaDA and Dream checkpoints, :mod:`diffpo_serve.dllm.families`): ``--lora-r``
adapts the projections the family names in ``LORA_TARGET_MODULES``, and the KL reference is then the
same model with its adapters switched off (:class:`AdaptersOff`: no second copy of the weights), its checkpoints
hold the adapters and trainer state only and the merged model is written once, at the end (``diffpo-train export``
merges any checkpoint: :mod:`training.checkpoint`);
``--gradient-checkpointing`` recomputes layer activations in the backward pass; ``--dtype bfloat16``
holds the weights in bf16 while the LoRA adapters, their AdamW state and the loss (log-softmax over
float32 logits) stay float32. A model with a chat template reads d1's prompts in it (its training prompt in
rollouts, its eval prompt in ``--eval-every``: :mod:`training.prompting`) and decodes eval's lengths (``prompting.generation_lengths``) unless ``--gen-length`` / ``--block-length``
say otherwise. Memory arithmetic for an 8B model: docs/real_models.md.

A canvas model (DiffusionGemma) trains its threshold head only (``--train sampler``); model RL is refused
because DiFFPO's likelihoods assume a mask state (:mod:`training.canvas_rl` has the reasons and the flags).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffpo_serve.dllm.decoding import Knobs, decoder_for
from diffpo_serve.dllm.families import family_module
from diffpo_serve.dllm.loading import LoadedModel, load_model
from diffpo_serve.dllm.sampler import SamplingParams
from diffpo_serve.dllm.step_policy import StepPolicy, load_policy
from diffpo_serve.dllm.threshold_head import ThresholdHead, load_head
from training import canvas_rl
from training.commit_policy import policy_rl_loss
from training.checkpoint import (CheckpointError, export_model, load_trainer_state, recover_interrupted,
                                 save_checkpoint, start_metrics)
from training.distributed import finish_run
from training.config import RLConfig, lam_by_task
from training.data import eval_sets as eval_sets_of, example_pool
from training.evaluate import evaluate_tasks
from training.likelihood import (answer_passes, draw_tau, mean_field_logprobs, prompt_mask, scored,
                                 two_stage_logprobs)
from training.prompting import default_steps, generation_lengths, uses_chat_template
from training.loss import (group_advantages, policy_loss, sampler_reward, threshold_head_loss,
                           truncated_is_weight)
from training.rollout import rollout
from training.tasks import get_task, reward_function
from training.warm_start import WARM_START_DIR, WarmStartStore, run_warm_start

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint"


def surrogate_logprobs(model, batch, masked_prompt, tau, mask_id):
    """d1's one-pass estimate when ``tau`` is None, else DiFFPO's two-stage estimate."""
    if tau is None:
        return mean_field_logprobs(model, batch.prompt_ids, batch.prompt_attention, batch.completion, masked_prompt,
                                   mask_id)
    return two_stage_logprobs(model, batch.prompt_ids, batch.prompt_attention, batch.completion, batch.commit_step,
                              tau, masked_prompt, mask_id)


# ----------------------------------------------------------------------------- real architectures

def lora_targets(model):
    """peft ``target_modules`` for ``model``: its native family's ``LORA_TARGET_MODULES``, else "all-linear"."""
    family = family_module(getattr(getattr(model, "config", None), "model_type", None))
    return getattr(family, "LORA_TARGET_MODULES", None) or "all-linear"


def _wrap_lora(model, cfg: RLConfig):
    from peft import LoraConfig, get_peft_model
    # autocast_adapter_dtype: adapters on a bf16/fp16 base are created in float32 (so is their AdamW state)
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=lora_targets(model))
    torch.manual_seed(cfg.seed)  # A's random init: two fresh runs (in one process too) start from the same adapters
    return get_peft_model(model, config, autocast_adapter_dtype=True)


class AdaptersOff(torch.nn.Module):
    """A LoRA (peft) model seen with its adapters switched off: the frozen base weights, used as the KL
    reference instead of a deep copy of the model (which would double the weights' memory)."""

    def __init__(self, peft_model):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: .eval() etc. leave it alone

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=False):
        with self.peft_model.disable_adapter():
            return self.peft_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   output_hidden_states=output_hidden_states)


def enable_gradient_checkpointing(model, path) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant, so frozen inputs are fine)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{path}: {type(model).__name__} does not support gradient checkpointing; "
                         "drop --gradient-checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def rollout_lengths(cfg: RLConfig, loaded: LoadedModel) -> tuple[int, int | None]:
    """Rollout ``(gen_length, block_length)``: eval's defaults (256 in blocks of 32 through a chat template,
    else the longest task's length in one block) unless the config sets them."""
    task_length = max(get_task(t).GEN_LENGTH for t in cfg.tasks.split(","))
    return generation_lengths(uses_chat_template(loaded, cfg.chat_template), task_length, cfg.gen_length,
                              cfg.block_length)


def rollout_params(cfg: RLConfig, loaded: LoadedModel, sampler: str, threshold: float | None, gen_length: int,
                   block_length: int | None):
    """The rollouts' resolved params in the model's paradigm and NFE_max, the most model passes a row can take
    (the sampler reward's normaliser: a masked model's ``gen_length``, one token per pass; a canvas model's
    decoder passes of every step of every block). ``block_length`` applies where the caller picks the blocks,
    ``--temperature`` / ``--top-p`` where the paradigm samples with them (a canvas model has its own schedule;
    :func:`training.canvas_rl.check` refuses them)."""
    decoder = decoder_for(loaded)
    tempered = {"temperature": cfg.temperature, "top_p": cfg.top_p} if decoder.tempered else {}
    chat_steps = sampler == "steps" and uses_chat_template(loaded, cfg.chat_template)
    steps = cfg.steps if cfg.steps is not None else default_steps(chat_steps, gen_length)
    knobs = Knobs(sampler=sampler, threshold=threshold, steps=steps, cache=cfg.cache, **tempered,
                  block_length=block_length if decoder.block_length is None else None)
    params = decoder.resolve(decoder.params_for(knobs, gen_length))
    return params, decoder.max_nfe(params)

# -----------------------------------------------------------------------------


def _export(model, tokenizer, out: Path, head=None, policy=None) -> None:
    """The run's plain loadable model in ``out`` (LoRA merged, threshold head and step policy beside it;
    :func:`training.checkpoint.export_model`), written once, when the run ends: checkpoints hold what resuming
    needs (with LoRA the adapters only), and ``diffpo-train export`` turns any of them into this."""
    export_model(model, tokenizer, out, head, policy)


def _example_pool(cfg: RLConfig, n: int) -> list[dict]:
    """``n`` training examples per task, each with its ``task``: generated, or the first ``n`` rows of the
    task's ``--data`` file (:func:`training.data.example_pool`)."""
    return example_pool(cfg.tasks.split(","), n, cfg.seed, cfg.data)


class TaskReward:
    """The reward of a rollout: ``reward_function(example["task"], kind)`` (``--reward``), looked up once per task.

    ``TaskReward("correctness")`` is also the exact-match scorer beside d1's summed terms."""

    def __init__(self, kind: str = "correctness"):
        self.kind = kind
        self._by_task: dict = {}

    def __call__(self, text: str, example: dict) -> float:
        task = example["task"]
        if task not in self._by_task:
            self._by_task[task] = reward_function(task, self.kind)
        return self._by_task[task](text, example)


_reward = TaskReward("correctness")  # the task's correctness: the default reward, and exact match beside d1's


@dataclass
class RLRun:
    output_dir: Path  # a loadable model directory
    model: torch.nn.Module  # this process's trained model (unwrapped; LoRA not merged)


def _setup_head(base, cfg: RLConfig, ckpt: Path, resuming: bool):
    """The threshold head to train (sampler/joint) or None; resumed, inherited from the model, or new."""
    if cfg.train == "model" or cfg.sampler_kind != "head":
        return base.threshold_head
    if resuming:
        head = load_head(ckpt)
        if head is None:
            raise CheckpointError(f"{ckpt}: no threshold head to resume (was this a --train {cfg.train} run?)")
        return head.train()
    if base.threshold_head is not None:
        return base.threshold_head.train()
    torch.manual_seed(cfg.seed)  # a resumed run rebuilds nothing, but two fresh runs start alike
    return ThresholdHead(base.model.config.get_text_config().hidden_size, features=cfg.head_features)


def _warm_start_settings(cfg: RLConfig, base: LoadedModel, gen_length: int) -> dict:
    """What a warm start's data and fits depend on: a resumed one must match (:class:`WarmStartStore`)."""
    return {"model": str(Path(base.path).resolve()), "tasks": cfg.tasks, "data": cfg.data,
            "prompts": cfg.warm_start_prompts, "gamma": cfg.warm_start_gamma, "label": cfg.warm_start_label,
            "epochs": cfg.warm_start_epochs, "point": cfg.warm_start_point, "features": cfg.policy_features,
            "block_length": cfg.block_length, "gen_length": gen_length, "seed": cfg.seed,
            "chat_template": cfg.chat_template}


def _setup_policy(base, cfg: RLConfig, ckpt: Path, resuming: bool, gen_length: int, progress: bool = False):
    """The step policy to train: resumed, inherited from the model, or new (with its warm start, which
    ``progress`` (the main process) keeps in OUTPUT_DIR/warm_start until the run ends, for ``--resume``)."""
    if resuming:
        policy = load_policy(ckpt)
        if policy is None:
            raise CheckpointError(f"{ckpt}: no step policy to resume (was this a --sampler-kind policy run?)")
        return policy.train()
    if base.step_policy is not None:
        return base.step_policy.train()

    def new_policy() -> StepPolicy:  # seeded: two fresh runs, and every round, start from the same weights
        torch.manual_seed(cfg.seed)
        return StepPolicy(base.model.config.hidden_size, features=cfg.policy_features)

    policy = new_policy()
    if cfg.warm_start_prompts > 0:
        pool = _example_pool(cfg, cfg.warm_start_prompts)
        prompts = [base.encode(ex["prompt"]) for ex in pool]
        behaviour = SamplingParams("eb", gen_length, block_length=cfg.block_length, threshold=cfg.warm_start_gamma)
        store = WarmStartStore(Path(cfg.output_dir) / WARM_START_DIR, _warm_start_settings(cfg, base, gen_length),
                               cfg.resume) if progress else None  # the main process keeps it; the others redo it
        t0 = time.perf_counter()
        policy, tokens, loss = run_warm_start(base, prompts, gen_length, behaviour, new_policy,
                                              rounds=cfg.warm_start_rounds, label=cfg.warm_start_label,
                                              epochs=cfg.warm_start_epochs, seed=cfg.seed,
                                              point=cfg.warm_start_point, store=store, progress=progress)
        log.info("step policy warm start: %d prompts, %d round(s), %d tokens, BCE %.4f, %.0f s", len(prompts),
                 cfg.warm_start_rounds, tokens, loss, time.perf_counter() - t0)
    return policy.train()


def train_rl(cfg: RLConfig) -> RLRun:
    """Run RL post-training; the output directory is a loadable model (with its head, if trained)."""
    if cfg.warm_start_rounds < 1:
        raise ValueError(f"--warm-start-rounds {cfg.warm_start_rounds}: at least 1 (the first round decodes with EB)")
    if cfg.warm_start_point and not 0 < cfg.warm_start_point < 1:  # else it fails only after the whole warm start
        raise ValueError(f"--warm-start-point {cfg.warm_start_point}: a probability in (0, 1), or 0 to keep the "
                         "fitted policy's 0.5")
    # on a machine without CUDA, cpu=True is what makes a multi-process launch use gloo DDP
    accelerator = Accelerator(cpu=cfg.device == "cpu" or (cfg.device is None and not torch.cuda.is_available()))
    out, ckpt = Path(cfg.output_dir), Path(cfg.output_dir) / CHECKPOINT
    metrics_file = out / "metrics.jsonl"
    recover_interrupted(ckpt)
    resuming = cfg.resume and ckpt.exists()
    train_model = cfg.train in ("model", "joint")
    train_policy = cfg.train in ("sampler", "joint") and cfg.sampler_kind == "policy"
    train_head = cfg.train in ("sampler", "joint") and cfg.sampler_kind == "head"
    # the examples first: a bad --data / --eval-data file fails before the model loads
    pool = _example_pool(cfg, cfg.train_examples)
    eval_sets = eval_sets_of(cfg.tasks.split(","), cfg.eval_examples, cfg.eval_data) if cfg.eval_every else {}
    base = load_model(cfg.model, dtype=cfg.dtype)
    if not decoder_for(base).masks:  # no mask state: only the threshold head trains (training/canvas_rl.py)
        canvas_rl.check(cfg, base.path)
    tokenizer, mask_id = base.tokenizer, base.mask_id
    lora = bool(cfg.lora_r and train_model)
    if cfg.dtype in ("bfloat16", "float16") and train_model and not lora:
        log.warning("--dtype %s without --lora-r: the weights and their AdamW state are %s, and updates smaller "
                    "than its rounding are lost", cfg.dtype, cfg.dtype)
    ref_model = None
    if cfg.beta > 0 and train_model and not lora:
        ref_model = copy.deepcopy(base.model).eval().requires_grad_(False).to(accelerator.device)
    if cfg.gradient_checkpointing and train_model:
        enable_gradient_checkpointing(base.model, base.path)
    if lora:
        if resuming:
            from peft import PeftModel
            model = PeftModel.from_pretrained(base.model, ckpt, is_trainable=True)
        else:
            model = _wrap_lora(base.model, cfg)
        if cfg.beta > 0:  # the base weights, adapters off (a resumed run's base is the same original model)
            ref_model = AdaptersOff(model)
    else:
        model = load_model(ckpt).model if resuming else base.model
    head = _setup_head(base, cfg, ckpt, resuming)
    gen_length, block_length = rollout_lengths(cfg, base)
    policy = (_setup_policy(base, cfg, ckpt, resuming, gen_length, accelerator.is_main_process) if train_policy
              else base.step_policy)
    state = load_trainer_state(ckpt) if resuming else None
    if accelerator.is_main_process:
        start_metrics(metrics_file, state["step"] if state else None)
    if cfg.resume and not resuming:
        log.warning("--resume: no checkpoint in %s, starting from %s", ckpt, base.path)

    optimizer = head_optimizer = None
    if train_model:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model = model.eval().requires_grad_(False).to(accelerator.device)
    if train_head or train_policy:  # one optimiser for the learned sampler, whichever it is
        trained = head if train_head else policy
        head_optimizer = torch.optim.AdamW(trained.parameters(), lr=cfg.head_lr)
        if state is not None:
            head_optimizer.load_state_dict(state["extra"]["head_optimizer"])
        trained, head_optimizer = accelerator.prepare(trained, head_optimizer)
        head, policy = (trained, policy) if train_head else (head, trained)
    unwrapped = accelerator.unwrap_model(model)
    head_unwrapped = accelerator.unwrap_model(head) if head is not None else None
    policy_unwrapped = accelerator.unwrap_model(policy) if policy is not None else None
    loaded = replace(base, model=unwrapped, threshold_head=head_unwrapped, step_policy=policy_unwrapped)

    sampler = "learned" if train_head else "policy" if train_policy else cfg.sampler
    params, nfe_max = rollout_params(cfg, loaded, sampler, None if train_head or train_policy else cfg.threshold,
                                     gen_length, block_length)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rl_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    start = state["step"] + 1 if state else 0
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc=f"rl {cfg.algo} {cfg.train}",
               disable=not accelerator.is_local_main_process)
    if cfg.eval_every and start == 0 and accelerator.is_main_process:  # the starting point of the curve
        with metrics_file.open("a") as f:
            first = evaluate_tasks(loaded, eval_sets, params, cfg.chat_template)
            f.write(json.dumps({"step": 0, "rollouts": 0, **first}) + "\n")
    task_reward = _reward if cfg.reward == "correctness" else TaskReward(cfg.reward)
    lam_of = lam_by_task(cfg.lam, cfg.tasks)
    for step in bar:
        t0 = time.perf_counter()
        step_seed = (cfg.seed * 1_000_003 + step) * world + rank
        g = torch.Generator().manual_seed(step_seed)
        idx = torch.randint(0, len(pool), (cfg.prompts_per_step,), generator=g).tolist()
        batch = rollout(unwrapped, loaded, [pool[i] for i in idx], task_reward, cfg.num_generations, params,
                        seed=step_seed * 100_000, head=head_unwrapped, chat_template=cfg.chat_template,
                        policy=policy_unwrapped if sampler == "policy" else None,
                        correctness_fn=None if cfg.reward == "correctness" else _reward)
        rollout_seconds = time.perf_counter() - t0
        record = {}
        # the NFE-penalised reward, once per step: the head's, and the model's with --model-reward sampler
        speed = None
        if train_head or train_policy or cfg.model_reward == "sampler":
            row_lam = torch.tensor([lam_of[pool[i]["task"]] for i in idx for _ in range(cfg.num_generations)],
                                   device=batch.nfe.device)  # rows are grouped by prompt, as rollout() lays them out
            speed = sampler_reward(batch.rewards.to(batch.nfe.device), batch.nfe, nfe_max, row_lam)
        if train_model:
            rewards = batch.rewards if cfg.model_reward == "task" else speed.to(batch.rewards.device)
            record.update(_model_update(cfg, model, unwrapped, ref_model, optimizer, accelerator, batch, rewards, g,
                                        mask_id))
        if train_head:
            record.update(_head_update(cfg, head, head_optimizer, accelerator, batch, speed))
        if train_policy:
            record.update(_policy_update(cfg, policy, head_optimizer, accelerator, batch, speed))

        _, zero_var = group_advantages(batch.rewards, cfg.num_generations)
        local = torch.tensor([batch.rewards.mean(), batch.exact.mean(), batch.nfe.float().mean(), zero_var,
                              batch.threshold.mean()], device=accelerator.device)
        reward, exact, nfe, zero, threshold = accelerator.reduce(local, "mean").tolist()
        record = {"step": step + 1, "rollouts": (step + 1) * cfg.prompts_per_step * cfg.num_generations * world,
                  "reward": round(reward, 4), "accuracy": round(exact, 4), "mean_nfe": round(nfe, 3),
                  "mean_threshold": round(threshold, 5), "zero_variance_groups": zero * world, **record,
                  "rollouts_per_second": round(len(batch.texts) * world / rollout_seconds, 2),
                  "step_seconds": round(time.perf_counter() - t0, 3)}
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps):
            if accelerator.is_main_process:
                record.update(evaluate_tasks(loaded, eval_sets, params, cfg.chat_template))
        bar.set_postfix(reward=f"{reward:.3f}", nfe=f"{nfe:.1f}")
        if accelerator.is_main_process and ((step + 1) % cfg.log_every == 0 or any(k.startswith("eval_")
                                                                                  for k in record)):
            with metrics_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                extra = {"head_optimizer": head_optimizer.state_dict()} if head_optimizer else None
                save_checkpoint(ckpt, model=unwrapped, tokenizer=tokenizer, step=step, optimizer=optimizer,
                                extra=extra, head=head_unwrapped, policy=policy_unwrapped,
                                lora_base={"model": str(Path(base.path).resolve()), "dtype": cfg.dtype} if lora
                                else None)
    if accelerator.is_main_process:  # also after 0 steps: e.g. a step policy's warm start alone
        _export(unwrapped, tokenizer, out, head_unwrapped, policy_unwrapped)
        shutil.rmtree(out / WARM_START_DIR, ignore_errors=True)  # its result is in the export now
    finish_run(accelerator, bar)
    return RLRun(out, unwrapped)


def _model_update(cfg: RLConfig, model, unwrapped, ref_model, optimizer, accelerator, batch, rewards, g,
                  mask_id) -> dict:
    """mu clipped policy-gradient steps of the dLLM on one batch of rollouts and their rewards; returns metrics."""
    diffpo = cfg.algo == "diffpo"
    advantages, _ = group_advantages(rewards, cfg.num_generations, cfg.scale_std)
    advantages = advantages.to(batch.completion.device)
    # d1's completion mask: each completion's sampled tokens up to and including its first EOS (not the tail)
    token_mask = scored(batch.completion, batch.commit_step, batch.eos_ids)
    # --tau-over answer: tau only among the passes that commit a scored token
    passes = answer_passes(batch.commit_step, token_mask, batch.nfe) if diffpo and cfg.tau_over == "answer" else None
    # per inner step: the prompt mask, tau and the old/reference log-probs, all before any update
    draws = []
    with torch.no_grad():
        for _ in range(cfg.num_iterations):
            masked_prompt = prompt_mask(batch.prompt_attention, cfg.p_mask, g)
            tau = (draw_tau(batch.nfe, g) if passes is None else draw_tau(batch.nfe, g, passes)) if diffpo else None
            old = surrogate_logprobs(unwrapped, batch, masked_prompt, tau, mask_id)
            ref = surrogate_logprobs(ref_model, batch, masked_prompt, tau, mask_id) if ref_model else None
            w = None
            if diffpo:  # the weight's numerator: pi_old under the masked prompt (old itself) or the whole prompt
                unmasked = cfg.is_numerator == "unmasked" and bool(masked_prompt.any())
                numerator = surrogate_logprobs(unwrapped, batch, torch.zeros_like(masked_prompt), tau, mask_id) \
                    if unmasked else old
                w = truncated_is_weight(numerator, batch.behaviour_logprob, cfg.C)
            draws.append((masked_prompt, tau, old, ref, w))
    stats, grad_norms = [], []
    model.train()
    for masked_prompt, tau, old, ref, w in draws:
        logp = surrogate_logprobs(model, batch, masked_prompt, tau, mask_id)
        loss, s = policy_loss(logp, old, advantages, token_mask, epsilon=cfg.epsilon, beta=cfg.beta,
                              logp_ref=ref, is_weight=w, is_cap=cfg.C if diffpo else None)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norms.append(float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)))
        optimizer.step()
        stats.append(s)

    def mean(name):
        return sum(getattr(s, name) for s in stats) / len(stats)

    return {"loss": round(mean("loss"), 5), "kl": round(mean("kl"), 6),
            "ratio_clip_fraction": round(mean("ratio_clip_fraction"), 5),
            "is_clip_fraction": round(mean("is_clip_fraction"), 5), "mean_is_weight": round(mean("mean_is_weight"), 4),
            "grad_norm": round(sum(grad_norms) / len(grad_norms), 4),
            "completion_length": round(float(token_mask.sum(1).float().mean()), 3)}  # scored tokens per row (d1's)


def _head_update(cfg: RLConfig, head, head_optimizer, accelerator, batch, r: torch.Tensor) -> dict:
    """One group-relative REINFORCE step of the threshold head on the rollouts' own gamma draws and
    their sampler reward ``r``."""
    advantages, _ = group_advantages(r, cfg.num_generations)
    dist = torch.distributions.Categorical(logits=head(batch.head_features))
    loss = threshold_head_loss(dist.log_prob(batch.threshold_choice), advantages, dist.entropy(), cfg.entropy_coef)
    head_optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    head_optimizer.step()
    return {"sampler_reward": round(float(r.mean()), 4), "head_loss": round(loss.item(), 5),
            "head_entropy": round(dist.entropy().mean().item(), 4)}


def _policy_update(cfg: RLConfig, policy, optimizer, accelerator, batch, r: torch.Tensor) -> dict:
    """One group-relative REINFORCE step of the step policy on the rollouts' own commit decisions and
    their sampler reward ``r`` (:func:`training.commit_policy.policy_rl_loss`)."""
    advantages, _ = group_advantages(r, cfg.num_generations)
    loss, logp, entropy = policy_rl_loss(policy, batch.policy_trace, advantages.to(batch.nfe.device),
                                         cfg.entropy_coef)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    decisions = batch.policy_trace.candidates.sum().clamp(min=1)
    return {"sampler_reward": round(float(r.mean()), 4), "policy_loss": round(loss.item(), 5),
            "policy_entropy_per_decision": round(float(entropy.detach().sum() / decisions), 4)}
