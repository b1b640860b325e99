//! CRC-32C (Castagnoli), computed the way that is fastest on this CPU, as measured once.
//!
//! The crc32c crate uses the SSE4.2 `crc32` instruction whenever the CPU advertises it. QEMU's
//! TCG advertises it and emulates it one bit per step (target/i386 `helper_crc32`), several
//! times slower than a table; in a TCG guest the payload CRC of every frame on a virtio-serial
//! port and the files checksum were then a large part of the agent's CPU time per MiB. So the
//! first use times both on the same bytes and keeps the faster for the life of the process.
//! Both compute the same value (tests check it), so the choice costs only speed if the
//! measurement is disturbed.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The table implementation (slicing by 16; the `crc` crate's CRC-32/ISCSI is CRC-32C).
const TABLE: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// The CRC-32C of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

/// The CRC-32C of the bytes whose CRC is `crc` followed by `data`.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    if table_is_faster() {
        table_append(crc, data)
    } else {
        crc32c::crc32c_append(crc, data)
    }
}

fn table_append(crc: u32, data: &[u8]) -> u32 {
    // The digest's register is reflected and not yet inverted: a finished CRC `crc` is
    // `!register`, and `digest_with_initial` reflects the value it is given.
    let mut digest = TABLE.digest_with_initial((!crc).reverse_bits());
    digest.update(data);
    digest.finalize()
}

/// Measured on first use: the faster of two runs of each over 16 KiB (well under a
/// millisecond even where the instruction is emulated).
fn table_is_faster() -> bool {
    static CHOICE: OnceLock<bool> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        let data = [0x5au8; 16 * 1024];
        let time = |f: &dyn Fn(&[u8]) -> u32| -> Duration {
            (0..2)
                .map(|_| {
                    let start = Instant::now();
                    std::hint::black_box(f(std::hint::black_box(&data)));
                    start.elapsed()
                })
                .min()
                .unwrap_or_default()
        };
        let table = time(&|d| table_append(0, d));
        let native = time(&|d| crc32c::crc32c_append(0, d));
        table < native
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The table gives the crc32c crate's value, from any starting CRC.
        #[test]
        fn table_equals_the_crc32c_crate(
            start in any::<u32>(),
            data in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            prop_assert_eq!(table_append(start, &data), crc32c::crc32c_append(start, &data));
            prop_assert_eq!(crc32c_append(start, &data), crc32c::crc32c_append(start, &data));
        }
    }

    #[test]
    fn known_value() {
        // The CRC-32C check value (RFC 3720, B.4).
        assert_eq!(table_append(0, b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }
}
