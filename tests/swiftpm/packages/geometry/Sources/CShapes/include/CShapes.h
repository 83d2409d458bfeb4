#ifndef CSHAPES_H
#define CSHAPES_H

int cshapes_scaled_area(int width, int height);
int cshapes_scale(void);
/* clang's nullability qualifier, as real C targets use it (swift-nio's CNIOAtomics): gcc rejects it */
int cshapes_sum(const int *_Nonnull values, int count);

#endif
