#include "checksum.h"

uint32_t checksum_crc32(uint32_t crc, const void *data, size_t length) {
    const uint8_t *bytes = data;
    crc = ~crc;
    for (size_t i = 0; i < length; i++) {
        crc = checksum_table_entry((uint8_t)(crc ^ bytes[i])) ^ (crc >> 8);
    }
    return ~crc;
}

uint32_t checksum_adler32(uint32_t adler, const void *data, size_t length) {
    const uint8_t *bytes = data;
    uint32_t a = adler & 0xffff, b = adler >> 16;
    for (size_t i = 0; i < length; i++) {
        a = (a + bytes[i]) % 65521u;
        b = (b + a) % 65521u;
    }
    return (b << 16) | a;
}
