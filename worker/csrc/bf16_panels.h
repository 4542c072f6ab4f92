// The register-blocked microkernel of the bf16 panels (AVX512-BF16 `vdpbf16ps`), shared by the
// linear layers (bf16_gemm.cpp) and prefill attention (prefill_attention.cpp).
//
// A panel holds 32 output columns of a [N, K] operand, pair of K by pair: [K/2][32][2] bf16, the
// operand order of `vdpbf16ps`. A block of up to 12 rows of x (bf16, K contiguous, rows `ldx` apart)
// meets one panel: out[r, 0:32] = x[r, :] . panel (+ bias), fp32 sums, stored as fp32 or rounded
// to bf16 (nearest even).
#pragma once
#include <cstdint>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kPanel = 32;     // output features per panel: two vectors of 16 fp32
constexpr int64_t kMaxRows = 12;   // rows of x per block: 2 * 12 accumulators

#if defined(__AVX512BF16__)

// out[r, 0:32] (+)= x[r, :] . panel for the block's ROWS rows; `cols` < 32 only in a last, partial panel.
// `next`: a panel of the same size to bring into L2 meanwhile (or null), one 128-byte step of it per
// pair of inputs, so that its stream from memory overlaps this block's products.
template <int ROWS>
void panel_block(const uint16_t* x, int64_t ldx, int64_t k_pairs, const uint16_t* panel, const float* bias,
                 void* out, int64_t ldo, bool out_fp32, int64_t cols, const uint16_t* next) {
  // few rows: two chains of accumulators (even and odd pairs), so the adds' latency does not bound
  // the weight stream
  constexpr int kChains = ROWS <= 4 ? 2 : 1;
  __m512 acc[kChains][ROWS][2];
  for (int c = 0; c < kChains; ++c)
    for (int r = 0; r < ROWS; ++r) acc[c][r][0] = acc[c][r][1] = _mm512_setzero_ps();
  const int32_t* xp[ROWS];
  for (int r = 0; r < ROWS; ++r) xp[r] = reinterpret_cast<const int32_t*>(x + r * ldx);
  auto step = [&](int c, int64_t p) {
    if (next) {
      _mm_prefetch(reinterpret_cast<const char*>(next + p * 2 * kPanel), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + p * 2 * kPanel + kPanel), _MM_HINT_T1);
    }
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
                         int64_t, const uint16_t*);
constexpr BlockFn kBlocks[kMaxRows + 1] = {
    nullptr, panel_block<1>, panel_block<2>, panel_block<3>, panel_block<4>, panel_block<5>, panel_block<6>,
    panel_block<7>, panel_block<8>, panel_block<9>, panel_block<10>, panel_block<11>, panel_block<12>};

#endif

}  // namespace
