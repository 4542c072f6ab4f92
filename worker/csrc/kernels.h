// The compiled CPU kernels, callable from each other (the decode forward chains them).
#pragma once
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <initializer_list>

// These kernels read and write host memory: a tensor on another device (a CUDA one, say) is refused
// with an error naming the kernel, where dereferencing its pointer would crash the process.
inline void check_cpu(const char* kernel, std::initializer_list<const torch::Tensor*> tensors) {
  for (const torch::Tensor* t : tensors)
    TORCH_CHECK(!t->defined() || t->device().is_cpu(), kernel, ": CPU tensors only, got one on ", t->device());
}

// Runs fn(tile) for every tile in [0, tiles) on the intra-op threads, each thread taking the next
// tile as it finishes one: where another process shares a core (a router, a second worker, the
// test suite), the thread that is preempted takes fewer tiles, where a static split into one range
// per thread would make the whole call wait for it.
template <typename F>
void parallel_tiles(int64_t tiles, const F& fn) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), tiles);
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < tiles; ++t) fn(t);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < tiles; t = next.fetch_add(1)) fn(t);
  });
}

// A linear layer's bias as its panel kernel reads it: float32, zero-padded to `panels * width`
// outputs; an undefined tensor for no bias. A bias already in that form (padded once, when the
// weight was packed) is used as it is.
inline torch::Tensor panel_bias(const char* kernel, const torch::Tensor& bias, int64_t panels, int64_t width,
                                int64_t out_features) {
  if (!bias.numel()) return {};
  const int64_t padded = panels * width;
  TORCH_CHECK(bias.numel() == out_features || bias.numel() == padded, kernel, ": bias has ", bias.numel(),
              " elements");
  if (bias.numel() == padded && bias.scalar_type() == torch::kFloat && bias.is_contiguous()) return bias;
  auto out = torch::zeros({padded}, bias.options().dtype(torch::kFloat));
  out.narrow(0, 0, out_features).copy_(bias.reshape({-1}).narrow(0, 0, out_features));
  return out;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor block_tables, torch::Tensor context_lens,
                               int64_t block_size, double scale, bool portable);
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping);
void rope_inplace(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_and_mul(torch::Tensor in);
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
torch::Tensor decode_forward(torch::Tensor x, const std::vector<torch::Tensor>& weights, int64_t linear_layout,
                             torch::Tensor cos, torch::Tensor sin, torch::Tensor kv_cache,
                             torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor context_lens,
                             int64_t n_heads, int64_t n_kv_heads, int64_t block_size, double scale, double eps);
bool bf16_gemm_available();
torch::Tensor pack_bf16_weight(torch::Tensor weight);
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, int64_t out_features,
                          bool out_fp32);
bool f32_gemm_available();
torch::Tensor pack_f32_weight(torch::Tensor weight);
torch::Tensor f32_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, int64_t out_features);
bool prefill_attention_applies(const torch::Tensor& q, int64_t head_dim);
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor key_slots,
                                torch::Tensor positions, int64_t start_pos, double scale);
