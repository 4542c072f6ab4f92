"""Protobuf <-> internal dataclasses for what the router and the worker both convert.

Protobuf stays at the process edges: the worker service and the router call these, everything
behind them sees `kvweave.sampling_params.SamplingParams` and plain strings.

Floats travel as float32 in `kvweave.v1.SamplingParams`; they are read back rounded to 7
significant digits, so 0.9 sent by a client arrives as 0.9 (not 0.8999999761581421).
"""
from __future__ import annotations

from kvweave.v1 import common_pb2
from kvweave.sampling_params import SamplingParams

FINISH_REASONS: dict[str | None, int] = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}
_FINISH_REASON_NAMES = {v: k for k, v in FINISH_REASONS.items()}


def _f32(value: float) -> float:
    return float(f"{value:.7g}")


def sampling_from_proto(msg: common_pb2.SamplingParams | None) -> SamplingParams:
    """The engine's SamplingParams; unset optional fields take the dataclass defaults.

    Raises InvalidRequestError (a ValueError) naming the first invalid field.
    """
    fields: dict = {}
    if msg is None:
        return SamplingParams()
    for name in ("max_tokens", "top_k", "seed", "logprobs"):
        if msg.HasField(name):
            fields[name] = int(getattr(msg, name))
    for name in ("temperature", "top_p"):
        if msg.HasField(name):
            fields[name] = _f32(getattr(msg, name))
    return SamplingParams(stop=list(msg.stop), stop_token_ids=[int(t) for t in msg.stop_token_ids],
                          ignore_eos=msg.ignore_eos, min_tokens=int(msg.min_tokens), **fields)


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """Every field set explicitly, so the receiver's defaults never apply."""
    msg = common_pb2.SamplingParams(
        max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, stop=params.stop, stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos, min_tokens=params.min_tokens)
    if params.seed is not None:
        msg.seed = params.seed
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def finish_reason_to_proto(reason: str | None) -> int:
    """"stop" / "length" / "abort" / None -> the FinishReason enum value."""
    return FINISH_REASONS[reason]


def finish_reason_from_proto(value: int) -> str | None:
    """The FinishReason enum value -> "stop" / "length" / "abort" / None (unspecified)."""
    return _FINISH_REASON_NAMES.get(value)


def stop_reason_to_proto(reason: int | str | None) -> str:
    """A stop string as is, a stop token id as its decimal string, none as ""."""
    return "" if reason is None else str(reason)
