//! systemd's notify protocol (`Type=notify`): READY once the job is launched, a one-line
//! STATUS for `systemctl status`, watchdog pings. Every call is a no-op outside systemd
//! (no `NOTIFY_SOCKET`); the job never gets the socket (`launch::child_env`).

use std::time::Duration;

use sd_notify::NotifyState;

/// The job is launched: `systemctl start` returns.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status(status)]);
}

/// What `systemctl status` shows under "Status:".
pub fn status(text: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(text)]);
}

/// With `WatchdogSec=` set, pings at half the interval until the process ends: a hung
/// agent is stopped by systemd (and its job finished by `recover`), a busy one is not.
pub fn keep_watchdog_fed() {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    });
}
