// The filtered scan (gated_retrieve_cpu_filter.h) built for AVX-512 BF16 (namespace avx512bf16),
// on top of the 16-float exact arithmetic of gated_retrieve_cpu_scan.h: the same arithmetic as the
// avx512 build, so a rescored score is bit for bit the avx512 scan's. gated_retrieve_cpu.cpp calls
// it only after checking the CPU for AVX512-BF16.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include "gated_retrieve_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")
#define NEURALDB_CPU_ISA avx512bf16
#define NEURALDB_CPU_ISA_AVX2 1
#define NEURALDB_CPU_ISA_AVX512 1
#define NEURALDB_CPU_SCAN_HELPERS_ONLY 1
#include "gated_retrieve_cpu_scan.h"
#include "gated_retrieve_cpu_filter.h"
#pragma GCC pop_options

#endif
