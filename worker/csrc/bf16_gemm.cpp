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

#include "kernels.h"

namespace {

constexpr int64_t kPanel = 32;     // output features per panel: two vectors of 16 fp32
constexpr int64_t kMaxRows = 12;   // rows of x per block: 2 * 12 accumulators
constexpr int64_t kGroupBytes = 512 * 1024;  // a thread's panels visited together (in L2)

#if defined(__AVX512BF16__)

// out[r, 0:32] (+)= x[r, :] . panel for the block's ROWS rows; `cols` < 32 only in a last, partial panel.
template <int ROWS>
void panel_block(const uint16_t* x, int64_t ldx, int64_t k_pairs, const uint16_t* panel, const float* bias,
                 void* out, int64_t ldo, bool out_fp32, int64_t cols) {
  // few rows: two chains of accumulators (even and odd pairs), so the adds' latency does not bound
  // the weight stream
  constexpr int kChains = ROWS <= 4 ? 2 : 1;
  __m512 acc[kChains][ROWS][2];
  for (int c = 0; c < kChains; ++c)
    for (int r = 0; r < ROWS; ++r) acc[c][r][0] = acc[c][r][1] = _mm512_setzero_ps();
  const int32_t* xp[ROWS];
  for (int r = 0; r < ROWS; ++r) xp[r] = reinterpret_cast<const int32_t*>(x + r * ldx);
  auto step = [&](int c, int64_t p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kPanel);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * 2 * kPanel + kPanel);
#pragma GCC unroll 12
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(xp[r][p]);
      acc[c][r][0] = _mm512_dpbf16_ps(acc[c][r][0], a, w0);
      acc[c][r][1] = _mm512_dpbf16_ps(acc[c][r][1], a, w1);
    }
  };
  int64_t p = 0;
  for (; p + kChains <= k_pairs; p += kChains)
#pragma GCC unroll 2
    for (int c = 0; c < kChains; ++c) step(c, p + c);
  for (; p < k_pairs; ++p) step(0, p);
  if constexpr (kChains == 2)
    for (int r = 0; r < ROWS; ++r) {
      acc[0][r][0] = _mm512_add_ps(acc[0][r][0], acc[1][r][0]);
      acc[0][r][1] = _mm512_add_ps(acc[0][r][1], acc[1][r][1]);
    }
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 m1 = cols >= 32 ? 0xFFFF : cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
  if (bias) {
    b0 = _mm512_maskz_loadu_ps(m0, bias);
    b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
  }
  for (int r = 0; r < ROWS; ++r) {
    const __m512 v0 = _mm512_add_ps(acc[0][r][0], b0), v1 = _mm512_add_ps(acc[0][r][1], b1);
    if (out_fp32) {
      float* o = static_cast<float*>(out) + r * ldo;
      _mm512_mask_storeu_ps(o, m0, v0);
      _mm512_mask_storeu_ps(o + 16, m1, v1);
    } else {  // nearest even, as every other bf16 result here
      uint16_t* o = static_cast<uint16_t*>(out) + r * ldo;
      _mm256_mask_storeu_epi16(o, m0, (__m256i)_mm512_cvtneps_pbh(v0));
      _mm256_mask_storeu_epi16(o + 16, m1, (__m256i)_mm512_cvtneps_pbh(v1));
    }
  }
}

using BlockFn = void (*)(const uint16_t*, int64_t, int64_t, const uint16_t*, const float*, void*, int64_t, bool,
                         int64_t);
constexpr BlockFn kBlocks[kMaxRows + 1] = {
    nullptr, panel_block<1>, panel_block<2>, panel_block<3>, panel_block<4>, panel_block<5>, panel_block<6>,
    panel_block<7>, panel_block<8>, panel_block<9>, panel_block<10>, panel_block<11>, panel_block<12>};

#endif

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
  const float* b = nullptr;
  torch::Tensor bias_f;
  if (bias.numel()) {
    TORCH_CHECK(bias.numel() == out_features, "bf16_linear: bias has ", bias.numel(), " elements");
    bias_f = torch::zeros({panels * kPanel}, bias.options().dtype(torch::kFloat32));
    bias_f.narrow(0, 0, out_features).copy_(bias.reshape({-1}));
    b = bias_f.data_ptr<float>();
  }
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
        for (int64_t pn = g; pn < g_end; ++pn) {
          const int64_t col = pn * kPanel, cols = std::min(kPanel, out_features - col);
          kBlocks[rows](xp + r * ldx, ldx, k_pairs, wp + pn * panel_elems, b ? b + col : nullptr,
                        op + (r * out_features + col) * elem, out_features, out_fp32, cols);
        }
      }
    }
  });
#endif
  return out.view(shape);
}
