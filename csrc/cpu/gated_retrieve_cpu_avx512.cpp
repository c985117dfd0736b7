// The compute kernels of gated_retrieve_cpu_scan.h built for AVX-512F (+ AVX2, FMA, F16C) with
// 16-float vectors (namespace avx512). As for the AVX2 build, only this translation unit is
// compiled for those instructions, and gated_retrieve_cpu.cpp calls it after checking the CPU.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include "gated_retrieve_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#define NEURALDB_CPU_ISA avx512
#define NEURALDB_CPU_ISA_AVX2 1
#define NEURALDB_CPU_ISA_AVX512 1
#include "gated_retrieve_cpu_scan.h"
#pragma GCC pop_options

#endif
