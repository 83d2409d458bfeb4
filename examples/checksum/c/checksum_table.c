#include "checksum_table.h"

static uint32_t table[256];
static int ready;

static void fill(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? (CHECKSUM_POLYNOMIAL ^ (c >> 1)) : (c >> 1);
        }
        table[n] = c;
    }
    ready = 1;
}

uint32_t checksum_table_entry(uint8_t index) {
    if (!ready) {
        fill();
    }
    return table[index];
}
