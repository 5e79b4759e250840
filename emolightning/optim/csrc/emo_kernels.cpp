// Multi-tensor CPU kernels for the Emo optimizers' fused path (see emolightning/optim/_native.py).
//
// One call updates every tensor of a bucket: the elements of all tensors are split across
// torch's CPU threads and each element is read and written once, with no per-tensor dispatch.
// The arithmetic follows the Python updates in emonavi.py, emolynx.py, emofact.py, emosens.py,
// emoairy.py, emotion.py and emovoid.py (EmoCats runs EmoLynx's kernel), operation by operation
// (built without fused multiply-adds); EmoFact's and EmoAiry's row and column sums are
// accumulated in double, so they may round differently from torch's mean.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/scalar_tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <vector>

namespace {

using at::Tensor;
using at::TensorList;  // c10::ArrayRef<Tensor>: what a Tensor[] argument arrives as

// The element loops are built twice on x86-64 with GCC: for AVX2 (x86-64-v3) and for the
// baseline; the dynamic loader picks one for the running CPU. No -march=native, which would tie a
// cached build to the machine that made it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EMO_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EMO_CLONES
#endif
#define EMO_INLINE inline __attribute__((always_inline))

// Elements per thread chunk: small enough to share a few large tensors between threads, large
// enough that a chunk's start-up cost stays negligible.
constexpr int64_t kGrain = 1 << 15;
// EmoFact: rows of one matrix are handled together in blocks of about this many elements.
constexpr int64_t kRowBlock = 1 << 18;

void check_list(TensorList list, const Tensor& like, const char* name) {
  for (const auto& t : list) {
    TORCH_CHECK(t.device().is_cpu(), name, ": every tensor must be on the CPU");
    TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ": expected dtype ",
                like.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), name, ": every tensor must be contiguous");
    // checked here, before any change, because bump_versions refuses inference tensors
    TORCH_CHECK(!t.is_inference(), name, ": inference tensors cannot be updated in place");
  }
}

void check_parallel(TensorList params, TensorList other, const char* name) {
  TORCH_CHECK(other.size() == params.size(), name, ": expected ", params.size(), " tensors, got ",
              other.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(other[i].numel() == params[i].numel(), name, "[", i, "]: expected ",
                params[i].numel(), " elements, got ", other[i].numel());
  }
}

void check_floating(TensorList params) {
  TORCH_CHECK(!params.empty(), "expected at least one parameter");
  auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "the native kernels take float32 or float64 tensors, got ", dtype);
}

// Writes through data pointers bypass autograd's record of in-place changes; bump it as an
// in-place torch op would, so a graph that saved these tensors refuses to use stale values.
void bump_versions(std::initializer_list<TensorList> lists) {
  for (TensorList list : lists) {
    for (const auto& t : list) t.unsafeGetTensorImpl()->bump_version();
  }
}

// torch.sign without branches (random signs would mispredict half of them): NaN stays NaN.
template <typename T>
EMO_INLINE T sign_of(T x) {
  const T s = static_cast<T>(x > T(0)) - static_cast<T>(x < T(0));
  return x == x ? s : x;
}

// Calls f(tensor index, begin, end) on element spans that together cover every tensor once,
// spread over torch's CPU threads.
template <typename F>
void for_each_span(TensorList tensors, const F& f) {
  std::vector<int64_t> offsets(tensors.size() + 1, 0);
  for (size_t i = 0; i < tensors.size(); ++i) offsets[i + 1] = offsets[i] + tensors[i].numel();
  at::parallel_for(0, offsets.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(offsets.begin(), offsets.end(), begin) - offsets.begin() - 1;
    while (begin < end) {
      int64_t stop = std::min(end, offsets[t + 1]);
      if (stop > begin) f(t, begin - offsets[t], stop - offsets[t]);
      begin = stop;
      ++t;
    }
  });
}

// ------------------------------------------------------------------------------ EmoNavi, EmoSens
// The element loops take restrict pointers and their constants by value, so the compiler knows
// that no store changes them and vectorizes the loop.
// How weight decay is applied: EmoNavi subtracts p * lr * wd (p - p * decay), EmoSens multiplies
// by (1 - wd * lr) (p * keep), each as its Python update does.
enum class Decay { kNone, kSubtract, kMultiply };

template <typename T, Decay decay_mode>
EMO_INLINE void navi_body(T* __restrict p, const T* __restrict g, T* __restrict m,
                          T* __restrict v, int64_t n, T b1, T b2, T c1, T c2, T e, T decay, T step) {
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    const T mi = m[i] * b1 + gi * c1;
    const T vi = v[i] * b2 + gi * gi * c2;
    m[i] = mi;
    v[i] = vi;
    T pi = p[i];
    if (decay_mode == Decay::kSubtract) pi = pi - pi * decay;
    if (decay_mode == Decay::kMultiply) pi = pi * decay;
    p[i] = pi - mi / (std::sqrt(vi) + e) * step;
  }
}

template <typename T>
EMO_INLINE void navi_dispatch(T* p, const T* g, T* m, T* v, int64_t n, T b1, T b2, T c1, T c2, T e,
                              T decay, T step, Decay mode) {
  switch (mode) {
    case Decay::kNone: return navi_body<T, Decay::kNone>(p, g, m, v, n, b1, b2, c1, c2, e, decay, step);
    case Decay::kSubtract: return navi_body<T, Decay::kSubtract>(p, g, m, v, n, b1, b2, c1, c2, e, decay, step);
    case Decay::kMultiply: return navi_body<T, Decay::kMultiply>(p, g, m, v, n, b1, b2, c1, c2, e, decay, step);
  }
}

EMO_CLONES void navi_span(float* p, const float* g, float* m, float* v, int64_t n, float b1,
                          float b2, float c1, float c2, float e, float decay, float step, Decay mode) {
  navi_dispatch<float>(p, g, m, v, n, b1, b2, c1, c2, e, decay, step, mode);
}
EMO_CLONES void navi_span(double* p, const double* g, double* m, double* v, int64_t n, double b1,
                          double b2, double c1, double c2, double e, double decay, double step,
                          Decay mode) {
  navi_dispatch<double>(p, g, m, v, n, b1, b2, c1, c2, e, decay, step, mode);
}

template <typename T>
void navi_impl(TensorList params, TensorList grads, TensorList exp_avgs,
               TensorList exp_avg_sqs, double lr, double drive, double beta1, double beta2,
               double eps, double weight_decay, bool multiplicative) {
  const T b1 = beta1, b2 = beta2, c1 = 1 - beta1, c2 = 1 - beta2, e = eps;
  const T decay = multiplicative ? 1 - weight_decay * lr : lr * weight_decay, step = lr * drive;
  const Decay mode = weight_decay == 0 ? Decay::kNone : multiplicative ? Decay::kMultiply : Decay::kSubtract;
  for_each_span(params, [&](size_t t, int64_t begin, int64_t end) {
    T* p = params[t].data_ptr<T>() + begin;
    const T* g = grads[t].data_ptr<T>() + begin;
    navi_span(p, g, exp_avgs[t].data_ptr<T>() + begin, exp_avg_sqs[t].data_ptr<T>() + begin,
              end - begin, b1, b2, c1, c2, e, decay, step, mode);
  });
}

void adam_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
               double lr, double drive, double beta1, double beta2, double eps, double weight_decay,
               bool multiplicative, const char* name) {
  check_floating(params);
  for (auto* list : {&params, &grads, &exp_avgs, &exp_avg_sqs}) check_list(*list, params[0], name);
  check_parallel(params, grads, "grads");
  check_parallel(params, exp_avgs, "exp_avgs");
  check_parallel(params, exp_avg_sqs, "exp_avg_sqs");
  if (params[0].scalar_type() == at::kFloat) {
    navi_impl<float>(params, grads, exp_avgs, exp_avg_sqs, lr, drive, beta1, beta2, eps, weight_decay,
                     multiplicative);
  } else {
    navi_impl<double>(params, grads, exp_avgs, exp_avg_sqs, lr, drive, beta1, beta2, eps, weight_decay,
                      multiplicative);
  }
  bump_versions({params, exp_avgs, exp_avg_sqs});
}

void navi_step(TensorList params, TensorList grads, TensorList exp_avgs,
               TensorList exp_avg_sqs, double lr, double drive, double beta1, double beta2,
               double eps, double weight_decay) {
  adam_step(params, grads, exp_avgs, exp_avg_sqs, lr, drive, beta1, beta2, eps, weight_decay, false, "navi");
}

void sens_step(TensorList params, TensorList grads, TensorList exp_avgs,
               TensorList exp_avg_sqs, double lr, double drive, double beta1, double beta2,
               double eps, double weight_decay) {
  adam_step(params, grads, exp_avgs, exp_avg_sqs, lr, drive, beta1, beta2, eps, weight_decay, true, "sens");
}

// ------------------------------------------------------------------------------------ EmoLynx
template <typename T>
EMO_INLINE void lynx_body(T* __restrict p, const T* __restrict g, T* __restrict m, int64_t n,
                          T b1, T b2, T c1, T c2, T keep, T step) {
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i], mi = m[i];
    p[i] = p[i] * keep - sign_of(gi * c1 + mi * b1) * step;
    m[i] = mi * b2 + gi * c2;
  }
}

EMO_CLONES void lynx_span(float* p, const float* g, float* m, int64_t n, float b1, float b2,
                          float c1, float c2, float keep, float step) {
  lynx_body<float>(p, g, m, n, b1, b2, c1, c2, keep, step);
}
EMO_CLONES void lynx_span(double* p, const double* g, double* m, int64_t n, double b1, double b2,
                          double c1, double c2, double keep, double step) {
  lynx_body<double>(p, g, m, n, b1, b2, c1, c2, keep, step);
}

template <typename T>
void lynx_impl(TensorList params, TensorList grads, TensorList exp_avgs,
               double lr, double drive, double beta1, double beta2, double weight_decay) {
  const T b1 = beta1, b2 = beta2, c1 = 1 - beta1, c2 = 1 - beta2;
  const T keep = 1 - lr * weight_decay, step = lr * drive;
  for_each_span(params, [&](size_t t, int64_t begin, int64_t end) {
    lynx_span(params[t].data_ptr<T>() + begin, grads[t].data_ptr<T>() + begin,
              exp_avgs[t].data_ptr<T>() + begin, end - begin, b1, b2, c1, c2, keep, step);
  });
}

void lynx_step(TensorList params, TensorList grads, TensorList exp_avgs,
               double lr, double drive, double beta1, double beta2, double weight_decay) {
  check_floating(params);
  for (auto* list : {&params, &grads, &exp_avgs}) check_list(*list, params[0], "lynx");
  check_parallel(params, grads, "grads");
  check_parallel(params, exp_avgs, "exp_avgs");
  if (params[0].scalar_type() == at::kFloat) {
    lynx_impl<float>(params, grads, exp_avgs, lr, drive, beta1, beta2, weight_decay);
  } else {
    lynx_impl<double>(params, grads, exp_avgs, lr, drive, beta1, beta2, weight_decay);
  }
  bump_versions({params, exp_avgs});
}

// ------------------------------------------------------------------------------ EmoFact, EmoAiry
// The two factored rules differ in their statistics and weight decay:
//   EmoFact: row/column EMAs (beta1) of root mean squares (sqrt(mean + eps)), vectors' second
//            moment decays with beta1; p - p * (lr * wd);
//   EmoAiry: row/column EMAs (beta2) of mean squares, vectors' second moment decays with beta2;
//            p * (1 - wd * lr).
// Both step with sign(g).
//
// One row of a matrix: the sign step, the row's sum of squares (returned) and its squares added
// to the column sums. With `multiply`, `decay` is the factor that keeps the weight.
template <typename T, bool multiply>
EMO_INLINE T decayed(T p, T decay) {
  return multiply ? p * decay : p - p * decay;
}

template <typename T, bool multiply>
EMO_INLINE double fact_row_body(T* __restrict p, const T* __restrict g,
                                double* __restrict col_sums, int64_t n, T decay, T step) {
  // kLanes running sums (added up at the end in a fixed order): one sum would chain every
  // addition to the previous one and keep the loop from being vectorized.
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const T gj = g[j + k];
      const T g2 = gj * gj;
      lanes[k] += g2;
      col_sums[j + k] += g2;
      p[j + k] = decayed<T, multiply>(p[j + k], decay) - sign_of(gj) * step;
    }
  }
  for (; j < n; ++j) {
    const T gj = g[j];
    const T g2 = gj * gj;
    lanes[0] += g2;
    col_sums[j] += g2;
    p[j] = decayed<T, multiply>(p[j], decay) - sign_of(gj) * step;
  }
  double row_sum = 0;
  for (double lane : lanes) row_sum += lane;
  return row_sum;
}

template <typename T, bool multiply>
EMO_INLINE void fact_vector_body(T* __restrict p, const T* __restrict g, T* __restrict v,
                                 int64_t n, T keep_v, T c2, T decay, T step) {
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i];
    v[i] = v[i] * keep_v + gi * gi * c2;
    p[i] = decayed<T, multiply>(p[i], decay) - sign_of(gi) * step;
  }
}

EMO_CLONES double fact_row(float* p, const float* g, double* col_sums, int64_t n, float decay,
                           float step, bool multiply) {
  return multiply ? fact_row_body<float, true>(p, g, col_sums, n, decay, step)
                  : fact_row_body<float, false>(p, g, col_sums, n, decay, step);
}
EMO_CLONES double fact_row(double* p, const double* g, double* col_sums, int64_t n, double decay,
                           double step, bool multiply) {
  return multiply ? fact_row_body<double, true>(p, g, col_sums, n, decay, step)
                  : fact_row_body<double, false>(p, g, col_sums, n, decay, step);
}
EMO_CLONES void fact_vector_span(float* p, const float* g, float* v, int64_t n, float keep_v, float c2,
                                 float decay, float step, bool multiply) {
  multiply ? fact_vector_body<float, true>(p, g, v, n, keep_v, c2, decay, step)
           : fact_vector_body<float, false>(p, g, v, n, keep_v, c2, decay, step);
}
EMO_CLONES void fact_vector_span(double* p, const double* g, double* v, int64_t n, double keep_v,
                                 double c2, double decay, double step, bool multiply) {
  multiply ? fact_vector_body<double, true>(p, g, v, n, keep_v, c2, decay, step)
           : fact_vector_body<double, false>(p, g, v, n, keep_v, c2, decay, step);
}

struct RowBlock {
  int64_t matrix, row_begin, row_end, partial;  // partial: offset of its column sums, or -1
};

template <typename T>
void fact_impl(TensorList params, TensorList grads, TensorList rows,
               TensorList cols, TensorList params_1d, TensorList grads_1d,
               TensorList exp_avg_sqs, double lr, double drive, double beta1, double beta2,
               double eps, double weight_decay, bool airy) {
  // the statistics' decay and increment weights
  const T b = airy ? beta2 : beta1, c = airy ? 1 - beta2 : 1 - beta1, c2 = 1 - beta2, e = eps;
  const T decay = airy ? 1 - weight_decay * lr : lr * weight_decay, step = lr * drive;
  auto statistic = [&](T old, double sum, int64_t count) -> T {
    const T mean = static_cast<T>(sum / count);
    return airy ? old * b + mean * c : old * b + std::sqrt(mean + e) * c;
  };

  // Matrices (dim >= 2, viewed as [rows, numel / rows]) in blocks of whole rows. A matrix in
  // one block finishes its column statistics in that block; the blocks of a larger matrix
  // leave partial column sums that are added up afterwards.
  std::vector<RowBlock> blocks;
  std::vector<int64_t> split;  // matrices in more than one block
  int64_t partial_size = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t n_rows = params[t].size(0), n_cols = params[t].numel() / std::max<int64_t>(n_rows, 1);
    if (n_rows == 0 || n_cols == 0) continue;
    const int64_t per_block = std::max<int64_t>(1, kRowBlock / n_cols);
    if (per_block >= n_rows) {
      blocks.push_back({static_cast<int64_t>(t), 0, n_rows, -1});
      continue;
    }
    split.push_back(t);
    for (int64_t r = 0; r < n_rows; r += per_block) {
      blocks.push_back({static_cast<int64_t>(t), r, std::min(n_rows, r + per_block), partial_size});
      partial_size += n_cols;
    }
  }
  std::vector<double> partial(partial_size);
  auto finish_columns = [&](int64_t t, const double* sums) {
    T* col = cols[t].data_ptr<T>();
    const int64_t n_rows = params[t].size(0), n_cols = params[t].numel() / n_rows;
    for (int64_t j = 0; j < n_cols; ++j) col[j] = statistic(col[j], sums[j], n_rows);
  };
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t first, int64_t last) {
    std::vector<double> local;
    for (int64_t k = first; k < last; ++k) {
      const RowBlock& block = blocks[k];
      const int64_t t = block.matrix;
      const int64_t n_cols = params[t].numel() / params[t].size(0);
      double* sums = block.partial >= 0 ? partial.data() + block.partial : nullptr;
      if (sums == nullptr) {
        local.assign(n_cols, 0.0);
        sums = local.data();
      }
      T* p = params[t].data_ptr<T>();
      const T* g = grads[t].data_ptr<T>();
      T* r = rows[t].data_ptr<T>();
      for (int64_t i = block.row_begin; i < block.row_end; ++i) {
        const double row_sum = fact_row(p + i * n_cols, g + i * n_cols, sums, n_cols, decay, step, airy);
        r[i] = statistic(r[i], row_sum, n_cols);
      }
      if (block.partial < 0) finish_columns(t, sums);
    }
  });
  if (!split.empty()) {
    at::parallel_for(0, static_cast<int64_t>(split.size()), 1, [&](int64_t first, int64_t last) {
      std::vector<double> total;
      for (int64_t s = first; s < last; ++s) {
        const int64_t t = split[s];
        const int64_t n_cols = params[t].numel() / params[t].size(0);
        total.assign(n_cols, 0.0);
        for (const RowBlock& block : blocks) {
          if (block.matrix != t) continue;
          const double* part = partial.data() + block.partial;
          for (int64_t j = 0; j < n_cols; ++j) total[j] += part[j];
        }
        finish_columns(t, total.data());
      }
    });
  }

  // Vectors and scalars: a (never used) second moment and the sign step.
  if (!params_1d.empty()) {
    for_each_span(params_1d, [&](size_t t, int64_t begin, int64_t end) {
      fact_vector_span(params_1d[t].data_ptr<T>() + begin, grads_1d[t].data_ptr<T>() + begin,
                       exp_avg_sqs[t].data_ptr<T>() + begin, end - begin, b, c2, decay, step, airy);
    });
  }
}

void factored_step(TensorList params, TensorList grads, TensorList rows,
                   TensorList cols, TensorList params_1d, TensorList grads_1d,
                   TensorList exp_avg_sqs, double lr, double drive, double beta1, double beta2,
                   double eps, double weight_decay, bool airy) {
  const char* name = airy ? "airy" : "fact";
  std::vector<Tensor> every(params.begin(), params.end());
  every.insert(every.end(), params_1d.begin(), params_1d.end());
  check_floating(every);
  const Tensor& like = every[0];
  for (auto* list : {&params, &grads, &rows, &cols, &params_1d, &grads_1d, &exp_avg_sqs}) {
    check_list(*list, like, name);
  }
  check_parallel(params, grads, "grads");
  check_parallel(params_1d, grads_1d, "grads_1d");
  check_parallel(params_1d, exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK(rows.size() == params.size() && cols.size() == params.size(),
              name, ": expected one row and one column statistic per matrix");
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(params[t].dim() >= 2, name, ": params[", t, "] is not a matrix");
    const int64_t n_rows = params[t].size(0);
    TORCH_CHECK(rows[t].numel() == n_rows, name, ": rows[", t, "] has ", rows[t].numel(),
                " elements for ", n_rows, " rows");
    TORCH_CHECK(n_rows == 0 || cols[t].numel() == params[t].numel() / n_rows, name, ": cols[", t,
                "] has ", cols[t].numel(), " elements for ", params[t].numel() / n_rows, " columns");
  }
  if (like.scalar_type() == at::kFloat) {
    fact_impl<float>(params, grads, rows, cols, params_1d, grads_1d, exp_avg_sqs, lr, drive, beta1,
                     beta2, eps, weight_decay, airy);
  } else {
    fact_impl<double>(params, grads, rows, cols, params_1d, grads_1d, exp_avg_sqs, lr, drive, beta1,
                      beta2, eps, weight_decay, airy);
  }
  bump_versions({params, rows, cols, params_1d, exp_avg_sqs});
}

void fact_step(TensorList params, TensorList grads, TensorList rows,
               TensorList cols, TensorList params_1d, TensorList grads_1d,
               TensorList exp_avg_sqs, double lr, double drive, double beta1, double beta2,
               double eps, double weight_decay) {
  factored_step(params, grads, rows, cols, params_1d, grads_1d, exp_avg_sqs, lr, drive, beta1, beta2,
                eps, weight_decay, false);
}

// EmoAiry takes no eps (its step never divides by its statistics).
void airy_step(TensorList params, TensorList grads, TensorList rows,
               TensorList cols, TensorList params_1d, TensorList grads_1d,
               TensorList exp_avg_sqs, double lr, double drive, double beta2, double weight_decay) {
  factored_step(params, grads, rows, cols, params_1d, grads_1d, exp_avg_sqs, lr, drive, 0.0, beta2,
                0.0, weight_decay, true);
}

// ------------------------------------------------------------------------------------ EmoTion
// exp_avg = exp_avg * (1 - alpha) + g * alpha, then p -= lr * sign(exp_avg). `alpha` is
// (1 - beta1) * the step's gradient freshness, computed by the caller.
template <typename T>
EMO_INLINE void tion_body(T* __restrict p, const T* __restrict g, T* __restrict m, int64_t n,
                          T keep, T alpha, T step) {
  for (int64_t i = 0; i < n; ++i) {
    const T mi = m[i] * keep + g[i] * alpha;
    m[i] = mi;
    p[i] = p[i] - sign_of(mi) * step;
  }
}

EMO_CLONES void tion_span(float* p, const float* g, float* m, int64_t n, float keep, float alpha, float step) {
  tion_body<float>(p, g, m, n, keep, alpha, step);
}
EMO_CLONES void tion_span(double* p, const double* g, double* m, int64_t n, double keep, double alpha,
                          double step) {
  tion_body<double>(p, g, m, n, keep, alpha, step);
}

template <typename T>
void tion_impl(TensorList params, TensorList grads, TensorList exp_avgs, double lr, double alpha) {
  const T keep = 1 - alpha, a = alpha, step = lr;
  for_each_span(params, [&](size_t t, int64_t begin, int64_t end) {
    tion_span(params[t].data_ptr<T>() + begin, grads[t].data_ptr<T>() + begin,
              exp_avgs[t].data_ptr<T>() + begin, end - begin, keep, a, step);
  });
}

// The Python rule's second per-step scalar is the gradient freshness; alpha = (1 - beta1) * it.
void tion_step(TensorList params, TensorList grads, TensorList exp_avgs, double lr, double freshness,
               double beta1) {
  check_floating(params);
  for (auto* list : {&params, &grads, &exp_avgs}) check_list(*list, params[0], "tion");
  check_parallel(params, grads, "grads");
  check_parallel(params, exp_avgs, "exp_avgs");
  const double alpha = (1 - beta1) * freshness;
  if (params[0].scalar_type() == at::kFloat) {
    tion_impl<float>(params, grads, exp_avgs, lr, alpha);
  } else {
    tion_impl<double>(params, grads, exp_avgs, lr, alpha);
  }
  bump_versions({params, exp_avgs});
}

// ------------------------------------------------------------------------------------ EmoVoid
template <typename T>
EMO_INLINE void void_body(T* __restrict p, const T* __restrict g, int64_t n, T step) {
  for (int64_t i = 0; i < n; ++i) p[i] = p[i] - sign_of(g[i]) * step;
}

EMO_CLONES void void_span(float* p, const float* g, int64_t n, float step) { void_body<float>(p, g, n, step); }
EMO_CLONES void void_span(double* p, const double* g, int64_t n, double step) { void_body<double>(p, g, n, step); }

void void_step(TensorList params, TensorList grads, double lr, double drive) {
  check_floating(params);
  for (auto* list : {&params, &grads}) check_list(*list, params[0], "void");
  check_parallel(params, grads, "grads");
  const double step = lr * drive;
  for_each_span(params, [&](size_t t, int64_t begin, int64_t end) {
    if (params[0].scalar_type() == at::kFloat) {
      void_span(params[t].data_ptr<float>() + begin, grads[t].data_ptr<float>() + begin, end - begin,
                static_cast<float>(step));
    } else {
      void_span(params[t].data_ptr<double>() + begin, grads[t].data_ptr<double>() + begin, end - begin, step);
    }
  });
  bump_versions({params});
}

// ------------------------------------------------------------------ EmoTion's, EmoVoid's norm
// The sum of the tensors' L1 norms, as the reference computes it (each tensor's norm in its
// dtype, then added up in order, promoting float32 to float64 where they mix), with each
// tensor's elements summed in double over chunks of a fixed size: the bits do not depend on
// how many threads share the work.
template <typename T>
EMO_INLINE double abs_sum_body(const T* __restrict x, int64_t n) {
  constexpr int64_t kLanes = 8;
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += std::abs(static_cast<double>(x[i + k]));
  }
  for (; i < n; ++i) lanes[0] += std::abs(static_cast<double>(x[i]));
  double sum = 0;
  for (double lane : lanes) sum += lane;
  return sum;
}

EMO_CLONES double abs_sum(const float* x, int64_t n) { return abs_sum_body<float>(x, n); }
EMO_CLONES double abs_sum(const double* x, int64_t n) { return abs_sum_body<double>(x, n); }

Tensor l1_total(TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "l1_total: expected at least one tensor");
  bool any_double = false;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "l1_total: every tensor must be on the CPU");
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
                "l1_total: float32 or float64 tensors only, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "l1_total: every tensor must be contiguous");
    any_double = any_double || t.scalar_type() == at::kDouble;
  }
  struct Chunk {
    size_t tensor;
    int64_t begin, end;
  };
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t begin = 0; begin < n; begin += kGrain) chunks.push_back({t, begin, std::min(n, begin + kGrain)});
  }
  std::vector<double> sums(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const Chunk& chunk = chunks[c];
      const Tensor& t = tensors[chunk.tensor];
      sums[c] = t.scalar_type() == at::kFloat
                    ? abs_sum(t.data_ptr<float>() + chunk.begin, chunk.end - chunk.begin)
                    : abs_sum(t.data_ptr<double>() + chunk.begin, chunk.end - chunk.begin);
    }
  });
  std::vector<double> norms(tensors.size(), 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) norms[chunks[c].tensor] += sums[c];
  // each norm rounded to its tensor's dtype, then added up in order in the promoted dtype
  if (any_double) {
    double total = 0;
    for (size_t t = 0; t < tensors.size(); ++t) {
      total += tensors[t].scalar_type() == at::kFloat ? static_cast<double>(static_cast<float>(norms[t])) : norms[t];
    }
    return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
  }
  float total = 0;
  for (double norm : norms) total += static_cast<float>(norm);
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY(emolightning, m) {
  m.def("navi_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, float lr, float drive, float beta1, float beta2, float eps, "
        "float weight_decay) -> ()");
  m.def("lynx_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float lr, "
        "float drive, float beta1, float beta2, float weight_decay) -> ()");
  m.def("fact_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] rows, Tensor(c!)[] cols, "
        "Tensor(d!)[] params_1d, Tensor[] grads_1d, Tensor(e!)[] exp_avg_sqs, float lr, "
        "float drive, float beta1, float beta2, float eps, float weight_decay) -> ()");
  m.def("sens_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, float lr, float drive, float beta1, float beta2, float eps, "
        "float weight_decay) -> ()");
  m.def("airy_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] rows, Tensor(c!)[] cols, "
        "Tensor(d!)[] params_1d, Tensor[] grads_1d, Tensor(e!)[] exp_avg_sqs, float lr, "
        "float drive, float beta2, float weight_decay) -> ()");
  m.def("tion_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float lr, "
        "float freshness, float beta1) -> ()");
  m.def("void_step_(Tensor(a!)[] params, Tensor[] grads, float lr, float drive) -> ()");
  m.def("l1_total(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(emolightning, CPU, m) {
  m.impl("navi_step_", &navi_step);
  m.impl("lynx_step_", &lynx_step);
  m.impl("fact_step_", &fact_step);
  m.impl("sens_step_", &sens_step);
  m.impl("airy_step_", &airy_step);
  m.impl("tion_step_", &tion_step);
  m.impl("void_step_", &void_step);
  m.impl("l1_total", &l1_total);
}
