// CPU kernels of the iwd_fast ops (float32 and float64).
//
// The eager formulas in iwd_fast/scoring/eager_ops.py materialise a [B, K*Cout, Ho, Wo] (or [B, T, K*p])
// intermediate, multiply it by delta into a second tensor of the same size and reduce that: three
// passes over memory far larger than the caches. Here the batch is cut into chunks of samples whose
// intermediate fits in L2; each chunk runs the forward-sized oneDNN/MKL op (at::conv2d, at::matmul,
// at::bmm) and a fused multiply-reduce over the still-cached result, so the big tensor never reaches
// DRAM and no product tensor exists at all.
//
// Determinism: every output is a fixed-order sum. Row dot products (one row = one channel/position
// run of the intermediate) are each computed by one thread, in double, into their own slot; the
// per-sample totals are then summed serially in a fixed order. No atomics; the reductions do not
// depend on the thread count. The chunk size is a fixed function of the shapes and the thread count,
// so repeated calls give bitwise-equal results.
//
// Scheduling: whenever the batch has a sample per thread and the call enough work, the chunks
// themselves run in parallel and each thread's conv/GEMM runs single-threaded on data that stays in
// that core's L2. On the shared 2-core dev machine this beat running the chunks one by one with a
// 2-thread conv inside by 2.5x to 40x (an OpenMP barrier per small conv is costly on busy cores).
// Other calls run their chunks one after another, with the conv/GEMM and the row reductions parallel
// inside where ATen finds it worth it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "../checks.h"

namespace iwd_fast {
namespace {

// Target size in bytes of one chunk's intermediate: about one core's L2 (512 KiB on the dev machines).
// IWD_FAST_CPU_CHUNK_BYTES overrides it (tuning and tests only).
int64_t chunk_target_bytes() {
  const char* env = std::getenv("IWD_FAST_CPU_CHUNK_BYTES");
  if (env != nullptr) {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  return int64_t{512} * 1024;
}

// Below this many multiply-adds in a whole call (~50 us on one core) the work is not spread over
// threads: waking a second thread costs more than it saves, and on a busy machine up to a scheduler tick.
constexpr int64_t kMinParallelMacs = int64_t{1} << 19;

struct ChunkPlan {
  int64_t chunk;  // samples per chunk
  bool parallel;  // chunks spread over threads (else run one after another, ATen parallel inside)
};

// Chunks hold as many samples as fit the byte target. With a sample per thread and enough work the
// chunks run in parallel, at most an even share per thread so that every thread gets one (the
// conv/GEMM inside then runs single-threaded on the core whose L2 holds its output).
ChunkPlan plan_chunks(int64_t batch, int64_t bytes_per_sample, int64_t macs_per_sample) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t fit = std::max<int64_t>(1, chunk_target_bytes() / std::max<int64_t>(1, bytes_per_sample));
  const bool enough_work = macs_per_sample >= kMinParallelMacs / std::max<int64_t>(1, batch);
  const bool parallel = threads > 1 && batch >= threads && enough_work && !at::in_parallel_region();
  const int64_t share = parallel ? (batch + threads - 1) / threads : batch;
  return {std::max<int64_t>(1, std::min(fit, share)), parallel};
}

// Calls process(first_sample, n_samples) for consecutive chunks covering [0, batch).
template <typename F>
void for_each_chunk(int64_t batch, const ChunkPlan& plan, const F& process) {
  const int64_t n_chunks = (batch + plan.chunk - 1) / plan.chunk;
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t first = c * plan.chunk;
      process(first, std::min(plan.chunk, batch - first));
    }
  };
  if (plan.parallel) {
    at::parallel_for(0, n_chunks, 1, run);
  } else {
    run(0, n_chunks);
  }
}

// sum_j a[j] * b[j] accumulated in double (four independent partial sums, then a fixed combination).
template <typename T>
inline double dot_row(const T* a, const T* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += static_cast<double>(a[j]) * static_cast<double>(b[j]);
    s1 += static_cast<double>(a[j + 1]) * static_cast<double>(b[j + 1]);
    s2 += static_cast<double>(a[j + 2]) * static_cast<double>(b[j + 2]);
    s3 += static_cast<double>(a[j + 3]) * static_cast<double>(b[j + 3]);
  }
  for (; j < n; ++j) s0 += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return (s0 + s1) + (s2 + s3);
}

template <typename T>
inline double sum_row(const T* a, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    s0 += static_cast<double>(a[j]);
    s1 += static_cast<double>(a[j + 1]);
    s2 += static_cast<double>(a[j + 2]);
    s3 += static_cast<double>(a[j + 3]);
  }
  for (; j < n; ++j) s0 += static_cast<double>(a[j]);
  return (s0 + s1) + (s2 + s3);
}

// out[r] = row_fn(r) for r in [0, rows); rows of `row_len` elements, split over threads.
template <typename RowFn>
void parallel_rows(int64_t rows, int64_t row_len, double* out, const RowFn& row_fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_len));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) out[r] = row_fn(r);
  });
}

void check_cpu_dtype(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "iwd_fast::", op,
              " (CPU): dtype ", t.scalar_type(),
              " is not supported on CPU; use float32 or float64 (float16/bfloat16 run on CUDA only)");
}

// The "gradient" route of reference.conv_dot (reference.choose_conv_route picks it with the same rule):
// per chunk of samples, the per-sample weight gradients G_i = delta_i im2col(x_i)^T (one batched GEMM),
// then s[i, k] = <G_i, V_k> (one GEMM): K directions for the price of one, where K convolutions cost more.
// Chunks run one after another with the GEMMs parallel inside; every sum has a fixed order.
at::Tensor conv_dot_by_gradient(const ConvDims& c, const at::Tensor& x, const at::Tensor& v, const at::Tensor& delta,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const int64_t P = c.Ho * c.Wo;
  const int64_t width = c.Cin_g * c.kh * c.kw;
  const at::Tensor vk = v.reshape({c.K, c.Cout * width}).t();  // [Cout * width, K]
  at::Tensor out = at::empty({c.B, c.K}, x.options());
  const int64_t per_sample = (c.Cout * width + c.Cin * c.kh * c.kw * P) * static_cast<int64_t>(x.element_size());
  const int64_t chunk = std::max<int64_t>(1, (int64_t{32} << 20) / std::max<int64_t>(1, per_sample));
  for (int64_t first = 0; first < c.B; first += chunk) {
    const int64_t n = std::min(chunk, c.B - first);
    const at::Tensor cols = at::im2col(x.narrow(0, first, n).contiguous(), {c.kh, c.kw}, dilation, padding, stride)
                                .reshape({n * c.groups, width, P});  // im2col rows are channel-major: groups first
    const at::Tensor d = delta.narrow(0, first, n).reshape({n * c.groups, c.cpg, P});
    const at::Tensor grads = at::bmm(d, cols.transpose(1, 2));  // [n * groups, cpg, width]
    out.narrow(0, first, n).copy_(at::mm(grads.reshape({n, c.Cout * width}), vk));
  }
  return out;
}

at::Tensor conv_dot_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& delta, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvDims c = check_conv_dot(x, v, delta, stride, padding, dilation, groups);
  check_cpu_dtype("conv_dot", x);
  at::Tensor out = at::zeros({c.B, c.K}, x.options());
  const int64_t P = c.Ho * c.Wo;
  if (c.B == 0 || c.K == 0 || c.Cout == 0 || c.Cin == 0 || P == 0) return out;
  if (c.K * P > P + c.K + 16) return conv_dot_by_gradient(c, x, v, delta, stride, padding, dilation);

  // Directions stacked along the output channels, each group's K*cpg channels together:
  // [K, Cout, Cin_g, kh, kw] -> [groups * K * cpg, Cin_g, kh, kw]; row (g*K + k)*cpg + cc is v[k, g*cpg + cc].
  const at::Tensor w = v.reshape({c.K, c.groups, c.cpg, c.Cin_g, c.kh, c.kw})
                           .transpose(0, 1)
                           .reshape({c.groups * c.K * c.cpg, c.Cin_g, c.kh, c.kw})
                           .contiguous();
  const int64_t N = c.groups * c.K * c.cpg;
  const ChunkPlan plan =
      plan_chunks(c.B, N * P * static_cast<int64_t>(x.element_size()), N * P * c.Cin_g * c.kh * c.kw);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_dot_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_chunk(c.B, plan, [&](int64_t first, int64_t n) {
      const at::Tensor y = at::conv2d(x.narrow(0, first, n), w, {}, stride, padding, dilation, groups).contiguous();
      const at::Tensor dl = delta.narrow(0, first, n).contiguous();
      const scalar_t* yp = y.data_ptr<scalar_t>();
      const scalar_t* dp = dl.data_ptr<scalar_t>();
      // Row r = ((i*groups + g)*K + k)*cpg + cc of y pairs with delta row (i*groups + g)*cpg + cc.
      std::vector<double> part(static_cast<size_t>(n * N));
      parallel_rows(n * N, P, part.data(), [&](int64_t r) {
        const int64_t cc = r % c.cpg;
        const int64_t ig = r / c.cpg / c.K;
        return dot_row(yp + r * P, dp + (ig * c.cpg + cc) * P, P);
      });
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t k = 0; k < c.K; ++k) {
          double s = 0;
          for (int64_t g = 0; g < c.groups; ++g) {
            const double* row = part.data() + ((i * c.groups + g) * c.K + k) * c.cpg;
            for (int64_t cc = 0; cc < c.cpg; ++cc) s += row[cc];
          }
          o[(first + i) * c.K + k] = static_cast<scalar_t>(s);
        }
      }
    });
  });
  return out;
}

at::Tensor linear_dot_cpu(const at::Tensor& a, const at::Tensor& v, const at::Tensor& delta) {
  const LinearDims l = check_linear_dot(a, v, delta);
  check_cpu_dtype("linear_dot", a);
  at::Tensor out = at::zeros({l.B, l.K}, a.options());
  if (l.B == 0 || l.K == 0 || l.T == 0 || l.p == 0 || l.d == 0) return out;

  const at::Tensor wt = v.reshape({l.K * l.p, l.d}).t();  // [d, K*p]: column k*p + c is v[k, c, :]
  const int64_t KP = l.K * l.p;
  const ChunkPlan plan = plan_chunks(l.B, l.T * KP * static_cast<int64_t>(a.element_size()), l.T * KP * l.d);

  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "linear_dot_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_chunk(l.B, plan, [&](int64_t first, int64_t n) {
      const at::Tensor y = at::matmul(a.narrow(0, first, n), wt).contiguous();  // [n, T, K*p]
      const at::Tensor dl = delta.narrow(0, first, n).contiguous();          // [n, T, p]
      const scalar_t* yp = y.data_ptr<scalar_t>();
      const scalar_t* dp = dl.data_ptr<scalar_t>();
      // Row r = (i*T + t)*K + k: y[i, t, k*p : (k+1)*p] . delta[i, t, :].
      std::vector<double> part(static_cast<size_t>(n * l.T * l.K));
      parallel_rows(n * l.T * l.K, l.p, part.data(),
                    [&](int64_t r) { return dot_row(yp + r * l.p, dp + (r / l.K) * l.p, l.p); });
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t k = 0; k < l.K; ++k) {
          double s = 0;
          for (int64_t t = 0; t < l.T; ++t) s += part[(i * l.T + t) * l.K + k];
          o[(first + i) * l.K + k] = static_cast<scalar_t>(s);
        }
      }
    });
  });
  return out;
}

at::Tensor affine_dot_cpu(const at::Tensor& delta, const std::optional<at::Tensor>& v_bias,
                          const std::optional<at::Tensor>& xhat, const std::optional<at::Tensor>& v_weight) {
  const AffineDims s = check_affine_dot(delta, v_bias, xhat, v_weight);
  check_cpu_dtype("affine_dot", delta);
  at::Tensor out = at::zeros({s.B, s.K}, delta.options());
  if (s.B == 0 || s.K == 0 || s.C == 0) return out;

  const int64_t rows = s.B * s.C;
  const at::Tensor dc = delta.contiguous();
  std::vector<double> sum_d, sum_xd;  // per (sample, channel): sum_pos delta, sum_pos xhat * delta
  at::Tensor vb, vw, xc;
  if (v_bias.has_value()) {
    vb = v_bias->contiguous();
    sum_d.resize(static_cast<size_t>(rows));
  }
  if (v_weight.has_value()) {
    vw = v_weight->contiguous();
    xc = xhat->contiguous();
    sum_xd.resize(static_cast<size_t>(rows));
  }

  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "affine_dot_cpu", [&] {
    const scalar_t* dp = dc.data_ptr<scalar_t>();
    if (vb.defined()) {
      parallel_rows(rows, s.P, sum_d.data(), [&](int64_t r) { return sum_row(dp + r * s.P, s.P); });
    }
    if (vw.defined()) {
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      parallel_rows(rows, s.P, sum_xd.data(),
                    [&](int64_t r) { return dot_row(xp + r * s.P, dp + r * s.P, s.P); });
    }
    const scalar_t* vbp = vb.defined() ? vb.data_ptr<scalar_t>() : nullptr;
    const scalar_t* vwp = vw.defined() ? vw.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, s.B * s.K, std::max<int64_t>(1, 16384 / s.C), [&](int64_t begin, int64_t end) {
      for (int64_t ik = begin; ik < end; ++ik) {
        const int64_t i = ik / s.K, k = ik % s.K;
        double acc = 0;
        for (int64_t ch = 0; ch < s.C; ++ch) {
          if (vbp != nullptr) acc += sum_d[i * s.C + ch] * static_cast<double>(vbp[k * s.C + ch]);
          if (vwp != nullptr) acc += sum_xd[i * s.C + ch] * static_cast<double>(vwp[k * s.C + ch]);
        }
        o[ik] = static_cast<scalar_t>(acc);
      }
    });
  });
  return out;
}

at::Tensor linear_grad_norm_sq_cpu(const at::Tensor& a, const at::Tensor& delta, c10::string_view method) {
  const NormMethod m = check_linear_grad_norm_sq(a, delta, method);
  check_cpu_dtype("linear_grad_norm_sq", a);
  const int64_t B = a.size(0), T = a.size(1), d = a.size(2), p = delta.size(2);
  at::Tensor out = at::zeros({B}, a.options());
  if (B == 0 || T == 0 || d == 0 || p == 0) return out;
  const int64_t elem = static_cast<int64_t>(a.element_size());

  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "linear_grad_norm_sq_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    if (m == NormMethod::kGhost) {
      // ||G_i||^2 = sum_{t, u} (a_t . a_u) (delta_t . delta_u): two [T, T] Gram matrices per sample.
      for_each_chunk(B, plan_chunks(B, 2 * T * T * elem, T * T * (d + p)), [&](int64_t first, int64_t n) {
        const at::Tensor an = a.narrow(0, first, n), dn = delta.narrow(0, first, n);
        const at::Tensor ga = at::bmm(an, an.transpose(1, 2)).contiguous();
        const at::Tensor gd = at::bmm(dn, dn.transpose(1, 2)).contiguous();
        const scalar_t* gap = ga.data_ptr<scalar_t>();
        const scalar_t* gdp = gd.data_ptr<scalar_t>();
        std::vector<double> part(static_cast<size_t>(n * T));
        parallel_rows(n * T, T, part.data(), [&](int64_t r) { return dot_row(gap + r * T, gdp + r * T, T); });
        for (int64_t i = 0; i < n; ++i) {
          double s = 0;
          for (int64_t t = 0; t < T; ++t) s += part[i * T + t];
          o[first + i] = static_cast<scalar_t>(s);
        }
      });
    } else {
      // G_i = delta_i^T a_i [p, d], then the sum of its squares.
      for_each_chunk(B, plan_chunks(B, p * d * elem, T * p * d), [&](int64_t first, int64_t n) {
        const at::Tensor g = at::bmm(delta.narrow(0, first, n).transpose(1, 2), a.narrow(0, first, n)).contiguous();
        const scalar_t* gp = g.data_ptr<scalar_t>();
        std::vector<double> part(static_cast<size_t>(n * p));
        parallel_rows(n * p, d, part.data(), [&](int64_t r) { return dot_row(gp + r * d, gp + r * d, d); });
        for (int64_t i = 0; i < n; ++i) {
          double s = 0;
          for (int64_t c = 0; c < p; ++c) s += part[i * p + c];
          o[first + i] = static_cast<scalar_t>(s);
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(iwd_fast, CPU, m) {
  m.impl("conv_dot", &conv_dot_cpu);
  m.impl("linear_dot", &linear_dot_cpu);
  m.impl("affine_dot", &affine_dot_cpu);
  m.impl("linear_grad_norm_sq", &linear_grad_norm_sq_cpu);
}

}  // namespace iwd_fast
