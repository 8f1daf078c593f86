//! Under systemd: does the unit give the agent the time its config says it needs to stop?
//! `TimeoutStopSec` shorter than `job.stop_deadline_secs` means systemd SIGKILLs the agent
//! in the middle of the final sync; `TimeoutStopSec` shorter than `control_plane.give_up_secs`
//! means a stop on a path no stop deadline bounds (the panic path's reports) is killed while
//! it still has reports to send. Said once, at start, instead of discovered in an incident.

use std::time::Duration;

/// The unit this process runs in (`c3-agent@job1.service`), from its cgroup path.
fn own_unit() -> Option<String> {
    std::env::var_os("INVOCATION_ID")?;
    // For the test that the check's `systemctl` is none of the job's processes.
    if c3_runtime::fault::armed("unitcheck-in-a-unit") {
        return Some("c3-agent@test.service".into());
    }
    unit_of(&std::fs::read_to_string("/proc/self/cgroup").ok()?)
}

/// The unit of a `/proc/<pid>/cgroup`: the last `.service` of the unified (`0::`) path, for
/// the agent may sit in a leaf below its unit's cgroup (`.../c3-agent@j.service/c3-agent`).
/// Without a unified line (a pure cgroup-v1 host) there is no answer and the check is skipped.
fn unit_of(cgroup_text: &str) -> Option<String> {
    let path = cgroup_text.lines().find_map(|l| l.strip_prefix("0::"))?;
    path.split('/')
        .rev()
        .find(|c| c.ends_with(".service"))
        .map(str::to_string)
}

/// Warns if the unit's stop timeout is shorter than what the agent may take to stop, and
/// if the stop deadline leaves no time for a final sync after the kill grace.
pub async fn warn_if_stop_timeout_too_short(
    stop_deadline: Duration,
    kill_grace: Duration,
    give_up: Option<Duration>,
) {
    if stop_deadline <= kill_grace {
        tracing::warn!(
            stop_deadline_secs = stop_deadline.as_secs(),
            kill_grace_secs = kill_grace.as_secs(),
            "job.stop_deadline_secs is not longer than kill_grace_secs: a canceled job gets no final sync (it is left to `c3-agent recover`)"
        );
    }
    let Some(unit) = own_unit() else { return };
    let mut command = std::process::Command::new("systemctl");
    command.args(["show", "--property=TimeoutStopUSec", "--value", &unit]);
    // It runs while the job does: as a known helper of the agent's, or it would be counted
    // among the job's processes (the agent's descendants), signalled on a stop, and its exit
    // taken by the orphan reaper.
    let Ok(out) = c3_runtime::helper::ask(command, Duration::from_secs(2)).await else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(timeout) = parse_timespan(text.trim()) else {
        return;
    };
    if timeout < stop_deadline.max(kill_grace) {
        tracing::warn!(
            unit = %unit,
            timeout_stop_secs = timeout.as_secs_f64(),
            stop_deadline_secs = stop_deadline.as_secs(),
            "the unit's stop timeout (TimeoutStopSec) is shorter than job.stop_deadline_secs: on a cancel systemd would kill the agent during the final sync; raise TimeoutStopSec or lower C3_AGENT_STOP_DEADLINE_SECS"
        );
    }
    if let Some(give_up) = give_up.filter(|&g| timeout < g) {
        tracing::warn!(
            unit = %unit,
            timeout_stop_secs = timeout.as_secs_f64(),
            give_up_secs = give_up.as_secs(),
            "the unit's stop timeout (TimeoutStopSec) is shorter than control_plane.give_up_secs: a stop while reports are retried outside the stop deadline (after an agent's panic) is killed before they are kept; raise TimeoutStopSec or lower C3_AGENT_GIVE_UP_SECS"
        );
    }
}

/// systemd's time spans as `systemctl show` prints them: `5min`, `1min 30s`, `300ms`,
/// `infinity` (None: no limit to compare with).
fn parse_timespan(text: &str) -> Option<Duration> {
    if text.is_empty() || text == "infinity" {
        return None;
    }
    let mut total = 0f64;
    for token in text.split_whitespace() {
        let split = token
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(token.len());
        let (num, unit) = token.split_at(split);
        let n: f64 = num.parse().ok()?;
        let secs = match unit {
            "us" | "usec" | "µs" => 1e-6,
            "ms" | "msec" => 1e-3,
            "" | "s" | "sec" | "second" | "seconds" => 1.0,
            "m" | "min" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            "w" | "week" | "weeks" => 604800.0,
            _ => return None,
        };
        total += n * secs;
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_time_spans() {
        assert_eq!(parse_timespan("5min"), Some(Duration::from_secs(300)));
        assert_eq!(parse_timespan("1min 30s"), Some(Duration::from_secs(90)));
        assert_eq!(
            parse_timespan("1h 2min 3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_timespan("300ms"), Some(Duration::from_millis(300)));
        assert_eq!(parse_timespan("infinity"), None);
        assert_eq!(parse_timespan("soon"), None);
    }

    #[test]
    fn the_unit_comes_from_the_unified_cgroup_line() {
        assert_eq!(
            unit_of("0::/system.slice/system-c3\\x2dagent.slice/c3-agent@j1.service\n").as_deref(),
            Some("c3-agent@j1.service")
        );
        // A leaf below the unit's cgroup (processes may not sit in an inner node with children).
        assert_eq!(
            unit_of("0::/system.slice/c3-agent@j.service/c3-agent\n").as_deref(),
            Some("c3-agent@j.service")
        );
        // Hybrid: v1 controllers name other paths; only the unified line counts.
        let hybrid = "12:memory:/system.slice/other.service\n\
                      1:name=systemd:/system.slice/other.service\n\
                      0::/system.slice/c3-agent@h.service\n";
        assert_eq!(unit_of(hybrid).as_deref(), Some("c3-agent@h.service"));
        assert_eq!(
            unit_of("1:name=systemd:/system.slice/c3-agent@v1.service\n"),
            None
        );
        assert_eq!(
            unit_of("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(unit_of("0::/\n"), None);
        assert_eq!(unit_of(""), None);
    }
}
