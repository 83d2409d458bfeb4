// Not in the target's `sources`: never compiled.
#error("NotListed.swift is not a source of Geometry")
