import Models
import Reports

let invoice = Invoice(customer: "Ada", items: [
    LineItem(name: "clonefile", quantity: 3, unitCents: 150),
    LineItem(name: "reflink", quantity: 2, unitCents: 1005),
])
print(Report(invoice: invoice).render())
