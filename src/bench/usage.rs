//! CPU and disk counters of the node processes, of this process and of the
//! whole machine, read from /proc at one instant. Two of them say what a
//! measurement used, and so what limited it.

use super::*;

pub struct Usage {
    at: Instant,
    /// Per node: (pid, CPU seconds, bytes written to disk); `None`
    /// while the node is down.
    nodes: Vec<Option<(u32, f64, u64)>>,
    own_cpu: f64,
    /// Machine jiffies since boot: (busy, iowait, total).
    machine: (u64, u64, u64),
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf reads a constant of the running system.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// User + system CPU seconds of process `pid` ("self" for this one).
pub fn cpu_secs(pid: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime and stime are fields 14 and 15.
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / ticks_per_sec())
}

/// Bytes process `pid` caused to be written to storage.
fn write_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

fn machine() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    // user nice system idle iowait irq softirq steal
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return (0, 0, 0);
    }
    let total: u64 = v.iter().sum();
    (total - v[3] - v[4], v[4], total)
}

impl Usage {
    pub fn now(cluster: &Cluster) -> Usage {
        let nodes = cluster
            .ids()
            .map(|id| {
                let pid = cluster.pid(id)?;
                Some((
                    pid,
                    cpu_secs(&pid.to_string()).unwrap_or(0.0),
                    write_bytes(pid).unwrap_or(0),
                ))
            })
            .collect();
        Usage {
            at: Instant::now(),
            nodes,
            own_cpu: cpu_secs("self").unwrap_or(0.0),
            machine: machine(),
        }
    }

    /// What was used from `self` to `later`, as one line of Markdown.
    pub fn until(&self, later: &Usage) -> String {
        let wall = (later.at - self.at).as_secs_f64().max(1e-9);
        let mut cpu = Vec::new();
        let mut disk = Vec::new();
        for (before, after) in self.nodes.iter().zip(&later.nodes) {
            let Some((pid, c1, w1)) = after else {
                cpu.push("down".to_string());
                disk.push("down".to_string());
                continue;
            };
            // A node restarted in between counts from its start.
            let (c0, w0) = match before {
                Some((p, c, w)) if p == pid => (*c, *w),
                _ => (0.0, 0),
            };
            cpu.push(format!("{:.0}", (c1 - c0) / wall * 100.0));
            disk.push(format!("{:.0}", (w1.saturating_sub(w0)) as f64 / 1e6));
        }
        let (b0, i0, t0) = self.machine;
        let (b1, i1, t1) = later.machine;
        let dt = (t1.saturating_sub(t0)).max(1) as f64;
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        format!(
            "node CPU (nodes {}): {} % of one core; bench process {:.0} %; machine busy {:.0} % and iowait {:.0} % of its {cpus} CPUs; node disk writes {} MB",
            (1..=cpu.len()).map(|i| i.to_string()).collect::<Vec<_>>().join("/"),
            cpu.join("/"),
            (later.own_cpu - self.own_cpu) / wall * 100.0,
            (b1.saturating_sub(b0)) as f64 / dt * 100.0,
            (i1.saturating_sub(i0)) as f64 / dt * 100.0,
            disk.join("/"),
        )
    }
}

/// CPU count and model, memory and kernel of this machine.
pub fn machine_line() -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(str::trim)
        .unwrap_or("unknown CPU");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), {:.1} GiB RAM, Linux {}",
        mem_kib / (1024.0 * 1024.0),
        kernel.trim()
    )
}

/// The 1, 5 and 15 minute load averages.
/// Prints a bench table's machine line, with the load average at its start.
pub fn print_machine(load_before: &str) {
    println!("Machine: {}; load average {load_before} at the start\n", machine_line());
}

pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}
