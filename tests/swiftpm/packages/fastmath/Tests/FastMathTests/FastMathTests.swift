import FastMath
import XCTest

final class FastMathTests: XCTestCase {
    func testGcd() {
        XCTAssertEqual(FastMath.gcd(12, 18), 6)
        XCTAssertEqual(FastMath.gcd(-4, 6), 2)
    }

    func testHypot() {
        XCTAssertEqual(FastMath.hypot(3, 4), 5)
    }

    func testCompiledWithTheDefine() {
        XCTAssertTrue(FastMath.isFast)
    }
}
