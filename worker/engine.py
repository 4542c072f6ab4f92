"""The in-process engine: step() = schedule -> run -> postprocess (as in nano-vllm).

One step: apply what the KV connector finished since the last step, schedule (plain data, with
the connector's jobs), start the connector's jobs (off this thread), run the model, apply the
results, and end the requests that are done (one place: `_postprocess` with output.check_stop).
`LLMEngine` is synchronous and single-threaded; `AsyncEngine` (worker/async_engine.py) runs it
in a background thread and streams outputs to asyncio callers. The engine runs on any torch
device (`EngineConfig.device`); nothing here assumes the CPU.
"""
from __future__ import annotations

import itertools
import logging
import os
import platform
import time
from collections.abc import Sequence
import torch

from kvstore.keys import embedding_key, encode_extra_keys
from kvstore.manager import TierManager
from kvstore.tier import TierConfigError
from kvweave.cluster_secret import hash_salt
from kvweave.cpu_affinity import bind_process, parse_cores
from kvweave.errors import InvalidRequestError
from kvweave.limits import check_prompt_size
from kvweave.sampling_params import SamplingParams
from kvweave.tokenizer import InvalidMessagesError, TokenizerError
from kvweave.vision_prompt import PLACEHOLDER_RANGE, encode_chat_with_images, has_image_parts, message_images
from worker.block_manager import BlockManager
from worker.chunk_blend import ChunkBlender
from worker.config import ConfigError, StoreConfigError
from worker.engine_config import TP_OVERLAP_MIN_TOKENS, EngineConfig, resolve_device, resolve_dtype
from worker.kv_connector import KVConnector
from worker.kv_connector_worker import KVConnectorWorker, StagedKV, block_layout, stage_local_chunks
from worker.kv_handoff import Handoff, HandoffTable
from worker.loader import load_checkpoint
from worker.attention import kv_cache_shape
from worker.model import Transformer, rope_inv_freq
from worker.model_runner import ModelRunner, RunnerOutput, TPRank
from worker.multimodal import build_image_encoder
from worker.output import OutputProcessor, RequestOutput, check_stop
from worker.request import Request, RequestStatus
from worker.scheduler import Scheduler, SchedulerConfig
from worker.scheduler_output import SchedulerOutput
from worker.step_profile import StepProfile
from worker import shm_all_reduce
from worker.tensor_parallel import TPConfigError, check_tp, install_all_reduce
from worker.tp_executor import TPExecutor, build_rank_model, shared_tensor

logger = logging.getLogger(__name__)

__all__ = ["EngineConfig", "LLMEngine", "Prompt", "resolve_device", "resolve_dtype"]

Prompt = str | list[int] | dict
MIN_PREFILL_TO_MEASURE = 32
"""Steps with at least this many prefill tokens measure the per-token cost of computing KV."""
IDLE_WAIT_S = 0.01
"""With nothing to run but KV in flight, a step waits this long at most for a job to finish."""


def attention_cost_len(args) -> int:
    """Context length at which one token's attention FLOPs match its projection and MLP FLOPs,
    doubled because attention runs at about half the GEMM rate here (measured: ~140 vs ~300
    GFLOP/s in bf16 on this CPU). SmolLM2-135M: ~1.5k tokens."""
    hd, q, kv = args.head_dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    per_token = args.dim * (q + 2 * kv) + q * args.dim + 3 * args.dim * args.hidden_dim
    per_context_token = 2 * args.n_heads * hd
    return max(1, per_token // (2 * per_context_token))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_flush_denormal(True)  # denormals made this model's CPU forward up to 20x slower
        if config.cpu_cores:
            cores = parse_cores(config.cpu_cores)
            bind_process(cores)
            torch.set_num_threads(config.num_threads or len(cores))
        elif config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        ckpt = load_checkpoint(config.model, self.dtype, config.load_format, self.device)
        self.args, self.tokenizer = ckpt.args, ckpt.tokenizer
        self.images = None
        """The vision tower and image preprocessing of a vision-language model (None: text only)."""
        if ckpt.vision is not None:
            if config.tensor_parallel_size > 1:
                raise ConfigError("vision-language models are not served with tensor parallelism yet")
            self.images = build_image_encoder(ckpt.vision, self.dtype, self.device)
        num_blocks = config.num_blocks or self._blocks_for(config.kv_cache_gb)
        # A request must fit in the KV cache on its own, or it could never be scheduled.
        self.max_model_len = min(config.max_model_len or self.args.max_seq_len, self.args.max_seq_len,
                                 num_blocks * config.block_size)
        self.args.max_seq_len = self.max_model_len
        bs = config.block_size
        self.tp: TPExecutor | None = None
        """The other ranks of a tensor-parallel worker (None: one rank)."""
        kv_cache = tp_rank = None
        if config.tensor_parallel_size > 1:
            kv_cache, tp_rank = self._start_tp(ckpt, num_blocks)
            self.model = build_rank_model(ckpt, self.args, self.dtype, self.device, 0, config.tensor_parallel_size)
            install_all_reduce(self.model, self.tp.group)
        else:
            with torch.device("meta"):  # no host copy of random weights: the checkpoint's go straight in
                self.model = Transformer(self.args, self.dtype)
            self.model.load_weights(ckpt.weights, self.device)
            self.model.eval()
        del ckpt
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        cost_len = config.attention_cost_len
        if cost_len is None:
            cost_len = attention_cost_len(self.args)
        sched_cfg = SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                    config.enable_chunked_prefill, self.max_model_len, cost_len, self.args.n_layers,
                                    config.long_prefill_token_threshold, config.max_long_partial_prefills,
                                    config.long_prefill_chunk_tokens, config.prioritize_short_prefills)
        self.eos_token_ids = frozenset(self.args.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.profile = StepProfile()
        """Where the steps' time goes, by phase (worker/step_profile.py)."""
        self.runner = ModelRunner(self.model, num_blocks, bs, self.device, self.profile, config.max_num_seqs,
                                  kv_cache=kv_cache, tp=tp_rank)
        self.runner.get_mm_inputs = self._mm_inputs
        self.store = None
        if config.store_config.enabled:
            try:
                self.store = TierManager(block_layout(self.runner.kv_cache, bs), config.store_config)
            except TierConfigError as e:
                raise StoreConfigError(str(e)) from e
        contains = self.store.contains if self.store is not None else None
        sched_connector = KVConnector(self.block_manager, contains, cost_len)
        self.connector = KVConnectorWorker(self.block_manager, self.runner.kv_cache, self.store,
                                           rope_inv_freq(self.args), sched_connector.stats)
        """The KV connector's worker role (moves KV); the scheduler holds its scheduler role."""
        self.blender = ChunkBlender(bs, config.chunk_recompute_ratio, config.chunk_correction,
                                    config.chunk_cache_mode, contains, config.chunk_selection)
        self.scheduler = Scheduler(sched_cfg, self.block_manager, sched_connector, self.blender)
        self.handoffs = HandoffTable(self.block_manager, config.handoff_ttl_s)
        """Prompts prefilled here and held for decode workers."""
        self.connector.handoff_block = self.handoffs.block_id
        self.outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._announce: list[RequestOutput] = []
        """Early handles of prefill-only requests just submitted, returned by the next step."""
        self.model_name = self.args.name
        logger.info("engine ready: model=%s device=%s dtype=%s blocks=%d", self.model_name, self.device,
                    self.dtype, num_blocks)

    def _start_tp(self, ckpt, num_blocks: int) -> tuple[torch.Tensor | None, TPRank]:
        """Start the other ranks (they load the checkpoint themselves) and join the group: (the
        group's shared KV cache on the CPU, else None; rank 0's place in the group)."""
        config, size, a = self.config, self.config.tensor_parallel_size, self.args
        try:
            check_tp(a, size)
        except TPConfigError as e:
            raise ConfigError(str(e)) from e
        if self.device.type == "cuda" and config.store_config.enabled:
            raise ConfigError("host KV tiers with tensor parallelism on GPUs are not built: each rank's KV is "
                              "on its own GPU and the KV connector moves only the leader's")
        shm = config.tp_allreduce != "gloo" and shm_all_reduce.available(self.device)
        if config.tp_allreduce == "shm" and not shm:
            raise ConfigError(f"tp_allreduce shm needs CPU ranks on x86; this is {self.device} on {platform.machine()}")
        threads = config.num_threads or max(1, (os.cpu_count() or 1) // size)
        torch.set_num_threads(threads)
        kind = "nccl" if self.device.type == "cuda" else "shm" if shm else "gloo"
        min_tokens = config.tp_overlap_min_tokens or TP_OVERLAP_MIN_TOKENS[kind]
        if not config.tp_overlap:
            min_tokens = None
        kv_cache = handle = None
        if self.device.type == "cpu":  # one cache in shared memory, each rank on its own heads of it
            shape = kv_cache_shape(a.n_layers, num_blocks, config.block_size, a.n_kv_heads, a.head_dim)
            kv_cache, handle = shared_tensor(shape, self.dtype)
        self.tp = TPExecutor(dict(model=config.model, dtype=self.dtype, load_format=config.load_format,
                                  device=str(self.device), max_model_len=self.max_model_len, num_blocks=num_blocks,
                                  block_size=config.block_size, max_num_seqs=config.max_num_seqs, size=size,
                                  overlap_min_tokens=min_tokens, num_threads=threads,
                                  allreduce_numel=config.max_num_batched_tokens * a.dim if shm else 0), handle)
        return kv_cache, TPRank(self.tp.group, 0, size, min_tokens)

    def _blocks_for(self, gb: float) -> int:
        a = self.args
        per_block = 2 * a.n_layers * self.config.block_size * a.n_kv_heads * a.head_dim * self.dtype.itemsize
        return max(1, int(gb * 2**30 // per_block))

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt given as text, token ids, or {"messages": [...]} / {"prompt": str}.
        Text is bounded before it is tokenized (kvweave/limits.py); special-token text in chat
        message content is tokenized as text, in a text prompt as the special tokens it spells."""
        if isinstance(prompt, dict):
            if "messages" in prompt:
                check_prompt_size(self.max_model_len, messages=prompt["messages"])
                try:
                    return self.tokenizer.encode_chat(prompt["messages"])
                except (InvalidMessagesError, TokenizerError) as e:
                    raise InvalidRequestError(str(e), getattr(e, "param", None)) from e
            if "prompt" in prompt:
                return self.encode_prompt(prompt["prompt"])
            if "prompt_token_ids" in prompt:
                return self.encode_prompt(prompt["prompt_token_ids"])
            raise InvalidRequestError("a prompt object needs 'prompt', 'messages' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            check_prompt_size(self.max_model_len, prompt)
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise InvalidRequestError(f"prompt must be a string, a list of token ids or messages, got {type(prompt).__name__}")

    def _mm_inputs(self, req_id: str):
        req = self.scheduler.requests.get(req_id)
        return req.mm_inputs if req is not None else None

    def encode_prompt_images(self, prompt: Prompt, images: Sequence[bytes] = ()) -> tuple[list[int], list]:
        """(token ids, images) of a prompt: chat messages may hold `image_url` parts (base64 data
        URLs, kvweave/vision_prompt.py); token ids come with the images their placeholders name."""
        messages = prompt.get("messages") if isinstance(prompt, dict) else None
        if not has_image_parts(messages):
            return self.encode_prompt(prompt), list(images)
        if self.images is None:
            raise InvalidRequestError(f"model {self.args.name} does not take images (it is a text-only model)")
        if images:
            raise InvalidRequestError("give images either in the messages or beside the prompt, not both")
        check_prompt_size(self.max_model_len, messages=messages)
        messages, found = message_images(messages, self.images.limits)
        return encode_chat_with_images(self.tokenizer, self.images.spec, messages, found), found

    def validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(f"prompt has {len(token_ids)} tokens, but the context length is "
                                      f"{self.max_model_len} (at least one token must be generated)")
        vocab = self.args.vocab_size if self.images is None else self.args.vocab_size + PLACEHOLDER_RANGE
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")

    def validate_chunk_spans(self, spans: Sequence[tuple[int, int]], num_tokens: int) -> list[tuple[int, int]]:
        """Reusable chunks as (start, length) token spans of the prompt: sorted, disjoint, non-empty,
        inside the prompt, at most `max_chunks_per_request` of them."""
        out = [(int(a), int(n)) for a, n in spans]
        limit = self.config.max_chunks_per_request
        if len(out) > limit:
            raise InvalidRequestError(f"the request has {len(out)} reusable chunks; at most {limit} are allowed")
        end = 0
        for i, (start, n) in enumerate(out):
            if n <= 0:
                raise InvalidRequestError(f"reusable chunk {i} is empty")
            if start < end:
                raise InvalidRequestError(f"reusable chunk {i} starts at token {start}, before the end of the "
                                          f"previous one ({end}): chunks must be sorted and disjoint")
            if start + n > num_tokens:
                raise InvalidRequestError(f"reusable chunk {i} ends at token {start + n}, past the end of the "
                                          f"{num_tokens}-token prompt")
            end = start + n
        return out

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, req_id: str | None = None,
                    cache_namespace: str = "", chunk_spans: Sequence[tuple[int, int]] = (),
                    images: Sequence[bytes] = ()) -> str:
        """Validate and queue a request; raises InvalidRequestError naming the problem."""
        return self.submit(self.make_request(prompt, params, req_id, cache_namespace, chunk_spans, images=images))

    def make_request(self, prompt: Prompt, params: SamplingParams | None = None, req_id: str | None = None,
                     cache_namespace: str = "", chunk_spans: Sequence[tuple[int, int]] = (),
                     prompt_logits: int = 0, prefill_only: bool = False, handoff: Handoff | None = None,
                     images: Sequence[bytes] = (), embedding_holders: Sequence[tuple[str, str]] = ()) -> Request:
        """Tokenize and validate a request without touching engine state (safe from any thread).
        `chunk_spans`: (start, length) token spans of the prompt that are reusable chunks;
        `prompt_logits`: also return the logits of the prompt's last positions (final output);
        `prefill_only`: hand the KV off after the first token (worker/kv_handoff.py); `handoff`:
        continue a request prefilled elsewhere from its first token; `images`: the encoded images
        whose placeholders the token ids hold (a chat prompt may carry them in its messages instead),
        checked against them here; their embeddings are staged before `submit`
        (worker/embedding_stage.py), else encoded there; `embedding_holders`: none, or per image
        (worker id, address) of a worker that holds its embedding ("" when none is known)."""
        params = params or SamplingParams()
        params.validate()
        token_ids, images = self.encode_prompt_images(prompt, images)
        self.validate_prompt(token_ids)
        if images and self.images is None:
            raise InvalidRequestError(f"model {self.args.name} does not take images (it is a text-only model)")
        pending = self.images.check(token_ids, images) if self.images is not None else None
        if embedding_holders and len(embedding_holders) != len(images):
            raise InvalidRequestError(f"{len(embedding_holders)} embedding holders for {len(images)} image(s): give "
                                      "one per image, or none")
        spans = self.validate_chunk_spans(chunk_spans, len(token_ids))
        if pending is not None and spans:  # a chunk-cache is computed from token ids alone
            raise InvalidRequestError("reusable chunks cannot be combined with images in one request (yet)")
        req_id = req_id if req_id is not None else f"req-{next(self._ids)}"
        extra = self.cache_extra(cache_namespace)
        if not 0 <= prompt_logits <= len(token_ids):
            raise InvalidRequestError(f"prompt_logits must be in [0, {len(token_ids)}], got {prompt_logits}")
        if (prefill_only or handoff is not None) and prompt_logits:
            raise InvalidRequestError("prompt logits cannot be asked of a disaggregated request")
        req = Request(req_id, token_ids, params, cache_extra=extra, arrival_time=time.monotonic(),
                      chunk_spans=spans, num_prompt_logits=prompt_logits, prefill_only=prefill_only, images=pending,
                      embedding_holders=list(embedding_holders))
        if handoff is not None:
            if prefill_only:
                raise InvalidRequestError("a request cannot be both prefill-only and continued from a handoff")
            self._check_handoff(handoff, req)
            req.handoff = handoff
            req.append_output_token(handoff.first_token_id)
        return req

    def _check_handoff(self, handoff: Handoff, req: Request) -> None:
        problem = handoff.check(req.num_prompt_tokens, self.config.block_size)
        if problem is None and not 0 <= handoff.first_token_id < self.args.vocab_size:
            problem = f"the handoff's first token {handoff.first_token_id} is not in [0, {self.args.vocab_size})"
        if problem is None and req.params.max_tokens < 2:
            problem = "a handoff continues a request with max_tokens >= 2 (its first token is already generated)"
        if problem is None and req.num_prompt_tokens + 1 >= self.max_model_len:
            problem = f"the prompt and its first token fill the context length {self.max_model_len}"
        if problem is None and req.params.seed is not None and handoff.sampler_state:
            try:
                torch.Generator(self.device).set_state(
                    torch.frombuffer(bytearray(handoff.sampler_state), dtype=torch.uint8))
            except (RuntimeError, ValueError):  # torch's message names sizes and layouts: not for the client
                problem = "the handoff's sampler state is not a generator state of this device"
        if problem is not None:
            raise InvalidRequestError(f"bad KV handoff: {problem}")

    def submit(self, req: Request, staged: StagedKV | None = None) -> str:
        """Queue a request built by `make_request`, with the KV staged for it before admission
        (worker/kv_prefetch.py; without it, the local host tiers' chunk-caches are looked up here)."""
        if req.req_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {req.req_id!r} is already in use")
        staged = staged or StagedKV()
        if req.images is not None and req.mm_inputs is None:  # nothing staged them (a direct caller)
            self.embed_images(req)
        if req.chunk_spans and not req.kv.chunks_looked_up:
            stage_local_chunks(self.store, req, staged, self.config.block_size)
        req.kv.staged_blocks = {h: source for h, (_, source) in staged.blocks.items()}
        req.kv.staged_chunks = set(staged.chunks)
        self.connector.stage(req.req_id, staged)
        if req.prefill_only:  # announced at once: a decode worker pulls its blocks as they are computed
            self._announce.append(RequestOutput(req.req_id, req.prompt_token_ids,
                                                handoff=self.handoffs.open(req.req_id, req.num_prompt_tokens)))
        self.outputs.add_request(req)
        if req.handoff is not None:  # the first token came with the handoff: it leads the first output
            self.outputs.process_token(req, req.handoff.first_logprob)
        self.scheduler.add_request(req)
        return req.req_id

    def cache_extra(self, cache_namespace: str) -> bytes:
        """The extra keys of this worker's KV (and embedding) hashes in a namespace."""
        return encode_extra_keys((self.model_name, cache_namespace), hash_salt())

    def embed_images(self, req: Request) -> None:
        """Encode a request's images here (no embedding stage ran for it)."""
        req.mm_inputs = req.images.assemble([self.images.encode(img, embedding_key(img.hash, req.cache_extra))
                                             for img in req.images.images])
        req.image_sources = {"encoded": len(req.images.images)}

    def abort_request(self, req_id: str) -> RequestOutput | None:
        req = self.scheduler.finish(req_id, RequestStatus.FINISHED_ABORTED)
        self.handoffs.cancel(req_id)
        if req is None or req.internal:
            return None
        return self.outputs.take_output(req)

    def release_handoff(self, handoff_id: str) -> bool:
        """A decode worker has a handoff's KV: free its blocks (False: unknown, released or expired)."""
        return self.handoffs.release(handoff_id)

    def expire_handoffs(self) -> int:
        """Free the blocks of handoffs past their TTL; returns how many."""
        return self.handoffs.expire()

    def take_kv_events(self) -> list:
        """KV events of every tier since the last take (device, then host tiers)."""
        return self.block_manager.take_events() + self.connector.take_events()

    def close(self) -> None:
        """Finish the connector's jobs, release the host tiers (the SSD tier's file) and stop the
        other tensor-parallel ranks."""
        self.connector.close()
        if self.store is not None:
            self.store.close()
        if self.tp is not None:
            self.tp.close()

    def _execute(self, sched_out: SchedulerOutput) -> RunnerOutput:
        """The step on this runner, and on every other rank of a tensor-parallel worker (TPGroupError
        when one is gone: the worker cannot go on)."""
        if self.tp is not None:
            return self.tp.execute(self.runner, sched_out)
        return self.runner.execute(sched_out)

    def has_unfinished(self) -> bool:
        """Requests in flight, or KV jobs (loads, write-through saves) not yet finished."""
        return self.scheduler.has_unfinished() or self.scheduler.connector.has_pending

    def step(self) -> list[RequestOutput]:
        outputs, self._announce = self._announce, []
        t_sched = time.perf_counter()
        self.scheduler.update_from_connector_output(self.connector.get_finished())
        sched_out = self.scheduler.schedule()
        self.connector.start_load_kv(sched_out.kv_connector_metadata)
        if not sched_out.num_scheduled_tokens:
            self._execute(sched_out)  # applies finished and preempted requests
            self.connector.wait(IDLE_WAIT_S)  # only KV in flight: wait for it, briefly
            self._handoff_progress()
            return outputs
        t0 = time.perf_counter()
        num_prefill = sum(n for n in sched_out.num_scheduled_tokens.values() if n > 1)
        self.profile.begin("mixed" if num_prefill or sched_out.blend_pieces else "decode", t0 - t_sched)
        result = self._execute(sched_out)
        if num_prefill >= MIN_PREFILL_TO_MEASURE:
            self.connector.record_cost("recompute", time.perf_counter() - t0, num_prefill)
        with self.profile.phase("update"):
            return self._process_result(sched_out, result, outputs)

    def _process_result(self, sched_out: SchedulerOutput, result: RunnerOutput, outputs: list[RequestOutput]
                        ) -> list[RequestOutput]:
        """Apply a step's sampled tokens to the scheduler and the outputs; the step's outputs."""
        for req_id, (positions, logits) in result.prompt_logits.items():
            self.outputs.add_prompt_logits(req_id, positions, logits)
        for req in self.scheduler.update_from_output(sched_out, result.sampled, result.blend_scores):
            try:
                out = self._postprocess(req, result.logprobs.get(req.req_id))
            except Exception:  # this request's output processing: it fails alone
                logger.exception("processing the output of request %s failed", req.req_id)
                out = self._fail(req.req_id, "processing its output failed", req)
            if out is not None:
                outputs.append(out)
        for req_id, why in result.failed.items():
            out = self._fail(req_id, why)
            if out is not None:
                outputs.append(out)
        self._handoff_progress()
        return outputs

    def _fail(self, req_id: str, why: str, req: Request | None = None) -> RequestOutput | None:
        """End one request with finish reason "error" (the rest of the batch goes on); its last output."""
        logger.warning("request %s failed: %s", req_id, why)
        req = self.scheduler.requests.get(req_id) or req
        if req is None:
            return None
        req.error = why
        status = RequestStatus.FINISHED_ABORTED if req.internal else RequestStatus.FINISHED_ERROR
        if self.scheduler.finish(req_id, status) is None:
            req.status = status  # finished already, but its output failed
        self.handoffs.cancel(req_id)
        if req.internal:
            return None
        try:
            return self.outputs.take_output(req)
        except Exception:  # the output state itself is what failed: end the stream with the error alone
            self.outputs.states.pop(req_id, None)
            self.outputs.outputs.pop(req_id, None)
            return RequestOutput(req_id, req.prompt_token_ids, list(req.output_token_ids), finished=True,
                                 finish_reason="error", error=why)

    def _handoff_progress(self) -> None:
        """The keys of open handoffs name the blocks computed so far (none of a request gone)."""
        bs = self.config.block_size
        for req_id in self.handoffs.open_requests():
            req = self.scheduler.requests.get(req_id)
            if req is None:
                self.handoffs.cancel(req_id)
            else:
                self.handoffs.progress(req_id, self.block_manager.get_block_table(req_id),
                                       req.num_computed_tokens // bs)

    def _postprocess(self, req: Request, logprob) -> RequestOutput | None:
        """Detokenize the request's new token and end the request if it is done (the one place)."""
        stop_string = None if req.internal else self.outputs.process_token(req, logprob)
        status = check_stop(req, self.eos_token_ids, self.max_model_len, stop_string)
        if status is None and req.prefill_only:
            req.handoff = self._hand_off(req, logprob)
            status = RequestStatus.FINISHED_HANDOFF
        if status is not None:
            self.scheduler.finish(req.req_id, status)
        return None if req.internal else self.outputs.take_output(req)

    def _hand_off(self, req: Request, logprob) -> Handoff:
        """Hold a prefill-only request's KV for a decode worker, with its first token and sampler."""
        generator = self.runner.generators.get(req.req_id)
        state = generator.get_state().cpu().numpy().tobytes() if generator is not None else b""
        return self.handoffs.hold(req.req_id, self.block_manager.get_block_table(req.req_id), req.num_prompt_tokens,
                                  req.output_token_ids[-1], logprob, state)

    def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run a batch to completion (KV saves included); results in input order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    final[out.req_id] = out
        return [final[i] for i in ids]

