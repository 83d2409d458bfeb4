/// Word and number statistics over a stream of tokens.
public struct Tally: Sendable {
    /// How often each word occurred (normalised by `Tally.normalise`).
    public private(set) var counts: [String: Int] = [:]
    /// The numbers seen, in order.
    public private(set) var numbers: [Int] = []

    public init() {}

    public init<S: Sequence>(tokens: S) where S.Element == String {
        for token in tokens { add(token) }
    }

    /// Adds one token: a number goes to `numbers`, anything else is counted as a word.
    public mutating func add(_ token: String) {
        if let number = Int(token) {
            numbers.append(number)
        } else if !token.isEmpty {
            counts[Tally.normalise(token), default: 0] += 1
        }
    }

    /// Total number of words.
    public var wordCount: Int { counts.values.reduce(0, +) }

    /// Sum of the numbers.
    public var sum: Int { numbers.reduce(0, +) }

    /// The `limit` most frequent words, most frequent first, ties in alphabetical order.
    public func top(_ limit: Int) -> [(word: String, count: Int)] {
        let sorted = counts.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }
        return sorted.prefix(max(0, limit)).map { (word: $0.key, count: $0.value) }
    }

    /// Sum of absolute values, through C's `abs` (see Magnitude.swift).
    public var magnitude: Int { numbers.reduce(0) { $0 + Int(cAbs(Int32(clamping: $1))) } }
}
