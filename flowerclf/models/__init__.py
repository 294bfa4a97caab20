"""Backbones and heads: the architecture registry, offline weights, checkpoints and ONNX files."""
