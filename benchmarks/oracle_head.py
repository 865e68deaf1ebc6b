"""Can first-pass features tell which gamma suits a prompt? A threshold head fit to oracle labels.

An experiment beside the RL-trained heads (which settle on one gamma per task): for ``--train-n``
train prompts of a task, greedy EB decodes at every gamma of the head's grid give each prompt's
reward and NFE per gamma; each prompt is labelled with the gamma that maximises the sampler reward
r * (1 - lambda NFE / gen_length) (soft labels: a sharp softmax of that score, ties to the larger
gamma); a :class:`ThresholdHead` is fit to them by cross-entropy on the sampler's own first-pass
features; the ``learned`` sampler with that head is then decoded on the test split beside the
fixed-gamma front of the same model. ``front`` is the best accuracy that fixed gammas reach at the
head's NFE, mixing two neighbouring gammas across prompts (the upper hull of the fixed points).
Writes docs/results/samplers/oracle_head.{md,json}.

    python -m benchmarks.oracle_head --model runs/sft [--task countdown] [--lams 0.5,0.2,0.05]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import machine, markdown_table, load_model, save

from diffpo_serve.dllm.sampler import SamplingParams, denoise_step, generate, init_state
from diffpo_serve.dllm.threshold_head import DEFAULT_GRID, FEATURES, ThresholdHead
from training.tasks import get_task


def decode(loaded, task, data, params: SamplingParams, head=None, batch_size: int = 256):
    """Rewards (n,), NFE (n,) and head features (n, d) or None, greedy."""
    rewards, nfe, feats = [], [], []
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        out = generate(loaded.model, [loaded.encode(ex["prompt"]) for ex in chunk], params, mask_id=loaded.mask_id,
                       eos_id=loaded.eos_id, pad_id=loaded.pad_id, head=head)
        rewards += [task.reward(loaded.decode(seq)[0], ex) for ex, seq in zip(chunk, out.sequences.tolist())]
        nfe += out.nfe.tolist()
        if head is not None:
            feats.append(out.head_features)
    return torch.tensor(rewards), torch.tensor(nfe, dtype=torch.float), torch.cat(feats) if feats else None


def first_pass_features(loaded, data, head: ThresholdHead, gen: int, batch_size: int = 256) -> torch.Tensor:
    """The head's features (n, d) from the ``learned`` sampler's first forward pass only (they do not
    depend on the head's weights, and nothing after that pass is needed)."""
    feats = []
    for i in range(0, len(data), batch_size):
        state = init_state([loaded.encode(ex["prompt"]) for ex in data[i:i + batch_size]],
                           SamplingParams("learned", gen), mask_id=loaded.mask_id, eos_id=loaded.eos_id,
                           pad_id=loaded.pad_id, device=loaded.device, head=head)
        denoise_step(loaded.model, state)
        feats.append(state.head_features)
    return torch.cat(feats)


def front_at(points: list[tuple[float, float]], x: float) -> float:
    """Best accuracy at mean NFE ``x`` from (nfe, accuracy) points, mixing any two of them across prompts."""
    best = max((a for n, a in points if n <= x), default=float("nan"))
    for n1, a1 in points:
        for n2, a2 in points:
            if n1 < x < n2:
                best = max(best, a1 + (a2 - a1) * (x - n1) / (n2 - n1))
    return best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--task", default="cd3")
    ap.add_argument("--features", default="prompt+answer", choices=list(FEATURES))
    ap.add_argument("--name", default="samplers/oracle_head", help="results file name under docs/results/")
    ap.add_argument("--train-n", type=int, default=4000)
    ap.add_argument("--test-n", type=int, default=1000)
    ap.add_argument("--lams", default="0.5,0.2,0.05")
    ap.add_argument("--epochs", type=int, default=300)
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.manual_seed(0)
    loaded, task = load_model(args.model), get_task(args.task)
    gen = task.GEN_LENGTH
    train = list(task.make_dataset("train", args.train_n, seed=0))
    test = list(task.make_dataset("test", args.test_n, seed=0))
    grid = torch.tensor(DEFAULT_GRID)

    def sweep(data):
        runs = [decode(loaded, task, data, SamplingParams("eb", gen, threshold=g)) for g in DEFAULT_GRID]
        return torch.stack([r for r, _, _ in runs], 1), torch.stack([n for _, n, _ in runs], 1)  # (n, K)

    train_r, train_n = sweep(train)
    test_r, test_n = sweep(test)
    probe = ThresholdHead(loaded.model.config.hidden_size, features=args.features)  # features do not depend on it
    feats = first_pass_features(loaded, train, probe, gen)
    fixed = [(float(test_n[:, k].mean()), float(test_r[:, k].mean())) for k in range(len(grid))]
    rows = [{"setting": f"eb {g:.4g}", "accuracy": a, "mean_nfe": n, "front": a} for g, (n, a) in
            zip(DEFAULT_GRID, fixed)]
    for lam in [float(x) for x in args.lams.split(",")]:
        score = train_r * (1 - lam * train_n / gen) + 1e-4 * torch.arange(len(grid))  # ties: the larger gamma
        target = torch.softmax(score / 0.02, 1)
        head = ThresholdHead(loaded.model.config.hidden_size, features=args.features)
        opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
        for _ in range(args.epochs):
            loss = -(target * torch.log_softmax(head(feats), -1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        r, n, f = decode(loaded, task, test, SamplingParams("learned", gen), head=head)
        choices = torch.bincount(head(f).argmax(1), minlength=len(grid)).tolist()
        labels = score.argmax(1)
        with torch.no_grad():
            fit = float((head(feats).argmax(1) == labels).float().mean())
        rows.append({"setting": f"oracle-fit head, lambda {lam}", "accuracy": float(r.mean()),
                     "mean_nfe": float(n.mean()), "front": front_at(fixed, float(n.mean())),
                     "oracle_train_reward": float(train_r.gather(1, labels[:, None]).mean()),
                     "head_label_fit": fit,
                     "choices": {f"{g:.3g}": c for g, c in zip(DEFAULT_GRID, choices) if c}})
        print(rows[-1], flush=True)
    text = (f"# A threshold head fit to per-prompt oracle labels\n\nModel `{args.model}`, task {args.task}: "
            f"greedy EB decodes of {args.train_n} train prompts at each of the {len(grid)} gammas of the head's "
            f"grid give oracle labels (the gamma maximising r * (1 - lambda NFE/{gen})); a head on "
            f"`{args.features}` features is fit to them ({args.epochs} full-batch AdamW epochs) and decoded on "
            f"{args.test_n} test prompts. `front`: the best the fixed gammas reach at the same mean NFE (two "
            f"neighbouring gammas mixed across prompts). `oracle_train_reward`: the mean reward of the train prompts "
            f"at their oracle gamma (what the labels are worth, not how well the head learns them); "
            f"`head_label_fit`: the fraction of train prompts whose oracle gamma the fitted head picks. One run each (deterministic). Machine: {machine()}; "
            f"{time.time() - t0:.0f} s.\n\n"
            + markdown_table(rows, ["setting", "accuracy", "mean_nfe", "front", "oracle_train_reward",
                                   "head_label_fit", "choices"]) + "\n")
    print(save(args.name, text, rows))


if __name__ == "__main__":
    main()
