// The int8 micro-kernel of key_index_cpu_dots.h with the compiler's baseline flags (namespace
// int8_generic): CPUs without AVX2 and non-x86 machines.
#include "key_index_cpu.h"

#define NEURALDB_INT8_ISA int8_generic
#include "key_index_cpu_dots.h"
