"""Run by test_rl.py under `accelerate launch`: a short RL run, then each rank writes its weights' checksums."""

import json
import sys
from pathlib import Path

from accelerate import PartialState

from diffpo_serve.dllm.loading import load_model
from training.config import RLConfig
from training.rl import train_rl

base, out = sys.argv[1], Path(sys.argv[2])
initial = [float(p.double().sum()) for p in load_model(base).model.parameters()]
cfg = RLConfig(model=base, output_dir=str(out), tasks="sudoku", train_examples=64, num_generations=4,
               prompts_per_step=2, num_iterations=2, max_steps=2, save_every=2, lr=1e-2, gen_length=16, steps=8,
               device="cpu")
run = train_rl(cfg)
state = PartialState()
checksums = [float(p.double().sum()) for p in run.model.parameters()]
(out / f"rank{state.process_index}.json").write_text(
    json.dumps({"world": state.num_processes, "initial": initial, "checksums": checksums}))
