// torch entry point of the compressed key index's int8 candidate pass (key_index_cpu.h),
// registered on neuraldb_kernels._cpu by bindings.cpp.
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "key_index_cpu.h"

namespace {

using neuraldb::cpu::Int8Isa;

Int8Isa int8_isa_from_name(const std::string& name) {
  const bool vnni = neuraldb::cpu::cpu_has_avx512_vnni();
  const bool avx2 = neuraldb::cpu::cpu_has_int8_avx2();
  if (name == "auto") return vnni ? Int8Isa::avx512_vnni : (avx2 ? Int8Isa::avx2 : Int8Isa::generic);
  if (name == "generic") return Int8Isa::generic;
  if (name == "avx2") {
    TORCH_CHECK_VALUE(avx2, "int8_candidates: isa='avx2' requested but this CPU lacks AVX2");
    return Int8Isa::avx2;
  }
  if (name == "avx512_vnni") {
    TORCH_CHECK_VALUE(vnni, "int8_candidates: isa='avx512_vnni' requested but this CPU lacks AVX-512F/BW/VNNI");
    return Int8Isa::avx512_vnni;
  }
  TORCH_CHECK_VALUE(false, "int8_candidates: unknown isa '", name, "', expected 'auto', 'avx512_vnni', 'avx2' or 'generic'");
}

void check_vector(const char* what, const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t length) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.size(0) == length && t.is_contiguous(),
                    what, ": ", name, " must be a contiguous CPU tensor of dtype ", dtype, " and shape (", length,
                    ",), got ", t.scalar_type(), " of shape ", t.sizes());
}

void check_codes(const char* what, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == at::kChar && t.dim() == 2 && t.size(1) % 64 == 0 && t.is_contiguous(),
                    what, ": ", name, " must be a contiguous int8 CPU tensor (rows, 64 * k), got ",
                    t.scalar_type(), " of shape ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_candidates(
    const at::Tensor& query_codes, const at::Tensor& query_scale, const at::Tensor& query_error,
    const at::Tensor& key_codes, const at::Tensor& key_scale, const at::Tensor& key_error,
    const at::Tensor& key_norm, double slack, int64_t budget, int64_t num_threads, const std::string& isa) {
  check_codes("int8_candidates", query_codes, "query_codes");
  check_codes("int8_candidates", key_codes, "key_codes");
  const int64_t n = query_codes.size(0), m = key_codes.size(0), dim = key_codes.size(1);
  TORCH_CHECK_VALUE(query_codes.size(1) == dim, "int8_candidates: query codes have ", query_codes.size(1),
                    " features, key codes ", dim);
  TORCH_CHECK_VALUE(dim < 66000, "int8_candidates: int32 dot products need fewer than 66,000 features, got ", dim);
  TORCH_CHECK_VALUE(budget >= 1, "int8_candidates: budget must be >= 1, got ", budget);
  check_vector("int8_candidates", query_scale, "query_scale", at::kFloat, n);
  check_vector("int8_candidates", query_error, "query_error", at::kFloat, n);
  check_vector("int8_candidates", key_scale, "key_scale", at::kFloat, m);
  check_vector("int8_candidates", key_error, "key_error", at::kFloat, m);
  check_vector("int8_candidates", key_norm, "key_norm", at::kFloat, m);
  neuraldb::cpu::Int8CandidateInputs in{
      query_codes.data_ptr<int8_t>(), query_scale.data_ptr<float>(), query_error.data_ptr<float>(), n,
      key_codes.data_ptr<int8_t>(), key_scale.data_ptr<float>(), key_error.data_ptr<float>(),
      key_norm.data_ptr<float>(), m, dim, static_cast<float>(slack), budget};
  at::Tensor offsets = at::empty({n + 1}, at::kLong);
  at::Tensor overflowed = at::empty({n}, at::kBool);
  std::vector<int64_t> keys;
  const Int8Isa chosen = int8_isa_from_name(isa);
  {
    pybind11::gil_scoped_release no_gil;
    neuraldb::cpu::int8_candidates(in, static_cast<int>(std::max<int64_t>(1, num_threads)), chosen, keys,
                                   offsets.data_ptr<int64_t>(), reinterpret_cast<uint8_t*>(overflowed.data_ptr<bool>()));
  }
  at::Tensor keys_out = at::empty({static_cast<int64_t>(keys.size())}, at::kLong);
  std::copy(keys.begin(), keys.end(), keys_out.data_ptr<int64_t>());
  return {keys_out, offsets, overflowed};
}

void int8_encode_rows(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                      const at::Tensor& error, const at::Tensor& norm, int64_t num_threads) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                        x.dim() == 2 && x.is_contiguous(),
                    "int8_encode_rows: x must be a contiguous float32 or float64 CPU tensor (rows, d1), got ",
                    x.scalar_type(), " of shape ", x.sizes());
  const int64_t rows = x.size(0), d1 = x.size(1);
  TORCH_CHECK_VALUE(d1 < neuraldb::cpu::kEncodeMaxFeatures, "int8_encode_rows: the error bounds hold for fewer than ",
                    neuraldb::cpu::kEncodeMaxFeatures, " features, got ", d1);
  check_codes("int8_encode_rows", codes, "codes");
  TORCH_CHECK_VALUE(codes.size(0) == rows && codes.size(1) >= d1, "int8_encode_rows: codes must have shape (", rows,
                    ", >= ", d1, "), got ", codes.sizes());
  check_vector("int8_encode_rows", scale, "scale", at::kFloat, rows);
  check_vector("int8_encode_rows", error, "error", at::kFloat, rows);
  check_vector("int8_encode_rows", norm, "norm", at::kFloat, rows);
  const int threads = static_cast<int>(std::max<int64_t>(1, num_threads));
  pybind11::gil_scoped_release no_gil;
  if (x.scalar_type() == at::kFloat) {
    neuraldb::cpu::int8_encode_rows(x.data_ptr<float>(), rows, d1, codes.size(1), threads, codes.data_ptr<int8_t>(),
                                    scale.data_ptr<float>(), error.data_ptr<float>(), norm.data_ptr<float>());
  } else {
    neuraldb::cpu::int8_encode_rows(x.data_ptr<double>(), rows, d1, codes.size(1), threads, codes.data_ptr<int8_t>(),
                                    scale.data_ptr<float>(), error.data_ptr<float>(), norm.data_ptr<float>());
  }
}

std::vector<std::string> available_int8_isas() {
  std::vector<std::string> names;
  if (neuraldb::cpu::cpu_has_avx512_vnni()) names.push_back("avx512_vnni");
  if (neuraldb::cpu::cpu_has_int8_avx2()) names.push_back("avx2");
  names.push_back("generic");
  return names;
}

}  // namespace

void register_key_index(pybind11::module_& m) {
  m.def("int8_candidates", &int8_candidates,
        "Certified candidate sets of a compressed key index over int8 codes (key_index.py):\n"
        "query codes (n, dim) int8, query scale/error (n,) float32, key codes (m, dim) int8,\n"
        "key scale/error/norm (m,) float32, slack delta(d1), per-query budget. dim % 64 == 0.\n"
        "Returns keys (total,) int64 (ascending per query), offsets (n + 1,) int64, overflowed (n,) bool.",
        pybind11::arg("query_codes"), pybind11::arg("query_scale"), pybind11::arg("query_error"),
        pybind11::arg("key_codes"), pybind11::arg("key_scale"), pybind11::arg("key_error"),
        pybind11::arg("key_norm"), pybind11::arg("slack"), pybind11::arg("budget"),
        pybind11::arg("num_threads"), pybind11::arg("isa") = "auto");
  m.def("int8_encode_rows", &int8_encode_rows,
        "int8 codes of the normalised rows of x (rows, d1) float32/float64 into codes (rows, dim) int8\n"
        "(dim % 64 == 0, dim >= d1), scale, error and norm (rows,) float32 (key_index.py).",
        pybind11::arg("x"), pybind11::arg("codes"), pybind11::arg("scale"), pybind11::arg("error"),
        pybind11::arg("norm"), pybind11::arg("num_threads"));
  m.def("available_int8_isas", &available_int8_isas, "Instruction sets the int8 candidate pass can use here, best first.");
}
