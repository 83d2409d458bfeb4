#include "base.h"
int layered_base(void) { return LAYERED_SOME; }
