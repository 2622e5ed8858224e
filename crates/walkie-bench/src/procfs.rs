//! What the kernel says about a server process: CPU time and resident memory.

use std::io;

/// A process's CPU clock: user plus system time of all its threads, the
/// ones that have exited included, read to the nanosecond from the
/// kernel's process CPU clock (`clock_getcpuclockid`, `clock_gettime`);
/// or, where that clock cannot be had, from `/proc/PID/stat` in whole
/// clock ticks (10 ms), with [`CpuClock::fallback`] saying why.
///
/// Ticks are too coarse for CPU per message: at 5,000 messages per second
/// over 5 s, one tick is 0.4 us per message.
#[derive(Debug, Clone)]
pub struct CpuClock {
    pid: u32,
    clock: Option<libc::clockid_t>,
    /// Why the precise clock could not be had (`None`: it is used).
    pub fallback: Option<String>,
}

impl CpuClock {
    /// The CPU clock of process `pid` (any process the kernel lets us see:
    /// no permission is needed to read another process's CPU clock).
    pub fn of(pid: u32) -> CpuClock {
        match process_clock(pid) {
            Ok(clock) => CpuClock {
                pid,
                clock: Some(clock),
                fallback: None,
            },
            Err(e) => CpuClock {
                pid,
                clock: None,
                fallback: Some(format!(
                    "CPU time from /proc in 10 ms ticks: clock_getcpuclockid({pid}): {e}"
                )),
            },
        }
    }

    /// The process's CPU time so far, in seconds.
    pub fn seconds(&self) -> io::Result<f64> {
        match self.clock {
            Some(clock) => clock_seconds(clock),
            None => cpu_seconds(self.pid),
        }
    }
}

/// The CPU clock of process `pid`, checked by one read.
fn process_clock(pid: u32) -> io::Result<libc::clockid_t> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is valid for the function to write.
    let r = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    clock_seconds(clock)?;
    Ok(clock)
}

/// Reads a clock, in seconds.
fn clock_seconds(clock: libc::clockid_t) -> io::Result<f64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for the kernel to write.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

/// User plus system CPU time of every thread of `pid`, in seconds, in
/// whole clock ticks (10 ms): [`CpuClock`]'s fallback.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may contain spaces: fields
    // are counted after the last ')'. utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> io::Result<f64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| io::Error::other("malformed /proc stat field"))
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((field(14)? + field(15)?) / ticks)
}

/// CPU time the whole machine spent busy (everything but idle and I/O
/// wait, interrupts included), all cores together, in seconds: what other
/// processes did during a run shows as the excess over the server's and
/// the load generator's own time.
pub fn machine_busy_seconds() -> io::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| io::Error::other("no cpu line in /proc/stat"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    if v.len() < 8 {
        return Err(io::Error::other("malformed /proc/stat"));
    }
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(busy / ticks)
}

/// Resident set size of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::other("no VmRSS in /proc status"))
}

/// Raises this process's open-file limit as far as the hard limit allows;
/// children inherit it. Returns the new soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for the kernel to fill and read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::CpuClock;

    #[test]
    fn reads_our_own_process() {
        let pid = std::process::id();
        assert!(super::cpu_seconds(pid).unwrap() >= 0.0);
        assert!(super::rss_bytes(pid).unwrap() > 0);
        assert!(super::machine_busy_seconds().unwrap() > 0.0);
        let clock = CpuClock::of(pid);
        assert_eq!(clock.fallback, None);
        assert!(clock.seconds().unwrap() > 0.0);
    }

    /// Another process's clock, to the nanosecond, counting the CPU time of
    /// a thread that has exited: a child that spins in a thread, ends the
    /// thread, then sleeps.
    #[test]
    fn reads_another_process_including_exited_threads() {
        let spin = "import threading, time\n\
def spin():\n    end = time.process_time() + 0.3\n    while time.process_time() < end: pass\n\
t = threading.Thread(target=spin); t.start(); t.join()\n\
print('done', flush=True); time.sleep(30)\n";
        let Ok(mut child) = std::process::Command::new("python3")
            .args(["-c", spin])
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("no python3: skipped");
            return;
        };
        let clock = CpuClock::of(child.id());
        assert_eq!(clock.fallback, None);
        let mut line = String::new();
        let stdout = child.stdout.take().unwrap();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert_eq!(line.trim(), "done");
        let (a, b) = (clock.seconds().unwrap(), clock.seconds().unwrap());
        let ticks = super::cpu_seconds(child.id()).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        // The spinning thread's 0.3 s are in, although it has exited.
        assert!(a >= 0.3, "{a}");
        // The process sleeps: the clock stands still, and /proc agrees to
        // a tick or two.
        assert!(b - a < 0.005, "{a} {b}");
        assert!((a - ticks).abs() < 0.03, "{a} vs {ticks} from /proc");
    }
}
