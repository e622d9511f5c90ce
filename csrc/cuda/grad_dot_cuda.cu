// CUDA kernels of the iwd_fast ops (float32, float16, bfloat16 and float64; fp32 accumulation for the
// half types, results in float32 for them).
//
// conv_dot and linear_dot share one implicit-GEMM kernel with a fused epilogue. Per batch item
// z = (sample i, group g) the GEMM is
//     Y[m, n] = sum_r A[m, r] * Bm[r, n]
//     m: output position (ho, wo) (linear: the token t)            M = Ho*Wo   (linear: T)
//     n = k*cpg + c: direction k, output channel c of the group    N = K*cpg   (linear: K*p)
//     r = (ci, ky, kx): input channel and kernel tap               R = Cin_g*kh*kw (linear: d)
//     A[m, r] = x[i, g*Cin_g + ci, ho*sh - ph + ky*dh, wo*sw - pw + kx*dw]  (0 outside the input)
//     Bm[r, n] = v[k, g*cpg + c, ci, ky, kx]
// A is never materialised (im2col happens in the shared-memory loads) and neither is Y: the epilogue
// multiplies each Y[m, n] by delta[i, g*cpg + c, m] and sums over the tile's positions, writing one
// partial per (z, position tile, n). A second kernel sums, for every (i, k), the partials over groups,
// position tiles and channels in a fixed order (deterministic, no atomics).
// Linear is the same GEMM with H = T, W = 1, a 1x1 kernel and a's strides.
//
// affine_dot and linear_grad_norm_sq are small reductions/batched GEMMs: ATen calls on the CUDA key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../checks.h"

namespace iwd_fast {
namespace {

constexpr int kBM = 64;       // positions per tile
constexpr int kBN = 64;       // output columns (direction x channel) per tile
constexpr int kBR = 16;       // reduction slice held in shared memory
constexpr int kThreads = 256;  // 16 x 16 threads, each owning a 4 x 4 block of the tile
constexpr int kTM = 4;
constexpr int kTN = 4;
constexpr int kThreadCols = kBN / kTN;       // 16
constexpr int kThreadRows = kThreads / kThreadCols;  // 16
static_assert(kThreadRows * kTM == kBM, "tile rows");
constexpr int kReduceThreads = 256;

// Geometry of one dot-GEMM launch (see the header comment). All element strides, int64.
struct DotGemmGeom {
  int64_t M, N, R;                 // GEMM sizes per batch item
  int64_t groups, cpg, K, Cout;    // N = K*cpg; v is contiguous [K, Cout, R]
  int64_t Cin_g, H, W, kh, kw, Wo;
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t sxb, sxc, sxh, sxw;      // x strides: sample, channel, row, column
  int64_t sdb, sdc, sdh, sdw;      // delta strides: sample, channel, output row, output column
  int64_t m_tiles;                 // ceil(M / kBM)
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t load_a(const scalar_t* __restrict__ x, const DotGemmGeom& gm, int64_t i, int64_t g,
                                        int64_t m, int64_t r) {
  if (m >= gm.M || r >= gm.R) return acc_t(0);
  const int64_t taps = gm.kh * gm.kw;
  const int64_t ci = r / taps;
  const int64_t tap = r - ci * taps;
  const int64_t ky = tap / gm.kw;
  const int64_t kx = tap - ky * gm.kw;
  const int64_t ho = m / gm.Wo;
  const int64_t wo = m - ho * gm.Wo;
  const int64_t h = ho * gm.sh - gm.ph + ky * gm.dh;
  const int64_t w = wo * gm.sw - gm.pw + kx * gm.dw;
  if (h < 0 || h >= gm.H || w < 0 || w >= gm.W) return acc_t(0);
  return static_cast<acc_t>(x[i * gm.sxb + (g * gm.Cin_g + ci) * gm.sxc + h * gm.sxh + w * gm.sxw]);
}

// Partial sums of one (sample, group, position tile, column tile):
//   partials[((i*groups + g)*m_tiles + mt)*N + n] = sum_{m in tile} Y[m, n] * delta[i, g*cpg + n % cpg, m].
// A_M_FAST picks the thread-to-element order of the A loads so that consecutive threads read
// consecutive addresses: along positions for conv inputs (NCHW), along features for linear inputs.
template <typename scalar_t, typename acc_t, bool A_M_FAST>
__global__ void __launch_bounds__(kThreads)
    dot_gemm_partials_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ v,
                             const scalar_t* __restrict__ delta, acc_t* __restrict__ partials, const DotGemmGeom gm) {
  __shared__ acc_t As[kBR][kBM + 1];
  __shared__ acc_t Bs[kBR][kBN + 1];
  __shared__ acc_t red[kThreadRows][kBN];

  const int tid = threadIdx.x;
  const int tx = tid % kThreadCols;
  const int ty = tid / kThreadCols;
  const int64_t zm = blockIdx.x;  // ((i*groups + g)*m_tiles + mt)
  const int64_t mt = zm % gm.m_tiles;
  const int64_t ig = zm / gm.m_tiles;
  const int64_t g = ig % gm.groups;
  const int64_t i = ig / gm.groups;
  const int64_t m0 = mt * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  acc_t acc[kTM][kTN];
#pragma unroll
  for (int a = 0; a < kTM; ++a) {
#pragma unroll
    for (int b = 0; b < kTN; ++b) acc[a][b] = acc_t(0);
  }

  for (int64_t r0 = 0; r0 < gm.R; r0 += kBR) {
    for (int e = tid; e < kBR * kBM; e += kThreads) {
      const int rl = A_M_FAST ? e / kBM : e % kBR;
      const int ml = A_M_FAST ? e % kBM : e / kBR;
      As[rl][ml] = load_a<scalar_t, acc_t>(x, gm, i, g, m0 + ml, r0 + rl);
    }
    for (int e = tid; e < kBR * kBN; e += kThreads) {
      const int rl = e % kBR;
      const int nl = e / kBR;
      const int64_t n = n0 + nl;
      const int64_t r = r0 + rl;
      acc_t val = acc_t(0);
      if (n < gm.N && r < gm.R) {
        const int64_t k = n / gm.cpg;
        const int64_t c = n - k * gm.cpg;
        val = static_cast<acc_t>(v[(k * gm.Cout + g * gm.cpg + c) * gm.R + r]);
      }
      Bs[rl][nl] = val;
    }
    __syncthreads();
#pragma unroll
    for (int rl = 0; rl < kBR; ++rl) {
      acc_t af[kTM], bf[kTN];
#pragma unroll
      for (int a = 0; a < kTM; ++a) af[a] = As[rl][ty + a * kThreadRows];
#pragma unroll
      for (int b = 0; b < kTN; ++b) bf[b] = Bs[rl][tx + b * kThreadCols];
#pragma unroll
      for (int a = 0; a < kTM; ++a) {
#pragma unroll
        for (int b = 0; b < kTN; ++b) acc[a][b] += af[a] * bf[b];
      }
    }
    __syncthreads();
  }

  // Epilogue: multiply by delta, sum this thread's rows, then the 16 thread rows in a fixed order.
#pragma unroll
  for (int b = 0; b < kTN; ++b) {
    const int nl = tx + b * kThreadCols;
    const int64_t n = n0 + nl;
    acc_t col = acc_t(0);
    if (n < gm.N) {
      const int64_t c = n % gm.cpg;
      const scalar_t* drow = delta + i * gm.sdb + (g * gm.cpg + c) * gm.sdc;
#pragma unroll
      for (int a = 0; a < kTM; ++a) {
        const int64_t m = m0 + ty + a * kThreadRows;
        if (m < gm.M) {
          const int64_t ho = m / gm.Wo;
          const int64_t wo = m - ho * gm.Wo;
          col += acc[a][b] * static_cast<acc_t>(drow[ho * gm.sdh + wo * gm.sdw]);
        }
      }
    }
    red[ty][nl] = col;
  }
  __syncthreads();
  if (tid < kBN) {
    const int64_t n = n0 + tid;
    if (n < gm.N) {
      acc_t s = acc_t(0);
#pragma unroll
      for (int t = 0; t < kThreadRows; ++t) s += red[t][tid];
      partials[zm * gm.N + n] = s;
    }
  }
}

// out[i, k] = sum over g, mt, c (in this order, then a fixed tree) of partials[((i*groups + g)*m_tiles + mt)*N + k*cpg + c].
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    sum_partials_kernel(const acc_t* __restrict__ partials, acc_t* __restrict__ out, int64_t K, int64_t groups,
                        int64_t m_tiles, int64_t cpg, int64_t N) {
  __shared__ acc_t buf[kReduceThreads];
  const int64_t ik = blockIdx.x;
  const int64_t i = ik / K;
  const int64_t k = ik - i * K;
  const int64_t L = groups * m_tiles * cpg;
  const acc_t* base = partials + i * groups * m_tiles * N + k * cpg;
  acc_t s = acc_t(0);
  for (int64_t l = threadIdx.x; l < L; l += kReduceThreads) {
    const int64_t gmt = l / cpg;  // g*m_tiles + mt
    const int64_t c = l - gmt * cpg;
    s += base[gmt * N + c];
  }
  buf[threadIdx.x] = s;
  __syncthreads();
  for (int width = kReduceThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) buf[threadIdx.x] += buf[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[ik] = buf[0];
}

// Runs both kernels for a validated geometry; `out` is [B, K] in acc dtype (zeros, contiguous).
template <bool A_M_FAST>
void launch_dot_gemm(const at::Tensor& x, const at::Tensor& v, const at::Tensor& delta, DotGemmGeom gm, int64_t B,
                     at::Tensor& out) {
  gm.m_tiles = (gm.M + kBM - 1) / kBM;
  const int64_t n_tiles = (gm.N + kBN - 1) / kBN;
  const int64_t blocks_x = B * gm.groups * gm.m_tiles;
  TORCH_CHECK(blocks_x <= std::numeric_limits<int32_t>::max() && n_tiles <= 65535 &&
                  B * gm.K <= std::numeric_limits<int32_t>::max(),
              "iwd_fast: problem too large for one launch (B*groups*position tiles = ", blocks_x,
              ", column tiles = ", n_tiles, ")");
  at::Tensor partials = at::empty({blocks_x * gm.N}, out.options());
  // The current stream of x's device (at::cuda::getCurrentCUDAStream is this function; its header,
  // ATen/cuda/CUDAContext.h, needs the cuBLAS/cuSPARSE headers that a bare nvcc install lacks).
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "iwd_fast_dot_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned int>(blocks_x), static_cast<unsigned int>(n_tiles));
    dot_gemm_partials_kernel<scalar_t, acc_t, A_M_FAST><<<grid, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), partials.data_ptr<acc_t>(), gm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_partials_kernel<acc_t><<<static_cast<unsigned int>(B * gm.K), kReduceThreads, 0, stream>>>(
        partials.data_ptr<acc_t>(), out.data_ptr<acc_t>(), gm.K, gm.groups, gm.m_tiles, gm.cpg, gm.N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_cuda_dtype(const char* op, const at::Tensor& t) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, "iwd_fast::", op,
              " (CUDA): dtype ", s, " is not supported; use float32, float16, bfloat16 or float64");
}

at::Tensor conv_dot_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& delta, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvDims c = check_conv_dot(x, v, delta, stride, padding, dilation, groups);
  check_cuda_dtype("conv_dot", x);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({c.B, c.K}, x.options().dtype(result_dtype(x.scalar_type())));
  if (c.B == 0 || c.K == 0 || c.Cout == 0 || c.Cin == 0 || c.Ho * c.Wo == 0) return out;

  const at::Tensor vc = v.contiguous();  // [K, Cout, Cin_g*kh*kw]
  DotGemmGeom gm{};
  gm.M = c.Ho * c.Wo;
  gm.N = c.K * c.cpg;
  gm.R = c.Cin_g * c.kh * c.kw;
  gm.groups = c.groups; gm.cpg = c.cpg; gm.K = c.K; gm.Cout = c.Cout;
  gm.Cin_g = c.Cin_g; gm.H = c.H; gm.W = c.W; gm.kh = c.kh; gm.kw = c.kw; gm.Wo = c.Wo;
  gm.sh = c.sh; gm.sw = c.sw; gm.ph = c.ph; gm.pw = c.pw; gm.dh = c.dh; gm.dw = c.dw;
  gm.sxb = x.stride(0); gm.sxc = x.stride(1); gm.sxh = x.stride(2); gm.sxw = x.stride(3);
  gm.sdb = delta.stride(0); gm.sdc = delta.stride(1); gm.sdh = delta.stride(2); gm.sdw = delta.stride(3);
  launch_dot_gemm<true>(x, vc, delta, gm, c.B, out);
  return out;
}

at::Tensor linear_dot_cuda(const at::Tensor& a, const at::Tensor& v, const at::Tensor& delta) {
  const LinearDims l = check_linear_dot(a, v, delta);
  check_cuda_dtype("linear_dot", a);
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::zeros({l.B, l.K}, a.options().dtype(result_dtype(a.scalar_type())));
  if (l.B == 0 || l.K == 0 || l.T == 0 || l.p == 0 || l.d == 0) return out;

  const at::Tensor vc = v.contiguous();  // [K, p, d]
  DotGemmGeom gm{};
  gm.M = l.T;
  gm.N = l.K * l.p;
  gm.R = l.d;
  gm.groups = 1; gm.cpg = l.p; gm.K = l.K; gm.Cout = l.p;
  // A token is a 1x1 "position" of a T x 1 image whose channels are the d features.
  gm.Cin_g = l.d; gm.H = l.T; gm.W = 1; gm.kh = 1; gm.kw = 1; gm.Wo = 1;
  gm.sh = 1; gm.sw = 1; gm.ph = 0; gm.pw = 0; gm.dh = 1; gm.dw = 1;
  gm.sxb = a.stride(0); gm.sxc = a.stride(2); gm.sxh = a.stride(1); gm.sxw = 0;
  gm.sdb = delta.stride(0); gm.sdc = delta.stride(2); gm.sdh = delta.stride(1); gm.sdw = 0;
  launch_dot_gemm<false>(a, vc, delta, gm, l.B, out);
  return out;
}

at::Tensor affine_dot_cuda(const at::Tensor& delta, const std::optional<at::Tensor>& v_bias,
                           const std::optional<at::Tensor>& xhat, const std::optional<at::Tensor>& v_weight) {
  const AffineDims s = check_affine_dot(delta, v_bias, xhat, v_weight);
  check_cuda_dtype("affine_dot", delta);
  const c10::cuda::CUDAGuard guard(delta.device());
  const auto acc = result_dtype(delta.scalar_type());
  at::Tensor out = at::zeros({s.B, s.K}, delta.options().dtype(acc));
  if (s.B == 0 || s.K == 0 || s.C == 0) return out;
  const at::Tensor d = delta.to(acc);
  if (v_bias.has_value()) out.add_(at::matmul(d.sum(2), v_bias->to(acc).t()));
  if (v_weight.has_value()) out.add_(at::matmul((xhat->to(acc) * d).sum(2), v_weight->to(acc).t()));
  return out;
}

at::Tensor linear_grad_norm_sq_cuda(const at::Tensor& a, const at::Tensor& delta, c10::string_view method) {
  const NormMethod m = check_linear_grad_norm_sq(a, delta, method);
  check_cuda_dtype("linear_grad_norm_sq", a);
  const c10::cuda::CUDAGuard guard(a.device());
  const auto acc = result_dtype(a.scalar_type());
  if (a.size(0) == 0 || a.size(1) == 0 || a.size(2) == 0 || delta.size(2) == 0) {
    return at::zeros({a.size(0)}, a.options().dtype(acc));
  }
  const at::Tensor af = a.to(acc), df = delta.to(acc);
  if (m == NormMethod::kGhost) {
    return (at::bmm(af, af.transpose(1, 2)) * at::bmm(df, df.transpose(1, 2))).sum({1, 2});
  }
  return at::bmm(df.transpose(1, 2), af).pow(2).sum({1, 2});
}

}  // namespace

TORCH_LIBRARY_IMPL(iwd_fast, CUDA, m) {
  m.impl("conv_dot", &conv_dot_cuda);
  m.impl("linear_dot", &linear_dot_cuda);
  m.impl("affine_dot", &affine_dot_cuda);
  m.impl("linear_grad_norm_sq", &linear_grad_norm_sq_cuda);
}

}  // namespace iwd_fast
