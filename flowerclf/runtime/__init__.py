"""Where tensors run: the device decision, torchrun processes, memory accounting."""
