"""`make profile`: where inferd's request path spends its GIL time under load.

    python scripts/profile_server.py [--model tiny] [--concurrency 8] [--seconds 15]

Starts inferd on the benchmark repository (loadtest/bench/repository.py), drives it closed loop
with `inferd-loadtest` (native API, one row per request), and while the load runs records the
server with py-spy twice in a row, each `--seconds` long (one recording per output format):

- `--format flamegraph`: the SVG flame graph, docs/profiles/inferd-c<N>.svg;
- `--format raw` (collapsed stacks): summarised here as the top functions by inclusive GIL
  time, printed, and kept beside the raw file under .bench/profile/.

Both record `--gil --native` at 200 Hz: only samples of a thread holding the GIL (the time that
serialises requests in one process), with native frames; the grpc extension's native frames
carry no symbols and are grouped as "grpc core".

py-spy attaches with ptrace: it works as root here; in a container it may need
`--cap-add SYS_PTRACE` (and, elsewhere, `kernel.yama.ptrace_scope` 0 or root).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from inferd.loadtest.bench.repository import build_bench_repository
from inferd.loadtest.server_process import start_inferd

ROOT = Path(__file__).resolve().parent.parent
WORKDIR = ROOT / ".bench" / "profile"
RATE_HZ = 200
# The load starts, spawns its worker and warms up before the first recording.
LOAD_START_S = 5.0
GRPC_NATIVE = re.compile(r"\((?:.*/)?(?:cygrpc\.[^)]*\.so|libgrpc[^)]*)\)$")
ADDRESS = re.compile(r"^0x[0-9a-f]+ \((?:.*/)?([^)]+)\)$")
LINE = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")
# Every sample of the event-loop thread passes through these: left out of the top list.
ENTRY = ("(<frozen runpy>)", "(inferd/cli.py)", "(asyncio/runners.py)")
ENTRY_LOOP = ("BaseEventLoop.run_until_complete", "BaseEventLoop.run_forever")
EVENT_LOOP = "BaseEventLoop._run_once (asyncio/base_events.py)"


class ProfileError(RuntimeError):
    pass


def frame_label(frame: str) -> str:
    """A frame of py-spy's collapsed stacks as one function: grpc's native frames are "grpc
    core", other symbol-less ones "<library> (native)", and line numbers go."""
    if GRPC_NATIVE.search(frame):
        return "grpc core"
    address = ADDRESS.match(frame)
    if address:
        return f"{address.group(1)} (native)"
    match = LINE.match(frame)
    return f"{match.group(1)} ({match.group(2)})" if match else frame


def read_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """(frames root first, samples) per line of `stack;stack;... count`."""
    stacks = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarise(stacks: Sequence[tuple[list[str], int]]) -> tuple[int, Counter[str], Counter[str]]:
    """(samples, inclusive samples per function, self samples per function)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for frames, count in stacks:
        labels = [frame_label(f) for f in frames]
        # A thread's first frame is libc's thread start: no function of ours.
        if labels and labels[0].endswith("(native)"):
            labels = labels[1:]
        total += count
        for label in set(labels):
            inclusive[label] += count
        if labels:
            own[labels[-1]] += count
    return total, inclusive, own


def _entry(label: str) -> bool:
    return label.endswith(ENTRY) or label.startswith(ENTRY_LOOP)


def top_table(total: int, inclusive: Counter[str], own: Counter[str], count: int = 15) -> list[str]:
    rows = [(label, n) for label, n in inclusive.most_common() if not _entry(label)][:count]
    lines = [f"{'inclusive':>9}  {'self':>6}  function (file)"]
    for label, n in rows:
        lines.append(f"{n / total:>9.1%}  {own[label] / total:>6.1%}  {label}")
    return lines


def py_spy() -> str:
    found = Path(sys.executable).parent / "py-spy"
    if found.is_file():
        return str(found)
    path = shutil.which("py-spy")
    if path is None:
        raise ProfileError("py-spy is not installed: pip install -e '.[dev]' (it is a dev extra)")
    return path


def record(pid: int, seconds: int, fmt: str, out: Path) -> None:
    command = [
        py_spy(), "record", "--pid", str(pid), "--gil", "--native", "--rate", str(RATE_HZ),
        "--duration", str(seconds), "--format", fmt, "--output", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not out.is_file():
        said = (done.stderr or done.stdout).strip()
        hint = ""
        if "ermission" in said or "ptrace" in said.lower():
            hint = (
                "\npy-spy needs ptrace: run as root, or give the container --cap-add "
                "SYS_PTRACE (or set kernel.yama.ptrace_scope to 0)"
            )
        raise ProfileError(f"py-spy {fmt} failed (exit {done.returncode}): {said}{hint}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a model of the bench repository")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=15, help="length of each recording")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--svg", type=Path, help="default docs/profiles/inferd-c<N>.svg")
    args = parser.parse_args(argv)
    svg: Path = args.svg or ROOT / "docs" / "profiles" / f"inferd-c{args.concurrency}.svg"
    svg.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(WORKDIR, ignore_errors=True)
    WORKDIR.mkdir(parents=True)
    raw = WORKDIR / f"inferd-c{args.concurrency}.collapsed.txt"

    repository = build_bench_repository(WORKDIR / "repository")
    server = start_inferd(repository, WORKDIR / "inferd.log", metrics=False)
    # Measured from the end of the load's warm-up, so it covers both recordings and stops soon
    # after them (its req/s is then the profiled server's).
    load_seconds = 2 * args.seconds + 4
    load_out = WORKDIR / "load"
    load_command = [
        str(Path(sys.executable).parent / "inferd-loadtest"),
        "--target", f"native:{server.target}", "--model", args.model,
        "--concurrency", str(args.concurrency), "--warmup", "2",
        "--duration", str(load_seconds), "--workers", "1",
        "--no-plots", "--quiet", "--out", str(load_out),
    ]  # fmt: skip
    try:
        with open(WORKDIR / "load.log", "wb") as log:
            load = subprocess.Popen(load_command, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(LOAD_START_S)
            if load.poll() is not None:
                raise ProfileError(f"inferd-loadtest exited early; see {WORKDIR / 'load.log'}")
            print(
                f"profile: inferd pid {server.process.pid}, {args.model} at c={args.concurrency};"
                f" recording {args.seconds} s for the flame graph, then {args.seconds} s raw",
                flush=True,
            )
            record(server.process.pid, args.seconds, "flamegraph", svg)
            record(server.process.pid, args.seconds, "raw", raw)
            load.wait(timeout=load_seconds + 60)
        finally:
            if load.poll() is None:
                load.terminate()
                load.wait(timeout=30)
    except ProfileError as exc:
        print(f"profile: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()

    with raw.open() as f:
        total, inclusive, own = summarise(read_collapsed(f))
    if not total:
        print("profile: py-spy recorded no sample holding the GIL", file=sys.stderr)
        return 1
    loop = inclusive[EVENT_LOOP]
    print(
        f"\n{total:,} samples holding the GIL in {args.seconds} s at {RATE_HZ} Hz "
        f"({total / (args.seconds * RATE_HZ):.0%} of the time): event-loop thread "
        f"{loop / total:.0%}, other threads (grpc's pollers, ONNX Runtime) "
        f"{(total - loop) / total:.0%}. Top {args.top} by inclusive GIL time (entry frames "
        "left out):\n"
    )
    print("\n".join(top_table(total, inclusive, own, args.top)))
    summary = load_out / "report.json"
    if summary.is_file():
        level = json.loads(summary.read_text())["targets"][0]["levels"]
        if level:
            print(f"\nload while profiled: {level[0]['requests_per_s']:,.0f} req/s")
    print(f"\nprofile: wrote {svg.relative_to(ROOT)} and {raw.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
