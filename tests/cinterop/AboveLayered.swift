import CLayeredExt
import Layered

public func aboveLayered() -> Int32 { layered() + layered_ext(LAYERED_NONE) }
