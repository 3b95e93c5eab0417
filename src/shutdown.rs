//! Process-wide shutdown: one [`CancellationToken`] cancelled by SIGINT or SIGTERM (on Windows: Ctrl-C,
//! Ctrl-Break or closing the console).
//! Sessions, jobs and connections get `child_token()`s and `select!` on `cancelled()`.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled on the first SIGINT/SIGTERM. Must be called inside a tokio runtime.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        t.cancel();
    });
    token
}

/// Keeps SIGHUP from terminating the process before the worker listens for it (tokio's handler, once
/// registered, stays for the life of the process; until a listener exists the signal is ignored).
pub fn hold_sighup() {
    #[cfg(unix)]
    let _ = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("cannot install the SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(windows)]
    {
        // Ctrl-C, Ctrl-Break and closing the console window all mean "drain and exit".
        use tokio::signal::windows::{ctrl_break, ctrl_close};
        match (ctrl_break(), ctrl_close()) {
            (Ok(mut brk), Ok(mut close)) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = brk.recv() => {}
                    _ = close.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
