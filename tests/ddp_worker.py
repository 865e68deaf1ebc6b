"""Run by test_rl.py / test_rl_real_models.py under `accelerate launch`: a short RL run, then each rank writes its
weights' checksums (and its LoRA adapters' sums, its rollouts' texts and prompt ids).

Arguments: BASE_MODEL OUT_DIR [JSON of RLConfig overrides] [text-reward (the reward of test_rl_real_models)].
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # as conftest does: benchmarks/ (test_family_llada)

from accelerate import PartialState  # noqa: E402

from diffpo_serve.dllm.loading import load_model  # noqa: E402
from training import rl  # noqa: E402
from training.config import RLConfig  # noqa: E402
from training.distributed import exit_status  # noqa: E402

base, out = sys.argv[1], Path(sys.argv[2])
overrides = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
texts, prompts = [], []
if "text-reward" in sys.argv[4:]:
    from test_rl_real_models import text_reward
    rl._reward = text_reward
else:  # a reward that differs within a group (the tiny model's sudoku rewards may all be 0: no gradient at all)
    from conftest import varied_reward
    rl._reward = varied_reward
rollout = rl.rollout


def recording_rollout(*args, **kw):  # what this rank decoded: the ranks must not all draw the same rollouts
    batch = rollout(*args, **kw)
    texts.extend(batch.texts)
    prompts.append(batch.prompt_ids.tolist())
    return batch


rl.rollout = recording_rollout
initial = [float(p.double().sum()) for p in load_model(base).model.parameters()]
cfg = RLConfig(**{**dict(model=base, output_dir=str(out), tasks="sudoku", train_examples=64, num_generations=4,
                         prompts_per_step=2, num_iterations=2, max_steps=2, save_every=2, lr=1e-2, gen_length=16,
                         steps=8, device="cpu"), **overrides})
run = rl.train_rl(cfg)
state = PartialState()
checksums = [float(p.double().sum()) for p in run.model.parameters()]
adapters = {n: float(p.double().sum()) for n, p in run.model.named_parameters() if "lora_" in n}
(out / f"rank{state.process_index}.json").write_text(
    json.dumps({"world": state.num_processes, "initial": initial, "checksums": checksums, "adapters": adapters,
                "rollout_texts": texts, "rollout_prompts": prompts}))
sys.exit(exit_status(0))  # as diffpo-train ends a rank (training/distributed.py)
