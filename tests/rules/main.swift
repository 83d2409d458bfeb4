import Lib
print(answer())
