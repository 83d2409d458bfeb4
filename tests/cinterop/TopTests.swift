import Top
import XCTest
final class TopTests: XCTestCase { func testValue() { XCTAssertEqual(topValue(), 10) } }
