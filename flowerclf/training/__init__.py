"""A training run: settings, epoch loops, the trainer, the save directory, resume state, what fits in memory."""
