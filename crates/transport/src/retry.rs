//! Retrying: the backoff of every reconnect loop, and the bind loop of every endpoint that must
//! come up eventually (a socket directory not made yet, a port whose device appears later).
//! vstreamd, the agent and the devices all loop this way; the pauses live here once.

use std::io;
use std::time::Duration;

use crate::{Address, Endpoint};

/// Exponential backoff: [`Backoff::next_pause`] gives the current pause and doubles it, up to a
/// ceiling; [`Backoff::reset`] goes back to the first pause after a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Pauses of `first`, doubling up to `max`.
    pub const fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The pause to wait now; the next one is twice as long (at most the ceiling).
    pub fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).clamp(self.first, self.max);
        pause
    }

    /// The pause the next failure waits, without counting a failure.
    pub fn current(&self) -> Duration {
        self.next
    }

    /// Back to the first pause (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps [`Backoff::next_pause`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_pause()).await;
    }
}

/// Binds `address`, trying again every `every` until it works; `failed` hears each error (to log
/// or count it).
pub async fn bind_retrying(
    address: &Address,
    every: Duration,
    mut failed: impl FnMut(&io::Error),
) -> Endpoint {
    loop {
        match Endpoint::bind(address.clone()).await {
            Ok(ep) => return ep,
            Err(e) => {
                failed(&e);
                tokio::time::sleep(every).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_to_the_ceiling_and_reset() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(2000));
        let pauses: Vec<_> = (0..7).map(|_| b.next_pause()).collect();
        assert_eq!(
            pauses,
            [100, 200, 400, 800, 1600, 2000, 2000].map(ms).to_vec()
        );
        b.reset();
        assert_eq!(b.current(), ms(100));
        assert_eq!(b.next_pause(), ms(100));
    }

    #[tokio::test]
    async fn bind_retrying_waits_until_the_address_can_be_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("later").join("s.sock");
        let address: Address = format!("unix-listen:{}", sock.display())
            .parse()
            .expect("address");
        let made = sock.parent().expect("dir").to_owned();
        let mut failures = 0;
        let ep = bind_retrying(&address, Duration::from_millis(20), |_| {
            failures += 1;
            if failures == 3 {
                std::fs::create_dir(&made).expect("mkdir");
            }
        })
        .await;
        assert_eq!(failures, 3);
        assert!(sock.exists(), "the endpoint listens");
        drop(ep);
    }
}
