"""Fuzzed messages to every RPC a client can reach: valid messages mutated byte by byte
(flips, truncation, random bytes, duplicated fields, huge varints, wrong wire types) and field
by field (huge and negative shapes, 100k-character names, version "9"*5000, unknown datatypes,
mismatched raw_input_contents counts, odd parameters), sent as raw bytes so that nothing on the
client side checks them.

Whatever arrives, the server answers with a status that names the caller's problem (never
UNKNOWN, never INTERNAL but for a model's own failure: see `internal_allowed`), answers every
message of a request stream exactly once, stays SERVING, and logs no traceback and no ERROR.

Deterministic: each RPC's cases come from `random.Random` seeded with the RPC's name, so a
failure names a case that the next run sends again (its bytes are in the failure message).
"""

from __future__ import annotations

import copy
import math
import random
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2
from integration_support import (
    LogWatch,
    ServerFactory,
    ServerProcess,
    add_summary_line,
    cnn_input,
    echo_input,
    mlp_input,
    predict_request,
    text_input,
)

from inferd.demo_models import MLP_CONFIG, build_demo_repository, build_mlp, write_model
from inferd_wire.codec import to_wire
from inferd_wire.proto.inferd.v1 import (
    model_repository_pb2,
    model_status_pb2,
    predict_pb2,
)
from inferd_wire.proto.inference import grpc_service_pb2 as oip

SEED = "inferd-fuzz-v1"
TOKEN = "fuzz-control-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
# A call's own deadline; one that runs into it hung (the server answers everything here in
# well under a second).
CALL_TIMEOUT = 10.0
# Server-streaming calls (WatchModelStatus, Health.Watch) never end by themselves.
WATCH_TIMEOUT = 0.25
MAX_MESSAGE = 1100
MAX_SEND = 64 * 1024 * 1024

# Cases per RPC: the inference RPCs carry the most structure, server-streaming ones cost
# WATCH_TIMEOUT each. The whole file runs in ~20 s on two cores.
INFERENCE_CASES = 4000
OTHER_CASES = 120
WATCH_CASES = 6
STREAMS = 60
MESSAGES_PER_STREAM = 24

SERVICES = (
    (predict_pb2, "Predict"),
    (model_status_pb2, "ModelStatus"),
    (model_repository_pb2, "ModelRepository"),
    (oip, "GRPCInferenceService"),
    (health_pb2, "Health"),
)
INFERENCE_RPCS = {"/inferd.v1.Predict/Predict", "/inference.GRPCInferenceService/ModelInfer"}
# Control-plane requests name this model (a copy of mlp), never one the other cases use: an
# Unload of "mlp" would leave the rest of the fuzzing with nothing to infer on.
SPARE = "spare"
CONTROL_MESSAGES = {
    "inferd.v1.LoadModelRequest",
    "inferd.v1.UnloadModelRequest",
    "inference.RepositoryModelLoadRequest",
    "inference.RepositoryModelUnloadRequest",
}

# A status no request may ever get. UNAVAILABLE and CANCELLED: the server did not go away and
# nobody cancelled.
NEVER = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
}
CODES = {code.value[0]: code for code in grpc.StatusCode}

# INTERNAL is the server's answer to a model that fails on its own inputs
# (`core/batching/batcher.py`, `_fail`). Among the demo models only text_encoder can: its
# Gather rejects token ids outside its 1000-word vocabulary, which only the model knows (the
# server validates datatypes and shapes, not values; test_invalid_input.py pins this as
# INTERNAL for the one bad request of a shared batch). mlp and cnn take any float (NaN and
# inf included) and echo_bytes is an Identity on text the server has checked is UTF-8, so an
# INTERNAL for any of them, or one that is not a model's failure, is a server bug.
MODEL_FAILURE = re.compile(r"^model 'text_encoder' version \d+ failed on a batch of \d+ rows: ")


def internal_allowed(details: str) -> bool:
    return MODEL_FAILURE.match(details) is not None


# --- the RPCs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    path: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


def every_rpc() -> list[Rpc]:
    """Every method of the services a client can call, from their descriptors (a method added
    later is fuzzed without a change here)."""
    found = []
    for module, name in SERVICES:
        service = module.DESCRIPTOR.services_by_name[name]
        for method in service.methods:
            found.append(
                Rpc(
                    f"/{service.full_name}/{method.name}",
                    message_factory.GetMessageClass(method.input_type),
                    message_factory.GetMessageClass(method.output_type),
                    method.client_streaming,
                    method.server_streaming,
                )
            )
    return found


RPCS = every_rpc()
UNARY_REQUEST_RPCS = [r for r in RPCS if not r.client_streaming]
STREAM_RPCS = [r for r in RPCS if r.client_streaming]


# --- valid messages, the seeds of every mutation -------------------------------------------------


def _oip_typed(model: str, inputs: dict[str, np.ndarray], **fields: object) -> Message:
    """A ModelInferRequest of typed contents."""
    request = oip.ModelInferRequest(model_name=model, **fields)
    for name, array in inputs.items():
        datatype, shape, _ = to_wire(array)
        tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
        flat = array.ravel()
        if datatype == "FP32":
            tensor.contents.fp32_contents.extend(flat.tolist())
        elif datatype == "INT64":
            tensor.contents.int64_contents.extend(flat.tolist())
        else:
            tensor.contents.bytes_contents.extend(str(v).encode() for v in flat)
    return request


def _oip_raw(model: str, inputs: dict[str, np.ndarray], **fields: object) -> Message:
    """A ModelInferRequest of raw_input_contents."""
    request = oip.ModelInferRequest(model_name=model, **fields)
    for name, array in inputs.items():
        datatype, shape, contents = to_wire(array)
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(contents)
    return request


def _seed_messages() -> dict[str, list[Message]]:
    """Valid messages by message type; a type without any is fuzzed from its empty message and
    one with every string field naming a demo model."""
    rng = np.random.default_rng(20_261_201)
    priority = oip.InferParameter(int64_param=1)
    timeout = oip.InferParameter(uint64_param=5_000_000)
    return {
        "inferd.v1.PredictRequest": [
            predict_request("mlp", mlp_input(rng, 2), id="m"),
            predict_request("cnn", cnn_input(rng, 1), version=1),
            predict_request("text_encoder", text_input(rng, 2, 7), outputs=["embedding"]),
            predict_request("echo_bytes", echo_input(["grüße", "", "🙂"]), priority=3),
        ],
        "inference.ModelInferRequest": [
            _oip_typed("mlp", mlp_input(rng, 2), id="t", parameters={"priority": priority}),
            _oip_raw("cnn", cnn_input(rng, 1), model_version="1"),
            _oip_typed("text_encoder", text_input(rng, 1, 5), parameters={"timeout": timeout}),
            _oip_raw("text_encoder", text_input(rng, 2, 3), outputs=[{"name": "embedding"}]),
            _oip_typed("echo_bytes", echo_input(["a", "bc"])),
            _oip_raw("echo_bytes", echo_input(["xyz"])),
        ],
        "inferd.v1.GetModelStatusRequest": [
            model_status_pb2.GetModelStatusRequest(model="mlp", version=1),
            model_status_pb2.GetModelStatusRequest(model="cnn"),
        ],
        "inferd.v1.GetModelMetadataRequest": [
            model_status_pb2.GetModelMetadataRequest(model="text_encoder"),
            model_status_pb2.GetModelMetadataRequest(model="echo_bytes", version=1),
        ],
        "inferd.v1.WatchModelStatusRequest": [
            model_status_pb2.WatchModelStatusRequest(model="mlp"),
            model_status_pb2.WatchModelStatusRequest(),
        ],
        "inferd.v1.LoadModelRequest": [model_repository_pb2.LoadModelRequest(model=SPARE)],
        "inferd.v1.UnloadModelRequest": [model_repository_pb2.UnloadModelRequest(model=SPARE)],
        "inference.ModelReadyRequest": [oip.ModelReadyRequest(name="mlp", version="1")],
        "inference.ModelMetadataRequest": [oip.ModelMetadataRequest(name="cnn")],
        "inference.ModelConfigRequest": [oip.ModelConfigRequest(name="echo_bytes", version="1")],
        "inference.ModelStatisticsRequest": [
            oip.ModelStatisticsRequest(name="mlp", version="1"),
            oip.ModelStatisticsRequest(),
        ],
        "inference.RepositoryIndexRequest": [oip.RepositoryIndexRequest(ready=True)],
        "inference.RepositoryModelLoadRequest": [oip.RepositoryModelLoadRequest(model_name=SPARE)],
        "inference.RepositoryModelUnloadRequest": [
            oip.RepositoryModelUnloadRequest(model_name=SPARE)
        ],
        "inference.SystemSharedMemoryRegisterRequest": [
            oip.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=64)
        ],
        "inference.CudaSharedMemoryRegisterRequest": [
            oip.CudaSharedMemoryRegisterRequest(name="r", raw_handle=b"h", byte_size=64)
        ],
        "grpc.health.v1.HealthCheckRequest": [
            health_pb2.HealthCheckRequest(service=""),
            health_pb2.HealthCheckRequest(service="inferd.v1.Predict"),
        ],
    }


SEEDS = _seed_messages()


def seeds_of(request: type[Message]) -> list[Message]:
    name = request.DESCRIPTOR.full_name
    if name in SEEDS:
        return SEEDS[name]
    named = request()
    for field in request.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_STRING and not _repeated(field):
            setattr(named, field.name, SPARE if name in CONTROL_MESSAGES else "mlp")
    return [request(), named]


# --- hostile but well-typed field values ---------------------------------------------------------

HOSTILE_STRINGS = (
    "",
    "x" * 100_000,
    "9" * 5000,
    "../etc",
    "a/b",
    "\x00",
    "🙂" * 64,
    "-1",
    "0",
    "1",
    "18446744073709551616",
    "FP32",
    "INT64",
    "BYTES",
    "BOOL",
    "FP16",
    "BF16",
    "UINT64",
    "FLOAT128",
    "input",
    "image",
    "input_ids",
    "attention_mask",
    "text",
    "probabilities",
    "priority",
    "timeout",
    "shared_memory_region",
    "classification",
    "binary_data_size",
)
MODEL_NAMES = ("mlp", "cnn", "text_encoder", "echo_bytes", "no_such_model")
PARAMETER_KEYS = (
    "priority",
    "timeout",
    "shared_memory_region",
    "shared_memory_byte_size",
    "classification",
    "sequence_id",
    "x" * 10_000,
)
INTS = {
    FieldDescriptor.CPPTYPE_INT32: (0, -1, 1, 2**31 - 1, -(2**31)),
    FieldDescriptor.CPPTYPE_INT64: (0, -1, 1, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)),
    FieldDescriptor.CPPTYPE_UINT32: (0, 1, 2**31, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 1, 2**32, 2**63, 2**64 - 1),
}
FLOATS = (0.0, -0.0, math.nan, math.inf, -math.inf, 3.0e38, 1e-45)
HOSTILE_SHAPES = (
    [],
    [-1],
    [-1, 64],
    [0, 64],
    [2**62, 2**62],
    [2**40, 64],
    [1, 2**40],
    [65, 64],
    [1] * 1000,
    [10_000_000],
    [-(2**63)],
)


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _scalar(field: FieldDescriptor, rng: random.Random, strings: tuple[str, ...]) -> object:
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES:
            return rng.choice(
                (b"", rng.randbytes(rng.randrange(1, 64)), struct.pack("<I", 2**31), bytes(256))
            )
        return rng.choice(strings)
    if kind in INTS:
        return rng.choice(INTS[kind])
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        return rng.random() < 0.5
    if kind in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return rng.choice(FLOATS)
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [12345])
    raise AssertionError(f"unexpected field type {kind}")


def poke(message: Message, rng: random.Random, strings: tuple[str, ...], depth: int = 0) -> None:
    """Set one field of `message` (or of a message inside it) to a hostile value."""
    fields = list(message.DESCRIPTOR.fields)
    if not fields:
        return
    field = rng.choice(fields)
    value = getattr(message, field.name)
    if _is_map(field):
        key = rng.choice(PARAMETER_KEYS)
        entry = field.message_type.fields_by_name["value"]
        if entry.message_type is None:
            value[key] = _scalar(entry, rng, strings)
        else:
            poke(value[key], rng, strings, depth + 1)
    elif field.message_type is not None and _repeated(field):
        choice = rng.randrange(4)
        if choice == 0 or not len(value):
            poke(value.add(), rng, strings, depth + 1)
        elif choice == 1:
            value.append(copy.deepcopy(rng.choice(value)))  # the same input twice
        elif choice == 2:
            del value[rng.randrange(len(value))]
        elif depth < 4:
            poke(rng.choice(value), rng, strings, depth + 1)
    elif field.message_type is not None:
        if depth < 4:
            poke(value, rng, strings, depth + 1)
    elif _repeated(field):
        choice = rng.randrange(4)
        if field.cpp_type == FieldDescriptor.CPPTYPE_INT64 and (
            field.name == "shape" or not choice
        ):
            del value[:]
            value.extend(rng.choice(HOSTILE_SHAPES))
        elif choice == 1:
            del value[:]
        elif choice == 2 and len(value):
            del value[rng.randrange(len(value)) :]  # e.g. fewer raw_input_contents than inputs
        else:
            value.extend(_scalar(field, rng, strings) for _ in range(rng.randint(1, 3)))
    else:
        setattr(message, field.name, _scalar(field, rng, strings))


def hostile(seed: Message, rng: random.Random) -> Message:
    """A copy of `seed` with one to three fields set to hostile values."""
    message = copy.deepcopy(seed)
    control = message.DESCRIPTOR.full_name in CONTROL_MESSAGES
    strings = HOSTILE_STRINGS + ((SPARE,) if control else MODEL_NAMES)
    for _ in range(rng.randint(1, 3)):
        poke(message, rng, strings)
    return message


# --- byte-level mutations ------------------------------------------------------------------------


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def _field_numbers(request: type[Message]) -> list[int]:
    return [f.number for f in request.DESCRIPTOR.fields] or [1]


def flip(data: bytes, rng: random.Random, request: type[Message]) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if out:
            i = rng.randrange(len(out))
            out[i] = rng.randrange(256) if rng.random() < 0.5 else out[i] ^ 1 << rng.randrange(8)
    return bytes(out)


def truncate(data: bytes, rng: random.Random, request: type[Message]) -> bytes:
    return data[: rng.randrange(len(data))] if data else data


def random_bytes(data: bytes, rng: random.Random, request: type[Message]) -> bytes:
    return rng.randbytes(rng.randrange(1, 300))


def duplicate(data: bytes, rng: random.Random, request: type[Message]) -> bytes:
    """Every field twice: singular ones merge, repeated ones (inputs, shape, raw contents) grow."""
    return data + data


def insert(data: bytes, rng: random.Random, request: type[Message]) -> bytes:
    i = rng.randrange(len(data) + 1)
    return data[:i] + rng.randbytes(rng.randrange(1, 16)) + data[i:]


def huge_varint(data: bytes, rng: random.Random, request: type[Message]) -> bytes:
    field = rng.choice(_field_numbers(request))
    extra = rng.choice(
        (
            tag(field, 0) + b"\xff" * 9 + b"\x01",  # 2**64 - 1
            tag(field, 0) + b"\xff" * 10 + b"\x01",  # 11 bytes: no varint is that long
            tag(field, 2) + varint(2**62),  # a length far past the end
            tag(field, 2) + varint(2**31 - 1) + b"abc",
            varint(2**61 | 2),  # a field number past the largest allowed
            tag(field, 0) + b"\x80" * 9,  # a varint that never ends
        )
    )
    return extra + data if rng.random() < 0.5 else data + extra


def wrong_wire_type(data: bytes, rng: random.Random, request: type[Message]) -> bytes:
    """A known field number with a payload of another wire type (3 and 4 open and close a
    group; 6 and 7 do not exist)."""
    field = rng.choice(_field_numbers(request))
    wire_type = rng.randrange(8)
    payload = {
        0: varint(rng.choice((1, 2**63))),
        1: rng.randbytes(8),
        2: varint(3) + b"abc",
        3: b"",
        4: b"",
        5: rng.randbytes(4),
        6: rng.randbytes(4),
        7: b"",
    }[wire_type]
    extra = tag(field, wire_type) + payload
    return extra + data if rng.random() < 0.5 else data + extra


def splice(data: bytes, rng: random.Random, request: type[Message]) -> bytes:
    other = rng.choice(seeds_of(request)).SerializeToString()
    return data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1) :]


Mutation = Callable[[bytes, random.Random, type[Message]], bytes]
MUTATIONS: tuple[Mutation, ...] = (
    flip,
    flip,
    truncate,
    random_bytes,
    duplicate,
    insert,
    huge_varint,
    wrong_wire_type,
    splice,
)


@dataclass(frozen=True)
class Case:
    how: str
    data: bytes

    def describe(self) -> str:
        shown = self.data[:160].hex()
        more = f"... ({len(self.data)} bytes)" if len(self.data) > 160 else ""
        return f"{self.how}: {shown}{more}"


def cases(rpc: Rpc, count: int) -> Iterator[Case]:
    """`count` messages for `rpc`: about a fifth valid or hostile-but-valid, the rest those
    mutated byte by byte. The same every run."""
    rng = random.Random(f"{SEED}:{rpc.path}")
    seeds = seeds_of(rpc.request)
    for i in range(count):
        seed = rng.choice(seeds)
        base = hostile(seed, rng) if rng.random() < 0.5 else seed
        data = base.SerializeToString()
        if i < len(seeds):
            yield Case("seed", seeds[i].SerializeToString())
        elif rng.random() < 0.2:
            yield Case("hostile", data)
        else:
            mutation = rng.choice(MUTATIONS)
            yield Case(mutation.__name__, mutation(data, rng, rpc.request))


def parses(request: type[Message], data: bytes) -> bool:
    try:
        request.FromString(data)
    except DecodeError:
        return False
    return True


# --- the server and what must hold after every test ----------------------------------------------


def assert_unharmed(server: ServerProcess, watch: LogWatch) -> None:
    """Still running, SERVING, and nothing logged at ERROR since `watch` began."""
    assert server.process.poll() is None, server.describe()
    with grpc.insecure_channel(server.target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        health = check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    watch.assert_clean()


@pytest.fixture(scope="module")
def fuzz_server(
    module_server_factory: ServerFactory, tmp_path_factory: pytest.TempPathFactory
) -> ServerProcess:
    """The demo models plus `spare` (a copy of mlp for the control-plane RPCs), explicit model
    control and a control token, so that Load and Unload get past the token check."""
    repository: Path = tmp_path_factory.mktemp("fuzz_repository")
    build_demo_repository(repository)
    write_model(build_mlp(), repository, SPARE, config_toml=MLP_CONFIG)
    return module_server_factory(
        repository,
        env={"INFERD_MODEL_CONTROL": "explicit", "INFERD_CONTROL_TOKEN": TOKEN},
    )


@pytest.fixture
def channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", MAX_SEND)]
    with grpc.insecure_channel(fuzz_server.target, options=options) as chan:
        yield chan


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    elapsed: float
    response: bytes = b""


def _call(channel: grpc.Channel, rpc: Rpc, data: bytes) -> Outcome:
    started = time.perf_counter()
    try:
        if rpc.server_streaming:
            call = channel.unary_stream(rpc.path)(data, timeout=WATCH_TIMEOUT, metadata=AUTH)
            for _ in call:
                pass
            return Outcome(grpc.StatusCode.OK, "", time.perf_counter() - started)
        response = channel.unary_unary(rpc.path)(data, timeout=CALL_TIMEOUT, metadata=AUTH)
        return Outcome(grpc.StatusCode.OK, "", time.perf_counter() - started, response)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", time.perf_counter() - started)


def problem_of(rpc: Rpc, case: Case, outcome: Outcome) -> str | None:
    """Why `outcome` is wrong for `case`, or None."""
    code, details = outcome.code, outcome.details
    if code in NEVER:
        return f"status {code.name}"
    if code == grpc.StatusCode.INTERNAL and not internal_allowed(details):
        return "INTERNAL that is not a model's own failure"
    if len(details) > MAX_MESSAGE:
        return f"a {len(details)}-character status message"
    if rpc.server_streaming:
        return None
    if outcome.elapsed > CALL_TIMEOUT * 0.9:
        return f"no answer in {outcome.elapsed:.1f} s"
    if not parses(rpc.request, case.data) and code != grpc.StatusCode.INVALID_ARGUMENT:
        return f"an unparsable message answered {code.name}, not INVALID_ARGUMENT"
    if code == grpc.StatusCode.OK and not parses(rpc.response, outcome.response):
        return f"an answer that is no {rpc.response.DESCRIPTOR.full_name}"
    return None


def case_count(rpc: Rpc) -> int:
    if rpc.server_streaming:
        return WATCH_CASES
    return INFERENCE_CASES if rpc.path in INFERENCE_RPCS else OTHER_CASES


# --- tests ---------------------------------------------------------------------------------------


def test_every_rpc_of_every_service_is_fuzzed():
    per_service: dict[str, set[str]] = {}
    for rpc in RPCS:
        service, method = rpc.path[1:].split("/")
        per_service.setdefault(service, set()).add(method)
    assert {s: len(m) for s, m in per_service.items() if s.startswith("in")} == {
        "inferd.v1.Predict": 2,
        "inferd.v1.ModelStatus": 4,
        "inferd.v1.ModelRepository": 3,
        "inference.GRPCInferenceService": 20,
    }
    assert {"Check", "Watch"} <= per_service["grpc.health.v1.Health"]
    assert {r.path for r in STREAM_RPCS} == {
        "/inferd.v1.Predict/PredictStream",
        "/inference.GRPCInferenceService/ModelStreamInfer",
    }


@pytest.mark.parametrize("rpc", UNARY_REQUEST_RPCS, ids=lambda r: r.path.rpartition(".")[2])
def test_fuzzed_request_gets_a_status_naming_the_callers_problem(
    rpc: Rpc, fuzz_server: ServerProcess, channel: grpc.Channel, request: pytest.FixtureRequest
):
    watch = LogWatch(fuzz_server)
    failures = []
    codes: dict[str, int] = {}
    for case in cases(rpc, case_count(rpc)):
        outcome = _call(channel, rpc, case.data)
        codes[outcome.code.name] = codes.get(outcome.code.name, 0) + 1
        problem = problem_of(rpc, case, outcome)
        if problem is not None:
            failures.append(
                f"{problem} ({outcome.code.name}: {outcome.details[:300]!r}, "
                f"{outcome.elapsed:.3f} s) for {case.describe()}"
            )
    add_summary_line(request.config, f"fuzz {rpc.path}: {dict(sorted(codes.items()))}")
    assert not failures, f"{len(failures)} bad answers from {rpc.path}:\n" + "\n".join(
        failures[:15]
    )
    assert_unharmed(fuzz_server, watch)


def _stream_answers(rpc: Rpc, answers: list[bytes]) -> list[str]:
    """What is wrong with a stream's answers, each of which must parse and say one thing."""
    problems = []
    for raw in answers:
        if rpc.path.endswith("PredictStream"):
            answer = predict_pb2.PredictStreamResponse.FromString(raw)
            which = answer.WhichOneof("result")
            if which is None:
                problems.append(f"an answer with neither response nor error: {answer}")
            elif which == "error":
                code = CODES.get(answer.error.code)
                message = answer.error.message
                if code is None or code in NEVER or code == grpc.StatusCode.OK:
                    problems.append(f"an error answer with code {answer.error.code}: {message!r}")
                elif code == grpc.StatusCode.INTERNAL and not internal_allowed(message):
                    problems.append(f"INTERNAL that is not a model's own failure: {message!r}")
                elif len(message) > MAX_MESSAGE:
                    problems.append(f"a {len(message)}-character error message")
        else:
            answer = oip.ModelStreamInferResponse.FromString(raw)
            if not answer.error_message and not answer.HasField("infer_response"):
                problems.append("an empty ModelStreamInferResponse")
            elif len(answer.error_message) > MAX_MESSAGE:
                problems.append(f"a {len(answer.error_message)}-character error_message")
    return problems


@pytest.mark.parametrize("rpc", STREAM_RPCS, ids=lambda r: r.path.rpartition("/")[2])
def test_every_fuzzed_stream_message_gets_exactly_one_answer(
    rpc: Rpc, fuzz_server: ServerProcess, channel: grpc.Channel
):
    watch = LogWatch(fuzz_server)
    everything = list(cases(rpc, STREAMS * MESSAGES_PER_STREAM))
    failures: list[str] = []
    first_failed: list[Case] = []
    for i in range(STREAMS):
        sent = everything[i * MESSAGES_PER_STREAM : (i + 1) * MESSAGES_PER_STREAM]
        problems = _one_stream(channel, rpc, sent)
        failures += [f"stream {i}: {p}" for p in problems]
        if problems and not first_failed:
            first_failed = sent
    if failures:
        shown = "\n".join(c.describe() for c in first_failed)
        pytest.fail("\n".join(failures[:20]) + f"\nthe first such stream sent:\n{shown}")
    assert_unharmed(fuzz_server, watch)


def _one_stream(channel: grpc.Channel, rpc: Rpc, sent: list[Case]) -> list[str]:
    call = channel.stream_stream(rpc.path)(
        iter([c.data for c in sent]), timeout=CALL_TIMEOUT, metadata=AUTH
    )
    try:
        answers = list(call)
    except grpc.RpcError as error:
        return [f"ended {error.code().name}: {error.details()!r}"]
    problems = _stream_answers(rpc, answers)
    if call.code() != grpc.StatusCode.OK:
        problems.append(f"ended {call.code().name}: {call.details()!r}")
    if len(answers) != len(sent):
        problems.append(f"{len(answers)} answers to {len(sent)} messages")
    return problems
