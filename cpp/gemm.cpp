#include "gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <caffe/util/math_functions.hpp>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <tuple>
#include <vector>

// OpenBLAS's thread-count controls; absent (null) when Caffe was linked against another BLAS.
extern "C" {
void openblas_set_num_threads(int) __attribute__((weak));
int openblas_get_num_threads(void) __attribute__((weak));
char* openblas_get_corename(void) __attribute__((weak));
}

namespace fastsal {
namespace {

// What a split must keep. Per element, OpenBLAS's blocked kernels sum k in blocks of its GEMM_Q and add
// each block's dot product to c; threaded, it cuts a last stretch between Q and 2Q in halves (rounded
// up). Each part here is a single-threaded call per such block, so every element of c sees the same
// sums in the same order. No block may be small enough for OpenBLAS's small-matrix kernels (about 1e6
// multiply-adds on AVX-512, another order); calls below Caffe's threading threshold stay Caffe's own.
constexpr double kThreadedWork = 65536.0 * 4;  // OpenBLAS threads a product above this
constexpr double kSmallWork = 1.2e6;
constexpr std::int64_t kAlign = 16;  // column ranges start on 64-byte multiples of a row, when wide

// One product at a time, process-wide: while a split product runs OpenBLAS is at one thread (a call
// from an OpenMP thread must not hand work to OpenBLAS's pool), and a product of another thread must
// not meet that setting (single-threaded, OpenBLAS blocks k and picks kernels otherwise).
std::mutex& products() {
  static std::mutex mutex;
  return mutex;
}

class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : saved_(openblas_get_num_threads()) { openblas_set_num_threads(1); }
  ~SingleThreadedBlas() { openblas_set_num_threads(saved_); }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int saved_;
};

// The k blocks of OpenBLAS's threaded driver for block size q.
std::vector<int> k_blocks(int k, int q) {
  std::vector<int> blocks;
  for (int done = 0; done < k;) {
    int size = k - done;
    if (size >= 2 * q)
      size = q;
    else if (size > q)
      size = (size + 1) / 2;
    blocks.push_back(size);
    done += size;
  }
  return blocks;
}

// c (m x [begin, end) of n) by one single-threaded call per k block (q >= k: one call, OpenBLAS blocks k).
void blocked_part(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, float alpha, const float* a,
                  const float* b, float beta, float* c, std::int64_t begin, std::int64_t end, int q) {
  const int lda = ta == CblasTrans ? m : k, ldb = tb == CblasTrans ? k : n;
  // alpha 1, beta 0, no transposes may go to OpenBLAS's "direct" kernel (another order) when single-
  // threaded; beta 1 on a zeroed output keeps the blocked kernels (0 + x is x, as after beta 0).
  if (beta == 0.f) {
    for (int r = 0; r < m; ++r)
      std::fill(c + std::int64_t(r) * n + begin, c + std::int64_t(r) * n + end, 0.f);
    beta = 1.f;
  }
  const float* b_part = tb == CblasTrans ? b + begin * ldb : b + begin;
  int done = 0;
  for (const int size : k_blocks(k, q)) {
    const float* a_block = ta == CblasTrans ? a + std::int64_t(done) * lda : a + done;
    const float* b_block = tb == CblasTrans ? b_part + done : b_part + std::int64_t(done) * ldb;
    cblas_sgemm(CblasRowMajor, ta, tb, m, int(end - begin), size, alpha, a_block, lda, b_block, ldb,
                done == 0 ? beta : 1.f, c + begin, n);
    done += size;
  }
}

// OpenBLAS's GEMM_Q for this core, found once by matching its own threaded result; 0: not found
// (another BLAS, or a driver that blocks otherwise), and products stay Caffe's calls.
int probe_block_size() {
  if (!openblas_set_num_threads || !openblas_get_num_threads || openblas_get_num_threads() < 2) return 0;
  const int m = 64, n = 512, k = 2000;
  std::mt19937 random(7);
  std::normal_distribution<float> normal;
  std::vector<float> a(std::size_t(m) * k), b(std::size_t(k) * n), want(std::size_t(m) * n), got(want.size());
  for (float& x : a) x = normal(random);
  for (float& x : b) x = normal(random);
  caffe::caffe_cpu_gemm<float>(CblasNoTrans, CblasNoTrans, m, n, k, 1.f, a.data(), b.data(), 0.f,
                               want.data());
  SingleThreadedBlas single;
  for (int q = 128; q <= 1024; q += 16) {
    blocked_part(CblasNoTrans, CblasNoTrans, m, n, k, 1.f, a.data(), b.data(), 0.f, got.data(), 0, n, q);
    if (std::memcmp(got.data(), want.data(), want.size() * sizeof(float)) == 0) return q;
  }
  return 0;
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, const float* b,
          float beta, float* c) {
  const CBLAS_TRANSPOSE ta = trans_a ? CblasTrans : CblasNoTrans, tb = trans_b ? CblasTrans : CblasNoTrans;
  std::lock_guard<std::mutex> one_at_a_time(products());
  static const int q = probe_block_size();
  // Below the threading threshold Caffe's call runs on this thread anyway; without a known Q (another
  // BLAS) or with OpenBLAS at one thread there is nothing to stand in for.
  if (q == 0 || omp_in_parallel() || openblas_get_num_threads() < 2 || double(m) * n * k <= kThreadedWork) {
    caffe::caffe_cpu_gemm<float>(ta, tb, m, n, k, alpha, a, b, beta, c);
    return;
  }
  const int threads = omp_get_max_threads();
  // Column ranges, one per thread; the narrowest part's smallest k block must stay a blocked product.
  const std::int64_t unit = n >= threads * 16 * kAlign ? kAlign : 1, units = (n + unit - 1) / unit;
  const auto bound = [&](int t) { return std::min<std::int64_t>(n, units * t / threads * unit); };
  std::int64_t narrowest = n;
  for (int t = 0; t < threads; ++t) narrowest = std::min(narrowest, bound(t + 1) - bound(t));
  const auto blocks = k_blocks(k, q);
  const double thinnest = *std::min_element(blocks.begin(), blocks.end());
  const auto mine = [&](float* out) {
    SingleThreadedBlas single;
    if (threads >= 2 && double(m) * narrowest * thinnest > kSmallWork) {
#pragma omp parallel num_threads(threads)
      {
        // A smaller team than asked for (thread limits) still computes every part.
        for (int part = omp_get_thread_num(); part < threads; part += omp_get_num_threads())
          if (bound(part + 1) > bound(part))
            blocked_part(ta, tb, m, n, k, alpha, a, b, beta, out, bound(part), bound(part + 1), q);
      }
    } else if (double(m) * n * thinnest > kSmallWork) {  // too thin to split: the same blocks, this thread
      blocked_part(ta, tb, m, n, k, alpha, a, b, beta, out, 0, n, q);
    } else {  // blocks this thin would go to OpenBLAS's small-matrix kernels: one single-threaded call
      blocked_part(ta, tb, m, n, k, alpha, a, b, beta, out, 0, n, k);
    }
  };
  // Whether that gives Caffe's bits depends on OpenBLAS's kernels as well as on its blocks: on cores its
  // version does not know (Prescott's generic kernels) a column range's edges round otherwise. So each
  // shape is checked once, on its first call's own data, against Caffe's call; Caffe's call wherever not.
  static std::map<std::tuple<bool, bool, int, int, int>, bool> gives_caffes_bits;
  const auto shape = std::make_tuple(trans_a, trans_b, m, n, k);
  const auto known = gives_caffes_bits.find(shape);
  if (known != gives_caffes_bits.end()) {
    if (known->second)
      mine(c);
    else
      caffe::caffe_cpu_gemm<float>(ta, tb, m, n, k, alpha, a, b, beta, c);  // OpenBLAS's pool, as in Caffe
    return;
  }
  const std::int64_t size = std::int64_t(m) * n;
  std::vector<float> candidate(c, c + size);
  mine(candidate.data());
  caffe::caffe_cpu_gemm<float>(ta, tb, m, n, k, alpha, a, b, beta, c);
  // A product that is mostly zeros (zero images) would match whatever the order: decide on a later call.
  if (std::count(c, c + size, 0.f) * 2 < size)
    gives_caffes_bits[shape] = std::memcmp(candidate.data(), c, size * sizeof(float)) == 0;
}

const char* blas_core() { return openblas_get_corename ? openblas_get_corename() : nullptr; }

}  // namespace fastsal
