//! A fast path for decoding the JSON profile message as producers write it: the three fields,
//! in any order, strings without escapes, the timestamp a plain integer. It finds the fields
//! with a byte scan, because serde_json's generic deserializer took a large share of the
//! dataflow's CPU per message (docs/performance.md, "figures from code comments").
//!
//! It never decides anything serde_json would decide otherwise: anything it does not expect
//! (an escape, a control character, an unknown or repeated key, a number with a sign, fraction,
//! exponent or leading zero, a timestamp beyond 2^53, a missing field, trailing bytes) makes it
//! give up with `None`, and the caller decodes the message with serde_json, which gives the
//! value or the reason it is invalid. A property test checks on mutated and random messages
//! that whatever it returns is what serde_json returns.

use std::borrow::Cow;

use crate::message::{ProfileMessageView, MAX_TIMESTAMP};

/// The message, if `text` is one of the plain forms this path reads; `None` for anything else,
/// valid or not.
pub(crate) fn decode(text: &str) -> Option<ProfileMessageView<'_>> {
    let mut scan = Scan {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    scan.skip_whitespace();
    scan.expect(b'{')?;
    let (mut user_id, mut history_items, mut timestamp) = (None, None, None);
    loop {
        scan.skip_whitespace();
        let key = scan.string()?;
        scan.skip_whitespace();
        scan.expect(b':')?;
        scan.skip_whitespace();
        match key {
            "user_id" if user_id.is_none() => user_id = Some(scan.string()?),
            "history_items" if history_items.is_none() => history_items = Some(scan.strings()?),
            "timestamp" if timestamp.is_none() => timestamp = Some(scan.timestamp()?),
            _ => return None,
        }
        scan.skip_whitespace();
        match scan.next()? {
            b',' => continue,
            b'}' => break,
            _ => return None,
        }
    }
    scan.skip_whitespace();
    if scan.at != scan.bytes.len() {
        return None;
    }
    Some(ProfileMessageView {
        user_id: Cow::Borrowed(user_id?),
        history_items: history_items?,
        timestamp: timestamp?,
    })
}

struct Scan<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn next(&mut self) -> Option<u8> {
        let byte = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(byte)
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.next()? == byte).then_some(())
    }

    /// JSON's whitespace: space, tab, line feed, carriage return.
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// A string without escapes or control characters, borrowed from the text. The text is
    /// UTF-8 already, and no byte of a multi-byte character is below 0x80, so a quote or a
    /// backslash byte is always the character itself.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            match self.next()? {
                b'"' => return self.text.get(start..self.at - 1),
                b'\\' | 0x00..=0x1f => return None,
                _ => {}
            }
        }
    }

    /// An array of such strings.
    fn strings(&mut self) -> Option<Vec<Cow<'a, str>>> {
        self.expect(b'[')?;
        let mut strings = Vec::with_capacity(64);
        self.skip_whitespace();
        if self.bytes.get(self.at) == Some(&b']') {
            self.at += 1;
            return Some(strings);
        }
        loop {
            strings.push(Cow::Borrowed(self.string()?));
            self.skip_whitespace();
            match self.next()? {
                b',' => self.skip_whitespace(),
                b']' => return Some(strings),
                _ => return None,
            }
        }
    }

    /// A non-negative integer up to 2^53 without sign, fraction, exponent or leading zero.
    /// What follows it is left to the caller, which accepts only a delimiter, so `1.5` or
    /// `1e3` give up there.
    fn timestamp(&mut self) -> Option<u64> {
        let start = self.at;
        let mut value: u64 = 0;
        while let Some(&digit @ b'0'..=b'9') = self.bytes.get(self.at) {
            value = value
                .checked_mul(10)?
                .checked_add(u64::from(digit - b'0'))?;
            self.at += 1;
        }
        let digits = self.at - start;
        if digits == 0 || (digits > 1 && self.bytes[start] == b'0') || value > MAX_TIMESTAMP {
            return None;
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    /// What serde_json makes of `text`: the view, or `None` for an invalid message.
    fn by_serde(text: &str) -> Option<ProfileMessageView<'_>> {
        ProfileMessageView::decode_json_with_serde(text).ok()
    }

    /// The fast path never disagrees with serde_json: whatever it returns, serde_json returns.
    fn check(text: &str) -> bool {
        match decode(text) {
            Some(fast) => {
                assert_eq!(Some(&fast), by_serde(text).as_ref(), "{text:?}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn reads_the_plain_forms() {
        for text in [
            r#"{"user_id": "A34O9UGRTZNTR8", "history_items": ["0553213113", "B000FC1PJI"], "timestamp": 1456923842}"#,
            r#"{"timestamp":0,"history_items":[],"user_id":"é"}"#,
            " {\n\t\"history_items\" : [ \"x\" ,\"y\" ] ,\r\"timestamp\":9007199254740992,\"user_id\":\"u\"} \n",
        ] {
            assert!(check(text), "{text:?}");
        }
        let view = decode(r#"{"user_id":"u","history_items":["a","b"],"timestamp":7}"#).unwrap();
        assert_eq!(view.user_id, "u");
        assert_eq!(view.history_items, ["a", "b"]);
        assert_eq!(view.timestamp, 7);
    }

    #[test]
    fn gives_up_on_everything_else() {
        for text in [
            r#"{"user_id":"a\"b","history_items":[],"timestamp":1}"#,
            r#"{"user_id":"u","history_items":["\u0041"],"timestamp":1}"#,
            r#"{"user\u005fid":"u","history_items":[],"timestamp":1}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":1,"extra":2}"#,
            r#"{"user_id":"u","user_id":"v","history_items":[],"timestamp":1}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":-1}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":1.0}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":1e3}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":01}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":9007199254740993}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":99999999999999999999999}"#,
            r#"{"user_id":"u","history_items":["a",],"timestamp":1}"#,
            r#"{"user_id":"u","history_items":[1],"timestamp":1}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":1,}"#,
            r#"{"user_id":"u","history_items":[]}"#,
            r#"{"user_id":"u","history_items":[],"timestamp":1} x"#,
            r#"{"user_id":"u","history_items":[],"timestamp":"1"}"#,
            "{\"user_id\":\"a\tb\",\"history_items\":[],\"timestamp\":1}",
            "{\"user_id\":\"u\",\"history_items\":[],\"timestamp\":1}\u{a0}",
            r#"[]"#,
            "",
        ] {
            assert!(decode(text).is_none(), "{text:?}");
        }
    }

    /// Messages as producers write them, then bent in every way the grammar allows and many it
    /// does not: whatever the fast path reads must be what serde_json reads.
    #[test]
    fn never_disagrees_with_serde_json_on_random_and_mutated_messages() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let pieces = [
            "\"",
            "\\",
            "\\\"",
            "\\u00e9",
            ",",
            ":",
            "[",
            "]",
            "{",
            "}",
            " ",
            "\n",
            "-",
            ".",
            "e",
            "0",
            "9",
            "é",
            "\u{1f600}",
            "\t",
            "\u{1}",
            "null",
            "true",
            "1.5",
        ];
        let mut read = 0;
        for _ in 0..20_000 {
            let ids: Vec<String> = (0..rng.random_range(0..6))
                .map(|_| {
                    (0..rng.random_range(0..5))
                        .map(|_| {
                            ["a", "Z", "0", "é", "\u{1f600}", "-", " "][rng.random_range(0..7)]
                        })
                        .collect()
                })
                .collect();
            let message = serde_json::json!({
                "user_id": if rng.random_bool(0.9) { "user-1" } else { "" },
                "history_items": ids,
                "timestamp": rng.random_range(0..=(1u64 << 54)),
            });
            let mut text = if rng.random_bool(0.5) {
                message.to_string()
            } else {
                serde_json::to_string_pretty(&message).unwrap()
            };
            // Mutate: insert, replace or delete a few pieces at random places.
            for _ in 0..rng.random_range(0..3) {
                let mut at = rng.random_range(0..=text.len());
                while !text.is_char_boundary(at) {
                    at -= 1;
                }
                match rng.random_range(0..3) {
                    0 => text.insert_str(at, pieces[rng.random_range(0..pieces.len())]),
                    1 => {
                        if let Some(c) = text[at..].chars().next() {
                            text.replace_range(at..at + c.len_utf8(), "");
                        }
                    }
                    _ => text.truncate(at),
                }
            }
            if check(&text) {
                read += 1;
            }
        }
        assert!(read > 3_000, "the fast path read only {read} of 20,000");
    }
}
