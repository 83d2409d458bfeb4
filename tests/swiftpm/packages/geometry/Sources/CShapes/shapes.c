#include "CShapes.h"
#include "shapes_internal.h"  /* found through cSettings' headerSearchPath("internal") */
#include "shapes.macros"

#ifdef CSHAPES_APPLE
#error "CSHAPES_APPLE is defined for Apple platforms only"
#endif

int cshapes_scaled_area(int width, int height) { return CSHAPES_MUL(width * height, CSHAPES_SCALE); }

int cshapes_scale(void) { return CSHAPES_SCALE; }

int cshapes_sum(const int *_Nonnull values, int count) {
    int sum = 0;
    for (int i = 0; i < count; i++) sum = CSHAPES_ADD(sum, values[i]);
    return sum;
}
