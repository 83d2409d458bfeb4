public let greeting = "hi"
