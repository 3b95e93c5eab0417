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
        // Ctrl-C, Ctrl-Break, closing the console window and `cla-worker stop` (the stop event) all
        // mean "drain and exit".
        use tokio::signal::windows::{ctrl_break, ctrl_close};
        let stop = stop_event::wait();
        match (ctrl_break(), ctrl_close()) {
            (Ok(mut brk), Ok(mut close)) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = brk.recv() => {}
                    _ = close.recv() => {}
                    _ = stop => {}
                }
            }
            _ => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = stop => {}
                }
            }
        }
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Windows has no SIGTERM: a background worker (`cla-worker start`) waits on a named event of its own,
/// `Local\cla-worker-stop-PID`, which `cla-worker stop` sets. (As a service, the Service Control Manager's
/// stop request does the same.)
#[cfg(windows)]
pub mod stop_event {
    use windows_sys::Win32::Foundation::{CloseHandle, HANDLE, WAIT_OBJECT_0};
    use windows_sys::Win32::System::Threading::{
        CreateEventW, EVENT_MODIFY_STATE, INFINITE, OpenEventW, SetEvent, WaitForSingleObject,
    };

    fn name(pid: u32) -> Vec<u16> {
        format!("Local\\cla-worker-stop-{pid}\0").encode_utf16().collect()
    }

    /// Resolves when this process's stop event is set; never, if it cannot be created.
    pub async fn wait() {
        let name = name(std::process::id());
        // SAFETY: a NUL-terminated name; the handle is closed by the thread that waits on it.
        let event = unsafe { CreateEventW(std::ptr::null(), 1, 0, name.as_ptr()) } as usize;
        if event == 0 {
            tracing::warn!(
                "cannot create the stop event: {}",
                std::io::Error::last_os_error()
            );
            return std::future::pending().await;
        }
        let waited = tokio::task::spawn_blocking(move || {
            let event = event as HANDLE;
            // SAFETY: a valid event handle, owned here.
            let r = unsafe { WaitForSingleObject(event, INFINITE) };
            unsafe { CloseHandle(event) };
            r == WAIT_OBJECT_0
        })
        .await;
        if !matches!(waited, Ok(true)) {
            std::future::pending::<()>().await;
        }
    }

    /// Sets the stop event of worker `pid`.
    pub fn request(pid: u32) -> std::io::Result<()> {
        let name = name(pid);
        // SAFETY: a NUL-terminated name; the handle is closed before returning.
        unsafe {
            let event = OpenEventW(EVENT_MODIFY_STATE, 0, name.as_ptr());
            if event.is_null() {
                return Err(std::io::Error::last_os_error());
            }
            let ok = SetEvent(event);
            let err = std::io::Error::last_os_error();
            CloseHandle(event);
            if ok == 0 { Err(err) } else { Ok(()) }
        }
    }
}
