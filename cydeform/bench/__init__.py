"""Benchmarks, run as scripts (never imported by the library).

``python -m cydeform.bench``: the CPU benchmark (``cpu``), then the GPU benchmark
(``gpu``) when CuPy sees a GPU. Each module also runs on its own:
``python -m cydeform.bench.cpu``, ``python -m cydeform.bench.gpu``. The problems
(shapes, location distributions) live in ``problems``.
"""
