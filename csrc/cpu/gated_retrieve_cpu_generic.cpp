// The compute kernels of gated_retrieve_cpu_scan.h built with the compiler's baseline flags
// (namespace generic): the portable path for CPUs without AVX2/FMA/F16C and non-x86 machines.
#include "gated_retrieve_cpu.h"

#define NEURALDB_CPU_ISA generic
#include "gated_retrieve_cpu_scan.h"
