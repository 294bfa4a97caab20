"""What a model got right and wrong: metrics, plots, report.html, and evaluating a checkpoint on a split."""
