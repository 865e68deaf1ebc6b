"""The learned per-prompt threshold: prompt features -> a distribution over the EB sampler's gamma.

DiFFPO's "fast" half (arXiv 2510.02212): instead of one global entropy bound for every prompt, a
small head reads the prompt and picks gamma for it, trained by RL to cut forward passes without
losing accuracy.

Features, from the sampler's own first forward pass (prompt + all-mask completion), detached, so
choosing gamma costs no extra forward pass and no gradient reaches the model: ``prompt`` is the mean
final hidden state over the real prompt tokens (what the prompt is); ``prompt+answer`` also appends
the mean over the row's all-mask answer region (what the model already believes about the answer,
hence how hard it will be to decode); ``prompt+answer+eb`` further appends, for each gamma of the
grid, the fraction of the answer that the EB rule would commit in that first pass (from the pass's
per-position entropies), and the mean entropy: a direct read of how far each gamma would get.

Distribution: a categorical over a fixed log-spaced grid of gamma values. The accuracy/NFE trade-off
is a step function of gamma with plateaus (a whole block committed at once above some gamma, one token
per pass below another) and can be multi-modal across prompts, which a categorical represents exactly
while a unimodal law on log gamma would smear it; the categorical also gives exact log-probs and
entropy for REINFORCE and a well-defined mode for inference. The head samples during training and
returns its mode at inference.

Saved next to the model weights as ``threshold_head.safetensors`` + ``threshold_head.json`` and
loaded with the model by ``load_model``; a model without a head works with fixed thresholds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffpo_serve.dllm.sampler.rules import entropy_before

WEIGHTS, CONFIG = "threshold_head.safetensors", "threshold_head.json"
DEFAULT_GRID = [round(float(g), 6) for g in torch.logspace(-3, 1, 13)]  # 0.001 ... 10, x2.15 apart


class ThresholdHeadError(RuntimeError):
    """A head file that cannot be read; the message names the file and the problem."""


def prompt_features(hidden: torch.Tensor, prompt_attention: torch.Tensor) -> torch.Tensor:
    """Mean final hidden state over the real prompt tokens: (b, l, d), (b, l) bool -> (b, d), detached."""
    w = prompt_attention.to(hidden.dtype)[..., None]
    return ((hidden * w).sum(1) / w.sum(1).clamp(min=1)).detach().float()


def eb_commit_fractions(answer_entropy: torch.Tensor, answer_attention: torch.Tensor,
                        grid: torch.Tensor) -> torch.Tensor:
    """(b, n) first-pass per-position entropies of the answer region, (b, n) bool -> (b, K + 1), detached.

    For each gamma of ``grid``: the fraction of the row's answer positions that the EB rule would
    commit (the sampler's :func:`~diffpo_serve.dllm.sampler.rules.entropy_before` <= gamma, at least one);
    then the mean per-position entropy.
    """
    h = answer_entropy.detach().float().masked_fill(~answer_attention, 0.0)
    before, _ = entropy_before(h, answer_attention)
    n = answer_attention.sum(-1).clamp(min=1)
    counts = ((before[:, None, :] <= grid.to(h)[None, :, None]) & answer_attention[:, None, :]).sum(-1)
    return torch.cat([counts.clamp(min=1) / n[:, None], (h.sum(-1) / n)[:, None]], -1)


FEATURES = ("prompt", "prompt+answer", "prompt+answer+eb")


class ThresholdHead(nn.Module):
    """features (b, feature_size) -> logits over ``grid`` (b, K)."""

    def __init__(self, hidden_size: int, grid: list[float] | None = None, width: int = 64,
                 features: str = "prompt"):
        super().__init__()
        if features not in FEATURES:
            raise ValueError(f"features must be one of {', '.join(FEATURES)}; got {features!r}")
        self.hidden_size, self.width, self.features = hidden_size, width, features
        self.register_buffer("grid", torch.tensor(grid or DEFAULT_GRID, dtype=torch.float))
        self.feature_size = hidden_size * (1 if features == "prompt" else 2) + (
            len(self.grid) + 1 if features == "prompt+answer+eb" else 0)
        self.net = nn.Sequential(nn.LayerNorm(self.feature_size), nn.Linear(self.feature_size, width), nn.GELU(),
                                 nn.Linear(width, len(self.grid)))

    def extract(self, hidden: torch.Tensor, attention: torch.Tensor, prompt_width: int,
                answer_entropy: torch.Tensor | None = None) -> torch.Tensor:
        """This head's features from a first pass -> (b, feature_size).

        hidden (b, l, d) and attention (b, l) bool cover prompt and answer; ``answer_entropy`` (b, l -
        prompt_width), the pass's per-position entropies over the answer region, is needed by
        ``prompt+answer+eb``.
        """
        feats = prompt_features(hidden[:, :prompt_width], attention[:, :prompt_width])
        if self.features != "prompt":
            answer = prompt_features(hidden[:, prompt_width:], attention[:, prompt_width:])
            feats = torch.cat([feats, answer], -1)
        if self.features == "prompt+answer+eb":
            if answer_entropy is None:
                raise ValueError("prompt+answer+eb features need the first pass's answer entropies")
            feats = torch.cat([feats, eb_commit_fractions(answer_entropy, attention[:, prompt_width:], self.grid)],
                              -1)
        return feats

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float())

    def distribution(self, features: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self(features))

    def log_prob(self, features: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self(features), -1).gather(-1, choice[:, None]).squeeze(-1)

    @torch.no_grad()
    def choose(self, features: torch.Tensor, generators: list | None = None) -> torch.Tensor:
        """Grid indices (b,): the mode, or a draw with each row's generator where one is given."""
        logits = self(features)
        choice = logits.argmax(-1)
        for i, g in enumerate(generators or []):
            if g is not None:
                probs = torch.softmax(logits[i].float(), -1).to(g.device)  # the generator's device
                choice[i] = torch.multinomial(probs, 1, generator=g).item()
        return choice

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / WEIGHTS))
        (directory / CONFIG).write_text(json.dumps({"hidden_size": self.hidden_size, "width": self.width,
                                                     "features": self.features, "grid": self.grid.tolist()},
                                                    indent=1))


def load_head(directory: str | Path, device: str | torch.device = "cpu") -> ThresholdHead | None:
    """The head saved in a model directory, or None when it has none."""
    directory = Path(directory)
    if not (directory / CONFIG).exists() and not (directory / WEIGHTS).exists():
        return None
    try:
        cfg = json.loads((directory / CONFIG).read_text())
        head = ThresholdHead(int(cfg["hidden_size"]), [float(g) for g in cfg["grid"]], int(cfg.get("width", 64)),
                             cfg.get("features", "prompt"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ThresholdHeadError(f"{directory / CONFIG}: unreadable threshold-head config: {e}") from e
    try:
        head.load_state_dict(load_file(str(directory / WEIGHTS)))
    except Exception as e:  # safetensors errors, missing file, shape mismatch
        raise ThresholdHeadError(f"{directory / WEIGHTS}: cannot load the threshold head: {e}") from e
    return head.to(device).eval()
