// signals CPU kernels
#include "pyopd/signals.h"
