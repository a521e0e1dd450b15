#pragma once
#include "emu.h"
#include <functional>
// Runs `body` (a kernel call) for every thread of every block of the grid.
void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &body);
