//! `flowprobe run --config FILE`: arbitrary TOML gives the settings or one
//! error message (with the line when the parser knows it), never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../probe/src/settings/file.rs"]
#[allow(dead_code)]
mod file;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = file::RunConfig::parse(text) {
        assert!(!e.is_empty());
    }
});
