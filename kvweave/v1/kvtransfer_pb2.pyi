from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IpcFetchRequest(_message.Message):
    __slots__ = ("fetch", "node_id", "device", "lease_ms")
    FETCH_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    fetch: FetchRequest
    node_id: str
    device: str
    lease_ms: int
    def __init__(self, fetch: _Optional[_Union[FetchRequest, _Mapping]] = ..., node_id: _Optional[str] = ..., device: _Optional[str] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class IpcHandle(_message.Message):
    __slots__ = ("host", "cuda", "storage_bytes", "offset")
    class Host(_message.Message):
        __slots__ = ("storage_handle",)
        STORAGE_HANDLE_FIELD_NUMBER: _ClassVar[int]
        storage_handle: bytes
        def __init__(self, storage_handle: _Optional[bytes] = ...) -> None: ...
    class Cuda(_message.Message):
        __slots__ = ("device_uuid", "mem_handle", "storage_offset_bytes", "ref_counter_handle", "ref_counter_offset", "event_handle", "event_sync_required")
        DEVICE_UUID_FIELD_NUMBER: _ClassVar[int]
        MEM_HANDLE_FIELD_NUMBER: _ClassVar[int]
        STORAGE_OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
        REF_COUNTER_HANDLE_FIELD_NUMBER: _ClassVar[int]
        REF_COUNTER_OFFSET_FIELD_NUMBER: _ClassVar[int]
        EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
        EVENT_SYNC_REQUIRED_FIELD_NUMBER: _ClassVar[int]
        device_uuid: str
        mem_handle: bytes
        storage_offset_bytes: int
        ref_counter_handle: bytes
        ref_counter_offset: int
        event_handle: bytes
        event_sync_required: bool
        def __init__(self, device_uuid: _Optional[str] = ..., mem_handle: _Optional[bytes] = ..., storage_offset_bytes: _Optional[int] = ..., ref_counter_handle: _Optional[bytes] = ..., ref_counter_offset: _Optional[int] = ..., event_handle: _Optional[bytes] = ..., event_sync_required: _Optional[bool] = ...) -> None: ...
    HOST_FIELD_NUMBER: _ClassVar[int]
    CUDA_FIELD_NUMBER: _ClassVar[int]
    STORAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    host: IpcHandle.Host
    cuda: IpcHandle.Cuda
    storage_bytes: int
    offset: int
    def __init__(self, host: _Optional[_Union[IpcHandle.Host, _Mapping]] = ..., cuda: _Optional[_Union[IpcHandle.Cuda, _Mapping]] = ..., storage_bytes: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class IpcFetchResponse(_message.Message):
    __slots__ = ("num_entries", "layout", "handle", "lease_id")
    NUM_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    num_entries: int
    layout: KVLayoutProto
    handle: IpcHandle
    lease_id: str
    def __init__(self, num_entries: _Optional[int] = ..., layout: _Optional[_Union[KVLayoutProto, _Mapping]] = ..., handle: _Optional[_Union[IpcHandle, _Mapping]] = ..., lease_id: _Optional[str] = ...) -> None: ...

class IpcReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class IpcReleaseResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DistConnectRequest(_message.Message):
    __slots__ = ("backend", "connect_timeout_ms")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    CONNECT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    connect_timeout_ms: int
    def __init__(self, backend: _Optional[str] = ..., connect_timeout_ms: _Optional[int] = ...) -> None: ...

class DistConnectResponse(_message.Message):
    __slots__ = ("store_host", "store_port", "pair_id")
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    store_host: str
    store_port: int
    pair_id: str
    def __init__(self, store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., pair_id: _Optional[str] = ...) -> None: ...

class DistFetchRequest(_message.Message):
    __slots__ = ("pair_id", "tag", "fetch")
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    pair_id: str
    tag: int
    fetch: FetchRequest
    def __init__(self, pair_id: _Optional[str] = ..., tag: _Optional[int] = ..., fetch: _Optional[_Union[FetchRequest, _Mapping]] = ...) -> None: ...

class DistFetchResponse(_message.Message):
    __slots__ = ("num_entries", "layout", "layer_checksums")
    NUM_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYER_CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    num_entries: int
    layout: KVLayoutProto
    layer_checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, num_entries: _Optional[int] = ..., layout: _Optional[_Union[KVLayoutProto, _Mapping]] = ..., layer_checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("handoff_id",)
    HANDOFF_ID_FIELD_NUMBER: _ClassVar[int]
    handoff_id: str
    def __init__(self, handoff_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DataPortRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DataPortResponse(_message.Message):
    __slots__ = ("port",)
    PORT_FIELD_NUMBER: _ClassVar[int]
    port: int
    def __init__(self, port: _Optional[int] = ...) -> None: ...

class KVLayoutProto(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("keys", "layout", "max_chunk_bytes")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    layout: KVLayoutProto
    max_chunk_bytes: int
    def __init__(self, keys: _Optional[_Iterable[bytes]] = ..., layout: _Optional[_Union[KVLayoutProto, _Mapping]] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class FetchHeader(_message.Message):
    __slots__ = ("num_entries", "layout")
    NUM_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    num_entries: int
    layout: KVLayoutProto
    def __init__(self, num_entries: _Optional[int] = ..., layout: _Optional[_Union[KVLayoutProto, _Mapping]] = ...) -> None: ...

class LayerChunk(_message.Message):
    __slots__ = ("layer", "offset", "data", "checksum")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    layer: int
    offset: int
    data: bytes
    checksum: int
    def __init__(self, layer: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: FetchHeader
    chunk: LayerChunk
    def __init__(self, header: _Optional[_Union[FetchHeader, _Mapping]] = ..., chunk: _Optional[_Union[LayerChunk, _Mapping]] = ...) -> None: ...
