#ifndef FASTMATH_H
#define FASTMATH_H

#include <stdint.h>

int64_t fm_gcd(int64_t a, int64_t b);
double fm_hypot(double x, double y);
int fm_is_fast(void);

#endif
