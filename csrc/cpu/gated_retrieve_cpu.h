// Best-cosine-match search of the "cpu" backend of gated_retrieve, free of torch types.
//
// Layering:
//   gated_retrieve_cpu_scan.h      compute kernels (dot products, key-row norms), written once as
//                                  templates and compiled per instruction set into a namespace:
//   gated_retrieve_cpu_avx512.cpp  ... with AVX-512F (+ AVX2, FMA, F16C), 16-float vectors,
//   gated_retrieve_cpu_avx2.cpp    ... with AVX2 + FMA + F16C enabled (namespace avx2),
//   gated_retrieve_cpu_generic.cpp ... with the compiler's baseline flags (namespace generic);
//   gated_retrieve_cpu_filter.h    the filtered prefill scan (bf16 bound, exact rescoring), built in
//   gated_retrieve_cpu_avx512bf16.cpp with AVX512-BF16 over the 16-float exact arithmetic;
//   gated_retrieve_cpu.cpp         planning, OpenMP work split, deterministic reduction and the
//                                  runtime choice of instruction set (__builtin_cpu_supports);
//   bindings.cpp                   the torch/pybind entry point (dtypes, gate, gather).
#pragma once

#include <cstdint>

namespace neuraldb {
namespace cpu {

// Storage type of the key matrix K; keys are always read in this type, never converted as a whole.
enum class KeyDtype { float32, float64, bfloat16, float16 };

// Instruction set used by the compute kernels.
enum class Isa { generic, avx2, avx512 };

// Work unit of the scan: queries [0, num_queries) of `queries` against keys [key_begin, key_end).
// Acc is the accumulation type (float or double); queries are already in Acc.
template <typename Acc>
struct ScanJob {
  const Acc* queries;        // (num_queries, dim) row-major
  const Acc* query_inv_norm; // (num_queries,) 1/|q|, 0 for a zero-norm query
  int64_t num_queries;
  int64_t dim;
  const void* keys;          // (m, dim) row-major, element type given by key_dtype
  KeyDtype key_dtype;
  int64_t key_begin;
  int64_t key_end;
  int64_t key_tile;          // keys per cache tile: each tile is read from memory once per job
  Acc* key_inv_norm_scratch; // (key_tile,) scratch owned by the calling thread
  Acc* best_score;           // (num_queries,) in/out: running max of the cosine
  int64_t* best_index;       // (num_queries,) in/out: its key index (lowest on ties), -1 if none
};

// Work unit of the filtered scan (gated_retrieve_cpu_filter.h, float32 accumulation): queries
// [0, num_queries) against keys [key_begin, key_end); updates best_score/best_index exactly as
// ScanJob<float> does with the avx512 scan.
struct FilterJob {
  const float* queries;            // (num_queries, dim) as given: the exact rescoring reads them
  const float* query_inv_norm;     // (num_queries,) 1/|q| as the scan computes it
  const uint8_t* query_finite;     // (num_queries,) 0: NaN/Inf row, its result is overwritten
  const uint8_t* query_exact_only; // (num_queries,) 1: every key is rescored (|q| out of range)
  const uint16_t* query_bf16;      // (num_queries, padded_dim) bf16 bits of q/|q|, zero padded
  int64_t num_queries;
  int64_t dim;
  int64_t padded_dim;              // dim rounded up to a multiple of 32
  const void* keys;                // (m, dim) row-major, element type given by key_dtype
  KeyDtype key_dtype;              // float32, bfloat16 or float16
  int64_t key_begin;
  int64_t key_end;
  int64_t key_tile;                // keys per cache tile
  uint16_t* key_tile_scratch;      // (key_tile, padded_dim) owned by the calling thread
  float* key_inv_norm_scratch;     // (key_tile,) owned by the calling thread
  float* lower_bound;              // (num_queries,) running max of (approximate score - eps)
  float* shared_lower_bound;       // (num_queries,) the same over every thread's keys so far: read
                                   // and raised with atomic builtins after each tile
  float eps;                       // bound on |exact score - approximate score|
  float* best_score;               // (num_queries,) in/out, as in ScanJob
  int64_t* best_index;             // (num_queries,) in/out, as in ScanJob
};

// Compute kernels of one instruction set (declared for both namespaces, defined by including
// gated_retrieve_cpu_scan.h in the matching translation unit).
#define NEURALDB_DECLARE_SCAN_KERNELS(ns)                                                     \
  namespace ns {                                                                              \
  /* Runs a ScanJob: updates best_score/best_index with strict '>' so the lowest index wins. */ \
  void scan(const ScanJob<float>& job);                                                       \
  void scan(const ScanJob<double>& job);                                                      \
  /* inv_norm[i] = 1/|row i| (0 for a zero row); finite[i] = 1 if row i has no NaN/Inf. */     \
  void row_inv_norms(const float* rows, int64_t n, int64_t dim, float* inv_norm, uint8_t* finite);   \
  void row_inv_norms(const double* rows, int64_t n, int64_t dim, double* inv_norm, uint8_t* finite); \
  }

NEURALDB_DECLARE_SCAN_KERNELS(generic)
NEURALDB_DECLARE_SCAN_KERNELS(avx2)
NEURALDB_DECLARE_SCAN_KERNELS(avx512)
#undef NEURALDB_DECLARE_SCAN_KERNELS

namespace avx512bf16 {
// Runs a FilterJob (AVX-512F/BW/VL and AVX512-BF16).
void filtered_scan(const FilterJob& job);
}

// True when this CPU can run the avx2 kernels (AVX2, FMA and F16C).
bool cpu_has_avx2();
// True when this CPU can run the avx512 kernels (AVX-512F besides the avx2 requirements).
bool cpu_has_avx512();

// True when this CPU can run the filtered scan (the avx512 kernels' needs plus AVX-512BW/VL and
// AVX512-BF16).
bool cpu_has_avx512bf16();

// How best_match scores the keys. scan: every (query, key) pair with the exact arithmetic.
// filtered: bf16 dot products find the keys that may win, and only those are scored exactly (float32
// accumulation, avx512 ISA and cpu_has_avx512bf16() only); the result is bit for bit the scan's.
enum class MatchPath { scan, filtered };

// For each query row i of `queries` (n, dim) in Acc: the key with the highest cosine similarity in
// `keys` (m, dim) and that cosine, accumulated in Acc. Ties go to the lowest key index. Rows of
// `queries` holding NaN or Inf get best_score NaN and best_index -1; a query whose cosine is NaN
// for every key (NaN keys) gets -inf and -1. Uses up to num_threads OpenMP threads; the result
// does not depend on the number of threads.
template <typename Acc>
void best_match(const Acc* queries, int64_t n, int64_t dim, const void* keys, KeyDtype key_dtype,
                int64_t m, int num_threads, Isa isa, MatchPath path, Acc* best_score,
                int64_t* best_index);

}  // namespace cpu
}  // namespace neuraldb
