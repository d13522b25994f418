//! QEMU's job rate limit (`include/qemu/ratelimit.h`): a byte quota per
//! time slice; an overshoot is paid back by proportionally extending the
//! slice, not by waiting for the next slice boundary.

/// QEMU's `BLOCK_JOB_SLICE_TIME`: 100 ms.
pub const SLICE_NS: i64 = 100_000_000;

/// A rate limit in bytes per second, on a caller-supplied clock.
#[derive(Clone, Debug)]
pub struct RateLimit {
    slice_ns: i64,
    /// Bytes per slice; 0 means unlimited.
    quota: u64,
    slice_start: i64,
    slice_end: i64,
    dispatched: u64,
}

impl RateLimit {
    /// Unlimited, with QEMU's 100 ms slice.
    pub fn new() -> Self {
        Self {
            slice_ns: SLICE_NS,
            quota: 0,
            slice_start: 0,
            slice_end: 0,
            dispatched: 0,
        }
    }

    /// Sets the speed in bytes per second (0 = unlimited).
    pub fn set_speed(&mut self, bytes_per_sec: u64) {
        self.quota = if bytes_per_sec == 0 {
            0
        } else {
            ((bytes_per_sec as u128 * self.slice_ns as u128 / 1_000_000_000) as u64).max(1)
        };
    }

    /// Accounts `n` bytes at time `now` and returns how long to wait (ns)
    /// before doing more; 0 when under the quota or unlimited.
    pub fn calculate_delay(&mut self, now: i64, n: u64) -> i64 {
        if self.quota == 0 {
            return 0;
        }
        if now >= self.slice_end {
            self.slice_start = now;
            self.slice_end = now + self.slice_ns;
            self.dispatched = 0;
        }
        self.dispatched += n;
        if self.dispatched < self.quota {
            return 0;
        }
        let slices = (self.dispatched as f64) / (self.quota as f64);
        self.slice_end = self.slice_start + (slices * self.slice_ns as f64) as i64;
        (self.slice_end - now).max(0)
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_delays() {
        let mut r = RateLimit::new();
        assert_eq!(r.calculate_delay(0, u64::MAX / 2), 0);
    }

    #[test]
    fn one_mib_per_second_in_64k_chunks_is_exact() {
        // 1 MiB/s: quota 104857 bytes per 100 ms slice.
        let mut r = RateLimit::new();
        r.set_speed(1 << 20);
        let mut now = 0i64;
        let mut sent = 0u64;
        while now < 10_000_000_000 {
            sent += 65_536;
            now += r.calculate_delay(now, 65_536);
        }
        // After 10 s, within one chunk of 10 MiB.
        let expect = 10u64 << 20;
        assert!(sent.abs_diff(expect) <= 2 * 65_536, "{sent} vs {expect}");
    }

    #[test]
    fn overshoot_is_paid_back_proportionally() {
        let mut r = RateLimit::new();
        r.set_speed(1_000_000); // 100 000 bytes per slice
                                // 300 000 bytes at once: three slices' worth.
        assert_eq!(r.calculate_delay(0, 300_000), 300_000_000);
    }

    #[test]
    fn tiny_speed_still_has_a_quota_of_one_byte() {
        let mut r = RateLimit::new();
        r.set_speed(1);
        assert!(r.calculate_delay(0, 1) > 0);
    }
}
