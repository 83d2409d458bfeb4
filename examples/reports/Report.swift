import Checksum
import Formatting
import Models

public struct Report {
    public let invoice: Invoice

    public init(invoice: Invoice) { self.invoice = invoice }

    public func render() -> String {
        var lines = ["Invoice for \(invoice.customer)"]
        lines += invoice.items.map { "  " + Money.line($0) }
        lines.append("Total: \(Money.format(cents: invoice.totalCents))")
        // CRC-32 of the lines above, by the C library of //examples/checksum.
        lines.append("CRC-32: \(Checksum.hex(Checksum.crc32(Array(lines.joined(separator: "\n").utf8))))")
        return lines.joined(separator: "\n")
    }
}
