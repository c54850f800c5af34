//! Freed memory given back to the system while the gateway is idle.
//!
//! The binary allocates with mimalloc (`src/main.rs`), which hands freed pages back to the system
//! only a while after they were freed (its `purge_delay`, 1 s) and looks for pages that are due
//! only from inside its own calls. A gateway that went idle after a burst of requests therefore
//! kept all that the burst had freed resident until its next busy stretch: an idle keep-alive
//! connection seemed to hold 5.5 to 6.3 KiB instead of 3.6 to 3.8 (README, "Performance").
//! Giving pages back at once instead (`purge_delay` 0) cost about a third more CPU per request
//! under load, as pages freed and needed again a moment later went back and forth. So a delay
//! stays, shorter ([`set_purge_delay`]), and [`give_back_freed_memory`] asks for what is due
//! every [`GIVE_BACK_EVERY`].

use std::time::Duration;

/// How long mimalloc keeps a freed page before giving it back (its own default: 1 s).
pub const PURGE_DELAY: Duration = Duration::from_millis(100);

/// How often freed memory whose purge delay has passed is given back.
pub const GIVE_BACK_EVERY: Duration = Duration::from_millis(250);

/// `mi_option_purge_delay` in `mimalloc.h`'s `mi_option_t` (the Rust bindings name only some),
/// 15 in both v2 and v3: mimalloc keeps the numbering, retired options stay as `deprecated_*`.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets mimalloc's purge delay to [`PURGE_DELAY`], unless `MIMALLOC_PURGE_DELAY` is set in the
/// environment (mimalloc's own setting, in milliseconds, then stays in force). Call before any
/// other thread starts: mimalloc's options are not synchronised.
#[allow(unsafe_code)]
pub fn set_purge_delay() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: no pointers are passed; called before other threads exist (see above).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY.as_millis() as _) };
}

/// mimalloc's purge delay in force, in milliseconds.
#[allow(unsafe_code)]
pub fn purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: reads an option; no pointers are passed.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

/// Runs for the life of the runtime: once every [`GIVE_BACK_EVERY`], mimalloc collects what is
/// due. The purge covers the whole process (its arenas are shared); the calling thread's own
/// empty pages are freed too. Nothing is given back before its delay: under load this only does
/// what mimalloc's own calls would have done a moment later. With another global allocator this
/// finds nothing of mimalloc's to collect.
#[allow(unsafe_code)]
pub async fn give_back_freed_memory() {
    let mut tick = tokio::time::interval(GIVE_BACK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: `mi_collect` takes no pointers; it works on the calling thread's heap and on
        // the process's arenas, which mimalloc synchronises itself.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}
