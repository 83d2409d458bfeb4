import lib
print(answer())
