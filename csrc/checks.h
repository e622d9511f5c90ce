// Entry checks shared by the CPU and CUDA implementations of the iwd_fast ops.
//
// Every op validates shapes, dtypes and devices here before touching data, so both backends reject
// bad input with the same one-line message. Shapes follow iwd_fast/scoring/eager_ops.py:
//   conv_dot:          x [B, Cin, H, W], v [K, Cout, Cin/groups, kh, kw], delta [B, Cout, Ho, Wo]
//   linear_dot:          a [B, T, d], v [K, p, d], delta [B, T, p]
//   affine_dot:          delta [B, C, P], v_bias [K, C], xhat [B, C, P], v_weight [K, C]
//   linear_grad_norm_sq: a [B, T, d], delta [B, T, p]
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>

namespace iwd_fast {

// float16/bfloat16 inputs accumulate and return in float32; float32/float64 keep their dtype.
inline at::ScalarType result_dtype(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline void check_floating(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "iwd_fast::", op, ": ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
}

// `other` must share dtype and device with `ref`.
inline void check_like(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& other,
                       const char* name) {
  TORCH_CHECK(other.scalar_type() == ref.scalar_type(), "iwd_fast::", op, ": dtype mismatch: ", ref_name,
              " is ", ref.scalar_type(), " but ", name, " is ", other.scalar_type());
  TORCH_CHECK(other.device() == ref.device(), "iwd_fast::", op, ": device mismatch: ", ref_name, " is on ",
              ref.device(), " but ", name, " is on ", other.device());
}

inline void check_dim(const char* op, const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "iwd_fast::", op, ": ", name, " must be ", dim, "-d ", layout, ", got shape ",
              t.sizes());
}

// Geometry of one conv_dot call, after validation.
struct ConvDims {
  int64_t B, Cin, H, W;           // input
  int64_t K, Cout, Cin_g, kh, kw;  // directions
  int64_t Ho, Wo;                  // output
  int64_t groups, cpg;             // cpg = Cout / groups
  int64_t sh, sw, ph, pw, dh, dw;
};

inline ConvDims check_conv_dot(const at::Tensor& x, const at::Tensor& v, const at::Tensor& delta,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
  const char* op = "conv_dot";
  check_dim(op, x, 4, "x", "[B, Cin, H, W]");
  check_dim(op, v, 5, "v", "[K, Cout, Cin/groups, kh, kw]");
  check_dim(op, delta, 4, "delta", "[B, Cout, Ho, Wo]");
  check_floating(op, x, "x");
  check_like(op, x, "x", v, "v");
  check_like(op, x, "x", delta, "delta");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, "iwd_fast::", op,
              ": stride, padding and dilation need 2 entries each, got ", stride, ", ", padding, ", ", dilation);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "iwd_fast::", op, ": stride must be positive, got ", stride);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, "iwd_fast::", op, ": dilation must be positive, got ", dilation);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "iwd_fast::", op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(groups >= 1, "iwd_fast::", op, ": groups must be >= 1, got ", groups);

  ConvDims c{};
  c.B = x.size(0); c.Cin = x.size(1); c.H = x.size(2); c.W = x.size(3);
  c.K = v.size(0); c.Cout = v.size(1); c.Cin_g = v.size(2); c.kh = v.size(3); c.kw = v.size(4);
  c.groups = groups;
  c.sh = stride[0]; c.sw = stride[1]; c.ph = padding[0]; c.pw = padding[1]; c.dh = dilation[0]; c.dw = dilation[1];
  TORCH_CHECK(c.Cin % groups == 0 && c.Cout % groups == 0, "iwd_fast::", op, ": Cin (", c.Cin, ") and Cout (",
              c.Cout, ") must be divisible by groups (", groups, ")");
  TORCH_CHECK(c.Cin_g * groups == c.Cin, "iwd_fast::", op, ": v has ", c.Cin_g, " input channels per group but x has ",
              c.Cin, " channels in ", groups, " groups (v must be [K, Cout, Cin/groups, kh, kw])");
  TORCH_CHECK(c.kh > 0 && c.kw > 0, "iwd_fast::", op, ": empty kernel ", v.sizes());
  c.cpg = c.Cout / groups;
  const int64_t eff_h = c.dh * (c.kh - 1) + 1, eff_w = c.dw * (c.kw - 1) + 1;
  TORCH_CHECK(c.H + 2 * c.ph >= eff_h && c.W + 2 * c.pw >= eff_w, "iwd_fast::", op, ": kernel (", c.kh, "x", c.kw,
              ", dilation ", dilation, ") is larger than the padded input (", c.H + 2 * c.ph, "x", c.W + 2 * c.pw, ")");
  c.Ho = (c.H + 2 * c.ph - eff_h) / c.sh + 1;
  c.Wo = (c.W + 2 * c.pw - eff_w) / c.sw + 1;
  TORCH_CHECK(delta.size(0) == c.B && delta.size(1) == c.Cout && delta.size(2) == c.Ho && delta.size(3) == c.Wo,
              "iwd_fast::", op, ": delta must be [B, Cout, Ho, Wo] = [", c.B, ", ", c.Cout, ", ", c.Ho, ", ", c.Wo,
              "] for x ", x.sizes(), " and v ", v.sizes(), ", got ", delta.sizes());
  return c;
}

struct LinearDims {
  int64_t B, T, d, K, p;
};

inline LinearDims check_linear_dot(const at::Tensor& a, const at::Tensor& v, const at::Tensor& delta) {
  const char* op = "linear_dot";
  check_dim(op, a, 3, "a", "[B, T, d]");
  check_dim(op, v, 3, "v", "[K, p, d]");
  check_dim(op, delta, 3, "delta", "[B, T, p]");
  check_floating(op, a, "a");
  check_like(op, a, "a", v, "v");
  check_like(op, a, "a", delta, "delta");
  LinearDims l{a.size(0), a.size(1), a.size(2), v.size(0), v.size(1)};
  TORCH_CHECK(v.size(2) == l.d, "iwd_fast::", op, ": v is [K, p, d] with d = ", v.size(2), " but a has d = ", l.d);
  TORCH_CHECK(delta.size(0) == l.B && delta.size(1) == l.T && delta.size(2) == l.p, "iwd_fast::", op,
              ": delta must be [B, T, p] = [", l.B, ", ", l.T, ", ", l.p, "], got ", delta.sizes());
  return l;
}

struct AffineDims {
  int64_t B, C, P, K;
};

inline AffineDims check_affine_dot(const at::Tensor& delta, const std::optional<at::Tensor>& v_bias,
                                   const std::optional<at::Tensor>& xhat, const std::optional<at::Tensor>& v_weight) {
  const char* op = "affine_dot";
  check_dim(op, delta, 3, "delta", "[B, C, P]");
  check_floating(op, delta, "delta");
  TORCH_CHECK(v_bias.has_value() || v_weight.has_value(), "iwd_fast::", op, ": give v_bias or v_weight");
  AffineDims s{delta.size(0), delta.size(1), delta.size(2), -1};
  if (v_bias.has_value()) {
    check_dim(op, *v_bias, 2, "v_bias", "[K, C]");
    check_like(op, delta, "delta", *v_bias, "v_bias");
    TORCH_CHECK(v_bias->size(1) == s.C, "iwd_fast::", op, ": v_bias must be [K, C] with C = ", s.C, ", got ",
                v_bias->sizes());
    s.K = v_bias->size(0);
  }
  if (v_weight.has_value()) {
    TORCH_CHECK(xhat.has_value(), "iwd_fast::", op, ": v_weight needs xhat");
    check_dim(op, *v_weight, 2, "v_weight", "[K, C]");
    check_like(op, delta, "delta", *v_weight, "v_weight");
    check_like(op, delta, "delta", *xhat, "xhat");
    TORCH_CHECK(v_weight->size(1) == s.C, "iwd_fast::", op, ": v_weight must be [K, C] with C = ", s.C, ", got ",
                v_weight->sizes());
    TORCH_CHECK(xhat->sizes() == delta.sizes(), "iwd_fast::", op, ": xhat must have the shape of delta ",
                delta.sizes(), ", got ", xhat->sizes());
    TORCH_CHECK(s.K < 0 || s.K == v_weight->size(0), "iwd_fast::", op, ": v_bias has K = ", s.K,
                " directions but v_weight has ", v_weight->size(0));
    s.K = v_weight->size(0);
  }
  return s;
}

enum class NormMethod { kGhost, kMaterialize };

inline NormMethod check_linear_grad_norm_sq(const at::Tensor& a, const at::Tensor& delta, c10::string_view method) {
  const char* op = "linear_grad_norm_sq";
  check_dim(op, a, 3, "a", "[B, T, d]");
  check_dim(op, delta, 3, "delta", "[B, T, p]");
  check_floating(op, a, "a");
  check_like(op, a, "a", delta, "delta");
  TORCH_CHECK(delta.size(0) == a.size(0) && delta.size(1) == a.size(1), "iwd_fast::", op,
              ": a [B, T, d] and delta [B, T, p] must agree on B and T, got ", a.sizes(), " and ", delta.sizes());
  if (method == "ghost") return NormMethod::kGhost;
  TORCH_CHECK(method == "materialize", "iwd_fast::", op, ": unknown method '", std::string(method.data(), method.size()),
              "' (the compiled op takes 'ghost' or 'materialize'; the Python wrapper resolves 'auto')");
  return NormMethod::kMaterialize;
}

}  // namespace iwd_fast
