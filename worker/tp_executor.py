"""A tensor-parallel worker's ranks: the leader's `TPExecutor` and the other ranks' loop
(`follower_main`), in the shape of vLLM v1's multiprocess executor.

The leader is the worker's own process: it runs the scheduler, the KV connector and rank 0's
model runner. It starts the other `size - 1` ranks as processes (`python -m worker.tp_executor`,
their spec pickled on stdin: no re-import of the caller's main module, as multiprocessing's spawn
would do), which load the checkpoint themselves and keep their shard. Each step the leader
broadcasts one message, (the tokens it sampled at the previous step, the step's SchedulerOutput
without its KV connector metadata), and every rank runs the step; the ranks' all-reduces inside
the forward keep them in lockstep. Only the leader samples.

The KV cache. On the CPU the group shares one cache in shared memory, laid out as a single-rank
worker's: each rank writes and reads its own KV heads of it (a layer's heads are its outer
dimension, so each rank's slab is contiguous), and the leader's KV connector moves whole blocks
(all heads) through tiers and to and from peers exactly as without tensor parallelism; a block
of a TP worker is therefore usable by any worker of the model. On GPUs each rank's cache is its
own device's memory, sized to its heads; the leader's connector would then see only its own
shard, so GPU tensor parallelism runs without host tiers and peer transfers (refused at start).
The GPU path (NCCL, one GPU per rank) has not run on any machine of this project.

Failures. A rank that dies breaks the group: the leader's next broadcast or all-reduce raises
`TPGroupError`, and the worker stops (worker/async_engine.py fails its requests as retryable, the
server deregisters). Followers exit when the leader's connection closes.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from kvstore.ipc_share import SHM_DIR
from kvweave.serving import exit_now
from worker import shm_all_reduce
from worker.kv_connector import KVConnectorMetadata
from worker.scheduler_output import SchedulerOutput
from worker.tensor_parallel import install_all_reduce, new_group, rank_args, shard_weights

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 60.0
"""How long the ranks have to load the model and join the group."""
STOP_TIMEOUT_S = 10.0


class TPGroupError(RuntimeError):
    """The group broke (a rank died or stopped answering): the worker cannot go on."""


@dataclass(frozen=True)
class RankSpec:
    """What a follower needs to build its rank exactly as the leader built rank 0."""
    model: str
    dtype: torch.dtype
    load_format: str
    device: str
    max_model_len: int
    num_blocks: int
    block_size: int
    max_num_seqs: int
    size: int
    overlap_min_tokens: int | None
    num_threads: int
    allreduce_numel: int
    """The largest tensor the shared-memory all-reduce takes (a step's tokens x hidden size); 0: the
    ranks all-reduce over gloo (or NCCL)."""
    store_port: int
    allreduce_region: tuple | None = None
    """Handles of the shared-memory all-reduce's data and flags (None: gloo all-reduces)."""


def shared_tensor(shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, tuple]:
    """A zeroed tensor in a fresh shared-memory file (the group's KV cache, the all-reduce region),
    and what another process maps it with (`open_shared_tensor`). The file is the worker's own
    (mode 0600, in /dev/shm, `kvweave-tp-<random>`), not torch's file_system sharing, whose
    shared-memory manager daemon can fail to answer on a loaded machine; the leader unlinks it
    (`unlink_shared`) once every rank has mapped it, so nothing is left behind whatever exits how."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = max(numel * dtype.itemsize, 1)
    path = SHM_DIR / f"kvweave-tp-{secrets.token_hex(16)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)  # a fresh file reads as zeros
    finally:
        os.close(fd)
    handle = (str(path), nbytes, tuple(shape), dtype)
    try:
        return open_shared_tensor(handle), handle
    except BaseException:
        unlink_shared(handle)
        raise


def open_shared_tensor(handle: tuple) -> torch.Tensor:
    path, nbytes, shape, dtype = handle
    storage = torch.UntypedStorage.from_file(path, True, nbytes)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def unlink_shared(handle: tuple | None) -> None:
    """Remove a `shared_tensor`'s file (the mappings made stay valid until their owners drop them)."""
    if handle is not None:
        Path(handle[0]).unlink(missing_ok=True)


def broadcast_object(group, rank: int, obj=None):
    """`obj` from rank 0 to every rank of the group (pickled: the group is one worker's own processes)."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    if rank == 0:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        size = torch.tensor([len(data)], dtype=torch.long)
    else:
        size = torch.zeros(1, dtype=torch.long)
    group.broadcast([size], opts).wait()
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if rank == 0 else torch.empty(int(size), dtype=torch.uint8)
    group.broadcast([buf], opts).wait()
    return obj if rank == 0 else pickle.loads(buf.numpy().tobytes())


def _time_all_reduce(group, shape: tuple[int, ...], dtype: torch.dtype, iters: int, device: torch.device) -> float:
    t = torch.ones(shape, dtype=dtype, device=device)
    group.allreduce([t]).wait()
    start = time.perf_counter()
    for _ in range(iters):
        group.allreduce([t]).wait()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def build_rank_model(ckpt, args, dtype: torch.dtype, device: torch.device, rank: int, size: int):
    """Rank `rank`'s shard of a loaded checkpoint as a model (its weights sharded before loading)."""
    from worker.model import Transformer

    weights = shard_weights(ckpt.weights, args, rank, size)
    with torch.device("meta"):
        model = Transformer(rank_args(args, size), dtype)
    model.load_weights(weights, device)
    return model.eval()


class TPExecutor:
    """The leader's side: starts the followers, joins the group, and runs each step on every rank."""

    def __init__(self, spec_fields: dict, kv_cache_handle: tuple | None) -> None:
        """`spec_fields`: RankSpec's fields but `store_port`; `kv_cache_handle`: the group's shared
        cache (`shared_tensor`, CPU), None on GPUs (each rank allocates its own). Every shared file
        is unlinked once the ranks have joined (each maps its files before joining), or failed to."""
        self.size = spec_fields["size"]
        self.device = torch.device(spec_fields["device"])
        handles = [kv_cache_handle]
        try:
            self._start(spec_fields, kv_cache_handle, handles)
        finally:
            for handle in handles:
                unlink_shared(handle)
        self._sampled: dict[str, int] = {}
        self.closed = False

    def _start(self, spec_fields: dict, kv_cache_handle: tuple | None, handles: list) -> None:
        self._store = dist.TCPStore("127.0.0.1", 0, None, True, datetime.timedelta(seconds=JOIN_TIMEOUT_S),
                                    wait_for_workers=False)
        region = data = flags = None
        if spec_fields["allreduce_numel"]:
            data, data_handle = shared_tensor(shm_all_reduce.region_shape(self.size, spec_fields["allreduce_numel"]),
                                              spec_fields["dtype"])
            handles.append(data_handle)
            flags, flags_handle = shared_tensor((shm_all_reduce.flags_numel(self.size),), torch.int64)
            handles.append(flags_handle)
            region = (data_handle, flags_handle)
        spec = RankSpec(**spec_fields, store_port=self._store.port, allreduce_region=region)
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.procs = []
        for rank in range(1, self.size):
            proc = subprocess.Popen([sys.executable, "-m", "worker.tp_executor"], stdin=subprocess.PIPE, env=env)
            proc.stdin.write(pickle.dumps((spec, rank, kv_cache_handle)))
            proc.stdin.close()
            self.procs.append(proc)
        try:
            self.group = new_group(self._store, 0, self.size, self.device, timeout_s=JOIN_TIMEOUT_S)
            self.control = self.group if self.device.type == "cpu" else new_group(
                self._store, 0, self.size, torch.device("cpu"), timeout_s=JOIN_TIMEOUT_S)
            if region is not None:
                self.group = shm_all_reduce.ShmAllReduce(0, self.size, data, flags, fallback=self.control,
                                                         alive=lambda: all(p.poll() is None for p in self.procs))
        except RuntimeError as e:
            self._kill()
            raise TPGroupError(f"the tensor-parallel ranks did not join: {e}") from e

    def execute(self, runner, out: SchedulerOutput):
        """Run `out` on every rank; the leader's RunnerOutput. TPGroupError when a rank is gone."""
        if self.closed:
            raise TPGroupError("the tensor-parallel group is closed")
        try:
            broadcast_object(self.control, 0, ("step", self._sampled, dataclasses.replace(
                out, kv_connector_metadata=KVConnectorMetadata())))
            result = runner.execute(out)
        except RuntimeError as e:
            self.closed = True
            dead = [f"rank {i} (exit {p.poll()})" for i, p in enumerate(self.procs, 1) if p.poll() is not None]
            raise TPGroupError(f"tensor-parallel step failed ({', '.join(dead) or 'no rank'} exited): "
                               f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self._sampled = dict(result.sampled) if result is not None else {}
        return result

    def time_all_reduce(self, shape: tuple[int, ...], dtype: torch.dtype, iters: int) -> float:
        """Seconds one blocking sum all-reduce of a [shape] tensor takes on the group (every rank runs
        `iters` of them after one warm-up; `kvweave bench tp` compares it with the overlap)."""
        broadcast_object(self.control, 0, ("all_reduce", shape, dtype, iters))
        return _time_all_reduce(self.group, shape, dtype, iters, self.device)

    def close(self) -> None:
        """Tell the followers to exit and wait for them (killed after a timeout)."""
        if not self.closed:
            self.closed = True
            try:
                broadcast_object(self.control, 0, None)
            except RuntimeError:
                pass
        for p in self.procs:
            try:
                p.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def follower_main(spec: RankSpec, rank: int, kv_cache_handle: tuple | None) -> None:
    """A follower rank: build its shard, join the group, run every step the leader sends until it
    sends None or the group breaks."""
    kv_cache = open_shared_tensor(kv_cache_handle) if kv_cache_handle is not None else None
    region = [open_shared_tensor(h) for h in spec.allreduce_region or ()]  # mapped before joining: see TPExecutor
    leader = os.getppid()
    logging.basicConfig(level=os.environ.get("KVWEAVE_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s tp-rank{rank} %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(spec.num_threads)
    torch.set_flush_denormal(True)
    from worker.loader import load_checkpoint
    from worker.model_runner import ModelRunner, TPRank

    device = torch.device(spec.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    ckpt = load_checkpoint(spec.model, spec.dtype, spec.load_format, device)
    args = ckpt.args
    args.max_seq_len = spec.max_model_len
    model = build_rank_model(ckpt, args, spec.dtype, device, rank, spec.size)
    del ckpt
    store = dist.TCPStore("127.0.0.1", spec.store_port, None, False, datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    group = new_group(store, rank, spec.size, device, timeout_s=JOIN_TIMEOUT_S)
    control = group if device.type == "cpu" else new_group(store, rank, spec.size, torch.device("cpu"),
                                                           timeout_s=JOIN_TIMEOUT_S)
    if region:
        data, flags = region
        group = shm_all_reduce.ShmAllReduce(rank, spec.size, data, flags, fallback=control,
                                            alive=lambda: os.getppid() == leader)
    install_all_reduce(model, group)
    runner = ModelRunner(model, spec.num_blocks, spec.block_size, device, max_num_seqs=spec.max_num_seqs,
                         kv_cache=kv_cache, tp=TPRank(group, rank, spec.size, spec.overlap_min_tokens))
    try:
        with torch.inference_mode():
            while True:
                msg = broadcast_object(control, rank)
                if msg is None:
                    return
                if msg[0] == "all_reduce":
                    _time_all_reduce(group, *msg[1:], device)
                    continue
                _, sampled, out = msg
                runner.apply_sampled(sampled)
                runner.execute(out, sample=False)
    except RuntimeError as e:  # the leader is gone or a rank died: nothing left to serve
        logger.warning("tensor-parallel rank %d stops: %s", rank, str(e).splitlines()[0] if str(e) else e)


if __name__ == "__main__":
    follower_main(*pickle.loads(sys.stdin.buffer.read()))
    exit_now(0)  # its group and mappings are the leader's to end: the teardown would only add ~1.5 s to its stop
