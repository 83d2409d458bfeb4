// The CRC-32 lookup table (a separate library: a C module that another C module depends on).
#ifndef TREEMAT_EXAMPLES_CHECKSUM_TABLE_H
#define TREEMAT_EXAMPLES_CHECKSUM_TABLE_H

#include <stdint.h>

#ifndef CHECKSUM_POLYNOMIAL
#error "CHECKSUM_POLYNOMIAL is a define of the checksum_table library: every compile including this header gets it"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/// The reflected polynomial the table is built with (Swift sees it as a constant).
static const uint32_t checksum_polynomial = CHECKSUM_POLYNOMIAL;

/// Entry `index` (0-255) of the reflected CRC-32 table for polynomial CHECKSUM_POLYNOMIAL (a define of the
/// library, so it reaches every compile that includes this header, Swift's too).
uint32_t checksum_table_entry(uint8_t index);

#ifdef __cplusplus
}
#endif

#endif
