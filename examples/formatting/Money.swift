import Models

public enum Money {
    /// 12345 -> "$123.45"
    public static func format(cents: Int) -> String {
        let dollars = cents / 100
        let rest = cents % 100
        return "$\(dollars)." + (rest < 10 ? "0\(rest)" : "\(rest)")
    }

    public static func line(_ item: LineItem) -> String {
        "\(item.quantity) x \(item.name) @ \(format(cents: item.unitCents))"
    }
}
