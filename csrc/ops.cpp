// Schemas of the iwd_fast ops and the Python module iwd_fast._C (pybind11 module glue).
//
// The ops are the compiled backends of the layer ops in iwd_fast/scoring/eager_ops.py (the
// specification). Kernels are registered per dispatch key in csrc/cpu/grad_dot_cpu.cpp (CPU) and
// csrc/cuda/grad_dot_cuda.cu (CUDA); fake (meta) kernels live in iwd_fast/scoring/backends/compiled_ops.py.
// Importing iwd_fast._C loads this shared library, which runs the registrations below; the ops are
// reached through torch.ops.iwd_fast.*. The module itself only reports how it was built.
//
// pybind11 comes from torch's own include tree (torch ships the copy it was built with), so the module
// glue always matches the torch it links against.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#ifndef IWD_FAST_TORCH_VERSION
#define IWD_FAST_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "iwd_fast compiled ops; use torch.ops.iwd_fast.* or iwd_fast.scoring.backends.compiled_ops";
  m.def(
      "build_info",
      []() {
        py::dict info;
#ifdef IWD_FAST_WITH_CUDA
        info["cuda_kernels"] = true;
#else
        info["cuda_kernels"] = false;
#endif
#ifdef _OPENMP
        info["openmp"] = true;
#else
        info["openmp"] = false;
#endif
        info["torch_version"] = IWD_FAST_TORCH_VERSION;
        return info;
      },
      "How this extension was built: {'cuda_kernels': bool, 'openmp': bool, 'torch_version': str}.");
}

TORCH_LIBRARY(iwd_fast, m) {
  // s[i, k] = sum_{c, pos} conv2d(x_i; v_k)[c, pos] * delta_i[c, pos]   -> [B, K]
  m.def("conv_dot(Tensor x, Tensor v, Tensor delta, int[] stride, int[] padding, int[] dilation, int groups)"
        " -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // s[i, k] = sum_t delta[i, t] . (v_k a[i, t])                           -> [B, K]
  m.def("linear_dot(Tensor a, Tensor v, Tensor delta) -> Tensor", {at::Tag::pt2_compliant_tag});
  // s[i, k] = sum_c v_bias[k, c] sum_pos delta + v_weight[k, c] sum_pos xhat * delta   -> [B, K]
  m.def("affine_dot(Tensor delta, Tensor? v_bias, Tensor? xhat, Tensor? v_weight) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // ||delta_i^T a_i||_F^2, method "ghost" or "materialize"               -> [B]
  m.def("linear_grad_norm_sq(Tensor a, Tensor delta, str method) -> Tensor", {at::Tag::pt2_compliant_tag});
}
