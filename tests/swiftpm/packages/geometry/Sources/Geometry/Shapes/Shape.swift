public protocol Shape {
    var area: Double { get }
}

public struct Rectangle: Shape {
    public var width: Double
    public var height: Double

    public init(width: Double, height: Double) {
        self.width = width
        self.height = height
    }

    public var area: Double { width * height }
}

/// `any Shape`: required by the upcoming feature ExistentialAny.
public func totalArea(_ shapes: [any Shape]) -> Double {
    shapes.reduce(0) { $0 + $1.area }
}
