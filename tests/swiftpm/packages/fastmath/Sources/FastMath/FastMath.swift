import CFastMath

public enum FastMath {
    public static func gcd(_ a: Int, _ b: Int) -> Int { Int(fm_gcd(Int64(a), Int64(b))) }

    public static func hypot(_ x: Double, _ y: Double) -> Double { fm_hypot(x, y) }

    /// `package`: visible to the other modules of this package only.
    package static var isFast: Bool { fm_is_fast() == 1 }
}
