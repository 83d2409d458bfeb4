#include "table.h"
int table_entry(int index) { return index * TABLE_SCALE; }
