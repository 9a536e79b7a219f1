"""What the harness can load: inferd's native API, any Open Inference Protocol server, and ONNX
Runtime in the worker itself (the in-process ceiling).

`target.py` holds what every target shares: the spec, the coordinator's view (`TargetDriver`)
and a worker's (`RequestSender`). Each kind is a module beside it, imported only when a spec
names it (the in-process one loads ONNX Runtime, the network ones gRPC stubs); the two
functions below are the only place that maps a kind to its module.
"""

from __future__ import annotations

from collections.abc import Sequence

from inferd.loadtest.inputs import Payload
from inferd.loadtest.targets.target import RequestSender, TargetDriver, TargetSpec


def open_driver(spec: TargetSpec) -> TargetDriver:
    if spec.kind == "native":
        from inferd.loadtest.targets.native import NativeDriver

        return NativeDriver(spec)
    if spec.kind == "oip":
        from inferd.loadtest.targets.oip import OipDriver

        return OipDriver(spec)
    from inferd.loadtest.targets.inprocess import InprocessDriver

    return InprocessDriver(spec)


def open_sender(spec: TargetSpec, payloads: Sequence[Payload], timeout_s: float) -> RequestSender:
    """Build a sender inside a worker's running event loop."""
    if spec.kind == "native":
        from inferd.loadtest.targets.native import NativeSender

        return NativeSender(spec, payloads, timeout_s)
    if spec.kind == "oip":
        from inferd.loadtest.targets.oip import OipSender

        return OipSender(spec, payloads, timeout_s)
    from inferd.loadtest.targets.inprocess import InprocessSender

    return InprocessSender(spec, payloads)
