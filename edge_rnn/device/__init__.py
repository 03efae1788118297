"""The device path: everything `infer`, `stream` and `generate` touch on a board without TensorFlow.

Modules here import only the standard library, numpy, onnxruntime (and Pillow for images), and from this
package only `device.*`, `errors`, `tolerances` and the version: tests/test_device.py enforces it.
"""
