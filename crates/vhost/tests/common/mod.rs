//! What the server tests share.

use vstream_vhost::{Device, Event, Vq};

/// The device feature bit [`Fixed`] offers, to recognise it in GET_FEATURES.
pub const FEATURE: u64 = 1 << 5;

/// A device with a recognisable feature bit and nothing else.
pub struct Fixed;

impl Device for Fixed {
    fn num_queues(&self) -> usize {
        2
    }
    fn features(&self) -> u64 {
        FEATURE
    }
    fn config(&self) -> Vec<u8> {
        Vec::new()
    }
    fn reset(&mut self) {}
    fn handle(&mut self, _event: Event, _queues: &mut [Vq<'_>]) {}
}
