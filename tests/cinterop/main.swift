import Top
print(topValue())
