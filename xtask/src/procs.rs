//! What xtask reads about processes in `/proc`: CPU time, memory, our uid.

/// CPU time (user + system) of `pid` so far, in seconds; 0 when unreadable.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the comm field; USER_HZ is 100 on Linux.
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    ticks as f64 / 100.0
}

/// The host's steal time so far: `/proc/stat`'s eighth `cpu` field, USER_HZ
/// ticks of 10 ms summed over the CPUs; 0 when unreadable.
pub fn steal_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("cpu "))
                .and_then(|l| l.split_whitespace().nth(8))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// What the hypervisor stole from this machine per second since `from` (a
/// [`steal_ticks`] reading taken `secs` seconds ago), in millicores: CPU time
/// the machine's busy CPUs waited for the host, which no figure measured
/// meanwhile can tell from its own.
pub fn stolen_m(from: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    steal_ticks().saturating_sub(from) as f64 * 10.0 / secs
}

/// A `kB` field of `/proc/PID/status` (`VmRSS`, `VmHWM`, …); 0 when unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| status_field(&s, field))
        .unwrap_or(0)
}

fn status_field(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    })
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_by_name() {
        let s = "Name:\tmbcas\nVmHWM:\t   70144 kB\nVmRSS:\t   53862 kB\n";
        assert_eq!(status_field(s, "VmRSS"), Some(53862));
        assert_eq!(status_field(s, "VmHWM"), Some(70144));
        assert_eq!(status_field(s, "VmRS"), None, "a prefix is not the field");
        assert_eq!(status_field(s, "Name"), None, "not a number");
    }
}
