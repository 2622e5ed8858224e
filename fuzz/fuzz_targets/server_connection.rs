//! A whole server `Connection` fed arbitrary client bytes in chunks (see the
//! input format in `fuzz/src/lib.rs`): it must never panic, and after EOF it
//! must be closed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walkie_proto::Role;

fuzz_target!(|data: &[u8]| walkie_fuzz::run_connection(Role::Server, data));
