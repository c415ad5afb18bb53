//! Throttle limits: six buckets (bytes and operations; total, read and
//! write), each with an average rate, an optional burst rate and the
//! number of seconds a burst may last, plus the size that counts as one
//! operation. Validation follows QEMU's rules and words, so a script
//! that checks an error's text sees what QEMU would say.

use std::fmt;

/// The largest rate or burst QEMU accepts (10^15).
pub const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// Which of the six buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    BpsTotal = 0,
    BpsRead = 1,
    BpsWrite = 2,
    OpsTotal = 3,
    OpsRead = 4,
    OpsWrite = 5,
}

pub const BUCKETS: usize = 6;

impl Bucket {
    pub const ALL: [Bucket; BUCKETS] = [
        Bucket::BpsTotal,
        Bucket::BpsRead,
        Bucket::BpsWrite,
        Bucket::OpsTotal,
        Bucket::OpsRead,
        Bucket::OpsWrite,
    ];

    /// Whether the bucket counts bytes (else operations).
    pub fn counts_bytes(self) -> bool {
        (self as usize) < 3
    }
}

/// The direction of a request, for choosing buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

impl Direction {
    /// The four buckets a request of this direction is counted in and
    /// waits for.
    pub fn buckets(self) -> [Bucket; 4] {
        match self {
            Direction::Read => [
                Bucket::BpsTotal,
                Bucket::BpsRead,
                Bucket::OpsTotal,
                Bucket::OpsRead,
            ],
            Direction::Write => [
                Bucket::BpsTotal,
                Bucket::BpsWrite,
                Bucket::OpsTotal,
                Bucket::OpsWrite,
            ],
        }
    }
}

/// One bucket's limits; a zero `avg` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Units (bytes or operations) per second in the long run.
    pub avg: u64,
    /// Units per second allowed during a burst; 0: no burst beyond the
    /// small slack every bucket has.
    pub max: u64,
    /// Seconds a burst at `max` may last (at least 1).
    pub burst_length: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            avg: 0,
            max: 0,
            burst_length: 1,
        }
    }
}

/// A whole throttle configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Config {
    pub limits: [Limit; BUCKETS],
    /// Bytes that count as one operation for the operation buckets; a
    /// larger request counts as size / iops_size operations. 0: every
    /// request is one operation.
    pub iops_size: u64,
}

/// Why a configuration is refused (QEMU's wording).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    TotalWithDirection,
    IopsSizeWithoutIops,
    OutOfRange,
    ZeroBurstLength,
    BurstLengthWithoutRate,
    BurstTooLong,
    MaxWithoutAvg,
    MaxBelowAvg,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            ConfigError::TotalWithDirection => {
                "bps/iops/max total values and read/write values cannot be used at the same time"
            }
            ConfigError::IopsSizeWithoutIops => "iops size requires an iops value to be set",
            ConfigError::OutOfRange => {
                return write!(f, "bps/iops/max values must be within [0, {VALUE_MAX}]")
            }
            ConfigError::ZeroBurstLength => "the burst length cannot be 0",
            ConfigError::BurstLengthWithoutRate => "burst length set without burst rate",
            ConfigError::BurstTooLong => "burst length too high for this burst rate",
            ConfigError::MaxWithoutAvg => "bps_max/iops_max require corresponding bps/iops values",
            ConfigError::MaxBelowAvg => "bps_max/iops_max cannot be lower than bps/iops",
        };
        f.write_str(text)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn limit(&self, b: Bucket) -> &Limit {
        &self.limits[b as usize]
    }

    pub fn limit_mut(&mut self, b: Bucket) -> &mut Limit {
        &mut self.limits[b as usize]
    }

    /// Whether any bucket limits anything.
    pub fn enabled(&self) -> bool {
        self.limits.iter().any(|l| l.avg > 0)
    }

    /// Checks the configuration as QEMU does, in QEMU's order.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let both = |total: Bucket, r: Bucket, w: Bucket, field: fn(&Limit) -> u64| {
            field(self.limit(total)) > 0 && (field(self.limit(r)) > 0 || field(self.limit(w)) > 0)
        };
        let avg = |l: &Limit| l.avg;
        let max = |l: &Limit| l.max;
        if both(Bucket::BpsTotal, Bucket::BpsRead, Bucket::BpsWrite, avg)
            || both(Bucket::OpsTotal, Bucket::OpsRead, Bucket::OpsWrite, avg)
            || both(Bucket::BpsTotal, Bucket::BpsRead, Bucket::BpsWrite, max)
            || both(Bucket::OpsTotal, Bucket::OpsRead, Bucket::OpsWrite, max)
        {
            return Err(ConfigError::TotalWithDirection);
        }
        let any_iops = [Bucket::OpsTotal, Bucket::OpsRead, Bucket::OpsWrite]
            .iter()
            .any(|b| self.limit(*b).avg > 0);
        if self.iops_size > 0 && !any_iops {
            return Err(ConfigError::IopsSizeWithoutIops);
        }
        for l in &self.limits {
            if l.avg > VALUE_MAX || l.max > VALUE_MAX {
                return Err(ConfigError::OutOfRange);
            }
            if l.burst_length == 0 {
                return Err(ConfigError::ZeroBurstLength);
            }
            if l.burst_length > 1 && l.max == 0 {
                return Err(ConfigError::BurstLengthWithoutRate);
            }
            if l.max > 0 && l.burst_length > VALUE_MAX / l.max {
                return Err(ConfigError::BurstTooLong);
            }
            if l.max > 0 && l.avg == 0 {
                return Err(ConfigError::MaxWithoutAvg);
            }
            if l.max > 0 && l.max < l.avg {
                return Err(ConfigError::MaxBelowAvg);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(b: Bucket, l: Limit) -> Config {
        let mut c = Config::default();
        *c.limit_mut(b) = l;
        c
    }

    #[test]
    fn empty_config_is_valid_and_disabled() {
        assert_eq!(Config::default().validate(), Ok(()));
        assert!(!Config::default().enabled());
    }

    #[test]
    fn total_and_direction_together_are_refused() {
        let mut c = with(
            Bucket::BpsTotal,
            Limit {
                avg: 10,
                ..Limit::default()
            },
        );
        c.limit_mut(Bucket::BpsWrite).avg = 5;
        assert_eq!(c.validate(), Err(ConfigError::TotalWithDirection));
        let mut c = Config::default();
        c.limit_mut(Bucket::OpsTotal).avg = 10;
        c.limit_mut(Bucket::OpsTotal).max = 20;
        c.limit_mut(Bucket::OpsRead).avg = 10;
        c.limit_mut(Bucket::OpsRead).max = 20;
        assert_eq!(c.validate(), Err(ConfigError::TotalWithDirection));
        // Read and write limits without a total are fine.
        let mut c = Config::default();
        c.limit_mut(Bucket::BpsRead).avg = 1;
        c.limit_mut(Bucket::BpsWrite).avg = 1;
        assert!(c.enabled());
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn each_bucket_rule_has_its_error() {
        let cases = [
            (
                Limit {
                    avg: VALUE_MAX + 1,
                    ..Limit::default()
                },
                ConfigError::OutOfRange,
            ),
            (
                Limit {
                    avg: 1,
                    max: 2,
                    burst_length: 0,
                },
                ConfigError::ZeroBurstLength,
            ),
            (
                Limit {
                    avg: 1,
                    max: 0,
                    burst_length: 5,
                },
                ConfigError::BurstLengthWithoutRate,
            ),
            (
                Limit {
                    avg: 1,
                    max: VALUE_MAX,
                    burst_length: 2,
                },
                ConfigError::BurstTooLong,
            ),
            (
                Limit {
                    avg: 0,
                    max: 5,
                    burst_length: 1,
                },
                ConfigError::MaxWithoutAvg,
            ),
            (
                Limit {
                    avg: 10,
                    max: 5,
                    burst_length: 1,
                },
                ConfigError::MaxBelowAvg,
            ),
        ];
        for (l, err) in cases {
            assert_eq!(with(Bucket::OpsWrite, l).validate(), Err(err));
        }
    }

    #[test]
    fn iops_size_needs_an_iops_limit() {
        let mut c = with(
            Bucket::BpsTotal,
            Limit {
                avg: 100,
                ..Limit::default()
            },
        );
        c.iops_size = 4096;
        assert_eq!(c.validate(), Err(ConfigError::IopsSizeWithoutIops));
        c.limit_mut(Bucket::OpsRead).avg = 10;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn messages_are_qemus() {
        assert_eq!(
            ConfigError::OutOfRange.to_string(),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            ConfigError::MaxBelowAvg.to_string(),
            "bps_max/iops_max cannot be lower than bps/iops"
        );
    }
}
