"""Export: Keras → ONNX with fused recurrent ops (keras_onnx, cells), the char RNN's graphs (graphs), the tf2onnx
fallback and its clean-up (tf2onnx_fallback, optimize), validation against the source (validate) and the `.ort`
form (ort_format). The stage that exports a model folder through its adapter is edge_rnn/exporter.py.

Workstation side: imports onnx (and keras inside functions); nothing here imports the adapters, training or bench.
"""
