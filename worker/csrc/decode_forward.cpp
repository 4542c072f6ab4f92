// A decode step's pass through every decoder layer in one call (CPU).
//
// The same ops, in the same order, as the Python model's forward of a decode-only batch
// (worker/model.py with the paged attention backend and these kernels), so the result is bitwise
// the same; what goes is Python's per-op cost (module calls, views, dispatch through the
// interpreter), ~15 ops a layer. Linear layers run as the model holds their weights: the panels
// of bf16_gemm.cpp, oneDNN's packed-weight op (through the dispatcher), or at::linear.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include "kernels.h"

namespace {

std::optional<at::Tensor> bias(const torch::Tensor& b) {  // an empty tensor stands for none
  return b.numel() ? std::optional<at::Tensor>(b) : std::nullopt;
}

torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                        c10::string_view, c10::List<std::optional<at::Scalar>>,
                        std::optional<c10::string_view>)>();
  return op.call(x, w, bias(b), "none",
                 c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

enum LinearLayout : int64_t { kPlain = 0, kOneDnn = 1, kPanels = 2, kF32Panels = 3 };  // PackedLinear's numbering

}  // namespace

// x [B, dim]: the batch's token embeddings. weights: per layer, in order, input norm, qkv weight,
// qkv bias (an empty tensor when none), output projection, post-attention norm, gate/up weight, down
// weight; then the final norm. cos/sin [B, hd/2] float32 at the tokens' positions. kv_cache
// [2, n_layers, n_kv_heads, slots, hd]. linear_layout: how the linear weights are held (plain,
// oneDNN-packed, or panels whose count times their width, 32 in bf16 and 16 in fp32, is the output
// size). Returns the final normed hidden states [B, dim].
torch::Tensor decode_forward(torch::Tensor x, const std::vector<torch::Tensor>& weights, int64_t linear_layout,
                             torch::Tensor cos, torch::Tensor sin, torch::Tensor kv_cache,
                             torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor context_lens,
                             int64_t n_heads, int64_t n_kv_heads, int64_t block_size, double scale, double eps) {
  check_cpu("decode_forward", {&x, &cos, &sin, &kv_cache, &slot_mapping, &block_tables, &context_lens});
  constexpr int64_t kPerLayer = 7;
  const int64_t n_layers = kv_cache.size(1);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == n_layers * kPerLayer + 1, "weights: 7 per layer + final norm");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [B, dim]");
  const int64_t B = x.size(0), dim = x.size(1), hd = kv_cache.size(4);
  const int64_t q_size = n_heads * hd, kv_size = n_kv_heads * hd;
  TORCH_CHECK(linear_layout >= kPlain && linear_layout <= kF32Panels, "unknown linear_layout ", linear_layout);
  auto linear = [linear_layout](const torch::Tensor& in, const torch::Tensor& w, const torch::Tensor& b) {
    if (linear_layout == kPanels) return bf16_linear(in, w, b, w.size(0) * w.size(2), false);
    if (linear_layout == kF32Panels) return f32_linear(in, w, b, w.size(0) * w.size(2));
    return linear_layout == kOneDnn ? packed_linear(in, w, b) : at::linear(in, w, bias(b));
  };
  const torch::Tensor none = torch::empty({0}, x.options());
  torch::Tensor residual;
  for (int64_t l = 0; l < n_layers; ++l) {
    const torch::Tensor* w = weights.data() + l * kPerLayer;
    if (l == 0) {
      residual = x;
      x = at::rms_norm(x, {dim}, w[0], eps);
    } else {
      add_rms_norm(x, residual, w[0], eps);
    }
    torch::Tensor qkv = linear(x, w[1], w[2]);
    torch::Tensor qk = qkv.narrow(1, 0, q_size + kv_size).view({B, n_heads + n_kv_heads, hd});
    rope_inplace(qk, cos, sin);
    torch::Tensor k = qk.narrow(1, n_heads, n_kv_heads);
    torch::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({B, n_kv_heads, hd});
    torch::Tensor k_cache = kv_cache[0][l], v_cache = kv_cache[1][l];
    write_kv(k, v, k_cache, v_cache, slot_mapping);
    torch::Tensor attn = decode_attention(qk.narrow(1, 0, n_heads), k_cache, v_cache, block_tables, context_lens,
                                          block_size, scale, false);
    x = linear(attn.view({B, q_size}), w[3], none);
    add_rms_norm(x, residual, w[4], eps);
    x = linear(silu_and_mul(linear(x, w[5], none)), w[6], none);
  }
  add_rms_norm(x, residual, weights.back(), eps);
  return x;
}
