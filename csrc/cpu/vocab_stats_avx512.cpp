// The vocabulary kernels built for the avx512 instruction set (flags in CMakeLists.txt).
#define PYOPD_CPU_NS cpu_avx512
#include "vocab_stats_impl.h"
