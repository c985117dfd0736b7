// The int8 micro-kernel of key_index_cpu_dots.h built for AVX2 (namespace int8_avx2);
// key_index_cpu.cpp calls it only after checking the CPU at run time.
#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include "key_index_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx2")
#define NEURALDB_INT8_ISA int8_avx2
#define NEURALDB_INT8_AVX2 1
#include "key_index_cpu_dots.h"
#pragma GCC pop_options

#endif
