"""Benchmarks: the harness that measures every variant and baseline side by side (harness), the per-step budget of each
step model that runs on a board's device install too (budget), the other runtimes the harness and `check` run ONNX
files on (runtimes), and the report it writes — JSON, plot, Markdown (report)."""
