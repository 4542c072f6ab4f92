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
  m.def("add_rms_norm", &add_rms_norm, "residual += x; x = rms_norm(residual) * weight", nogil());
}
