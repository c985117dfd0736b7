// int8 codes of normalised rows with their certified error and norm bounds (key_index_cpu.h;
// the derivation of the bounds is in neuraldb_kernels/ops/key_index.py, "Encoding on the CPU").
//
// Per row, in double: y = x / max|x| (so no square over- or underflows), unit = y / |y| (both as
// products with a reciprocal), the scale s = float32(max|unit| / 127), codes round(unit / s) (to
// nearest, ties to even), and the bounds |unit - s * codes| and |s * codes| plus kEncodePad,
// rounded up to float32. Rows are independent: OpenMP splits them, the result does not depend on
// the thread count.
#include "key_index_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace neuraldb {
namespace cpu {
namespace {

// The float32 at or above v (v >= 0 finite).
float round_up_to_float(double v) {
  float narrow = static_cast<float>(v);
  if (static_cast<double>(narrow) < v) narrow = std::nextafter(narrow, std::numeric_limits<float>::infinity());
  return narrow;
}

// Round to nearest, ties to even, for |v| < 2^51 (without SSE4.1's roundsd or a libm call per
// element): adding and removing 1.5 * 2^52 leaves no fraction bits in between.
inline double round_to_integer(double v) {
  constexpr double kShift = 0x1.8p52;
  return (v + kShift) - kShift;
}

template <typename T>
void encode_row(const T* x, int64_t d1, int64_t dim, int8_t* codes, float* scale, float* error,
                float* norm, double* unit) {
  double amax = 0.0, poison = 0.0;  // poison: NaN iff some entry is NaN or Inf
#pragma omp simd reduction(max : amax) reduction(+ : poison)
  for (int64_t j = 0; j < d1; ++j) {
    const double v = static_cast<double>(x[j]);
    amax = std::max(amax, std::fabs(v));
    poison += v * 0.0;
  }
  std::fill(codes, codes + dim, int8_t{0});
  const bool finite = poison == 0.0;
  if (!finite || amax == 0.0) {  // a NaN/Inf row never wins; a zero row has k~ = k_hat = 0
    *scale = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
    *error = 0.0f;
    *norm = 0.0f;
    return;
  }
  // Reciprocals, not divisions (a division per element costs more than the rest); a tiny row is
  // first scaled by 2^600, exactly, so that 1 / max|x| is finite.
  const double prescale = amax < 0x1p-1000 ? 0x1p600 : 1.0;
  const double inverse_max = 1.0 / (amax * prescale);
  double squares = 0.0;
#pragma omp simd reduction(+ : squares)
  for (int64_t j = 0; j < d1; ++j) {
    unit[j] = static_cast<double>(x[j]) * prescale * inverse_max;
    squares += unit[j] * unit[j];
  }
  const double inverse_length = 1.0 / std::sqrt(squares);
  double unit_max = 0.0;
#pragma omp simd reduction(max : unit_max)
  for (int64_t j = 0; j < d1; ++j) {
    unit[j] *= inverse_length;
    unit_max = std::max(unit_max, std::fabs(unit[j]));
  }
  const float s = static_cast<float>(unit_max / 127.0);
  const double s64 = static_cast<double>(s), inverse_s = 1.0 / s64;
  double error_squares = 0.0, norm_squares = 0.0;
#pragma omp simd reduction(+ : error_squares, norm_squares)
  for (int64_t j = 0; j < d1; ++j) {
    const double code = std::min(127.0, std::max(-127.0, round_to_integer(unit[j] * inverse_s)));
    const double dequantised = code * s64;  // exact: an 8-bit integer times a float32
    codes[j] = static_cast<int8_t>(code);
    error_squares += (unit[j] - dequantised) * (unit[j] - dequantised);
    norm_squares += dequantised * dequantised;
  }
  *scale = s;
  *error = round_up_to_float(std::sqrt(error_squares) + kEncodePad);
  *norm = round_up_to_float(std::sqrt(norm_squares) + kEncodePad);
}

template <typename T>
void encode_rows_as(const T* x, int64_t rows, int64_t d1, int64_t dim, int num_threads, int8_t* codes,
                    float* scale, float* error, float* norm) {
  const bool parallel = num_threads > 1 && rows * d1 >= (int64_t{1} << 16);
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    std::vector<double> unit(static_cast<size_t>(d1));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      encode_row(x + r * d1, d1, dim, codes + r * dim, scale + r, error + r, norm + r, unit.data());
  }
}

}  // namespace

void int8_encode_rows(const float* x, int64_t rows, int64_t d1, int64_t dim, int num_threads,
                      int8_t* codes, float* scale, float* error, float* norm) {
  encode_rows_as(x, rows, d1, dim, num_threads, codes, scale, error, norm);
}

void int8_encode_rows(const double* x, int64_t rows, int64_t d1, int64_t dim, int num_threads,
                      int8_t* codes, float* scale, float* error, float* norm) {
  encode_rows_as(x, rows, d1, dim, num_threads, codes, scale, error, norm);
}

}  // namespace cpu
}  // namespace neuraldb
