//! The pcap/pcapng reader of `flowprobe replay`, on arbitrary files: it
//! stops with an error or delivers frames that lie within the file, with
//! progress that only moves forward.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../probe/src/sources/file/pcap.rs"]
#[allow(dead_code)]
mod pcap;

fuzz_target!(|data: &[u8]| {
    let mut last = 0usize;
    let mut frames = 0usize;
    let result = pcap::read_frames(
        data,
        |f| {
            frames += 1;
            assert!(f.data.len() <= data.len());
            assert!(f.wire_len as usize >= f.data.len() || f.wire_len == 0, "{f:?}");
        },
        |at| {
            assert!(at >= last && at <= data.len(), "{at} after {last}");
            last = at;
        },
    );
    if let Err(e) = result {
        assert!(e.offset <= data.len(), "{e:?}");
        assert!(!e.to_string().is_empty());
    }
});
