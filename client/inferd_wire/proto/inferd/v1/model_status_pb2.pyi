import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from inferd_wire.proto.inferd.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATE_UNKNOWN: _ClassVar[ModelState]
    MODEL_STATE_LOADING: _ClassVar[ModelState]
    MODEL_STATE_READY: _ClassVar[ModelState]
    MODEL_STATE_UNLOADING: _ClassVar[ModelState]
    MODEL_STATE_UNLOADED: _ClassVar[ModelState]
    MODEL_STATE_FAILED: _ClassVar[ModelState]
MODEL_STATE_UNKNOWN: ModelState
MODEL_STATE_LOADING: ModelState
MODEL_STATE_READY: ModelState
MODEL_STATE_UNLOADING: ModelState
MODEL_STATE_UNLOADED: ModelState
MODEL_STATE_FAILED: ModelState

class VersionStatistics(_message.Message):
    __slots__ = ("request_success", "request_failure", "inference_count", "execution_count", "queue_ns", "compute_ns", "batch_sizes", "stages")
    class BatchSizesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    REQUEST_SUCCESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FAILURE_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    request_success: int
    request_failure: int
    inference_count: int
    execution_count: int
    queue_ns: int
    compute_ns: int
    batch_sizes: _containers.ScalarMap[int, int]
    stages: RequestStages
    def __init__(self, request_success: _Optional[int] = ..., request_failure: _Optional[int] = ..., inference_count: _Optional[int] = ..., execution_count: _Optional[int] = ..., queue_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., batch_sizes: _Optional[_Mapping[int, int]] = ..., stages: _Optional[_Union[RequestStages, _Mapping]] = ...) -> None: ...

class RequestStages(_message.Message):
    __slots__ = ("count", "decode_ns", "queue_ns", "assemble_ns", "handoff_ns", "infer_ns", "split_ns", "encode_ns", "handler_ns")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DECODE_NS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    ASSEMBLE_NS_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_NS_FIELD_NUMBER: _ClassVar[int]
    INFER_NS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_NS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_NS_FIELD_NUMBER: _ClassVar[int]
    HANDLER_NS_FIELD_NUMBER: _ClassVar[int]
    count: int
    decode_ns: int
    queue_ns: int
    assemble_ns: int
    handoff_ns: int
    infer_ns: int
    split_ns: int
    encode_ns: int
    handler_ns: int
    def __init__(self, count: _Optional[int] = ..., decode_ns: _Optional[int] = ..., queue_ns: _Optional[int] = ..., assemble_ns: _Optional[int] = ..., handoff_ns: _Optional[int] = ..., infer_ns: _Optional[int] = ..., split_ns: _Optional[int] = ..., encode_ns: _Optional[int] = ..., handler_ns: _Optional[int] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("version", "state", "reason", "last_change", "statistics")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_CHANGE_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: ModelState
    reason: str
    last_change: _timestamp_pb2.Timestamp
    statistics: VersionStatistics
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., last_change: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., statistics: _Optional[_Union[VersionStatistics, _Mapping]] = ...) -> None: ...

class GetModelStatusRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class GetModelStatusResponse(_message.Message):
    __slots__ = ("model", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class BatchingSettings(_message.Message):
    __slots__ = ("max_batch_size", "max_queue_delay_us", "preferred_batch_sizes", "max_queue_size", "instances", "default_timeout_us")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_queue_delay_us: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_queue_size: int
    instances: int
    default_timeout_us: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_queue_delay_us: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., max_queue_size: _Optional[int] = ..., instances: _Optional[int] = ..., default_timeout_us: _Optional[int] = ...) -> None: ...

class ModelMetadata(_message.Message):
    __slots__ = ("name", "version", "versions", "platform", "inputs", "outputs", "max_batch_size", "batching", "execution_providers")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    platform: str
    inputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorMetadata]
    outputs: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorMetadata]
    max_batch_size: int
    batching: BatchingSettings
    execution_providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., platform: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[_tensor_pb2.TensorMetadata, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[_tensor_pb2.TensorMetadata, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., batching: _Optional[_Union[BatchingSettings, _Mapping]] = ..., execution_providers: _Optional[_Iterable[str]] = ...) -> None: ...

class WatchModelStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelStatusEvent(_message.Message):
    __slots__ = ("model", "version", "state", "reason", "time")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    state: ModelState
    reason: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[ModelState, str]] = ..., reason: _Optional[str] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
