//! The usual `process_*` metrics, read from `/proc/self` when scraped (Linux; elsewhere they are
//! left out). The same names and meanings as the Prometheus client libraries, so dashboards and
//! alerts written for other services work unchanged.

/// One reading of the process's own counters; a field is `None` when it could not be read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time spent, in seconds.
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: Option<f64>,
}

/// Clock ticks per second of `/proc/self/stat`. The kernel reports these fields in `USER_HZ`,
/// which is 100 on every Linux architecture the ABI fixes it for (the Prometheus Go client's
/// procfs assumes the same).
const USER_HZ: f64 = 100.0;

impl ProcessStats {
    /// Reads the current process.
    #[cfg(target_os = "linux")]
    pub fn read() -> ProcessStats {
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let stat = stat.as_deref().and_then(parse_stat);
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let boot = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s));
        ProcessStats {
            cpu_seconds: stat.map(|s| (s.utime + s.stime) as f64 / USER_HZ),
            resident_memory_bytes: status_kib(&status, "VmRSS:").map(|k| k * 1024),
            virtual_memory_bytes: stat.map(|s| s.vsize),
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as u64),
            max_fds: rustix::process::getrlimit(rustix::process::Resource::Nofile).current,
            start_time_seconds: stat
                .zip(boot)
                .map(|(s, boot)| boot as f64 + s.starttime as f64 / USER_HZ),
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn read() -> ProcessStats {
        ProcessStats::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
}

/// The fields of `/proc/self/stat` used here. The command name (field 2) is in parentheses and
/// may itself hold spaces and parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is at index N - 3.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
        vsize: field(23)?,
    })
}

/// `btime` of `/proc/stat`: the boot time in seconds since the epoch.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `kB` line of `/proc/self/status`, such as `VmRSS:     1234 kB`.
fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis_of_the_command_name() {
        let line = "4242 (odd) name (x)) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 8 0 123456 987654321 2500 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                utime: 250,
                stime: 75,
                starttime: 123456,
                vsize: 987654321,
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn boot_time_and_status_lines_are_read() {
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000)
        );
        assert_eq!(
            status_kib("Name:\tx\nVmRSS:\t   2048 kB\n", "VmRSS:"),
            Some(2048)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read() {
        let s = ProcessStats::read();
        assert!(s.cpu_seconds.is_some(), "{s:?}");
        assert!(s.resident_memory_bytes.unwrap_or(0) > 0, "{s:?}");
        assert!(s.open_fds.unwrap_or(0) > 0, "{s:?}");
        assert!(s.max_fds.unwrap_or(0) > 0, "{s:?}");
        let started = s.start_time_seconds.unwrap_or(0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        assert!(
            started > 1.0e9 && started <= now + 1.0,
            "{started} vs {now}"
        );
    }
}
