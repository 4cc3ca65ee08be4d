//! The proxy-wasm pairs decoder on arbitrary bytes: never panics, and whatever it decodes
//! encodes back to the same pairs.

#![no_main]

use libfuzzer_sys::fuzz_target;
use packet_inspector_filter::pairs::{decode, encode};

fuzz_target!(|input: &[u8]| {
    if let Ok(pairs) = decode(input) {
        let again = encode(&pairs);
        assert_eq!(decode(&again).expect("re-encoded pairs decode"), pairs);
    }
});
