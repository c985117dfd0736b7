// The filtered scan of the "cpu" gated_retrieve backend (prefill: many queries per call), for
// AVX-512 BF16 CPUs. Included by gated_retrieve_cpu_avx512bf16.cpp after gated_retrieve_cpu_scan.h
// (namespace avx512bf16, 16-float vectors), whose exact arithmetic it reuses.
//
// Two stages per key tile, both while the tile is in cache:
// 1. Filter: approximate cosines a = <q_b, k_b> / |k_b| with `vdpbf16ps` (32 bf16 products per
//    instruction, float32 sums), where q_b is q/|q| rounded to bf16 and k_b the key rounded to bf16
//    (bf16 keys are used as stored). |S - a| <= eps for the score S the exact scan computes
//    (filter_eps in gated_retrieve_cpu.cpp derives eps). Per query the running lower bound
//    L = max (a - eps) over the keys seen so far is kept; any key's a - eps bounds the best score
//    from below, so the threads share L (exchanged after every tile) and each skips more keys. Which
//    keys get rescored then depends on timing; the result does not.
// 2. Exact rescoring: a key with a + eps >= L is scored with the scan's own arithmetic (one vector
//    accumulator per dot product and per |k|^2, the fixed lane tree of gated_retrieve_cpu_scan.h)
//    and competes for the best with a strict '>' in increasing key order. A key with a + eps < L
//    scores below the key that set L, so it is neither the best nor tied with it: the result is
//    bit for bit the exact scan's (same ISA width), ties to the lowest index included.
// Keys whose |k_b|^2 is not in [2^-60, 2^60] (zero, tiny, huge, NaN/Inf) and queries flagged
// exact_only are always rescored, so the bound never has to cover underflow or overflow.
//
// Like gated_retrieve_cpu_scan.h, this file instantiates nothing from the standard library.

#ifndef NEURALDB_CPU_ISA
#error "include gated_retrieve_cpu_scan.h with NEURALDB_CPU_ISA defined first"
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace neuraldb {
namespace cpu {
namespace NEURALDB_CPU_ISA {
namespace {

#define NEURALDB_FILTER_INLINE inline __attribute__((always_inline))

constexpr int64_t kFilterKeyBlock = 4;  // keys per micro-kernel call (4 x 4 accumulators)

NEURALDB_FILTER_INLINE __m512bh as_bf16_vector(__m512i bits) { return (__m512bh)bits; }

// bf16 bits of x, rounded to nearest even (NaN stays NaN).
NEURALDB_FILTER_INLINE uint16_t to_bf16_bits(float x) {
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// One key row (dim elements of Key) as bf16 bits in dst (padded_dim, zero padded).
template <typename Key>
NEURALDB_FILTER_INLINE void stage_row(const Key* src, int64_t dim, int64_t padded_dim, uint16_t* dst) {
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    const FloatVec v = KeyLoad<float, Key>::vec(src + j);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), (__m256i)_mm512_cvtneps_pbh((__m512)v));
  }
  for (; j < dim; ++j) dst[j] = to_bf16_bits(KeyLoad<float, Key>::one(src[j]));
  for (; j < padded_dim; ++j) dst[j] = 0;
}

// The 16 lane sums of v[0..15] as one vector: lane i = sum of v[i]'s lanes (any order will do for
// the filter). 45 shuffles and adds instead of 16 separate reductions.
NEURALDB_FILTER_INLINE __m512 lane_sums16(const __m512 (&v)[16]) {
  __m512 pairs[8], quads[4];
  for (int i = 0; i < 8; ++i)  // 32-bit interleave: lanes of v[2i] and v[2i+1] alternate
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // 64-bit interleave: each 128-bit block holds v[4i..4i+3]'s partials
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 low = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xdd));
  const __m512 high = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x88), _mm512_shuffle_f32x4(low, high, 0xdd));
}

// dots[a][b] ~ <q_a, k_b> over padded_dim bf16 elements (a multiple of 32), float32 sums.
template <int QB, int KB>
NEURALDB_FILTER_INLINE void approx_dots(const uint16_t* q, int64_t q_stride, const uint16_t* k,
                                        int64_t k_stride, int64_t padded_dim, float (&dots)[QB][KB]) {
  __m512 acc[QB * KB];
  for (int c = 0; c < QB * KB; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < padded_dim; j += 32) {
    __m512bh kv[KB];
    for (int b = 0; b < KB; ++b)
      kv[b] = as_bf16_vector(_mm512_loadu_si512(k + b * k_stride + j));
    for (int a = 0; a < QB; ++a) {
      const __m512bh qv = as_bf16_vector(_mm512_loadu_si512(q + a * q_stride + j));
      for (int b = 0; b < KB; ++b) acc[a * KB + b] = _mm512_dpbf16_ps(acc[a * KB + b], qv, kv[b]);
    }
  }
  if constexpr (QB * KB == 16) {
    _mm512_storeu_ps(&dots[0][0], lane_sums16(acc));
  } else {
    for (int a = 0; a < QB; ++a)
      for (int b = 0; b < KB; ++b) dots[a][b] = _mm512_reduce_add_ps(acc[a * KB + b]);
  }
}

// 1/|k_b| of each staged row, or -1 (always rescore) where |k_b|^2 is outside [2^-60, 2^60]. Eight
// rows at a time: eight independent accumulation chains.
NEURALDB_FILTER_INLINE void staged_inv_norms(const uint16_t* rows, int64_t count, int64_t stride,
                                             int64_t padded_dim, float* inv) {
  constexpr int kRows = 8;
  for (int64_t i0 = 0; i0 < count; i0 += kRows) {
    const int rows_here = count - i0 < kRows ? static_cast<int>(count - i0) : kRows;
    __m512 acc[kRows];
    for (int b = 0; b < kRows; ++b) acc[b] = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded_dim; j += 32) {
      for (int b = 0; b < rows_here; ++b) {
        const __m512bh kv = as_bf16_vector(_mm512_loadu_si512(rows + (i0 + b) * stride + j));
        acc[b] = _mm512_dpbf16_ps(acc[b], kv, kv);
      }
    }
    for (int b = 0; b < rows_here; ++b) {
      const float squared = _mm512_reduce_add_ps(acc[b]);
      inv[i0 + b] = (squared >= 0x1p-60f && squared <= 0x1p60f) ? static_cast<float>(1.0 / __builtin_sqrt((double)squared)) : -1.0f;
    }
  }
}

// Exact rescoring of P (query, key) pairs at once: each pair's dot product and |k|^2 with the scan's
// arithmetic (dot_block of gated_retrieve_cpu_scan.h: one vector accumulator walking the row, the
// fixed lane tree, then the scalar tail in order), P independent chains instead of one. Then the
// scan's strict '>' in the given pair order: callers list each query's keys in increasing order,
// so the lowest index wins ties.
template <int P, typename Key>
NEURALDB_FILTER_INLINE void rescore_pairs(const FilterJob& job, const int64_t* query, const int64_t* key) {
  const Key* keys = static_cast<const Key*>(job.keys);
  const int64_t dim = job.dim;
  FloatVec acc[P], sq[P];
  for (int p = 0; p < P; ++p) acc[p] = sq[p] = FloatVec{};
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    for (int p = 0; p < P; ++p) {
      const FloatVec kv = KeyLoad<float, Key>::vec(keys + key[p] * dim + j);
      sq[p] = fmadd(kv, kv, sq[p]);
      acc[p] = fmadd(load<FloatVec>(job.queries + query[p] * dim + j), kv, acc[p]);
    }
  }
  float dot[P], squared[P];
  for (int p = 0; p < P; ++p) {
    squared[p] = lane_sum<float>(sq[p]);
    dot[p] = lane_sum<float>(acc[p]);
  }
  for (; j < dim; ++j) {
    for (int p = 0; p < P; ++p) {
      const float kx = KeyLoad<float, Key>::one(keys[key[p] * dim + j]);
      squared[p] = fmadd(kx, kx, squared[p]);
      dot[p] = fmadd(job.queries[query[p] * dim + j], kx, dot[p]);
    }
  }
  for (int p = 0; p < P; ++p) {
    const float score = (dot[p] * job.query_inv_norm[query[p]]) * inv_norm(squared[p]);
    if (score > job.best_score[query[p]]) {
      job.best_score[query[p]] = score;
      job.best_index[query[p]] = key[p];
    }
  }
}

template <typename Key>
NEURALDB_FILTER_INLINE void rescore(const FilterJob& job, int64_t r, int64_t i) {
  rescore_pairs<1, Key>(job, &r, &i);
}

// The filter's verdicts on keys [i, i + KB) for queries [a0, a0 + QB), key by key, and the exact
// rescoring of the keys that pass (the edges of a tile and of the query list).
template <int QB, int KB, typename Key>
NEURALDB_FILTER_INLINE void filter_and_rescore(const FilterJob& job, int64_t a0, int64_t i,
                                               const float* inv_k, const float (&dots)[QB][KB]) {
  for (int b = 0; b < KB; ++b) {
    for (int a = 0; a < QB; ++a) {
      const int64_t r = a0 + a;
      if (!job.query_finite[r]) continue;  // its result is NaN / -1 whatever the keys
      if (inv_k[b] >= 0.0f && !job.query_exact_only[r]) {
        const float approx = dots[a][b] * inv_k[b];
        const float lower = approx - job.eps;
        if (lower > job.lower_bound[r]) job.lower_bound[r] = lower;
        if (!(approx + job.eps >= job.lower_bound[r])) continue;
      }
      rescore<Key>(job, r, i + b);
    }
  }
}

// The same for a full block of 4 queries x 4 keys, in vector registers (lane 4 a + b holds query
// a0 + a and key i + b): the lower bounds are raised by the block's best key per query first, then
// every pair is tested at once; most blocks have no pair to rescore.
template <typename Key>
NEURALDB_FILTER_INLINE void filter_and_rescore_4x4(const FilterJob& job, int64_t a0, int64_t i,
                                                   const float* inv_k, __m512 dots,
                                                   __mmask16 always, __mmask16 skip) {
  const __m512 inv = _mm512_broadcast_f32x4(_mm_loadu_ps(inv_k));
  const __mmask16 forced = _mm512_cmp_ps_mask(inv, _mm512_setzero_ps(), _CMP_LT_OQ) | always;
  const __m512 approx = _mm512_mul_ps(dots, inv);
  const __m512 eps = _mm512_set1_ps(job.eps);
  const __m512 lower = _mm512_mask_blend_ps(forced, _mm512_sub_ps(approx, eps), _mm512_set1_ps(-__builtin_inff()));
  __m512 best = _mm512_max_ps(lower, _mm512_permute_ps(lower, 0xb1));  // max within each query's 4 lanes
  best = _mm512_max_ps(best, _mm512_permute_ps(best, 0x4e));
  const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512 bound = _mm512_max_ps(best, _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(job.lower_bound + a0))));
  const __m512i firsts = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  _mm_storeu_ps(job.lower_bound + a0, _mm512_castps512_ps128(_mm512_permutexvar_ps(firsts, bound)));
  unsigned pass = (_mm512_cmp_ps_mask(_mm512_add_ps(approx, eps), bound, _CMP_GE_OQ) | forced) & ~skip & 0xffffu;
  int64_t query[16], key[16];  // lanes in increasing order: per query, keys in increasing order
  int count = 0;
  for (; pass != 0; pass &= pass - 1, ++count) {
    const int lane = __builtin_ctz(pass);
    query[count] = a0 + lane / 4;
    key[count] = i + lane % 4;
  }
  int p = 0;
  for (; p + 4 <= count; p += 4) rescore_pairs<4, Key>(job, query + p, key + p);
  for (; p < count; ++p) rescore<Key>(job, query[p], key[p]);
}

// Queries [a0, a0 + QB) against the tile's keys [t0, t1); meanwhile the cache lines
// [prefetch_begin, prefetch_end) of `prefetch` are pulled into L2, a few per micro-kernel call.
template <int QB, typename Key>
void filter_tile(const FilterJob& job, int64_t a0, const uint16_t* tile, int64_t stride, int64_t t0,
                 int64_t t1, const float* inv_k, const char* prefetch, int64_t prefetch_begin,
                 int64_t prefetch_end) {
  const uint16_t* q = job.query_bf16 + a0 * job.padded_dim;
  __mmask16 always = 0, skip = 0;  // lanes of 4x4 blocks: queries rescored for every key / never
  for (int a = 0; a < QB; ++a) {
    if (job.query_exact_only[a0 + a]) always |= static_cast<__mmask16>(0xfu << (4 * a));
    if (!job.query_finite[a0 + a]) skip |= static_cast<__mmask16>(0xfu << (4 * a));
  }
  const int64_t lines_per_block =
      (prefetch_end - prefetch_begin) * kFilterKeyBlock / (t1 - t0 > 0 ? t1 - t0 : 1) + 1;
  int64_t i = t0;
  for (; i + kFilterKeyBlock <= t1; i += kFilterKeyBlock) {
    for (int64_t k = 0; k < lines_per_block && prefetch_begin < prefetch_end; ++k, ++prefetch_begin)
      __builtin_prefetch(prefetch + prefetch_begin * 64, 0, 2);
    float dots[QB][kFilterKeyBlock];
    approx_dots<QB, kFilterKeyBlock>(q, job.padded_dim, tile + (i - t0) * stride, stride, job.padded_dim, dots);
    if constexpr (QB == 4) {
      filter_and_rescore_4x4<Key>(job, a0, i, inv_k + (i - t0), _mm512_loadu_ps(&dots[0][0]), always, skip);
    } else {
      filter_and_rescore<QB, kFilterKeyBlock, Key>(job, a0, i, inv_k + (i - t0), dots);
    }
  }
  for (; i < t1; ++i) {
    float dots[QB][1];
    approx_dots<QB, 1>(q, job.padded_dim, tile + (i - t0) * stride, stride, job.padded_dim, dots);
    filter_and_rescore<QB, 1, Key>(job, a0, i, inv_k + (i - t0), dots);
  }
}

// Exchanges the lower bounds of the job's queries with the other threads: each side keeps the max.
NEURALDB_FILTER_INLINE void share_lower_bounds(const FilterJob& job) {
  for (int64_t r = 0; r < job.num_queries; ++r) {
    float* shared = job.shared_lower_bound + r;
    float seen;
    __atomic_load(shared, &seen, __ATOMIC_RELAXED);
    while (job.lower_bound[r] > seen) {
      if (__atomic_compare_exchange(shared, &seen, &job.lower_bound[r], true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) break;
    }
    if (seen > job.lower_bound[r]) job.lower_bound[r] = seen;
  }
}

// Keys in tiles of job.key_tile rows: staged as bf16 (unless bf16 keys need no padding), their
// approximate norms computed once, then every group of 4 queries filters the tile from cache. Each
// group also prefetches its share of the next tile's memory, so that reading the keys overlaps the
// dot products (the hardware prefetcher alone leaves the first pass over a tile waiting).
template <typename Key>
void filtered_job(const FilterJob& job) {
  const Key* keys = static_cast<const Key*>(job.keys);
  const bool in_place = job.key_dtype == KeyDtype::bfloat16 && job.dim == job.padded_dim;
  const int64_t groups = (job.num_queries + 3) / 4;
  for (int64_t t0 = job.key_begin; t0 < job.key_end; t0 += job.key_tile) {
    const int64_t t1 = t0 + job.key_tile < job.key_end ? t0 + job.key_tile : job.key_end;
    const int64_t next_end = t1 + job.key_tile < job.key_end ? t1 + job.key_tile : job.key_end;
    const char* next_bytes = reinterpret_cast<const char*>(keys + t1 * job.dim);
    const int64_t next_lines = (next_end - t1) * job.dim * static_cast<int64_t>(sizeof(Key)) / 64;
    const uint16_t* tile = job.key_tile_scratch;
    if (in_place) {
      tile = reinterpret_cast<const uint16_t*>(keys + t0 * job.dim);
    } else {
      for (int64_t i = t0; i < t1; ++i)
        stage_row(keys + i * job.dim, job.dim, job.padded_dim, job.key_tile_scratch + (i - t0) * job.padded_dim);
    }
    staged_inv_norms(tile, t1 - t0, job.padded_dim, job.padded_dim, job.key_inv_norm_scratch);
    share_lower_bounds(job);
    for (int64_t a = 0; a < job.num_queries; a += 4) {
      const int64_t g = a / 4, first = g * next_lines / groups, last = (g + 1) * next_lines / groups;
      const float* inv_k = job.key_inv_norm_scratch;
#define NEURALDB_FILTER_TILE(QB) \
  filter_tile<QB, Key>(job, a, tile, job.padded_dim, t0, t1, inv_k, next_bytes, first, last)
      switch (job.num_queries - a < 4 ? job.num_queries - a : 4) {
        case 1: NEURALDB_FILTER_TILE(1); break;
        case 2: NEURALDB_FILTER_TILE(2); break;
        case 3: NEURALDB_FILTER_TILE(3); break;
        default: NEURALDB_FILTER_TILE(4); break;
      }
#undef NEURALDB_FILTER_TILE
    }
  }
  share_lower_bounds(job);
}

#undef NEURALDB_FILTER_INLINE

}  // namespace

void filtered_scan(const FilterJob& job) {
  switch (job.key_dtype) {
    case KeyDtype::float32: filtered_job<float>(job); break;
    case KeyDtype::bfloat16: filtered_job<BFloat16>(job); break;
    case KeyDtype::float16: filtered_job<Float16>(job); break;
    case KeyDtype::float64: __builtin_trap();  // float64 keys accumulate in double: exact scan only
  }
}

}  // namespace NEURALDB_CPU_ISA
}  // namespace cpu
}  // namespace neuraldb

#pragma GCC diagnostic pop
