// fp32 linear layers for the small batches of decode steps, with AVX2 and FMA (the CPUs without
// bf16 instructions, where the engine runs in fp32).
//
// A decode step of a small model is all weight reads. MKL's sgemm packs the weight on every call
// and oneDNN's packed fp32 matmul streamed a weight at ~6.5 GB/s at 5 rows (AMD EPYC Zen 3, one
// thread) where a plain sum reads ~17 GB/s. Here the weight is packed once into panels of 16 output
// features ([K][16]: two 8-wide vectors per input feature), so a pass over a panel is one
// sequential stream; each row of x broadcasts one input against the panel's two vectors. A block of
// up to 6 rows meets a panel with its accumulators in registers. Every output is one chain of FMAs
// over the inputs in order, whatever the block, so a row's result does not depend on the rest of
// the batch (with one row the chain's latency still outruns the memory: ~48 GB/s at 3 GHz).
// Up to kF32StreamRows rows (decode steps), threads split the panels and a thread's group of panels
// (kept in L2) meets every block of rows: the weight is streamed once. Past that (prefill chunks), as
// a GEMM blocks its operands: KC inputs of a panel (16 KB, in L1) meet every 6-row block of MC rows
// of x (in L2), the partial sums kept in the output between input blocks (exactly: the chain of FMAs
// is the same, so are the bits). Threads take tiles of MC rows by a group of panels, each tile
// running through all of its input blocks.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kF32Panel = 16;      // output features per panel: two vectors of 8 fp32
constexpr int64_t kF32MaxRows = 6;     // rows of x per block: 2 * 6 accumulators
constexpr int64_t kF32GroupBytes = 256 * 1024;
constexpr int64_t kF32StreamRows = 16;  // up to this many rows, one pass over the weight
constexpr int64_t kF32KC = 256;         // inputs of a panel kept in L1 (16 KB)
constexpr int64_t kF32MC = 96;          // rows of x kept in L2 (96 KB at KC)

#if defined(__AVX2__) && defined(__FMA__)

// out[r, 0:cols] = x[r, 0:k] . panel[0:k] (+ bias) for the block's ROWS rows, or with `accumulate`
// out[r, 0:cols] + that (the previous inputs' sums; out's columns are whole panels then).
template <int ROWS>
void f32_block(const float* x, int64_t ldx, int64_t k, const float* panel, const float* bias, float* out,
               int64_t ldo, int64_t cols, bool accumulate) {
  // every loop over the rows is unrolled, so that the accumulators live in registers
  __m256 acc[ROWS][2];
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r) {
    acc[r][0] = accumulate ? _mm256_loadu_ps(out + r * ldo) : _mm256_setzero_ps();
    acc[r][1] = accumulate ? _mm256_loadu_ps(out + r * ldo + 8) : _mm256_setzero_ps();
  }
#pragma GCC unroll 1
  for (int64_t i = 0; i < k; ++i) {
    const __m256 w0 = _mm256_loadu_ps(panel + i * kF32Panel), w1 = _mm256_loadu_ps(panel + i * kF32Panel + 8);
#pragma GCC unroll 6
    for (int r = 0; r < ROWS; ++r) {
      const __m256 a = _mm256_broadcast_ss(x + r * ldx + i);
      acc[r][0] = _mm256_fmadd_ps(a, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, w1, acc[r][1]);
    }
  }
  alignas(32) float tail[kF32Panel];
#pragma GCC unroll 6
  for (int r = 0; r < ROWS; ++r) {
    __m256 v0 = acc[r][0], v1 = acc[r][1];
    if (bias) {  // padded to whole panels
      v0 = _mm256_add_ps(v0, _mm256_loadu_ps(bias));
      v1 = _mm256_add_ps(v1, _mm256_loadu_ps(bias + 8));
    }
    float* o = out + r * ldo;
    if (cols == kF32Panel) {
      _mm256_storeu_ps(o, v0);
      _mm256_storeu_ps(o + 8, v1);
    } else {
      _mm256_store_ps(tail, v0);
      _mm256_store_ps(tail + 8, v1);
      std::copy(tail, tail + cols, o);
    }
  }
}

using F32BlockFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, float*, int64_t, int64_t,
                           bool);
constexpr F32BlockFn kF32Blocks[kF32MaxRows + 1] = {nullptr, f32_block<1>, f32_block<2>, f32_block<3>,
                                                    f32_block<4>, f32_block<5>, f32_block<6>};
#endif

}  // namespace

bool f32_gemm_available() {
#if defined(__AVX2__) && defined(__FMA__)
  return true;
#else
  return false;
#endif
}

torch::Tensor pack_f32_weight(torch::Tensor weight) {
  check_cpu("pack_f32_weight", {&weight});
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat, "pack_f32_weight: a [N, K] float32 weight");
  const int64_t n = weight.size(0), k = weight.size(1), panels = (n + kF32Panel - 1) / kF32Panel;
  weight = weight.contiguous();
  auto packed = torch::empty({panels, k, kF32Panel}, weight.options());  // [panels, K, 16]
  const float* w = weight.data_ptr<float>();
  float* out = packed.data_ptr<float>();
  // one pass (a model's weights are packed at every load): panel p's column kk holds rows
  // 16p..16p+15 of input kk, zeros past the last row; K is walked in steps of 64 so that the 16 rows
  // read stay in L1 while their part of the panel is written
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t rows = std::min<int64_t>(kF32Panel, n - p * kF32Panel);
      float* panel = out + p * k * kF32Panel;
      for (int64_t k0 = 0; k0 < k; k0 += 64) {
        const int64_t k1 = std::min<int64_t>(k, k0 + 64);
        for (int64_t j = 0; j < rows; ++j) {
          const float* row = w + (p * kF32Panel + j) * k;
          for (int64_t kk = k0; kk < k1; ++kk) panel[kk * kF32Panel + j] = row[kk];
        }
        for (int64_t j = rows; j < kF32Panel; ++j)
          for (int64_t kk = k0; kk < k1; ++kk) panel[kk * kF32Panel + j] = 0.0f;
      }
    }
  });
  return packed;
}

torch::Tensor f32_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, int64_t out_features) {
  check_cpu("f32_linear", {&x, &packed, &bias});
  TORCH_CHECK(f32_gemm_available(), "f32_linear: this build has no AVX2 and FMA");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && packed.scalar_type() == torch::kFloat,
              "f32_linear: float32 input and weight");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kF32Panel && packed.is_contiguous(),
              "f32_linear: the weight must come from pack_f32_weight");
  const int64_t panels = packed.size(0), k = packed.size(1);
  TORCH_CHECK(out_features > (panels - 1) * kF32Panel && out_features <= panels * kF32Panel,
              "f32_linear: out_features does not match the packed weight");
  TORCH_CHECK(x.size(-1) == k, "f32_linear: in_features ", x.size(-1), " does not match the weight's ", k);
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  x = x.reshape({-1, k});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t m = x.size(0);
  const torch::Tensor bias_p = panel_bias("f32_linear", bias, panels, kF32Panel, out_features);
  if (m == 0) return torch::empty({0, out_features}, x.options()).view(shape);
#if defined(__AVX2__) && defined(__FMA__)
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  const float* bp = bias_p.defined() ? bias_p.data_ptr<float>() : nullptr;
  const int64_t ldx = x.stride(0), panel_elems = k * kF32Panel;
  if (m <= kF32StreamRows) {
    auto out = torch::empty({m, out_features}, x.options());
    float* op = out.data_ptr<float>();
    // a tile: a group of panels (in L2) against every block of rows, or one panel where there are
    // too few groups to keep the threads busy
    int64_t group = std::max<int64_t>(1, kF32GroupBytes / (panel_elems * 4));
    if (panels < 4 * at::get_num_threads() * group) group = 1;
    parallel_tiles((panels + group - 1) / group, [&](int64_t tile) {
      const int64_t g = tile * group, g_end = std::min(panels, g + group);
      for (int64_t r = 0; r < m; r += kF32MaxRows) {
        const int64_t rows = std::min(kF32MaxRows, m - r);
        for (int64_t pn = g; pn < g_end; ++pn) {
          const int64_t col = pn * kF32Panel, cols = std::min(kF32Panel, out_features - col);
          kF32Blocks[rows](xp + r * ldx, ldx, k, wp + pn * panel_elems, bp ? bp + col : nullptr,
                           op + r * out_features + col, out_features, cols, false);
        }
      }
    });
    return out.view(shape);
  }
  // whole panels wide, so that partial sums of the last panel's padding have somewhere to go
  const int64_t ldo = panels * kF32Panel;
  auto wide = torch::empty({m, ldo}, x.options());
  float* op = wide.data_ptr<float>();
  // A tile is a block of rows against a group of panels, and runs all of its input blocks itself:
  // no thread waits for another between input blocks.
  const int64_t row_blocks = (m + kF32MC - 1) / kF32MC;
  const int64_t groups = std::min(panels, std::max<int64_t>(1, (4 * at::get_num_threads() + row_blocks - 1) / row_blocks));
  const int64_t group = (panels + groups - 1) / groups;
  parallel_tiles(row_blocks * groups, [&](int64_t tile) {
    const int64_t mb = (tile / groups) * kF32MC, mc = std::min(kF32MC, m - mb);
    const int64_t p0 = (tile % groups) * group, p1 = std::min(panels, p0 + group);
    for (int64_t kb = 0; kb < k; kb += kF32KC) {
      const int64_t kc = std::min(kF32KC, k - kb);
      const float* bias_here = kb + kc == k ? bp : nullptr;
      for (int64_t pn = p0; pn < p1; ++pn) {
        const float* panel = wp + pn * panel_elems + kb * kF32Panel;
        for (int64_t r = mb; r < mb + mc; r += kF32MaxRows) {
          const int64_t rows = std::min(kF32MaxRows, mb + mc - r);
          kF32Blocks[rows](xp + r * ldx + kb, ldx, kc, panel, bias_here ? bias_here + pn * kF32Panel : nullptr,
                           op + r * ldo + pn * kF32Panel, ldo, kF32Panel, kb > 0);
        }
      }
    }
  });
  return (ldo == out_features ? wide : wide.narrow(1, 0, out_features).contiguous()).view(shape);
#else
  return torch::empty({m, out_features}, x.options()).view(shape);
#endif
}
