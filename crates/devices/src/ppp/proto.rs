//! A PPP endpoint as a sans-io state machine: async HDLC-like framing (RFC 1662), LCP (RFC 1661)
//! and IPCP (RFC 1332), enough to terminate a link from a real `pppd` without the kernel's PPP
//! driver. vstreamd uses it for `backend = "tun"` (hosts whose kernel has no `ppp_generic`, such
//! as many containers and micro-VMs): IP packets go to a TUN device instead of a `ppp0`.
//!
//! Bytes from the peer and the current time go in ([`Endpoint::handle_input`],
//! [`Endpoint::handle_timeout`]); bytes for the peer ([`Endpoint::poll_transmit`]) and events
//! ([`Endpoint::poll_event`]: up, IP packets, down) come out. The peer is untrusted: every
//! length is checked, frames are bounded, nothing panics.
//!
//! What it negotiates: it asks for its MRU, an ACCM of 0 (an 8-bit clean stream) and a magic
//! number, and accepts the peer's MRU, ACCM, magic number, protocol and address/control field
//! compression (it never compresses itself, and reads compressed frames). It offers no
//! authentication and rejects a request for it. IPCP gives the peer its configured address
//! (a peer asking for another one, or for none, gets a Configure-Nak with it) and rejects VJ
//! compression and DNS options. Other network protocols (IPv6CP, CCP, ...) get an LCP
//! Protocol-Reject. One endpoint is one link: once down it stays down.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

pub use super::hdlc::{encode_frame, Deframer, Frame, FrameError};
pub use super::packet::protocol;
use super::packet::*;

/// The smallest MRU a peer may ask for (RFC 1661 leaves it open; pppd's minimum).
pub const MIN_MRU: u16 = 128;

/// The largest MRU this endpoint asks for or accepts from the configuration.
pub const MAX_MRU: u16 = 16384;

/// How an endpoint behaves.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Our address.
    pub local: Ipv4Addr,
    /// The address the peer gets.
    pub remote: Ipv4Addr,
    /// The MRU we ask for (and the MTU we use at most), [`MIN_MRU`]..=[`MAX_MRU`].
    pub mru: u16,
    /// Our LCP magic number (non-zero; the caller draws it at random).
    pub magic: u32,
    /// Configure-Request and Terminate-Request retransmission interval.
    pub restart: Duration,
    /// Configure-Requests sent without an answer before giving up.
    pub max_configure: u32,
    /// Interval of LCP Echo-Requests once the link is up (none if zero).
    pub echo_interval: Duration,
    /// Unanswered Echo-Requests after which the link is declared dead.
    pub echo_failures: u32,
}

impl EndpointConfig {
    /// pppd's defaults: restart 3 s, 10 Configure-Requests, echo every 5 s, 4 failures.
    pub fn new(local: Ipv4Addr, remote: Ipv4Addr, mru: u16, magic: u32) -> EndpointConfig {
        EndpointConfig {
            local,
            remote,
            mru: mru.clamp(MIN_MRU, MAX_MRU),
            magic: if magic == 0 { 0x5650_5050 } else { magic },
            restart: Duration::from_secs(3),
            max_configure: 10,
            echo_interval: Duration::from_secs(5),
            echo_failures: 4,
        }
    }
}

/// What happened on the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// LCP and IPCP are open: IP packets flow.
    Up {
        /// Our address.
        local: Ipv4Addr,
        /// The peer's address.
        remote: Ipv4Addr,
        /// The largest IP packet to send (the peer's MRU, at most ours).
        mtu: u16,
    },
    /// An IPv4 packet from the peer.
    Packet(Vec<u8>),
    /// The link is down for good (this endpoint is finished).
    Down(String),
}

/// Counters, for logs and status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Good frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Frames dropped for a bad FCS, a bad header or a bad length.
    pub bad_frames: u64,
    /// IP packets received and sent.
    pub packets_in: u64,
    /// IP packets sent.
    pub packets_out: u64,
}

/// The states of one control protocol's automaton (RFC 1661 4.2), those a link that opens at
/// once and never restarts needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started (IPCP before LCP is open).
    Initial,
    /// Our Configure-Request is out, nothing acknowledged.
    ReqSent,
    /// Our request was acknowledged, the peer's not yet.
    AckRcvd,
    /// We acknowledged the peer's request, ours is not yet.
    AckSent,
    /// Both acknowledged.
    Opened,
}

/// One control protocol (LCP or IPCP): its state, identifiers and retransmission timer.
#[derive(Debug)]
struct Fsm {
    protocol: u16,
    state: State,
    next_id: u8,
    /// Identifier of our outstanding Configure-Request.
    req_id: u8,
    restart_at: Option<Instant>,
    tries: u32,
}

impl Fsm {
    fn new(protocol: u16) -> Fsm {
        Fsm {
            protocol,
            state: State::Initial,
            next_id: 1,
            req_id: 0,
            restart_at: None,
            tries: 0,
        }
    }

    fn id(&mut self) -> u8 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn name(&self) -> &'static str {
        if self.protocol == protocol::LCP {
            "LCP"
        } else {
            "IPCP"
        }
    }
}

/// Our LCP request's negotiable values.
#[derive(Debug, Clone, Copy)]
struct LcpWants {
    mru: Option<u16>,
    accm: Option<u32>,
    magic: Option<u32>,
}

/// A PPP endpoint; see the module documentation.
#[derive(Debug)]
pub struct Endpoint {
    cfg: EndpointConfig,
    deframer: Deframer,
    out: Vec<u8>,
    events: VecDeque<Event>,
    lcp: Fsm,
    ipcp: Fsm,
    wants: LcpWants,
    /// What the peer asked us to use when sending: its MRU and ACCM.
    peer_mru: u16,
    peer_accm: u32,
    /// The ACCM frames are sent with (all control characters until LCP is open).
    tx_accm: u32,
    echo_id: u8,
    echo_at: Option<Instant>,
    echo_outstanding: u32,
    up: bool,
    down: bool,
    stats: Stats,
}

impl Endpoint {
    /// A new endpoint; its first LCP Configure-Request is ready to send.
    pub fn new(cfg: EndpointConfig, now: Instant) -> Endpoint {
        let wants = LcpWants {
            mru: Some(cfg.mru),
            accm: Some(0),
            magic: Some(cfg.magic),
        };
        let mut e = Endpoint {
            deframer: Deframer::new(usize::from(cfg.mru.max(1500)) + 64),
            out: Vec::new(),
            events: VecDeque::new(),
            lcp: Fsm::new(protocol::LCP),
            ipcp: Fsm::new(protocol::IPCP),
            wants,
            peer_mru: 1500,
            peer_accm: u32::MAX,
            tx_accm: u32::MAX,
            echo_id: 0,
            echo_at: None,
            echo_outstanding: 0,
            up: false,
            down: false,
            stats: Stats::default(),
            cfg,
        };
        e.lcp.state = State::ReqSent;
        e.send_configure_request(protocol::LCP, now);
        e
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// True once LCP and IPCP are open (until down).
    pub fn is_up(&self) -> bool {
        self.up && !self.down
    }

    /// True once the link is down for good.
    pub fn is_down(&self) -> bool {
        self.down
    }

    /// Feeds bytes from the peer.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        if self.down {
            return;
        }
        let mut frames = Vec::new();
        self.deframer.push(data, |f| frames.push(f));
        for f in frames {
            match f {
                Ok(frame) => {
                    self.stats.frames_in += 1;
                    self.handle_frame(frame, now);
                }
                Err(_) => self.stats.bad_frames += 1,
            }
            if self.down {
                return;
            }
        }
    }

    /// Runs the timers due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.down {
            return;
        }
        let max_configure = self.cfg.max_configure;
        for proto in [protocol::LCP, protocol::IPCP] {
            let fsm = self.fsm(proto);
            if fsm.restart_at.is_some_and(|t| t <= now) {
                if fsm.tries >= max_configure {
                    let name = fsm.name();
                    let reason = format!(
                        "{name}: no agreement after {max_configure} Configure-Requests (is pppd running at the other end?)"
                    );
                    self.go_down(&reason, now);
                    return;
                }
                if fsm.state == State::AckRcvd {
                    fsm.state = State::ReqSent;
                }
                self.send_configure_request(proto, now);
            }
        }
        if self.echo_at.is_some_and(|t| t <= now) {
            if self.echo_outstanding >= self.cfg.echo_failures {
                let reason = format!(
                    "no answer to {} LCP echo requests: the peer is gone",
                    self.echo_outstanding
                );
                self.go_down(&reason, now);
                return;
            }
            self.echo_outstanding += 1;
            self.echo_id = self.echo_id.wrapping_add(1);
            let magic = self.wants.magic.unwrap_or(0).to_be_bytes();
            let p = build_packet(code::ECHO_REQUEST, self.echo_id, &magic);
            self.send(protocol::LCP, &p);
            self.echo_at = Some(now + self.cfg.echo_interval);
        }
    }

    /// When [`Endpoint::handle_timeout`] should run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.down {
            return None;
        }
        [self.lcp.restart_at, self.ipcp.restart_at, self.echo_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sends an IPv4 packet; false (and nothing sent) while the link is not up or if the packet
    /// is larger than the peer's MRU.
    pub fn send_ip(&mut self, packet: &[u8]) -> bool {
        if !self.is_up() || packet.len() > usize::from(self.peer_mru) {
            return false;
        }
        self.stats.packets_out += 1;
        self.send(protocol::IPV4, packet);
        true
    }

    /// Moves the bytes ready for the peer into `out` (appended).
    pub fn poll_transmit(&mut self, out: &mut Vec<u8>) {
        if out.is_empty() {
            std::mem::swap(out, &mut self.out);
        } else {
            out.append(&mut self.out);
        }
    }

    /// True if bytes wait for [`Endpoint::poll_transmit`].
    pub fn has_transmit(&self) -> bool {
        !self.out.is_empty()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Ends the link: sends an LCP Terminate-Request (once) and reports `Down`.
    pub fn close(&mut self, reason: &str, now: Instant) {
        if !self.down {
            self.go_down(reason, now);
        }
    }

    fn fsm(&mut self, proto: u16) -> &mut Fsm {
        if proto == protocol::LCP {
            &mut self.lcp
        } else {
            &mut self.ipcp
        }
    }

    fn send(&mut self, proto: u16, info: &[u8]) {
        // LCP always goes out with every control character escaped (RFC 1662 7.1).
        let accm = if proto == protocol::LCP {
            u32::MAX
        } else {
            self.tx_accm
        };
        encode_frame(&mut self.out, proto, info, accm);
        self.stats.frames_out += 1;
    }

    fn go_down(&mut self, reason: &str, _now: Instant) {
        if self.lcp.state != State::Initial {
            let id = self.lcp.id();
            let p = build_packet(code::TERMINATE_REQUEST, id, reason.as_bytes());
            self.send(protocol::LCP, &p);
        }
        self.down = true;
        self.up = false;
        self.lcp.restart_at = None;
        self.ipcp.restart_at = None;
        self.echo_at = None;
        self.events.push_back(Event::Down(reason.to_owned()));
    }

    fn send_configure_request(&mut self, proto: u16, now: Instant) {
        let mut opts = Vec::new();
        if proto == protocol::LCP {
            if let Some(mru) = self.wants.mru {
                push_option(&mut opts, lcp_opt::MRU, &mru.to_be_bytes());
            }
            if let Some(accm) = self.wants.accm {
                push_option(&mut opts, lcp_opt::ACCM, &accm.to_be_bytes());
            }
            if let Some(magic) = self.wants.magic {
                push_option(&mut opts, lcp_opt::MAGIC, &magic.to_be_bytes());
            }
        } else {
            push_option(&mut opts, ipcp_opt::IP_ADDRESS, &self.cfg.local.octets());
        }
        let restart = self.cfg.restart;
        let fsm = self.fsm(proto);
        let id = fsm.id();
        fsm.req_id = id;
        fsm.tries += 1;
        fsm.restart_at = Some(now + restart);
        let p = build_packet(code::CONFIGURE_REQUEST, id, &opts);
        self.send(proto, &p);
    }

    fn handle_frame(&mut self, frame: Frame, now: Instant) {
        match frame.protocol {
            protocol::LCP => self.handle_control(protocol::LCP, &frame.info, now),
            protocol::IPCP => {
                if self.lcp.state == State::Opened {
                    self.handle_control(protocol::IPCP, &frame.info, now);
                }
            }
            protocol::IPV4 => {
                if self.is_up() {
                    self.stats.packets_in += 1;
                    self.events.push_back(Event::Packet(frame.info));
                }
            }
            other => {
                // RFC 1661 5.7: only once LCP is open; the rejected packet is quoted, bounded by
                // the peer's MRU.
                if self.lcp.state == State::Opened {
                    let mut data = other.to_be_bytes().to_vec();
                    let room = usize::from(self.peer_mru).saturating_sub(6);
                    data.extend_from_slice(&frame.info[..frame.info.len().min(room)]);
                    let id = self.lcp.id();
                    let p = build_packet(code::PROTOCOL_REJECT, id, &data);
                    self.send(protocol::LCP, &p);
                }
            }
        }
    }

    fn handle_control(&mut self, proto: u16, info: &[u8], now: Instant) {
        let Some(p) = parse_packet(info) else {
            self.stats.bad_frames += 1;
            return;
        };
        match p.code {
            code::CONFIGURE_REQUEST => self.on_configure_request(proto, p.id, p.data, now),
            code::CONFIGURE_ACK => {
                let fsm = self.fsm(proto);
                if p.id != fsm.req_id {
                    return;
                }
                match fsm.state {
                    State::ReqSent => {
                        fsm.state = State::AckRcvd;
                        fsm.restart_at = None;
                        fsm.tries = 0;
                    }
                    State::AckSent => {
                        fsm.restart_at = None;
                        fsm.tries = 0;
                        self.opened(proto, now);
                    }
                    State::AckRcvd | State::Opened => {
                        // Crossed or renegotiating: start over.
                        self.restart(proto, now);
                    }
                    State::Initial => {}
                }
            }
            code::CONFIGURE_NAK | code::CONFIGURE_REJECT => {
                if p.id != self.fsm(proto).req_id {
                    return;
                }
                let Some(opts) = parse_options(p.data) else {
                    return;
                };
                if proto == protocol::LCP {
                    let reject = p.code == code::CONFIGURE_REJECT;
                    for (t, v) in opts {
                        match (t, reject) {
                            (lcp_opt::MRU, true) => self.wants.mru = None,
                            (lcp_opt::MRU, false) => {
                                if let Ok(b) = <[u8; 2]>::try_from(v) {
                                    let mru = u16::from_be_bytes(b);
                                    self.wants.mru = Some(mru.clamp(MIN_MRU, self.cfg.mru));
                                }
                            }
                            (lcp_opt::ACCM, true) => self.wants.accm = None,
                            (lcp_opt::ACCM, false) => {
                                if let Ok(b) = <[u8; 4]>::try_from(v) {
                                    self.wants.accm = Some(u32::from_be_bytes(b));
                                }
                            }
                            (lcp_opt::MAGIC, true) => self.wants.magic = None,
                            (lcp_opt::MAGIC, false) => {
                                let m = self.wants.magic.unwrap_or(self.cfg.magic);
                                self.wants.magic = Some(m.rotate_left(7) ^ 0x9e37_79b9);
                            }
                            _ => {}
                        }
                    }
                }
                // IPCP: our address is configured, not negotiable; the request is repeated
                // until the peer agrees or the retries run out.
                if self.fsm(proto).state == State::Opened {
                    self.restart(proto, now);
                } else {
                    let fsm = self.fsm(proto);
                    if fsm.state == State::AckRcvd {
                        fsm.state = State::ReqSent;
                    }
                    self.send_configure_request(proto, now);
                }
            }
            code::TERMINATE_REQUEST => {
                let p = build_packet(code::TERMINATE_ACK, p.id, &[]);
                self.send(proto, &p);
                if proto == protocol::LCP {
                    self.down = true;
                    self.up = false;
                    self.events
                        .push_back(Event::Down("the peer terminated the link".into()));
                } else {
                    self.go_down("the peer closed IPCP", now);
                }
            }
            code::TERMINATE_ACK => {}
            code::CODE_REJECT | code::PROTOCOL_REJECT => {
                // We send nothing optional; a peer rejecting LCP or IPCP cannot talk to us.
                if proto == protocol::LCP && p.code == code::PROTOCOL_REJECT {
                    if let [hi, lo, ..] = *p.data {
                        if u16::from_be_bytes([hi, lo]) == protocol::IPCP {
                            self.go_down("the peer rejected IPCP (no IPv4 on its side)", now);
                        }
                    }
                }
            }
            code::ECHO_REQUEST if proto == protocol::LCP => {
                if self.lcp.state == State::Opened {
                    let mut data = self.wants.magic.unwrap_or(0).to_be_bytes().to_vec();
                    data.extend_from_slice(p.data.get(4..).unwrap_or_default());
                    data.truncate(usize::from(self.peer_mru).saturating_sub(4));
                    let r = build_packet(code::ECHO_REPLY, p.id, &data);
                    self.send(protocol::LCP, &r);
                }
            }
            code::ECHO_REPLY if proto == protocol::LCP => {
                self.echo_outstanding = 0;
            }
            code::DISCARD_REQUEST if proto == protocol::LCP => {}
            _ => {
                let mut data = info.to_vec();
                data.truncate(usize::from(self.peer_mru).saturating_sub(4));
                let id = self.fsm(proto).id();
                let r = build_packet(code::CODE_REJECT, id, &data);
                self.send(proto, &r);
            }
        }
    }

    /// A renegotiation started by the peer or by crossed packets: the link goes down to LCP or
    /// IPCP negotiation again.
    fn restart(&mut self, proto: u16, now: Instant) {
        if proto == protocol::LCP && self.lcp.state == State::Opened {
            self.ipcp.state = State::Initial;
            self.ipcp.restart_at = None;
            self.tx_accm = u32::MAX;
        }
        self.up = false;
        let fsm = self.fsm(proto);
        fsm.state = State::ReqSent;
        fsm.tries = 0;
        self.send_configure_request(proto, now);
    }

    fn on_configure_request(&mut self, proto: u16, id: u8, data: &[u8], now: Instant) {
        let Some(opts) = parse_options(data) else {
            return;
        };
        let mut nak = Vec::new();
        let mut rej = Vec::new();
        let mut mru = 1500u16;
        let mut accm = u32::MAX;
        let mut has_address = false;
        for &(t, v) in &opts {
            if proto == protocol::LCP {
                match (t, v.len()) {
                    (lcp_opt::MRU, 2) => {
                        let m = u16::from_be_bytes([v[0], v[1]]);
                        if m < MIN_MRU {
                            push_option(&mut nak, t, &MIN_MRU.to_be_bytes());
                        } else {
                            mru = m;
                        }
                    }
                    (lcp_opt::ACCM, 4) => accm = u32::from_be_bytes([v[0], v[1], v[2], v[3]]),
                    (lcp_opt::MAGIC, 4) => {
                        let m = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
                        if m == 0 || Some(m) == self.wants.magic {
                            // Zero is invalid; our own number means a looped-back line or bad luck.
                            let other = self.cfg.magic.rotate_left(13) ^ 0x5a5a_5a5a;
                            push_option(&mut nak, t, &other.to_be_bytes());
                        }
                    }
                    (lcp_opt::PFC, 0) | (lcp_opt::ACFC, 0) => {}
                    _ => push_option(&mut rej, t, v),
                }
            } else {
                match (t, v.len()) {
                    (ipcp_opt::IP_ADDRESS, 4) => {
                        has_address = true;
                        if v != self.cfg.remote.octets() {
                            push_option(&mut nak, t, &self.cfg.remote.octets());
                        }
                    }
                    _ => push_option(&mut rej, t, v),
                }
            }
        }
        if proto == protocol::IPCP && !has_address && rej.is_empty() && nak.is_empty() {
            // A peer that asks for no address is told which one to use (RFC 1661 5.3).
            push_option(&mut nak, ipcp_opt::IP_ADDRESS, &self.cfg.remote.octets());
        }
        let was_opened = self.fsm(proto).state == State::Opened;
        if was_opened {
            // The peer renegotiates: we go back to negotiating too.
            self.restart(proto, now);
        }
        let acked = rej.is_empty() && nak.is_empty();
        let reply = if !rej.is_empty() {
            build_packet(code::CONFIGURE_REJECT, id, &rej)
        } else if !nak.is_empty() {
            build_packet(code::CONFIGURE_NAK, id, &nak)
        } else {
            build_packet(code::CONFIGURE_ACK, id, data)
        };
        self.send(proto, &reply);
        if proto == protocol::LCP && acked {
            self.peer_mru = mru;
            self.peer_accm = accm;
        }
        let fsm = self.fsm(proto);
        match (fsm.state, acked) {
            (State::ReqSent, true) => fsm.state = State::AckSent,
            (State::AckRcvd, true) => self.opened(proto, now),
            (State::AckSent, false) => fsm.state = State::ReqSent,
            (State::Initial, _) => {
                // IPCP before we started it cannot happen (LCP opens it first); ignore.
            }
            _ => {}
        }
    }

    fn opened(&mut self, proto: u16, now: Instant) {
        let fsm = self.fsm(proto);
        fsm.state = State::Opened;
        fsm.restart_at = None;
        fsm.tries = 0;
        if proto == protocol::LCP {
            self.tx_accm = self.peer_accm;
            self.echo_outstanding = 0;
            if !self.cfg.echo_interval.is_zero() {
                self.echo_at = Some(now + self.cfg.echo_interval);
            }
            self.ipcp.state = State::ReqSent;
            self.ipcp.tries = 0;
            self.send_configure_request(protocol::IPCP, now);
        } else {
            self.up = true;
            let mtu = self.peer_mru.min(self.cfg.mru);
            self.events.push_back(Event::Up {
                local: self.cfg.local,
                remote: self.cfg.remote,
                mtu,
            });
        }
    }
}
