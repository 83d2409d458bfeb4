#include "ext.h"
int layered_ext(enum layered_kind kind) { return layered_base() + (int)kind; }
