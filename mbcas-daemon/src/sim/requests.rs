//! The request-latency model: requests served by a pod's threads inside CFS
//! periods.
//!
//! Requests arrive at a pod as a Poisson stream (`rate_per_s`, times uniform
//! inside each 100 ms period), optionally with a batch of `burst_n` requests
//! every `burst_every_s` (a fan-out: N threads busy for a few milliseconds;
//! each pod's batches come at a phase of their own, drawn from the seed).
//! Each needs `cpu_ms` of CPU. Up to `threads` requests run at once, first come
//! first served, each at the speed the node gives the pod (1 core per thread,
//! less when the node is contended). Inside a period the pod may use its quota
//! (`limit × period`): once that is spent, everything left waits for the next
//! period — the throttling users feel, even when the mean use is well under the
//! limit. A request's latency is its completion time minus its arrival time.
//!
//! The model runs event by event inside a period (arrivals, completions, quota
//! exhaustion), so latencies have sub-millisecond resolution; the CFS model of
//! [`super::cfs`] decides the node-level share the pod gets that period.

use std::collections::VecDeque;

use serde::Deserialize;

use super::PERIOD_S;

const PERIOD_MS: f64 = PERIOD_S * 1000.0;

/// A pod's request load (scenario field `requests`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestSpec {
    /// Mean Poisson arrivals per second.
    pub rate_per_s: f64,
    /// CPU time each request needs, milliseconds.
    pub cpu_ms: f64,
    /// Requests served at once.
    pub threads: u32,
    /// A batch of `burst_n` requests arrives together every this many seconds.
    #[serde(default)]
    pub burst_every_s: Option<f64>,
    #[serde(default)]
    pub burst_n: u32,
}

impl RequestSpec {
    /// Mean CPU demand of the requests, millicores.
    pub fn mean_m(&self) -> f64 {
        let burst = self
            .burst_every_s
            .map_or(0.0, |e| f64::from(self.burst_n) / e.max(1e-9));
        (self.rate_per_s + burst) * self.cpu_ms
    }

    pub fn validate(&self) -> Result<(), &'static str> {
        if !(self.rate_per_s.is_finite() && self.rate_per_s >= 0.0 && self.rate_per_s <= 10_000.0) {
            return Err("rate_per_s must be in [0, 10000]");
        }
        if !(self.cpu_ms.is_finite() && self.cpu_ms > 0.0 && self.cpu_ms <= 10_000.0) {
            return Err("cpu_ms must be in (0, 10000]");
        }
        if self.threads == 0 || self.threads > 1024 {
            return Err("threads must be in [1, 1024]");
        }
        if self
            .burst_every_s
            .is_some_and(|e| !(e.is_finite() && e >= PERIOD_S))
        {
            return Err("burst_every_s must be ≥ 0.1");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
struct Request {
    /// Arrival, seconds since the start of the run.
    at_s: f64,
    /// CPU still needed, milliseconds.
    left_ms: f64,
}

/// What serving one period did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Served {
    /// CPU used, milliseconds.
    pub used_ms: f64,
    /// The quota ran out with work waiting.
    pub throttled: bool,
    /// Work that was runnable when the quota ran out, CPU-milliseconds
    /// (runnable threads × the rest of the period, as the kernel counts
    /// throttled time over run queues, capped at the work left).
    pub held_back_ms: f64,
}

/// One pod's queue of requests and the latencies of those it completed.
#[derive(Clone, Debug, Default)]
pub struct RequestQueue {
    /// Periods by which this pod's batches are offset (independent services
    /// do not fan out in the same period).
    phase: u64,
    queue: VecDeque<Request>,
    /// Completed requests' latencies, milliseconds.
    pub latencies_ms: Vec<f64>,
}

/// A uniform number in [0, 1) from a 64-bit hash.
fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl RequestQueue {
    /// An empty queue whose batches come `phase` periods into each batch interval.
    pub fn with_phase(phase: u64) -> Self {
        Self {
            phase,
            ..Self::default()
        }
    }

    /// Adds the arrivals of period `k`; `rng` gives independent 64-bit draws.
    pub fn arrive(&mut self, spec: &RequestSpec, k: u64, mut rng: impl FnMut() -> u64) {
        let start = k as f64 * PERIOD_S;
        // Poisson count by inversion (λ is small: a period is 100 ms).
        let lambda = spec.rate_per_s * PERIOD_S;
        let u = unit(rng());
        let (mut n, mut p, mut cdf) = (0u32, (-lambda).exp(), (-lambda).exp());
        while u > cdf && n < 100_000 {
            n += 1;
            p *= lambda / f64::from(n);
            cdf += p;
        }
        let mut times: Vec<f64> = (0..n).map(|_| start + unit(rng()) * PERIOD_S).collect();
        if let Some(every) = spec.burst_every_s {
            let per = (every / PERIOD_S).round().max(1.0) as u64;
            if (k + self.phase).is_multiple_of(per) {
                let at = start + unit(rng()) * PERIOD_S;
                times.extend(std::iter::repeat_n(at, spec.burst_n as usize));
            }
        }
        times.sort_by(f64::total_cmp);
        self.queue.extend(times.into_iter().map(|at_s| Request {
            at_s,
            left_ms: spec.cpu_ms,
        }));
    }

    /// CPU the queued requests could use this period, milliseconds.
    pub fn wanted_ms(&self, spec: &RequestSpec) -> f64 {
        let work: f64 = self.queue.iter().map(|r| r.left_ms).sum();
        work.min(f64::from(spec.threads) * PERIOD_MS)
    }

    /// Serves period `k` with `quota_ms` of CPU (`None`: no limit), each running
    /// request at `speed` cores (≤ 1: the node's share).
    pub fn serve(
        &mut self,
        spec: &RequestSpec,
        k: u64,
        quota_ms: Option<f64>,
        speed: f64,
    ) -> Served {
        let start_s = k as f64 * PERIOD_S;
        let speed = speed.clamp(1e-6, 1.0);
        let threads = spec.threads as usize;
        let mut out = Served::default();
        let mut tau = 0.0; // ms into the period
        loop {
            let now_s = start_s + tau / 1000.0;
            // Running: the first `threads` requests that have arrived (FIFO).
            let running = self
                .queue
                .iter()
                .take(threads)
                .take_while(|r| r.at_s <= now_s + 1e-12)
                .count();
            let next_arrival = self
                .queue
                .get(running)
                .filter(|_| running < threads)
                .map(|r| ((r.at_s - start_s) * 1000.0).max(tau));
            let rate = running as f64 * speed; // CPU-ms per ms
            let mut dt = PERIOD_MS - tau;
            if let Some(a) = next_arrival {
                dt = dt.min(a - tau);
            }
            if running > 0 {
                let first_done = self
                    .queue
                    .iter()
                    .take(running)
                    .map(|r| r.left_ms / speed)
                    .fold(f64::INFINITY, f64::min);
                dt = dt.min(first_done);
            }
            let quota_left = quota_ms.map(|q| (q - out.used_ms).max(0.0));
            if let Some(left) = quota_left
                && rate > 0.0
            {
                dt = dt.min(left / rate);
            }
            let dt = dt.max(0.0);
            for r in self.queue.iter_mut().take(running) {
                r.left_ms -= dt * speed;
            }
            out.used_ms += dt * rate;
            tau += dt;
            // Completions.
            let done_at = start_s + tau / 1000.0;
            let mut i = 0;
            while i < running.min(self.queue.len()) {
                if self.queue[i].left_ms <= 1e-9 {
                    if let Some(r) = self.queue.remove(i) {
                        self.latencies_ms.push((done_at - r.at_s) * 1000.0);
                    }
                } else {
                    i += 1;
                }
            }
            let exhausted = quota_ms.is_some_and(|q| out.used_ms >= q - 1e-9);
            if exhausted && running > 0 && !self.queue.is_empty() {
                // Throttled for the rest of the period.
                let rest = PERIOD_MS - tau;
                let waiting = self
                    .queue
                    .iter()
                    .take(threads)
                    .take_while(|r| r.at_s <= start_s + PERIOD_S)
                    .count();
                let work: f64 = self.queue.iter().map(|r| r.left_ms).sum();
                out.throttled = true;
                out.held_back_ms = (waiting as f64 * rest).min(work);
                break;
            }
            if tau >= PERIOD_MS - 1e-9 {
                break;
            }
            if dt == 0.0 && running == 0 && next_arrival.is_none() {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(threads: u32, cpu_ms: f64) -> RequestSpec {
        RequestSpec {
            rate_per_s: 0.0,
            cpu_ms,
            threads,
            burst_every_s: None,
            burst_n: 0,
        }
    }

    fn queue_of(at_ms: &[f64], cpu_ms: f64) -> RequestQueue {
        RequestQueue {
            phase: 0,
            queue: at_ms
                .iter()
                .map(|&a| Request {
                    at_s: a / 1000.0,
                    left_ms: cpu_ms,
                })
                .collect(),
            latencies_ms: Vec::new(),
        }
    }

    #[test]
    fn unthrottled_request_takes_its_cpu_time() {
        let s = spec(1, 5.0);
        let mut q = queue_of(&[10.0], 5.0);
        let out = q.serve(&s, 0, None, 1.0);
        assert!((out.used_ms - 5.0).abs() < 1e-9, "{out:?}");
        assert!(!out.throttled);
        assert_eq!(q.latencies_ms.len(), 1);
        assert!(
            (q.latencies_ms[0] - 5.0).abs() < 1e-9,
            "{:?}",
            q.latencies_ms
        );
    }

    #[test]
    fn a_burst_beyond_the_quota_waits_for_the_next_period() {
        // 4 threads, 4 requests of 10 ms at t=0 with a 20 ms quota: the quota
        // runs out after 5 ms of wall time (4 × 5 ms = 20 ms of CPU).
        let s = spec(4, 10.0);
        let mut q = queue_of(&[0.0, 0.0, 0.0, 0.0], 10.0);
        let out = q.serve(&s, 0, Some(20.0), 1.0);
        assert!(out.throttled, "{out:?}");
        assert!((out.used_ms - 20.0).abs() < 1e-9);
        // Each has 5 ms left; 95 ms of the period remain; 20 ms of work held back.
        assert!((out.held_back_ms - 20.0).abs() < 1e-9, "{out:?}");
        assert!(q.latencies_ms.is_empty());
        // Next period: they finish 5 ms in, 105 ms after they arrived.
        let out = q.serve(&s, 1, Some(20.0), 1.0);
        assert!(!out.throttled);
        assert_eq!(q.latencies_ms.len(), 4);
        for l in &q.latencies_ms {
            assert!((l - 105.0).abs() < 1e-6, "{:?}", q.latencies_ms);
        }
    }

    #[test]
    fn concurrency_and_contention() {
        // 2 threads, 3 requests of 10 ms at 0 ms, half speed: two finish at 20 ms,
        // the third at 40 ms.
        let s = spec(2, 10.0);
        let mut q = queue_of(&[0.0, 0.0, 0.0], 10.0);
        let out = q.serve(&s, 0, None, 0.5);
        assert!((out.used_ms - 30.0).abs() < 1e-9);
        let mut l = q.latencies_ms.clone();
        l.sort_by(f64::total_cmp);
        assert!(
            (l[0] - 20.0).abs() < 1e-9 && (l[1] - 20.0).abs() < 1e-9 && (l[2] - 40.0).abs() < 1e-9,
            "{l:?}"
        );
    }

    #[test]
    fn poisson_arrivals_have_the_asked_rate() {
        let s = RequestSpec {
            rate_per_s: 200.0,
            ..spec(4, 1.0)
        };
        let mut q = RequestQueue::default();
        let mut x = 7u64;
        let mut rng = move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        for k in 0..1000 {
            q.arrive(&s, k, &mut rng);
        }
        // 100 s at 200/s: 20 000 ± a few hundred.
        let n = q.queue.len() as f64;
        assert!((n - 20_000.0).abs() < 600.0, "{n}");
        let burst = RequestSpec {
            rate_per_s: 0.0,
            burst_every_s: Some(1.0),
            burst_n: 8,
            ..spec(4, 1.0)
        };
        let mut b = RequestQueue::default();
        for k in 0..100 {
            b.arrive(&burst, k, &mut rng);
        }
        assert_eq!(b.queue.len(), 80);
        assert!((burst.mean_m() - 8.0).abs() < 1e-9);
    }
}
