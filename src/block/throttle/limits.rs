//! Between the QAPI forms of limits (ThrottleLimits, a throttle-group's
//! `x-` properties) and a [`Config`], with QEMU's checks and messages.

use super::config::{Bucket, Config, ConfigError, Limit};
use crate::qapi::{BlockDeviceInfo, BlockIOThrottle, ThrottleGroupProperties, ThrottleLimits};

/// One bucket's three QAPI members: rate, burst rate, burst length.
type Members = (Option<i64>, Option<i64>, Option<i64>);

fn members(l: &ThrottleLimits) -> [(Bucket, Members); 6] {
    [
        (
            Bucket::BpsTotal,
            (l.bps_total, l.bps_total_max, l.bps_total_max_length),
        ),
        (
            Bucket::BpsRead,
            (l.bps_read, l.bps_read_max, l.bps_read_max_length),
        ),
        (
            Bucket::BpsWrite,
            (l.bps_write, l.bps_write_max, l.bps_write_max_length),
        ),
        (
            Bucket::OpsTotal,
            (l.iops_total, l.iops_total_max, l.iops_total_max_length),
        ),
        (
            Bucket::OpsRead,
            (l.iops_read, l.iops_read_max, l.iops_read_max_length),
        ),
        (
            Bucket::OpsWrite,
            (l.iops_write, l.iops_write_max, l.iops_write_max_length),
        ),
    ]
}

/// `cfg` with the members `l` gives changed (absent ones kept), checked.
pub fn apply(cfg: &Config, l: &ThrottleLimits) -> Result<Config, String> {
    let out = merge(cfg, l)?;
    out.validate().map_err(|e| e.to_string())?;
    Ok(out)
}

/// `cfg` with the members `l` gives changed, not yet checked as a whole.
fn merge(cfg: &Config, l: &ThrottleLimits) -> Result<Config, String> {
    let mut out = *cfg;
    let unsigned = |v: i64| u64::try_from(v).map_err(|_| ConfigError::OutOfRange.to_string());
    for (b, (avg, max, len)) in members(l) {
        let lim = out.limit_mut(b);
        if let Some(v) = avg {
            lim.avg = unsigned(v)?;
        }
        if let Some(v) = max {
            lim.max = unsigned(v)?;
        }
        if let Some(v) = len {
            lim.burst_length = unsigned(v)?;
        }
    }
    if let Some(v) = l.iops_size {
        out.iops_size = unsigned(v)?;
    }
    Ok(out)
}

/// Every member, as query and qom-get show them.
pub fn to_limits(cfg: &Config) -> ThrottleLimits {
    let l = |b: Bucket| -> &Limit { cfg.limit(b) };
    let i = |v: u64| Some(i64::try_from(v).unwrap_or(i64::MAX));
    ThrottleLimits {
        iops_total: i(l(Bucket::OpsTotal).avg),
        iops_total_max: i(l(Bucket::OpsTotal).max),
        iops_total_max_length: i(l(Bucket::OpsTotal).burst_length),
        iops_read: i(l(Bucket::OpsRead).avg),
        iops_read_max: i(l(Bucket::OpsRead).max),
        iops_read_max_length: i(l(Bucket::OpsRead).burst_length),
        iops_write: i(l(Bucket::OpsWrite).avg),
        iops_write_max: i(l(Bucket::OpsWrite).max),
        iops_write_max_length: i(l(Bucket::OpsWrite).burst_length),
        bps_total: i(l(Bucket::BpsTotal).avg),
        bps_total_max: i(l(Bucket::BpsTotal).max),
        bps_total_max_length: i(l(Bucket::BpsTotal).burst_length),
        bps_read: i(l(Bucket::BpsRead).avg),
        bps_read_max: i(l(Bucket::BpsRead).max),
        bps_read_max_length: i(l(Bucket::BpsRead).burst_length),
        bps_write: i(l(Bucket::BpsWrite).avg),
        bps_write_max: i(l(Bucket::BpsWrite).max),
        bps_write_max_length: i(l(Bucket::BpsWrite).burst_length),
        iops_size: i(cfg.iops_size),
    }
}

/// The `x-` properties of a throttle-group as ThrottleLimits members.
fn aliases(p: &ThrottleGroupProperties) -> ThrottleLimits {
    ThrottleLimits {
        iops_total: p.x_iops_total,
        iops_total_max: p.x_iops_total_max,
        iops_total_max_length: p.x_iops_total_max_length,
        iops_read: p.x_iops_read,
        iops_read_max: p.x_iops_read_max,
        iops_read_max_length: p.x_iops_read_max_length,
        iops_write: p.x_iops_write,
        iops_write_max: p.x_iops_write_max,
        iops_write_max_length: p.x_iops_write_max_length,
        bps_total: p.x_bps_total,
        bps_total_max: p.x_bps_total_max,
        bps_total_max_length: p.x_bps_total_max_length,
        bps_read: p.x_bps_read,
        bps_read_max: p.x_bps_read_max,
        bps_read_max_length: p.x_bps_read_max_length,
        bps_write: p.x_bps_write,
        bps_write_max: p.x_bps_write_max,
        bps_write_max_length: p.x_bps_write_max_length,
        iops_size: p.x_iops_size,
    }
}

/// A new group's limits: the `x-` aliases, then `limits` over them.
pub fn from_properties(p: &ThrottleGroupProperties) -> Result<Config, String> {
    let x = aliases(p);
    let any_negative = members(&x)
        .iter()
        .flat_map(|(_, (a, m, l))| [*a, *m, *l])
        .chain([x.iops_size])
        .any(|v| v.is_some_and(|v| v < 0));
    if any_negative {
        return Err("Property values cannot be negative".to_string());
    }
    // The aliases are checked together with `limits`, once both applied.
    let cfg = merge(&Config::default(), &x)?;
    apply(
        &cfg,
        p.limits.as_ref().unwrap_or(&ThrottleLimits::default()),
    )
}

/// The limits `block_set_io_throttle` gives (absent burst members: no
/// burst), checked.
pub fn from_io_throttle(a: &BlockIOThrottle) -> Result<Config, String> {
    let l = ThrottleLimits {
        bps_total: Some(a.bps),
        bps_read: Some(a.bps_rd),
        bps_write: Some(a.bps_wr),
        iops_total: Some(a.iops),
        iops_read: Some(a.iops_rd),
        iops_write: Some(a.iops_wr),
        bps_total_max: a.bps_max,
        bps_read_max: a.bps_rd_max,
        bps_write_max: a.bps_wr_max,
        iops_total_max: a.iops_max,
        iops_read_max: a.iops_rd_max,
        iops_write_max: a.iops_wr_max,
        bps_total_max_length: a.bps_max_length,
        bps_read_max_length: a.bps_rd_max_length,
        bps_write_max_length: a.bps_wr_max_length,
        iops_total_max_length: a.iops_max_length,
        iops_read_max_length: a.iops_rd_max_length,
        iops_write_max_length: a.iops_wr_max_length,
        iops_size: a.iops_size,
    };
    apply(&Config::default(), &l)
}

/// Shows a device's limits and group in its BlockDeviceInfo.
pub fn describe(info: &mut BlockDeviceInfo, cfg: &Config, group: &str) {
    let l = to_limits(cfg);
    let v = |x: Option<i64>| x.unwrap_or(0);
    info.bps = v(l.bps_total);
    info.bps_rd = v(l.bps_read);
    info.bps_wr = v(l.bps_write);
    info.iops = v(l.iops_total);
    info.iops_rd = v(l.iops_read);
    info.iops_wr = v(l.iops_write);
    info.bps_max = l.bps_total_max;
    info.bps_rd_max = l.bps_read_max;
    info.bps_wr_max = l.bps_write_max;
    info.iops_max = l.iops_total_max;
    info.iops_rd_max = l.iops_read_max;
    info.iops_wr_max = l.iops_write_max;
    info.bps_max_length = l.bps_total_max_length;
    info.bps_rd_max_length = l.bps_read_max_length;
    info.bps_wr_max_length = l.bps_write_max_length;
    info.iops_max_length = l.iops_total_max_length;
    info.iops_rd_max_length = l.iops_read_max_length;
    info.iops_wr_max_length = l.iops_write_max_length;
    info.iops_size = l.iops_size;
    info.group = Some(group.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_members_keep_their_values() {
        let base = apply(
            &Config::default(),
            &ThrottleLimits {
                iops_total: Some(100),
                ..ThrottleLimits::default()
            },
        )
        .unwrap();
        let next = apply(
            &base,
            &ThrottleLimits {
                iops_total_max: Some(1000),
                ..ThrottleLimits::default()
            },
        )
        .unwrap();
        assert_eq!(next.limit(Bucket::OpsTotal).avg, 100);
        assert_eq!(next.limit(Bucket::OpsTotal).max, 1000);
        let shown = to_limits(&next);
        assert_eq!(shown.iops_total, Some(100));
        assert_eq!(shown.bps_read_max_length, Some(1));
    }

    #[test]
    fn errors_are_qemus() {
        let err = |l: ThrottleLimits| apply(&Config::default(), &l).unwrap_err();
        assert_eq!(
            err(ThrottleLimits {
                iops_total: Some(-1),
                ..ThrottleLimits::default()
            }),
            "bps/iops/max values must be within [0, 1000000000000000]"
        );
        assert_eq!(
            err(ThrottleLimits {
                iops_total_max_length: Some(0),
                ..ThrottleLimits::default()
            }),
            "the burst length cannot be 0"
        );
        let p = ThrottleGroupProperties {
            x_iops_total: Some(-1),
            ..ThrottleGroupProperties::default()
        };
        assert_eq!(
            from_properties(&p).unwrap_err(),
            "Property values cannot be negative"
        );
    }

    #[test]
    fn limits_win_over_aliases() {
        let p = ThrottleGroupProperties {
            x_iops_total: Some(7),
            x_bps_write: Some(4096),
            limits: Some(ThrottleLimits {
                iops_total: Some(5),
                ..ThrottleLimits::default()
            }),
            ..ThrottleGroupProperties::default()
        };
        let cfg = from_properties(&p).unwrap();
        assert_eq!(cfg.limit(Bucket::OpsTotal).avg, 5);
        assert_eq!(cfg.limit(Bucket::BpsWrite).avg, 4096);
    }
}
