import CMod
import COwn
public func libValue() -> Int { Int(cmod_value() + own_value()) }
