// The vocabulary kernels built for the avx2 instruction set (flags in CMakeLists.txt).
#define PYOPD_CPU_NS cpu_avx2
#include "vocab_stats_impl.h"
