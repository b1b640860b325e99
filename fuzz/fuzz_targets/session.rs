//! A host session fed a valid handshake followed by arbitrary bytes: no panic, bounded state.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vstream_wire::frame::encode;
use vstream_wire::{Config, Hello, Kind, LinkParams, Recv, Role, Session};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut cfg = Config::new(Role::Host, "host");
    cfg.max_frame = 2048;
    cfg.channel_window = 4096;
    cfg.max_channels = 8;
    let mut s = Session::new(cfg, 1, now);
    let link = s.add_link(LinkParams::stream(0), now);
    let hello = Hello {
        version: 1, role: Role::Guest, caps: 1, my_session: 2, your_session: 0,
        recv_next: 0, max_frame: 2048, link: 3, echo: 0, name: "fuzz".into(),
    };
    let mut wire = Vec::new();
    encode(&mut wire, Kind::Hello as u8, 0, 0, 0, &hello.encode());
    s.handle_input(link, &wire, now);
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    for (i, chunk) in data.chunks(97).enumerate() {
        let t = now + Duration::from_millis(i as u64 * 50);
        s.handle_input(link, chunk, t);
        s.handle_timeout(t);
        while s.poll_event().is_some() {}
        for id in s.channels().map(|c| c.id).collect::<Vec<_>>() {
            while let Ok(Recv::Data(_)) = s.recv(id, &mut buf) {}
        }
        out.clear();
        s.poll_transmit(link, t, &mut out, 1 << 16);
        assert!(s.channels().count() <= 8);
    }
});
