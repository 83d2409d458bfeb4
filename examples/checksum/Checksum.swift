import CChecksum

/// Checksums of byte sequences, computed by the C library `CChecksum` (a cc_library imported as a module).
public enum Checksum {
    /// CRC-32 (IEEE), as zlib, PNG and Ethernet compute it.
    public static func crc32<Bytes: Sequence>(_ bytes: Bytes) -> UInt32 where Bytes.Element == UInt8 {
        let array = Array(bytes)
        return array.withUnsafeBytes { checksum_crc32(CHECKSUM_CRC32_INIT, $0.baseAddress, $0.count) }
    }

    /// Adler-32, as zlib streams end with it.
    public static func adler32<Bytes: Sequence>(_ bytes: Bytes) -> UInt32 where Bytes.Element == UInt8 {
        let array = Array(bytes)
        return array.withUnsafeBytes { checksum_adler32(CHECKSUM_ADLER32_INIT, $0.baseAddress, $0.count) }
    }

    /// Eight lower-case hex digits.
    public static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 8 - digits.count) + digits
    }
}
