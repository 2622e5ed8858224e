//! SIGHUP with `--tls-cert`: reads the certificate and key again (a
//! renewed certificate), for every later handshake; connections already
//! open keep theirs. A file that cannot be read or does not match keeps
//! the current certificate in use, and the error is logged.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use walkie::tls::ReloadableCert;

/// SIGHUP, registered with the OS when made.
pub struct Reloads {
    cert: Arc<ReloadableCert>,
    #[cfg(unix)]
    hangups: tokio::signal::unix::Signal,
}

impl Reloads {
    /// Registers for SIGHUP (`None`, logged, where that fails); must run
    /// inside the runtime that will run [`Reloads::run`], and before the
    /// server says it listens: a SIGHUP sent the moment after must reload,
    /// not kill it.
    pub fn register(cert: Arc<ReloadableCert>) -> Option<Reloads> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::hangup()) {
                Ok(hangups) => Some(Reloads { cert, hangups }),
                Err(e) => {
                    tracing::error!("cannot listen for SIGHUP (TLS certificate reloads): {e}");
                    None
                }
            }
        }
        #[cfg(not(unix))]
        Some(Reloads { cert })
    }

    /// Reloads the certificate on each SIGHUP, until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        #[cfg(unix)]
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                received = self.hangups.recv() => if received.is_none() { return },
            }
            let path = self.cert.cert_path().display();
            match self.cert.reload() {
                Ok(chain) => tracing::info!(
                    "SIGHUP: TLS certificate reloaded from {path} ({chain} certificate(s) in the chain)"
                ),
                Err(e) => tracing::error!(
                    "SIGHUP: cannot reload the TLS certificate, keeping the current one: {e}"
                ),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (&mut self, shutdown);
        }
    }
}
