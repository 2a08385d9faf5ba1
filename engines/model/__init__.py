"""The Qwen signal model: definition, checkpoints, brief training and ONNX export.

Everything in this package needs the ``export`` extra (torch, transformers, onnx, onnxscript).
The daemon never imports it; it only runs the exported model.
"""
