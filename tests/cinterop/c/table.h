#ifndef TABLE_H
#define TABLE_H
int table_entry(int index);
#endif
