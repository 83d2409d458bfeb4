import Formatting
import Models

public struct Report {
    public let invoice: Invoice

    public init(invoice: Invoice) { self.invoice = invoice }

    public func render() -> String {
        var lines = ["Invoice for \(invoice.customer)"]
        lines += invoice.items.map { "  " + Money.line($0) }
        lines.append("Total: \(Money.format(cents: invoice.totalCents))")
        return lines.joined(separator: "\n")
    }
}
