import XCTest
final class SpacedTests: XCTestCase { func testNothing() {} }
