"""The GPU device check (run by scripts/device-check.sh on a lent GPU; `--smoke` on the CPU in CI).

Random weights of the default model's shapes (SmolLM2-135M) and of an 8B shape (Llama-3-8B's
layers; the vocabulary is the tokenizer's at hand, 49,152), no checkpoint download: the device
has no network and the default model's package does not travel. Each check reports in
BENCHMARKS.md's format; a check that fails or cannot run here is reported with its reason, and the
others still run. Checks:

- `triton_decode_vs_torch`: the Triton paged decode kernel against the torch gather + SDPA path
  (time per layer, and the largest difference from an fp32 reference).
- `greedy_match_vs_hf`: greedy outputs of kvweave (fp32) equal to transformers'
  `LlamaForCausalLM` on the same random weights, N prompts x 64 tokens; `bf16_logits_vs_hf_fp32`:
  the bf16 engine's last-prompt-position logits against the fp32 reference.
- `decode_roofline`: 8B-shaped, batch 1: bytes a decode step reads (weights + KV) over its time,
  against the device-to-device copy bandwidth measured here (target >= 0.7).
- `cuda_graphs_decode`: a decode step with CUDA graphs against eager, default shape, batches 1-16
  (target >= 2x).
- `throughput_vs_hf_gpu`: 64 requests, 512 in / 128 out, against transformers' `generate` (>= 3x).
- `tier_offload`: 256 device blocks offloaded to the DRAM tier (the path the engine uses) against a
  pinned cudaMemcpy of the same bytes (target >= 0.7).
- `onboard_overlap`: decode steps of a 16-request batch while the DRAM tier loads 256 blocks into
  the device cache again and again (the path a request's onboarding takes: TierManager.load_many
  into device block views, on the tier's copy stream, from the connector's thread), against the
  same steps with nothing loading (target: at most 1.1x, i.e. ratio >= 0.91).
- `ipc_handoff`: a prefill worker's handoff moved to another process of the same GPU over the ipc
  transport (kvstore/ipc_transfer.py: CUDA IPC, the server exporting a fresh copy per fetch as a
  worker does), 8B-shaped blocks of a 4k-token prompt (512 MiB), checked byte for byte, against
  one device-to-device copy of the same bytes (target >= 0.5). The serving peer is a second
  process (`--ipc-peer`). NCCL cannot be checked on one GPU (it refuses two ranks on one device).
- `elementwise_ops/<op>/<tokens>`: the Triton kernels of worker/triton_ops.py (add+RMSNorm, SiLU-and-mul,
  RoPE on the q/k part of a fused qkv) against torch's ops, 8B-shaped, 1, 16 and 512 tokens: whether
  they pay (the engine uses them on CUDA by default; `KVWEAVE_ELEMENTWISE=torch` turns them off).
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.device_context import (BF16_LOGIT_TOL, LLAMA_8B, SMOKE_CACHE_GB, SMOL, Context, Skip, greedy,
                                       prompts)
from benchmarks.device_kv_checks import check_ipc_handoff, check_onboard_overlap, check_tier_offload, ipc_peer_main
from benchmarks.report import Result, render, write_json

logger = logging.getLogger(__name__)

CHECKS = ("triton_decode_vs_torch", "greedy_match_vs_hf", "decode_roofline", "cuda_graphs_decode",
          "throughput_vs_hf_gpu", "tier_offload", "onboard_overlap", "ipc_handoff", "elementwise_ops")


# ---------------------------------------------------------------- checks

def check_triton_decode(ctx: Context) -> list[Result]:
    from worker.attention import AttentionMetadata, PagedAttention
    from worker.triton_attention import paged_decode_attention

    results = []
    shapes = [("default", 9, 3, 64), ("8b", 32, 8, 128)]
    for name, heads, kv_heads, hd in shapes[:1] if ctx.smoke else shapes:
        batch, ctx_len, bs = (4, 40, 16) if ctx.smoke else (32, 2048, 16)
        blocks = batch * (-(-ctx_len // bs)) + 4
        g = torch.Generator().manual_seed(0)
        cache = torch.randn(2, kv_heads, blocks * bs, hd, generator=g).to(torch.bfloat16).to(ctx.device)
        tables = torch.randperm(blocks, generator=g)[:batch * (-(-ctx_len // bs))].view(batch, -1).to(ctx.device)
        lens = torch.full((batch,), ctx_len, device=ctx.device)
        q = torch.randn(batch, heads, hd, generator=g).to(torch.bfloat16).to(ctx.device)
        slots = (tables[:, :, None] * bs + torch.arange(bs, device=ctx.device)).view(batch, -1)[:, :ctx_len]
        k = cache[0][:, slots].float().repeat_interleave(heads // kv_heads, 0)  # [H, B, L, hd]
        v = cache[1][:, slots].float().repeat_interleave(heads // kv_heads, 0)
        ref = torch.einsum("hbld,bhd->bhl", k, q.float()).mul(hd ** -0.5).softmax(-1)
        ref = torch.einsum("bhl,hbld->bhd", ref, v)

        def triton_call():
            return paged_decode_attention(q, cache[0], cache[1], tables, lens, bs, hd ** -0.5, ctx_len)

        err = (triton_call().float() - ref).abs().max().item()
        meta = AttentionMetadata(torch.zeros(batch, dtype=torch.long, device=ctx.device), batch,
                                 decode_block_tables=tables, decode_context_lens=lens, decode_max_len=ctx_len,
                                 decode_slots=slots.contiguous(),
                                 decode_bias=torch.zeros(1, batch, 1, ctx_len, dtype=torch.bfloat16,
                                                         device=ctx.device))
        torch_path = PagedAttention(cache[:, None], meta, heads, bs)  # [2, 1 layer, KVH, slots, hd]
        iters = 3 if ctx.smoke else 50
        t_triton = ctx.timed(triton_call, iters)
        t_torch = ctx.timed(lambda: torch_path._decode_torch(q, cache[0], cache[1]), iters)
        results.append(Result(f"triton_decode_vs_torch/{name}", t_triton * 1e6, "us", "torch gather + matmul",
                              t_torch * 1e6, higher_is_better=False,
                              extra={"batch": batch, "context": ctx_len, "heads": heads, "kv_heads": kv_heads,
                                     "head_dim": hd, "max_abs_err_vs_fp32": err}))
    return results


def check_greedy_vs_hf(ctx: Context) -> list[Result]:
    from transformers import LlamaForCausalLM

    folder = ctx.model_folder("smol-fp32", ctx.shape(SMOL), torch.float32, seed=1)
    n, new = (4, 8) if ctx.smoke else (32, 64)
    ps = prompts(n, (8, 24) if ctx.smoke else (16, 128), 49152, seed=2)
    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).to(ctx.device).eval()
    want = []
    with torch.no_grad():
        for p in ps:
            out = hf.generate(torch.tensor([p], device=ctx.device), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
            want.append(out[0, len(p):].tolist())
        ref_logits = [hf(torch.tensor([p], device=ctx.device)).logits[0, -1].float() for p in ps[:8]]
    del hf
    engine = ctx.engine(folder, "float32", kv_cache_gb=SMOKE_CACHE_GB if ctx.smoke else 1.0)
    got = [o.token_ids for o in engine.generate(ps, greedy(new))]
    del engine
    matches = sum(g == w for g, w in zip(got, want))
    first = next(({"prompt": i, "position": next(j for j, (a, b) in enumerate(zip(g, w)) if a != b)}
                  for i, (g, w) in enumerate(zip(got, want)) if g != w), None)
    results = [Result("greedy_match_vs_hf", matches / n, "fraction", "transformers LlamaForCausalLM fp32", 1.0,
                      extra={"prompts": n, "new_tokens": new, "first_mismatch": first})]
    engine = ctx.engine(folder, "bfloat16", kv_cache_gb=SMOKE_CACHE_GB if ctx.smoke else 1.0)
    diffs = []
    for p, ref in zip(ps[:8], ref_logits):
        req = engine.make_request(p, greedy(1), prompt_logits=1)
        engine.submit(req)
        final = None
        while engine.has_unfinished():
            final = next((o for o in engine.step() if o.finished), final)
        diffs.append((final.prompt_logits[-1].float().to(ref.device) - ref).abs().max().item())
    scale = max(r.abs().max().item() for r in ref_logits)
    results.append(Result("bf16_logits_vs_hf_fp32", max(diffs) / scale, "of max", "tolerance", BF16_LOGIT_TOL,
                          higher_is_better=False, extra={"max_abs_diff": max(diffs), "largest_logit": scale,
                                                         "within_tolerance": max(diffs) <= BF16_LOGIT_TOL * scale}))
    return results


def device_copy_bandwidth(ctx: Context) -> float:
    """Bytes read plus written per second by a device-to-device copy of 1 GiB (256 MiB smoke)."""
    n = (64 if ctx.smoke else 1024) * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=ctx.device)
    b = torch.empty_like(a)
    return 2 * n / ctx.timed(lambda: b.copy_(a), 3 if ctx.smoke else 20)


def decode_steps(engine, batch: int, prompt_len: int, steps: int, seed: int = 3) -> float:
    """Seconds per decode step of `batch` requests, after their prefill."""
    for p in prompts(batch, prompt_len, engine.args.vocab_size, seed):
        engine.add_request(p, greedy(steps + 8))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running + list(
            engine.scheduler.waiting)):
        engine.step()
    for _ in range(3):
        engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t) / steps
    while engine.has_unfinished():
        engine.step()
    return dt


def check_decode_roofline(ctx: Context) -> list[Result]:
    shape = ctx.shape(LLAMA_8B)
    engine = ctx.engine(ctx.model_folder("llama-8b-shape", shape), "bfloat16", load_format="dummy",
                        kv_cache_gb=SMOKE_CACHE_GB if ctx.smoke else 4.0, max_num_seqs=16)
    prompt_len, steps = (32, 4) if ctx.smoke else (512, 64)
    from worker.loader import expected_weight_shapes

    step = decode_steps(engine, 1, prompt_len, steps)
    a = engine.args
    shapes = expected_weight_shapes(a)
    if not a.tie_word_embeddings:  # an untied embedding is read one row a token, not whole
        del shapes["model.embed_tokens.weight"]
    weight_bytes = sum(torch.Size(s).numel() for s in shapes.values()) * engine.dtype.itemsize
    kv_bytes = 2 * a.n_layers * a.n_kv_heads * a.head_dim * engine.dtype.itemsize * (prompt_len + steps // 2)  # K and V
    achieved = (weight_bytes + kv_bytes) / step
    return [Result("decode_roofline", achieved / 1e9, "GB/s", "device-to-device copy (read + write)",
                   device_copy_bandwidth(ctx) / 1e9,
                   extra={"step_ms": step * 1e3, "weight_gb": weight_bytes / 1e9, "batch": 1,
                          "shape": "llama-3-8b layers", "target_ratio": 0.7,
                          "cuda_graphs": engine.runner.graphs is not None})]


def check_cuda_graphs(ctx: Context) -> list[Result]:
    ctx.needs_cuda()
    engine = ctx.engine(ctx.model_folder("smol-shape", SMOL), "bfloat16", load_format="dummy", kv_cache_gb=2.0,
                        max_num_seqs=64)
    if engine.runner.graphs is None:
        raise Skip("CUDA graphs are off (KVWEAVE_CUDA_GRAPHS=0)")
    results = []
    graphs = engine.runner.graphs
    for batch in (1, 4, 16):
        with_graphs = decode_steps(engine, batch, 256, 50)
        engine.runner.graphs = None
        eager = decode_steps(engine, batch, 256, 50)
        engine.runner.graphs = graphs
        results.append(Result(f"cuda_graphs_decode/batch{batch}", with_graphs * 1e3, "ms", "eager decode step",
                              eager * 1e3, higher_is_better=False, extra={"target_ratio": 2.0}))
    return results


def check_throughput_vs_hf(ctx: Context) -> list[Result]:
    from transformers import LlamaForCausalLM

    folder = ctx.model_folder("smol-bf16", ctx.shape(SMOL), torch.bfloat16, seed=4)
    n, plen, new = (4, 32, 8) if ctx.smoke else (64, 512, 128)
    ps = prompts(n, plen, 49152, seed=5)
    engine = ctx.engine(folder, "bfloat16", kv_cache_gb=SMOKE_CACHE_GB if ctx.smoke else 8.0, max_num_seqs=n,
                        max_num_batched_tokens=8192)
    engine.generate(ps[:2], greedy(4))  # warm-up: compiles, graph captures
    t = time.perf_counter()
    outs = engine.generate(ps, greedy(new))
    ctx.sync()
    kv_time = time.perf_counter() - t
    assert all(len(o.token_ids) == new for o in outs)
    del engine
    hf = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16).to(ctx.device).eval()
    batch = torch.tensor(ps, device=ctx.device)
    with torch.no_grad():
        hf.generate(batch[:2], max_new_tokens=4, do_sample=False, pad_token_id=0)
        ctx.sync()
        t = time.perf_counter()
        hf.generate(batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        ctx.sync()
        hf_time = time.perf_counter() - t
    return [Result("throughput_vs_hf_gpu", n * new / kv_time, "tok/s", "transformers generate, one batch",
                   n * new / hf_time, extra={"requests": n, "prompt_len": plen, "output_len": new,
                                             "target_ratio": 3.0})]


def check_elementwise_ops(ctx: Context) -> list[Result]:
    import torch.nn.functional as F

    from worker import triton_ops

    shape = ctx.shape(LLAMA_8B)
    dim, hidden, heads, kv = (shape["hidden_size"], shape["intermediate_size"], shape["num_attention_heads"],
                              shape["num_key_value_heads"])
    hd = dim // heads
    dtype = torch.bfloat16
    results = []
    for tokens in ((1, 4) if ctx.smoke else (1, 16, 512)):
        x = torch.randn(tokens, dim, dtype=dtype, device=ctx.device)
        r = torch.randn(tokens, dim, dtype=dtype, device=ctx.device)
        w = torch.randn(dim, dtype=dtype, device=ctx.device)
        gu = torch.randn(tokens, 2 * hidden, dtype=dtype, device=ctx.device)
        qkv = torch.randn(tokens, (heads + 2 * kv) * hd, dtype=dtype, device=ctx.device)
        qk = qkv[:, :(heads + kv) * hd].view(tokens, heads + kv, hd)
        cos = torch.rand(tokens, hd // 2, device=ctx.device)
        sin = torch.rand(tokens, hd // 2, device=ctx.device)

        def torch_rope():
            x1, x2 = qk.float().chunk(2, dim=-1)
            qk.copy_(torch.cat([x1 * cos[:, None] - x2 * sin[:, None], x2 * cos[:, None] + x1 * sin[:, None]], -1))

        pairs = {
            "add_rms_norm": (lambda: triton_ops.add_rms_norm(x, r, w, 1e-5),
                             lambda: F.rms_norm(r + x, (dim,), w, 1e-5)),
            "silu_and_mul": (lambda: triton_ops.silu_and_mul(gu), lambda: F.silu(gu[:, :hidden]) * gu[:, hidden:]),
            "rope": (lambda: triton_ops.rope_(qk, cos, sin), torch_rope),
        }
        iters = 2 if ctx.smoke else 50
        for op, (ours, theirs) in pairs.items():
            mine, base = ctx.timed(ours, iters), ctx.timed(theirs, iters)
            results.append(Result(f"elementwise_ops/{op}/{tokens}", mine * 1e6, "us", "torch's ops", base * 1e6,
                                  higher_is_better=False, extra={"dim": dim, "hidden": hidden}))
    return results


RUNNERS = {"triton_decode_vs_torch": check_triton_decode, "greedy_match_vs_hf": check_greedy_vs_hf,
           "decode_roofline": check_decode_roofline, "cuda_graphs_decode": check_cuda_graphs,
           "throughput_vs_hf_gpu": check_throughput_vs_hf, "tier_offload": check_tier_offload,
           "onboard_overlap": check_onboard_overlap, "ipc_handoff": check_ipc_handoff,
           "elementwise_ops": check_elementwise_ops}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for device-check.json")
    p.add_argument("--tokenizer-dir", required=True, help="folder with the default model's tokenizer.json and "
                                                          "tokenizer_config.json (scripts/device-check.sh prepare)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on whatever device is here (CI)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    p.add_argument("--budget-s", type=float, default=420.0, help="checks not started by then are skipped")
    p.add_argument("--ipc-peer", type=int, default=0, help=argparse.SUPPRESS)  # ipc_handoff's serving process
    args = p.parse_args(argv)
    if args.ipc_peer:
        ipc_peer_main(args.smoke, args.ipc_peer)
        return 0
    chosen = [c.strip() for c in args.checks.split(",") if c.strip()]
    if bad := [c for c in chosen if c not in CHECKS]:
        p.error(f"unknown checks {bad}; valid: {', '.join(CHECKS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.log = logging.getLogger("device_check")
    ctx = Context(args)
    results: list[Result] = []
    outcomes: dict[str, str] = {}
    try:
        for name in chosen:
            if time.monotonic() > ctx.deadline:
                outcomes[name] = "skipped: out of time budget"
                continue
            t = time.perf_counter()
            try:
                results += RUNNERS[name](ctx)
                outcomes[name] = f"ok in {time.perf_counter() - t:.1f}s"
            except Skip as e:
                outcomes[name] = f"skipped: {e}"
            except Exception as e:  # noqa: BLE001 - one check's failure is reported, the others run
                outcomes[name] = f"failed: {type(e).__name__}: {e}"
                logger.error("%s failed:\n%s", name, traceback.format_exc())
            logger.info("%s: %s", name, outcomes[name])
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    config = {"smoke": args.smoke, "checks": outcomes,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(str(out / "device-check.json"), "device_check", config, results)
    print(render("device_check", config, results))
    return 0 if all(not o.startswith("failed") for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
