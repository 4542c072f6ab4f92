"""The torch.distributed pieces under the dist KV transport (kvstore/dist_transfer.py), in one place:
a rendezvous store, two-rank process groups built directly over it, and point-to-point sends and
receives with a deadline. Groups are never built with `init_process_group`: a process holds one
group per peer process it exchanges KV with, and no global default group exists.

`ProcessGroupGloo(store, rank, size, options)`, its `_Options` and `create_device` are the
semi-private part of torch's API used here (torch 2.13); nothing else in kvweave touches them. A
GPU backend (NCCL) is a new entry of `BACKENDS` and a branch of `new_pair_group`.

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
import socket
import threading

import torch
import torch.distributed as dist

BACKENDS = ("gloo",)
"""Backends a pair can use (a GPU build adds "nccl")."""
STORE_PREFIX = "kvweave/kv-pair/"
MIN_WAIT_S = 0.001
"""A wait past its deadline still gets this long (gloo reads a zero timeout as its default)."""

GroupError = RuntimeError
"""What gloo and the store raise (torch.distributed.DistError is a RuntimeError)."""


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown torch.distributed backend {backend!r} for KV transfer; valid: {', '.join(BACKENDS)}")


def payload_device(backend: str) -> torch.device:
    """Where the tensors a group of `backend` sends and receives must live."""
    check_backend(backend)
    return torch.device("cpu")


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


def wait(work, timeout_s: float) -> None:
    """Block until `work` is done; GroupError when the pair failed or after `timeout_s` (which
    breaks the pair's connection)."""
    work.wait(_timedelta(timeout_s))


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
