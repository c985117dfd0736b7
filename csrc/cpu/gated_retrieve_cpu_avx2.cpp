// The compute kernels of gated_retrieve_cpu_scan.h built for AVX2 + FMA + F16C (namespace avx2).
// Only this translation unit is compiled for those instructions; gated_retrieve_cpu.cpp calls it
// after checking the CPU at run time, so the extension still runs on x86-64 CPUs without AVX2.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include "gated_retrieve_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define NEURALDB_CPU_ISA avx2
#define NEURALDB_CPU_ISA_AVX2 1
#include "gated_retrieve_cpu_scan.h"
#pragma GCC pop_options

#endif
