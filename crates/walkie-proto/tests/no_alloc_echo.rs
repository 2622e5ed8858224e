//! The echo path allocates nothing per message once warm: decode a masked
//! text message, hand it back with `send`, write it out.
//!
//! A counting global allocator is installed for this test binary only. It
//! counts the measuring thread's allocations alone: the test harness's own
//! threads may allocate at any time (seen on a loaded machine).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use walkie_proto::{Buf, Config, Connection, Event, Role};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread's allocations count (const-initialized: reading
    /// it never allocates).
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTED.with(Cell::get) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn echoing_small_messages_allocates_nothing_once_warm() {
    let now = Instant::now();
    let mut client = Connection::new(Role::Client, Config::default(), None, now);
    let mut server = Connection::new(Role::Server, Config::default(), None, now);
    // What a client sends: 32-byte masked text frames, encoded once.
    client.send_text(&"x".repeat(32)).unwrap();
    let out = client.data_to_send();
    let frame = out.copy_to_bytes(out.remaining());
    let mut sink = 0usize;
    let mut echo_round = |server: &mut Connection| {
        server.handle_data(now, &frame);
        while let Ok(Some(Event::Message(m))) = server.poll_event() {
            server.send(m).unwrap();
        }
        let out = server.data_to_send();
        sink += out.remaining();
        let n = out.remaining();
        out.advance(n);
    };
    for _ in 0..100 {
        echo_round(&mut server);
    }
    COUNTED.with(|c| c.set(true));
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..10_000 {
        echo_round(&mut server);
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    COUNTED.with(|c| c.set(false));
    assert!(sink > 0);
    assert_eq!(
        allocations, 0,
        "{allocations} allocations for 10,000 echoed messages"
    );
}
