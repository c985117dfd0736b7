// Certified candidate pass of the compressed key index (neuraldb_kernels/ops/key_index.py) over
// int8 key codes, free of torch types.
//
// Layering, as for the full-precision scan:
//   key_index_cpu_dots.h         the integer dot-product micro-kernel, compiled per instruction set:
//   key_index_cpu_avx512.cpp     ... AVX-512 VNNI (vpdpbusd: u8 x s8 -> s32, keys offset by +128),
//   key_index_cpu_avx2.cpp       ... AVX2 (vpmaddubsw on |q| and sign(k, q), then vpmaddwd),
//   key_index_cpu_generic.cpp    ... the compiler's baseline flags;
//   key_index_cpu.cpp            bounds, candidate collection, OpenMP work split, run-time ISA choice;
//   key_index_cpu_encode.cpp     the int8 codes of normalised rows and their error / norm bounds;
//   key_index_bindings.cpp       the torch entry point (registered by bindings.cpp).
#pragma once

#include <cstdint>
#include <vector>

namespace neuraldb {
namespace cpu {

// Instruction set of the int8 dot products.
enum class Int8Isa { generic, avx2, avx512_vnni };

// dots[a * dots_stride + b] = sum_j q[a][j] * keys[b][j] (exact int32) for num_queries (1..4)
// query rows and num_keys key rows, both int8 of length dim (a multiple of 64; codes are in
// [-127, 127]). query_sum[a] = sum_j q[a][j] (the VNNI kernel corrects its +128 key offset with it).
// `next`, if not null, is prefetched: the key rows of the next call.
#define NEURALDB_DECLARE_INT8_DOTS(ns)                                                            \
  namespace ns {                                                                                  \
  void int8_dots(const int8_t* q, const int32_t* query_sum, int num_queries, const int8_t* keys, \
                 int64_t num_keys, int64_t dim, int32_t* dots, int64_t dots_stride,               \
                 const int8_t* next);                                                             \
  }
NEURALDB_DECLARE_INT8_DOTS(int8_generic)
NEURALDB_DECLARE_INT8_DOTS(int8_avx2)
NEURALDB_DECLARE_INT8_DOTS(int8_avx512_vnni)
#undef NEURALDB_DECLARE_INT8_DOTS

// True when this CPU has AVX-512F, AVX-512BW and AVX-512 VNNI.
bool cpu_has_avx512_vnni();
// True when this CPU has AVX2 (false on non-x86 machines).
bool cpu_has_int8_avx2();

// Inputs of one candidate pass: n queries against m keys, as key_index.py defines them.
struct Int8CandidateInputs {
  const int8_t* query_codes;  // (n, dim)
  const float* query_scale;   // (n,) t, NaN for a NaN/Inf query
  const float* query_error;   // (n,) >= |q_hat - q~|
  int64_t n;
  const int8_t* key_codes;    // (m, dim)
  const float* key_scale;     // (m,) s, NaN for a NaN/Inf key
  const float* key_error;     // (m,) >= |k_hat - k~|
  const float* key_norm;      // (m,) >= |k~|
  int64_t m;
  int64_t dim;                // a multiple of 64
  float slack;                // delta(d1)
  int64_t budget;             // most candidates per query
};

// Per query, every key whose upper bound reaches the best lower bound, ascending, unless there are
// more than `budget` (then overflowed[j] = 1 and no keys). keys_out receives the keys of query 0,
// then query 1, ...; offsets (n + 1). The result does not depend on num_threads.
void int8_candidates(const Int8CandidateInputs& in, int num_threads, Int8Isa isa,
                     std::vector<int64_t>& keys_out, int64_t* offsets, uint8_t* overflowed);

// Added to the error and norm bounds of an encoded row before rounding them up to float32: covers
// the double-precision rounding of the encoder for rows of fewer than kEncodeMaxFeatures features
// (key_index.py, "Encoding on the CPU").
constexpr double kEncodePad = 0x1p-30;
constexpr int64_t kEncodeMaxFeatures = int64_t{1} << 20;

// int8 codes of the normalised rows of x (rows, d1) row-major, float32 or float64: codes (rows,
// dim) (dim >= d1 a multiple of 64; features >= d1 get code 0), scale s (rows,) (NaN for a row
// with NaN/Inf, 0 for a zero row), error >= |k_hat - s * codes|, norm >= |s * codes| (rows,).
void int8_encode_rows(const float* x, int64_t rows, int64_t d1, int64_t dim, int num_threads,
                      int8_t* codes, float* scale, float* error, float* norm);
void int8_encode_rows(const double* x, int64_t rows, int64_t d1, int64_t dim, int num_threads,
                      int8_t* codes, float* scale, float* error, float* norm);

}  // namespace cpu
}  // namespace neuraldb
