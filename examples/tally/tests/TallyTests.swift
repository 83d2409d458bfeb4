import Testing
import TallyCore

@Suite struct NormaliseTests {
    // `package` access: same Swift package (this Bazel repository), different module.
    @Test func stripsPunctuationAndCase() {
        #expect(Tally.normalise("\"Hello!\"") == "hello")
    }

    @Test(arguments: [0, 1, 5])
    func topNeverReturnsMoreThanAsked(limit: Int) {
        let tally = Tally(tokens: ["x", "y", "z", "x"])
        #expect(tally.top(limit).count == min(limit, 3))
    }
}
