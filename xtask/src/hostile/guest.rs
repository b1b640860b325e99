//! The hostile guest: speaks the wire format on its own Unix socket and runs one attack.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use vstream_wire::frame::{encode, Decoder, Kind, MAX_PAYLOAD_LIMIT};
use vstream_wire::hello::{caps, VERSION};
use vstream_wire::{Config, Hello, Role};

use super::Attack;

/// A connection of the hostile guest: its sequence numbers and a batch being built.
struct Peer {
    stream: UnixStream,
    seq: u32,
    ack: u32,
    next_channel: u32,
    out: Vec<u8>,
}

impl Peer {
    /// Connects and completes the handshake as guest `name` (session `session`).
    fn connect(sock: &Path, name: &str, session: u64) -> io::Result<Peer> {
        let mut stream = UnixStream::connect(sock)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut d = Decoder::new(MAX_PAYLOAD_LIMIT);
        let mut buf = [0u8; 4096];
        let host = loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Err(ErrorKind::UnexpectedEof.into());
            }
            d.push(&buf[..n]);
            if let Some(Ok(f)) = d
                .by_ref()
                .find(|f| f.as_ref().is_ok_and(|f| f.header.kind == Kind::Hello as u8))
            {
                break Hello::decode(&f.payload).map_err(io::Error::other)?;
            }
        };
        let hello = Hello {
            version: VERSION,
            role: Role::Guest,
            caps: caps::RESUME,
            my_session: session,
            your_session: host.my_session,
            recv_next: 0,
            max_frame: 64 * 1024,
            link: 0x5EED_0001,
            echo: host.link,
            name: name.into(),
        };
        let mut out = Vec::new();
        encode(&mut out, Kind::Hello as u8, 0, 0, 0, &hello.encode());
        stream.write_all(&out)?;
        stream.set_write_timeout(Some(Duration::from_millis(100)))?;
        Ok(Peer {
            stream,
            seq: 0,
            ack: 0,
            next_channel: 1,
            out: Vec::new(),
        })
    }

    fn frame(&mut self, kind: Kind, channel: u32, payload: &[u8]) {
        encode(
            &mut self.out,
            kind as u8,
            channel,
            self.seq,
            self.ack,
            payload,
        );
        self.seq = self.seq.wrapping_add(1);
    }

    /// Opens a channel to `class`/`name` offering `window`; returns its id.
    fn open(&mut self, class: &str, name: &str, window: u32) -> u32 {
        let id = self.next_channel;
        self.next_channel += 2;
        let mut p = vec![class.len() as u8];
        p.extend_from_slice(class.as_bytes());
        p.push(name.len() as u8);
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&window.to_le_bytes());
        self.frame(Kind::Open, id, &p);
        id
    }

    /// Writes the batch; false once the attack should end (stopped, or the link is gone).
    fn flush(&mut self, stop: &AtomicBool, sent: &Mutex<u64>) -> bool {
        let mut at = 0;
        while at < self.out.len() {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            match self.stream.write(&self.out[at..]) {
                Ok(0) => return false,
                Ok(n) => at += n,
                // vstreamd does not read: exactly what some attacks want. Keep trying.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return false,
            }
        }
        *sent.lock().unwrap_or_else(|e| e.into_inner()) += at as u64;
        self.out.clear();
        true
    }
}

/// Reads and throws away whatever vstreamd sends, until the connection ends.
fn drain(stream: &UnixStream) -> io::Result<thread::JoinHandle<()>> {
    let mut r = stream.try_clone()?;
    r.set_read_timeout(None)?;
    Ok(thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
    }))
}

/// The hostile guest: runs `attack` until `stop`, reconnecting when vstreamd closes the link.
pub(super) fn hostile_guest(sock: &Path, attack: Attack, stop: &AtomicBool, sent: &Mutex<u64>) {
    // A fresh session per connection: a resumed one would need the old sequence numbers.
    let mut session = 0xE711_0000_0000_0000 | (u64::from(attack as u8) << 32);
    while !stop.load(Ordering::Relaxed) {
        session += 1;
        let Ok(mut peer) = Peer::connect(sock, &attack.guest(), session) else {
            thread::sleep(Duration::from_millis(50));
            continue;
        };
        let drainer = match attack {
            Attack::Garbage | Attack::CrcBomb | Attack::CreditLie => drain(&peer.stream).ok(),
            Attack::Churn | Attack::Fill => None, // Never reads.
        };
        attack_once(&mut peer, attack, stop, sent);
        let _ = peer.stream.shutdown(std::net::Shutdown::Both);
        if let Some(d) = drainer {
            let _ = d.join();
        }
    }
}

fn attack_once(peer: &mut Peer, attack: Attack, stop: &AtomicBool, sent: &Mutex<u64>) {
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    match attack {
        Attack::Churn => loop {
            for _ in 0..500 {
                let id = peer.open("diag", "echo", 1 << 20);
                peer.frame(Kind::Reset, id, &[6, 0]);
                peer.open("no-such-class", "x", 1 << 20);
            }
            if !peer.flush(stop, sent) {
                return;
            }
        },
        Attack::Fill => {
            // Channels that offer us no window: everything echoed stays in vstreamd.
            let window = Config::new(Role::Host, "").channel_window as usize;
            for _ in 0..256 {
                let id = peer.open("diag", "echo", 0);
                let chunk = vec![0xF1u8; 64 * 1024];
                for _ in 0..window / chunk.len() {
                    peer.frame(Kind::Data, id, &chunk);
                }
                if !peer.flush(stop, sent) {
                    return;
                }
            }
            while !stop.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(20));
            }
        }
        Attack::Garbage => loop {
            for _ in 0..64 {
                let mut frame = Vec::new();
                encode(&mut frame, Kind::Data as u8, 1, peer.seq, 0, &[0x77; 100]);
                let i = (random() as usize) % frame.len();
                frame[i] ^= 0x10;
                peer.out.extend_from_slice(&frame);
                peer.out.extend((0..200).map(|_| random() as u8));
                peer.out.extend_from_slice(&[0xA9, 0x5C]);
            }
            if !peer.flush(stop, sent) {
                return;
            }
        },
        Attack::CrcBomb => {
            let mut header = Vec::new();
            encode(&mut header, Kind::Data as u8, 1, 0, 0, &[0u8; 64 * 1024]);
            header.truncate(24);
            loop {
                for _ in 0..2048 {
                    peer.out.extend_from_slice(&header);
                }
                if !peer.flush(stop, sent) {
                    return;
                }
            }
        }
        Attack::CreditLie => {
            let window = Config::new(Role::Host, "").channel_window as usize;
            let mut ids = Vec::new();
            loop {
                // New channels as old ones are reset (data beyond credit) or refused (limit).
                for _ in 0..8 {
                    ids.push(peer.open("diag", "echo", u32::MAX));
                }
                let recent = ids.len().saturating_sub(64);
                for &id in &ids[recent..] {
                    // Within the credit vstreamd grants: the echo sends it all back to us.
                    peer.frame(Kind::Data, id, &vec![0xC1u8; window / 4]);
                    peer.frame(Kind::Credit, id, &u32::MAX.to_le_bytes());
                }
                if !peer.flush(stop, sent) {
                    return;
                }
            }
        }
    }
}
