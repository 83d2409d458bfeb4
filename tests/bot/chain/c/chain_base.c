#include "chain_base.h"

int chain_base_seed(int level) { return level * 7 + 3; }
