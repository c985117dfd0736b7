// Work split, reduction and instruction-set choice of the "cpu" gated_retrieve backend.
//
// Parallel plan: K is cut into key tiles (about kTileBytes each, so a tile stays in L2 while every
// group of 4 queries walks over it), consecutive tiles form key chunks of about kChunkBytes,
// queries form query groups. A work item is (key chunk, query group). Threads claim items one at
// a time from an atomic counter, so a thread that the OS preempts (a busy neighbour process)
// holds back at most the one small item it claimed, never a fixed share of the call; there is no
// barrier between claiming and the end of the scan. Each item writes the running (max, argmax) of
// its queries into its chunk's slot of a partials array; the partials are reduced per query in
// increasing chunk order with a strict '>', so the lowest index wins ties, and neither the result
// nor its rounding depends on the number of threads or on which thread ran which item. Per-thread
// scratch and per-chunk partials are a cache line apart, so threads never write to a shared line.
#include "gated_retrieve_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace neuraldb {
namespace cpu {
namespace {

constexpr int64_t kTileBytes = 128 * 1024;     // half the L2 of small cores: keys + queries fit
constexpr int64_t kMaxTileKeys = 1024;         // bounds the per-thread norm scratch for tiny dim
constexpr int64_t kChunkBytes = 1 << 20;       // keys per work item: tens of microseconds of work
constexpr int64_t kItemsPerThread = 8;         // at least this many items per thread (small K)
constexpr int64_t kMinParallelWork = 1 << 16;  // multiply-adds below which one thread is faster
constexpr int64_t kCacheLineBytes = 64;
constexpr int64_t kFilterTileBytes = 256 * 1024;  // bf16 keys staged per tile of the filtered scan
constexpr int64_t kFilterLanes = 32;              // bf16 elements per vdpbf16ps

int64_t key_element_bytes(KeyDtype dtype) {
  switch (dtype) {
    case KeyDtype::float64: return 8;
    case KeyDtype::float32: return 4;
    case KeyDtype::bfloat16:
    case KeyDtype::float16: return 2;
  }
  return 4;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

template <typename Acc>
void run_scan(Isa isa, const ScanJob<Acc>& job) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::avx512) return avx512::scan(job);
  if (isa == Isa::avx2) return avx2::scan(job);
#endif
  generic::scan(job);
}

template <typename Acc>
void run_row_inv_norms(Isa isa, const Acc* rows, int64_t n, int64_t dim, Acc* inv,
                       uint8_t* finite) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Isa::avx512) return avx512::row_inv_norms(rows, n, dim, inv, finite);
  if (isa == Isa::avx2) return avx2::row_inv_norms(rows, n, dim, inv, finite);
#endif
  generic::row_inv_norms(rows, n, dim, inv, finite);
}

// Bound on |S - a| (gated_retrieve_cpu_filter.h) at d1 = dim, u = 2^-24, bf16 rounding e = 2^-8:
// - S, the exact scan's float32 cosine, is within 1.01 (2 d1 + 8) u + u of the real cosine
//   q_hat . k_hat (the test suite's derivation, python_tests/conftest.py, _cosine_tolerance).
// - a = fl(<q_b, k_b>) / |k_b|: q_b = q_hat (1 + th_j) with |th_j| <= e + d1 u / 2 + 3 u (the
//   float32 normalisation, then bf16 rounding), k_b = k (1 + ph_j) with |ph_j| <= e_k (e for
//   float32/float16 keys, 0 for bf16 keys), so |k_b| / |k| is in [1 - e_k, 1 + e_k] and, in real
//   arithmetic, |<q_b, k_b> / |k_b| - q_hat . k_hat| <= ((e + d1 u / 2 + 3 u)(1 + e_k) + 2 e_k) / (1 - e_k).
//   The float32 sums (any order: vdpbf16ps, the lane reduction) add gamma_d1 sum |q_b k_b| <=
//   1.02 d1 u |k| to the dot product and a relative d1 u / 2 + 3 u through |k_b|; the roundings of
//   a, a - eps and a + eps add a few u. Underflow is excluded: keys with |k_b|^2 outside
//   [2^-60, 2^60] and queries with 1/|q| outside [2^-30, 2^30] are always rescored.
// Altogether |c - a| <= 1.02 (e + 2 e_k) + 2.1 d1 u + 12 u, rounded up here to
// 1.02 (e + 2 e_k) + 3.3 d1 u + 64 u, then eps = that + the first bound, rounded up to a float.
float filter_eps(int64_t dim, KeyDtype key_dtype) {
  const double u = 0x1p-24, e = 0x1p-8, d = static_cast<double>(dim);
  const double e_k = key_dtype == KeyDtype::bfloat16 ? 0.0 : e;
  const double bound = 1.01 * (2 * d + 8) * u + u + 1.02 * (e + 2 * e_k) + 3.3 * d * u + 64 * u;
  const float eps = static_cast<float>(bound);
  return static_cast<double>(eps) < bound ? std::nextafter(eps, std::numeric_limits<float>::infinity()) : eps;
}

// bf16 bits of x, rounded to nearest even (NaN stays NaN).
uint16_t bf16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

}  // namespace

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

template <typename Acc>
void best_match(const Acc* queries, int64_t n, int64_t dim, const void* keys, KeyDtype key_dtype,
                int64_t m, int num_threads, Isa isa, MatchPath path, Acc* best_score,
                int64_t* best_index) {
  constexpr bool kFloat = std::is_same<Acc, float>::value;
  const bool filtered = kFloat && path == MatchPath::filtered;  // double always scans
  const int64_t padded_dim = ceil_div(dim, kFilterLanes) * kFilterLanes;
  const int64_t key_row_bytes = std::max<int64_t>(1, dim * key_element_bytes(key_dtype));
  int64_t tile = filtered ? std::max<int64_t>(1, kFilterTileBytes / (2 * padded_dim))
                          : std::min(std::max<int64_t>(1, kTileBytes / key_row_bytes), kMaxTileKeys);
  if (tile >= 4) tile -= tile % 4;
  const int64_t num_tiles = ceil_div(m, tile);

  const bool parallel = num_threads > 1 && n * m * dim >= kMinParallelWork;
  const int threads = parallel ? num_threads : 1;
  const int64_t target_items = parallel ? kItemsPerThread * threads : 1;
  const int64_t key_chunks =
      std::min(num_tiles, std::max(target_items, ceil_div(m * key_row_bytes, kChunkBytes)));
  // Few key chunks (small m): also split the queries, in multiples of the 4-query micro-kernel.
  int64_t group_size = n;
  if (key_chunks < target_items) {
    const int64_t groups = std::min(ceil_div(n, 4), ceil_div(target_items, key_chunks));
    group_size = ceil_div(ceil_div(n, groups), 4) * 4;
  }
  const int64_t query_groups = ceil_div(n, group_size);
  const int64_t num_items = key_chunks * query_groups;

  // Strides with a cache line of padding: one thread's (or chunk's) slots never share a line with
  // another's, whatever the alignment of the allocation. Per-thread scratch: the tile's key norms,
  // and for the filtered scan the lower bounds of a query group and the staged bf16 tile.
  const int64_t line = kCacheLineBytes / static_cast<int64_t>(sizeof(Acc));
  const int64_t part_stride = n + line;
  const int64_t scratch_stride = ceil_div(tile + (filtered ? group_size : 0), line) * line + line;
  const int64_t staged_stride = filtered ? tile * padded_dim + kCacheLineBytes / 2 : 0;
  // Query norms before the scan (n * dim work, negligible): no barrier inside the parallel region.
  std::vector<Acc> query_inv_norm(n);
  std::vector<uint8_t> query_finite(n);
  run_row_inv_norms(isa, queries, n, dim, query_inv_norm.data(), query_finite.data());
  std::vector<uint16_t> query_bf16(filtered ? n * padded_dim : 0, 0);
  std::vector<uint8_t> query_exact_only(filtered ? n : 0);
  for (int64_t r = 0; filtered && r < n; ++r) {
    const Acc inv = query_inv_norm[r];
    query_exact_only[r] = !(inv >= Acc(0x1p-30) && inv <= Acc(0x1p30));
    for (int64_t j = 0; j < dim; ++j)
      query_bf16[r * padded_dim + j] = bf16_bits(static_cast<float>(queries[r * dim + j] * inv));
  }
  const float eps = filtered ? filter_eps(dim, key_dtype) : 0.0f;
  std::vector<float> shared_lower_bound(filtered ? n : 0, -std::numeric_limits<float>::infinity());
  std::vector<Acc> part_score(key_chunks * part_stride, -std::numeric_limits<Acc>::infinity());
  std::vector<int64_t> part_index(key_chunks * part_stride, -1);
  std::vector<Acc> scratch(threads * scratch_stride);
  std::vector<uint16_t> staged(threads * staged_stride);
  std::atomic<int64_t> next_item{0};

#pragma omp parallel num_threads(threads) if (parallel)
  {
    Acc* thread_scratch = scratch.data() + thread_index() * scratch_stride;
    for (int64_t item = next_item.fetch_add(1, std::memory_order_relaxed); item < num_items;
         item = next_item.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t chunk = item % key_chunks;
      const int64_t q0 = (item / key_chunks) * group_size;
      const int64_t num_queries = std::min(group_size, n - q0);
      const int64_t key_begin = chunk * num_tiles / key_chunks * tile;
      const int64_t key_end = std::min(m, (chunk + 1) * num_tiles / key_chunks * tile);
      Acc* item_score = part_score.data() + chunk * part_stride + q0;
      int64_t* item_index = part_index.data() + chunk * part_stride + q0;
      if constexpr (kFloat) {
        if (filtered) {
          float* lower_bound = thread_scratch + tile;
          std::fill(lower_bound, lower_bound + num_queries, -std::numeric_limits<float>::infinity());
          const FilterJob job{queries + q0 * dim, query_inv_norm.data() + q0, query_finite.data() + q0,
                              query_exact_only.data() + q0, query_bf16.data() + q0 * padded_dim,
                              num_queries, dim, padded_dim, keys, key_dtype, key_begin, key_end, tile,
                              staged.data() + thread_index() * staged_stride, thread_scratch,
                              lower_bound, shared_lower_bound.data() + q0, eps, item_score,
                              item_index};
#if defined(__x86_64__) || defined(__i386__)
          avx512bf16::filtered_scan(job);  // the binding allows this path on AVX512-BF16 CPUs only
#endif
          continue;
        }
      }
      ScanJob<Acc> job;
      job.queries = queries + q0 * dim;
      job.query_inv_norm = query_inv_norm.data() + q0;
      job.num_queries = num_queries;
      job.dim = dim;
      job.keys = keys;
      job.key_dtype = key_dtype;
      job.key_begin = key_begin;
      job.key_end = key_end;
      job.key_tile = tile;
      job.key_inv_norm_scratch = thread_scratch;
      job.best_score = item_score;
      job.best_index = item_index;
      run_scan(isa, job);
    }
  }

  for (int64_t r = 0; r < n; ++r) {
    Acc score = -std::numeric_limits<Acc>::infinity();
    int64_t index = -1;
    for (int64_t chunk = 0; chunk < key_chunks; ++chunk) {
      if (part_score[chunk * part_stride + r] > score) {
        score = part_score[chunk * part_stride + r];
        index = part_index[chunk * part_stride + r];
      }
    }
    if (!query_finite[r]) {
      score = std::numeric_limits<Acc>::quiet_NaN();
      index = -1;
    }
    best_score[r] = score;
    best_index[r] = index;
  }
}

template void best_match<float>(const float*, int64_t, int64_t, const void*, KeyDtype, int64_t,
                                int, Isa, MatchPath, float*, int64_t*);
template void best_match<double>(const double*, int64_t, int64_t, const void*, KeyDtype, int64_t,
                                 int, Isa, MatchPath, double*, int64_t*);

}  // namespace cpu
}  // namespace neuraldb
