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
    assert!(bad.validate().unwrap_err().contains("random.burst"));
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
