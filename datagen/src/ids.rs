//! Id shapes copied from the Amazon review data, so that anything sized or hashed on real ids
//! (interning, Redis keys, Kafka keys, CSV widths) sees realistic strings.

use std::collections::HashSet;

use rand::Rng;

/// Characters of reviewer ids and non-book ASINs: digits and upper-case letters.
const ALNUM: &[u8; 36] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// Length of a reviewer id, `A` included (Amazon's are 13–14 characters; we use 14 throughout).
pub const USER_ID_LEN: usize = 14;

/// Length of an ASIN.
pub const ITEM_ID_LEN: usize = 10;

/// Share of items that get an ISBN-10-like ASIN (printed books); the rest get a `B…` ASIN
/// (Kindle editions and other products), roughly as in the Books category.
pub const ISBN_SHARE: f64 = 0.7;

/// The ISBN-10 check character of nine digits (ASCII `0`..=`9`): the weighted sum
/// `10*d1 + 9*d2 + … + 2*d9 + 1*check` must be divisible by 11, and a check value of 10 is `X`.
pub fn isbn10_check_char(digits: &[u8; 9]) -> u8 {
    let sum: u32 = digits
        .iter()
        .zip((2..=10u32).rev())
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    match (11 - sum % 11) % 11 {
        10 => b'X',
        c => b'0' + c as u8,
    }
}

/// Whether a 10-character id is a valid ISBN-10 (nine digits and a correct check character).
pub fn is_valid_isbn10(id: &str) -> bool {
    let b = id.as_bytes();
    if b.len() != 10 || !b[..9].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let mut digits = [0u8; 9];
    digits.copy_from_slice(&b[..9]);
    isbn10_check_char(&digits) == b[9]
}

fn random_alnum<R: Rng>(rng: &mut R, out: &mut [u8]) {
    for c in out {
        *c = ALNUM[rng.random_range(0..ALNUM.len())];
    }
}

fn ascii_string(bytes: &[u8]) -> String {
    // Every byte comes from ALNUM, the digits or 'X', so this cannot fail; going through
    // from_utf8 keeps the crate free of unsafe.
    String::from_utf8(bytes.to_vec()).expect("generated ids are ASCII")
}

/// `n` distinct reviewer-like ids: `A` followed by 13 characters from `[0-9A-Z]`.
pub fn user_ids<R: Rng>(rng: &mut R, n: usize) -> Vec<String> {
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; USER_ID_LEN];
    buf[0] = b'A';
    while out.len() < n {
        random_alnum(rng, &mut buf[1..]);
        // A collision in 36^13 is practically impossible, but uniqueness is part of the
        // contract, so it is checked rather than assumed.
        if seen.insert(buf) {
            out.push(ascii_string(&buf));
        }
    }
    out
}

/// `n` distinct ASIN-like ids: about [`ISBN_SHARE`] ISBN-10s, the rest `B` + 9 of `[0-9A-Z]`.
pub fn item_ids<R: Rng>(rng: &mut R, n: usize) -> Vec<String> {
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; ITEM_ID_LEN];
    while out.len() < n {
        if rng.random_bool(ISBN_SHARE) {
            let mut digits = [0u8; 9];
            for d in &mut digits {
                *d = b'0' + rng.random_range(0..10u8);
            }
            buf[..9].copy_from_slice(&digits);
            buf[9] = isbn10_check_char(&digits);
        } else {
            buf[0] = b'B';
            random_alnum(rng, &mut buf[1..]);
        }
        if seen.insert(buf) {
            out.push(ascii_string(&buf));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_isbn_check_chars() {
        // Published ISBN-10s, one with the 'X' check character.
        assert!(is_valid_isbn10("0306406152"));
        assert!(is_valid_isbn10("080442957X"));
        assert!(is_valid_isbn10("0553213113"));
        assert!(!is_valid_isbn10("0306406153"));
        assert!(!is_valid_isbn10("B000FC1PJI"));
        assert_eq!(isbn10_check_char(b"030640615"), b'2');
        assert_eq!(isbn10_check_char(b"080442957"), b'X');
    }
}
