// CRC-32 (IEEE 802.3, as zlib and PNG use it) and Adler-32, in plain C: the C module of the Swift demo.
#ifndef TREEMAT_EXAMPLES_CHECKSUM_H
#define TREEMAT_EXAMPLES_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

#include "checksum_table.h"

#ifdef __cplusplus
extern "C" {
#endif

/// Start value of a running CRC-32 or Adler-32.
#define CHECKSUM_CRC32_INIT 0u
#define CHECKSUM_ADLER32_INIT 1u

/// CRC-32 of `length` bytes at `data`, continuing from `crc` (CHECKSUM_CRC32_INIT to start).
uint32_t checksum_crc32(uint32_t crc, const void *data, size_t length);

/// Adler-32 of `length` bytes at `data`, continuing from `adler` (CHECKSUM_ADLER32_INIT to start).
uint32_t checksum_adler32(uint32_t adler, const void *data, size_t length);

#ifdef __cplusplus
}
#endif

#endif
