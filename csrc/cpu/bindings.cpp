// torch/pybind entry point of the "cpu" gated_retrieve backend: module neuraldb_kernels._cpu.
// Checks the tensors it is handed (the Python layer validates user input first), picks the
// accumulation type, runs the best-match search without the GIL, then applies the gate and copies
// the selected rows of R bit for bit. The gate reads one threshold for every key, or per-key
// thresholds at the winning index only.
#include <torch/extension.h>

#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "gated_retrieve_cpu.h"

namespace {

using neuraldb::cpu::Isa;
using neuraldb::cpu::KeyDtype;

KeyDtype key_dtype_of(const at::Tensor& keys) {
  switch (keys.scalar_type()) {
    case at::kFloat: return KeyDtype::float32;
    case at::kDouble: return KeyDtype::float64;
    case at::kBFloat16: return KeyDtype::bfloat16;
    case at::kHalf: return KeyDtype::float16;
    default: TORCH_CHECK_TYPE(false, "gated_retrieve (cpu): K must be float32, float64, bfloat16 or float16, got ", keys.scalar_type());
  }
}

Isa isa_from_name(const std::string& name) {
  if (name == "auto") {
    if (neuraldb::cpu::cpu_has_avx512()) return Isa::avx512;
    return neuraldb::cpu::cpu_has_avx2() ? Isa::avx2 : Isa::generic;
  }
  if (name == "generic") return Isa::generic;
  if (name == "avx2") {
    TORCH_CHECK_VALUE(neuraldb::cpu::cpu_has_avx2(), "gated_retrieve (cpu): isa='avx2' requested but this CPU lacks AVX2, FMA or F16C");
    return Isa::avx2;
  }
  if (name == "avx512") {
    TORCH_CHECK_VALUE(neuraldb::cpu::cpu_has_avx512(), "gated_retrieve (cpu): isa='avx512' requested but this CPU lacks AVX-512F, AVX2, FMA or F16C");
    return Isa::avx512;
  }
  TORCH_CHECK_VALUE(false, "gated_retrieve (cpu): unknown isa '", name, "', expected 'auto', 'avx512', 'avx2' or 'generic'");
}

// The filtered path needs float32 accumulation and the avx512 scan's arithmetic (it rescores with it).
neuraldb::cpu::MatchPath path_from_name(const std::string& name, Isa isa, bool use_double) {
  if (name == "scan") return neuraldb::cpu::MatchPath::scan;
  TORCH_CHECK_VALUE(name == "filtered", "gated_retrieve (cpu): unknown path '", name, "', expected 'scan' or 'filtered'");
  TORCH_CHECK_VALUE(neuraldb::cpu::cpu_has_avx512bf16(), "gated_retrieve (cpu): path='filtered' needs AVX512-BF16, which this CPU lacks");
  TORCH_CHECK_VALUE(isa == Isa::avx512, "gated_retrieve (cpu): path='filtered' rescores with the avx512 arithmetic; isa must be 'auto' or 'avx512'");
  TORCH_CHECK_VALUE(!use_double, "gated_retrieve (cpu): path='filtered' accumulates in float32; q and K must not be float64");
  return neuraldb::cpu::MatchPath::filtered;
}

std::vector<std::string> available_isas() {
  if (neuraldb::cpu::cpu_has_avx512()) return {"avx512", "avx2", "generic"};
  if (neuraldb::cpu::cpu_has_avx2()) return {"avx2", "generic"};
  return {"generic"};
}

template <typename Acc>
void search_gate_gather(const at::Tensor& q_acc, const at::Tensor& keys, const at::Tensor& rows,
                        double gamma, const float* key_gamma, int num_threads, Isa isa,
                        neuraldb::cpu::MatchPath path, at::Tensor& out, at::Tensor& index, at::Tensor& score) {
  const int64_t n = q_acc.size(0), dim = q_acc.size(1), m = keys.size(0);
  std::vector<Acc> best_score(n);
  int64_t* idx = index.data_ptr<int64_t>();
  {
    pybind11::gil_scoped_release no_gil;
    neuraldb::cpu::best_match<Acc>(q_acc.data_ptr<Acc>(), n, dim, keys.data_ptr(),
                                   key_dtype_of(keys), m, num_threads, isa, path, best_score.data(), idx);
  }
  const Acc threshold = static_cast<Acc>(gamma);
  const int64_t row_bytes = rows.size(1) * rows.element_size();
  const char* src = static_cast<const char*>(rows.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  float* score_out = score.data_ptr<float>();
  for (int64_t r = 0; r < n; ++r) {
    score_out[r] = static_cast<float>(best_score[r]);
    // index -1: a NaN/Inf query row or only NaN/Inf keys (score NaN or -inf), never fired
    const int64_t best = idx[r];
    if (best >= 0 && best_score[r] > (key_gamma != nullptr ? static_cast<Acc>(key_gamma[best]) : threshold)) {
      std::memcpy(dst + r * row_bytes, src + idx[r] * row_bytes, row_bytes);
    } else {
      idx[r] = -1;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_retrieve(const at::Tensor& q,
                                                              const at::Tensor& keys,
                                                              const at::Tensor& rows, double gamma,
                                                              int64_t num_threads,
                                                              const std::string& isa_name,
                                                              const std::optional<at::Tensor>& key_gamma,
                                                              const std::string& path_name) {
  TORCH_CHECK_VALUE(q.device().is_cpu() && keys.device().is_cpu() && rows.device().is_cpu(),
                    "gated_retrieve (cpu): q, K, R must be CPU tensors, got ", q.device(), ", ",
                    keys.device(), ", ", rows.device());
  TORCH_CHECK_VALUE(q.dim() == 2 && keys.dim() == 2 && rows.dim() == 2,
                    "gated_retrieve (cpu): q (n, d1), K (m, d1), R (m, d2) must be 2-D, got shapes ",
                    q.sizes(), ", ", keys.sizes(), ", ", rows.sizes());
  TORCH_CHECK_VALUE(q.size(1) == keys.size(1) && keys.size(0) == rows.size(0),
                    "gated_retrieve (cpu): shapes do not match: q ", q.sizes(), ", K ",
                    keys.sizes(), ", R ", rows.sizes());
  TORCH_CHECK_VALUE(q.size(0) >= 1 && keys.size(0) >= 1,
                    "gated_retrieve (cpu): needs n >= 1 queries and m >= 1 keys, got q ",
                    q.sizes(), ", K ", keys.sizes());
  TORCH_CHECK_VALUE(keys.is_contiguous() && rows.is_contiguous(),
                    "gated_retrieve (cpu): K and R must be contiguous");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()) && at::isFloatingType(rows.scalar_type()),
                   "gated_retrieve (cpu): q and R must be floating point, got ", q.scalar_type(),
                   " and ", rows.scalar_type());
  if (key_gamma.has_value()) {
    const at::Tensor& thresholds = *key_gamma;
    TORCH_CHECK_VALUE(thresholds.device().is_cpu() && thresholds.scalar_type() == at::kFloat &&
                          thresholds.dim() == 1 && thresholds.size(0) == keys.size(0) &&
                          thresholds.is_contiguous(),
                      "gated_retrieve (cpu): key_gamma must be a contiguous float32 CPU tensor of shape (",
                      keys.size(0), ",), got ", thresholds.scalar_type(), " of shape ", thresholds.sizes(),
                      " on ", thresholds.device());
  }
  const float* thresholds = key_gamma.has_value() ? key_gamma->data_ptr<float>() : nullptr;
  const KeyDtype key_dtype = key_dtype_of(keys);
  const Isa isa = isa_from_name(isa_name);
  const bool use_double = q.scalar_type() == at::kDouble || key_dtype == KeyDtype::float64;
  const neuraldb::cpu::MatchPath path = path_from_name(path_name, isa, use_double);
  const at::Tensor q_acc = q.to(use_double ? at::kDouble : at::kFloat).contiguous();

  const int64_t n = q.size(0);
  at::Tensor out = at::zeros({n, rows.size(1)}, rows.options());
  at::Tensor index = at::empty({n}, q.options().dtype(at::kLong));
  at::Tensor score = at::empty({n}, q.options().dtype(at::kFloat));
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  if (use_double) {
    search_gate_gather<double>(q_acc, keys, rows, gamma, thresholds, threads, isa, path, out, index, score);
  } else {
    search_gate_gather<float>(q_acc, keys, rows, gamma, thresholds, threads, isa, path, out, index, score);
  }
  return {out, index, score};
}

}  // namespace

void register_key_index(pybind11::module_& m);  // key_index_bindings.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ CPU kernels of neuraldb_kernels (OpenMP, AVX-512 or AVX2/FMA/F16C with a portable fallback).";
  m.def("gated_retrieve", &gated_retrieve,
        "Best cosine match of each query row among the keys, gated at gamma, or at\n"
        "key_gamma[index] when key_gamma ((m,) float32 per-key thresholds) is given.\n"
        "q (n, d1), K (m, d1) contiguous, R (m, d2) contiguous; float32/float64/bfloat16/float16.\n"
        "Accumulates in float64 if q or K is float64, else float32. Returns out (n, d2) R.dtype,\n"
        "index (n,) int64 (-1 where the gate is closed), score (n,) float32 (NaN for NaN/Inf rows).\n"
        "path: 'scan' scores every pair exactly; 'filtered' (prefill; AVX512-BF16 CPUs, float32\n"
        "accumulation, isa avx512) finds candidates with bf16 dot products and rescores only them:\n"
        "the same result bit for bit.",
        pybind11::arg("q"), pybind11::arg("K"), pybind11::arg("R"), pybind11::arg("gamma"),
        pybind11::arg("num_threads"), pybind11::arg("isa") = "auto",
        pybind11::arg("key_gamma") = pybind11::none(), pybind11::arg("path") = "scan");
  m.def("filtered_path_available", &neuraldb::cpu::cpu_has_avx512bf16,
        "True when this CPU can run path='filtered' (AVX-512F/BW/VL and AVX512-BF16).");
  m.def("available_isas", &available_isas,
        "Instruction sets the kernel can use on this CPU, best first.");
  register_key_index(m);
}
