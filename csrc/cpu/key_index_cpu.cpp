// Candidate pass of the compressed key index over int8 codes: bounds, candidate collection, work
// split and the run-time choice of instruction set (see key_index_cpu.h and, for the bound,
// neuraldb_kernels/ops/key_index.py).
//
// Work split: the keys are cut into chunks of a FIXED number of keys (so which candidates a chunk
// keeps, and whether it overflows, depends on m only, never on the thread count); threads claim
// chunks from an atomic counter. Within a chunk, blocks of 64 keys stay in L2 while every group of
// up to 4 queries computes its integer dots. Each (chunk, query) keeps its running best lower bound
// and the keys whose upper bound reached it (a superset of the final set, whose bound can only
// rise); a buffer past 2 * budget is filtered by the running bound, and a chunk still over budget
// overflows its query. The merge takes the best lower bound over the chunks and keeps, in chunk
// order (so ascending), the entries that reach it.
#include "key_index_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace neuraldb {
namespace cpu {
namespace {

constexpr int64_t kChunkKeys = 4096;
constexpr int64_t kBlockKeys = 64;
constexpr int kQueryGroup = 4;
constexpr int64_t kMinParallelWork = 1 << 18;  // int8 multiply-adds below which one thread is faster

struct ChunkCandidates {
  float best_lower = -std::numeric_limits<float>::infinity();
  bool overflowed = false;
  std::vector<std::pair<int64_t, float>> entries;  // (key, upper bound), ascending keys
};

void run_dots(Int8Isa isa, const int8_t* q, const int32_t* query_sum, int num_queries,
              const int8_t* keys, int64_t num_keys, int64_t dim, int32_t* dots, int64_t stride,
              const int8_t* next) {
#if defined(__x86_64__) || defined(__i386__)
  if (isa == Int8Isa::avx512_vnni)
    return int8_avx512_vnni::int8_dots(q, query_sum, num_queries, keys, num_keys, dim, dots, stride, next);
  if (isa == Int8Isa::avx2)
    return int8_avx2::int8_dots(q, query_sum, num_queries, keys, num_keys, dim, dots, stride, next);
#endif
  int8_generic::int8_dots(q, query_sum, num_queries, keys, num_keys, dim, dots, stride, next);
}

void drop_below(ChunkCandidates& part) {
  const float bound = part.best_lower;
  part.entries.erase(std::remove_if(part.entries.begin(), part.entries.end(),
                                    [bound](const std::pair<int64_t, float>& e) { return !(e.second >= bound); }),
                     part.entries.end());
}

void scan_chunk(const Int8CandidateInputs& in, Int8Isa isa, const int32_t* query_sum, int64_t chunk,
                int32_t* dots, ChunkCandidates* parts) {
  const int64_t dim = in.dim;
  const int64_t chunk_end = std::min(in.m, (chunk + 1) * kChunkKeys);
  for (int64_t b0 = chunk * kChunkKeys; b0 < chunk_end; b0 += kBlockKeys) {
    const int64_t b1 = std::min(chunk_end, b0 + kBlockKeys);
    const int8_t* next = b1 < chunk_end ? in.key_codes + b1 * dim : nullptr;
    for (int64_t g = 0; g < in.n; g += kQueryGroup) {
      const int group = static_cast<int>(std::min<int64_t>(kQueryGroup, in.n - g));
      run_dots(isa, in.query_codes + g * dim, query_sum + g, group, in.key_codes + b0 * dim, b1 - b0,
               dim, dots, kBlockKeys, g == 0 ? next : nullptr);
      for (int a = 0; a < group; ++a) {
        const int64_t j = g + a;
        ChunkCandidates& part = parts[j];
        const float t = in.query_scale[j], t_error = in.query_error[j];
        for (int64_t i = b0; i < b1; ++i) {
          const float approx = static_cast<float>(dots[a * kBlockKeys + (i - b0)]) * (t * in.key_scale[i]);
          const float eps = in.key_error[i] + t_error * in.key_norm[i] + in.slack;
          const float lower = approx - eps, upper = approx + eps;
          if (lower > part.best_lower) part.best_lower = lower;  // NaN never compares true
          if (part.overflowed || !(upper >= part.best_lower)) continue;
          part.entries.emplace_back(i, upper);
          if (static_cast<int64_t>(part.entries.size()) > 2 * in.budget) {
            drop_below(part);
            if (static_cast<int64_t>(part.entries.size()) > in.budget) {
              part.overflowed = true;
              part.entries.clear();
            }
          }
        }
      }
    }
  }
}

}  // namespace

bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

bool cpu_has_int8_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

void int8_candidates(const Int8CandidateInputs& in, int num_threads, Int8Isa isa,
                     std::vector<int64_t>& keys_out, int64_t* offsets, uint8_t* overflowed) {
  const int64_t n = in.n, dim = in.dim;
  std::vector<int32_t> query_sum(n);
  for (int64_t j = 0; j < n; ++j) {
    int32_t sum = 0;
    for (int64_t f = 0; f < dim; ++f) sum += in.query_codes[j * dim + f];
    query_sum[j] = sum;
  }
  const int64_t num_chunks = (in.m + kChunkKeys - 1) / kChunkKeys;
  std::vector<ChunkCandidates> parts(num_chunks * n);
  const bool parallel = num_threads > 1 && num_chunks > 1 && n * in.m * dim >= kMinParallelWork;
  const int threads = parallel ? num_threads : 1;
  std::vector<int32_t> scratch(static_cast<size_t>(threads) * kQueryGroup * kBlockKeys + 16 * threads);
  std::atomic<int64_t> next_chunk{0};

#pragma omp parallel num_threads(threads) if (parallel)
  {
#ifdef _OPENMP
    const int thread = omp_get_thread_num();
#else
    const int thread = 0;
#endif
    int32_t* dots = scratch.data() + thread * (kQueryGroup * kBlockKeys + 16);  // a line apart
    for (int64_t c = next_chunk.fetch_add(1, std::memory_order_relaxed); c < num_chunks;
         c = next_chunk.fetch_add(1, std::memory_order_relaxed)) {
      scan_chunk(in, isa, query_sum.data(), c, dots, parts.data() + c * n);
    }
  }

  keys_out.clear();
  offsets[0] = 0;
  for (int64_t j = 0; j < n; ++j) {
    float bound = -std::numeric_limits<float>::infinity();
    bool over = false;
    for (int64_t c = 0; c < num_chunks; ++c) {
      bound = std::max(bound, parts[c * n + j].best_lower);
      over = over || parts[c * n + j].overflowed;
    }
    const size_t first = keys_out.size();
    for (int64_t c = 0; c < num_chunks && !over; ++c) {
      for (const auto& entry : parts[c * n + j].entries) {
        if (entry.second >= bound) keys_out.push_back(entry.first);
      }
      over = static_cast<int64_t>(keys_out.size() - first) > in.budget;
    }
    if (over) keys_out.resize(first);
    overflowed[j] = over ? 1 : 0;
    offsets[j + 1] = static_cast<int64_t>(keys_out.size());
  }
}

}  // namespace cpu
}  // namespace neuraldb
