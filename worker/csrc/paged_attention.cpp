// Decode attention over a paged KV cache on the CPU.
//
// One query token per sequence; every group of query heads that shares a KV head is handled by
// one task (sequence, kv head), so each K/V vector is read once from the cache and used for the
// whole group. Two passes per task: scores for the whole context (fp32), then softmax and the
// weighted sum of V. The inner loops are plain C++ that the compiler vectorizes (-O3 -march=native);
// bf16 is widened to fp32 by a shift.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

template <typename T>
void decode_attention_impl(const T* q, const T* k_cache, const T* v_cache, T* out,
                           const int64_t* block_tables, const int64_t* context_lens,
                           int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           int64_t num_slots, int64_t max_blocks, int64_t block_size, float scale) {
  const int64_t group = num_heads / num_kv_heads;
  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim), row(head_dim), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, h = task % num_kv_heads;
      const int64_t ctx = context_lens[b];
      const int64_t* bt = block_tables + b * max_blocks;
      const T* kh = k_cache + h * num_slots * head_dim;
      const T* vh = v_cache + h * num_slots * head_dim;
      for (int64_t r = 0; r < group; ++r)
        for (int64_t d = 0; d < head_dim; ++d)
          qf[r * head_dim + d] = load(q, (b * num_heads + h * group + r) * head_dim + d) * scale;
      scores.assign(group * ctx, 0.f);
      for (int64_t t = 0; t < ctx; ++t) {
        const int64_t slot = bt[t / block_size] * block_size + t % block_size;
        const T* kv = kh + slot * head_dim;
        float* kr = row.data();
        for (int64_t d = 0; d < head_dim; ++d) kr[d] = load(kv, d);
        for (int64_t r = 0; r < group; ++r) {
          const float* qr = qf.data() + r * head_dim;
          float s = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) s += qr[d] * kr[d];
          scores[r * ctx + t] = s;
        }
      }
      for (int64_t r = 0; r < group; ++r) {
        float* sr = scores.data() + r * ctx;
        float m = -INFINITY, sum = 0.f;
        for (int64_t t = 0; t < ctx; ++t) m = std::max(m, sr[t]);
        for (int64_t t = 0; t < ctx; ++t) { sr[t] = std::exp(sr[t] - m); sum += sr[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < ctx; ++t) sr[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < ctx; ++t) {
        const int64_t slot = bt[t / block_size] * block_size + t % block_size;
        const T* vv = vh + slot * head_dim;
        float* vr = row.data();
        for (int64_t d = 0; d < head_dim; ++d) vr[d] = load(vv, d);
        for (int64_t r = 0; r < group; ++r) {
          const float p = scores[r * ctx + t];
          float* ar = acc.data() + r * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) ar[d] += p * vr[d];
        }
      }
      for (int64_t r = 0; r < group; ++r)
        for (int64_t d = 0; d < head_dim; ++d)
          store(out, (b * num_heads + h * group + r) * head_dim + d, acc[r * head_dim + d]);
    }
  });
}

}  // namespace

// q [B, num_heads, hd]; k_cache/v_cache [num_kv_heads, num_slots, hd]; block_tables [B, max_blocks]
// int64; context_lens [B] int64. Returns [B, num_heads, hd] in q's dtype.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens,
                               int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "inputs must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(block_tables.scalar_type() == torch::kLong && context_lens.scalar_type() == torch::kLong, "int64 tables");
  auto bt = block_tables.contiguous();
  auto cl = context_lens.contiguous();
  auto out = torch::empty_like(q);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(0), S = k_cache.size(1);
  TORCH_CHECK(H % KVH == 0 && k_cache.size(2) == D, "shape mismatch");
  if (q.scalar_type() == torch::kFloat) {
    decode_attention_impl<float>(q.data_ptr<float>(), k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
                                 out.data_ptr<float>(), bt.data_ptr<int64_t>(), cl.data_ptr<int64_t>(),
                                 B, H, KVH, D, S, bt.size(1), block_size, static_cast<float>(scale));
  } else {
    TORCH_CHECK(q.scalar_type() == torch::kBFloat16, "float32 or bfloat16 only");
    decode_attention_impl<uint16_t>(
        reinterpret_cast<const uint16_t*>(q.data_ptr()), reinterpret_cast<const uint16_t*>(k_cache.data_ptr()),
        reinterpret_cast<const uint16_t*>(v_cache.data_ptr()), reinterpret_cast<uint16_t*>(out.data_ptr()),
        bt.data_ptr<int64_t>(), cl.data_ptr<int64_t>(), B, H, KVH, D, S, bt.size(1), block_size,
        static_cast<float>(scale));
  }
  return out;
}

