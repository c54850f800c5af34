//! GCRA (generic cell rate algorithm) arithmetic, in an integer time unit.
//!
//! The memory backend counts in nanoseconds; the Redis script mirrors the same formulas in
//! microseconds (Lua numbers are doubles, exact up to 2^53, and epoch microseconds stay well
//! below that). One state value per limit: the theoretical arrival time `tat`, the time at which
//! the limit would be back to idle if nothing else arrived.

use std::time::Duration;

use crate::values::Rate;

/// A rate with its burst, as GCRA parameters in some integer time unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    /// Emission interval: one request per `interval` at the sustained rate (rounded up, so the
    /// limiter is never more generous than the configured rate).
    pub interval: u64,
    /// How many requests are admitted at once from idle.
    pub burst: u32,
}

impl Gcra {
    pub fn new(rate: Rate, burst: u32, unit: Duration) -> Gcra {
        let unit = unit.as_nanos().max(1);
        let per = rate.per.as_nanos().div_ceil(unit);
        let interval = per.div_ceil(u128::from(rate.count.max(1))).max(1);
        Gcra {
            interval: u64::try_from(interval).unwrap_or(u64::MAX),
            burst: burst.max(1),
        }
    }

    /// `burst * interval`: how far ahead of now the arrival time may run.
    fn window(&self) -> u64 {
        let w = u128::from(self.interval) * u128::from(self.burst);
        u64::try_from(w).unwrap_or(u64::MAX)
    }

    /// One request at `now`: `Ok(new_tat)` when admitted, `Err(wait)` with the time until it
    /// would be.
    pub fn check(&self, tat: u64, now: u64) -> Result<u64, u64> {
        let new_tat = tat.max(now).saturating_add(self.interval);
        let allow_at = new_tat.saturating_sub(self.window());
        if allow_at > now {
            Err(allow_at - now)
        } else {
            Ok(new_tat)
        }
    }

    /// What is left at `now`: requests admissible right away, and the time until one more is
    /// regained (0 when the burst is whole).
    pub fn observe(&self, tat: u64, now: u64) -> (u32, u64) {
        let used = tat.saturating_sub(now);
        let window = self.window();
        let remaining = if used >= window {
            0
        } else {
            u32::try_from((window - used) / self.interval)
                .unwrap_or(u32::MAX)
                .min(self.burst)
        };
        if remaining >= self.burst {
            return (remaining, 0);
        }
        let keep = u128::from(self.burst - remaining - 1) * u128::from(self.interval);
        let next = u128::from(used).saturating_sub(keep);
        (remaining, u64::try_from(next).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn per_second(count: u32, burst: u32) -> Gcra {
        Gcra::new(
            Rate {
                count,
                per: Duration::from_secs(1),
            },
            burst,
            Duration::from_nanos(1),
        )
    }

    #[test]
    fn burst_from_idle_then_one_per_interval() {
        let g = per_second(10, 3);
        let mut tat = 0;
        let now = 1_000_000_000;
        for _ in 0..3 {
            tat = g.check(tat, now).unwrap();
        }
        assert_eq!(g.check(tat, now), Err(100_000_000));
        assert_eq!(g.observe(tat, now), (0, 100_000_000));
        let later = now + 100_000_000;
        let tat2 = g.check(tat, later).unwrap();
        assert!(g.check(tat2, later).is_err());
    }

    #[test]
    fn observe_counts_whole_requests_and_time_to_next() {
        let g = per_second(10, 4);
        let now = 5_000_000_000;
        assert_eq!(g.observe(0, now), (4, 0));
        let tat = g.check(now, now).unwrap();
        // one spent: three left, the fourth comes back after one interval
        assert_eq!(g.observe(tat, now), (3, 100_000_000));
        assert_eq!(g.observe(tat, now + 40_000_000), (3, 60_000_000));
    }

    #[test]
    fn uneven_periods_round_the_interval_up() {
        let g = Gcra::new(
            Rate {
                count: 3,
                per: Duration::from_secs(1),
            },
            1,
            Duration::from_micros(1),
        );
        assert_eq!(g.interval, 333_334);
    }
}
