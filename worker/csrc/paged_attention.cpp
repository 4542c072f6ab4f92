// Decode attention over a paged KV cache on the CPU.
//
// One query token per sequence; every group of query heads that shares a KV head is handled by
// one task (sequence, kv head), so each K/V vector is read once from the cache and used for the
// whole group. Two passes per task: scores for the whole context (fp32), then softmax and the
// weighted sum of V. The context is walked block by block (a block's slots are contiguous), so no
// slot is computed per token. Where the compiler targets AVX-512 and head_dim is 64 or 128, the
// dot products and the weighted sum run on 16-wide fp32 vectors held in registers (bf16 widened on
// load), and the next block is prefetched (scattered blocks defeat the hardware prefetcher); with
// AVX2 and FMA, on 8-wide vectors the same way (and a vectorized exp: the compiler's loops called
// the scalar one); elsewhere plain C++ loops that the compiler vectorizes compute the same thing.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"
#include "kernels.h"


namespace {

struct Task {
  int64_t ctx, group, head_dim, block_size;
  const int64_t* block_table;
  float scale;
};

void softmax_rows(float* scores, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = scores + r * n;
    float m = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, sr[t]);
    for (int64_t t = 0; t < n; ++t) { sr[t] = std::exp(sr[t] - m); sum += sr[t]; }
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < n; ++t) sr[t] *= inv;
  }
}

// Calls fn(row, t) for every context token t, `row` its vector in `head` (one KV head's cache
// [slots, head_dim]), walking the block table block by block.
template <typename T, typename F>
inline void for_each_row(const Task& a, const T* head, F&& fn) {
  for (int64_t t0 = 0, blk = 0; t0 < a.ctx; t0 += a.block_size, ++blk) {
    const int64_t n = std::min(a.block_size, a.ctx - t0);
    const T* base = head + a.block_table[blk] * a.block_size * a.head_dim;
    for (int64_t i = 0; i < n; ++i) fn(base + i * a.head_dim, t0 + i);
  }
}

// q/out: the group's query/output rows [group, head_dim]; kh/vh: this KV head's cache [slots, head_dim].
template <typename T>
void task_portable(const Task& a, const T* q, const T* kh, const T* vh, T* out, float* qf, float* scores,
                   float* acc) {
  const int64_t G = a.group, D = a.head_dim, ctx = a.ctx;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = load(q, i) * a.scale;
  for_each_row(a, kh, [&](const T* kr, int64_t t) {
    for (int64_t r = 0; r < G; ++r) {
      const float* qr = qf + r * D;
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += qr[d] * load(kr, d);
      scores[r * ctx + t] = s;
    }
  });
  softmax_rows(scores, G, ctx);
  std::fill(acc, acc + G * D, 0.f);
  for_each_row(a, vh, [&](const T* vr, int64_t t) {
    for (int64_t r = 0; r < G; ++r) {
      const float p = scores[r * ctx + t];
      float* ar = acc + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] += p * load(vr, d);
    }
  });
  for (int64_t i = 0; i < G * D; ++i) store(out, i, acc[i]);
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr bool kVectorized = true;

// Ask for the `n` elements at `p` ahead of their use: the blocks of a context are scattered over
// the cache, so the hardware prefetcher stops at every block boundary.
template <int Hint, typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(c + off, static_cast<_mm_hint>(Hint));
}
#else
constexpr bool kVectorized = false;
#endif

#if defined(__AVX512F__)

// 16 vectors -> one: lane i is the sum of v[i]'s lanes (a tree of in-lane unpacks, then 128-bit
// lane shuffles: 45 instructions where 16 horizontal sums take ~130).
inline __m512 sum16x16(__m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)
    a[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]), _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d x = _mm512_castps_pd(a[2 * j]), y = _mm512_castps_pd(a[2 * j + 1]);
    b[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int j = 0; j < 2; ++j)
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// softmax of each of `rows` rows of n scores, in place, on 16-wide vectors
void softmax_rows_vec16(float* scores, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = scores + r * n;
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
      vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), m, sr + t));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
      const __m512 e = _mm512_maskz_mov_ps(m, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sr + t), mx)));
      _mm512_mask_storeu_ps(sr + t, m, e);
      sum = _mm512_add_ps(sum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
    for (int64_t t = 0; t < n; t += 16) {
      const __mmask16 m = n - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - t)) - 1);
      _mm512_mask_storeu_ps(sr + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sr + t), inv));
    }
  }
}

// R query rows (R <= 4) of head_dim NV * 16, their accumulators held in registers. Scores are
// taken 16 keys at a time: each key's products stay a vector (`part`), and one tree sums 16 of them.
template <int R, int NV, typename T>
void rows_vec16(const Task& a, const float* qf, const T* kh, const T* vh, float* scores, float* acc) {
  const int64_t bs = a.block_size, ctx = a.ctx;
  constexpr int64_t D = NV * 16;
  __m512 qv[R][NV];
  alignas(64) __m512 part[R][16];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) qv[r][c] = _mm512_loadu_ps(qf + r * D + 16 * c);
  int64_t pending = 0;  // keys in `part` not yet summed, the first at t - pending
  auto flush = [&](int64_t end) {
    for (int r = 0; r < R; ++r) {
      for (int64_t i = pending; i < 16; ++i) part[r][i] = _mm512_setzero_ps();
      const __m512 s = sum16x16(part[r]);
      const __mmask16 m = static_cast<__mmask16>((1u << pending) - 1);
      _mm512_mask_storeu_ps(scores + r * ctx + end - pending, m, s);
    }
    pending = 0;
  };
  for (int64_t t0 = 0, blk = 0; t0 < ctx; t0 += bs, ++blk) {
    const int64_t n = std::min(bs, ctx - t0);
    const T* kb = kh + a.block_table[blk] * bs * D;
    if (t0 + bs < ctx) prefetch<_MM_HINT_T0>(kh + a.block_table[blk + 1] * bs * D, std::min(bs, ctx - t0 - bs) * D);
    prefetch<_MM_HINT_T1>(vh + a.block_table[blk] * bs * D, n * D);  // for the second pass
    for (int64_t i = 0; i < n; ++i) {
      __m512 k[NV];
      for (int c = 0; c < NV; ++c) k[c] = load16(kb + i * D + 16 * c);
      for (int r = 0; r < R; ++r) {
        __m512 s = _mm512_mul_ps(qv[r][0], k[0]);
        for (int c = 1; c < NV; ++c) s = _mm512_fmadd_ps(qv[r][c], k[c], s);
        part[r][pending] = s;
      }
      if (++pending == 16) flush(t0 + i + 1);
    }
  }
  if (pending) flush(ctx);
  softmax_rows_vec16(scores, R, ctx);
  __m512 av[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) av[r][c] = _mm512_setzero_ps();
  for (int64_t t0 = 0, blk = 0; t0 < ctx; t0 += bs, ++blk) {
    const int64_t n = std::min(bs, ctx - t0);
    const T* vb = vh + a.block_table[blk] * bs * D;
    for (int64_t i = 0; i < n; ++i) {
      __m512 v[NV];
      for (int c = 0; c < NV; ++c) v[c] = load16(vb + i * D + 16 * c);
      for (int r = 0; r < R; ++r) {
        const __m512 p = _mm512_set1_ps(scores[r * ctx + t0 + i]);
        for (int c = 0; c < NV; ++c) av[r][c] = _mm512_fmadd_ps(p, v[c], av[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) _mm512_storeu_ps(acc + r * D + 16 * c, av[r][c]);
}

template <int NV, typename T>
void group_vec16(const Task& a, const float* qf, const T* kh, const T* vh, float* scores, float* acc) {
  constexpr int64_t D = NV * 16;
  for (int64_t r0 = 0; r0 < a.group; r0 += 4) {  // rows in chunks of at most 4
    const float* q = qf + r0 * D;
    float* out = acc + r0 * D;
    switch (std::min<int64_t>(4, a.group - r0)) {
      case 1: rows_vec16<1, NV>(a, q, kh, vh, scores, out); break;
      case 2: rows_vec16<2, NV>(a, q, kh, vh, scores, out); break;
      case 3: rows_vec16<3, NV>(a, q, kh, vh, scores, out); break;
      default: rows_vec16<4, NV>(a, q, kh, vh, scores, out); break;
    }
  }
}

// The vectorized task for head_dim 64 or 128 (`vec16_head_dim`).
template <typename T>
void task_vec16(const Task& a, const T* q, const T* kh, const T* vh, T* out, float* qf, float* scores,
                float* acc) {
  const int64_t G = a.group, D = a.head_dim;
  const __m512 scale = _mm512_set1_ps(a.scale);
  for (int64_t i = 0; i < G * D; i += 16) _mm512_storeu_ps(qf + i, _mm512_mul_ps(load16(q + i), scale));
  if (D == 64) group_vec16<4>(a, qf, kh, vh, scores, acc);
  else group_vec16<8>(a, qf, kh, vh, scores, acc);
  for (int64_t i = 0; i < G * D; i += 16) store16(out + i, _mm512_loadu_ps(acc + i));
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// The same two passes on 8-wide vectors (AVX2 without AVX-512: the engine runs fp32 there). Query
// rows are read from L1 rather than held in registers (16 of them, not 32); the weighted sum of V
// runs one query row at a time over a block (its values stay in L1 for the group's other rows).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// 8 vectors -> one: lane i is the sum of v[i]'s lanes.
inline __m256 sum8x8(const __m256 v[8]) {
  const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

void softmax_rows_vec8(float* scores, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* sr = scores + r * n;
    const int64_t whole = n / 8 * 8;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < whole; t += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(sr + t));
    float m = hmax8(vmax);
    for (int64_t t = whole; t < n; ++t) m = std::max(m, sr[t]);
    const __m256 mx = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    for (int64_t t = 0; t < whole; t += 8) {
      const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sr + t), mx));
      _mm256_storeu_ps(sr + t, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum8(vsum);
    for (int64_t t = whole; t < n; ++t) {
      sr[t] = std::exp(sr[t] - m);
      sum += sr[t];
    }
    const __m256 inv = _mm256_set1_ps(1.f / sum);
    for (int64_t t = 0; t < whole; t += 8) _mm256_storeu_ps(sr + t, _mm256_mul_ps(_mm256_loadu_ps(sr + t), inv));
    for (int64_t t = whole; t < n; ++t) sr[t] *= 1.f / sum;
  }
}

// Scores of R query rows (R <= 4) of head_dim NV * 8, 8 keys at a time: each key's products stay
// a vector, and one tree sums 8 of them.
template <int R, int NV, typename T>
void scores_vec8(const Task& a, const float* qf, const T* kh, float* scores) {
  constexpr int64_t D = NV * 8;
  const int64_t bs = a.block_size, ctx = a.ctx;
  alignas(32) __m256 part[R][8];
  int64_t pending = 0;  // keys in `part` not yet summed, the first at t - pending
  auto flush = [&](int64_t end) {
    for (int r = 0; r < R; ++r) {
      for (int64_t i = pending; i < 8; ++i) part[r][i] = _mm256_setzero_ps();
      alignas(32) float s[8];
      _mm256_store_ps(s, sum8x8(part[r]));
      std::copy(s, s + pending, scores + r * ctx + end - pending);
    }
    pending = 0;
  };
  for (int64_t t0 = 0, blk = 0; t0 < ctx; t0 += bs, ++blk) {
    const int64_t n = std::min(bs, ctx - t0);
    const T* kb = kh + a.block_table[blk] * bs * D;
    if (t0 + bs < ctx) prefetch<_MM_HINT_T0>(kh + a.block_table[blk + 1] * bs * D, std::min(bs, ctx - t0 - bs) * D);
    for (int64_t i = 0; i < n; ++i) {
      const T* kr = kb + i * D;
      __m256 s0[R], s1[R];  // two chains per row
      for (int r = 0; r < R; ++r) s0[r] = s1[r] = _mm256_setzero_ps();
      for (int c = 0; c < NV; c += 2) {
        const __m256 k0 = load8(kr + 8 * c), k1 = load8(kr + 8 * c + 8);
        for (int r = 0; r < R; ++r) {
          s0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + r * D + 8 * c), k0, s0[r]);
          s1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(qf + r * D + 8 * c + 8), k1, s1[r]);
        }
      }
      for (int r = 0; r < R; ++r) part[r][pending] = _mm256_add_ps(s0[r], s1[r]);
      if (++pending == 8) flush(t0 + i + 1);
    }
  }
  if (pending) flush(ctx);
}

// acc[r] = sum_t scores[r, t] V[t] for every row of the group, a block of V at a time.
template <int NV, typename T>
void values_vec8(const Task& a, const float* scores, const T* vh, float* acc) {
  constexpr int64_t D = NV * 8;
  const int64_t bs = a.block_size, ctx = a.ctx;
  std::fill(acc, acc + a.group * D, 0.f);
  for (int64_t t0 = 0, blk = 0; t0 < ctx; t0 += bs, ++blk) {
    const int64_t n = std::min(bs, ctx - t0);
    const T* vb = vh + a.block_table[blk] * bs * D;
    if (t0 + bs < ctx) prefetch<_MM_HINT_T0>(vh + a.block_table[blk + 1] * bs * D, std::min(bs, ctx - t0 - bs) * D);
    for (int64_t r = 0; r < a.group; ++r) {
      const float* p = scores + r * ctx + t0;
      for (int h = 0; h < NV; h += 8) {  // 8 accumulators at a time
        __m256 av[8];
        for (int c = 0; c < 8; ++c) av[c] = _mm256_loadu_ps(acc + r * D + 8 * (h + c));
        for (int64_t i = 0; i < n; ++i) {
          const __m256 pi = _mm256_set1_ps(p[i]);
          for (int c = 0; c < 8; ++c) av[c] = _mm256_fmadd_ps(pi, load8(vb + i * D + 8 * (h + c)), av[c]);
        }
        for (int c = 0; c < 8; ++c) _mm256_storeu_ps(acc + r * D + 8 * (h + c), av[c]);
      }
    }
  }
}

template <int NV, typename T>
void group_vec8(const Task& a, const float* qf, const T* kh, const T* vh, float* scores, float* acc) {
  constexpr int64_t D = NV * 8;
  for (int64_t r0 = 0; r0 < a.group; r0 += 4) {  // rows in chunks of at most 4
    const float* q = qf + r0 * D;
    float* s = scores + r0 * a.ctx;
    switch (std::min<int64_t>(4, a.group - r0)) {
      case 1: scores_vec8<1, NV>(a, q, kh, s); break;
      case 2: scores_vec8<2, NV>(a, q, kh, s); break;
      case 3: scores_vec8<3, NV>(a, q, kh, s); break;
      default: scores_vec8<4, NV>(a, q, kh, s); break;
    }
  }
  softmax_rows_vec8(scores, a.group, a.ctx);
  values_vec8<NV>(a, scores, vh, acc);
}

// The vectorized task for head_dim 64 or 128.
template <typename T>
void task_vec8(const Task& a, const T* q, const T* kh, const T* vh, T* out, float* qf, float* scores,
               float* acc) {
  const int64_t G = a.group, D = a.head_dim;
  for (int64_t i = 0; i < G * D; ++i) qf[i] = load(q, i) * a.scale;
  if (D == 64) group_vec8<8>(a, qf, kh, vh, scores, acc);
  else group_vec8<16>(a, qf, kh, vh, scores, acc);
  for (int64_t i = 0; i < G * D; ++i) store(out, i, acc[i]);
}
#endif

template <typename T>
void decode_attention_impl(const T* q, int64_t q_stride, const T* k_cache, const T* v_cache, T* out,
                           const int64_t* block_tables, const int64_t* context_lens,
                           int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t num_slots, int64_t max_blocks, int64_t block_size, float scale,
                           bool vectorized) {
  const int64_t group = num_heads / num_kv_heads;
  int64_t max_ctx = 0;
  for (int64_t b = 0; b < num_seqs; ++b) max_ctx = std::max(max_ctx, context_lens[b]);
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), scores(group * max_ctx);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
      const Task a{context_lens[b], group, head_dim, block_size, block_tables + b * max_blocks, scale};
      const int64_t row = (b * num_heads + h * group) * head_dim;
      const T* qg = q + b * q_stride + h * group * head_dim;
      const T* kh = k_cache + h * num_slots * head_dim;
      const T* vh = v_cache + h * num_slots * head_dim;
#if defined(__AVX512F__)
      if (vectorized) {
        task_vec16(a, qg, kh, vh, out + row, qf.data(), scores.data(), acc.data());
        continue;
      }
#elif defined(__AVX2__) && defined(__FMA__)
      if (vectorized) {
        task_vec8(a, qg, kh, vh, out + row, qf.data(), scores.data(), acc.data());
        continue;
      }
#endif
      task_portable(a, qg, kh, vh, out + row, qf.data(), scores.data(), acc.data());
    }
  });
}

}  // namespace

// q [B, num_heads, hd] (heads and head_dim contiguous; rows may be strided, as q's part of a fused
// qkv output); k_cache/v_cache [num_kv_heads, num_slots, hd]; block_tables [B, max_blocks] int64;
// context_lens [B] int64 (each >= 1). Returns [B, num_heads, hd] in q's dtype. `portable` forces
// the plain C++ path (tests compare the two).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens,
                               int64_t block_size, double scale, bool portable) {
  check_cpu("decode_attention", {&q, &k_cache, &v_cache, &block_tables, &context_lens});
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "bad ranks");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q's heads must be contiguous within a row");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong, "int64 tables");
  auto bt = block_tables.contiguous();
  auto cl = context_lens.contiguous();
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(0), S = k_cache.size(1);
  auto out = torch::empty({B, H, D}, q.options());
  TORCH_CHECK(H % KVH == 0 && k_cache.size(2) == D, "shape mismatch");
  TORCH_CHECK(bt.size(0) == B && cl.size(0) == B, "one block table and context length per sequence");
  const bool vectorized = kVectorized && !portable && (D == 64 || D == 128);
  if (q.scalar_type() == torch::kFloat) {
    decode_attention_impl<float>(q.data_ptr<float>(), q.stride(0), k_cache.data_ptr<float>(),
                                 v_cache.data_ptr<float>(), out.data_ptr<float>(), bt.data_ptr<int64_t>(),
                                 cl.data_ptr<int64_t>(), B, H, KVH, D, S, bt.size(1), block_size,
                                 static_cast<float>(scale), vectorized);
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "float32 or bfloat16 only");
    decode_attention_impl<uint16_t>(
        reinterpret_cast<const uint16_t*>(q.data_ptr()), q.stride(0),
        reinterpret_cast<const uint16_t*>(k_cache.data_ptr()), reinterpret_cast<const uint16_t*>(v_cache.data_ptr()),
        reinterpret_cast<uint16_t*>(out.data_ptr()), bt.data_ptr<int64_t>(), cl.data_ptr<int64_t>(), B, H, KVH, D, S,
        bt.size(1), block_size, static_cast<float>(scale), vectorized);
  }
  return out;
}

// Write the new tokens' K and V ([T, num_kv_heads, hd], rows may be strided, as parts of a fused
// qkv output) into their slots of the caches ([num_kv_heads, num_slots, hd]): both in one pass,
// instead of two index_copy_ over transposed views.
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping) {
  check_cpu("write_kv", {&k, &v, &k_cache, &v_cache, &slot_mapping});
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes() && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "k/v [T, H, hd], caches [H, slots, hd]");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2),
              "k/v heads must be contiguous within a row");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == k_cache.scalar_type() &&
              v_cache.scalar_type() == k_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(k_cache.size(0) == k.size(1) && k_cache.size(2) == k.size(2), "shape mismatch");
  TORCH_CHECK(slot_mapping.scalar_type() == torch::kLong && slot_mapping.numel() == k.size(0), "one slot per token");
  auto slots = slot_mapping.contiguous();
  const int64_t T = k.size(0), H = k.size(1), D = k.size(2), S = k_cache.size(1);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sl[t] >= 0 && sl[t] < S, "slot out of range");
  const int64_t bytes = D * k.element_size();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t ks = k.stride(0) * k.element_size(), vs = v.stride(0) * v.element_size();
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t dst = (h * S + sl[t]) * bytes;
        std::memcpy(kc + dst, kp + t * ks + h * bytes, bytes);
        std::memcpy(vc + dst, vp + t * vs + h * bytes, bytes);
      }
  });
}
