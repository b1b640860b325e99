//! The userspace PPP endpoint (ppp tun backend) on arbitrary bytes from the peer: HDLC
//! deframing, LCP/IPCP negotiation, IP delivery. No panic; bounded output.
#![no_main]
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vstream_devices::ppp::proto::{Deframer, Endpoint, EndpointConfig};

fuzz_target!(|data: &[u8]| {
    let mut deframer = Deframer::new(1500);
    deframer.push(data, |frame| {
        if let Ok(f) = frame {
            assert!(f.info.len() <= 1500 + 8);
        }
    });
    let now = Instant::now();
    let cfg = EndpointConfig::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 1500, 7);
    let mut ep = Endpoint::new(cfg, now);
    let mut out = Vec::new();
    for (i, chunk) in data.chunks(64).enumerate() {
        let t = now + Duration::from_millis(i as u64 * 100);
        ep.handle_input(chunk, t);
        ep.handle_timeout(t);
        while ep.poll_event().is_some() {}
        out.clear();
        ep.poll_transmit(&mut out);
    }
});
