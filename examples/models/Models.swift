public struct Invoice {
    public let customer: String
    public let items: [LineItem]

    public init(customer: String, items: [LineItem]) {
        self.customer = customer
        self.items = items
    }

    public var totalCents: Int { items.reduce(0) { $0 + $1.quantity * $1.unitCents } }
}

public struct LineItem {
    public let name: String
    public let quantity: Int
    public let unitCents: Int

    public init(name: String, quantity: Int, unitCents: Int) {
        self.name = name
        self.quantity = quantity
        self.unitCents = unitCents
    }
}
