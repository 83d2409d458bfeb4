import Lib
public func topValue() -> Int { libValue() }
