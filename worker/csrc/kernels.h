// The compiled CPU kernels, callable from each other (the decode forward chains them).
#pragma once
#include <torch/extension.h>

#include <initializer_list>

// These kernels read and write host memory: a tensor on another device (a CUDA one, say) is refused
// with an error naming the kernel, where dereferencing its pointer would crash the process.
inline void check_cpu(const char* kernel, std::initializer_list<const torch::Tensor*> tensors) {
  for (const torch::Tensor* t : tensors)
    TORCH_CHECK(!t->defined() || t->device().is_cpu(), kernel, ": CPU tensors only, got one on ", t->device());
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
