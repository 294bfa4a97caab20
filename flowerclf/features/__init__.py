"""Backbone features: the engines (torch, ONNX Runtime), the passes over splits, the per-user store."""
