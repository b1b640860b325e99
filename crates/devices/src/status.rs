//! A device's status in `vstreamctl status` (under `devices.CLASS`): a type of the device's own,
//! carried erased so that vstreamd and vstreamctl name no device.
//!
//! vstreamd gets a [`DeviceStatus`] from the device's host half and writes it as JSON;
//! vstreamctl reads the JSON back as the device's type through the registry
//! ([`crate::registry::Device::read_status`]); a program that knows the device reads the typed
//! value with [`DeviceStatus::get`]. vstreamd's metrics show its numbers as [`Sample`]s, which
//! the status type gives through [`Samples`] (reached by [`crate::registry::Device::samples`]).

use std::any::Any;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// What a device's status type is: serializable, and readable back as itself.
pub trait Status: Any + Debug + Send + Sync {
    /// The status as it goes on the wire.
    fn to_json(&self) -> Value;
    /// For [`DeviceStatus::get`].
    fn as_any(&self) -> &dyn Any;
}

impl<T: Serialize + Any + Debug + Send + Sync> Status for T {
    fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// One device's status, of the device's own type.
#[derive(Debug, Clone)]
pub struct DeviceStatus(Arc<dyn Status>);

impl DeviceStatus {
    /// A device's status.
    pub fn new<T: Status>(status: T) -> DeviceStatus {
        DeviceStatus(Arc::new(status))
    }

    /// Reads `json` as status type `T` (for [`crate::registry::Device::read_status`]).
    pub fn read<T: Status + DeserializeOwned>(json: Value) -> serde_json::Result<DeviceStatus> {
        Ok(DeviceStatus::new(serde_json::from_value::<T>(json)?))
    }

    /// The status as its type, if it is a `T` (a [`serde_json::Value`] for a device that has no
    /// type of its own, or that this program does not know).
    pub fn get<T: Any>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }

    /// The status as JSON.
    pub fn to_json(&self) -> Value {
        self.0.to_json()
    }

    /// Its fields as `key=value` words, nulls left out (a line of `vstreamctl status GUEST`).
    pub fn words(&self) -> Vec<String> {
        let Value::Object(fields) = self.to_json() else {
            return Vec::new();
        };
        fields
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                v => format!("{k}={v}"),
            })
            .collect()
    }
}

impl Serialize for DeviceStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// A guest's devices' statuses, by class. Read back, each is its device's type (through the
/// registry); a class this program does not know stays JSON.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Devices(pub BTreeMap<String, DeviceStatus>);

impl<'de> Deserialize<'de> for Devices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Devices, D::Error> {
        let raw = BTreeMap::<String, Value>::deserialize(d)?;
        raw.into_iter()
            .map(|(class, json)| {
                let status = match crate::registry().get(&class) {
                    Some(dev) => dev.read_status(json),
                    None => Ok(DeviceStatus::new(json)),
                };
                status
                    .map(|s| (class.clone(), s))
                    .map_err(|e| serde::de::Error::custom(format!("devices.{class}: {e}")))
            })
            .collect::<Result<_, _>>()
            .map(Devices)
    }
}

/// What a [`Sample`] measures over time (the Prometheus metric types vstreamd uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    /// Only grows (it starts again from 0 when the device's host half does).
    Counter,
    /// Goes up and down.
    Gauge,
}

/// One number of a device's status, for vstreamd's metrics: shown as `vstream_CLASS_NAME`
/// (a counter with `_total` after it), labelled with the guest and `labels`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The name after `vstream_CLASS_`, in base units (`_bytes`, `_seconds`), without a
    /// counter's `_total`.
    pub name: &'static str,
    /// What it counts, one line.
    pub help: &'static str,
    /// Counter or gauge.
    pub kind: SampleKind,
    /// Labels besides `guest` (the same keys on every sample of one name).
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// A counter.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Sample {
        Sample {
            name,
            help,
            kind: SampleKind::Counter,
            labels: Vec::new(),
            value: value as f64,
        }
    }

    /// A gauge.
    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Sample {
        Sample {
            name,
            help,
            kind: SampleKind::Gauge,
            labels: Vec::new(),
            value,
        }
    }

    /// A gauge that is 1 when `on`, else 0.
    pub fn flag(name: &'static str, help: &'static str, on: bool) -> Sample {
        Sample::gauge(name, help, if on { 1.0 } else { 0.0 })
    }

    /// The same sample with one more label.
    pub fn label(mut self, key: &'static str, value: impl Into<String>) -> Sample {
        self.labels.push((key, value.into()));
        self
    }
}

/// A status type's numbers as [`Sample`]s.
pub trait Samples {
    /// Its samples, in a fixed order.
    fn samples(&self) -> Vec<Sample>;
}
