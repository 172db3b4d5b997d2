"""The parts of ``tools/gpu_check.py``: running steps inside a time budget (runner), what
each step does (steps), reading their outputs (results), writing the output folder
(summary), and a pytest plugin that shows the bench ids a GPU would select (pretend_gpu).

``tools/gpu_check.py`` holds the plan (the steps, their limits, the benchmark
selection); docs/gpu-check.md says what the campaign checks and how to run it.
"""
