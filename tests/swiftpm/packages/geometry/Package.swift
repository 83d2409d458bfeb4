// swift-tools-version:6.0
// The fixture `treemat import` is tested on: a C target without a module map (an umbrella header), a Swift
// library in Swift 5 mode over it and over a product of another package (FastMath, given with --dep), an
// executable in a directory of its own, and XCTest tests that reach the C module directly.
import PackageDescription

let package = Package(
    name: "Geometry",
    products: [
        .library(name: "Geometry", targets: ["Geometry"]),
        .executable(name: "shapes", targets: ["shapes"]),
    ],
    dependencies: [
        .package(url: "https://example.invalid/fastmath.git", from: "1.0.0"),
    ],
    targets: [
        .target(
            name: "CShapes",
            exclude: ["broken.c"],
            cSettings: [
                .headerSearchPath("internal"),
                .define("CSHAPES_SCALE", to: "2"),
                .define("CSHAPES_APPLE", .when(platforms: [.macOS, .iOS])),
            ]
        ),
        .target(
            name: "Geometry",
            dependencies: ["CShapes", .product(name: "FastMath", package: "fastmath")],
            sources: ["Geometry.swift", "Shapes"],
            resources: [.copy("Resources/unit.txt")],
            swiftSettings: [
                .define("GEOMETRY_LINUX", .when(platforms: [.linux])),
                .define("GEOMETRY_APPLE", .when(platforms: [.macOS])),
                .define("GEOMETRY_DEBUG", .when(configuration: .debug)),
                .enableUpcomingFeature("ExistentialAny"),
                .enableExperimentalFeature("Extern"),
                .unsafeFlags(["-enforce-exclusivity=checked"]),
                .swiftLanguageMode(.v5),
            ]
        ),
        .executableTarget(name: "shapes", dependencies: ["Geometry"], path: "Sources/ShapesCLI"),
        .testTarget(name: "GeometryTests", dependencies: ["Geometry", "CShapes"]),
    ]
)
