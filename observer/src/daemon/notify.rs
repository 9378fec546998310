//! The agent's side of systemd's notify protocol (`sd_notify(3)`): `READY=1` once ready,
//! `WATCHDOG=1` from the main loop, `STOPPING=1` on shutdown.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by
//! `$NOTIFY_SOCKET` (a leading `@` names an abstract socket). Outside systemd, or in a unit
//! that is not `Type=notify`, the variable is unset and every call does nothing. The watchdog
//! is petted at half of `$WATCHDOG_USEC`, and only from the main loop, so a stuck loop
//! stops the pets and systemd restarts the agent.

use std::{
    ffi::OsStr,
    io,
    os::unix::{
        ffi::OsStrExt as _,
        net::{SocketAddr, UnixDatagram},
    },
    time::{Duration, Instant},
};

use tracing::{debug, warn};

/// Sends notifications to systemd, if it listens.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Time between two pets: half of `WATCHDOG_USEC`, when the watchdog is on for us.
    watchdog_every: Option<Duration>,
    last_pet: Option<Instant>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Self::from_vars(
            socket.as_deref(),
            usec.as_deref(),
            pid.as_deref(),
            std::process::id(),
        )
    }

    /// Like [`Notifier::from_env`], from the variables' values; `own_pid` is this process's.
    pub fn from_vars(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Self {
        let target = notify_socket
            .filter(|s| !s.is_empty())
            .and_then(|s| match connect(s) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!(
                        "NOTIFY_SOCKET={} is unusable ({e}); systemd will not hear of readiness or watchdog pets",
                        s.to_string_lossy()
                    );
                    None
                }
            });
        // WATCHDOG_PID names the process the watchdog is meant for; without it, it is us.
        let for_us = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>() == Ok(own_pid));
        let watchdog_every = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us && target.is_some())
            .map(|u| Duration::from_micros(u) / 2);
        Self {
            target,
            watchdog_every,
            last_pet: None,
        }
    }

    /// Whether systemd listens to this process's notifications.
    pub fn is_active(&self) -> bool {
        self.target.is_some()
    }

    /// How often [`Notifier::pet_if_due`] pets the watchdog; `None` when it is off.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// Tells systemd that start-up is over, with a line for `systemctl status`.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}\n"));
    }

    /// Updates the line `systemctl status` shows.
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}\n"));
    }

    /// Tells systemd the agent is shutting down on purpose.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping\n");
    }

    /// Pets the watchdog if half its period has passed since the last pet. Call it from the
    /// main loop on every turn.
    pub fn pet_if_due(&mut self, now: Instant) {
        let Some(every) = self.watchdog_every else {
            return;
        };
        if self
            .last_pet
            .is_some_and(|last| now.saturating_duration_since(last) < every)
        {
            return;
        }
        self.last_pet = Some(now);
        self.send("WATCHDOG=1\n");
    }

    fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        // Non-blocking: a full queue at systemd loses one message rather than the loop.
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            debug!("sd_notify `{}` failed: {e}", message.trim_end());
        }
    }
}

fn connect(path: &OsStr) -> io::Result<(UnixDatagram, SocketAddr)> {
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name)?
        }
        None if bytes.starts_with(b"/") => SocketAddr::from_pathname(path)?,
        None => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only absolute paths and @abstract names are supported",
            ));
        }
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    fn listener() -> (UnixDatagram, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "observer-notify-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (socket, path)
    }

    #[test]
    fn ready_watchdog_and_stopping_reach_the_socket() {
        let (socket, path) = listener();
        let mut notifier = Notifier::from_vars(Some(path.as_os_str()), Some("2000000"), None, 1);
        assert_eq!(notifier.watchdog_every(), Some(Duration::from_secs(1)));
        notifier.ready("watching");
        assert_eq!(receive(&socket), "READY=1\nSTATUS=watching\n");
        let t0 = Instant::now();
        notifier.pet_if_due(t0);
        assert_eq!(receive(&socket), "WATCHDOG=1\n");
        // Not due again until half the period has passed.
        notifier.pet_if_due(t0 + Duration::from_millis(500));
        notifier.pet_if_due(t0 + Duration::from_secs(1));
        assert_eq!(receive(&socket), "WATCHDOG=1\n");
        notifier.stopping();
        assert_eq!(receive(&socket), "STOPPING=1\nSTATUS=stopping\n");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn abstract_sockets_are_supported() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("observer-notify-test-{}", std::process::id());
        let socket =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = Notifier::from_vars(Some(OsStr::new(&format!("@{name}"))), None, None, 1);
        notifier.ready("ok");
        assert_eq!(receive(&socket), "READY=1\nSTATUS=ok\n");
    }

    #[test]
    fn watchdog_of_another_process_or_without_socket_is_ignored() {
        let (_socket, path) = listener();
        let other = Notifier::from_vars(Some(path.as_os_str()), Some("2000000"), Some("7"), 1);
        assert_eq!(other.watchdog_every(), None);
        let ours = Notifier::from_vars(Some(path.as_os_str()), Some("2000000"), Some("1"), 1);
        assert!(ours.watchdog_every().is_some());
        let outside = Notifier::from_vars(None, Some("2000000"), None, 1);
        assert!(!outside.is_active());
        assert_eq!(outside.watchdog_every(), None);
        outside.ready("nobody listens");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
