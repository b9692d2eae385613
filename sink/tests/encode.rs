#![allow(clippy::unwrap_used)]
//! The Redis value (semantics §6): exact bytes, escaping, float round trip.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::ser::{Serialize, SerializeStruct, Serializer};
use sink::{encode_profile, EncodedProfile, ProfileRecord};

fn record<'a>(user: &'a str, items: &'a [&'a str], vector: &'a [f32]) -> ProfileRecord<'a> {
    ProfileRecord {
        user_id: user,
        timestamp: 1_456_923_842,
        history_items: items,
        interest_vector: vector,
        known_items: 48,
        epoch: 1234,
    }
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap()
}

#[test]
fn exact_json_in_contract_order() {
    let r = record(
        "A34O9UGRTZNTR8",
        &["0553213113", "B000FC1PJI"],
        &[0.5, -1.25, 0.1, 3.0],
    );
    assert_eq!(
        text(encode_profile(&r)),
        r#"{"user_id":"A34O9UGRTZNTR8","timestamp":1456923842,"history_items":["0553213113","B000FC1PJI"],"interest_vector":[0.5,-1.25,0.1,3.0],"known_items":48,"epoch":1234}"#
    );
}

#[test]
fn empty_history_and_vector() {
    assert_eq!(
        text(encode_profile(&record("u", &[], &[]))),
        r#"{"user_id":"u","timestamp":1456923842,"history_items":[],"interest_vector":[],"known_items":48,"epoch":1234}"#
    );
}

#[test]
fn odd_ids_are_escaped_and_round_trip() {
    let users = [
        r#"quo"te"#,
        r"back\slash",
        "tab\tnew\nline\u{1}",
        "ünïcødé ✓ 😀",
        r#""timestamp":99999999999"#,
        r#"x","timestamp":1,"epoch":2}"#,
    ];
    for user in users {
        let items = [user, "plain"];
        let json = encode_profile(&record(user, &items, &[1.0]));
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["user_id"], user);
        assert_eq!(v["history_items"][0], user);
        assert_eq!(v["timestamp"], 1_456_923_842u64);
        assert_eq!(v["epoch"], 1234);
        // The script's patterns rely on this: no string content can put an unescaped quote
        // next to a colon, so "timestamp": occurs exactly once, as the real field.
        assert_eq!(text(json.clone()).matches(r#""timestamp":"#).count(), 1);
        assert!(text(json).ends_with(r#","epoch":1234}"#));
    }
    // Exact escaping of the tricky characters.
    let json = text(encode_profile(&record("a\"b\\c\u{7}é", &[], &[])));
    assert!(
        json.starts_with(r#"{"user_id":"a\"b\\c\u0007é","#),
        "{json}"
    );
}

#[test]
fn floats_round_trip_exactly() {
    let mut vector = vec![
        0.1f32,
        1.0 / 3.0,
        f32::MIN_POSITIVE,
        f32::MAX,
        f32::MIN,
        f32::EPSILON,
        -0.0,
        1e-45,
        123_456.79,
    ];
    // A deterministic spread of ordinary values.
    let mut x = 0x1234_5678u32;
    for _ in 0..1000 {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        vector.push(f32::from_bits(x & 0x3fff_ffff | (x & 0x8000_0000)));
    }
    let json = encode_profile(&record("u", &[], &vector));
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let back: Vec<f32> = v["interest_vector"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(back.len(), vector.len());
    for (a, b) in vector.iter().zip(&back) {
        assert_eq!(a.to_bits(), b.to_bits(), "{a} came back as {b}");
    }
}

#[test]
fn non_finite_floats_become_zero() {
    let json = text(encode_profile(&record(
        "u",
        &[],
        &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 2.0],
    )));
    assert!(
        json.contains(r#""interest_vector":[0.0,0.0,0.0,2.0]"#),
        "{json}"
    );
}

#[test]
fn owned_item_ids_encode_the_same() {
    let owned: Vec<String> = vec!["a".into(), "b\"".into()];
    let borrowed = ["a", "b\""];
    let with_owned = ProfileRecord {
        user_id: "u",
        timestamp: 1,
        history_items: &owned,
        interest_vector: &[0.5],
        known_items: 2,
        epoch: 3,
    };
    let with_borrowed = ProfileRecord {
        history_items: &borrowed[..],
        ..record("u", &[], &[0.5])
    };
    let with_borrowed = ProfileRecord {
        timestamp: 1,
        known_items: 2,
        epoch: 3,
        ..with_borrowed
    };
    assert_eq!(encode_profile(&with_owned), encode_profile(&with_borrowed));
}

/// The value as serde_json writes it from a plainly written struct: an independent statement of
/// the contract's bytes (field order, escaping, shortest-form floats, non-finite as 0.0).
struct Oracle<'r, 'a>(&'r ProfileRecord<'a, String>);

impl Serialize for Oracle<'_, '_> {
    fn serialize<Z: Serializer>(&self, serializer: Z) -> Result<Z::Ok, Z::Error> {
        let r = self.0;
        let vector: Vec<f32> = r
            .interest_vector
            .iter()
            .map(|&x| if x.is_finite() { x } else { 0.0 })
            .collect();
        let mut s = serializer.serialize_struct("Profile", 6)?;
        s.serialize_field("user_id", r.user_id)?;
        s.serialize_field("timestamp", &r.timestamp)?;
        s.serialize_field("history_items", r.history_items)?;
        s.serialize_field("interest_vector", &vector)?;
        s.serialize_field("known_items", &r.known_items)?;
        s.serialize_field("epoch", &r.epoch)?;
        s.end()
    }
}

fn random_id(rng: &mut ChaCha8Rng) -> String {
    const ODD: [char; 10] = [
        '"', '\\', '\n', '\u{0}', '\u{1f}', '\u{7f}', 'é', '✓', '😀', '/',
    ];
    (0..rng.random_range(0..16))
        .map(|_| {
            if rng.random_bool(0.1) {
                ODD[rng.random_range(0..ODD.len())]
            } else {
                rng.random_range(b' '..=b'~') as char
            }
        })
        .collect()
}

#[test]
fn same_bytes_as_serde_json_on_random_records() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for _ in 0..2000 {
        let user_id = random_id(&mut rng);
        let items: Vec<String> = (0..rng.random_range(0..8))
            .map(|_| random_id(&mut rng))
            .collect();
        let vector: Vec<f32> = (0..rng.random_range(0..6))
            .map(|_| match rng.random_range(0..10) {
                0 => f32::NAN,
                1 => f32::NEG_INFINITY,
                2 => 0.0,
                3 => -0.0,
                4 => rng.random_range(-1.0..1.0),
                _ => f32::from_bits(rng.random()),
            })
            .collect();
        let record = ProfileRecord {
            user_id: &user_id,
            timestamp: rng.random_range(0..=1u64 << 53),
            history_items: &items,
            interest_vector: &vector,
            known_items: rng.random(),
            epoch: rng.random_range(0..=1u64 << 53),
        };
        let expected = serde_json::to_string(&Oracle(&record)).unwrap();
        assert_eq!(text(encode_profile(&record)), expected);
        let encoded = EncodedProfile::encode(&record).unwrap();
        assert_eq!(encoded.value(), expected);
        assert_eq!(encoded.user_id(), user_id);
        assert_eq!(
            encoded.non_finite(),
            vector.iter().filter(|x| !x.is_finite()).count()
        );
    }
}

#[test]
fn encoding_refuses_what_the_script_cannot_compare() {
    let over = (1u64 << 53) + 1;
    let too_late = ProfileRecord {
        epoch: over,
        ..record("u", &[], &[])
    };
    let too_new = ProfileRecord {
        timestamp: over,
        ..record("u", &[], &[])
    };
    for r in [too_late, too_new] {
        let err = EncodedProfile::encode(&r).unwrap_err();
        assert!(err.to_string().contains("above 2^53"), "{err}");
    }
}
