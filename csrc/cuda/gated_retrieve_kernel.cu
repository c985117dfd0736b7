// CUDA kernels of gated_retrieve: the two-stage split-m algorithm of the Triton backend.
//
// Stage 1, partial_best_kernel, grid (query blocks, key splits), 8 warps per block: each warp takes
// one key at a time from the block's split (keys split_start + warp, + 8, ...), reads it once with
// 16-byte vector loads when K's rows are 16-byte aligned (scalar loads otherwise), and accumulates
// in fp32 the dot products with the block's QUERIES queries together with the key's sum of squares
// (the key norm costs no extra pass over K). A block-level (max, lowest index) reduction over the
// warps writes one partial (score, index) per (query, split).
// Stage 2, finalize_kernel, one block per query: reduces the partials (max score, lowest index on
// ties), applies the gate score > gamma in fp32 (with per-key thresholds, gamma of the winning key:
// one load per query) and copies the selected residual row as integers, so the copy is bit for bit.
//
// No torch headers: the interface is gated_retrieve_kernel.h. All offsets are 64-bit.
#include "gated_retrieve_kernel.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <atomic>
#include <cstdint>

namespace neuraldb {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kMaxSplits = 1024;
constexpr int kBlocksPerSm = 8;  // resident 256-thread blocks per SM that the key split aims to fill
constexpr int kQueriesPerBlock = 8;  // queries sharing each key read when n > 1
constexpr unsigned kFullMask = 0xffffffffu;
constexpr long long kNoKey = 0x7fffffffffffffffLL;  // "no key seen yet": loses every tie

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// The 16 / sizeof(T) elements of a 16-byte vector of T, as floats (little-endian lanes).
template <typename T>
struct Unpack;

template <>
struct Unpack<float> {
  static constexpr int kCount = 4;
  __device__ static void apply(const uint4& raw, float (&out)[kCount]) {
    out[0] = __uint_as_float(raw.x);
    out[1] = __uint_as_float(raw.y);
    out[2] = __uint_as_float(raw.z);
    out[3] = __uint_as_float(raw.w);
  }
};

// Conversions of raw 16-bit patterns to float.
struct HalfBits {
  __device__ static float to_float(unsigned short bits) { return __half2float(__ushort_as_half(bits)); }
};
struct BFloat16Bits {
  __device__ static float to_float(unsigned short bits) { return __uint_as_float(static_cast<unsigned>(bits) << 16); }
};

template <typename Bits>
struct UnpackHalfWidth {
  static constexpr int kCount = 8;
  __device__ static void apply(const uint4& raw, float (&out)[kCount]) {
    const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = Bits::to_float(static_cast<unsigned short>(words[i] & 0xffffu));
      out[2 * i + 1] = Bits::to_float(static_cast<unsigned short>(words[i] >> 16));
    }
  }
};

template <>
struct Unpack<__half> : UnpackHalfWidth<HalfBits> {};
template <>
struct Unpack<__nv_bfloat16> : UnpackHalfWidth<BFloat16Bits> {};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// 1 / ||x|| from the sum of squares; 0 for a zero vector (cosine 0 with everything).
__device__ __forceinline__ float inverse_norm(float sum_of_squares) {
  return sum_of_squares > 0.0f ? 1.0f / sqrtf(sum_of_squares) : 0.0f;
}

// The reduction order: higher score first, then lower index. A NaN score never wins.
__device__ __forceinline__ bool beats(float score, long long index, float best, long long best_index) {
  return score > best || (score == best && index < best_index);
}

// Reduce (score, index) across a warp; every lane ends with the winner.
__device__ __forceinline__ void warp_best(float& score, long long& index) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float other_score = __shfl_xor_sync(kFullMask, score, offset);
    const long long other_index = __shfl_xor_sync(kFullMask, index, offset);
    if (beats(other_score, other_index, score, index)) {
      score = other_score;
      index = other_index;
    }
  }
}

template <typename QT, typename KT, int QUERIES>
__global__ void __launch_bounds__(kThreads) partial_best_kernel(
    const QT* __restrict__ queries, const KT* __restrict__ keys, float* __restrict__ partial_score,
    long long* __restrict__ partial_index, long long n, long long m, long long d1, long long keys_per_split,
    int num_splits, bool vectorized) {
  __shared__ float query_inverse_norm[QUERIES];
  __shared__ bool query_finite[QUERIES];
  __shared__ float warp_score[kWarps][QUERIES];
  __shared__ long long warp_index[kWarps][QUERIES];

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  const long long first_query = static_cast<long long>(blockIdx.x) * QUERIES;
  const int split = blockIdx.y;
  const int block_queries = static_cast<int>(min(static_cast<long long>(QUERIES), n - first_query));
  const QT* block_rows = queries + first_query * d1;

  // Query norms and finiteness (a NaN or +-Inf element makes the row never match).
  for (int qi = warp; qi < QUERIES; qi += kWarps) {
    float sum_of_squares = 0.0f;
    int nonfinite = 0;
    if (qi < block_queries) {
      const QT* row = block_rows + qi * d1;
      for (long long d = lane; d < d1; d += kWarpSize) {
        const float x = to_float(row[d]);
        sum_of_squares += x * x;
        nonfinite |= !(fabsf(x) < CUDART_INF_F);
      }
    }
    sum_of_squares = warp_sum(sum_of_squares);
    nonfinite = __any_sync(kFullMask, nonfinite);
    if (lane == 0) {
      query_inverse_norm[qi] = inverse_norm(sum_of_squares);
      query_finite[qi] = !nonfinite;
    }
  }
  __syncthreads();

  float q_inv[QUERIES];
  float best[QUERIES];
  long long best_index[QUERIES];
#pragma unroll
  for (int qi = 0; qi < QUERIES; ++qi) {
    q_inv[qi] = query_inverse_norm[qi];
    best[qi] = -CUDART_INF_F;
    best_index[qi] = kNoKey;
  }

  const long long split_start = static_cast<long long>(split) * keys_per_split;
  const long long split_end = min(split_start + keys_per_split, m);
  for (long long key = split_start + warp; key < split_end; key += kWarps) {
    const KT* key_row = keys + key * d1;
    float dot[QUERIES];
#pragma unroll
    for (int qi = 0; qi < QUERIES; ++qi) dot[qi] = 0.0f;
    float key_sum_of_squares = 0.0f;
    if (vectorized) {
      constexpr int kVector = Unpack<KT>::kCount;
      const long long vectors = d1 / kVector;
      const uint4* key_vectors = reinterpret_cast<const uint4*>(key_row);
#pragma unroll 4
      for (long long v = lane; v < vectors; v += kWarpSize) {
        float k[kVector];
        Unpack<KT>::apply(__ldg(key_vectors + v), k);
#pragma unroll
        for (int j = 0; j < kVector; ++j) key_sum_of_squares += k[j] * k[j];
#pragma unroll
        for (int qi = 0; qi < QUERIES; ++qi) {
          if (qi < block_queries) {
            const QT* q = block_rows + qi * d1 + v * kVector;
#pragma unroll
            for (int j = 0; j < kVector; ++j) dot[qi] += k[j] * to_float(q[j]);
          }
        }
      }
    } else {
      for (long long d = lane; d < d1; d += kWarpSize) {
        const float k = to_float(key_row[d]);
        key_sum_of_squares += k * k;
#pragma unroll
        for (int qi = 0; qi < QUERIES; ++qi) {
          if (qi < block_queries) dot[qi] += k * to_float(block_rows[qi * d1 + d]);
        }
      }
    }
    const float k_inv = inverse_norm(warp_sum(key_sum_of_squares));
#pragma unroll
    for (int qi = 0; qi < QUERIES; ++qi) {
      const float cosine = warp_sum(dot[qi]) * q_inv[qi] * k_inv;
      if (cosine > best[qi]) {  // strict: keys come in increasing order, the first best stays
        best[qi] = cosine;
        best_index[qi] = key;
      }
    }
  }

  if (lane == 0) {
#pragma unroll
    for (int qi = 0; qi < QUERIES; ++qi) {
      warp_score[warp][qi] = best[qi];
      warp_index[warp][qi] = best_index[qi];
    }
  }
  __syncthreads();
  const int qi = threadIdx.x;
  if (qi < block_queries) {
    float score = -CUDART_INF_F;
    long long index = kNoKey;
    for (int w = 0; w < kWarps; ++w) {
      if (beats(warp_score[w][qi], warp_index[w][qi], score, index)) {
        score = warp_score[w][qi];
        index = warp_index[w][qi];
      }
    }
    if (!query_finite[qi]) {
      score = CUDART_NAN_F;
      index = -1;
    }
    const long long slot = (first_query + qi) * num_splits + split;
    partial_score[slot] = score;
    partial_index[slot] = index;
  }
}

template <typename Word>
__global__ void __launch_bounds__(kThreads) finalize_kernel(
    const float* __restrict__ partial_score, const long long* __restrict__ partial_index,
    const Word* __restrict__ residuals, Word* __restrict__ out, long long* __restrict__ index_out,
    float* __restrict__ score_out, int num_splits, long long d2, float gamma,
    const float* __restrict__ key_gamma) {
  __shared__ float warp_score[kWarps];
  __shared__ long long warp_index[kWarps];
  __shared__ long long chosen;

  const long long row = blockIdx.x;
  const float* scores = partial_score + row * num_splits;
  const long long* indices = partial_index + row * num_splits;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  float score = -CUDART_INF_F;
  long long index = kNoKey;
  for (int s = threadIdx.x; s < num_splits; s += kThreads) {
    if (beats(scores[s], indices[s], score, index)) {
      score = scores[s];
      index = indices[s];
    }
  }
  warp_best(score, index);
  if (lane == 0) {
    warp_score[warp] = score;
    warp_index[warp] = index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (beats(warp_score[w], warp_index[w], score, index)) {
        score = warp_score[w];
        index = warp_index[w];
      }
    }
    const bool finite = indices[0] != -1;  // stage 1 marks NaN/Inf query rows with index -1
    // index stays kNoKey when every key is NaN/Inf (they never win, not even at -inf): no key to
    // gate with, and key_gamma must not be read there
    const bool fired = finite && index != kNoKey && score > (key_gamma != nullptr ? key_gamma[index] : gamma);
    score_out[row] = finite ? score : CUDART_NAN_F;
    index_out[row] = fired ? index : -1;
    chosen = fired ? index : -1;
  }
  __syncthreads();
  const long long selected = chosen;
  Word* out_row = out + row * d2;
  if (selected >= 0) {
    const Word* source = residuals + selected * d2;
    for (long long c = threadIdx.x; c < d2; c += kThreads) out_row[c] = source[c];
  } else {
    for (long long c = threadIdx.x; c < d2; c += kThreads) out_row[c] = Word(0);
  }
}

int queries_per_block(long long n) { return n == 1 ? 1 : kQueriesPerBlock; }

long long ceil_div(long long a, long long b) { return (a + b - 1) / b; }

template <typename QT, typename KT>
cudaError_t launch_partial_best(const GatedRetrieveArgs& a, cudaStream_t stream) {
  const bool vectorized = reinterpret_cast<std::uintptr_t>(a.keys) % 16 == 0 &&
                          (a.d1 * static_cast<long long>(sizeof(KT))) % 16 == 0;
  const int per_block = queries_per_block(a.n);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.n, per_block)), static_cast<unsigned>(a.num_splits));
  const auto* q = static_cast<const QT*>(a.queries);
  const auto* k = static_cast<const KT*>(a.keys);
  auto* partial_index = reinterpret_cast<long long*>(a.partial_index);
  if (per_block == 1) {
    partial_best_kernel<QT, KT, 1><<<grid, kThreads, 0, stream>>>(
        q, k, a.partial_score, partial_index, a.n, a.m, a.d1, a.keys_per_split, a.num_splits, vectorized);
  } else {
    partial_best_kernel<QT, KT, kQueriesPerBlock><<<grid, kThreads, 0, stream>>>(
        q, k, a.partial_score, partial_index, a.n, a.m, a.d1, a.keys_per_split, a.num_splits, vectorized);
  }
  return cudaGetLastError();
}

template <typename QT>
cudaError_t dispatch_keys(const GatedRetrieveArgs& a, cudaStream_t stream) {
  switch (a.keys_type) {
    case ElementType::Float32:
      return launch_partial_best<QT, float>(a, stream);
    case ElementType::Float16:
      return launch_partial_best<QT, __half>(a, stream);
    case ElementType::BFloat16:
      return launch_partial_best<QT, __nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t dispatch_partial_best(const GatedRetrieveArgs& a, cudaStream_t stream) {
  switch (a.queries_type) {
    case ElementType::Float32:
      return dispatch_keys<float>(a, stream);
    case ElementType::Float16:
      return dispatch_keys<__half>(a, stream);
    case ElementType::BFloat16:
      return dispatch_keys<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename Word>
cudaError_t launch_finalize(const GatedRetrieveArgs& a, cudaStream_t stream) {
  finalize_kernel<Word><<<static_cast<unsigned>(a.n), kThreads, 0, stream>>>(
      a.partial_score, reinterpret_cast<const long long*>(a.partial_index), static_cast<const Word*>(a.residuals),
      static_cast<Word*>(a.out), reinterpret_cast<long long*>(a.index), a.score, a.num_splits, a.d2, a.gamma,
      a.key_gamma);
  return cudaGetLastError();
}

// Makes `device` current for the scope of a launch and restores the caller's device after.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    status_ = cudaGetDevice(&previous_);
    if (status_ == cudaSuccess && previous_ != device) status_ = cudaSetDevice(device);
  }
  ~DeviceScope() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  cudaError_t status() const { return status_; }

 private:
  int previous_ = 0;
  cudaError_t status_ = cudaSuccess;
};

// Streaming multiprocessors of `device`, asked of the driver once per device: decode plans on
// every call, and the count cannot change while the process runs.
cudaError_t multiprocessor_count(int device, int* sms) {
  constexpr int kMaxCachedDevices = 64;
  static std::atomic<int> cached[kMaxCachedDevices];  // static storage: zero, "not asked yet"
  const bool cacheable = device >= 0 && device < kMaxCachedDevices;
  if (cacheable && (*sms = cached[device].load(std::memory_order_relaxed)) > 0) return cudaSuccess;
  const cudaError_t status = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess && cacheable) cached[device].store(*sms, std::memory_order_relaxed);
  return status;
}

}  // namespace

int gated_retrieve_plan(GatedRetrieveArgs* args) {
  if (args == nullptr || args->n < 1 || args->m < 1) return cudaErrorInvalidValue;
  int sms = 0;
  const cudaError_t status = multiprocessor_count(args->device, &sms);
  if (status != cudaSuccess) return status;
  const long long query_blocks = ceil_div(args->n, queries_per_block(args->n));
  const long long wanted = ceil_div(static_cast<long long>(sms) * kBlocksPerSm, query_blocks);
  const long long useful = ceil_div(args->m, kWarps);  // at least one key per warp
  long long splits = wanted < useful ? wanted : useful;
  splits = splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits);
  args->keys_per_split = ceil_div(args->m, splits);
  args->num_splits = static_cast<int>(ceil_div(args->m, args->keys_per_split));  // no empty split
  return cudaSuccess;
}

int gated_retrieve_launch(const GatedRetrieveArgs& args) {
  if (args.n < 1 || args.m < 1 || args.d1 < 0 || args.d2 < 0 || args.num_splits < 1 ||
      args.num_splits > kMaxSplits || args.keys_per_split * args.num_splits < args.m ||
      (args.residual_bytes != 2 && args.residual_bytes != 4)) {
    return cudaErrorInvalidValue;
  }
  DeviceScope scope(args.device);
  if (scope.status() != cudaSuccess) return scope.status();
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(args.stream);
  cudaError_t status = dispatch_partial_best(args, stream);
  if (status != cudaSuccess) return status;
  return args.residual_bytes == 2 ? launch_finalize<unsigned short>(args, stream)
                                  : launch_finalize<unsigned>(args, stream);
}

const char* gated_retrieve_error_string(int error) {
  return cudaGetErrorString(static_cast<cudaError_t>(error));
}

}  // namespace neuraldb
