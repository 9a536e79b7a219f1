"""The benchmark suite (`make bench`, `python -m inferd.loadtest.bench`), the GPU benchmark
(`python -m inferd.loadtest.bench.gpu`), the client's cost per call
(`python -m inferd.loadtest.bench.client`) and the framework ceiling server the suite compares
inferd with (`python -m inferd.loadtest.bench.ceiling`).

The suite runs from a checkout and writes into it: docs/benchmarks.md, its figures, the reports
under loadtest/results/ and its servers' files under .bench/ (both git-ignored).
"""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
