#ifndef CSHAPES_H
#define CSHAPES_H

int cshapes_scaled_area(int width, int height);
int cshapes_scale(void);

#endif
