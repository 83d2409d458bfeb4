import XCTest
import TallyCore

final class TallyXCTests: XCTestCase {
    func testCountsWordsCaseInsensitively() {
        let tally = Tally(tokens: ["To", "be,", "or", "not", "to", "be."])
        XCTAssertEqual(tally.wordCount, 6)
        XCTAssertEqual(tally.counts["to"], 2)
        XCTAssertEqual(tally.counts["be"], 2)
    }

    func testNumbersAreSummedNotCounted() {
        let tally = Tally(tokens: ["3", "apples", "-4", "pears"])
        XCTAssertEqual(tally.sum, -1)
        XCTAssertEqual(tally.magnitude, 7)
        XCTAssertEqual(tally.wordCount, 2)
    }

    func testTopOrdersByCountThenWord() async {
        let tally = Tally(tokens: "b a c b a b".split(separator: " ").map(String.init))
        XCTAssertEqual(tally.top(2).map(\.word), ["b", "a"])
    }
}
