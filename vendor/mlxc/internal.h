// Shared between the C++ sources of mlxc (not part of the C ABI).
#ifndef MLXC_INTERNAL_H
#define MLXC_INTERNAL_H

#include <string>

namespace mlxc {
// Sets the thread-local text that mlxc_last_error() returns.
void set_last_error(const std::string& message);
}  // namespace mlxc

#endif
