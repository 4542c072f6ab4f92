// Prefill attention over the paged KV cache with AVX512-BF16 (flash-style, CPU, bf16).
//
// torch's CPU flash attention runs head_dim-64 bf16 prefills at 65-110 GFLOPS on the CPUs this
// was measured on, about a quarter of what the same cores give the linear layers, and past ~2k
// tokens of context attention is most of a prefill chunk. Here both products run on the linear
// layers' microkernel (bf16_panels.h): each KV head's keys are packed once per call into panels of
// 32 keys (S = Q K^T, fp32), its values into panels of 32 head dims over pairs of keys (O += P V,
// P rounded to bf16 as flash attention does on GPUs); blocks of 12 queries of one head walk blocks
// of 64 keys with an online softmax (fp32) and skip the blocks past their last visible key.
//
// Query i sees keys 0..limit(i) of `key_slots` (the request's positions 0.. in order): limit(i) =
// start_pos + i for a contiguous chunk after `start_pos` cached tokens, positions[i] for the
// sparse positions of a blend piece (sorted). GQA: query head h reads KV head h / (H / KVH).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "bf16_panels.h"
#include "common.h"
#include "kernels.h"

namespace {

constexpr int64_t kQueryRows = kMaxRows;  // queries of one head per task
constexpr int64_t kKeys = 2 * kPanel;     // keys per block: two key panels
constexpr int kVecs = kKeys / 16;          // fp32 vectors of a row's scores

#if defined(__AVX512BF16__)

// One block of kKeys keys of one KV head into its two key panels of 32 keys, [hd/2][32 keys][2];
// keys past `num_keys` are zero.
void pack_keys(const uint16_t* cache, int64_t slot_stride, const int64_t* slots, int64_t num_keys, int64_t hd,
               uint16_t* out) {
  for (int64_t c = 0; c < kKeys; ++c) {
    uint16_t* panel = out + c / kPanel * kPanel * hd;
    const int64_t col = c % kPanel;
    const uint16_t* row = c < num_keys ? cache + slots[c] * slot_stride : nullptr;
    for (int64_t p = 0; p < hd / 2; ++p) {
      panel[p * 2 * kPanel + col * 2] = row ? row[2 * p] : 0;
      panel[p * 2 * kPanel + col * 2 + 1] = row ? row[2 * p + 1] : 0;
    }
  }
}

// One block of kKeys values of one KV head into hd/32 value panels of [kKeys/2 key pairs][32 dims][2].
void pack_values(const uint16_t* cache, int64_t slot_stride, const int64_t* slots, int64_t num_keys, int64_t hd,
                 uint16_t* out) {
  for (int64_t c = 0; c < kKeys; ++c) {
    const int64_t kp = c / 2, t = c % 2;
    const uint16_t* row = c < num_keys ? cache + slots[c] * slot_stride : nullptr;
    for (int64_t d = 0; d < hd; ++d)
      out[(d / kPanel * (kKeys / 2) + kp) * 2 * kPanel + d % kPanel * 2 + t] = row ? row[d] : 0;
  }
}

// One task: `rows` queries (of one head, rows `ldq` apart) against their KV head's packed blocks.
void attend_rows(const uint16_t* q, int64_t ldq, int64_t rows, const int64_t* limit, const uint16_t* keys,
                 const uint16_t* values, int64_t hd, float scale, uint16_t* out, int64_t ldo) {
  alignas(64) float s[kQueryRows][kKeys];
  float pv[kQueryRows][256];
  alignas(64) uint16_t p16[kQueryRows][kKeys];
  float m[kQueryRows], l[kQueryRows];
  std::vector<float> acc(rows * hd, 0.0f);
  for (int64_t r = 0; r < rows; ++r) m[r] = -1e30f, l[r] = 0.0f;
  const int64_t blocks = limit[rows - 1] / kKeys + 1;  // limits ascend: the last row sees the most
  const BlockFn qk = kBlocks[rows];
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t kp = 0; kp < kKeys / kPanel; ++kp)
      qk(q, ldq, hd / 2, keys + (b * kKeys + kp * kPanel) * hd, nullptr, &s[0][kp * kPanel], kKeys, true, kPanel,
         nullptr);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t visible = std::clamp<int64_t>(limit[r] - b * kKeys + 1, 0, kKeys);
      __mmask16 mask[kVecs];
      __m512 sv[kVecs];
      __m512 vmax = _mm512_set1_ps(-1e30f);
      for (int i = 0; i < kVecs; ++i) {
        const int64_t left = std::clamp<int64_t>(visible - 16 * i, 0, 16);
        mask[i] = left >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
        sv[i] = _mm512_mask_mul_ps(_mm512_set1_ps(-1e30f), mask[i], _mm512_load_ps(s[r] + 16 * i), vscale);
        vmax = _mm512_max_ps(vmax, sv[i]);
      }
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(vmax));
      const __m512 mn = _mm512_set1_ps(m_new);
      __m512 sum = _mm512_setzero_ps();
      for (int i = 0; i < kVecs; ++i) {
        const __m512 pi = _mm512_maskz_mov_ps(mask[i], exp512(_mm512_sub_ps(sv[i], mn)));
        sum = _mm512_add_ps(sum, pi);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p16[r] + 16 * i), (__m256i)_mm512_cvtneps_pbh(pi));
      }
      const float correction = std::exp(m[r] - m_new);
      m[r] = m_new;
      l[r] = l[r] * correction + _mm512_reduce_add_ps(sum);
      if (correction != 1.0f) {
        const __m512 c = _mm512_set1_ps(correction);
        for (int64_t d = 0; d < hd; d += 16)
          _mm512_storeu_ps(&acc[r * hd + d], _mm512_mul_ps(_mm512_loadu_ps(&acc[r * hd + d]), c));
      }
    }
    const uint16_t* vb = values + b * kKeys * hd;
    for (int64_t hp = 0; hp < hd / kPanel; ++hp)
      qk(&p16[0][0], kKeys, kKeys / 2, vb + hp * kKeys * kPanel, nullptr, &pv[0][hp * kPanel], 256, true,
         kPanel, nullptr);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t d = 0; d < hd; d += 16)
        _mm512_storeu_ps(&acc[r * hd + d],
                         _mm512_add_ps(_mm512_loadu_ps(&acc[r * hd + d]), _mm512_loadu_ps(&pv[r][d])));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
    for (int64_t d = 0; d < hd; d += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(&acc[r * hd + d]), inv)));
  }
}

#endif

}  // namespace

bool prefill_attention_applies(const torch::Tensor& q, int64_t head_dim) {
#if defined(__AVX512BF16__)
  return q.device().is_cpu() && q.scalar_type() == torch::kBFloat16 && head_dim % kPanel == 0 && head_dim <= 256;
#else
  return false;
#endif
}

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor key_slots,
                                torch::Tensor positions, int64_t start_pos, double scale) {
  check_cpu("prefill_attention", {&q, &k_cache, &v_cache, &key_slots, &positions});
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(),
              "prefill_attention: q [T, H, hd], caches [KVH, slots, hd]");
  const int64_t n = q.size(0), heads = q.size(1), hd = q.size(2), kv_heads = k_cache.size(0);
  TORCH_CHECK(prefill_attention_applies(q, hd), "prefill_attention: bf16 CPU queries with head_dim a multiple of 32");
  TORCH_CHECK(k_cache.scalar_type() == torch::kBFloat16 && v_cache.scalar_type() == torch::kBFloat16 &&
                  k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "prefill_attention: bf16 CPU caches");
  TORCH_CHECK(k_cache.size(2) == hd && k_cache.stride(2) == 1 && v_cache.stride(2) == 1 &&
                  k_cache.stride(1) == v_cache.stride(1) && k_cache.stride(0) == v_cache.stride(0),
              "prefill_attention: caches of one layout, head_dim contiguous");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == hd, "prefill_attention: q's heads must be contiguous rows");
  TORCH_CHECK(heads % kv_heads == 0, "prefill_attention: query heads must be a multiple of KV heads");
  key_slots = key_slots.to(torch::kInt64).contiguous();
  const int64_t num_keys = key_slots.numel();
  // each query's last visible key, ascending
  torch::Tensor limits = positions.numel() ? positions.to(torch::kInt64).contiguous()
                                           : torch::arange(start_pos, start_pos + n, key_slots.options());
  TORCH_CHECK(limits.numel() == n, "prefill_attention: one position per query");
  auto out = torch::empty({n, heads * hd}, q.options().memory_format(c10::MemoryFormat::Contiguous));
  if (n == 0) return out;
  const int64_t* lim = limits.data_ptr<int64_t>();
  TORCH_CHECK(lim[0] >= 0 && lim[n - 1] < num_keys, "prefill_attention: a query sees past its keys");
  for (int64_t i = 1; i < n; ++i) TORCH_CHECK(lim[i] >= lim[i - 1], "prefill_attention: positions must ascend");
#if defined(__AVX512BF16__)
  const int64_t blocks = lim[n - 1] / kKeys + 1, block_elems = kKeys * hd;
  auto packed = torch::empty({2, kv_heads, blocks * block_elems}, q.options());
  auto* kp = reinterpret_cast<uint16_t*>(packed[0].data_ptr());
  auto* vp = reinterpret_cast<uint16_t*>(packed[1].data_ptr());
  const auto* kc = reinterpret_cast<const uint16_t*>(k_cache.data_ptr());
  const auto* vc = reinterpret_cast<const uint16_t*>(v_cache.data_ptr());
  const int64_t* slots = key_slots.data_ptr<int64_t>();
  const int64_t head_stride = k_cache.stride(0), slot_stride = k_cache.stride(1);
  at::parallel_for(0, 2 * kv_heads * blocks, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t which = t / (kv_heads * blocks), g = t / blocks % kv_heads, b = t % blocks;  // K or V
      const int64_t offset = g * blocks * block_elems + b * block_elems;
      auto pack = which == 0 ? pack_keys : pack_values;
      pack((which == 0 ? kc : vc) + g * head_stride, slot_stride, slots + b * kKeys,
           std::max<int64_t>(0, num_keys - b * kKeys), hd, (which == 0 ? kp : vp) + offset);
    }
  });
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t ldq = q.stride(0), group = heads / kv_heads, q_blocks = (n + kQueryRows - 1) / kQueryRows;
  const int64_t tasks = heads * q_blocks;
  const int threads = at::get_num_threads();
  // later query blocks see more keys: dynamic scheduling, the longest first
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t qb = q_blocks - 1 - t / heads, h = t % heads, g = h / group;
    const int64_t r0 = qb * kQueryRows, rows = std::min(kQueryRows, n - r0);
    attend_rows(qp + r0 * ldq + h * hd, ldq, rows, lim + r0, kp + g * blocks * block_elems,
                vp + g * blocks * block_elems, hd, static_cast<float>(scale), op + r0 * heads * hd + h * hd,
                heads * hd);
  }
#endif
  return out;
}
