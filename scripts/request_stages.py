"""Where one request's time goes inside the server, stage by stage, at a few concurrencies.

Starts inferd on the benchmark repository, drives each model at each concurrency with
`inferd-loadtest` (closed loop), and prints the mean microseconds per successful request in
each stage from GetModelStatus (`RequestStages`), read before and after each level. gRPC's
receive/parse and send fall outside the handler and are not in the table.

    python scripts/request_stages.py --models tiny,mlp,cnn --concurrency 1,8 --duration 5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from inferd.loadtest.bench.repository import build_bench_repository
from inferd.loadtest.server_process import start_inferd
from inferd_client import InferClient

STAGES = ("decode", "queue", "assemble", "handoff", "infer", "split", "encode", "handler")


def stages(target: str, model: str) -> dict[str, int]:
    with InferClient(target) as client:
        (status,) = client.status(model)
    return dict(status.statistics["stages"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="tiny,mlp,cnn")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        repository = build_bench_repository(Path(tmp) / "repository")
        server = start_inferd(repository, Path(tmp) / "server.log", metrics=False)
        try:
            header = " | ".join(s for s in STAGES)
            print(f"| model | c | requests | {header} | rest |")
            print("|---" * (len(STAGES) + 4) + "|")
            for model in args.models.split(","):
                for level in args.concurrency.split(","):
                    before = stages(server.target, model)
                    subprocess.run(
                        [sys.executable, "-m", "inferd.loadtest", "--quiet", "--no-plots",
                         "--target", f"native:{server.target}", "--model", model,
                         "--concurrency", level, "--warmup", "1",
                         "--duration", str(args.duration), "--out", str(Path(tmp) / "out")],
                        check=True, stdout=subprocess.DEVNULL,
                    )  # fmt: skip
                    after = stages(server.target, model)
                    # The warm-up's requests are in the difference too: same path, same stages.
                    count = after["count"] - before["count"]
                    means = {
                        s: (after[f"{s}_ns"] - before[f"{s}_ns"]) / count / 1e3 for s in STAGES
                    }
                    rest = means["handler"] - sum(means[s] for s in STAGES[:-1])
                    cells = " | ".join(f"{means[s]:.0f}" for s in STAGES)
                    print(f"| {model} | {level} | {count:,} | {cells} | {rest:.0f} |")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
