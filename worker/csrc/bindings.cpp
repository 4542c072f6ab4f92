#include <torch/extension.h>

#include "kernels.h"

// Every kernel releases the GIL while it runs, as torch's own ops do: a worker's asyncio thread
// (streaming outputs) runs meanwhile instead of waiting for the engine thread's next op.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("decode_attention", &decode_attention, "paged decode attention (CPU)", nogil(), py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("block_tables"), py::arg("context_lens"), py::arg("block_size"), py::arg("scale"),
        py::arg("portable") = false);
  m.def("decode_forward", &decode_forward, "a decode step through every layer", nogil());
  m.def("write_kv", &write_kv, "K and V of new tokens into their cache slots", nogil());
  m.def("rope_inplace", &rope_inplace, "RoPE in place on [T, H, hd]", nogil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up", nogil());
  m.def("bf16_gemm_available", &bf16_gemm_available, "whether bf16_linear is built (AVX512-BF16)");
  m.def("pack_bf16_weight", &pack_bf16_weight, "a [N, K] bf16 weight in bf16_linear's panels", nogil());
  m.def("bf16_linear", &bf16_linear, "x @ W.T + bias with a pack_bf16_weight weight", nogil(), py::arg("x"),
        py::arg("packed"), py::arg("bias"), py::arg("out_features"), py::arg("out_fp32") = false);
  m.def("f32_gemm_available", &f32_gemm_available, "whether f32_linear is built (AVX2 and FMA)");
  m.def("pack_f32_weight", &pack_f32_weight, "a [N, K] float32 weight in f32_linear's panels", nogil());
  m.def("f32_linear", &f32_linear, "x @ W.T + bias with a pack_f32_weight weight", nogil(), py::arg("x"),
        py::arg("packed"), py::arg("bias"), py::arg("out_features"));
  m.def("prefill_attention_applies", &prefill_attention_applies, "whether prefill_attention takes these queries");
  m.def("prefill_attention", &prefill_attention, "causal prefill attention over cached keys (AVX512-BF16)", nogil(),
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("key_slots"), py::arg("positions"),
        py::arg("start_pos"), py::arg("scale"));
  m.def("add_rms_norm", &add_rms_norm, "residual += x; x = rms_norm(residual) * weight", nogil());
}
