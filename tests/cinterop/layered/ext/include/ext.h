#ifndef LAYERED_EXT_H
#define LAYERED_EXT_H
#include "base.h"
int layered_ext(enum layered_kind kind);
#endif
