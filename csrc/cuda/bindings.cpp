// Python bindings of the CUDA gated_retrieve kernels: neuraldb_kernels._cuda.gated_retrieve.
//
// Only torch/extension.h is included (no c10/cuda headers): tensors are checked and allocated here,
// the current CUDA stream comes from Python as an integer, and the kernels are reached through the
// plain C++ interface of gated_retrieve_kernel.h.
#include <torch/extension.h>

#include <optional>
#include <string>
#include <vector>

#include "gated_retrieve_kernel.h"

namespace {

neuraldb::ElementType element_type(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return neuraldb::ElementType::Float32;
    case torch::kFloat16:
      return neuraldb::ElementType::Float16;
    case torch::kBFloat16:
      return neuraldb::ElementType::BFloat16;
    default:
      throw pybind11::type_error(std::string("gated_retrieve[cuda]: ") + name + " has dtype " +
                                 std::string(c10::toString(t.scalar_type())) +
                                 "; the cuda backend supports float32, float16 and bfloat16");
  }
}

void check_matrix(const torch::Tensor& t, const char* name, const torch::Device& device) {
  if (!t.is_cuda() || t.device() != device) {
    throw pybind11::value_error(std::string("gated_retrieve[cuda]: ") + name + " is on " + t.device().str() +
                                ", expected " + device.str());
  }
  if (t.dim() != 2 || !t.is_contiguous()) {
    throw pybind11::value_error(std::string("gated_retrieve[cuda]: ") + name +
                                " must be a contiguous 2-D tensor, got shape " + c10::str(t.sizes()));
  }
}

void check_status(int status, const char* what) {
  if (status != 0) {
    throw std::runtime_error(std::string("gated_retrieve[cuda]: ") + what + " failed: " +
                             neuraldb::gated_retrieve_error_string(status));
  }
}

// q (n >= 1, d1), K (m >= 1, d1), R (m, d2), gamma, key_gamma (m,) fp32 or None (then gamma for every key)
// -> [out (n, d2) R.dtype, index (n,) int64, score (n,) fp32].
std::vector<torch::Tensor> gated_retrieve(const torch::Tensor& q, const torch::Tensor& K, const torch::Tensor& R,
                                          double gamma, const std::optional<torch::Tensor>& key_gamma,
                                          std::int64_t stream) {
  if (!q.is_cuda()) {
    throw pybind11::value_error("gated_retrieve[cuda]: q is on " + q.device().str() + ", expected a CUDA device");
  }
  const torch::Device device = q.device();
  check_matrix(q, "q", device);
  check_matrix(K, "K", device);
  check_matrix(R, "R", device);
  neuraldb::GatedRetrieveArgs args;
  args.queries_type = element_type(q, "q");
  args.keys_type = element_type(K, "K");
  element_type(R, "R");
  args.n = q.size(0);
  args.d1 = q.size(1);
  args.m = K.size(0);
  args.d2 = R.size(1);
  if (K.size(1) != args.d1 || R.size(0) != args.m || args.n < 1 || args.m < 1) {
    throw pybind11::value_error("gated_retrieve[cuda]: expected q (n >= 1, d1), K (m >= 1, d1), R (m, d2); got q " +
                                c10::str(q.sizes()) + ", K " + c10::str(K.sizes()) + ", R " + c10::str(R.sizes()));
  }
  args.device = device.index();
  args.stream = static_cast<std::uintptr_t>(stream);
  args.gamma = static_cast<float>(gamma);
  if (key_gamma.has_value()) {
    const torch::Tensor& thresholds = *key_gamma;
    if (!thresholds.is_cuda() || thresholds.device() != device || thresholds.scalar_type() != torch::kFloat32 ||
        thresholds.dim() != 1 || thresholds.size(0) != args.m || !thresholds.is_contiguous()) {
      throw pybind11::value_error("gated_retrieve[cuda]: key_gamma must be a contiguous float32 tensor of shape (" +
                                  std::to_string(args.m) + ",) on " + device.str() + "; got " +
                                  std::string(c10::toString(thresholds.scalar_type())) + " of shape " +
                                  c10::str(thresholds.sizes()) + " on " + thresholds.device().str());
    }
    args.key_gamma = thresholds.data_ptr<float>();
  }
  check_status(neuraldb::gated_retrieve_plan(&args), "planning the key split");

  const auto on_device = torch::TensorOptions().device(device);
  torch::Tensor out = torch::empty({args.n, args.d2}, on_device.dtype(R.scalar_type()));
  torch::Tensor index = torch::empty({args.n}, on_device.dtype(torch::kInt64));
  torch::Tensor score = torch::empty({args.n}, on_device.dtype(torch::kFloat32));
  torch::Tensor partial_score = torch::empty({args.n, args.num_splits}, on_device.dtype(torch::kFloat32));
  torch::Tensor partial_index = torch::empty({args.n, args.num_splits}, on_device.dtype(torch::kInt64));
  args.queries = q.data_ptr();
  args.keys = K.data_ptr();
  args.residuals = R.data_ptr();
  args.residual_bytes = static_cast<int>(R.element_size());
  args.out = out.data_ptr();
  args.index = index.data_ptr<std::int64_t>();
  args.score = score.data_ptr<float>();
  args.partial_score = partial_score.data_ptr<float>();
  args.partial_index = partial_index.data_ptr<std::int64_t>();
  check_status(neuraldb::gated_retrieve_launch(args), "the kernel launch");
  return {out, index, score};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "CUDA kernels of neuraldb_kernels.gated_retrieve (csrc/cuda).";
  module.def("gated_retrieve", &gated_retrieve, pybind11::arg("q"), pybind11::arg("K"), pybind11::arg("R"),
             pybind11::arg("gamma"), pybind11::arg("key_gamma"), pybind11::arg("stream"),
             "Gated nearest-key retrieval on CUDA tensors; stream is torch.cuda.current_stream().cuda_stream.");
}
