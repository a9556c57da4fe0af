// signals CUDA kernels
#include "pyopd/signals.h"
