//! A process's own cost, read from `/proc/<pid>`: CPU time (utime + stime of all its
//! threads, exited ones included) and memory (VmRSS now, VmHWM its peak).
//!
//! CPU time spent in eBPF programs is charged to whichever task triggered the hook, not to
//! the agent: [`super::cost`] reports it separately from the programs' own statistics.

use std::{
    fs, io,
    time::{Duration, Instant},
};

/// One look at a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub at: Instant,
    pub cpu: Duration,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn sample(pid: u32) -> io::Result<ProcSample> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let at = Instant::now();
    // The command name (field 2) may hold spaces: fields are counted after its ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // utime and stime are fields 14 and 15; field 3 (the state) is the first after ')'.
    let (Some(utime), Some(stime)) = (field(11), field(12)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected /proc/{pid}/stat: {stat}"),
        ));
    };
    let ticks = utime + stime;
    let per_second = clock_ticks();
    Ok(ProcSample {
        at,
        cpu: Duration::from_secs(ticks / per_second)
            + Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second),
        rss_kib: status_kib(&status, "VmRSS:"),
        hwm_kib: status_kib(&status, "VmHWM:"),
    })
}

/// CPU used between two samples, in percent of one CPU.
pub(crate) fn cpu_percent(before: &ProcSample, after: &ProcSample) -> f64 {
    let wall = after.at.saturating_duration_since(before.at).as_secs_f64();
    if wall <= 0.0 {
        return f64::NAN;
    }
    after.cpu.saturating_sub(before.cpu).as_secs_f64() / wall * 100.0
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib, "{s:?}");
        assert_eq!(status_kib("VmHWM:\t  1234 kB\n", "VmHWM:"), 1234);
    }
}
