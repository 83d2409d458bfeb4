import XCTest
@testable import Lib
final class LibTests: XCTestCase { func testAnswer() { XCTAssertEqual(answer(), 42) } }
