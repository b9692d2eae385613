//! The records that flow through the dataflow. Everything here is plain ordered data: floats are
//! carried as bit patterns or fixed-point integers so that records can be consolidated, and they
//! never appear in a key.

use serde::{Deserialize, Serialize};

/// An id (user or item) as the dataflow keys it: the 128-bit xxh3 hash of its bytes. Fixed-size
/// keys hash and compare in a few instructions where strings would chase pointers; each string
/// itself is kept once, in the interest operator's tables. With 128 bits, a collision among even
/// a billion ids has odds below 10^-20.
pub type IdKey = u128;

/// The [`IdKey`] of an id. The seed is fixed, so every worker and process agrees.
pub fn id_key(id: &str) -> IdKey {
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// Where a message was read: its partition and offset. Within an epoch, messages are applied in
/// this order, which for one partition is the order they were read in.
pub type ReadPosition = (i32, i64);

/// A valid profile message as it enters the dataflow; its history is already cut to the kept
/// length (semantics §4).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProfileEvent {
    pub user_id: String,
    pub timestamp: u64,
    pub history_items: Vec<String>,
    pub position: ReadPosition,
}

/// An item-feature update as it enters the dataflow: new features, or `None` to delete.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FeatureEvent {
    pub item_id: String,
    pub features: Option<FeatureVector>,
    pub position: ReadPosition,
}

/// An f32 feature vector kept as bit patterns, so that it is `Ord` data that differential can
/// consolidate. It is only ever a value, never a key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FeatureVector(Vec<u32>);

/// The largest feature magnitude accepted. It bounds the fixed-point sums (see [`Contribution`])
/// well inside `i64` for histories of up to [`MAX_HISTORY_LIMIT`] items.
pub const MAX_FEATURE_MAGNITUDE: f32 = 1.0e5;

/// The longest history the dataflow may be configured to keep.
pub const MAX_HISTORY_LIMIT: usize = profile::MAX_HISTORY_ITEMS;

impl FeatureVector {
    /// Wraps feature values; `None` if one is not finite or exceeds [`MAX_FEATURE_MAGNITUDE`].
    pub fn new(values: &[f32]) -> Option<Self> {
        values
            .iter()
            .all(|x| x.is_finite() && x.abs() <= MAX_FEATURE_MAGNITUDE)
            .then(|| FeatureVector(values.iter().map(|x| x.to_bits()).collect()))
    }

    /// The values.
    pub fn values(&self) -> impl ExactSizeIterator<Item = f32> + '_ {
        self.0.iter().map(|&bits| f32::from_bits(bits))
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A user's current profile: the kept history and the timestamp of the winning message.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Profile {
    pub user_id: String,
    pub timestamp: u64,
    pub history_items: Vec<String>,
}

/// One scale unit of the fixed-point sums: 2^32, so weights and features keep about 9 decimal
/// digits, far below the 1e-4 readers compare with.
pub const FIXED_POINT_SCALE: f64 = 4_294_967_296.0;

/// Layout of the per-user sums each output carries (a `Vec<isize>`):
/// `[profiles, known_items, Σ weight, Σ weight·x_0, …, Σ weight·x_{D-1}]`, weights and features
/// in fixed point, each term rounded on its own. Integer sums are associative, so every worker
/// count and every order of the terms gives the same bits, and an output compares equal to the
/// one it retracts exactly when nothing changed.
#[derive(Debug, Clone, Copy)]
pub struct Contribution;

impl Contribution {
    /// Index of the profile count (1 for every user with a profile, so that a user with no known
    /// item still has sums, all zero but this one).
    pub const PROFILES: usize = 0;
    /// Index of the known-item count.
    pub const KNOWN: usize = 1;
    /// Index of the weight sum.
    pub const WEIGHT: usize = 2;
    /// Index of the first weighted feature sum.
    pub const FEATURES: usize = 3;

    /// The sums a profile adds by existing.
    pub fn profile(dim: usize) -> Vec<isize> {
        let mut sums = vec![0; Self::FEATURES + dim];
        sums[Self::PROFILES] = 1;
        sums
    }

    /// The sums a known item at distance `k` from the newest adds: weight `decay^k`.
    pub fn item(k: u32, decay: f64, features: &FeatureVector) -> Vec<isize> {
        let weight = Self::weight(k, decay);
        let mut sums = Vec::with_capacity(Self::FEATURES + features.len());
        sums.extend([0, 1, to_fixed(weight)]);
        sums.extend(features.values().map(|x| to_fixed(weight * f64::from(x))));
        sums
    }

    /// The sums of a whole history: [`Contribution::profile`] plus [`Contribution::item`] of
    /// each known item, given as its distance `k` from the newest and its features. The terms
    /// are the same, each rounded on its own, so the bits are too; they are only added feature
    /// by feature across the items rather than item by item, so that the loads of the items'
    /// features, scattered over a table far larger than the caches, are independent of each
    /// other and overlap, instead of each waiting for the one before.
    pub fn history(dim: usize, decay: f64, items: &[(u32, &[f32])]) -> Vec<isize> {
        let len = items.iter().map(|(_, x)| x.len()).fold(dim, usize::max);
        let mut sums = Self::profile(len);
        let weights: Vec<f64> = items.iter().map(|&(k, _)| Self::weight(k, decay)).collect();
        sums[Self::KNOWN] += items.len() as isize;
        sums[Self::WEIGHT] += weights.iter().map(|&w| to_fixed(w)).sum::<isize>();
        for (j, sum) in sums[Self::FEATURES..].iter_mut().enumerate() {
            for (&(_, features), &weight) in items.iter().zip(&weights) {
                if let Some(&x) = features.get(j) {
                    *sum += to_fixed(weight * f64::from(x));
                }
            }
        }
        sums
    }

    /// The weight of an item at distance `k` from the newest.
    fn weight(k: u32, decay: f64) -> f64 {
        decay.powi(k.min(i32::MAX as u32) as i32)
    }

    /// The interest vector and known-item count from accumulated sums (semantics §5).
    pub fn finish(sums: &[isize], dim: usize) -> (Vec<f32>, u32) {
        let known = sums.get(Self::KNOWN).copied().unwrap_or(0);
        let weight = sums.get(Self::WEIGHT).copied().unwrap_or(0);
        if known <= 0 || weight <= 0 {
            return (vec![0.0; dim], 0);
        }
        let vector = (0..dim)
            .map(|j| {
                let num = sums.get(Self::FEATURES + j).copied().unwrap_or(0);
                (num as f64 / weight as f64) as f32
            })
            .collect();
        (vector, u32::try_from(known).unwrap_or(u32::MAX))
    }
}

/// `x` in fixed point, rounded half away from zero: the value of
/// `(x * FIXED_POINT_SCALE).round() as isize`, bit for bit, without `f64::round`, which on the
/// baseline x86-64 target is a call into libm, and without a branch on the fraction, which
/// mispredicts half the time. Recomputing a user's sums rounds `history × D` terms (1,600 for
/// 50 items of 32 features), and these two costs dominated it.
fn to_fixed(x: f64) -> isize {
    /// 2^52: from here on every `f64` is an integer.
    const INTEGRAL: f64 = 4_503_599_627_370_496.0;
    let y = x * FIXED_POINT_SCALE;
    if y.abs() >= INTEGRAL {
        // Already integral, or beyond `isize`, where `as` saturates as it does after `round`.
        return y as isize;
    }
    // `as` truncates toward zero (NaN gives 0); below 2^52 the fraction `y - t` is exact.
    let t = y as isize;
    let fraction = y - t as f64;
    t + isize::from(fraction >= 0.5) - isize::from(fraction <= -0.5)
}

/// A user's profile as the sink writes it: the final value of an epoch (semantics §6).
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileOutput {
    pub user_id: String,
    pub timestamp: u64,
    pub history_items: Vec<String>,
    pub interest_vector: Vec<f32>,
    pub known_items: u32,
}

impl ProfileEvent {
    /// The event of a valid message read at `position`, keeping only the last `max_history`
    /// items (semantics §4).
    pub fn from_message(
        message: profile::ProfileMessage,
        position: ReadPosition,
        max_history: usize,
    ) -> Self {
        let mut history_items = message.history_items;
        let cut = history_items.len().saturating_sub(max_history);
        history_items.drain(..cut);
        ProfileEvent {
            user_id: message.user_id,
            timestamp: message.timestamp,
            history_items,
            position,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_point_sums_match_the_float_formula() {
        let a = FeatureVector::new(&[1.0, -0.5]).unwrap();
        let b = FeatureVector::new(&[0.25, 3.0]).unwrap();
        let mut sums = Contribution::profile(2);
        for (k, x) in [(2, &a), (0, &b)] {
            for (s, c) in sums.iter_mut().zip(Contribution::item(k, 0.9, x)) {
                *s += c;
            }
        }
        let (vector, known) = Contribution::finish(&sums, 2);
        let expected = profile::interest_vector(
            [Some(&[1.0f32, -0.5][..]), None, Some(&[0.25f32, 3.0][..])],
            2,
            0.9,
        );
        assert_eq!(known, expected.known_items);
        for (x, y) in vector.iter().zip(&expected.vector) {
            assert!((x - y).abs() < 1e-6, "{vector:?} vs {:?}", expected.vector);
        }
    }

    #[test]
    fn to_fixed_rounds_as_f64_round_does() {
        let scale = FIXED_POINT_SCALE;
        let mut cases = vec![
            0.0,
            -0.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
        ];
        for y in [
            0.5,
            1.5,
            2.5,
            0.49999999999999994,
            2f64.powi(52) + 1.0,
            2f64.powi(53),
            1e300,
        ] {
            for y in [y, -y, y.next_up(), y.next_down()] {
                cases.push(y / scale);
            }
        }
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..1_000_000 {
            // xorshift: a spread of magnitudes, and halves (an integer over 2^33).
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mantissa = (rng >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            cases.push(mantissa * 2f64.powi((rng % 80) as i32 - 20));
            cases.push(((rng >> 20) as i64 - (1 << 42)) as f64 / 2.0 / scale);
        }
        for x in cases {
            assert_eq!(to_fixed(x), (x * scale).round() as isize, "{x:e}");
        }
    }

    #[test]
    fn a_history_sums_the_terms_of_its_items() {
        let xs: Vec<FeatureVector> = (0..7)
            .map(|i| FeatureVector::new(&[i as f32 * 0.37 - 1.0, 1.0 / (i as f32 + 0.5)]).unwrap())
            .collect();
        let ks = [6, 5, 3, 2, 0, 0, 1];
        let values: Vec<Vec<f32>> = xs.iter().map(|x| x.values().collect()).collect();
        let items: Vec<(u32, &[f32])> = ks
            .into_iter()
            .zip(values.iter().map(Vec::as_slice))
            .collect();
        let mut expected = Contribution::profile(2);
        for (k, x) in ks.into_iter().zip(&xs) {
            for (s, c) in expected.iter_mut().zip(Contribution::item(k, 0.9, x)) {
                *s += c;
            }
        }
        assert_eq!(Contribution::history(2, 0.9, &items), expected);
        assert_eq!(Contribution::history(2, 0.9, &[]), Contribution::profile(2));
    }

    #[test]
    fn no_known_item_is_zeros() {
        assert_eq!(
            Contribution::finish(&Contribution::profile(3), 3),
            (vec![0.0; 3], 0)
        );
    }

    #[test]
    fn features_out_of_range_are_refused() {
        assert!(FeatureVector::new(&[f32::NAN]).is_none());
        assert!(FeatureVector::new(&[1.0e6]).is_none());
        assert!(FeatureVector::new(&[-1.0e5, 1.0e5]).is_some());
    }

    #[test]
    fn the_largest_sums_fit() {
        let x = FeatureVector::new(&[MAX_FEATURE_MAGNITUDE]).unwrap();
        let one = Contribution::item(0, 1.0, &x)[Contribution::FEATURES];
        assert!(one.checked_mul(MAX_HISTORY_LIMIT as isize).is_some());
    }
}
