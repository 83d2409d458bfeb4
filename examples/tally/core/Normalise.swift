extension Tally {
    /// Visible to every module of the same Swift package (the Bazel repository, by default), not outside it.
    package static func normalise(_ word: String) -> String {
        let trimmed = word.trimmingPunctuation()
        #if TALLY_CASE_INSENSITIVE
        return trimmed.lowercased()
        #else
        return trimmed
        #endif
    }
}

extension String {
    package func trimmingPunctuation() -> String {
        let punctuation: Set<Character> = [".", ",", ";", ":", "!", "?", "\"", "'", "(", ")"]
        var scalars = Substring(self)
        while let first = scalars.first, punctuation.contains(first) { scalars = scalars.dropFirst() }
        while let last = scalars.last, punctuation.contains(last) { scalars = scalars.dropLast() }
        return String(scalars)
    }
}
