//! Ctrl-C while training: the first press stops training cleanly, the second ends the process.

/// Set by the first Ctrl-C while training: training stops after its current step and saves the
/// best epoch so far. A second Ctrl-C ends the process at once.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    // Only async-signal-safe work here: an atomic swap, and `_exit` on the second press.
    if STOP.swap(true, std::sync::atomic::Ordering::SeqCst) {
        // SAFETY: `_exit` is async-signal-safe and ends the process without running handlers.
        unsafe { libc::_exit(130) };
    }
}

/// From now on, Ctrl-C asks training to stop cleanly (see [`STOP`]).
pub fn stop_on_interrupt() {
    #[cfg(unix)]
    // SAFETY: installs a handler that touches only an atomic and `_exit`.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
    }
}

/// Whether Ctrl-C was pressed since [`stop_on_interrupt`].
pub fn interrupted() -> bool {
    STOP.load(std::sync::atomic::Ordering::SeqCst)
}
