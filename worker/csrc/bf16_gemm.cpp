// bf16 linear layers with AVX512-BF16 (`vdpbf16ps`), for the small batches of decode steps.
//
// oneDNN's packed bf16 matmul streams a weight at ~18 GB/s at one to eight rows on the CPUs this
// was measured on, where the memory gives ~60 GB/s: a decode step of a small model is all weight
// reads, so that is most of a single request's step. Here the weight is packed once into panels of
// 32 output features, each panel laid out pair of input features by pair ([K/2][32][2]: the
// operand order of `vdpbf16ps`), so a pass over a panel is one sequential stream; each row of x
// broadcasts a pair of its inputs against the panel's two vectors. Products accumulate in fp32 (as
// oneDNN's do), the bias is added in fp32, and the result is rounded to bf16 (nearest even) or
// kept in fp32 (the logits).
//
// Threads split the panels; within a thread, a group of panels (kept in L2) meets blocks of up to
// 12 rows of x (kept in L1), 24 accumulators in registers.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#include "bf16_panels.h"
#include "kernels.h"

namespace {

constexpr int64_t kGroupBytes = 512 * 1024;  // a thread's panels visited together (in L2)

}  // namespace

bool bf16_gemm_available() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

torch::Tensor pack_bf16_weight(torch::Tensor weight) {
  TORCH_CHECK(weight.device().is_cpu(), "pack_bf16_weight: a CPU tensor is needed");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "pack_bf16_weight: a [N, K] bf16 weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  const int64_t panels = (n + kPanel - 1) / kPanel, k_pairs = (k + 1) / 2;
  // [panels, 32, K'] zero-padded, then pairs of K next to each other: [panels, K'/2, 32, 2]
  auto padded = torch::zeros({panels * kPanel, k_pairs * 2}, weight.options());
  padded.narrow(0, 0, n).narrow(1, 0, k).copy_(weight);
  return padded.view({panels, kPanel, k_pairs, 2}).permute({0, 2, 1, 3}).contiguous();
}

torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, int64_t out_features,
                          bool out_fp32) {
  TORCH_CHECK(bf16_gemm_available(), "bf16_linear: this build has no AVX512-BF16");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "bf16_linear: CPU tensors are needed");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && packed.scalar_type() == torch::kBFloat16,
              "bf16_linear: bf16 input and weight");
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kPanel && packed.size(3) == 2 && packed.is_contiguous(),
              "bf16_linear: the weight must come from pack_bf16_weight");
  const int64_t panels = packed.size(0), k_pairs = packed.size(1);
  TORCH_CHECK(out_features > (panels - 1) * kPanel && out_features <= panels * kPanel,
              "bf16_linear: out_features does not match the packed weight");
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  x = x.reshape({-1, x.size(-1)});
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(k == 2 * k_pairs || k == 2 * k_pairs - 1, "bf16_linear: in_features ", k, " does not match the weight");
  if (k % 2 || x.stride(1) != 1 || x.stride(0) % 2) x = at::constant_pad_nd(x, {0, 2 * k_pairs - k}).contiguous();
  const torch::Tensor bias_f = panel_bias("bf16_linear", bias, panels, kPanel, out_features);
  const float* b = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  auto out = torch::empty({m, out_features}, x.options().dtype(out_fp32 ? torch::kFloat32 : torch::kBFloat16));
  if (m == 0) return out.view(shape);
#if defined(__AVX512BF16__)
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr());
  char* op = static_cast<char*>(out.data_ptr());
  const int64_t ldx = x.stride(0), elem = out_fp32 ? 4 : 2, panel_elems = k_pairs * 2 * kPanel;
  const int64_t group = std::max<int64_t>(1, kGroupBytes / (panel_elems * 2));
  // a thread takes whole groups of panels when there are enough of them, single panels otherwise
  const int64_t grain = panels >= 4 * at::get_num_threads() * group ? group : 1;
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; g += group) {
      const int64_t g_end = std::min(end, g + group);
      for (int64_t r = 0; r < m; r += kMaxRows) {
        const int64_t rows = std::min(kMaxRows, m - r);
        // the last pass over the group brings in what comes next: the next group's panel in the same
        // place, or with one pass only, the next panel
        const int64_t ahead = r + rows < m ? 0 : m <= kMaxRows ? 1 : group;
        for (int64_t pn = g; pn < g_end; ++pn) {
          const int64_t col = pn * kPanel, cols = std::min(kPanel, out_features - col);
          const uint16_t* next = ahead && pn + ahead < end ? wp + (pn + ahead) * panel_elems : nullptr;
          kBlocks[rows](xp + r * ldx, ldx, k_pairs, wp + pn * panel_elems, b ? b + col : nullptr,
                        op + (r * out_features + col) * elem, out_features, out_fp32, cols, next);
        }
      }
    }
  });
#endif
  return out.view(shape);
}
