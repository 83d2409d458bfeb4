#include <string>
extern "C" {
#include "own.h"
}
extern "C" int own_value(void) { return static_cast<int>(std::string("four").size()); }
