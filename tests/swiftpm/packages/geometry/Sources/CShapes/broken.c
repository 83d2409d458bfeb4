#error "excluded in Package.swift: never compiled"
