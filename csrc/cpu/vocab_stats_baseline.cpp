// The vocabulary kernels built for the baseline instruction set (flags in CMakeLists.txt).
#define PYOPD_CPU_NS cpu_baseline
#include "vocab_stats_impl.h"
