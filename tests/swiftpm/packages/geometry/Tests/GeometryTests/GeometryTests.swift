import CShapes
import Geometry
import XCTest

final class GeometryTests: XCTestCase {
    func testDistance() {
        XCTAssertEqual(distance(Point(x: 0, y: 0), Point(x: 3, y: 4)), 5)
    }

    func testCModuleDirectly() {
        XCTAssertEqual(cshapes_scale(), 2)
        XCTAssertEqual(scaledArea(width: 3, height: 5), 30)
    }

    func testRatioThroughTheOtherPackage() {
        XCTAssertTrue(reducedRatio(12, 18) == (2, 3))
    }

    func testLinuxSettingKept() {
        XCTAssertEqual(platformName, "linux")
    }
}
