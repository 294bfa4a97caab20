"""A training run: its settings, the epoch loops, the trainer, the save directory and the resume state."""
