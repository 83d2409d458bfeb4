import TallyCore

#if canImport(Glibc)
import Glibc
#endif

/// `tally <count|sum|top N|magnitude> [TOKEN...]`: statistics over the tokens (or stdin's words).
@main
struct TallyCommand {
    static let usage = "usage: tally count|sum|magnitude|top N [TOKEN...]   (no tokens: read stdin)"

    static func main() {
        var arguments = Array(CommandLine.arguments.dropFirst())
        guard let subcommand = arguments.first else { fail(usage) }
        arguments.removeFirst()
        var limit = 3
        if subcommand == "top" {
            guard let first = arguments.first, let value = Int(first) else { fail("tally top: needs a count N") }
            limit = value
            arguments.removeFirst()
        }
        let tally = Tally(tokens: arguments.isEmpty ? readTokens() : arguments)
        switch subcommand {
        case "count":
            print("\(tally.wordCount) words, \(tally.counts.count) distinct")
        case "sum":
            print(tally.sum)
        case "magnitude":
            print(tally.magnitude)
        case "top":
            for entry in tally.top(limit) { print("\(entry.count)\t\(entry.word)") }
        default:
            fail("tally: unknown subcommand \(subcommand)\n\(usage)")
        }
    }

    static func readTokens() -> [String] {
        var tokens: [String] = []
        while let line = readLine() {
            tokens += line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init)
        }
        return tokens
    }

    static func fail(_ message: String) -> Never {
        var line = message + "\n"
        line.withUTF8 { bytes in _ = write(2, bytes.baseAddress, bytes.count) }
        exit(2)
    }
}
