"""Benchmarks: the harness that measures every variant and baseline side by side (harness), the other runtimes it and
`check` run ONNX files on (runtimes), and the report it writes — JSON, plot, Markdown (report)."""
