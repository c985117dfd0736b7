// Compute kernels of the "cpu" gated_retrieve backend, written once and compiled per instruction
// set: the including translation unit defines NEURALDB_CPU_ISA (the namespace: avx512, avx2 or
// generic) and, inside the matching `#pragma GCC target`, NEURALDB_CPU_ISA_AVX2 for the AVX2 build
// and both NEURALDB_CPU_ISA_AVX2 and NEURALDB_CPU_ISA_AVX512 for the AVX-512 build (which uses
// every AVX2/FMA/F16C path and widens the vectors).
//
// This file must not instantiate anything from the standard library: template instantiations are
// shared between translation units by the linker, and one compiled with AVX2 enabled could end up
// being called by the generic path on a CPU without AVX2. Everything here lives in the per-ISA
// namespace and uses compiler builtins only.
//
// Vectors are GCC/Clang vector extensions of NEURALDB_VEC_BYTES: 16 float / 8 double lanes (one
// zmm register) in the AVX-512 build, 8 float / 4 double lanes (one ymm register) otherwise; the
// generic build's compiler splits those into SSE halves.
//
// Arithmetic order (what makes duplicated keys tie exactly and results thread-independent): every
// (query, key) dot product and every |key|^2 is accumulated in ONE vector accumulator walking the
// row front to back, then summed across lanes in a fixed tree, then the scalar tail is added in
// order. The cosine is (dot * inv_norm(q)) * inv_norm(k) with inv_norm(x) = 1/sqrt(|x|^2), or 0
// when |x|^2 is not > 0. None of this depends on how many queries/keys a micro-kernel handles.

#ifndef NEURALDB_CPU_ISA
#error "define NEURALDB_CPU_ISA (the namespace of this instruction set) before including"
#endif

// Vector arguments below only cross always-inline internal functions: no ABI is involved.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace neuraldb {
namespace cpu {
namespace NEURALDB_CPU_ISA {
namespace {

#define NEURALDB_INLINE inline __attribute__((always_inline))

// Storage of 16-bit keys: raw bits, converted to float in registers.
struct BFloat16 { uint16_t bits; };
struct Float16 { uint16_t bits; };

#ifdef NEURALDB_CPU_ISA_AVX512
#define NEURALDB_VEC_BYTES 64
#else
#define NEURALDB_VEC_BYTES 32
#endif
// Accumulators (FloatVec, DoubleVec) and the key-loading vectors with the same lane counts.
typedef float FloatVec __attribute__((vector_size(NEURALDB_VEC_BYTES)));
typedef double DoubleVec __attribute__((vector_size(NEURALDB_VEC_BYTES)));
typedef float FloatHalfVec __attribute__((vector_size(NEURALDB_VEC_BYTES / 2)));  // DoubleVec's lanes
typedef uint32_t U32Vec __attribute__((vector_size(NEURALDB_VEC_BYTES)));
typedef uint32_t U32HalfVec __attribute__((vector_size(NEURALDB_VEC_BYTES / 2)));
typedef uint16_t U16Vec __attribute__((vector_size(NEURALDB_VEC_BYTES / 2)));
typedef uint16_t U16HalfVec __attribute__((vector_size(NEURALDB_VEC_BYTES / 4)));
#undef NEURALDB_VEC_BYTES

// Accumulator vector of an accumulation type.
template <typename Acc> struct Lanes;
template <> struct Lanes<float> {
  typedef FloatVec Vec;
  static constexpr int64_t count = sizeof(FloatVec) / sizeof(float);
};
template <> struct Lanes<double> {
  typedef DoubleVec Vec;
  static constexpr int64_t count = sizeof(DoubleVec) / sizeof(double);
};

// Unaligned load of a whole vector starting at p.
template <typename V, typename T>
NEURALDB_INLINE V load(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}

// a * b + c, fused (one rounding) where the instruction set has FMA.
NEURALDB_INLINE FloatVec fmadd(FloatVec a, FloatVec b, FloatVec c) {
#if defined(NEURALDB_CPU_ISA_AVX512)
  return (FloatVec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(NEURALDB_CPU_ISA_AVX2)
  return (FloatVec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}
NEURALDB_INLINE DoubleVec fmadd(DoubleVec a, DoubleVec b, DoubleVec c) {
#if defined(NEURALDB_CPU_ISA_AVX512)
  return (DoubleVec)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#elif defined(NEURALDB_CPU_ISA_AVX2)
  return (DoubleVec)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c);
#else
  return a * b + c;
#endif
}
NEURALDB_INLINE float fmadd(float a, float b, float c) {
#ifdef NEURALDB_CPU_ISA_AVX2
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
NEURALDB_INLINE double fmadd(double a, double b, double c) {
#ifdef NEURALDB_CPU_ISA_AVX2
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Sum of the lanes in a fixed order: the upper half is added onto the lower half until one is left.
template <typename Acc, typename V>
NEURALDB_INLINE Acc lane_sum(V v) {
  constexpr int kCount = sizeof(V) / sizeof(Acc);
  Acc lanes[kCount];
  __builtin_memcpy(lanes, &v, sizeof(V));
  for (int width = kCount / 2; width >= 1; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] = lanes[i] + lanes[i + width];
  }
  return lanes[0];
}

// IEEE half bits (in 32-bit lanes) -> float bits, exact for zeros, subnormals, Inf and NaN.
template <typename U, typename F>
NEURALDB_INLINE U half_to_float_bits(U h) {
  const U sign = (h & 0x8000u) << 16;
  const U exponent = (h >> 10) & 0x1fu;
  const U mantissa = h & 0x3ffu;
  const U normal = ((exponent + 112u) << 23) | (mantissa << 13);  // rebias 15 -> 127
  const U special = 0x7f800000u | (mantissa << 13);               // Inf / NaN
  // Zero and subnormal: mantissa * 2^-24, exact in float.
  F tiny_value = __builtin_convertvector(mantissa, F) * (1.0f / 16777216.0f);
  U tiny;
  __builtin_memcpy(&tiny, &tiny_value, sizeof(U));
  return sign | (exponent == 0u ? tiny : (exponent == 31u ? special : normal));
}

NEURALDB_INLINE float scalar_half_to_float(uint16_t h) {
#ifdef NEURALDB_CPU_ISA_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    const float tiny = (float)mantissa * (1.0f / 16777216.0f);
    __builtin_memcpy(&bits, &tiny, sizeof(bits));
  } else if (exponent == 31) {
    bits = 0x7f800000u | (mantissa << 13);
  } else {
    bits = ((exponent + 112u) << 23) | (mantissa << 13);
  }
  bits |= sign;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// One accumulator-width of key elements starting at p, converted to the accumulation type in
// registers (bf16: the 16 bits become the top half of a float; fp16: F16C or exact bit math).
template <typename Acc, typename Key> struct KeyLoad;

template <> struct KeyLoad<float, float> {
  static NEURALDB_INLINE FloatVec vec(const float* p) { return load<FloatVec>(p); }
  static NEURALDB_INLINE float one(float x) { return x; }
};
template <> struct KeyLoad<double, double> {
  static NEURALDB_INLINE DoubleVec vec(const double* p) { return load<DoubleVec>(p); }
  static NEURALDB_INLINE double one(double x) { return x; }
};
template <> struct KeyLoad<double, float> {
  static NEURALDB_INLINE DoubleVec vec(const float* p) {
    return __builtin_convertvector(load<FloatHalfVec>(p), DoubleVec);
  }
  static NEURALDB_INLINE double one(float x) { return x; }
};
template <> struct KeyLoad<float, BFloat16> {
  static NEURALDB_INLINE FloatVec vec(const BFloat16* p) {
#if defined(NEURALDB_CPU_ISA_AVX512)
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return (FloatVec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
#elif defined(NEURALDB_CPU_ISA_AVX2)  // one vpmovzxwd ymm + one shift (GCC splits the generic form)
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return (FloatVec)_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16);
#else
    return (FloatVec)(__builtin_convertvector(load<U16Vec>(p), U32Vec) << 16);
#endif
  }
  static NEURALDB_INLINE float one(BFloat16 x) {
    const uint32_t bits = (uint32_t)x.bits << 16;
    float f;
    __builtin_memcpy(&f, &bits, sizeof(f));
    return f;
  }
};
template <> struct KeyLoad<double, BFloat16> {
  static NEURALDB_INLINE DoubleVec vec(const BFloat16* p) {
#if defined(NEURALDB_CPU_ISA_AVX512)
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const FloatHalfVec f = (FloatHalfVec)_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16);
#elif defined(NEURALDB_CPU_ISA_AVX2)
    const __m128i bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    const FloatHalfVec f = (FloatHalfVec)_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16);
#else
    const FloatHalfVec f = (FloatHalfVec)(__builtin_convertvector(load<U16HalfVec>(p), U32HalfVec) << 16);
#endif
    return __builtin_convertvector(f, DoubleVec);
  }
  static NEURALDB_INLINE double one(BFloat16 x) { return KeyLoad<float, BFloat16>::one(x); }
};
template <> struct KeyLoad<float, Float16> {
  static NEURALDB_INLINE FloatVec vec(const Float16* p) {
#if defined(NEURALDB_CPU_ISA_AVX512)
    return (FloatVec)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(NEURALDB_CPU_ISA_AVX2)
    return (FloatVec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    return (FloatVec)half_to_float_bits<U32Vec, FloatVec>(__builtin_convertvector(load<U16Vec>(p), U32Vec));
#endif
  }
  static NEURALDB_INLINE float one(Float16 x) { return scalar_half_to_float(x.bits); }
};
template <> struct KeyLoad<double, Float16> {
  static NEURALDB_INLINE DoubleVec vec(const Float16* p) {
#if defined(NEURALDB_CPU_ISA_AVX512)
    const FloatHalfVec f = (FloatHalfVec)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(NEURALDB_CPU_ISA_AVX2)
    const FloatHalfVec f = (FloatHalfVec)_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
    const FloatHalfVec f = (FloatHalfVec)half_to_float_bits<U32HalfVec, FloatHalfVec>(
        __builtin_convertvector(load<U16HalfVec>(p), U32HalfVec));
#endif
    return __builtin_convertvector(f, DoubleVec);
  }
  static NEURALDB_INLINE double one(Float16 x) { return scalar_half_to_float(x.bits); }
};

template <typename Acc>
NEURALDB_INLINE Acc inv_norm(Acc squared_norm) {
  // 1/sqrt evaluated in double and rounded once to Acc.
  return squared_norm > Acc(0) ? Acc(1.0 / __builtin_sqrt((double)squared_norm)) : Acc(0);
}

// Micro-kernel: dots[a][b] = <q_a, k_b> for QB consecutive query rows and KB consecutive key rows
// (both of length dim), plus, if kWithNorm, squared[b] = |k_b|^2 in the same pass over the keys.
// Each key vector is loaded and converted once and used by all QB queries. If `next` is not null,
// the KB rows starting there (the keys of the next call) are prefetched into cache meanwhile: the
// hardware prefetcher alone does not run far enough ahead to overlap the memory reads with the
// dot products (measurement: bench/RESULTS.md, "Software prefetch in the key-streaming pass").
template <int QB, int KB, bool kWithNorm, typename Acc, typename Key>
NEURALDB_INLINE void dot_block(const Acc* q, const Key* k, int64_t dim, Acc (&dots)[QB][KB],
                               Acc (&squared)[KB], const Key* next = nullptr) {
  typedef typename Lanes<Acc>::Vec Vec;
  constexpr int64_t kLanes = Lanes<Acc>::count;
  Vec acc[QB][KB];
  Vec sq[KB];
  for (int b = 0; b < KB; ++b) {
    sq[b] = Vec{};
    for (int a = 0; a < QB; ++a) acc[a][b] = Vec{};
  }
  int64_t j = 0;
  for (; j + kLanes <= dim; j += kLanes) {
    if (next != nullptr) {
      for (int b = 0; b < KB; ++b) __builtin_prefetch(next + b * dim + j);
    }
    Vec kv[KB];
    for (int b = 0; b < KB; ++b) {
      kv[b] = KeyLoad<Acc, Key>::vec(k + b * dim + j);
      if (kWithNorm) sq[b] = fmadd(kv[b], kv[b], sq[b]);
    }
    for (int a = 0; a < QB; ++a) {
      const Vec qv = load<Vec>(q + a * dim + j);
      for (int b = 0; b < KB; ++b) acc[a][b] = fmadd(qv, kv[b], acc[a][b]);
    }
  }
  for (int b = 0; b < KB; ++b) {
    if (kWithNorm) squared[b] = lane_sum<Acc>(sq[b]);
    for (int a = 0; a < QB; ++a) dots[a][b] = lane_sum<Acc>(acc[a][b]);
  }
  for (; j < dim; ++j) {
    for (int b = 0; b < KB; ++b) {
      const Acc kx = KeyLoad<Acc, Key>::one(k[b * dim + j]);
      if (kWithNorm) squared[b] = fmadd(kx, kx, squared[b]);
      for (int a = 0; a < QB; ++a) dots[a][b] = fmadd(q[a * dim + j], kx, dots[a][b]);
    }
  }
}

// QB queries against keys [t0, t1) of one cache tile, KB keys per micro-kernel call. With
// kWithNorm the key norms are computed (this is the pass that pulls the tile into cache, prefetching
// the next KB keys below key_end) and stored in inv_k[i - t0]; without, they are read from there.
template <int QB, int KB, bool kWithNorm, typename Acc, typename Key>
NEURALDB_INLINE void scan_keys(const Acc* q, const Acc* inv_q, const Key* keys, int64_t t0,
                               int64_t t1, int64_t key_end, int64_t dim, Acc* inv_k,
                               Acc* best_score, int64_t* best_index, int64_t& i) {
  for (; i + KB <= t1; i += KB) {
    Acc dots[QB][KB];
    Acc squared[KB];
    const Key* next = kWithNorm && i + 2 * KB <= key_end ? keys + (i + KB) * dim : nullptr;
    dot_block<QB, KB, kWithNorm>(q, keys + i * dim, dim, dots, squared, next);
    for (int b = 0; b < KB; ++b) {
      if (kWithNorm) inv_k[i - t0 + b] = inv_norm(squared[b]);
      const Acc ik = inv_k[i - t0 + b];
      for (int a = 0; a < QB; ++a) {
        const Acc score = (dots[a][b] * inv_q[a]) * ik;
        if (score > best_score[a]) {  // keys visited in increasing order: lowest index wins ties
          best_score[a] = score;
          best_index[a] = i + b;
        }
      }
    }
  }
}

template <int QB, bool kWithNorm, typename Acc, typename Key>
void scan_tile(const Acc* q, const Acc* inv_q, const Key* keys, int64_t t0, int64_t t1,
               int64_t key_end, int64_t dim, Acc* inv_k, Acc* best_score, int64_t* best_index) {
  // One query streams KB = 4 keys at a time (8 independent FMA chains); several queries use 2 keys
  // (2*QB dot chains + 2 norm chains, within the 16 vector registers of AVX2).
  constexpr int KB = QB == 1 ? 4 : 2;
  int64_t i = t0;
  scan_keys<QB, KB, kWithNorm>(q, inv_q, keys, t0, t1, key_end, dim, inv_k, best_score,
                               best_index, i);
  scan_keys<QB, 1, kWithNorm>(q, inv_q, keys, t0, t1, key_end, dim, inv_k, best_score, best_index,
                              i);
}

template <bool kWithNorm, typename Acc, typename Key>
void scan_tile_queries(int64_t num_queries, const Acc* q, const Acc* inv_q, const Key* keys,
                       int64_t t0, int64_t t1, int64_t key_end, int64_t dim, Acc* inv_k,
                       Acc* best_score, int64_t* best_index) {
#define NEURALDB_SCAN_TILE(QB) \
  scan_tile<QB, kWithNorm>(q, inv_q, keys, t0, t1, key_end, dim, inv_k, best_score, best_index)
  switch (num_queries) {
    case 1: NEURALDB_SCAN_TILE(1); break;
    case 2: NEURALDB_SCAN_TILE(2); break;
    case 3: NEURALDB_SCAN_TILE(3); break;
    default: NEURALDB_SCAN_TILE(4); break;
  }
#undef NEURALDB_SCAN_TILE
}

// Keys in tiles of job.key_tile rows: the first group of (up to 4) queries reads the tile from
// memory and computes its norms, the other groups reuse it from cache.
template <typename Acc, typename Key>
void scan_job(const ScanJob<Acc>& job) {
  const Key* keys = static_cast<const Key*>(job.keys);
  const int64_t dim = job.dim;
  for (int64_t t0 = job.key_begin; t0 < job.key_end; t0 += job.key_tile) {
    const int64_t t1 = t0 + job.key_tile < job.key_end ? t0 + job.key_tile : job.key_end;
    for (int64_t a = 0; a < job.num_queries; a += 4) {
      const int64_t group = job.num_queries - a < 4 ? job.num_queries - a : 4;
      const Acc* q = job.queries + a * dim;
      if (a == 0) {
        scan_tile_queries<true>(group, q, job.query_inv_norm + a, keys, t0, t1, job.key_end, dim,
                                job.key_inv_norm_scratch, job.best_score + a, job.best_index + a);
      } else {
        scan_tile_queries<false>(group, q, job.query_inv_norm + a, keys, t0, t1, job.key_end, dim,
                                 job.key_inv_norm_scratch, job.best_score + a, job.best_index + a);
      }
    }
  }
}

template <typename Acc>
void row_inv_norms_impl(const Acc* rows, int64_t n, int64_t dim, Acc* inv, uint8_t* finite) {
  for (int64_t r = 0; r < n; ++r) {
    const Acc* row = rows + r * dim;
    bool ok = true;
    for (int64_t j = 0; j < dim; ++j) ok &= __builtin_isfinite(row[j]) != 0;
    Acc dots[1][1];
    Acc squared[1];
    dot_block<1, 1, true>(row, row, dim, dots, squared);
    inv[r] = inv_norm(squared[0]);
    finite[r] = ok ? 1 : 0;
  }
}

}  // namespace

#ifndef NEURALDB_CPU_SCAN_HELPERS_ONLY  // a translation unit that reuses the helpers only
void scan(const ScanJob<float>& job) {
  switch (job.key_dtype) {
    case KeyDtype::float32: scan_job<float, float>(job); break;
    case KeyDtype::bfloat16: scan_job<float, BFloat16>(job); break;
    case KeyDtype::float16: scan_job<float, Float16>(job); break;
    case KeyDtype::float64: __builtin_trap();  // float64 keys always accumulate in double
  }
}

void scan(const ScanJob<double>& job) {
  switch (job.key_dtype) {
    case KeyDtype::float64: scan_job<double, double>(job); break;
    case KeyDtype::float32: scan_job<double, float>(job); break;
    case KeyDtype::bfloat16: scan_job<double, BFloat16>(job); break;
    case KeyDtype::float16: scan_job<double, Float16>(job); break;
  }
}

void row_inv_norms(const float* rows, int64_t n, int64_t dim, float* inv, uint8_t* finite) {
  row_inv_norms_impl(rows, n, dim, inv, finite);
}

void row_inv_norms(const double* rows, int64_t n, int64_t dim, double* inv, uint8_t* finite) {
  row_inv_norms_impl(rows, n, dim, inv, finite);
}
#endif

#undef NEURALDB_INLINE

}  // namespace NEURALDB_CPU_ISA
}  // namespace cpu
}  // namespace neuraldb

#pragma GCC diagnostic pop
