// Element access shared by the CPU kernels: bf16 is stored as uint16 and widened to fp32.
// Where the compiler targets AVX-512 (-march=native on a CPU that has it), `load16`/`store16` move
// 16 elements at a time as one fp32 vector.
#pragma once
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// exp(x) on vectors of any width: r = x - n ln2 in [-ln2/2, ln2/2] (n = round(x / ln2), ln2 split in
// two for accuracy), a degree-6 polynomial of r (relative error ~2e-7) in Horner's form; the caller
// scales it by 2^n. `fma(a, b, c)` = a * b + c, `set1` broadcasts, `fnmadd(a, b, c)` = c - a * b.
template <typename V, typename Fma, typename Fnmadd, typename Set1>
inline V exp_reduced_poly(V n, V x, Fma fma, Fnmadd fnmadd, Set1 set1) {
  V r = fnmadd(n, set1(0.693145751953125f), x);
  r = fnmadd(n, set1(1.428606765330187045e-06f), r);
  V p = set1(1.0f / 720);
  for (float c : {1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = fma(p, r, set1(c));
  return p;
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t bits = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even
  p[i] = static_cast<uint16_t>(bits >> 16);
}

#if defined(__AVX512F__)
constexpr bool kHaveVec16 = true;
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) {  // round to nearest even, as `store`
  __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

// exp(x): 2^n * p(r) (exp_reduced_poly); below -87 it is 0, above ~88.7 infinity.
inline __m512 exp512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 p = exp_reduced_poly(n, x, [](__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); },
                                    [](__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); },
                                    [](float v) { return _mm512_set1_ps(v); });
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(p, n));
}
#else
constexpr bool kHaveVec16 = false;
#endif

#if defined(__AVX2__) && defined(__FMA__)
// exp(x) as exp512, on 8-wide vectors (2^n built from n's bits); below -87 it is 0.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp_reduced_poly(n, x, [](__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); },
                                    [](__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); },
                                    [](float v) { return _mm256_set1_ps(v); });
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

}  // namespace
