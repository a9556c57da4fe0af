// Trajectory scores, FiRe-OPD token weights, COPSD group advantages.
#pragma once

#include <cstdint>

#include "pyopd/common.h"

namespace pyopd {}  // namespace pyopd
