//! The usual `process_*` metrics, read from `/proc/self` at each scrape (a few small reads).

/// This process's resource use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub virtual_bytes: u64,
    pub start_time_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
}

/// Clock ticks per second in `/proc` times: USER_HZ, 100 on every Linux architecture.
const USER_HZ: f64 = 100.0;

impl Stats {
    /// None when `/proc` cannot be read (then the series are left out).
    pub fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let btime = std::fs::read_to_string("/proc/stat").ok()?;
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        parse(&stat, &status, &btime, &limits, open_fds)
    }
}

/// The pure part of [`Stats::read`].
pub fn parse(
    stat: &str,
    status: &str,
    proc_stat: &str,
    limits: &str,
    open_fds: u64,
) -> Option<Stats> {
    // The command name (field 2) may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field n of proc(5) is fields[n - 3].
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let ticks = field(14)? + field(15)?;
    let start_ticks = field(22)?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
    };
    let btime = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())?;
    let max_fds = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    Some(Stats {
        cpu_seconds: ticks as f64 / USER_HZ,
        resident_bytes: kib("VmRSS:").unwrap_or(0) * 1024,
        virtual_bytes: kib("VmSize:").unwrap_or(0) * 1024,
        start_time_seconds: btime as f64 + start_ticks as f64 / USER_HZ,
        open_fds,
        max_fds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse_and_a_name_with_parentheses_does_not_confuse_them() {
        let stat = "4242 (patch (agent)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 3 0 12345 9000000 1800 18446744073709551615";
        let status = "Name:\tpatch-agent\nVmSize:\t  20480 kB\nVmRSS:\t    7200 kB\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            1024                 524288               files\n";
        let s = parse(stat, status, "cpu 1 2 3\nbtime 1700000000\n", limits, 12).expect("parsed");
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.resident_bytes, 7200 * 1024);
        assert_eq!(s.virtual_bytes, 20480 * 1024);
        assert_eq!(s.start_time_seconds, 1_700_000_000.0 + 123.45);
        assert_eq!((s.open_fds, s.max_fds), (12, Some(1024)));
        assert_eq!(parse("garbage", status, "btime 1", limits, 0), None);
    }

    #[test]
    fn this_process_reads() {
        let s = Stats::read().expect("/proc");
        assert!(s.resident_bytes > 0 && s.open_fds > 0, "{s:?}");
    }
}
