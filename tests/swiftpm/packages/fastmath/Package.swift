// swift-tools-version:5.9
// A dependency of ../geometry: a C target with its own module map under a Swift library.
import PackageDescription

let package = Package(
    name: "FastMath",
    products: [
        .library(name: "FastMath", targets: ["FastMath"]),
    ],
    targets: [
        .target(
            name: "CFastMath",
            cSettings: [.define("FM_FAST", to: "1")],
            linkerSettings: [.linkedLibrary("m")]
        ),
        .target(name: "FastMath", dependencies: ["CFastMath"]),
        .testTarget(name: "FastMathTests", dependencies: ["FastMath"]),
    ]
)
