#include "cmod.h"
int cmod_value(void) { return table_entry(2); }
