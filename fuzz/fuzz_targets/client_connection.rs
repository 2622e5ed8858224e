//! A whole client `Connection` fed arbitrary server bytes (unmasked frames)
//! in chunks (see the input format in `fuzz/src/lib.rs`): it must never
//! panic, and after EOF it must be closed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walkie_proto::Role;

fuzz_target!(|data: &[u8]| walkie_fuzz::run_connection(Role::Client, data));
