//! `mbcas burn`: a CPU load generator for demos and tests.
//!
//! Each thread spins for `percent` % of every 10 ms slice and sleeps the rest, so
//! `--threads 2 --percent 50` asks for one core in total. `--pattern
//! square:ON_MS/OFF_MS` alternates ON_MS of that load with OFF_MS of sleep.

use std::{
    hint::black_box,
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

const SLICE: Duration = Duration::from_millis(10);

#[derive(Debug, clap::Args)]
pub struct BurnArgs {
    /// Number of spinning threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
    /// Share of each thread's time spent spinning, 1–100.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub percent: u32,
    /// `steady`, or `square:ON_MS/OFF_MS` (load for ON_MS, idle for OFF_MS).
    #[arg(long, default_value = "steady")]
    pub pattern: Pattern,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    Steady,
    Square { on: Duration, off: Duration },
}

impl FromStr for Pattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "steady" {
            return Ok(Self::Steady);
        }
        let spec = s
            .strip_prefix("square:")
            .ok_or_else(|| format!("{s:?}: expected `steady` or `square:ON_MS/OFF_MS`"))?;
        let (on, off) = spec
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected `square:ON_MS/OFF_MS`"))?;
        let ms = |x: &str| {
            x.parse::<u64>()
                .map_err(|_| format!("{s:?}: {x:?} is not a number of milliseconds"))
        };
        let (on, off) = (ms(on)?, ms(off)?);
        if on == 0 {
            return Err(format!("{s:?}: ON_MS must be > 0"));
        }
        Ok(Self::Square {
            on: Duration::from_millis(on),
            off: Duration::from_millis(off),
        })
    }
}

impl Pattern {
    /// Whether the load is on at `t` since start.
    pub fn on_at(&self, t: Duration) -> bool {
        match *self {
            Self::Steady => true,
            Self::Square { on, off } => {
                let cycle = (on + off).as_nanos().max(1);
                t.as_nanos() % cycle < on.as_nanos()
            }
        }
    }
}

/// Burns CPU until `stop` is set or the duration ends.
pub fn burn(args: &BurnArgs, stop: Arc<AtomicBool>) {
    let start = Instant::now();
    let end = args
        .duration
        .filter(|d| d.is_finite() && *d > 0.0)
        .map(|d| start + Duration::from_secs_f64(d));
    let busy = SLICE * args.percent / 100;
    let pattern = args.pattern;
    std::thread::scope(|s| {
        for _ in 0..args.threads {
            let stop = Arc::clone(&stop);
            s.spawn(move || {
                let mut x = 0u64;
                loop {
                    let now = Instant::now();
                    if stop.load(Ordering::Relaxed) || end.is_some_and(|e| now >= e) {
                        break;
                    }
                    if !pattern.on_at(now - start) {
                        std::thread::sleep(SLICE);
                        continue;
                    }
                    let slice_end = now + busy;
                    while Instant::now() < slice_end {
                        x = black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
                    }
                    if busy < SLICE {
                        std::thread::sleep(SLICE - busy);
                    }
                }
                black_box(x);
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse() {
        assert_eq!("steady".parse::<Pattern>(), Ok(Pattern::Steady));
        assert_eq!(
            "square:500/250".parse::<Pattern>(),
            Ok(Pattern::Square {
                on: Duration::from_millis(500),
                off: Duration::from_millis(250)
            })
        );
        for bad in ["square", "square:1", "square:a/b", "square:0/10", "sine"] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn square_wave_phases() {
        let p = Pattern::Square {
            on: Duration::from_millis(100),
            off: Duration::from_millis(50),
        };
        assert!(p.on_at(Duration::from_millis(10)));
        assert!(!p.on_at(Duration::from_millis(120)));
        assert!(p.on_at(Duration::from_millis(160)));
    }

    fn cpu_s() -> f64 {
        use nix::sys::{resource, time::TimeValLike as _};
        let u = resource::getrusage(resource::UsageWho::RUSAGE_SELF).unwrap();
        (u.user_time().num_microseconds() + u.system_time().num_microseconds()) as f64 / 1e6
    }

    #[test]
    fn burns_at_least_what_it_is_asked() {
        // Two threads at 50 % for 0.5 s ask for 0.5 CPU-seconds. Other tests in this
        // process only add CPU time, so only a lower bound is checked here, loose
        // because tests share two cores; the kernel tier measures burners through
        // cpuacct.
        let before = cpu_s();
        let args = BurnArgs {
            threads: 2,
            percent: 50,
            pattern: Pattern::Steady,
            duration: Some(0.5),
        };
        let t = Instant::now();
        burn(&args, Arc::new(AtomicBool::new(false)));
        let wall = t.elapsed();
        let used = cpu_s() - before;
        assert!(
            wall >= Duration::from_millis(500) && wall < Duration::from_secs(5),
            "{wall:?}"
        );
        assert!(used >= 0.5 * 0.4, "burned {used:.3} CPU-s, asked 0.5");
    }

    #[test]
    fn stops_when_told() {
        let stop = Arc::new(AtomicBool::new(true));
        let t = Instant::now();
        burn(
            &BurnArgs {
                threads: 1,
                percent: 100,
                pattern: Pattern::Steady,
                duration: None,
            },
            stop,
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
