"""Answering "which flower?": the predictor (torch-free with model.onnx), the local web app and its page."""
