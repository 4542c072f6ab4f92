"""Where a decode step's time goes, op by op: the breakdown `kvweave bench engine` reports.

A batch of requests is brought to steady decoding (every prompt prefilled); a few engine steps
are timed as they run (`step_ms`), a few more with the decode layers run one op at a time
(`unfused_step_ms`: `worker.attention.FUSED_DECODE` off, the fused call's parts), and a few more of
those under torch's profiler (`profiled_step_ms`), the compiled kernels named
(`worker.kernels.profiled_kernels`).
Each op's own time is put in a category: each linear layer by its weight's shape (q/k/v, output,
gate/up, down projections and the vocabulary projection; oneDNN's op or the panels' of
worker/csrc/bf16_gemm.cpp), decode attention, the KV cache write,
RoPE, norms, the activation, the sampler; what no op accounts for is Python and dispatch
(`untracked`, which includes the profiler's own cost). Times are per step, in ms, wall time of
the engine's thread.
"""
from __future__ import annotations

import random
import time

PANEL_LINEARS = ("kvweave::bf16_linear", "kvweave::f32_linear")
"""Linear layers in the compiled kernels' panels; a range is named with the layer's (out, in)
features (worker.kernels.profiled_kernels)."""
LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm")
CATEGORIES = {
    "kvweave::decode_attention": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_attention_math": "attention",
    "aten::index_copy_": "kv_cache_write",
    "kvweave::write_kv": "kv_cache_write",
    "kvweave::rope_inplace": "rope",
    "kvweave::add_rms_norm": "norm",
    "aten::rms_norm": "norm",
    "kvweave::silu_and_mul": "activation",
    "aten::embedding": "embedding",
    "aten::cumsum": "sampler", "aten::argmax": "sampler", "aten::amax": "sampler", "aten::searchsorted": "sampler",
    "aten::_softmax": "sampler", "aten::isnan": "sampler", "aten::isposinf": "sampler",
}


def linear_names(args) -> dict[tuple[int, int], str]:
    """(out, in) features of each linear layer of a Llama-family model -> its name."""
    hd = args.head_dim
    return {(args.n_heads * hd + 2 * args.n_kv_heads * hd, args.dim): "linear_qkv",
            (args.dim, args.n_heads * hd): "linear_o",
            (2 * args.hidden_dim, args.dim): "linear_gate_up",
            (args.dim, args.hidden_dim): "linear_down",
            (args.vocab_size, args.dim): "linear_lm_head"}


def decode_op_profile(eng, batch: int, prompt_len: int, steps: int = 5, seed: int = 0) -> dict:
    """The op breakdown of `steps` decode steps of `batch` requests with `prompt_len`-token prompts
    (ms per step by category, the step's wall time and what no op accounts for)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kvweave.sampling_params import SamplingParams
    from worker import attention
    from worker.kernels import profiled_kernels

    rng = random.Random(seed)
    params = SamplingParams(max_tokens=3 * steps + 64, temperature=0, ignore_eos=True)
    vocab = eng.args.vocab_size
    ids = [eng.add_request([rng.randrange(min(1000, vocab // 4), vocab) for _ in range(prompt_len)], params)
           for _ in range(batch)]
    try:
        while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                           for r in eng.scheduler.running):
            eng.step()
        eng.step()  # one plain decode step first
        step_ms = _time_steps(eng, steps)
        fused, attention.FUSED_DECODE = attention.FUSED_DECODE, False  # the layers' ops one by one
        try:
            unfused_ms = _time_steps(eng, steps)
            with profiled_kernels(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                start = time.perf_counter()
                for _ in range(steps):
                    eng.step()
                wall = time.perf_counter() - start
        finally:
            attention.FUSED_DECODE = fused
    finally:
        for req_id in ids:
            eng.abort_request(req_id)
        eng.step()
    names = linear_names(eng.args)
    ms: dict[str, float] = {}
    for e in prof.events():
        if _under_linear(e):
            continue  # counted in the linear layer's total
        if e.name in LINEAR_OPS:  # the layer's whole time (a plain linear's matmul is a child op)
            shape = tuple(e.input_shapes[1]) if len(e.input_shapes) > 1 else ()
            cat, t = names.get(shape, "linear_other"), e.cpu_time_total
        elif e.name.startswith(PANEL_LINEARS):  # kvweave::bf16_linear(out, in)
            shape = tuple(int(v) for v in e.name.split("(", 1)[1].strip("()").split(","))
            cat, t = names.get(shape, "linear_other"), e.cpu_time_total
        else:
            cat, t = CATEGORIES.get(e.name, "other_ops"), e.self_cpu_time_total
        ms[cat] = ms.get(cat, 0.0) + t / 1e3
    wall_ms = wall * 1e3
    per_step = {k: round(v / steps, 3) for k, v in sorted(ms.items(), key=lambda kv: -kv[1])}
    per_step["untracked"] = round((wall_ms - sum(ms.values())) / steps, 3)
    return {"batch": batch, "prompt_len": prompt_len, "steps": steps, "step_ms": round(step_ms, 3),
            "unfused_step_ms": round(unfused_ms, 3), "profiled_step_ms": round(wall_ms / steps, 3),
            "threads": torch.get_num_threads(), "ms_per_step": per_step}


def _time_steps(eng, steps: int) -> float:
    """Mean ms of the engine's next `steps` steps."""
    start = time.perf_counter()
    for _ in range(steps):
        eng.step()
    return (time.perf_counter() - start) * 1e3 / steps


def _under_linear(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in LINEAR_OPS:
            return True
        parent = parent.cpu_parent
    return False


def format_profile(p: dict) -> str:
    """One line: the step's time and its largest parts."""
    parts = ", ".join(f"{k} {v:.2f}" for k, v in p["ms_per_step"].items() if v >= 0.05 or k == "untracked")
    return (f"decode step, batch {p['batch']}, {p['prompt_len']}-token prompts: {p['step_ms']:.2f} ms "
            f"({p['unfused_step_ms']:.2f} layer by layer; profiled {p['profiled_step_ms']:.2f} ms = {parts})")
