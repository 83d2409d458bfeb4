#ifndef CHAIN_BASE_H
#define CHAIN_BASE_H

/* The C base of the remote chain: level 0 of every Swift module chain above calls it. */
int chain_base_seed(int level);

#endif
