"""Where tensors run: the device decision and torchrun's processes."""
