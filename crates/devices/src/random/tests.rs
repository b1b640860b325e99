use std::time::{Duration, Instant};

use super::guest::PoolLevel;
use super::*;

#[test]
fn requests_round_trip_and_bounds_are_enforced() {
    let r = Request::new(4096).expect("valid");
    assert_eq!(r.encode(), [0x00, 0x10, 0, 0]);
    assert_eq!(Request::decode(r.encode()), Ok(r));
    assert_eq!(Request::decode([0; 4]), Err(RequestError::Empty));
    assert_eq!(
        Request::decode((MAX_REQUEST + 1).to_le_bytes()),
        Err(RequestError::TooLarge(MAX_REQUEST + 1))
    );
    assert_eq!(
        Request::decode([0xff; 4]),
        Err(RequestError::TooLarge(u32::MAX))
    );
    assert!(Request::decode(MAX_REQUEST.to_le_bytes()).is_ok());
}

#[test]
fn the_bucket_starts_full_then_refills_at_the_rate() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(1000, 500, t0);
    assert_eq!(b.take(t0, 800), 500, "a full bucket grants one burst");
    assert_eq!(b.take(t0, 1), 0);
    assert_eq!(b.wait(t0, 100), Some(Duration::from_millis(100)));
    assert_eq!(b.take(t0 + Duration::from_millis(250), 1000), 250);
    // Never more than a burst, however long the pause.
    assert_eq!(b.available(t0 + Duration::from_secs(3600)), 500);
    // A wait for more than a burst is a wait for one burst.
    let t1 = t0 + Duration::from_secs(3600);
    assert_eq!(b.take(t1, 500), 500);
    assert_eq!(b.wait(t1, 10_000), Some(Duration::from_millis(500)));
}

#[test]
fn the_bucket_delivers_the_rate_over_a_long_run_on_a_fake_clock() {
    // A client that takes whatever it may every 7 ms for 10 s: burst + rate * 10 s, exactly.
    let t0 = Instant::now();
    let mut b = TokenBucket::new(65_536, 16_384, t0);
    let mut got = 0u64;
    let mut t = t0;
    while t < t0 + Duration::from_secs(10) {
        got += b.take(t, 4096);
        t += Duration::from_millis(7);
    }
    let expected = 16_384 + 65_536 * 10;
    let err = (got as f64 - expected as f64).abs() / expected as f64;
    assert!(err < 0.01, "got {got}, expected about {expected}");
}

#[test]
fn a_zero_rate_never_refills() {
    let t0 = Instant::now();
    let mut b = TokenBucket::new(0, 0, t0);
    assert_eq!(b.wait(t0, 1), None);
    assert_eq!(b.take(t0 + Duration::from_secs(10), 1), 0);
}

#[test]
fn settings_defaults_and_validation() {
    let d = Settings::default();
    assert_eq!((d.rate, d.burst), (DEFAULT_RATE, DEFAULT_BURST));
    assert!(d.validate().is_ok() && d.enabled());
    let off = Settings { rate: 0, burst: 0 };
    assert!(off.validate().is_ok() && !off.enabled());
    let bad = Settings { rate: 10, burst: 0 };
    assert!(bad
        .validate()
        .unwrap_err()
        .to_string()
        .contains("random.burst"));
}

#[test]
fn pool_levels_say_when_and_how_much_to_feed() {
    // Linux 6.1: a 256-bit pool, threshold 256; full means nothing to do.
    let full = PoolLevel {
        avail: 256,
        threshold: 256,
        size: 256,
    };
    assert!(!full.low());
    assert_eq!(full.deficit_bytes(512), 1);
    let empty = PoolLevel {
        avail: 0,
        threshold: 256,
        size: 256,
    };
    assert!(empty.low());
    assert_eq!(empty.deficit_bytes(512), 32);
    // Older kernels: 4096-bit pool, wake-up threshold 896: below it, fill the whole pool in
    // chunks of at most `max`.
    let old = PoolLevel {
        avail: 100,
        threshold: 896,
        size: 4096,
    };
    assert!(old.low());
    assert_eq!(old.deficit_bytes(256), 256);
    assert_eq!(old.deficit_bytes(4096), (4096 - 100usize).div_ceil(8));
    // A threshold above the pool size means "full".
    let odd = PoolLevel {
        avail: 4096,
        threshold: 9999,
        size: 4096,
    };
    assert!(!odd.low());
}

#[test]
fn host_entropy_is_not_constant() {
    let mut a = [0u8; 64];
    let mut b = [0u8; 64];
    host::fill(&mut a).expect("getrandom");
    host::fill(&mut b).expect("getrandom");
    assert_ne!(a, b);
    assert_ne!(a, [0u8; 64]);
}

/// The virtio-rng device driven by a test guest (vstream-vhost's `Rig`: virtio-queue's mock
/// queues in real memory, descriptors written by hand).
mod virtio_rng {
    use std::os::fd::AsFd;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use vstream_vhost::testing::{Rig, MEM_SIZE, NEXT, WRITE};
    use vstream_vhost::{Device, Event};

    use crate::random::host::Limiter;
    use crate::random::vhost::RngDevice;
    use crate::random::Settings;

    fn device(rate: u64, burst: u64) -> RngDevice {
        RngDevice::new(Arc::new(Limiter::new(Settings { rate, burst }))).expect("device")
    }

    /// Whether the device's timer fired within `ms`.
    fn readable(dev: &RngDevice, ms: i32) -> bool {
        let fd = dev.backend_fd().expect("backend fd");
        let fd = fd.as_fd();
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::time::Timespec {
            tv_sec: i64::from(ms / 1000),
            tv_nsec: i64::from(ms % 1000) * 1_000_000,
        };
        rustix::event::poll(&mut fds, Some(&timeout)).unwrap_or(0) > 0
    }

    #[test]
    fn writable_buffers_are_filled_with_random_bytes() {
        let mut rig = Rig::new(1, 16).with_event_idx();
        let mut dev = device(1 << 20, 1 << 20);
        rig.add_writable(0, 512);
        rig.add_writable(0, 512);
        rig.run(&mut dev, Event::Queue(0));
        let got = rig.take_written(0);
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|b| b.len() == 512), "each buffer filled");
        assert_ne!(got[0], got[1], "fresh bytes for each request");
        assert!(got[0].iter().any(|&b| b != 0), "not left zeroed");
    }

    /// Read-only, zero-length and out-of-memory requests go back with 0 bytes, the good one
    /// after them is served, and the device goes on without a reset.
    #[test]
    fn bad_requests_are_returned_empty_and_the_queue_goes_on() {
        let mut rig = Rig::new(1, 16).with_event_idx();
        let mut dev = device(1 << 20, 1 << 20);
        let a = rig.alloc(64).0;
        // Device-readable only.
        rig.write_desc(0, 0, a, 64, 0, 0);
        rig.make_available(0, 0);
        // Zero-length writable.
        rig.write_desc(0, 1, a, 0, WRITE, 0);
        rig.make_available(0, 1);
        // Beyond guest memory, and overflowing.
        rig.write_desc(0, 2, MEM_SIZE - 8, 64, WRITE, 0);
        rig.make_available(0, 2);
        rig.write_desc(0, 3, u64::MAX - 8, 64, WRITE, 0);
        rig.make_available(0, 3);
        // A loop.
        rig.write_desc(0, 4, a, 64, WRITE | NEXT, 4);
        rig.make_available(0, 4);
        rig.write_desc(0, 5, a + 64, 32, WRITE, 0);
        rig.make_available(0, 5);
        rig.run(&mut dev, Event::Queue(0));
        assert_eq!(
            rig.take_used(0),
            vec![(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 32)]
        );
        assert!(!rig.broken);
    }

    /// With the budget spent, a request waits (not returned, no busy wake-ups) and is completed
    /// when the timer says tokens came back; a reset forgets it.
    #[test]
    fn a_request_beyond_the_budget_waits_for_tokens() {
        let mut rig = Rig::new(1, 16).with_event_idx();
        let mut dev = device(10_000, 1000);
        rig.add_writable(0, 1000);
        rig.add_writable(0, 500);
        rig.run(&mut dev, Event::Queue(0));
        assert_eq!(
            rig.take_used(0),
            vec![(0, 1000)],
            "one burst, then the budget is spent"
        );
        assert!(!readable(&dev, 10), "nothing before the tokens are due");
        assert!(readable(&dev, 500), "the timer fires when they are");
        rig.run(&mut dev, Event::Backend);
        assert_eq!(rig.take_used(0), vec![(1, 500)]);
        assert!(!readable(&dev, 100), "drained, and nothing else waits");
        rig.add_writable(0, 1000);
        rig.run(&mut dev, Event::Queue(0));
        dev.reset();
        assert!(!readable(&dev, 200), "a reset disarms the timer");
    }

    /// Over a second of a driver keeping 8 requests of 512 bytes queued (as Linux's
    /// virtio_rng does), the bytes delivered are the burst plus the rate, within 5%, and the
    /// device woke up about once per request, not in a loop.
    #[test]
    fn the_rate_is_respected_without_spinning() {
        const RATE: u64 = 64 * 1024;
        const BURST: u64 = 4096;
        let mut rig = Rig::new(1, 16).with_event_idx();
        let mut dev = device(RATE, BURST);
        let start = Instant::now();
        for _ in 0..8 {
            rig.add_writable(0, 512);
        }
        rig.run(&mut dev, Event::Queue(0));
        let (mut total, mut wakeups) = (0u64, 0u64);
        while start.elapsed() < Duration::from_secs(1) {
            let used = rig.take_used(0);
            for (_, len) in &used {
                total += u64::from(*len);
                rig.add_writable(0, 512);
            }
            if !used.is_empty() {
                // The driver's kick.
                rig.run(&mut dev, Event::Queue(0));
            }
            if readable(&dev, 50) {
                wakeups += 1;
                rig.run(&mut dev, Event::Backend);
            }
        }
        total += rig.take_used(0).iter().map(|u| u64::from(u.1)).sum::<u64>();
        let expected = BURST as f64 + RATE as f64 * start.elapsed().as_secs_f64();
        let ratio = total as f64 / expected;
        assert!(
            (0.95..=1.05).contains(&ratio),
            "{total} bytes, expected {expected:.0} ({ratio:.3}), {wakeups} wake-ups"
        );
        assert!(!rig.broken);
        assert!(
            wakeups <= total / 512 + 5,
            "{wakeups} wake-ups for {total} bytes"
        );
    }
}
