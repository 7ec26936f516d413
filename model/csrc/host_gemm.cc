// float32 GEMM on the host CPU through a CBLAS sgemm, as XLA FFI custom calls (model/host_blas.py, installed as podformer.model.host_blas).
//
// C = op(A) @ op(B), op = identity or transpose, all operands row-major and dense. The BLAS is the one
// numpy already loaded (OpenBLAS); its sgemm address arrives as an attribute, so this file links to
// nothing but the XLA FFI headers that jaxlib ships.
//
// Threading: the GEMM is cut into as many parts as XLA's intra-op pool has threads, along the larger
// output dimension, and each part runs a single-threaded sgemm (the BLAS's own thread count is set to 1
// for the calling thread). The BLAS's own threads would compete with XLA's pool for the same cores:
// XLA runs independent ops concurrently and its idle workers spin, and each side then runs at half
// speed.
//
// SoftmaxCrossEntropy: the language-model head's loss and logits gradient in one pass over each row
// (podformer's model/lm_head.py), in place of XLA's three passes over the (tokens x vocabulary) array.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;  // CBLAS enum values

using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                         int64_t, float, float*, int64_t);
using Sgemm32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                         int32_t, float, float*, int32_t);
using SetLocalThreads = int (*)(int);

// The BLAS, set once from Python (podformer/host_blas.py) before any call: addresses stay out of the
// compiled programs, so XLA's persistent compilation cache can reuse them across processes.
struct Blas {
  int64_t sgemm = 0, set_threads = 0;
  bool ilp64 = true;
};
Blas g_blas;

// Below this many multiply-adds a GEMM runs as one part: scheduling would cost more than it saves.
constexpr int64_t kMinPartMacs = int64_t{1} << 21;

struct Gemm {
  int64_t fn, set_threads;
  bool ilp64, ta, tb;
  const float *a, *b;
  float* c;
  int64_t m, n, k, lda, ldb;

  // Rows [lo, hi) of C when split along m, columns [lo, hi) when split along n.
  void Run(bool split_m, int64_t lo, int64_t hi) const {
    const float* ap = a;
    const float* bp = b;
    float* cp = c;
    int64_t rows = m, cols = n;
    if (split_m) {
      ap = ta ? a + lo : a + lo * lda;
      cp = c + lo * n;
      rows = hi - lo;
    } else {
      bp = tb ? b + lo * ldb : b + lo;
      cp = c + lo;
      cols = hi - lo;
    }
    int saved = set_threads ? reinterpret_cast<SetLocalThreads>(set_threads)(1) : 0;
    int opa = ta ? kTrans : kNoTrans, opb = tb ? kTrans : kNoTrans;
    if (ilp64) {
      reinterpret_cast<Sgemm64>(fn)(kRowMajor, opa, opb, rows, cols, k, 1.0f, ap, lda, bp, ldb, 0.0f, cp, n);
    } else {
      reinterpret_cast<Sgemm32>(fn)(kRowMajor, opa, opb, static_cast<int32_t>(rows), static_cast<int32_t>(cols),
                                    static_cast<int32_t>(k), 1.0f, ap, static_cast<int32_t>(lda), bp,
                                    static_cast<int32_t>(ldb), 0.0f, cp, static_cast<int32_t>(n));
    }
    if (set_threads && saved > 0) reinterpret_cast<SetLocalThreads>(set_threads)(saved);
  }
};

// Runs fn(0) .. fn(parts - 1) on the calling thread and XLA's intra-op pool. Parts are claimed from a
// shared counter, by the caller too, so the call never waits for a part that no thread has started
// (two calls on a 2-thread pool, each waiting for its helper, would deadlock).
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t parts, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  // Helpers that start after every part is claimed only read the counter: `fn` outlives every call.
  auto work = [state, parts, &fn] {
    for (int64_t p; (p = state->next.fetch_add(1)) < parts;) {
      fn(p);
      if (state->done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t p = 1; p < parts; ++p) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == parts; });
}

ffi::Error HostGemmImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                        ffi::ResultBuffer<ffi::F32> c, bool transpose_a, bool transpose_b) {
  const int64_t fn = g_blas.sgemm, set_threads = g_blas.set_threads;
  const bool ilp64 = g_blas.ilp64;
  if (fn == 0) return ffi::Error::Internal("host_gemm: no BLAS set (PodformerSetBlas was not called)");
  auto ad = a.dimensions();
  auto bd = b.dimensions();
  // Rank 3: a batch of independent products (attention's per-head matmuls), split by batch.
  if (ad.size() != bd.size() || ad.size() < 2 || ad.size() > 3 || (ad.size() == 3 && ad[0] != bd[0]))
    return ffi::Error::InvalidArgument("host_gemm takes two rank-2 operands or two rank-3 ones with one batch size");
  const int64_t batch = ad.size() == 3 ? ad[0] : 1;
  const int64_t r = ad.size() - 2;  // index of the row dimension
  Gemm g{fn, set_threads, ilp64, transpose_a, transpose_b, a.typed_data(), b.typed_data(), c->typed_data()};
  g.m = transpose_a ? ad[r + 1] : ad[r];
  g.k = transpose_a ? ad[r] : ad[r + 1];
  g.n = transpose_b ? bd[r] : bd[r + 1];
  g.lda = ad[r + 1];
  g.ldb = bd[r + 1];
  if ((transpose_b ? bd[r + 1] : bd[r]) != g.k) return ffi::Error::InvalidArgument("host_gemm: contracting dims differ");
  if (batch == 0 || g.m == 0 || g.n == 0) return ffi::Error::Success();
  if (g.k == 0) {  // a BLAS may return without writing C
    std::memset(g.c, 0, sizeof(float) * batch * g.m * g.n);
    return ffi::Error::Success();
  }
  if (!ilp64 && (g.m > INT32_MAX || g.n > INT32_MAX || g.k > INT32_MAX || g.lda > INT32_MAX || g.ldb > INT32_MAX))
    return ffi::Error::InvalidArgument("host_gemm: dimension too large for a 32-bit BLAS");
  int64_t threads = set_threads ? pool.num_threads() : 1;  // without a per-thread setting the BLAS threads itself

  if (batch > 1) {
    const int64_t sa = g.m * g.k, sb = g.k * g.n, sc = g.m * g.n;
    auto run_batches = [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        Gemm gi = g;
        gi.a = g.a + i * sa;
        gi.b = g.b + i * sb;
        gi.c = g.c + i * sc;
        gi.Run(true, 0, g.m);
      }
    };
    int64_t parts = std::min(threads, std::min(batch, batch * g.m * g.n * g.k / kMinPartMacs));
    if (parts <= 1) {
      run_batches(0, batch);
    } else {
      ParallelFor(pool, parts, [&](int64_t p) { run_batches(batch * p / parts, batch * (p + 1) / parts); });
    }
    return ffi::Error::Success();
  }

  // Split the larger output dimension: each part re-packs the whole of the other operand, so the
  // smaller one is the one packed twice.
  bool split_m = g.m >= g.n;
  int64_t extent = split_m ? g.m : g.n;
  int64_t parts = std::min(threads, g.m * g.n * g.k / kMinPartMacs);
  parts = std::min(parts, extent / 16);
  if (parts <= 1) {
    g.Run(split_m, 0, extent);
    return ffi::Error::Success();
  }
  ParallelFor(pool, parts, [&](int64_t p) { g.Run(split_m, extent * p / parts, extent * (p + 1) / parts); });
  return ffi::Error::Success();
}

// exp(x) for x <= 0 (a logit minus its row maximum): 2^n * e^r with n = round(x / ln 2) and
// |r| <= ln(2) / 2, e^r by its Taylor polynomial to r^7 (relative error < 1e-8, below float32's
// rounding). Branch-free, so the row loops vectorise; inputs below -87 give 0 (e^-87 ~ 1.6e-38).
inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  float n = std::floor(x * 1.4426950408889634f + 0.5f);
  float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;  // ln 2 in two parts (Cody-Waite)
  float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Per row i of logits (M, V): ce_i = log(sum exp(l)) - l[t_i], correct_i = (l[t_i] is the row maximum),
// and with `grad` the row becomes w_i * (softmax(l) - onehot(t_i)), the gradient of sum_i w_i ce_i.
// A target outside [0, V) has no logit: ce and correct are NaN, as XLA's gather gives.
ffi::Error SoftmaxCrossEntropyImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets,
                                   ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> grad_out,
                                   ffi::ResultBuffer<ffi::F32> ce_out, ffi::ResultBuffer<ffi::F32> correct_out,
                                   bool grad) {
  auto dims = logits.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("softmax_cross_entropy takes (tokens, vocab) logits");
  const int64_t M = dims[0], V = dims[1];
  float* rows = grad_out->typed_data();  // aliases `logits` (input_output_aliases)
  if (rows != logits.typed_data()) std::memcpy(rows, logits.typed_data(), sizeof(float) * M * V);
  const int32_t* t = targets.typed_data();
  const float* w = weights.typed_data();
  float* ce = ce_out->typed_data();
  float* correct = correct_out->typed_data();
  auto run_rows = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      float* row = rows + i * V;
      float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < V; ++j) mx = row[j] > mx ? row[j] : mx;
      const bool has_target = t[i] >= 0 && t[i] < V;
      const float target = has_target ? row[t[i]] : std::numeric_limits<float>::quiet_NaN();
      float sum = 0.0f;
      if (grad) {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < V; ++j) {
          float e = ExpNonPositive(row[j] - mx);
          row[j] = e;
          sum += e;
        }
        const float scale = w[i] / sum;
#pragma omp simd
        for (int64_t j = 0; j < V; ++j) row[j] *= scale;
        if (has_target) row[t[i]] -= w[i];
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < V; ++j) sum += ExpNonPositive(row[j] - mx);
      }
      ce[i] = std::log(sum) + mx - target;
      correct[i] = has_target ? (target >= mx ? 1.0f : 0.0f) : std::numeric_limits<float>::quiet_NaN();
    }
  };
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), M * V / (int64_t{1} << 16)));
  parts = std::min(parts, M);
  if (parts <= 1) {
    run_rows(0, M);
  } else {
    ParallelFor(pool, parts, [&](int64_t p) { run_rows(M * p / parts, M * (p + 1) / parts); });
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" void PodformerSetBlas(int64_t sgemm, int64_t set_threads, int ilp64) {
  g_blas.sgemm = sgemm;
  g_blas.set_threads = set_threads;
  g_blas.ilp64 = ilp64 != 0;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HostGemm, HostGemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SoftmaxCrossEntropy, SoftmaxCrossEntropyImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("grad"));
