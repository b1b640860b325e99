//! vstreamd's descriptor-chain walker (crates/vhost) on a driver that writes anything into its
//! descriptor table and available ring: loops, indexes beyond the queue, addresses outside
//! guest memory or overflowing, wrong directions, indirect tables, avail.idx jumping ahead.
//! Nothing panics; every chain accepted lies inside guest memory; every refused chain is
//! returned to the driver (never leaked), unless the queue itself is broken (NEEDS_RESET).
#![no_main]
use libfuzzer_sys::fuzz_target;
use vstream_vhost::testing::{Rig, MEM_SIZE};

const SIZE: u16 = 16;

fn u64_at(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let mut rig = Rig::new(1, SIZE);
    // The first 16 bytes of each of up to SIZE records: one descriptor (addr, len, flags, next),
    // addresses folded near guest memory (and, when the top bit is set, left wild).
    let (table, rest) = data.split_at(data.len().min(usize::from(SIZE) * 16));
    for (i, d) in table.chunks_exact(16).enumerate() {
        let raw = u64_at(d);
        let addr = if raw >> 63 == 1 {
            raw
        } else {
            raw % (MEM_SIZE + 4096)
        };
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap()) % (1 << 17);
        let flags = u16::from_le_bytes([d[12], d[13]]) & 0x7;
        let next = u16::from_le_bytes([d[14], d[15]]) % (SIZE * 2);
        rig.write_desc(0, i as u16, addr, len, flags, next);
    }
    // Then heads to offer (two bytes each); an odd last byte makes avail.idx jump ahead by it.
    let mut offered = 0u16;
    for h in rest.chunks_exact(2) {
        rig.make_available(0, u16::from_le_bytes([h[0], h[1]]) % (SIZE * 2));
        offered += 1;
    }
    if rest.len() % 2 == 1 {
        rig.set_avail_idx(0, offered.wrapping_add(u16::from(rest[rest.len() - 1])));
    }
    let got = rig.pop_all(0);
    let refused = got.iter().filter(|c| c.is_err()).count();
    // Counted before the chains are written: a chain may point at the rings themselves.
    if !rig.broken {
        assert_eq!(
            rig.take_used(0).len(),
            refused,
            "refused chains are returned"
        );
    }
    for chain in got.into_iter().flatten() {
        for r in chain.readable.iter().chain(&chain.writable) {
            let end = r.addr.0.checked_add(u64::from(r.len));
            assert!(
                r.len > 0 && end.is_some_and(|e| e <= MEM_SIZE),
                "{r:?} is outside guest memory"
            );
        }
        let bytes = chain
            .read_all(&rig.mem, 1 << 22)
            .expect("a checked chain is readable");
        let readable: u64 = chain.readable.iter().map(|r| u64::from(r.len)).sum();
        assert_eq!(bytes.len() as u64, readable);
        let room = chain.writable_len() as usize;
        let written = chain.write(&rig.mem, &[&vec![0xA5; room]]).expect("fits");
        assert_eq!(written as usize, room);
    }
});
