import CShapes
import FastMath
import Foundation

public struct Point: Equatable, Sendable {
    public var x: Double
    public var y: Double

    public init(x: Double, y: Double) {
        self.x = x
        self.y = y
    }
}

/// A global mutable variable: an error in Swift 6 mode, so this compiles only in the target's Swift 5 mode.
public var measurements = 0

public func distance(_ a: Point, _ b: Point) -> Double {
    measurements += 1
    return FastMath.hypot(a.x - b.x, a.y - b.y)
}

public func scaledArea(width: Int, height: Int) -> Int {
    Int(cshapes_scaled_area(Int32(width), Int32(height)))
}

public func reducedRatio(_ a: Int, _ b: Int) -> (Int, Int) {
    let divisor = FastMath.gcd(a, b)
    return (a / divisor, b / divisor)
}

public var platformName: String {
    #if GEOMETRY_LINUX
    return "linux"
    #elseif GEOMETRY_APPLE
    return "apple"
    #else
    return "unknown"
    #endif
}

/// SwiftPM's debug configuration is Bazel's fastbuild and dbg; its release is `-c opt`.
public var buildConfiguration: String {
    #if GEOMETRY_DEBUG
    return "debug"
    #else
    return "release"
    #endif
}

// Needs the experimental feature Extern (swiftSettings).
@_extern(c, "abs")
func cAbs(_ value: Int32) -> Int32

public func absolute(_ value: Int) -> Int { Int(cAbs(Int32(value))) }

/// The copied resource, through SwiftPM's `Bundle.module` (under Bazel: the one treemat's rules generate).
public var unitName: String {
    guard let url = Bundle.module.url(forResource: "unit", withExtension: "txt"),
          let text = try? String(contentsOf: url, encoding: .utf8)
    else { return "missing" }
    return text.trimmingCharacters(in: .whitespacesAndNewlines)
}
