#ifndef OWN_H
#define OWN_H
int own_value(void);
#endif
