// `@_extern(c)` binds a C function without a module map; it needs `-enable-experimental-feature Extern`
// (see the BUILD file's copts).
@_extern(c, "abs")
func cAbs(_ value: Int32) -> Int32
