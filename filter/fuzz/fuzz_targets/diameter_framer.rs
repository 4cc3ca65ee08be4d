//! The Diameter framer on arbitrary bytes, split arbitrarily: it never panics, never buffers
//! more than one message, frames the same messages whatever the split, and every message it
//! yields has a valid header and the length that header states.

#![no_main]

use libfuzzer_sys::fuzz_target;
use packet_inspector_filter::diameter::{header, Event, Framer, HEADER_LEN};

const MAX: usize = 4096;

fuzz_target!(|input: &[u8]| {
    let Some((&split_seed, stream)) = input.split_first() else { return };
    let mut whole = Framer::new(MAX);
    let mut expected = whole.push(stream);
    expected.push(Event::Oversized { length: whole.finish() as u32 }); // partial tail, as a marker

    let mut pieces = Framer::new(MAX);
    let mut events = Vec::new();
    let mut rest = stream;
    let mut step = usize::from(split_seed % 31) + 1;
    while !rest.is_empty() {
        let n = step.min(rest.len());
        events.extend(pieces.push(&rest[..n]));
        rest = &rest[n..];
        step = step * 7 % 37 + 1;
    }
    events.push(Event::Oversized { length: pieces.finish() as u32 });
    assert_eq!(events, expected, "framing depends on how the stream was split");

    for event in &events {
        if let Event::Message(message) = event {
            assert!(message.len() >= HEADER_LEN && message.len() <= MAX && message.len() % 4 == 0);
            let parsed = header(message).expect("a whole message has a header");
            assert_eq!(parsed.length as usize, message.len());
        }
    }
});
