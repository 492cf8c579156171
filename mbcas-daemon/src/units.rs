//! Newtypes for the quantities that cross module boundaries.
//!
//! CPU amounts are millicores (`1000` = one core), cgroup identities are the
//! kernel's cgroup id (the inode number of the cgroup directory), and pods are
//! named by their Kubernetes UID or, in local mode, by the consumer cgroup's name.

use std::{fmt, sync::Arc};

use serde::{Deserialize, Serialize};

/// A CPU amount in millicores: `1000` is one core.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct MilliCpu(pub u64);

impl MilliCpu {
    pub const ZERO: Self = Self(0);
    pub const ONE_CORE: Self = Self(1000);

    pub const fn get(self) -> u64 {
        self.0
    }

    /// CFS quota for this amount over `period_us`: `quota = period × m / 1000`.
    pub const fn to_quota_us(self, period_us: u64) -> u64 {
        self.0.saturating_mul(period_us) / 1000
    }

    /// The amount a CFS quota grants, rounded down to a whole millicore.
    pub const fn from_quota_us(quota_us: u64, period_us: u64) -> Self {
        if period_us == 0 {
            return Self(0);
        }
        Self(quota_us.saturating_mul(1000) / period_us)
    }

    pub const fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for MilliCpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}m", self.0)
    }
}

/// The kernel's id of a cgroup: on v1 and v2 the inode number of its directory.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct CgroupId(pub u64);

impl fmt::Display for CgroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The identity of one consumer: a pod UID (Kubernetes mode) or a consumer
/// cgroup's name (local mode, simulator).
///
/// Shared, not copied: every round hands each key to the market, the policy and
/// the outcome, so a clone is a reference count, not an allocation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodKey(Arc<str>);

impl PodKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PodKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for PodKey {
    fn from(s: &str) -> Self {
        Self(s.into())
    }
}

impl From<String> for PodKey {
    fn from(s: String) -> Self {
        Self(s.into())
    }
}

impl std::borrow::Borrow<str> for PodKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for PodKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PodKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::from)
    }
}

/// Hash maps keyed by [`PodKey`] on the decision path (a fast, seeded hash; keys
/// come from this node's pods, not from a network peer).
pub type KeyMap<V> = std::collections::HashMap<PodKey, V, foldhash::fast::RandomState>;
pub type KeySet<'a> = std::collections::HashSet<&'a PodKey, foldhash::fast::RandomState>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_round_trip() {
        assert_eq!(MilliCpu(200).to_quota_us(100_000), 20_000);
        assert_eq!(MilliCpu::from_quota_us(20_000, 100_000), MilliCpu(200));
        assert_eq!(MilliCpu::from_quota_us(150_000, 100_000), MilliCpu(1500));
        assert_eq!(MilliCpu::from_quota_us(1, 0), MilliCpu(0));
    }
}
