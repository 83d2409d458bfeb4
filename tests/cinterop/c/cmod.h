#ifndef CMOD_H
#define CMOD_H
#include "table.h"
int cmod_value(void);
#endif
