// The int8 dot-product micro-kernel of key_index_cpu.h, written once and compiled per instruction
// set: the including translation unit defines NEURALDB_INT8_ISA (the namespace) and, inside the
// matching `#pragma GCC target`, NEURALDB_INT8_AVX512_VNNI or NEURALDB_INT8_AVX2. Like
// gated_retrieve_cpu_scan.h it instantiates nothing from the standard library (see there why).
//
// Each (query, key) pair accumulates in exact int32 (|sum| <= 127 * 255 * dim < 2^31 for
// dim < 66,000), so the order of the additions does not matter.

#ifndef NEURALDB_INT8_ISA
#error "define NEURALDB_INT8_ISA (the namespace of this instruction set) before including"
#endif

namespace neuraldb {
namespace cpu {
namespace NEURALDB_INT8_ISA {
namespace {

#define NEURALDB_INLINE inline __attribute__((always_inline))

// QB queries x KB keys: one pass over the KB key rows, each 64-byte key vector used by all QB queries.
template <int QB, int KB>
NEURALDB_INLINE void dot_block(const int8_t* q, const int32_t* query_sum, const int8_t* k,
                               int64_t dim, int32_t* dots, int64_t stride, const int8_t* next) {
#if defined(NEURALDB_INT8_AVX512_VNNI)
  __m512i acc[QB][KB];
  for (int a = 0; a < QB; ++a)
    for (int b = 0; b < KB; ++b) acc[a][b] = _mm512_setzero_si512();
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = 0; j < dim; j += 64) {
    if (next != nullptr) {
      for (int b = 0; b < KB; ++b) __builtin_prefetch(next + b * dim + j);
    }
    __m512i kv[KB];
    for (int b = 0; b < KB; ++b)  // k + 128 as unsigned bytes
      kv[b] = _mm512_xor_si512(_mm512_loadu_si512(k + b * dim + j), offset);
    for (int a = 0; a < QB; ++a) {
      const __m512i qv = _mm512_loadu_si512(q + a * dim + j);
      for (int b = 0; b < KB; ++b) acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], kv[b], qv);
    }
  }
  for (int a = 0; a < QB; ++a)
    for (int b = 0; b < KB; ++b)
      dots[a * stride + b] = _mm512_reduce_add_epi32(acc[a][b]) - 128 * query_sum[a];
#elif defined(NEURALDB_INT8_AVX2)
  __m256i acc[QB][KB];
  for (int a = 0; a < QB; ++a)
    for (int b = 0; b < KB; ++b) acc[a][b] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t j = 0; j < dim; j += 32) {
    if (next != nullptr && j % 64 == 0) {
      for (int b = 0; b < KB; ++b) __builtin_prefetch(next + b * dim + j);
    }
    __m256i kv[KB];
    for (int b = 0; b < KB; ++b) kv[b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + b * dim + j));
    for (int a = 0; a < QB; ++a) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + a * dim + j));
      const __m256i q_abs = _mm256_sign_epi8(qv, qv);
      for (int b = 0; b < KB; ++b) {
        // |q| * (k * sign(q)): pairs sum to at most 2 * 127 * 127, no int16 saturation
        const __m256i pairs = _mm256_maddubs_epi16(q_abs, _mm256_sign_epi8(kv[b], qv));
        acc[a][b] = _mm256_add_epi32(acc[a][b], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int a = 0; a < QB; ++a) {
    for (int b = 0; b < KB; ++b) {
      const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc[a][b]), _mm256_extracti128_si256(acc[a][b], 1));
      const __m128i quad = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4e));
      dots[a * stride + b] = _mm_cvtsi128_si32(_mm_add_epi32(quad, _mm_shuffle_epi32(quad, 0xb1)));
    }
  }
#else
  (void)query_sum;
  (void)next;
  for (int a = 0; a < QB; ++a) {
    for (int b = 0; b < KB; ++b) {
      int32_t sum = 0;
      for (int64_t j = 0; j < dim; ++j) sum += int32_t(q[a * dim + j]) * int32_t(k[b * dim + j]);
      dots[a * stride + b] = sum;
    }
  }
#endif
}

template <int QB>
NEURALDB_INLINE void dots_for_queries(const int8_t* q, const int32_t* query_sum, const int8_t* keys,
                                      int64_t num_keys, int64_t dim, int32_t* dots, int64_t stride,
                                      const int8_t* next) {
  constexpr int KB = QB == 1 ? 4 : 2;
  int64_t b = 0;
  for (; b + KB <= num_keys; b += KB) {
    const int8_t* ahead = b + 2 * KB <= num_keys ? keys + (b + KB) * dim : (b + KB == num_keys ? next : nullptr);
    dot_block<QB, KB>(q, query_sum, keys + b * dim, dim, dots + b, stride, ahead);
  }
  for (; b < num_keys; ++b) dot_block<QB, 1>(q, query_sum, keys + b * dim, dim, dots + b, stride, nullptr);
}

}  // namespace

void int8_dots(const int8_t* q, const int32_t* query_sum, int num_queries, const int8_t* keys,
               int64_t num_keys, int64_t dim, int32_t* dots, int64_t dots_stride, const int8_t* next) {
  switch (num_queries) {
    case 1: dots_for_queries<1>(q, query_sum, keys, num_keys, dim, dots, dots_stride, next); break;
    case 2: dots_for_queries<2>(q, query_sum, keys, num_keys, dim, dots, dots_stride, next); break;
    case 3: dots_for_queries<3>(q, query_sum, keys, num_keys, dim, dots, dots_stride, next); break;
    default: dots_for_queries<4>(q, query_sum, keys, num_keys, dim, dots, dots_stride, next); break;
  }
}

#undef NEURALDB_INLINE

}  // namespace NEURALDB_INT8_ISA
}  // namespace cpu
}  // namespace neuraldb
