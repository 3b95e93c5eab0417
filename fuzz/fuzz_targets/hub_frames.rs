#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cla_fuzz::hub_frames(data));
