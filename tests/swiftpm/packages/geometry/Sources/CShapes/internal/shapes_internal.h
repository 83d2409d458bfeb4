#ifndef SHAPES_INTERNAL_H
#define SHAPES_INTERNAL_H

#define CSHAPES_MUL(a, b) ((a) * (b))

#endif
