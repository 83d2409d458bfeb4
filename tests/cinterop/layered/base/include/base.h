#ifndef LAYERED_BASE_H
#define LAYERED_BASE_H
enum layered_kind { LAYERED_NONE, LAYERED_SOME };
int layered_base(void);
#endif
