from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SetTrafficRequest(_message.Message):
    __slots__ = ("name", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weights: _containers.ScalarMap[str, int]
    def __init__(self, name: _Optional[str] = ..., weights: _Optional[_Mapping[str, int]] = ...) -> None: ...

class PromoteRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class TrafficResponse(_message.Message):
    __slots__ = ("name", "weights", "previous", "push_seconds", "applied")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PreviousEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    PUSH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    name: str
    weights: _containers.ScalarMap[str, int]
    previous: _containers.ScalarMap[str, int]
    push_seconds: float
    applied: bool
    def __init__(self, name: _Optional[str] = ..., weights: _Optional[_Mapping[str, int]] = ..., previous: _Optional[_Mapping[str, int]] = ..., push_seconds: _Optional[float] = ..., applied: _Optional[bool] = ...) -> None: ...

class RegisterServiceRequest(_message.Message):
    __slots__ = ("name", "host", "spec_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    spec_json: str
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class UnregisterServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterServiceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services", "problems")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceStatus]
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceStatus, _Mapping]]] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...

class GetServiceRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class HibernateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WakeRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WaitRoutedRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("at", "from_state", "to_state", "reason")
    AT_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    at: float
    from_state: str
    to_state: str
    reason: str
    def __init__(self, at: _Optional[float] = ..., from_state: _Optional[str] = ..., to_state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ServiceStatus(_message.Message):
    __slots__ = ("name", "host", "state", "replicas", "desired_replicas", "recorded_replicas", "ready_endpoints", "last_call", "created_at", "updated_at", "history", "keep_alive", "next_call", "problem", "replica_problem", "source", "group", "wake_timeout", "max_held", "activation_replicas", "min_awake", "hosts", "paths", "rewrite", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DESIRED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RECORDED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    LAST_CALL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    NEXT_CALL_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    REPLICA_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    WAKE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_HELD_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MIN_AWAKE_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    PATHS_FIELD_NUMBER: _ClassVar[int]
    REWRITE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    host: str
    state: str
    replicas: int
    desired_replicas: int
    recorded_replicas: int
    ready_endpoints: _containers.RepeatedScalarFieldContainer[str]
    last_call: float
    created_at: float
    updated_at: float
    history: _containers.RepeatedCompositeFieldContainer[Transition]
    keep_alive: float
    next_call: float
    problem: str
    replica_problem: str
    source: str
    group: str
    wake_timeout: float
    max_held: int
    activation_replicas: int
    min_awake: float
    hosts: _containers.RepeatedScalarFieldContainer[str]
    paths: _containers.RepeatedScalarFieldContainer[str]
    rewrite: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionStatus]
    def __init__(self, name: _Optional[str] = ..., host: _Optional[str] = ..., state: _Optional[str] = ..., replicas: _Optional[int] = ..., desired_replicas: _Optional[int] = ..., recorded_replicas: _Optional[int] = ..., ready_endpoints: _Optional[_Iterable[str]] = ..., last_call: _Optional[float] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., history: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ..., keep_alive: _Optional[float] = ..., next_call: _Optional[float] = ..., problem: _Optional[str] = ..., replica_problem: _Optional[str] = ..., source: _Optional[str] = ..., group: _Optional[str] = ..., wake_timeout: _Optional[float] = ..., max_held: _Optional[int] = ..., activation_replicas: _Optional[int] = ..., min_awake: _Optional[float] = ..., hosts: _Optional[_Iterable[str]] = ..., paths: _Optional[_Iterable[str]] = ..., rewrite: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionStatus, _Mapping]]] = ...) -> None: ...

class VersionStatus(_message.Message):
    __slots__ = ("name", "weight", "state", "replicas", "recorded_replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    RECORDED_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: int
    state: str
    replicas: int
    recorded_replicas: int
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[int] = ..., state: _Optional[str] = ..., replicas: _Optional[int] = ..., recorded_replicas: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("since_seconds",)
    SINCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    since_seconds: float
    def __init__(self, since_seconds: _Optional[float] = ...) -> None: ...

class ServiceSavings(_message.Message):
    __slots__ = ("name", "replica_seconds_saved", "replica_seconds_idle", "cold_starts", "cold_start_seconds", "prewakes", "prewakes_wasted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SECONDS_SAVED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SECONDS_IDLE_FIELD_NUMBER: _ClassVar[int]
    COLD_STARTS_FIELD_NUMBER: _ClassVar[int]
    COLD_START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREWAKES_FIELD_NUMBER: _ClassVar[int]
    PREWAKES_WASTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    replica_seconds_saved: float
    replica_seconds_idle: float
    cold_starts: int
    cold_start_seconds: float
    prewakes: int
    prewakes_wasted: int
    def __init__(self, name: _Optional[str] = ..., replica_seconds_saved: _Optional[float] = ..., replica_seconds_idle: _Optional[float] = ..., cold_starts: _Optional[int] = ..., cold_start_seconds: _Optional[float] = ..., prewakes: _Optional[int] = ..., prewakes_wasted: _Optional[int] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("services", "total", "generated_at")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    GENERATED_AT_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceSavings]
    total: ServiceSavings
    generated_at: float
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceSavings, _Mapping]]] = ..., total: _Optional[_Union[ServiceSavings, _Mapping]] = ..., generated_at: _Optional[float] = ...) -> None: ...
