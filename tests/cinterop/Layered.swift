import CLayeredBase
import CLayeredExt

public func layered() -> Int32 { layered_ext(LAYERED_SOME) + layered_base() }
