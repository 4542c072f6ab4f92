// Fused elementwise ops of the decoder layer (CPU): RoPE in place on q and k, SiLU-and-mul, and
// residual add + RMSNorm. Each replaces several torch ops (and their temporaries) with one pass;
// arithmetic is fp32 whatever the storage dtype, as in the torch path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>

#include "common.h"
#include "kernels.h"

namespace {

template <typename T>
void rope_impl(T* x, const float* cos, const float* sin, int64_t tokens, int64_t heads, int64_t hd,
               int64_t stride_t, int64_t stride_h) {
  const int64_t half = hd / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        T* row = x + t * stride_t + h * stride_h;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = load(row, i), x2 = load(row, i + half);
          store(row, i, x1 * c[i] - x2 * s[i]);
          store(row, i + half, x2 * c[i] + x1 * s[i]);
        }
      }
    }
  });
}

template <typename T>
void silu_and_mul_impl(const T* in, T* out, int64_t tokens, int64_t d) {
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* g = in + t * 2 * d;
      const T* u = g + d;
      T* o = out + t * d;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= d; i += 16) {  // exp512: common.h; kept finite (-ffast-math divides by reciprocals)
        const __m512 gv = load16(g + i);
        const __m512 e = exp512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv), _mm512_set1_ps(88.f)));
        store16(o + i, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)), load16(u + i)));
      }
#endif
      for (; i < d; ++i) {
        const float gv = load(g, i);
        store(o, i, gv / (1.f + std::exp(-gv)) * load(u, i));
      }
    }
  });
}

template <typename T>
void add_rms_norm_impl(T* x, T* residual, const T* weight, int64_t tokens, int64_t d, float eps) {
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      T* xr = x + t * d;
      T* rr = residual + t * d;
      float ss = 0.f;
      for (int64_t i = 0; i < d; ++i) {
        const float v = load(xr, i) + load(rr, i);
        store(rr, i, v);
        const float vr = load(rr, i);  // normalize what the residual stores, as the torch path does
        ss += vr * vr;
      }
      const float inv = 1.f / std::sqrt(ss / d + eps);
      for (int64_t i = 0; i < d; ++i) store(xr, i, load(weight, i) * (load(rr, i) * inv));
    }
  });
}

template <typename F>
void dispatch(const torch::Tensor& t, F&& f) {
  if (t.scalar_type() == torch::kFloat) {
    f(static_cast<float*>(nullptr));
  } else {
    TORCH_CHECK(t.scalar_type() == torch::kBFloat16, "float32 or bfloat16 only");
    f(static_cast<uint16_t*>(nullptr));
  }
}

}  // namespace

// x [T, H, hd] (last dim contiguous), cos/sin [T, hd/2] float32: rotated in place.
void rope_inplace(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  check_cpu("rope_inplace", {&x, &cos, &sin});
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [T, H, hd] with contiguous rows");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && cos.is_contiguous() && sin.is_contiguous(), "cos/sin");
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rope_impl<T>(reinterpret_cast<T*>(x.data_ptr()), cos.data_ptr<float>(), sin.data_ptr<float>(), x.size(0),
                 x.size(1), x.size(2), x.stride(0), x.stride(1));
  });
}

// in [T, 2*d] (gate then up) -> silu(gate) * up [T, d].
torch::Tensor silu_and_mul(torch::Tensor in) {
  check_cpu("silu_and_mul", {&in});
  TORCH_CHECK(in.dim() == 2 && in.is_contiguous() && in.size(1) % 2 == 0, "in must be contiguous [T, 2d]");
  const int64_t d = in.size(1) / 2;
  auto out = torch::empty({in.size(0), d}, in.options());
  dispatch(in, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    silu_and_mul_impl<T>(reinterpret_cast<const T*>(in.data_ptr()), reinterpret_cast<T*>(out.data_ptr()),
                         in.size(0), d);
  });
  return out;
}

// residual += x; x = rms_norm(residual) * weight (both in place).
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps) {
  check_cpu("add_rms_norm", {&x, &residual, &weight});
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(x.sizes() == residual.sizes() && x.scalar_type() == residual.scalar_type() &&
              weight.scalar_type() == x.scalar_type(), "shape/dtype mismatch");
  dispatch(x, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    add_rms_norm_impl<T>(reinterpret_cast<T*>(x.data_ptr()), reinterpret_cast<T*>(residual.data_ptr()),
                         reinterpret_cast<const T*>(weight.data_ptr()), x.size(0), x.size(1),
                         static_cast<float>(eps));
  });
}
