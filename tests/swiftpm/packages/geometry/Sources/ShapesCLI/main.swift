import Geometry

print("distance: \(distance(Point(x: 0, y: 0), Point(x: 3, y: 4)))")
print("scaled area: \(scaledArea(width: 3, height: 5))")
let (numerator, denominator) = reducedRatio(12, 18)
print("ratio: \(numerator):\(denominator)")
print("total area: \(totalArea([Rectangle(width: 2, height: 3), Rectangle(width: 1, height: 1)]))")
print("absolute: \(absolute(-7))")
print("platform: \(platformName)")
print("configuration: \(buildConfiguration)")
print("unit: \(unitName)")
