"""diffpo training: tasks, SFT, RL, evaluation."""
