"""A training run: its settings, the epoch loops, the trainer, the save directory, the resume state, what fits in memory."""
