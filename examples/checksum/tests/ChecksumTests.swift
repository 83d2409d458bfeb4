import CChecksum
import Checksum
import XCTest

final class ChecksumTests: XCTestCase {
    func testCRC32CheckValue() {
        // The standard check value of CRC-32/ISO-HDLC.
        XCTAssertEqual(Checksum.crc32(Array("123456789".utf8)), 0xCBF4_3926)
        XCTAssertEqual(Checksum.hex(Checksum.crc32(Array("123456789".utf8))), "cbf43926")
    }

    func testAdler32() {
        XCTAssertEqual(Checksum.adler32(Array("Wikipedia".utf8)), 0x11E6_0398)
        XCTAssertEqual(Checksum.adler32([UInt8]()), 1)
    }

    func testRunningCRCInCallsTheCLibraryDirectly() {
        let whole = Array("treemat stages C headers too".utf8)
        let first = whole.withUnsafeBytes { checksum_crc32(CHECKSUM_CRC32_INIT, $0.baseAddress, 8) }
        let both = whole.withUnsafeBytes { checksum_crc32(first, $0.baseAddress! + 8, whole.count - 8) }
        XCTAssertEqual(both, Checksum.crc32(whole))
    }

    func testThePolynomialDefineReachesSwift() {
        XCTAssertEqual(checksum_polynomial, 0xEDB8_8320)  // -Xcc -DCHECKSUM_POLYNOMIAL=...
        XCTAssertEqual(checksum_table_entry(1), 0x7707_3096)
    }
}
