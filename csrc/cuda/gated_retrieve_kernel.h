// Plain C++ interface to the CUDA gated_retrieve kernels (csrc/cuda/gated_retrieve_kernel.cu).
//
// Nothing here needs CUDA or torch headers: bindings.cpp (torch side) and the .cu file (CUDA side)
// meet only through raw device pointers, sizes, an element-type enum and the stream as an integer.
#pragma once

#include <cstdint>

namespace neuraldb {

enum class ElementType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// One call of the op. Pointers are device pointers to contiguous row-major arrays.
struct GatedRetrieveArgs {
  const void* queries = nullptr;   // (n, d1), queries_type
  ElementType queries_type = ElementType::Float32;
  const void* keys = nullptr;      // (m, d1), keys_type
  ElementType keys_type = ElementType::Float32;
  const void* residuals = nullptr; // (m, d2), residual_bytes bytes per element (copied bit for bit)
  int residual_bytes = 4;          // 2 or 4
  void* out = nullptr;             // (n, d2), same element type as residuals
  std::int64_t* index = nullptr;   // (n,)  lowest best key index where the gate fires, else -1
  float* score = nullptr;          // (n,)  best cosine (fp32); NaN for a query row with NaN/Inf
  float* partial_score = nullptr;  // (n, num_splits) workspace
  std::int64_t* partial_index = nullptr;  // (n, num_splits) workspace
  std::int64_t n = 0, m = 0, d1 = 0, d2 = 0;
  float gamma = 0.0f;              // the gate fires when score > gamma (fp32, strict)
  const float* key_gamma = nullptr;  // (m,) per-key thresholds replacing gamma, or nullptr
  int num_splits = 0;              // set by gated_retrieve_plan
  std::int64_t keys_per_split = 0; // set by gated_retrieve_plan
  int device = 0;                  // CUDA device ordinal of every pointer
  std::uintptr_t stream = 0;       // cudaStream_t as an integer (0: the legacy default stream)
};

// Choose the key split for args.n, args.m on args.device: sets num_splits and keys_per_split
// (every split non-empty). Returns a cudaError_t value (0 on success).
int gated_retrieve_plan(GatedRetrieveArgs* args);

// Launch both stages on args.stream (asynchronous). Returns a cudaError_t value (0 on success).
int gated_retrieve_launch(const GatedRetrieveArgs& args);

// The CUDA runtime's message for an error value returned above.
const char* gated_retrieve_error_string(int error);

}  // namespace neuraldb
