"""The torch.distributed pieces under the dist KV transport (kvstore/dist_transfer.py), in one place:
a rendezvous store, two-rank process groups built directly over it, and point-to-point sends and
receives with a deadline. Groups are never built with `init_process_group`: a process holds one
group per peer process it exchanges KV with, and no global default group exists.

`ProcessGroupGloo(store, rank, size, options)`, its `_Options` and `create_device`, and
`ProcessGroupNCCL(store, rank, size, options)` with its `Options._timeout`, are the semi-private
part of torch's API used here (torch 2.11-2.13); nothing else in kvweave touches them.

NCCL (GPU memory to GPU memory, a communicator per pair) differs from gloo in what the transport
must do about it; that code path runs only where CUDA and NCCL exist, and is unverified on the
machines this project is tested on (a GPU device check has one GPU, and NCCL refuses two ranks on
one GPU):
- the communicator is created lazily, by the pair's first send and receive (the constructor does
  not wait for the peer);
- tags are ignored: sends and receives match in the order they are posted, so a pair carries one
  fetch at a time (the client serialises its fetches on a pair; the server posts a fetch's sends
  before it answers, so the order holds);
- `Work.is_completed()` can be polled, so `wait` polls it up to the deadline (NCCL's own timeout
  is the watchdog's, which takes the whole process down: it is set far beyond any fetch deadline),
  and a pair whose wait timed out is aborted (`abort`);
- the tensors live on the current CUDA device, and a wait makes the calling thread's stream wait
  for the operation; `wait` then synchronises that stream, so the data is ready for any stream.

How gloo behaves (torch 2.13, measured), and what the transport relies on:
- the constructor is the rendezvous: it returns once both ranks joined, or raises at its timeout;
- `send`/`recv` return at once with a `Work`, which must be kept until it has been waited on
  (dropping a send's Work drops the send); sends on one tag arrive in order; recvs of different
  tags are matched independently;
- `wait(timeout)` raises when the peer process's connection closes (within milliseconds of a
  kill) and at its timeout; a wait that times out breaks the pair's connection, so the peer's
  pending operations fail too;
- `abort()` and `shutdown()` wake no pending wait and close nothing: the connection closes when
  the group and every pending Work of it are gone;
- `Work.is_completed()` only turns true inside `wait`: completion cannot be polled, so every
  pending operation is waited on by a thread, with a timeout.
"""
from __future__ import annotations

import datetime
import logging
import socket
import threading
import time

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")
"""Backends a pair may name ("nccl" only where `available_backends` has it)."""
NCCL_WATCHDOG_S = 24 * 3600.0
"""NCCL's own timeout: its watchdog ends the process when an operation passes it, so it is set
far beyond any fetch deadline (`wait` enforces those, and `abort` ends a late pair)."""
_POLL_S = 0.0002
"""How often `wait` polls an NCCL operation."""
STORE_PREFIX = "kvweave/kv-pair/"
MIN_WAIT_S = 0.001
"""A wait past its deadline still gets this long (gloo reads a zero timeout as its default)."""

GroupError = RuntimeError
"""What gloo and the store raise (torch.distributed.DistError is a RuntimeError)."""


def available_backends() -> tuple[str, ...]:
    """The backends this process can build pairs with: gloo, and nccl where CUDA and NCCL exist."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return BACKENDS
    return ("gloo",)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown torch.distributed backend {backend!r} for KV transfer; valid: {', '.join(BACKENDS)}")
    if backend not in available_backends():
        raise ValueError(f"the {backend} backend needs CUDA and a torch build with NCCL; this process has "
                         f"{', '.join(available_backends())}")


def payload_device(backend: str) -> torch.device:
    """Where the tensors a group of `backend` sends and receives must live."""
    check_backend(backend)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=max(seconds, MIN_WAIT_S))


def open_store(host: str, timeout_s: float) -> dist.TCPStore:
    """A TCPStore server on a free port (`.port`) that pairs rendezvous through."""
    return dist.TCPStore(host, 0, None, True, _timedelta(timeout_s), wait_for_workers=False)


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(host, port, None, False, _timedelta(timeout_s))


_devices: dict[tuple[str, str], object] = {}
_devices_lock = threading.Lock()


def _device(backend: str, host: str):
    """One gloo transport device (a listening socket and its I/O thread) per local address, shared
    by every group of the process."""
    with _devices_lock:
        device = _devices.get((backend, host))
        if device is None:
            device = _devices[(backend, host)] = dist.ProcessGroupGloo.create_device(hostname=host)
        return device


def new_pair_group(store: dist.Store, pair_id: str, rank: int, backend: str, local_host: str,
                   timeout_s: float) -> dist.ProcessGroup:
    """The two-rank group of pair `pair_id` (rank 0: the server, 1: the client), connected over
    `local_host`'s device; blocks until the other rank joined (GroupError after `timeout_s`)."""
    check_backend(backend)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _timedelta(NCCL_WATCHDOG_S)
        return dist.ProcessGroupNCCL(dist.PrefixStore(STORE_PREFIX + pair_id, store), rank, 2, options)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [_device(backend, local_host)]
    options._timeout = _timedelta(timeout_s)
    options._threads = 1  # only point-to-point: the collective threads would idle
    return dist.ProcessGroupGloo(dist.PrefixStore(STORE_PREFIX + pair_id, store), rank, 2, options)


def send(group: dist.ProcessGroup, tensor: torch.Tensor, peer: int, tag: int):
    """Post a send of a contiguous tensor; keep the returned Work until `wait` returns."""
    return group.send([tensor], peer, tag)


def recv(group: dist.ProcessGroup, tensor: torch.Tensor, peer: int, tag: int):
    """Post a receive into a contiguous tensor of exactly the sent size; keep the Work until `wait`."""
    return group.recv([tensor], peer, tag)


def wait(work, timeout_s: float, backend: str = "gloo") -> None:
    """Block until `work` is done; GroupError when the pair failed or after `timeout_s` (which
    breaks a gloo pair's connection; an NCCL pair must then be aborted)."""
    if backend != "nccl":
        work.wait(_timedelta(timeout_s))
        return
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise GroupError(f"NCCL operation not complete within {timeout_s:.3g} s")
        time.sleep(_POLL_S)
    work.wait()  # raises the operation's error; orders this thread's stream after it
    torch.cuda.current_stream().synchronize()


def abort(group, backend: str) -> None:
    """End a pair that failed or timed out: an NCCL communicator is aborted (its pending operations
    fail); a gloo pair closes when its group and Works are gone (its abort does nothing)."""
    if backend == "nccl":
        try:
            group.abort()
        except RuntimeError as e:
            logger.info("aborting an NCCL KV pair: %s", error_text(e))


def error_text(e: BaseException) -> str:
    """The first line of a gloo or store error, without its source location."""
    text = (str(e) or type(e).__name__).strip().splitlines()[0]
    if text.startswith("[") and "] " in text:  # "[/path/to/pair.cc:553] Connection closed by peer ..."
        text = text.split("] ", 1)[1]
    return text.split(" This is typically caused by")[0]


def local_host_for(peer_host: str) -> str:
    """This machine's address on the route to `peer_host` (what the peer's device connects back to)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(peer_host, 9, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)  # UDP: picks the route, sends nothing
        return s.getsockname()[0]
