#include "fastmath.h"

#include <math.h>

int64_t fm_gcd(int64_t a, int64_t b) {
    while (b != 0) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a < 0 ? -a : a;
}

double fm_hypot(double x, double y) { return hypot(x, y); }

int fm_is_fast(void) { return FM_FAST; }
