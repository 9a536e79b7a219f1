"""The benchmark suite (`make bench`, `python -m inferd.loadtest.bench`) and the GPU benchmark
(`python -m inferd.loadtest.bench.gpu`).

The suite runs from a checkout and writes into it: docs/benchmarks.md, its figures, the reports
under loadtest/results/ and its servers' files under .bench/ (both git-ignored).
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
