// Schemas of the iwd_fast ops and the (empty) Python module iwd_fast._C.
//
// The ops are the compiled backends of the layer ops in iwd_fast/reference.py (the specification).
// Kernels are registered per dispatch key in csrc/cpu/grad_dot_cpu.cpp (CPU) and
// csrc/cuda/grad_dot_cuda.cu (CUDA); fake (meta) kernels live in iwd_fast/_ops.py.
// Importing iwd_fast._C loads this shared library, which runs the registrations below; the module
// itself defines nothing (the ops are reached through torch.ops.iwd_fast.*).
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "iwd_fast compiled ops; use torch.ops.iwd_fast.* or the wrappers in iwd_fast._ops",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
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
